"""Hostfiles: which hosts a job may use, and how many ranks (slots) each.

Both launchers' forms are read, one host a line, with `#` comments and blank lines:

    node01:16          MPICH (Hydra)
    node02 slots=16    Open MPI (max_slots=... is ignored)
    node03             one slot

and written back in the form of the launcher at hand, so one file serves either MPI.
A host named twice has the sum of its slots. `parse_list` reads the same hosts given
inline, node01:16,node02:16 (dpbp.launch -H).
"""

import re

from dpbp.errors import UserError

_MPICH = re.compile(r"^([^\s:#]+)(?::([0-9]+))?$")   # ASCII digits: int() takes others
_OPEN_MPI = re.compile(r"^([^\s:#]+)((?:\s+[a-z_]+=\S+)+)$")


def parse_line(line, where):
    """(host, slots) of one line that is not blank or a comment."""
    m = _MPICH.match(line)
    if m:
        return m.group(1), int(m.group(2) or 1)
    m = _OPEN_MPI.match(line)
    if m:
        fields = dict(item.split("=", 1) for item in m.group(2).split())
        if re.fullmatch("[0-9]+", fields.get("slots", "1")):
            return m.group(1), int(fields.get("slots", 1))
    raise UserError(f"{where}: cannot read {line!r}; expected HOST, HOST:SLOTS (MPICH) or "
                    "HOST slots=SLOTS (Open MPI)")


def read(path):
    """[(host, slots), ...] in the file's order, each host once; UserError if the file
    cannot be read or a line is malformed. Hosts with 0 slots are left out."""
    try:
        with open(path, encoding="utf-8-sig") as f:   # a byte-order mark is no host
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"hostfile {path}: cannot read it ({getattr(e, 'strerror', e)})"
                        ) from None
    slots = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            host, n = parse_line(line, f"hostfile {path} line {number}")
            slots[host] = slots.get(host, 0) + n
    return [(host, n) for host, n in slots.items() if n > 0]


def total(hosts):
    return sum(n for _, n in hosts)


def render(hosts, flavour):
    """The hostfile's text for `flavour` "mpich" (host:slots) or "openmpi" (host slots=N)."""
    form = "{}:{}" if flavour == "mpich" else "{} slots={}"
    return "".join(form.format(host, n) + "\n" for host, n in hosts)


def parse_list(text):
    """[(host, slots), ...] of an inline host list, HOST[:SLOTS][,HOST[:SLOTS]...] (as
    horovodrun -H and mpirun --host take it), each host once; UserError where an item
    is malformed. Hosts with 0 slots are left out."""
    slots = {}
    for item in text.split(","):
        m = _MPICH.match(item.strip())
        if not m:
            raise UserError(f"-H {text}: cannot read {item.strip()!r}; expected "
                            "HOST:SLOTS[,HOST:SLOTS...], e.g. -H node01:4,node02:4")
        slots[m.group(1)] = slots.get(m.group(1), 0) + int(m.group(2) or 1)
    return [(host, n) for host, n in slots.items() if n > 0]
