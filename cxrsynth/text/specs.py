"""Anatomy-pathology prompting: mine vocabularies from reports, sample coherent finding sets, validate requests.

Pure text/statistics; reads and writes nothing (the `prompts` stage does the I/O). A `Vocabulary` holds, mined from
the training reports' findings and impression: pathology terms and anatomy terms (canonical form, surface forms,
frequency, certainty counts, severity and side distributions), the anatomy x pathology co-occurrence table and the
pathology x pathology co-occurrence of present findings. `sample_spec` draws a coherent `PromptSpec` from it;
`validate_spec` rejects requests the vocabulary cannot satisfy, naming the term.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cxrsynth.errors import UserError
from cxrsynth.text.findings import Finding, extract_findings
from cxrsynth.text.vocab import ANATOMY, PATHOLOGIES

CERTAINTIES = ("present", "absent", "uncertain")
SIDES = ("left", "right", "bilateral")


class PromptError(UserError):
    """A prompt request the vocabulary cannot satisfy; the message names the term."""


@dataclass(frozen=True)
class Term:
    """One finding a prompt asks for (absent terms are pertinent negatives)."""

    pathology: str
    certainty: str = "present"
    anatomy: str | None = None
    side: str | None = None
    severity: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class PromptSpec:
    terms: tuple[Term, ...]
    view: str = "PA"

    @property
    def positive(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.certainty != "absent")


@dataclass
class Vocabulary:
    """Mined statistics. Counts are over studies (a term counted once per study and certainty)."""

    studies: int = 0
    normal_studies: int = 0
    min_count: int = 1
    pathologies: dict[str, dict] = field(default_factory=dict)
    anatomy: dict[str, dict] = field(default_factory=dict)
    cooccurrence: dict[str, dict[str, int]] = field(default_factory=dict)  # pathology -> anatomy -> studies
    pathology_pairs: dict[str, dict[str, int]] = field(default_factory=dict)  # present p -> present q -> studies
    dropped: dict[str, int] = field(default_factory=dict)  # terms under min_count, with their counts

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls(**json.loads(text))

    def present_count(self, p: str) -> int:
        return self.pathologies[p]["certainty"].get("present", 0)


def _bump(d: dict, key: str, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


def mine_vocabulary(findings_per_study: Iterable[Sequence[Finding]], min_count: int) -> Vocabulary:
    """Vocabulary statistics from each study's extracted findings; terms seen in fewer than min_count studies are
    dropped (kept in `dropped` with their counts, so the cut is visible)."""
    path: dict[str, dict] = {}
    anat: dict[str, dict] = {}
    co: dict[str, dict[str, int]] = defaultdict(dict)
    pairs: dict[str, dict[str, int]] = defaultdict(dict)
    studies = normal = 0
    for fs in findings_per_study:
        studies += 1
        seen_p: set[tuple[str, str]] = set()
        seen_a: set[str] = set()
        present = set()
        for f in fs:
            e = path.setdefault(f.pathology, {"studies": 0, "mentions": 0, "surface": {}, "certainty": {},
                                              "severity": {}, "side": {}, "observation": f.observation})
            if not f.implied:  # "no acute process" implies absences but is no surface form of them
                e["mentions"] += 1
                _bump(e["surface"], " ".join(f.surface.lower().split()))  # reports wrap lines mid-phrase
            if (f.pathology, f.certainty) not in seen_p:
                seen_p.add((f.pathology, f.certainty))
                _bump(e["certainty"], f.certainty)
            if f.certainty != "absent":
                present.add(f.pathology)
                for key in ("severity", "side"):
                    if f.modifiers.get(key):
                        _bump(e[key], f.modifiers[key])
                if f.anatomy:
                    _bump(co[f.pathology], f.anatomy)
            if f.anatomy and f.anatomy not in seen_a:
                seen_a.add(f.anatomy)
                a = anat.setdefault(f.anatomy, {"studies": 0, "surface": {}})
                a["studies"] += 1
        for p in {p for p, _ in seen_p}:
            path[p]["studies"] += 1
        for p in present:
            for q in present - {p}:
                _bump(pairs[p], q)
        normal += not present
    dropped = {p: e["studies"] for p, e in path.items() if e["studies"] < min_count}
    dropped |= {a: e["studies"] for a, e in anat.items() if e["studies"] < min_count}
    keep_p = {p: e for p, e in path.items() if e["studies"] >= min_count}
    keep_a = {a: e for a, e in anat.items() if e["studies"] >= min_count}
    return Vocabulary(
        studies=studies, normal_studies=normal, min_count=min_count,
        pathologies=dict(sorted(keep_p.items())), anatomy=dict(sorted(keep_a.items())),
        cooccurrence={p: dict(sorted((a, n) for a, n in d.items() if a in keep_a)) for p, d in sorted(co.items())
                      if p in keep_p},
        pathology_pairs={p: dict(sorted((q, n) for q, n in d.items() if q in keep_p))
                         for p, d in sorted(pairs.items()) if p in keep_p},
        dropped=dict(sorted(dropped.items())))


def _weighted(rng: np.random.Generator, counts: dict[str, int]) -> str | None:
    if not counts:
        return None
    keys = sorted(counts)
    w = np.array([counts[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def _side_of(anatomy: str | None) -> str | None:
    if anatomy is None:
        return None
    for s in SIDES:
        if anatomy.startswith(s + " "):
            return s
    return None


def sample_spec(vocab: Vocabulary, rng: np.random.Generator, mode: str = "prevalence", max_findings: int = 4,
                max_negatives: int = 2, views: dict[str, float] | None = None,
                prevalence: dict[str, float] | None = None, primary: str | None = None) -> PromptSpec:
    """A coherent random prompt: a primary pathology (or none: a normal study), findings that co-occur with it,
    anatomy/side/severity from the mined tables, and pertinent negatives for pathologies not asked for.

    mode: 'prevalence' (primary drawn by mined frequency; normal at the mined normal share), 'balanced' (primary
    uniform over pathologies, plus normal as one more class) or 'test' (frequencies given in `prevalence`).
    """
    positives = [p for p in vocab.pathologies if vocab.present_count(p) > 0]
    if primary is None:
        if mode == "balanced":
            weights = {p: 1.0 for p in positives} | {"": 1.0}
        elif mode == "prevalence":
            weights = {p: float(vocab.present_count(p)) for p in positives}
            weights[""] = float(vocab.normal_studies)
        elif mode == "test":
            if not prevalence:
                raise PromptError("label mix 'test' needs the test split's prevalence")
            weights = {p: float(prevalence.get(p, 0.0)) for p in positives}
            weights[""] = float(prevalence.get("", 0.0))
        else:
            raise PromptError(f"unknown label mix {mode!r}")
        weights = {k: v for k, v in weights.items() if v > 0}
        primary = _weighted(rng, {k: int(v * 1000) + 1 for k, v in weights.items()}) or ""
    chosen: list[str] = []
    if primary:
        chosen.append(primary)
        pairs = vocab.pathology_pairs.get(primary, {})
        n_p = max(1, vocab.present_count(primary))
        for q in sorted(pairs):
            if len(chosen) >= max_findings:
                break
            if rng.random() < pairs[q] / n_p:
                chosen.append(q)
    terms = [_term(vocab, p, rng) for p in chosen]
    # pertinent negatives: frequently negated pathologies that are not asked for
    neg = {p: e["certainty"].get("absent", 0) for p, e in vocab.pathologies.items()
           if p not in chosen and e["certainty"].get("absent", 0) > 0}
    for _ in range(int(rng.integers(0 if chosen else 1, max_negatives + 1))):
        p = _weighted(rng, neg)
        if p is None:
            break
        neg.pop(p)
        terms.append(Term(p, "absent"))
    view = _weighted(rng, {k: int(v * 1000) for k, v in (views or {"PA": 1.0}).items()}) or "PA"
    return validate_spec(vocab, PromptSpec(tuple(terms), view))


def _term(vocab: Vocabulary, p: str, rng: np.random.Generator) -> Term:
    e = vocab.pathologies[p]
    cert = e["certainty"]
    unc = cert.get("uncertain", 0) / max(1, cert.get("uncertain", 0) + cert.get("present", 0))
    certainty = "uncertain" if rng.random() < unc else "present"
    anatomy = _weighted(rng, vocab.cooccurrence.get(p, {}))
    side = _side_of(anatomy) or _weighted(rng, e.get("side", {}))
    severity = _weighted(rng, e.get("severity", {})) if certainty == "present" else None
    return Term(p, certainty, anatomy, side, severity)


def validate_spec(vocab: Vocabulary, spec: PromptSpec) -> PromptSpec:
    """Reject requests the vocabulary cannot satisfy: unknown pathology or anatomy, an anatomy never said of that
    pathology, contradictions (present and absent), a side that disagrees with the anatomy."""
    seen: dict[str, str] = {}
    for t in spec.terms:
        if t.pathology not in vocab.pathologies:
            known = PATHOLOGIES.get(t.pathology)
            why = "not mined often enough from the reports" if known else "not a known pathology term"
            raise PromptError(f"pathology {t.pathology!r}: {why}")
        if t.certainty not in CERTAINTIES:
            raise PromptError(f"pathology {t.pathology!r}: certainty must be one of {CERTAINTIES}, got {t.certainty!r}")
        if t.anatomy is not None:
            if t.anatomy not in vocab.anatomy:
                why = "not mined often enough" if t.anatomy in ANATOMY else "not a known anatomy term"
                raise PromptError(f"anatomy {t.anatomy!r}: {why}")
            if t.certainty != "absent" and t.anatomy not in vocab.cooccurrence.get(t.pathology, {}):
                raise PromptError(f"anatomy {t.anatomy!r}: never described with {t.pathology!r} in the reports")
        side = _side_of(t.anatomy)
        if side and t.side and side != t.side:
            raise PromptError(f"pathology {t.pathology!r}: side {t.side!r} contradicts anatomy {t.anatomy!r}")
        if t.side is not None and t.side not in SIDES:
            raise PromptError(f"pathology {t.pathology!r}: side must be one of {SIDES}, got {t.side!r}")
        prev = seen.get(t.pathology)
        if prev is not None and (prev == "absent") != (t.certainty == "absent"):
            raise PromptError(f"pathology {t.pathology!r}: asked for as both {prev} and {t.certainty}")
        seen[t.pathology] = t.certainty
    return spec


def spec_from_findings(findings: Sequence[Finding], view: str = "PA") -> PromptSpec:
    """A prompt that asks for exactly what a report says (paired prompts from test reports); the first mention of
    each pathology wins, a positive/uncertain one over a negation (CheXpert's 'any positive wins')."""
    rank = {"present": 0, "uncertain": 1, "absent": 2}
    best: dict[str, Finding] = {}
    for f in findings:
        if f.pathology not in best or rank[f.certainty] < rank[best[f.pathology].certainty]:
            best[f.pathology] = f
    terms = tuple(Term(f.pathology, f.certainty, f.anatomy if f.certainty != "absent" else None,
                       f.modifiers.get("side") if f.certainty != "absent" else None,
                       f.modifiers.get("severity") if f.certainty == "present" else None)
                  for f in best.values())
    return PromptSpec(terms, view)


def term_set(findings_or_terms: Iterable[Finding | Term]) -> set[tuple[str, str]]:
    """(pathology, certainty) pairs, positives overriding negatives, for round-trip comparison."""
    out: dict[str, str] = {}
    rank = {"present": 0, "uncertain": 1, "absent": 2}
    for f in findings_or_terms:
        if f.pathology not in out or rank[f.certainty] < rank[out[f.pathology]]:
            out[f.pathology] = f.certainty
    return set(out.items())


def round_trip(text: str, spec: PromptSpec) -> bool:
    """Does extracting findings from a written prompt give back exactly the requested (pathology, certainty)?"""
    return term_set(extract_findings(text)) == term_set(spec.terms)
