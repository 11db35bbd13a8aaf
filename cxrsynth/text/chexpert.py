"""The 14 CheXpert observations and the labeler's report-level aggregation.

Reads nothing, writes nothing: pure functions shared by the phantom's report writer (which knows what each of its
sentences asserts) and, later, the text labeler (which extracts mentions from free text).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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
