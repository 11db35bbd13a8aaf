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
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth.errors import UserError
from cxrsynth.text.chexpert import OBSERVATIONS


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


def shrink_npy(path: str | Path, n: int) -> None:
    """Cut a C-order .npy file to its first n rows in place: rewrite the header with the new length along axis 0,
    keeping its byte length (numpy leaves room for 21 digits there, and anything shorter is padded with spaces before
    the closing newline, which the format allows), then truncate the data. The result is byte-identical to what
    `np.lib.format.open_memmap(path, 'w+', shape=(n, ...))` filled with those rows writes. n > rows raises."""
    fmt = np.lib.format
    with open(path, "r+b") as f:
        version = fmt.read_magic(f)
        read, write = {(1, 0): (fmt.read_array_header_1_0, fmt.write_array_header_1_0),
                       (2, 0): (fmt.read_array_header_2_0, fmt.write_array_header_2_0)}.get(version, (None, None))
        if read is None:
            raise ValueError(f"{path}: .npy format version {version} not supported")
        shape, fortran, dtype = read(f)
        offset = f.tell()
        if not shape or (fortran and len(shape) > 1) or dtype.hasobject:
            raise ValueError(f"{path}: only C-order arrays of at least one dimension, without objects, can shrink")
        if not 0 <= n <= shape[0]:
            raise ValueError(f"{path}: cannot shrink {shape[0]} rows to {n}")
        buf = io.BytesIO()
        write(buf, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, *shape[1:])})
        header = buf.getvalue()
        if len(header) > offset:
            raise ValueError(f"{path}: the header for {n} rows would not fit in place")  # cannot happen: n <= rows
        if len(header) < offset:  # a numpy without growth room: pad before the newline, fix the length field
            size = 2 if version == (1, 0) else 4
            body = header[8 + size:-1] + b" " * (offset - len(header)) + b"\n"
            header = header[:8] + len(body).to_bytes(size, "little") + body
        f.seek(0)
        f.write(header)
        f.truncate(offset + n * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)


class RowOrderError(UserError):
    """A split's manifest rows do not map one-to-one onto the rows of its array."""


def split_rows(manifest, split: str, n: int, what: str):
    """The manifest rows of `split` in array order (row i has image_row i), checked against an array of n rows
    (`what` names it in the error): the one check that a split's images, tokens or labels line up with its rows."""
    rows = manifest[manifest.split == split].sort_values("image_row").reset_index(drop=True)
    if len(rows) != n or not (rows.image_row.to_numpy() == np.arange(n)).all():
        raise RowOrderError(f"{what}: {n} rows but the manifest's image_row of split {split!r} is not "
                            f"0..{len(rows) - 1}")
    return rows


@dataclass(frozen=True)
class RealSplit:
    """One split of the ingested real data: images (uint8 N x S x S, read per batch from the file: `NpyRows`),
    label values, manifest rows in image order."""

    images: np.ndarray
    labels: np.ndarray
    rows: pd.DataFrame

    def labeled(self) -> LabeledImages:
        return LabeledImages(self.images, self.labels)


def load_real(interim: str | Path, split: str) -> RealSplit:
    """A split's images and manifest rows, row-aligned via `image_row`."""
    manifest = pd.read_parquet(Path(interim) / "manifest.parquet",
                               columns=["split", "image_row", "dicom_id", *OBSERVATIONS])
    images = split_images(interim, split)
    rows = split_rows(manifest, split, len(images), f"{interim}/images_{split}.npy")
    return RealSplit(images, rows[list(OBSERVATIONS)].to_numpy(dtype=np.float64), rows)


@dataclass(frozen=True)
class LabeledImages:
    """Images (uint8 N x H x W, or float in [0, 1]) and their CheXpert label values (N x 14: 1, 0, -1, NaN)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} label rows")
