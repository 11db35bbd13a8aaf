"""The 14 CheXpert observations and the labeler's report-level aggregation.

Reads nothing, writes nothing: pure functions shared by the phantom's report writer (which knows what each of its
sentences asserts) and, later, the text labeler (which extracts mentions from free text).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Column order of mimic-cxr-2.0.0-chexpert.csv.gz (alphabetical, as released).
OBSERVATIONS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)
CERTAINTIES: tuple[str, ...] = ("present", "absent", "uncertain")
LABEL_VALUE = {"present": 1.0, "absent": 0.0, "uncertain": -1.0}


@dataclass(frozen=True)
class Mention:
    """One statement about one CheXpert observation (never "No Finding", which is derived)."""

    observation: str
    certainty: str  # present | absent | uncertain

    def __post_init__(self) -> None:
        if self.observation not in OBSERVATIONS or self.observation == "No Finding":
            raise ValueError(f"unknown CheXpert observation {self.observation!r}")
        if self.certainty not in CERTAINTIES:
            raise ValueError(f"certainty must be one of {CERTAINTIES}, got {self.certainty!r}")


def aggregate(mentions: Iterable[Mention]) -> dict[str, float | None]:
    """CheXpert aggregation of a report's mentions into the 14 labels.

    Per observation: any positive wins; otherwise uncertain if any uncertain mention; otherwise negative if any
    negative mention; otherwise None (not mentioned). "No Finding" is 1.0 when no observation other than
    Support Devices is positive or uncertain, else None (never 0.0, as in the released CSV).
    """
    seen: dict[str, set[str]] = {}
    for m in mentions:
        seen.setdefault(m.observation, set()).add(m.certainty)
    labels: dict[str, float | None] = {}
    for obs in OBSERVATIONS:
        if obs == "No Finding":
            continue
        c = seen.get(obs)
        if not c:
            labels[obs] = None
        elif "present" in c:
            labels[obs] = 1.0
        elif "uncertain" in c:
            labels[obs] = -1.0
        else:
            labels[obs] = 0.0
    abnormal = any(v in (1.0, -1.0) for k, v in labels.items() if k != "Support Devices")
    labels["No Finding"] = None if abnormal else 1.0
    return {obs: labels[obs] for obs in OBSERVATIONS}


def eval_targets(labels: np.ndarray, blank: str = "negative") -> np.ndarray:
    """Ground truth for scoring: 1 positive, 0 negative, NaN excluded (uncertain always; blank when blank='ignore')."""
    targets, mask = label_targets(labels, "ignore", blank)
    return np.where(mask > 0, targets, np.nan)


def label_targets(labels: np.ndarray, uncertain: str = "ignore",
                  blank: str = "negative") -> tuple[np.ndarray, np.ndarray]:
    """CheXpert label values (1.0, 0.0, -1.0 uncertain, NaN blank) -> (targets, mask), float32 N x L.

    uncertain: 'ignore' masks -1 out of the loss (U-Ignore), 'zeros' maps it to 0 (U-Zeros), 'ones' to 1 (U-Ones).
    blank: 'negative' trains a blank ("not mentioned") as 0, 'ignore' masks it out.
    """
    if uncertain not in ("ignore", "zeros", "ones"):
        raise ValueError(f"uncertain policy must be ignore, zeros or ones, got {uncertain!r}")
    if blank not in ("negative", "ignore"):
        raise ValueError(f"blank policy must be negative or ignore, got {blank!r}")
    y = np.asarray(labels, dtype=np.float64)
    ok = np.isnan(y) | np.isin(y, (1.0, 0.0, -1.0))
    if not ok.all():
        bad = y[~ok][0]
        raise ValueError(f"label values must be 1.0, 0.0, -1.0 or blank (NaN), got {bad!r}")
    blank_m, unc_m = np.isnan(y), y == -1.0
    targets = np.where(y == 1.0, 1.0, 0.0)
    mask = np.ones_like(y)
    if uncertain == "ignore":
        mask[unc_m] = 0.0
    elif uncertain == "ones":
        targets[unc_m] = 1.0
    if blank == "ignore":
        mask[blank_m] = 0.0
    return targets.astype(np.float32), mask.astype(np.float32)
