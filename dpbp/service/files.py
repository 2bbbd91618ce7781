"""Files, read and written safely: the one place that opens .npz files and writes atomically.

`read_npz` never unpickles (allow_pickle=False, so loading runs no code from the file)
and turns every way a file can be missing, truncated or not an .npz into one UserError.
`write_atomic` writes a temporary file beside the target, fsyncs it and renames it over
the target, so a crash leaves either the old file or the new one, never half of one.
"""

import lzma
import math
import os
import resource
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


def read_npz(path, what, names=None):
    """The arrays of the .npz at `path` as a dict: all of them, or those of `names` that
    it holds (the others are never inflated). Each member's declared size is checked
    against the memory available before it is read. `what` names it in errors."""
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
            wanted = [name for name in loaded.files if names is None or name in names]
            for name in wanted:
                _check_size(loaded.zip, name, path, what)
            arrays = {name: loaded[name] for name in wanted}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray):   # numpy returns raw bytes for non-.npy members
                raise ValueError(f"its member {name!r} is not a .npy array")
        return arrays
    except MemoryError as e:   # numpy allocates what the header declares before reading
        raise UserError(f"{what}: {path} declares an array too large for memory ({e})"
                        ) from None
    except _DAMAGED as e:
        raise UserError(f"{what}: {path} is not a readable .npz file ({e})") from None


def _check_size(archive, name, path, what):
    """Refuse member `name` of an open .npz before inflating it when the array its header
    declares, or its inflated size, exceeds the memory this process may still use."""
    member = name if name in archive.namelist() else name + ".npy"
    declared = archive.getinfo(member).file_size
    with archive.open(member) as f:
        if f.read(6) == b"\x93NUMPY":
            f.seek(0)
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is not None:
                shape, _, dtype = header(f)
                declared = max(declared, math.prod(shape) * dtype.itemsize)
    room = memory_available()
    if room is not None and declared > room:
        raise UserError(f"{what}: {path}: its member {name!r} needs {declared:,} bytes, more "
                        f"than the {room:,} bytes of memory available")


def memory_available():
    """Bytes this process may still allocate: the system's available memory, or less
    under an address-space limit (ulimit -v); None where neither is known."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits) if limits else None


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
