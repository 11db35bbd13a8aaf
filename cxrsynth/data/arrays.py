"""Image and token arrays read per batch: memory bounded by the batch, not by the number of images.

The pipeline's arrays (`images_<split>.npy`, `tokens_<split>.npy`, the synthetic `images.npy`) are plain `.npy` files
of uint8 / uint16 rows. At MIMIC-CXR scale they are tens of GB, so no stage may hold one in RAM, and none should map
one with `np.load(mmap_mode="r")` and then walk through it either: every page touched through a mapping is counted
in the process's resident memory (RssFile) until the kernel reclaims it, which makes memory look O(N) and, under
`torchrun --nproc-per-node 8`, multiplies it by the ranks.

- `NpyRows(path)`: the rows of an `.npy` file read with `os.pread` on demand. `rows[i]`, `rows[i:j]` and
  `rows[index_array]` return fresh numpy arrays; nothing else stays in memory. Each DDP rank reads only the rows its
  sampler asks for.
- `Concat(a, b, ...)`: rows of several sources one after the other (real + synthetic training sets).
- `stream_sha256(source)`: SHA-256 of the rows' bytes, read chunk by chunk; equal to
  `hashlib.sha256(np.ascontiguousarray(a).tobytes())`.
(`cxrsynth.eval.features` adds `Resized`, a view that resizes each requested batch, and `mean_std`, pixel statistics
accumulated per batch.)

Every source used by training code supports `len()`, `.shape`, integer, slice and integer-array indexing; numpy arrays
do too, so tests can pass in-memory arrays and get the same batches.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

CHUNK_BYTES = 1 << 24   # rows read together by sequential scans (hash, statistics): 16 MB


class NpyRows:
    """Read-on-demand rows of a C-order `.npy` file (any dtype, N x ...)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"{self.path}: unsupported .npy version {version}")
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran-order arrays are not supported")
        if dtype.hasobject:
            raise ValueError(f"{self.path}: object arrays are not allowed")
        if not shape:
            raise ValueError(f"{self.path}: a 0-d array has no rows")
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        size = self.path.stat().st_size
        if size < self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.path}: file holds {size} bytes, its header promises "
                             f"{self.offset + self.shape[0] * self.row_bytes} (truncated)")
        self._fd: int | None = None
        self._pid = -1

    # a file descriptor per process: DataLoader workers and forked ranks never share one offset-less pread fd anyway,
    # but reopening after fork keeps the descriptor table of each process its own
    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid")} | {"_fd": None, "_pid": -1}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _read(self, start: int, count: int) -> np.ndarray:
        out = np.empty((count, *self.row_shape), self.dtype)
        if count:
            want = count * self.row_bytes
            got = os.preadv(self._file(), [memoryview(out).cast("B")], self.offset + start * self.row_bytes)
            if got != want:
                raise OSError(f"{self.path}: short read ({got} of {want} bytes at row {start})")
        return out

    def __getitem__(self, key) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self._read(i, 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._read(start, max(0, stop - start))
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        out = np.empty((len(idx), *self.row_shape), self.dtype)
        # runs of consecutive rows are read with one call each
        k = 0
        while k < len(idx):
            j = k + 1
            while j < len(idx) and idx[j] == idx[j - 1] + 1:
                j += 1
            out[k:j] = self._read(int(idx[k]), j - k)
            k = j
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # np.asarray(rows): the whole array (small data only)
        a = self._read(0, self.shape[0])
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"NpyRows({self.path.as_posix()!r}, shape={self.shape}, dtype={self.dtype})"


class Concat:
    """The rows of several sources (one dtype and row shape) one after the other."""

    def __init__(self, *sources) -> None:
        if not sources:
            raise ValueError("Concat needs at least one source")
        shapes = {tuple(s.shape[1:]) for s in sources}
        if len(shapes) != 1:
            raise ValueError(f"Concat: row shapes differ: {sorted(shapes)}")
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s) for s in sources])
        self.shape = (int(self.starts[-1]), *next(iter(shapes)))
        self.dtype = np.result_type(*[s.dtype for s in sources])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            s = int(np.searchsorted(self.starts, i, side="right") - 1)
            return np.asarray(self.sources[s][i - int(self.starts[s])], self.dtype)
        idx = np.arange(n)[key] if isinstance(key, slice) else np.asarray(key).astype(np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(which):
            m = which == s
            local = idx[m] - int(self.starts[s])
            lo, hi = int(local.min()), int(local.max()) + 1
            if hi - lo == len(local) and (np.diff(local) == 1).all():
                out[m] = self.sources[s][lo:hi]          # one contiguous read
            else:
                out[m] = self.sources[s][local]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[0:len(self)]
        return a if dtype is None else a.astype(dtype)


def open_rows(path: str | Path) -> NpyRows:
    """The rows of an `.npy` file, read on demand (see `NpyRows`)."""
    return NpyRows(path)


def chunk_rows(source, budget: int = CHUNK_BYTES) -> int:
    """How many rows of `source` fit in `budget` bytes (at least 1)."""
    row = int(np.prod(source.shape[1:], dtype=np.int64)) * np.dtype(source.dtype).itemsize
    return max(1, budget // max(1, row))


def iter_chunks(source, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) of consecutive chunks of `source` (`rows` per chunk, default `chunk_rows`)."""
    step = rows or chunk_rows(source)
    for i in range(0, len(source), step):
        yield i, np.asarray(source[i:i + step])


def stream_sha256(source) -> str:
    """SHA-256 of all rows' bytes in C order, read chunk by chunk (= sha256 of `np.ascontiguousarray(a).tobytes()`)."""
    h = hashlib.sha256()
    for _, chunk in iter_chunks(source):
        h.update(np.ascontiguousarray(chunk).tobytes())
    return h.hexdigest()


def stream_digest(source) -> bytes:
    """The raw 32-byte SHA-256 digest of `stream_sha256`."""
    return bytes.fromhex(stream_sha256(source))


def take(source, idx: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rows `idx` of any source (numpy array, memmap, `NpyRows`, `Concat`, `Resized`) as a numpy array."""
    return np.asarray(source[np.asarray(idx, dtype=np.int64)])


def split_images(interim: str | Path, split: str) -> NpyRows:
    """The ingested uint8 images of a split (`<interim>/images_<split>.npy`), read per batch; row i = the manifest
    row with image_row i of that split."""
    return NpyRows(Path(interim) / f"images_{split}.npy")
