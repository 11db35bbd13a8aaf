"""Deterministic file writers: the same content always gives the same bytes (DVC hashes must not drift).

Each writer goes through `atomic_file`: the bytes go to a temporary file beside the target, which replaces the
target only once it is complete. A failed write (disk full, file size limit, no permission) leaves the previous file
or none, never a half-written one, and raises an OSError that names the target."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` (os.replace, atomic on one
    filesystem), on failure it is removed and an OSError without a file name gets `path` as its file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
        raise


def format_cell(v: object) -> str:
    """CSV cell as MIMIC writes it: None/NaN blank, floats in Python repr (1.0, -1.0, 80556.875)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(v) if isinstance(v, float) else str(v)


def csv_bytes(header: Sequence[str], rows: Iterable[Sequence[object]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([format_cell(v) for v in r])
    return buf.getvalue().encode("utf-8")


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV; gzip it (with a zero timestamp and no file name, for stable bytes) when the path ends .gz."""
    path = Path(path)
    data = csv_bytes(header, rows)
    with atomic_file(path) as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                gz.write(data)
        else:
            raw.write(data)


def write_json(path: str | Path, obj: object) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_json_object(path: str | Path, error: type[Exception] = ValueError, what: str = "") -> dict:
    """Parse a JSON file that must hold an object; unreadable JSON or another type raises `error` naming the file
    (`what`, e.g. "config", says what it should have been)."""
    label = f"corrupted {what}".strip()
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: {label} ({err})") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: {label} (not a JSON object)")
    return doc


def write_jsonl(path: str | Path, records: Iterable[object]) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n")


def write_zip(path: str | Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A zip whose bytes depend only on its members (fixed timestamps, sorted names)."""
    with atomic_file(path) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, data)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_number(v: float | int | None, nd: int = 6) -> float | None:
    """JSON-safe rounded number: None for None / NaN / inf."""
    if v is None:
        return None
    v = float(v)
    return round(v, nd) if math.isfinite(v) else None


def check_output_dir(path: str | Path) -> Path:
    """`path` as an output folder: an existing folder, or a path that does not exist yet whose nearest existing
    ancestor is a writable folder. Otherwise an OSError naming the path in the way (a file where a folder must be, a
    folder without write permission), raised before any work, so no stage or command fails half-way on it."""
    import errno
    import os

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise FileNotFoundError(errno.ENOENT, "a symbolic link to nothing", str(probe))
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"a file, where {path} needs a folder", str(probe))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "no permission to write here", str(probe))
    return path
