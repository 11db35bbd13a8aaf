"""The MIMIC-CXR v2.0.0 / MIMIC-CXR-JPG v2.0.0 file layout: folder scheme, file names and exact CSV headers.

Shared by the phantom writer and the ingest reader so both speak exactly one layout.
"""
from __future__ import annotations

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
SPLITS = ("train", "validate", "test")


def study_dir(subject_id: int, study_id: int) -> str:
    """files/p10/p10000032/s50414267 (group folder = 'p' + first two digits of the subject id)."""
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}"


def image_path(subject_id: int, study_id: int, dicom_id: str, ext: str = "dcm") -> str:
    return f"{study_dir(subject_id, study_id)}/{dicom_id}.{ext}"


def report_path(subject_id: int, study_id: int) -> str:
    return f"{study_dir(subject_id, study_id)}.txt"
