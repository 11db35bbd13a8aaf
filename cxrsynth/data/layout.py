"""The MIMIC-CXR v2.0.0 / MIMIC-CXR-JPG v2.0.0 file layout: folder scheme, file names, exact CSV headers and the
PhysioNet checksum file.

Shared by the phantom writer and the ingest reader so both speak exactly one layout.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cxrsynth.errors import UserError
from cxrsynth.text.chexpert import OBSERVATIONS

RECORD_HEADER = ("subject_id", "study_id", "dicom_id", "path")
STUDY_HEADER = ("subject_id", "study_id", "path")
METADATA_HEADER = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                   "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                   "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
LABEL_HEADER = ("subject_id", "study_id", *OBSERVATIONS)
CSV_NAMES = {
    "records": "cxr-record-list.csv.gz",
    "studies": "cxr-study-list.csv.gz",
    "metadata": "mimic-cxr-2.0.0-metadata.csv.gz",
    "split": "mimic-cxr-2.0.0-split.csv.gz",
    "chexpert": "mimic-cxr-2.0.0-chexpert.csv.gz",
    "negbio": "mimic-cxr-2.0.0-negbio.csv.gz",
}
HEADERS = {"records": RECORD_HEADER, "studies": STUDY_HEADER, "metadata": METADATA_HEADER, "split": SPLIT_HEADER,
           "chexpert": LABEL_HEADER, "negbio": LABEL_HEADER}
REPORTS_ZIP = "mimic-cxr-reports.zip"
JPG_LIST = "IMAGE_FILENAMES"
CHECKSUMS = "SHA256SUMS.txt"  # PhysioNet: `<sha256>  <relative path>` for every file of the release
SPLITS = ("train", "validate", "test")


def study_dir(subject_id: int, study_id: int) -> str:
    """files/p10/p10000032/s50414267 (group folder = 'p' + first two digits of the subject id)."""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}"


def image_path(subject_id: int, study_id: int, dicom_id: str, ext: str = "dcm") -> str:
    return f"{study_dir(subject_id, study_id)}/{dicom_id}.{ext}"


def report_path(subject_id: int, study_id: int) -> str:
    return f"{study_dir(subject_id, study_id)}.txt"


# ----------------------------------------------------------------------------------------------------------------
# SHA256SUMS.txt (the PhysioNet format: one `<64 hex>  <posix path relative to the root>` line per file, sorted by path)

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_text(root: Path, rels: Iterable[str], workers: int = 1) -> str:
    """The checksum file's content for the files `rels` (relative posix paths) under root, sorted by path."""
    rels = sorted(set(rels))
    paths = [root / r for r in rels]
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:  # hashlib releases the GIL: I/O and hashing overlap
            sums = list(ex.map(file_sha256, paths))
    else:
        sums = [file_sha256(p) for p in paths]
    return "".join(f"{h}  {r}\n" for h, r in zip(sums, rels))


def write_checksums(root: str | Path, tables_only: bool = False, workers: int = 1) -> Path:
    """Write root/SHA256SUMS.txt over every file under root (SHA256SUMS.txt itself excepted), or with tables_only
    over the top-level files only (tables, reports zip, IMAGE_FILENAMES: seconds instead of hours at MIMIC scale; the
    image trees then go unlisted). Returns its path."""
    root = Path(root)
    files = root.rglob("*") if not tables_only else root.iterdir()
    out, tmp = root / CHECKSUMS, root / f".{CHECKSUMS}.tmp"
    rels = [p.relative_to(root).as_posix() for p in files if p.is_file() and p not in (out, tmp)]
    text = checksum_text(root, rels, workers)
    tmp.write_text(text, encoding="utf-8", newline="\n")
    tmp.replace(out)
    return out


def read_checksums(path: str | Path) -> dict[str, str]:
    """{relative path: sha256} of a checksum file; a malformed line raises ValueError naming it."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel:
            raise UserError(f"{path}:{n}: not a `<sha256>  <path>` line")
        out[rel.removeprefix("*")] = digest.lower()  # `*` marks binary mode in sha256sum's output
    return out
