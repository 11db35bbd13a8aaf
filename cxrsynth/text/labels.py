"""CheXpert-style labels of a report from its extracted findings.

Reads a report's text; writes nothing. What is labelled follows the MIMIC-CXR labels: the study's conclusion
section (impression > findings > last_paragraph > comparison, sections.conclusion), or the whole text when it has
no headers. Each finding maps to the CheXpert observation of its pathology (vocab.PATHOLOGIES[...].observation, one
observation per term), with these CheXpert rules:
- a heart-failure mention that is present or uncertain adds an *uncertain* Cardiomegaly (a negated one adds nothing);
- implied findings ("lungs are clear", "no acute cardiopulmonary process", ...) are ignored: the CheXpert labeler
  finds no mention in those phrases, so neither do these labels, although extract_findings reports them;
- report level: chexpert.aggregate (any positive wins, else uncertain, else negative; No Finding = 1 only when no
  observation but Support Devices is positive or uncertain).
Deliberate differences from the CheXpert labeler: blunting of a costophrenic angle counts as a pleural effusion
mention (the labeler has no such phrase); "heart size is normal"-type phrases need a predicate we recognise.
"""
from __future__ import annotations

from collections.abc import Iterable

from cxrsynth.text.chexpert import OBSERVATIONS, Mention, aggregate
from cxrsynth.text.findings import Finding, extract_findings
from cxrsynth.text.sections import conclusion, split_sections


def chexpert_mentions(findings: Iterable[Finding]) -> list[Mention]:
    """The CheXpert mentions a list of findings amounts to (implied findings and non-CheXpert terms dropped)."""
    out: list[Mention] = []
    for f in findings:
        if f.implied:
            continue
        obs = f.observation
        if obs is None:
            continue
        if f.pathology == "heart failure":
            if f.certainty != "absent":
                out.append(Mention("Cardiomegaly", "uncertain"))
            continue
        out.append(Mention(obs, f.certainty))
    return out


def labels_from_findings(findings: Iterable[Finding]) -> dict[str, float | None]:
    """The 14 CheXpert labels (1.0 / 0.0 / -1.0 / None) of already-extracted findings."""
    return aggregate(chexpert_mentions(findings))


def label_text(text: str) -> str:
    """The part of a report that is labelled: its conclusion section, or all of it when it has no headers."""
    name, body = conclusion(text)
    if name is not None:
        return body
    secs = split_sections(text)
    return text if secs and secs[0].name == "full report" else ""


def chexpert_labels(text: str) -> dict[str, float | None]:
    """The 14 CheXpert labels of a report (see the module docstring). A report with nothing to label (empty, or
    headers but no conclusion section) gets an all-empty row, as such studies have in the MIMIC-CXR CSV."""
    body = label_text(text)
    if not body.strip():
        return {obs: None for obs in OBSERVATIONS}
    return labels_from_findings(extract_findings(body, sections=None))
