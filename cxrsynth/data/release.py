"""An immutable MIMIC-CXR release (or the phantom written like one): its tables, read gzipped or plain, and its
fingerprint (sha256 of the tables, the reports zip and each root's SHA256SUMS.txt), which stands in for the image trees
in dvc.yaml and in `release.json`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrsynth.errors import UserError
from cxrsynth.data.layout import CHECKSUMS, CSV_NAMES, HEADERS, REPORTS_ZIP, file_sha256
from cxrsynth.shards import digest


RELEASE_FILE = "release.json"
# The files that fingerprint an immutable release, per root (key: the params.yaml path they live under). Each table
# counts gzipped or plain, as read_table reads it; SHA256SUMS.txt stands for everything else, the image trees included.
RELEASE_TABLES = {"raw": ("records", "studies", "metadata", "split", "chexpert", "negbio"),
                  "raw_jpg": ("metadata", "split", "chexpert", "negbio")}


RELEASE_EXTRAS = {"raw": (REPORTS_ZIP, CHECKSUMS), "raw_jpg": (CHECKSUMS,)}


def release_files(root: str | Path, jpg_root: str | Path, source: str) -> dict[str, Path]:
    """The fingerprint files that exist, as {'raw/<name>' | 'raw_jpg/<name>': path}. With source jpg the DICOM root's
    copies of the metadata, split and label tables are left out (ingest then reads those from the JPG root only)."""
    roots = {"raw": Path(root), "raw_jpg": Path(jpg_root)}
    found: dict[str, Path] = {}
    for key, base in roots.items():
        tables = [t for t in RELEASE_TABLES[key]
                  if not (source == "jpg" and key == "raw" and t not in ("records", "studies"))]
        names = [n for t in tables for n in (CSV_NAMES[t], CSV_NAMES[t].removesuffix(".gz"))]
        for name in names + list(RELEASE_EXTRAS[key]):
            if (base / name).is_file():
                found[f"{key}/{name}"] = base / name
    return found


def release_fingerprint(root: str | Path, jpg_root: str | Path, source: str) -> dict[str, str]:
    """{relative name: sha256} of the release's fingerprint files that exist (`release_files`), sorted by name. It
    changes when a table, the reports zip or a SHA256SUMS.txt changes; an image under files/ changes it only through
    its root's SHA256SUMS.txt (the accepted trade-off for not hashing terabytes)."""
    return {k: file_sha256(p) for k, p in sorted(release_files(root, jpg_root, source).items())}


def release_record(root: str | Path, jpg_root: str | Path, source: str) -> dict:
    """What release.json holds: the source, the fingerprint and its combined sha256 (`digest` of the fingerprint)."""
    files = release_fingerprint(root, jpg_root, source)
    return {"source": source, "files": files, "sha256": digest(files)}


def read_table(root: Path | list[Path], name: str) -> pd.DataFrame:
    """A MIMIC table by key of CSV_NAMES, gzipped or not, from the first root that has it; extra columns are
    tolerated, missing ones are fatal."""
    roots = root if isinstance(root, list) else [root]
    fname = CSV_NAMES[name]
    candidates = [r / n for r in roots for n in (fname, fname.removesuffix(".gz"))]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise IngestError(f"{candidates[0]}: required file missing")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    need = [c for c in HEADERS[name] if c not in df.columns]
    if need:
        raise IngestError(f"{path}: required column {need[0]!r} missing")
    return df


class IngestError(UserError, RuntimeError):
    """The input as a whole is unusable (a required file or column is missing); one line naming it."""
