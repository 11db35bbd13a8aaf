"""Residual identifier redaction for report text, MIMIC-CXR style (`___` replaces what is removed).

MIMIC-CXR reports are already de-identified; this is the second line of defence for other sources and for slips:
- the person names found in the study's DICOM headers (patient, referring / performing / reading physicians,
  operators): each name part of >= 2 letters, whole word, any case;
- patterns: e-mail addresses, phone numbers, US social security numbers, labelled record numbers
  (`MRN: 1234567`, `Acc # A-99`, `ID 883311`), dates written with slashes or dashes, and titled names
  (`Dr. Smith`, `Mrs Jones`).
`redact(text, names)` returns the new text and the number of replacements; clinical wording is left alone (tests
check that a set of typical report sentences come through unchanged).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "___"

PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("phone", re.compile(r"(?<!\d)(?:\(\d{3}\)\s?|\d{3}[-. ])\d{3}[-. ]\d{4}(?!\d)")),
    ("record_number", re.compile(r"\b(?:MRN|MR#|Medical record(?: number)?|Acc(?:ession)?(?: number)?|"
                                 r"Patient ID|ID|SSN)\s*(?:#|no\.?|number)?\s*[:#]?\s*[A-Z]*-?\d[\w-]*", re.I)),
    ("date", re.compile(r"\b\d{1,2}[/-]\d{1,2}[/-](?:\d{4}|\d{2})\b")),
    ("titled_name", re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Miss)\.?\s+[A-Z][a-zA-Z'-]+(?:\s+[A-Z][a-zA-Z'-]+)?")),
)


def name_parts(names: Iterable[str]) -> list[str]:
    """DICOM person names (`FAMILY^GIVEN^MIDDLE`) or plain names -> distinct parts of >= 2 letters."""
    parts: set[str] = set()
    for name in names:
        for part in re.split(r"[\^\s,]+", str(name or "")):
            part = part.strip(".")
            if len(part) >= 2 and re.fullmatch(r"[A-Za-z'-]+", part):
                parts.add(part)
    return sorted(parts, key=lambda p: (-len(p), p.lower()))


def redact(text: str, names: Iterable[str] = ()) -> tuple[str, int]:
    """(redacted text, number of replacements)."""
    count = 0
    for _, pattern in PATTERNS:
        text, n = pattern.subn(MASK, text)
        count += n
    for part in name_parts(names):
        text, n = re.subn(rf"(?<![\w]){re.escape(part)}(?![\w])", MASK, text, flags=re.I)
        count += n
    return text, count
