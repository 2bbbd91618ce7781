"""The order of a dpbp command's fsyncs and renames, recorded from outside (Linux).

    DPBP_FSYNC_LOG=PATH python -m tests.fsync_spy MODULE [ARGS...]   # python -m MODULE ARGS

wraps os.fsync, os.replace and os.rename; each call appends one JSON line to PATH as it
happens (so a command that ends with os._exit leaves them all):
    {"call": "fsync", "path": the file or folder synced, "size": its bytes then}
    {"call": "replace", "src": ..., "dst": ..., "size": the bytes of src}   (rename too)
`check_durable(events, path)` and `synced_before(...)` read them back: a file written
atomically and durably had its data synced, then was renamed into place, then its folder
was synced, and a test lists the files that must be written so (the run directory's
config, metrics, checkpoints, best.npz, steps.jsonl, ...).

Test code only: dpbp never imports it.
"""

import json
import os
import runpy
import sys


def install(log_path):
    """From now on every fsync and rename of this process is appended to log_path."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def record(**event):
        os.write(log, (json.dumps(event) + "\n").encode())

    def fsync(fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        record(call="fsync", path=os.readlink(f"/proc/self/fd/{fd}"),
               size=os.fstat(fd).st_size)
        return real_fsync(fd)

    def named(path):   # the real folder, the name itself (a link is not followed)
        return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                            os.path.basename(path))

    def moved(real):
        def move(src, dst, **kwargs):
            record(call="replace", src=named(src), dst=named(dst),
                   size=os.stat(src).st_size if os.path.isfile(src) and
                   not os.path.islink(src) else None)
            return real(src, dst, **kwargs)
        return move

    os.fsync, os.replace, os.rename = fsync, moved(real_replace), moved(real_rename)


def read(log_path):
    with open(log_path) as f:
        return [json.loads(line) for line in f]


def check_durable(events, path):
    """Assert that every time `path` was written it was written atomically and durably:
    a temporary file's data synced (at the size it is renamed with), renamed to `path`,
    then the folder synced; and that it was written at least once. Returns the indexes of
    its renames in `events`."""
    path = os.path.realpath(path)   # as /proc names the files synced
    renames = [i for i, e in enumerate(events) if e["call"] == "replace" and e["dst"] == path]
    assert renames, f"{path} was never renamed into place"
    folder = os.path.dirname(path)
    for i in renames:
        src, size = events[i]["src"], events[i]["size"]
        assert any(e["call"] == "fsync" and e["path"] == src and e["size"] == size
                   for e in events[:i]), f"{path}: its data were not synced before the rename"
        after = events[i + 1:]
        until = next((k for k, e in enumerate(after) if e["call"] == "replace"), len(after))
        assert any(e["call"] == "fsync" and e["path"] == folder for e in after[:until]), \
            f"{path}: its folder was not synced after the rename (before the next one)"
    return renames


def synced_before(events, path, size, i):
    """Whether `path` was synced at `size` bytes or more before event i."""
    path = os.path.realpath(path)
    return any(e["call"] == "fsync" and e["path"] == path and e["size"] >= size
               for e in events[:i])


if __name__ == "__main__":
    install(os.environ["DPBP_FSYNC_LOG"])
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
