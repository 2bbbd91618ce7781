"""The run record, RUN_DIR/run.json: what a run is, in one file that every command reads.

    schema        SCHEMA: the layout of this file
    run_id        a random id, given at the run's first start and kept by every later one
    created       when the run first started (ISO 8601)
    config        the resolved config the run trains with now (TOML text, as config.toml)
    data          the data it trains on: {array: {"shape", "dtype", "crc32"}} for x, y,
                  x_val, y_val (datasets.identity), so arrays saved anew are the same data
    parent        a branch's parent: {"checkpoint": path, "digest": its SHA-256}; else null
    state         running, stopped (a signal), failed, diverged, completed, early_stopped
    cause         why it is in that state, in words (null while running or completed)
    best          {"epoch", "digest"} of checkpoints/best.npz (run.keep_best); else null
    world_sizes   the world sizes it has run at, in the order of their first use
    data_changes  [{"step", "from", "to"}]: where --allow-data-change let it train on on
                  other data from optimizer step `step` on
    updated       when this file was last written
    digest        SHA-256 of everything above: a damaged file is never taken at its word

Written by rank 0 alone (and by dpbp.launch after a job ended), always atomically
(files.write_atomic) and under the run directory's lock. A state of `running` in a file
whose lock nobody holds was written by a process that died without a word (SIGKILL, a
lost node): `settled_state` reads it as `failed`. Who governs what (docs/operations.md):
the record governs the run's identity, state, best epoch and world sizes, and wins over
config.toml and metrics.jsonl where they disagree; a checkpoint's own config governs its
network, data and split.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import secrets

from dpbp.errors import UserError
from dpbp.service.files import write_atomic

SCHEMA = 1
STATES = ("running", "stopped", "failed", "diverged", "completed", "early_stopped")
FINISHED = ("completed", "early_stopped")


@dataclasses.dataclass(frozen=True)
class Record:
    run_id: str
    created: str
    config: str
    data: dict
    parent: dict | None = None
    state: str = "running"
    cause: str | None = None
    best: dict | None = None
    world_sizes: tuple = ()
    data_changes: tuple = ()
    updated: str = ""

    @classmethod
    def new(cls, config_toml, data, parent=None):
        return cls(run_id=secrets.token_hex(8), created=now(), config=config_toml, data=data,
                   parent=parent)

    def with_state(self, state, cause=None):
        return dataclasses.replace(self, state=state, cause=cause)

    def with_world_size(self, size):
        sizes = tuple(self.world_sizes)
        return dataclasses.replace(self, world_sizes=sizes + ((size,) if size not in sizes
                                                              else ()))


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def path(run_dir):
    return os.path.join(run_dir, "run.json")


def _digest(fields):
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write(run_dir, record):
    """Write `record` as RUN_DIR/run.json, atomically and durably; returns it as written."""
    record = dataclasses.replace(record, updated=now())
    fields = dataclasses.asdict(record)
    fields["world_sizes"], fields["data_changes"] = list(record.world_sizes), \
        list(record.data_changes)
    fields = {"schema": SCHEMA, **fields}
    fields["digest"] = _digest(fields)
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
                               for k, v in fields.items()) + "\n}\n"   # a field a line
    write_atomic(path(run_dir), lambda f: f.write(text.encode()))
    return record


def read(run_dir):
    """RUN_DIR/run.json as a Record, or None where there is none; a UserError naming the
    file where it is damaged, malformed or of a newer schema."""
    where = path(run_dir)
    try:
        with open(where, encoding="utf-8") as f:
            fields = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{where} is not a JSON run record: it is damaged. Move it away, "
                        "and --resume rebuilds it from the run's checkpoints") from None
    if not isinstance(fields, dict):
        raise UserError(f"{where} is not a JSON run record (not an object)")
    stored = fields.pop("digest", None)
    if stored != _digest(fields):
        raise UserError(f"{where} is damaged: its content does not match its SHA-256 "
                        "digest. Move it away, and --resume rebuilds it from the run's "
                        "checkpoints")
    schema = fields.pop("schema", None)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise UserError(f"{where} has schema {schema}; this dpbp reads up to {SCHEMA}: "
                        "upgrade dpbp")
    names = {f.name for f in dataclasses.fields(Record)}
    if set(fields) != names or fields["state"] not in STATES:
        raise UserError(f"{where} is not a run record of this dpbp (fields or state)")
    fields["world_sizes"], fields["data_changes"] = tuple(fields["world_sizes"]), \
        tuple(fields["data_changes"])
    return Record(**fields)


def settled_state(record):
    """The state of a record read under the run directory's lock (so no process runs the
    run now): `running` there means its last process died without writing an end."""
    return "failed" if record.state == "running" else record.state


def describe_state(record):
    """The record's state in a few words, for messages."""
    state = settled_state(record)
    words = {"running": "running", "stopped": "stopped by a signal", "failed": "failed",
             "diverged": "diverged", "completed": "completed",
             "early_stopped": "stopped early"}[state]
    if record.state == "running":
        return words + " (its last process ended without a word: killed, or its node lost)"
    return words + (f" ({record.cause})" if record.cause else "")
