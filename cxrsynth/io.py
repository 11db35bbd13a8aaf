"""Deterministic file writers: the same content always gives the same bytes (DVC hashes must not drift)."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path



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
    path.parent.mkdir(parents=True, exist_ok=True)
    data = csv_bytes(header, rows)
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)


def write_json(path: str | Path, obj: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n")


def write_zip(path: str | Path, members: Iterable[tuple[str, bytes]]) -> None:
    """A zip whose bytes depend only on its members (fixed timestamps, sorted names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
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
