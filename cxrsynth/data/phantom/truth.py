"""Ground truth of the phantom dataset: what each study shows and what its report says.

Pure data classes plus their JSON form; the sampler lives in `sampler.py`, the painter in `render.py`, the report
writer in `reports.py`. Coordinates are image pixels (x = column, y = row) of the stored DICOM, origin top left;
the patient's right is on the image's left on frontal views (radiological convention).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Finding kinds the phantom can draw, with the CheXpert observation a report statement about them is labelled as.
KIND_OBSERVATION: dict[str, str] = {
    "cardiomegaly": "Cardiomegaly",
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "edema": "Edema",
    "nodule": "Lung Lesion",
    "mass": "Lung Lesion",
    "rib_fracture": "Fracture",
    "pleural_thickening": "Pleural Other",
    "et_tube": "Support Devices",
    "ng_tube": "Support Devices",
    "central_line": "Support Devices",
    "picc": "Support Devices",
    "pacemaker": "Support Devices",
}
DEVICE_KINDS = ("et_tube", "ng_tube", "central_line", "picc", "pacemaker")
SIDES = ("left", "right", "bilateral")
# severity vocabularies per kind family
SEVERITIES = ("mild", "moderate", "severe")
SIZE_SEVERITIES = ("small", "moderate", "large")  # effusion, pneumothorax, (nodule: small, mass: large)
LOBES = ("upper", "middle", "lower", "lingula")  # middle only on the right, lingula only on the left
VIEWS = ("PA", "AP", "LATERAL", "LL")
FRONTAL_VIEWS = ("PA", "AP")
IMAGE_DEFECTS = ("corrupt_dicom", "truncated_dicom", "missing_image")
REPORT_DEFECTS = ("missing_report", "empty_report", "report_not_utf8")


@dataclass(frozen=True)
class Finding:
    """One abnormality drawn in the study's images.

    kind: a key of KIND_OBSERVATION. side: left | right | bilateral | None (midline / not lateralized).
    severity: mild | moderate | severe, or small | moderate | large for effusion, pneumothorax, nodule, mass.
    location: lobe (upper | middle | lower | lingula) for consolidation, pneumonia, nodule, mass; base | lobar for
    atelectasis; apical | lateral for pleural thickening; rib number ("4".."9") for rib fractures; None otherwise.
    report: how the report states it: present (definite) or uncertain (hedged).
    change: interval change against the prior study: new | unchanged | increased | decreased | None (no prior).
    """

    kind: str
    side: str | None = None
    severity: str = "moderate"
    location: str | None = None
    report: str = "present"
    change: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KIND_OBSERVATION:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.side is not None and self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES} or None, got {self.side!r}")
        if self.severity not in SEVERITIES + SIZE_SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.report not in ("present", "uncertain"):
            raise ValueError(f"report must be present or uncertain, got {self.report!r}")

    @property
    def observation(self) -> str:
        return KIND_OBSERVATION[self.kind]


@dataclass(frozen=True)
class Anatomy:
    """Patient body habitus, fixed across that patient's studies.

    thorax_width: internal thoracic width as a fraction of image width on a PA view (0.60-0.80).
    lung_height: apex-to-dome height as a fraction of image height (0.50-0.65).
    ctr: cardiothoracic ratio when the heart is normal (0.38-0.48); a cardiomegaly finding overrides it.
    mediastinum_width: upper mediastinal width as a fraction of thorax width (0.22-0.30).
    soft_tissue: soft-tissue thickness 0..1 (thin .. obese). sex: F | M (breast shadows for F).
    """

    sex: str
    age: int
    thorax_width: float
    lung_height: float
    ctr: float
    mediastinum_width: float
    soft_tissue: float


@dataclass(frozen=True)
class Pose:
    """Per-image acquisition: the same patient looks a little different every time.

    rotation: degrees, in-plane tilt (-4..4). shift_x, shift_y: offset of the thorax center as fractions of the image
    (-0.04..0.04). inspiration: posterior ribs above the right dome (8..11). exposure: contrast scale (0.8..1.2).
    noise: quantum noise sigma on the [0, 1] scale (0.005..0.03). seed: painter's seed for texture and noise.
    """

    rotation: float
    shift_x: float
    shift_y: float
    inspiration: float
    exposure: float
    noise: float
    seed: int


@dataclass(frozen=True)
class Region:
    """Where a finding is in one image: a box (x0, y0, x1, y1), half-open, pixels; mask_rle optional."""

    kind: str
    box: tuple[int, int, int, int]
    mask_rle: tuple[int, ...] | None = None  # run-length (start, length, ...) over the row-major flattened mask


@dataclass
class ImageTruth:
    """One image: identifiers, DICOM encoding choices, what was drawn and where."""

    dicom_id: str
    view: str
    rows: int
    columns: int
    modality: str  # DX | CR
    photometric: str  # MONOCHROME1 | MONOCHROME2
    bits_stored: int
    transfer_syntax: str  # explicit_le | jpeg2000_lossless | jpeg2000 | rle
    pose: Pose
    defect: str | None = None  # one of IMAGE_DEFECTS
    regions: list[Region] = field(default_factory=list)
    landmarks: dict[str, object] = field(default_factory=dict)  # e.g. ctr, heart_box, thorax_box


@dataclass
class StudyTruth:
    subject_id: int
    study_id: int
    study_date: str  # YYYYMMDD
    study_time: float  # HHMMSS.fff as float
    procedure: str  # e.g. CHEST (PA AND LAT)
    findings: list[Finding]
    hedges: list[str]  # kinds the report calls uncertain although absent from the images
    ctr: float  # cardiothoracic ratio drawn on frontal images
    images: list[ImageTruth]
    prior_study_id: int | None = None
    report_style: str = "standard"
    report_defect: str | None = None  # one of REPORT_DEFECTS
    labels: dict[str, float | None] = field(default_factory=dict)  # what the chexpert CSV says


def mask_from_rle(rle: Sequence[int], rows: int, columns: int) -> np.ndarray:
    """Decode a Region.mask_rle ((start, length) runs over the row-major flattened mask) to a bool array."""
    flat = np.zeros(rows * columns, bool)
    for start, length in zip(rle[0::2], rle[1::2]):
        flat[start:start + length] = True
    return flat.reshape(rows, columns)


def to_json(obj: object) -> object:
    """Plain JSON-able form of a truth object (dataclasses become dicts, tuples lists)."""
    return asdict(obj)  # type: ignore[arg-type]


_ORDINAL = {"4": "fourth", "5": "fifth", "6": "sixth", "7": "seventh", "8": "eighth", "9": "ninth"}


def finding_anatomy(f: Finding) -> str:
    """The canonical anatomy term a finding is located at (RadGraph ANAT-DP style), side included."""
    side = "" if f.side in (None, "bilateral") else f"{f.side} "
    both = "bilateral " if f.side == "bilateral" else ""
    if f.kind == "cardiomegaly":
        return "heart"
    if f.kind == "enlarged_cardiomediastinum":
        return "mediastinum"
    if f.kind == "effusion":
        return f"{both}{side}costophrenic angle".strip()
    if f.kind == "pneumothorax":
        return f"{side}apex".strip()
    if f.kind in ("consolidation", "pneumonia", "nodule", "mass"):
        return "lingula" if f.location == "lingula" else f"{side}{f.location} lobe"
    if f.kind == "atelectasis":
        return f"{both}{side}lung base" if f.location == "base" else f"{side}lower lobe"
    if f.kind == "edema":
        return "lungs"
    if f.kind == "rib_fracture":
        return f"{side}{_ORDINAL.get(str(f.location), str(f.location))} posterior rib"
    if f.kind == "pleural_thickening":
        return f"{both}{side}apex" if f.location == "apical" else f"{both}{side}lateral pleura"
    return {"et_tube": "trachea", "ng_tube": "stomach", "central_line": "superior vena cava",
            "picc": "superior vena cava", "pacemaker": f"{side}chest wall"}[f.kind]


# ----------------------------------------------------------------------------------------------------------------
# the sidecar file: one JSON record per image (`ground_truth_records` writes it; these read it)

TRUTH_FILE = "ground_truth.jsonl"


def iter_truth(path: str | Path) -> Iterator[dict]:
    """The sidecar's records in file order, streamed (a MIMIC-sized sidecar is never held whole)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def truth_by_image(path: str | Path, keep: Callable[[dict], dict] | None = None,
                   ids: Collection[str] | None = None) -> dict[str, dict]:
    """dicom_id -> the image's record (or `keep(record)`, what a caller needs of it); with `ids`, only those images.

    A parsed record is ~23 kB of Python objects (the phantom's landmarks, labels and regions; measured with
    tracemalloc on the default phantom), so a caller that needs a few fields of some images passes both: whole
    records of every image would be ~8.7 GB at MIMIC-CXR's 377k images."""
    wanted = None if ids is None else {str(i) for i in ids}
    out = {}
    for r in iter_truth(path):
        d = str(r["dicom_id"])
        if wanted is None or d in wanted:
            out[d] = keep(r) if keep else r
    return out
