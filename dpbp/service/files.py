"""Files, read and written safely: the one place that opens .npz files and writes atomically.

`read_npz` never unpickles (allow_pickle=False, so loading runs no code from the file)
and turns every way a file can be missing, truncated or not an .npz into one UserError.
`write_atomic` writes a temporary file beside the target, fsyncs it and renames it over
the target, so a crash leaves either the old file or the new one, never half of one.
"""

import lzma
import os
import tempfile
import zipfile
import zlib

import numpy as np

from dpbp.errors import UserError

TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".partial"

# What zipfile and numpy raise on a damaged archive: besides OSError and ValueError, a
# flipped bit in a header can claim an unsupported method or version (NotImplementedError)
# or encryption (RuntimeError), and damaged compressed data fails in zlib or lzma.
_DAMAGED = (OSError, ValueError, EOFError, NotImplementedError, RuntimeError, zlib.error,
            lzma.LZMAError, zipfile.BadZipFile, zipfile.LargeZipFile)


def read_npz(path, what):
    """All arrays of the .npz at `path` as a dict; `what` names it in error messages."""
    if not os.path.isfile(path):
        raise UserError(f"{what}: no such file {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise ValueError("it holds one unnamed array (.npy), not named arrays")
        if not magic.startswith(b"PK"):
            raise ValueError("it is not a zip archive")
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {name: loaded[name] for name in loaded.files}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray):   # numpy returns raw bytes for non-.npy members
                raise ValueError(f"its member {name!r} is not a .npy array")
        return arrays
    except MemoryError as e:   # numpy allocates what the header declares before reading
        raise UserError(f"{what}: {path} declares an array too large for memory ({e})"
                        ) from None
    except _DAMAGED as e:
        raise UserError(f"{what}: {path} is not a readable .npz file ({e})") from None


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, rename it to `path`."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)   # mkstemp's 0600 would hide the file from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)   # make the rename itself durable
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(folder):
    """Delete temporary files that a killed writer left in `folder`."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX):
            os.unlink(os.path.join(folder, name))
