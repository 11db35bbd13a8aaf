"""Report sectioning, following the official MIMIC-CXR algorithm (MIT-LCP mimic-cxr, txt/section_parser.py).

Pure text functions; reads and writes nothing. The algorithm, restated:
1. A header is a newline, exactly one space, then upper-case letters, spaces or ( ) / , - and then a colon.
2. With no header the whole text is one section, "full report". Otherwise the text before the first header is
   "preamble", and each header's section runs to the next header; the search for the next header starts after
   the first newline that follows the current header's colon (so a header's own line is never cut).
3. Names are lower-cased and normalised: a table folds synonyms, plurals and typos; a name containing impression,
   findings, history, comparison or addendum becomes that word; a name describing the view or body part ("chest",
   "pa and lateral", "portable", ...) becomes findings.
4. Empty impression and findings sections are dropped.
5. If neither impression nor findings remains, the last section is split at its first blank line ("\\n \\n") and the
   remainder becomes "last_paragraph".
6. A study's conclusion text is the last section named impression, else findings, else last_paragraph, else
   comparison.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")

# name as written (lower case) -> canonical name; frequent variants and the typos seen in MIMIC-CXR.
_CANONICAL: dict[str, str] = {
    "preamble": "preamble", "impression": "impression", "comparison": "comparison", "indication": "indication",
    "findings": "findings", "examination": "examination", "technique": "technique", "history": "history",
    "comparisons": "comparison", "clinical history": "history", "reason for examination": "indication",
    "notification": "notification", "reason for exam": "indication", "clinical information": "history",
    "exam": "examination", "clinical indication": "indication", "conclusion": "impression",
    "chest, two views": "findings", "recommendation(s)": "recommendations", "type of examination": "examination",
    "reference exam": "comparison", "patient history": "history", "addendum": "addendum",
    "comparison exam": "comparison", "date": "date", "comment": "comment", "findings and impression": "impression",
    "wet read": "wet read", "comparison film": "comparison", "recommendations": "recommendations",
    "findings/impression": "impression", "pfi": "history", "recommendation": "recommendations",
    "wetread": "wet read", "ndication": "impression", "impresson": "impression", "imprression": "impression",
    "imoression": "impression", "impressoin": "impression", "imprssion": "impression", "impresion": "impression",
    "imperssion": "impression", "mpression": "impression", "impession": "impression",
    "findings/ impression": "impression", "finding": "findings", "findins": "findings", "findindgs": "findings",
    "findgings": "findings", "findngs": "findings", "findnings": "findings", "finidngs": "findings",
    "idication": "indication", "reference findings": "findings", "comparision": "comparison",
    "comparsion": "comparison", "comparrison": "comparison", "comparisions": "comparison",
}
_MAIN = ("impression", "findings", "history", "comparison", "addendum")
_VIEW_WORDS = re.compile(
    r"chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|frontal view"
    r"|pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright|ribs|pa and lat")
CONCLUSION_PRIORITY = ("impression", "findings", "last_paragraph", "comparison")


@dataclass(frozen=True)
class Section:
    name: str  # canonical name
    raw_name: str  # as written (lower case), "preamble" / "full report" / "last_paragraph" for synthetic ones
    start: int  # character offset of the section body in the report
    text: str


def normalize_name(name: str) -> str:
    """Canonical section name for a header as written."""
    s = name.lower().strip()
    if s in _CANONICAL:
        return _CANONICAL[s]
    for main in _MAIN:
        if main in s:
            return main
    if _VIEW_WORDS.search(s):
        return "findings"
    return s


def split_sections(text: str) -> list[Section]:
    """All sections of a report in order (steps 1-5 of the module docstring)."""
    out: list[Section] = []
    m = _HEADER.search(text)
    if m is None:
        out.append(Section("full report", "full report", 0, text))
    else:
        out.append(Section("preamble", "preamble", 0, text[: m.start(1)]))
        while m is not None:
            raw = m.group(1).lower()
            body_start = m.end()
            nl = text.find("\n", body_start)
            nxt = _HEADER.search(text, body_start + (nl - body_start if nl != -1 else 0))
            body_end = len(text) if nxt is None else nxt.start()
            out.append(Section(normalize_name(raw), raw.strip(), body_start, text[body_start:body_end]))
            m = nxt
    out = [s for s in out if not (s.name in ("impression", "findings") and not s.text.strip())]
    if not any(s.name in ("impression", "findings") for s in out):
        last = out[-1]
        head, sep, rest = last.text.partition("\n \n")
        if sep:
            out[-1] = Section(last.name, last.raw_name, last.start, head)
            out.append(Section("last_paragraph", "last_paragraph", last.start + len(head) + len(sep), rest))
    return out


def section_report(text: str) -> dict[str, str]:
    """Canonical section name -> stripped text; where a name repeats, the last one wins (as the official CSV)."""
    return {s.name: s.text.strip() for s in split_sections(text)}


def conclusion(text: str) -> tuple[str | None, str]:
    """(section name, text) of the study's conclusion: impression > findings > last_paragraph > comparison."""
    sections = section_report(text)
    for name in CONCLUSION_PRIORITY:
        if name in sections:
            return name, sections[name]
    return None, ""


def report_text(findings: str | None, impression: str | None, fallback: str | None) -> str:
    """A report as the prompts are written: `FINDINGS: ...\\n\\nIMPRESSION: ...` (whitespace collapsed); the
    fallback (the last paragraph, as the official sectioning gives it) when both sections are empty. The one
    report-to-text rule of the project: the aligner, the generator and the paired prompts all see this text."""
    def clean(s: str | None) -> str:
        return " ".join(str(s).split()) if isinstance(s, str) else ""

    f, i = clean(findings), clean(impression)
    parts = ([f"FINDINGS: {f}"] if f else []) + ([f"IMPRESSION: {i}"] if i else [])
    return "\n\n".join(parts) if parts else clean(fallback)
