""".npy arrays on disk, read by rows with positioned reads and verified block by block.

    a = NpyFile(path)     # the header, then one pass over the data: a CRC-32 per block
    a.finite, a.largest   # found in that pass: no NaN or Inf; the largest magnitude
    a[rows]               # rows (a slice, or an array of row numbers): a new array
    a.reshape(n, -1)      # the same file read as rows of another shape (images flattened)

No memory map: a mapped file that is truncated under the process ends it with SIGBUS,
and one rewritten in place changes the array without a word. Here rows are read with
pread, in whole blocks of BLOCK_BYTES (at least one row), and each block is checked
against the CRC-32 it had when the file was opened, before its rows are used: a change
or a truncation is a UserError naming the file, when it is read. The file stays open,
so a file replaced by another (a rename over it) is still read as it was. Ranks on one
node share the file's pages in the page cache; each holds privately only the checksums
(4 bytes a block) and the rows it asked for. os.pread reads at an offset of its own, so
threads may read at once.
"""

import copy
import math
import os
import zlib

import numpy as np

from dpbp.errors import UserError

BLOCK_BYTES = 4096       # a page: a random row costs one page read either way
PASS_BYTES = 1 << 22     # the pass at opening reads this much at a time


class NpyFile:
    """The array of a .npy file (C order, no Python objects), read on demand. `shape`,
    `dtype`, `ndim` and len() as an ndarray's; indexing reads."""

    def __init__(self, path):
        self.path = str(path)
        self._file = open(path, "rb", buffering=0)   # closed with the object
        try:
            self.shape, self.dtype, self.offset = _header(self._file, self.path)
        except BaseException:
            self._file.close()
            raise
        self.ndim = len(self.shape)
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self.rows_per_block = max(1, BLOCK_BYTES // max(1, self.row_bytes))
        self.crcs = self._checksums()

    def __len__(self):
        return self.shape[0]

    def reshape(self, n, *row_shape):
        """The array with rows of `row_shape` (one -1 allowed), the same values in the same
        order, as ndarray.reshape gives it (`n` its length): images flattened into rows
        of features, say. Another NpyFile reading the same open file, blocks and
        checksums."""
        size = math.prod(self.shape[1:])
        known = math.prod(d for d in row_shape if d != -1)
        row_shape = tuple(size // max(1, known) if d == -1 else d for d in row_shape)
        if n != len(self) or math.prod(row_shape) != size:
            raise ValueError(f"cannot read rows of {self.shape[1:]} as {row_shape}")
        out = copy.copy(self)
        out.shape, out.ndim = (n, *row_shape), 1 + len(row_shape)
        return out

    def _checksums(self):
        """The CRC-32 of every block, from one pass over the file, which also finds
        `finite` (no NaN or Inf in the array) and `largest` (the largest magnitude of its
        values, where they are finite), for the checks of its values."""
        n_blocks = -(-len(self) // self.rows_per_block)
        crcs = np.empty(n_blocks, dtype=np.uint32)
        step = max(1, PASS_BYTES // (self.rows_per_block * max(1, self.row_bytes)))
        self.finite, self.largest = True, 0
        for first in range(0, n_blocks, step):
            try:
                data = self._read_blocks(np.arange(first, min(first + step, n_blocks)), crcs,
                                         check=False)
            except OSError as e:
                raise UserError(f"{self.path}: cannot read it ({e.strerror})") from None
            values = np.frombuffer(data, dtype=self.dtype)
            if values.size and self.dtype.kind == "f":
                self.largest = max(self.largest, float(np.abs(values).max()))
                self.finite = self.finite and bool(np.isfinite(values).all())
            elif values.size and self.dtype.kind in "iu":   # abs(-128) is -128 in int8
                self.largest = max(self.largest, int(values.max()), -int(values.min()))
        return crcs

    def _read_blocks(self, blocks, crcs, check=True):
        """The raw bytes of `blocks` (sorted block numbers), read (consecutive ones at
        once), in that order. Each block's CRC-32 is checked against crcs[block] (or,
        without `check`, stored there)."""
        rpb, row_bytes, n = self.rows_per_block, self.row_bytes, len(self)
        size, parts, crc32, fd = rpb * row_bytes, [], zlib.crc32, self._file.fileno()
        starts = np.flatnonzero(np.diff(blocks, prepend=-2) != 1)   # runs of consecutive
        ends = np.append(blocks[starts[1:] - 1] + 1, blocks[-1] + 1) if len(blocks) else []
        for first, end in zip(blocks[starts].tolist(), np.asarray(ends).tolist()):
            want = (min(end * rpb, n) - first * rpb) * row_bytes   # a run: one read
            data = os.pread(fd, want, self.offset + first * size)
            if len(data) < want:
                data = self._read_on(data, want, first * size)
            view = memoryview(data)
            for b in range(first, end):
                crc = crc32(view[(b - first) * size:(b - first + 1) * size])
                if not check:
                    crcs[b] = crc
                elif crc != crcs[b]:
                    raise UserError(
                        f"{self.path} changed on disk while this command read it (rows "
                        f"{b * rpb} to {min((b + 1) * rpb, n) - 1} differ from when it was "
                        "opened): stopped before using them; restore the file, or rerun "
                        "the command on the new data")
            parts.append(data)
        if not check:   # the pass at opening: looked at, not kept
            return parts[0] if len(parts) == 1 else b"".join(parts)
        return bytearray().join(parts)   # writable, as an array read from memory is

    def _read_on(self, data, want, start):
        """`data`, read from byte `start` of the array but cut short, completed to `want`
        bytes; a UserError where the file ends before (it was truncated)."""
        fd = self._file.fileno()
        while len(data) < want:
            more = os.pread(fd, want - len(data), self.offset + start + len(data))
            if not more:
                raise UserError(
                    f"{self.path} was truncated while this command read it "
                    f"({os.fstat(fd).st_size:,} bytes, its array needs "
                    f"{self.offset + len(self) * self.row_bytes:,}): stopped before using "
                    "its rows; restore the file, or rerun the command on the new data")
            data += more
        return data

    def _verified(self, blocks):
        """The rows of `blocks` (sorted block numbers) as one array, in that order, each
        block checked against its checksum."""
        try:
            data = self._read_blocks(blocks, self.crcs)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read it ({e.strerror})") from None
        return np.frombuffer(data, dtype=self.dtype).reshape(-1, *self.shape[1:])

    def __getitem__(self, rows):
        """Rows of the array, read and verified: a slice (step 1) or an array of row
        numbers, in any order. A new array of the file's dtype."""
        rpb = self.rows_per_block
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(len(self))
            if stop <= start:
                return np.empty((0, *self.shape[1:]), self.dtype)
            held = self._verified(np.arange(start // rpb, (stop - 1) // rpb + 1))
            return held[start % rpb:start % rpb + stop - start]
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else \
            np.asarray(rows, dtype=np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        blocks, where = np.unique(rows // rpb, return_inverse=True)
        return self._verified(blocks)[where * rpb + rows % rpb]


def _header(f, path):
    """(shape, dtype, data offset) of the .npy file open as `f`; a UserError where it is
    not one that can be read by rows, or holds less data than its header declares."""
    try:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError("it does not start with the .npy magic string")
        f.seek(0)
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"format version {version[0]}.{version[1]}")
        shape, fortran, dtype = read(f)
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from None
    if dtype.hasobject:
        raise UserError(f"{path}: not a readable .npy file (it holds Python objects)")
    if fortran and len(shape) > 1:
        raise UserError(f"{path}: saved in Fortran order, so its rows are not contiguous on "
                        "disk; save it with numpy.save(path, numpy.ascontiguousarray(x))")
    offset = f.tell()
    size = os.fstat(f.fileno()).st_size
    need = offset + math.prod(shape) * dtype.itemsize
    if size < need:
        raise UserError(f"{path}: not a readable .npy file (its header declares {need:,} "
                        f"bytes, the file holds {size:,}: it is truncated)")
    return tuple(shape), dtype, offset
