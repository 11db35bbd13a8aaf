"""The phantom's radiology report writer: a MIMIC-CXR-style free-text report from a study's ground truth.

`write_report` turns a StudyTruth (what the images show, what the report hedges, the interval change against the
prior study) into the exact text of the report file, plus the statements of each section with the CheXpert mentions
a labeler reads from them. The label section is the one the official MIT-LCP sectioner picks for the report's
layout (impression > findings > last_paragraph), and `labels` aggregates its mentions: the study's chexpert row.

Wording follows the CheXpert labeler's phrase lists, so that what a rule-based labeler reads equals the mentions
recorded here: e.g. "the lungs are clear" names no observation, "opacity" / "infiltrate" add Lung Opacity,
"heart failure" adds an uncertain Cardiomegaly, "contour" and "mediastinum" name Enlarged Cardiomediastinum.
Every random choice is drawn from the rng passed in.
"""
from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import numpy as np

from cxrsynth.data.phantom.truth import DEVICE_KINDS, FRONTAL_VIEWS, KIND_OBSERVATION, Anatomy, Finding, StudyTruth
from cxrsynth.text.chexpert import Mention, aggregate

REPORT_STYLES = ("standard", "legacy", "wet_read", "addendum", "no_findings", "no_impression", "headerless", "typo")
LINE_WIDTH = 79  # including the leading space every line but the title carries
TITLE = " " * 33 + "FINAL REPORT"
ADDENDUM_TITLE = " " * 33 + "FINAL ADDENDUM"
RULE = " " + "_" * 78
BLANK = " "

AT, CM, CO, ED = "Atelectasis", "Cardiomegaly", "Consolidation", "Edema"
EC, FX, LL, LO = "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity"
EF, PO, PN, PX, SD = "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices"
P, U, A = "present", "uncertain", "absent"

# Kinds whose presence means the lungs are not clear (a CheXpert-style reader sees an opacity there).
PARENCHYMAL = ("consolidation", "pneumonia", "atelectasis", "edema", "nodule", "mass")
REGION_OF = {
    "et_tube": "devices", "ng_tube": "devices", "central_line": "devices", "picc": "devices", "pacemaker": "devices",
    "consolidation": "lungs", "pneumonia": "lungs", "atelectasis": "lungs", "edema": "lungs", "nodule": "lungs",
    "mass": "lungs", "effusion": "pleura", "pneumothorax": "pleura", "pleural_thickening": "pleura",
    "cardiomegaly": "heart", "enlarged_cardiomediastinum": "heart", "rib_fracture": "bones",
}
# Impression order: the acute and the important first.
PRIORITY = ("pneumothorax", "pneumonia", "consolidation", "mass", "edema", "effusion", "enlarged_cardiomediastinum",
            "cardiomegaly", "atelectasis", "nodule", "rib_fracture", "pleural_thickening") + DEVICE_KINDS
ORDINALS = {"4": ("fourth", "4th"), "5": ("fifth", "5th"), "6": ("sixth", "6th"), "7": ("seventh", "7th"),
            "8": ("eighth", "8th"), "9": ("ninth", "9th")}
TYPO_HEADERS = {"findings": ("FINDNGS",), "impression": ("IMPRESSON", "CONCLUSION"), "comparison": ("COMPARISION",)}


@dataclass(frozen=True)
class Statement:
    """One sentence of a report and what a CheXpert-style labeler reads from it.

    text: the sentence as written, before wrapping. mentions: observation + present/absent/uncertain.
    kinds: the finding kinds (truth.KIND_OBSERVATION keys) it describes, for provenance.
    """

    text: str
    mentions: tuple[Mention, ...] = ()
    kinds: tuple[str, ...] = ()


@dataclass
class Report:
    """A written report: the file's exact text, its statements per canonical section in report order, the section
    the official sectioner labels from, and that section's aggregated CheXpert labels."""

    text: str
    sections: dict[str, list[Statement]]
    label_section: str | None
    labels: dict[str, float | None]


@dataclass(frozen=True)
class _NP:
    """A noun phrase naming a finding; `obs` are the observations its words name."""

    text: str
    number: str = "sg"  # sg | pl | mass (uncountable: no article)
    obs: tuple[str, ...] = ()


@dataclass
class _Spec:
    """Ways to word one finding: noun phrases, a severity-free phrase for interval change, and whole sentences."""

    nps: list[_NP]
    bare: _NP  # without severity: "left pleural effusion"
    sevp: str  # the severity as a predicate: "moderate in size", "measuring 12 mm"
    present: list[tuple[str, tuple]]  # (sentence, mentions)
    uncertain: list[tuple[str, tuple, bool]]  # (sentence, mentions, starts with a describable opacity)


def write_report(study: StudyTruth, prior: StudyTruth | None, anatomy: Anatomy, rng: np.random.Generator) -> Report:
    """The report of `study` in its `report_style`, compared against `prior` when given."""
    return _Writer(study, prior, anatomy, rng).write()


# ---------------------------------------------------------------------------------------------------------- helpers
def _tidy(s: str) -> str:
    s = re.sub(r" {2,}", " ", s.strip())
    s = s.replace(" ,", ",").replace(" .", ".")
    return s[:1].upper() + s[1:]


def _st(text: str, mentions=(), kinds=()) -> Statement:
    ms = tuple(dict.fromkeys(Mention(o, c) for o, c in mentions))
    return Statement(_tidy(text), ms, tuple(dict.fromkeys(kinds)))


def _article(text: str) -> str:
    w = text.split()[0] if text.split() else ""
    num = re.match(r"\d+", w)
    if num:
        n = num.group()
        return "an" if n.startswith("8") or n in ("11", "18") else "a"
    if w.upper() in ("NG", "ET", "IJ", "OG"):
        return "an"
    return "an" if w[:1].lower() in "aeiou" else "a"


def _a(np_: _NP) -> str:
    return "" if np_.number != "sg" else _article(np_.text) + " "


def _the(np_: _NP) -> str:
    return "" if np_.number == "mass" else "the "


def _is(np_: _NP) -> str:
    return "are" if np_.number == "pl" else "is"


def _has(np_: _NP) -> str:
    return "have" if np_.number == "pl" else "has"


def _wrap(text: str, prefix: str = "", indent: str = "") -> list[str]:
    """Lines of a paragraph as MIMIC stores them: a leading space, at most LINE_WIDTH characters in all."""
    w = textwrap.TextWrapper(width=LINE_WIDTH - 1, initial_indent=prefix, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)
    return [" " + ln for ln in (w.wrap(text) or [prefix.rstrip()])]


def _lobe(side: str | None, loc: str | None) -> dict[str, str]:
    """Words for a lobe: 'the' (with article), 'adj' (attributive) and 'region' (plain-film zone)."""
    if side in (None, "bilateral"):
        if loc == "upper":
            return {"the": "both upper lobes", "adj": "bilateral upper lobe", "region": "both upper lungs"}
        if loc in ("middle", "lingula"):
            return {"the": "the right middle lobe and lingula", "adj": "right middle lobe and lingular",
                    "region": "both mid lungs"}
        if loc == "lower":
            return {"the": "both lower lobes", "adj": "bibasilar", "region": "both lung bases"}
        return {"the": "both lungs", "adj": "bilateral", "region": "both lungs"}
    if loc == "lingula" and side == "right":
        loc = "middle"  # the right lung has no lingula; its counterpart is the middle lobe
    if loc == "middle" and side == "left":
        loc = "lingula"
    if loc == "lingula":
        return {"the": "the lingula", "adj": "lingular", "region": "left mid lung"}
    if loc == "middle":
        return {"the": "the right middle lobe", "adj": "right middle lobe", "region": "right mid lung"}
    if loc in ("upper", "lower"):
        zone = "upper lung" if loc == "upper" else "lung base"
        return {"the": f"the {side} {loc} lobe", "adj": f"{side} {loc} lobe", "region": f"{side} {zone}"}
    return {"the": f"the {side} lung", "adj": f"{side} lung", "region": f"{side} lung"}


# Pertinent negatives: (region, sentence, observations it negates, observations whose presence forbids it).
_LUNGS_BUSY = frozenset({LO, CO, PN, AT, ED, LL})
_NEGATIVES: tuple[tuple[str, str, tuple[str, ...], frozenset[str]], ...] = (
    ("lungs", "The lungs are clear.", (), _LUNGS_BUSY | {EF}),
    ("lungs", "Lungs are clear.", (), _LUNGS_BUSY | {EF}),
    ("lungs", "The lungs are well expanded and clear.", (), _LUNGS_BUSY | {EF}),
    ("lungs", "The lungs are clear bilaterally.", (), _LUNGS_BUSY | {EF}),
    ("lungs", "No focal consolidation.", (CO,), frozenset({CO, PN})),
    ("lungs", "There is no focal consolidation.", (CO,), frozenset({CO, PN})),
    ("lungs", "No focal airspace consolidation is seen.", (CO,), frozenset({CO, PN})),
    ("lungs", "There is no pulmonary edema.", (ED,), frozenset({ED})),
    ("lungs", "No pulmonary edema.", (ED,), frozenset({ED})),
    ("lungs", "There is no pulmonary vascular congestion or edema.", (ED,), frozenset({ED})),
    ("lungs", "No focal consolidation or pulmonary edema.", (CO, ED), frozenset({CO, PN, ED})),
    ("lungs", "No evidence of pneumonia.", (PN,), frozenset({PN, CO})),
    ("lungs", "No focal airspace opacity.", (LO,), _LUNGS_BUSY),
    ("lungs", "No pulmonary nodules or masses are identified.", (LL,), frozenset({LL})),
    ("pleura", "No pneumothorax.", (PX,), frozenset({PX})),
    ("pleura", "There is no pneumothorax.", (PX,), frozenset({PX})),
    ("pleura", "No pleural effusion.", (EF,), frozenset({EF})),
    ("pleura", "No pleural effusions.", (EF,), frozenset({EF})),
    ("pleura", "There is no pleural effusion.", (EF,), frozenset({EF})),
    ("pleura", "No pleural effusion or pneumothorax.", (EF, PX), frozenset({EF, PX})),
    ("pleura", "There is no pleural effusion or pneumothorax.", (EF, PX), frozenset({EF, PX})),
    ("pleura", "No pneumothorax or pleural effusion is seen.", (PX, EF), frozenset({EF, PX})),
    ("pleura", "No large pleural effusion or pneumothorax.", (EF, PX), frozenset({EF, PX})),
    ("pleura", "The costophrenic angles are sharp.", (), frozenset({EF})),
    ("heart", "Heart size is normal.", (CM,), frozenset({CM})),
    ("heart", "The heart is normal in size.", (CM,), frozenset({CM})),
    ("heart", "Normal heart size.", (CM,), frozenset({CM})),
    ("heart", "The cardiac silhouette is within normal limits.", (CM,), frozenset({CM})),
    ("heart", "The heart is not enlarged.", (CM,), frozenset({CM})),
    ("heart", "The cardiomediastinal silhouette is normal.", (EC,), frozenset({EC, CM})),
    ("heart", "Normal cardiomediastinal silhouette.", (EC,), frozenset({EC, CM})),
    ("heart", "Mediastinal and hilar contours are unremarkable.", (EC,), frozenset({EC})),
    ("heart", "The mediastinal contours are within normal limits.", (EC,), frozenset({EC})),
    ("heart", "Heart size and mediastinal contours are normal.", (CM, EC), frozenset({CM, EC})),
    ("heart", "The heart size and cardiomediastinal contours are normal.", (CM, EC), frozenset({CM, EC})),
    ("heart", "Cardiac and mediastinal silhouettes are unremarkable.", (EC,), frozenset({CM, EC})),
    ("bones", "No displaced rib fracture.", (FX,), frozenset({FX})),
    ("bones", "No acute rib fracture is identified.", (FX,), frozenset({FX})),
    ("bones", "No fracture is seen.", (FX,), frozenset({FX})),
    ("bones", "No acute osseous abnormality.", (), frozenset({FX})),
    ("bones", "Osseous structures are intact.", (), frozenset({FX})),
    ("bones", "The visualized osseous structures are unremarkable.", (), frozenset({FX})),
    ("combo", "No focal consolidation, pleural effusion, or pneumothorax.", (CO, EF, PX), frozenset({CO, PN, EF, PX})),
    ("combo", "There is no focal consolidation, pleural effusion, or pneumothorax.", (CO, EF, PX),
     frozenset({CO, PN, EF, PX})),
    ("combo", "No pleural effusion, pneumothorax, or focal consolidation is seen.", (EF, PX, CO),
     frozenset({CO, PN, EF, PX})),
    ("combo", "The lungs are clear without consolidation or effusion.", (CO, EF), _LUNGS_BUSY | {EF}),
    ("combo", "Lungs are clear, and there is no pleural effusion or pneumothorax.", (EF, PX), _LUNGS_BUSY | {EF, PX}),
)
_ALL_ABNORMAL = frozenset({AT, CM, CO, ED, EC, FX, LL, LO, EF, PO, PN, PX})
# Impression of a study with nothing but (possibly) devices.
_NORMAL_IMPRESSIONS = (
    ("No acute cardiopulmonary process.", (), _ALL_ABNORMAL),
    ("No acute cardiopulmonary abnormality.", (), _ALL_ABNORMAL),
    ("No acute intrathoracic process.", (), _ALL_ABNORMAL),
    ("No radiographic evidence of acute cardiopulmonary disease.", (), _ALL_ABNORMAL),
    ("No evidence of acute cardiopulmonary disease.", (), _ALL_ABNORMAL),
    ("Normal chest radiograph.", (), _ALL_ABNORMAL | {SD}),
    ("Normal chest radiograph without evidence of pneumonia.", (PN,), _ALL_ABNORMAL | {SD}),
)
_IMPRESSION_NEGATIVES = (
    ("No pneumothorax.", (PX,), frozenset({PX})),
    ("No pleural effusion.", (EF,), frozenset({EF})),
    ("No pulmonary edema.", (ED,), frozenset({ED})),
    ("No focal consolidation.", (CO,), frozenset({CO, PN})),
    ("No evidence of pneumonia.", (PN,), frozenset({PN, CO})),
    ("No pleural effusion or pneumothorax.", (EF, PX), frozenset({EF, PX})),
    ("No new focal consolidation.", (CO,), frozenset({CO, PN})),  # only said with a prior study
)

# Reasons for the study: (complaint, [(question, mentions)]) by the kinds that explain them.
_GENERIC_REASONS = (
    ("shortness of breath", (("eval for acute process", ()), ("eval for pneumonia", ((PN, U),)))),
    ("chest pain", (("r/o acute cardiopulmonary process", ()), ("eval for acute process", ()))),
    ("cough", (("eval for pneumonia", ((PN, U),)), ("pneumonia?", ((PN, U),)))),
    ("fever", (("eval for source of infection", ((PN, U),)), ("eval for pneumonia", ((PN, U),)))),
    ("hypoxia", (("eval for acute process", ()), ("assess for infiltrate", ((LO, U),)))),
    ("preoperative evaluation", (("pre-op", ()), ("please evaluate", ()))),
    ("weakness and fatigue", (("eval for acute process", ()),)),
    ("tachycardia", (("eval for acute cardiopulmonary process", ()),)),
)
_REASONS = {
    "et_tube": ("intubation for respiratory failure", (("ETT placement", ()), ("assess ETT position", ()))),
    "ng_tube": ("altered mental status, NGT placed", (("NGT position?", ()), ("confirm NGT placement", ()))),
    "central_line": ("new central access", (("tip position?", ()), ("assess line position", ((SD, P),)))),
    "picc": ("need for long-term IV antibiotics", (("tip position?", ()), ("assess PICC placement", ((SD, P),)))),
    "pacemaker": ("s/p PPM placement", (("lead position?", ()), ("eval for pneumothorax", ((PX, U),)))),
    "pneumonia": ("fever and productive cough", (("eval for pneumonia", ((PN, U),)),
                                                 ("assess for infiltrate", ((LO, U),)))),
    "consolidation": ("cough and fever", (("eval for pneumonia", ((PN, U),)), ("r/o pneumonia", ((PN, U),)))),
    "effusion": ("dyspnea and leg swelling", (("eval for effusion", ((EF, U),)), ("eval for fluid overload", ()))),
    "edema": ("worsening dyspnea and weight gain", (("eval for fluid overload", ()), ("eval for edema", ((ED, U),)))),
    "cardiomegaly": ("dyspnea on exertion", (("eval for fluid overload", ()), ("eval for acute process", ()))),
    "pneumothorax": ("acute chest pain after a fall", (("r/o pneumothorax", ((PX, U),)),
                                                       ("eval for pneumothorax", ((PX, U),)))),
    "rib_fracture": ("fall with chest wall pain", (("eval for rib fracture", ((FX, U),)),
                                                   ("r/o fracture", ((FX, U),)))),
    "mass": ("weight loss and hemoptysis", (("eval for mass", ((LL, U),)), ("eval for acute process", ()))),
    "nodule": ("chronic cough, former smoker", (("eval for acute process", ()), ("eval for mass", ((LL, U),)))),
    "atelectasis": ("post-operative hypoxia", (("eval for acute process", ()), ("assess for infiltrate", ((LO, U),)))),
}


# ----------------------------------------------------------------------------------------------------------- writer
class _Writer:
    def __init__(self, study: StudyTruth, prior: StudyTruth | None, anatomy: Anatomy, rng: np.random.Generator):
        self.study, self.prior, self.anatomy, self.rng = study, prior, anatomy, rng
        self.style = study.report_style if study.report_style in REPORT_STYLES else "standard"
        views = [im.view for im in study.images]
        tokens = set(re.findall(r"[A-Z]+", study.procedure.upper()))
        self.portable = "PORTABLE" in tokens or (bool(views) and "PA" not in views and "AP" in views)
        self.sep = "  " if self.chance(0.5) else " "  # MIMIC dictation often puts two spaces between sentences
        self.active: set[str] | None = None  # observations stated present/uncertain, fixed before any negative
        self._fixed: dict[tuple[int, str], object] = {}

    def fixed(self, f: Finding, key: str, draw):
        """A detail of one finding (a size, a vessel) drawn once, so every mention of it agrees."""
        k = (id(f), key)
        if k not in self._fixed:
            self._fixed[k] = draw()
        return self._fixed[k]

    # random helpers ----------------------------------------------------------------------------------------------
    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def time(self) -> str:
        return f"{int(self.rng.integers(1, 13))}:{int(self.rng.integers(0, 60)):02d} {self.pick(('AM', 'PM'))}"

    # per-kind wording --------------------------------------------------------------------------------------------
    def spec(self, f: Finding) -> _Spec:
        """The wordings of a finding. Its descriptor words ("trace" or "small", "patchy" or "mild") are drawn from a
        generator of its own, so every sentence about it in this report uses the same ones."""
        seed = self.fixed(f, "words", lambda: int(self.rng.integers(2**31)))
        main, self.rng = self.rng, np.random.default_rng(seed)
        try:
            return getattr(self, f"_spec_{f.kind}")(f)
        finally:
            self.rng = main

    def _side(self, f: Finding, hyphen: bool = False) -> str:
        if f.side in (None, "bilateral"):
            return ""
        return f"{f.side}-sided" if hyphen and self.chance(0.5) else f.side

    def _spec_cardiomegaly(self, f: Finding) -> _Spec:
        sev = {"mild": "mild", "moderate": "moderate", "severe": self.pick(("severe", "marked"))}.get(f.severity,
                                                                                                     "moderate")
        adv = {"mild": "mildly", "moderate": "moderately", "severe": self.pick(("markedly", "severely"))}.get(
            f.severity, "moderately")
        c = (CM,)
        nps = [_NP(f"{sev} cardiomegaly", "mass", c), _NP(f"{sev} enlargement of the cardiac silhouette", "mass", c),
               _NP(f"{sev} cardiac enlargement", "mass", c)]
        present = [(f"The heart is {adv} enlarged.", ((CM, P),)), (f"Heart size is {adv} enlarged.", ((CM, P),)),
                   (f"The cardiac silhouette is {adv} enlarged.", ((CM, P),)),
                   (f"{adv} enlarged cardiac silhouette.", ((CM, P),))]
        tech = ", although this may be accentuated by the AP technique" if self.portable else ""
        uncertain = [(f"The heart may be {adv} enlarged{tech}.", ((CM, U),), False),
                     (f"Heart size may be {adv} enlarged.", ((CM, U),), False),
                     (f"The cardiac silhouette is possibly {adv} enlarged.", ((CM, U),), False)]
        return _Spec(nps, _NP("cardiomegaly", "mass", c), sev, present, uncertain)

    def _spec_enlarged_cardiomediastinum(self, f: Finding) -> _Spec:
        sev = {"mild": "mild", "moderate": "moderate", "severe": "marked"}.get(f.severity, "moderate")
        adv = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}.get(f.severity, "moderately")
        c = (EC,)
        nps = [_NP(f"{sev} widening of the mediastinum", "mass", c),
               _NP(f"{sev} enlargement of the cardiomediastinal silhouette", "mass", c),
               _NP(f"{adv} widened mediastinum", "sg", c)]
        present = [(f"The mediastinum is {adv} widened.", ((EC, P),)),
                   (f"The mediastinal contours are {adv} widened.", ((EC, P),)),
                   (f"The cardiomediastinal silhouette is {adv} enlarged.", ((EC, P),))]
        uncertain = [(f"The mediastinum may be {adv} widened.", ((EC, U),), False),
                     (f"The mediastinal contours are possibly {adv} widened.", ((EC, U),), False)]
        return _Spec(nps, _NP("widening of the mediastinum", "sg", c), sev, present, uncertain)

    def _spec_effusion(self, f: Finding) -> _Spec:
        sev = {"small": self.pick(("small", "small", "trace")), "moderate": self.pick(("moderate", "moderate-sized")),
               "large": "large", "mild": "small", "severe": "large"}.get(f.severity, "moderate")
        side = self._side(f)
        c = (EF,)
        if f.side == "bilateral":
            nps = [_NP(f"{sev} bilateral pleural effusions", "pl", c),
                   _NP(f"bilateral {sev} pleural effusions", "pl", c),
                   _NP(f"{sev} pleural effusions bilaterally", "pl", c), _NP(f"{sev} bilateral effusions", "pl", c)]
            bare = _NP("bilateral pleural effusions", "pl", c)
            where, angle = "bilaterally", "both costophrenic angles"
            consistent = f"{sev} bilateral pleural effusions"
        else:
            nps = [_NP(f"{sev} {side} pleural effusion", "sg", c), _NP(f"{sev} {self._side(f, True)} pleural effusion",
                                                                       "sg", c),
                   _NP(f"{sev} {side} effusion", "sg", c)]
            if side:
                nps.append(_NP(f"{sev} pleural effusion on the {side}", "sg", c))
            bare = _NP(f"{side} pleural effusion", "sg", c)
            where = f"on the {side}" if side else ""
            angle = f"the {side} costophrenic angle" if side else "the costophrenic angle"
            consistent = f"{_article(sev)} {sev} pleural effusion"
        amount = f"{_article(sev)} {sev} amount of pleural fluid {where}"
        present = [(f"There is {amount}.", ((EF, P),))]
        uncertain = [(f"Possible {sev} amount of pleural fluid {where}.", ((EF, U),), False)]
        if f.severity != "large":
            present.append((f"Blunting of {angle} is consistent with {consistent}.", ((EF, P),)))
            uncertain.append((f"Blunting of {angle} may reflect {consistent}.", ((EF, U),), True))
        sevp = {"small": "small", "moderate": "moderate in size", "large": "large"}.get(f.severity, "moderate in size")
        return _Spec(nps, bare, sevp, present, uncertain)

    def _spec_pneumothorax(self, f: Finding) -> _Spec:
        sev = {"small": self.pick(("small", "small", "tiny")), "moderate": self.pick(("moderate", "moderate-sized")),
               "large": "large", "mild": "small", "severe": "large"}.get(f.severity, "moderate")
        side = self._side(f)
        c = (PX,)
        apical = f.severity != "large"
        if f.side == "bilateral":
            nps = [_NP(f"{sev} bilateral pneumothoraces", "pl", c)]
            if apical:
                nps.append(_NP(f"{sev} bilateral apical pneumothoraces", "pl", c))
            bare = _NP("bilateral pneumothoraces", "pl", c)
            present = [(f"There are {sev} pneumothoraces bilaterally.", ((PX, P),))]
            apex = "both apices"
        else:
            nps = [_NP(f"{sev} {side} pneumothorax", "sg", c),
                   _NP(f"{sev} {self._side(f, True)} pneumothorax", "sg", c)]
            if apical:
                nps += [_NP(f"{sev} {side} apical pneumothorax", "sg", c)] * 2
            bare = _NP(f"{side} pneumothorax", "sg", c)
            where = f" on the {side}" if side else ""
            present = [(f"{_article(sev)} {sev} pneumothorax is present{where}.", ((PX, P),))]
            if f.severity == "large":
                present.append((f"Large {side} pneumothorax without evidence of tension.", ((PX, P),)))
            apex = f"the {side} apex" if side else "the apex"
        uncertain = [(f"Subtle lucency at {apex} may represent {_article(sev)} {sev} pneumothorax.", ((PX, U),), True)]
        sevp = {"small": "small", "moderate": "moderate in size", "large": "large"}.get(f.severity, "moderate in size")
        return _Spec(nps, bare, sevp, present, uncertain)

    def _lung_words(self, f: Finding) -> tuple[dict[str, str], str]:
        """Lobe words and an opacity adjective for the finding's severity."""
        lw = _lobe(f.side, f.location)
        sevo = {"mild": self.pick(("patchy", "subtle", "mild")), "moderate": self.pick(("focal", "moderate", "")),
                "severe": self.pick(("dense", "extensive"))}.get(f.severity, "")
        return lw, sevo

    def _spec_consolidation(self, f: Finding) -> _Spec:
        lw, sevo = self._lung_words(f)
        sev = {"mild": self.pick(("patchy", "mild")), "moderate": self.pick(("", "moderate", "focal")),
               "severe": self.pick(("dense", "extensive"))}.get(f.severity, "")
        c = (CO,)
        nps = [_NP(f"{sev} consolidation in {lw['the']}", "mass", c),
               _NP(f"{sev} {lw['adj']} consolidation", "mass", c),
               _NP(f"{sev} airspace consolidation in {lw['the']}", "mass", c)]
        present = [(f"{sevo} opacification of {lw['the']}, consistent with consolidation.", ((LO, P), (CO, P))),
                   (f"There is {sevo} airspace opacity in {lw['the']} compatible with consolidation.",
                    ((LO, P), (CO, P)))]
        if lw["the"] == "the right middle lobe":
            present.append((f"{sev} consolidation in the right middle lobe obscures the right heart border.",
                            ((CO, P),)))
        uncertain = [(f"{sevo} opacity in {lw['the']} may represent consolidation.", ((LO, P), (CO, U)), True),
                     (f"{sevo} {lw['adj']} opacity, possibly consolidation.", ((LO, P), (CO, U)), True),
                     (f"{sev} consolidation in {lw['the']} cannot be excluded.", ((CO, U),), False)]
        sevp = {"mild": "mild in extent", "moderate": "moderate in extent", "severe": "extensive"}.get(
            f.severity, "moderate in extent")
        return _Spec(nps, _NP(f"{lw['adj']} consolidation", "mass", c), sevp, present, uncertain)

    def _spec_pneumonia(self, f: Finding) -> _Spec:
        lw, sevo = self._lung_words(f)
        sev = {"mild": self.pick(("early", "patchy")), "moderate": "", "severe": "extensive"}.get(f.severity, "")
        c = (PN,)
        nps = [_NP(f"{sev} {lw['adj']} pneumonia", "mass", c), _NP(f"{sev} pneumonia in {lw['the']}", "mass", c)]
        present = [(f"{sevo} consolidation in {lw['the']}, consistent with pneumonia.", ((CO, P), (PN, P))),
                   (f"{sevo} {lw['adj']} opacity compatible with pneumonia.", ((LO, P), (PN, P))),
                   (f"Findings are consistent with {sev} {lw['adj']} pneumonia.", ((PN, P),)),
                   (f"{sevo} airspace opacity in {lw['the']} is consistent with pneumonia.", ((LO, P), (PN, P)))]
        uncertain = [(f"{sevo} {lw['adj']} opacity, concerning for pneumonia.", ((LO, P), (PN, U)), True),
                     (f"{sevo} consolidation in {lw['the']}, concerning for pneumonia.", ((CO, P), (PN, U)), True),
                     (f"{sevo} opacity in {lw['the']} may represent pneumonia.", ((LO, P), (PN, U)), True),
                     (f"{sevo} opacity in {lw['the']} is suspicious for infection.", ((LO, P), (PN, U)), True),
                     (f"{sev or sevo} pneumonia in {lw['the']} cannot be excluded.", ((PN, U),), False)]
        sevp = {"mild": "mild in extent", "moderate": "moderate in extent", "severe": "extensive"}.get(
            f.severity, "moderate in extent")
        return _Spec(nps, _NP(f"{lw['adj']} pneumonia", "mass", c), sevp, present, uncertain)

    def _spec_atelectasis(self, f: Finding) -> _Spec:
        c = (AT,)
        both = f.side in (None, "bilateral")
        s = f.side or ""
        if f.location == "lobar":
            sev = {"mild": "partial", "moderate": "moderate", "severe": "complete"}.get(f.severity, "moderate")
            lobe = "both lower lobes" if both else f"the {s} lower lobe"
            adj = "bilateral lower lobe" if both else f"{s} lower lobe"
            nps = [_NP(f"{sev} atelectasis of {lobe}", "mass", c), _NP(f"{sev} {adj} collapse", "mass", c),
                   _NP(f"{sev} collapse of {lobe}", "mass", c)]
            present = [(f"Opacification of {lobe} with volume loss, consistent with {sev} collapse.",
                        ((LO, P), (AT, P))),
                       (f"{adj} volume loss with {sev} atelectasis.", ((AT, P),))]
            uncertain = [(f"Opacity in {lobe} may represent {sev} atelectasis.", ((LO, P), (AT, U)), True)]
            bare = _NP(f"{adj} atelectasis", "mass", c)
        else:
            sev = {"mild": self.pick(("mild", "minimal", "minor")), "moderate": "moderate",
                   "severe": self.pick(("extensive", "marked"))}.get(f.severity, "moderate")
            if both:
                adj, base = self.pick(("bibasilar", "bilateral basilar")), "both lung bases"
                nps = [_NP(f"{sev} {adj} atelectasis", "mass", c),
                       _NP(f"{sev} atelectasis at both lung bases", "mass", c)]
            else:
                adj, base = f"{s} basilar", f"the {s} lung base"
                nps = [_NP(f"{sev} {adj} atelectasis", "mass", c),
                       _NP(f"{sev} atelectasis at the {s} lung base", "mass", c),
                       _NP(f"{sev} plate-like atelectasis in the {s} lower lung", "mass", c)]
                if f.severity in ("mild", "moderate"):
                    nps.append(_NP(f"{sev} subsegmental atelectasis at the {s} base", "mass", c))
            present = [(f"Linear opacities at {base} are consistent with {sev} atelectasis.", ((LO, P), (AT, P))),
                       (f"{sev} streaky opacity at {base}, compatible with atelectasis.", ((LO, P), (AT, P)))]
            uncertain = [(f"{sev} {adj} opacity may represent atelectasis.", ((LO, P), (AT, U)), True),
                         (f"Opacity at {base} could reflect {sev} atelectasis.", ((LO, P), (AT, U)), True)]
            bare = _NP(f"{adj} atelectasis", "mass", c)
        sevp = {"mild": "mild", "moderate": "moderate", "severe": "extensive"}.get(f.severity, "moderate")
        return _Spec(nps, bare, sevp, present, uncertain)

    def _spec_edema(self, f: Finding) -> _Spec:
        sev = f.severity if f.severity in ("mild", "moderate", "severe") else "moderate"
        c = (ED,)
        if f.side in ("left", "right"):
            nps = [_NP(f"{sev} {f.side}-sided pulmonary edema", "mass", c),
                   _NP(f"{sev} asymmetric pulmonary edema, greater on the {f.side}", "mass", c)]
        else:
            nps = [_NP(f"{sev} pulmonary edema", "mass", c), _NP(f"{sev} interstitial edema", "mass", c),
                   _NP(f"{sev} interstitial pulmonary edema", "mass", c),
                   _NP(f"{sev} pulmonary vascular congestion", "mass", c)]
            if sev == "severe":
                nps.append(_NP("severe alveolar edema", "mass", c))
        if f.side in ("left", "right"):  # asymmetric edema: every wording names the side
            present = [(f"Hazy opacity in the {f.side} lung is consistent with {sev} asymmetric edema.",
                        ((LO, P), (ED, P)))]
            uncertain = [(f"Hazy opacity in the {f.side} lung may reflect {sev} asymmetric edema.",
                          ((LO, P), (ED, U)), True)]
            return _Spec(nps, _NP(f"{f.side}-sided pulmonary edema", "mass", c), sev, present, uncertain)
        present = [(f"There is {sev} pulmonary vascular congestion with interstitial edema.", ((ED, P),)),
                   (f"Diffuse hazy opacities are consistent with {sev} pulmonary edema.", ((LO, P), (ED, P))),
                   (f"Findings are consistent with {sev} pulmonary edema.", ((ED, P),))]
        if self.chance(0.3) and (self.active is None or CM in self.active):
            # CheXpert reads "heart failure" as edema plus an uncertain cardiomegaly; once the negatives are
            # chosen (self.active fixed) it may only be said where cardiomegaly is already asserted.
            present.append((f"{sev} pulmonary edema, consistent with congestive heart failure.", ((ED, P), (CM, U))))
        uncertain = [(f"Hazy perihilar opacities may reflect {sev} pulmonary edema.", ((LO, P), (ED, U)), True),
                     (f"{sev} pulmonary vascular congestion cannot be excluded.", ((ED, U),), False)]
        return _Spec(nps, _NP("pulmonary edema", "mass", c), sev, present, uncertain)

    def _nodule_size(self, f: Finding) -> str:
        lo, hi = {"small": (4, 9), "mild": (4, 8), "moderate": (9, 15), "large": (15, 29), "severe": (15, 29)}.get(
            f.severity, (6, 12))
        mm = int(self.rng.integers(lo, hi + 1))
        return f"{mm} mm" if mm < 10 or self.chance(0.5) else f"{mm / 10:.1f} cm"

    def _spec_nodule(self, f: Finding) -> _Spec:
        lw = _lobe(f.side, f.location)
        size = self.fixed(f, "size", lambda: self._nodule_size(f))
        c = (LL,)
        small = "small " if f.severity == "small" and self.chance(0.5) else ""
        nps = [_NP(f"{size} nodule in {lw['the']}", "sg", c), _NP(f"{size} {lw['adj']} nodule", "sg", c),
               _NP(f"{small}{lw['adj']} nodule measuring {size}", "sg", c),
               _NP(f"{size} pulmonary nodule in {lw['the']}", "sg", c)]
        present = [(f"{_article(size)} {size} nodule projects over {lw['the']}.", ((LL, P),)),
                   (f"There is a {small}rounded nodule in {lw['the']}, measuring {size}.", ((LL, P),))]
        uncertain = [(f"{_article(size)} {size} opacity in {lw['the']} may represent a nodule.", ((LO, P), (LL, U)),
                      False)]
        if f.location == "lower":
            uncertain.append((f"Possible {size} nodule in {lw['the']}, which may be a nipple shadow.", ((LL, U),),
                              False))
        return _Spec(nps, _NP(f"{lw['adj']} nodule", "sg", c), f"measuring {size}", present, uncertain)

    def _spec_mass(self, f: Finding) -> _Spec:
        lw = _lobe(f.side, f.location)
        lo, hi = {"small": (30, 39), "mild": (30, 39), "moderate": (40, 59)}.get(f.severity, (60, 90))
        size = self.fixed(f, "size", lambda: f"{int(self.rng.integers(lo, hi + 1)) / 10:.1f} cm")
        large = "large " if f.severity in ("large", "severe") else ""
        c = (LL,)
        nps = [_NP(f"{size} mass in {lw['the']}", "sg", c), _NP(f"{large}{lw['adj']} mass measuring {size}", "sg", c),
               _NP(f"{size} {lw['adj']} mass", "sg", c)]
        present = [(f"A {large}mass is seen in {lw['the']}, measuring approximately {size}.",
                    ((LL, P),))]
        uncertain = [(f"{_article(size)} {size} opacity in {lw['the']} may represent a mass.", ((LO, P), (LL, U)),
                      False),
                     (f"{_article(size)} {size} mass in {lw['the']} cannot be excluded.", ((LL, U),), False)]
        return _Spec(nps, _NP(f"{lw['adj']} mass", "sg", c), f"measuring {size}", present, uncertain)

    def _spec_rib_fracture(self, f: Finding) -> _Spec:
        disp = {"mild": "nondisplaced", "moderate": "minimally displaced", "severe": "displaced"}.get(
            f.severity, "nondisplaced")
        word, num = ORDINALS.get(str(f.location), ("lower", "lower"))
        ord_ = self.pick((word, word, num))
        post = "posterior " if self.chance(0.6) else ""
        c = (FX,)
        if f.side == "bilateral":
            nps = [_NP(f"{disp} fractures of the {ord_} {post}ribs bilaterally", "pl", c),
                   _NP(f"bilateral {disp} {ord_} {post}rib fractures", "pl", c)]
            bare = _NP(f"bilateral {ord_} rib fractures", "pl", c)
            rib = f"the {ord_} ribs bilaterally"
        else:
            s = f.side or ""
            nps = [_NP(f"{disp} fracture of the {s} {ord_} {post}rib", "sg", c),
                   _NP(f"{disp} {s} {ord_} {post}rib fracture", "sg", c),
                   _NP(f"{disp} fracture of the {ord_} {s} {post}rib", "sg", c)]
            bare = _NP(f"{s} {ord_} rib fracture", "sg", c)
            rib = f"the {s} {ord_} {post}rib"
        present = [(f"There is a {disp} fracture involving {rib}.", ((FX, P),))]
        uncertain = [(f"Cortical irregularity of {rib} may represent a {disp} fracture.", ((FX, U),), True)]
        return _Spec(nps, bare, disp, present, uncertain)

    def _spec_pleural_thickening(self, f: Finding) -> _Spec:
        sev = {"mild": self.pick(("mild", "minimal")), "moderate": "moderate",
               "severe": self.pick(("marked", "extensive"))}.get(f.severity, "mild")
        c = (PO,)
        s = f.side or ""
        both = f.side == "bilateral"
        if f.location == "apical":
            if both:
                nps = [_NP(f"{sev} biapical pleural thickening", "mass", c),
                       _NP(f"{sev} bilateral apical pleural thickening", "mass", c)]
                bare, cap = _NP("biapical pleural thickening", "mass", c), "bilateral apical caps"
            else:
                nps = [_NP(f"{sev} {s} apical pleural thickening", "mass", c),
                       _NP(f"{sev} pleural thickening at the {s} apex", "mass", c)]
                bare, cap = _NP(f"{s} apical pleural thickening", "mass", c), f"{s} apical cap"
            uncertain = [(f"{sev} {cap} may represent pleural thickening.", ((PO, U),), True)]
        else:
            side = "bilateral" if both else s
            nps = [_NP(f"{sev} {side} lateral pleural thickening", "mass", c),
                   _NP(f"{sev} pleural thickening along "
                       f"{'both lateral chest walls' if both else f'the {s} lateral chest wall'}", "mass", c)]
            bare = _NP(f"{side} lateral pleural thickening", "mass", c)
            uncertain = [(f"Irregularity along the {side} lateral pleural surface may represent {sev} pleural "
                          "thickening.", ((PO, U),), True)]
        return _Spec(nps, bare, sev, [], uncertain)

    # statements about findings -----------------------------------------------------------------------------------
    def change_of(self, f: Finding) -> str | None:
        return f.change if self.prior is not None else None

    def describe(self, f: Finding, brief: bool) -> Statement:
        """One sentence stating the finding with its certainty, interval change and descriptors."""
        if f.kind in DEVICE_KINDS:
            return self.describe_device(f, brief)
        sp = self.spec(f)
        np_ = self.pick(sp.nps)
        change = self.change_of(f)
        if change in ("increased", "decreased") and f.kind == "rib_fracture":
            change = "unchanged"  # a fracture does not grow or shrink
        kinds = (f.kind,)
        if f.report == "present":
            ments = tuple((o, P) for o in np_.obs)
            if change in ("new", "unchanged", "increased", "decreased") and (not sp.present or self.chance(0.8)):
                return _st(self.changed(np_, sp, change, f.kind), ments, kinds)
            opts = [(t, ments) for t in self.present_frames(np_)]
            # Impressions often shorten to the bare finding; lung findings keep their opacity wording more often.
            if brief and self.chance(0.3 if f.kind in ("atelectasis", "consolidation", "pneumonia", "edema") else 0.5):
                opts = [(f"{np_.text}.", ments)]
            else:
                opts += sp.present
            text, m = self.pick(opts)
            if change:
                text = text[:-1] + self.pick(_PRESENT_SUFFIX[change]) + "."
            return _st(text, m, kinds)
        opts3 = [(t, tuple((o, U) for o in np_.obs), False) for t in self.uncertain_frames(np_, change)]
        text, m, lead = self.pick(opts3 + sp.uncertain)
        if change and not (change == "new" and text.lower().startswith("possible new")):
            if lead:
                text = f"{_CHANGE_PREFIX[change]} {text[:1].lower()}{text[1:]}"
            else:
                text = text[:-1] + self.pick(_UNCERTAIN_SUFFIX[change]) + "."
        return _st(text, m, kinds)

    def describe_within(self, f: Finding) -> Statement:
        """A brief statement of `f` asserting nothing beyond what the report already asserts (for sections written
        after the negatives were chosen)."""
        for _ in range(8):
            s = self.describe(f, brief=True)
            if all(m.certainty == A or m.observation in self.active for m in s.mentions):
                return s
        np_ = self.spec(f).nps[0]  # names only the finding's own observation
        return _st(f"{'possible ' if f.report == 'uncertain' else ''}{np_.text}.",
                   tuple((o, P if f.report == "present" else U) for o in np_.obs), (f.kind,))

    def present_frames(self, np_: _NP) -> list[str]:
        a, be = _a(np_), _is(np_)
        verb = self.pick(("seen", "noted", "present", "demonstrated", "identified"))
        return [f"{np_.text}.", f"there {be} {a}{np_.text}.", f"{a}{np_.text} {be} {verb}."]

    def uncertain_frames(self, np_: _NP, change: str | None) -> list[str]:
        a = _a(np_)
        out = [f"possible {np_.text}.", f"{a}{np_.text} cannot be excluded.", f"{a}{np_.text} cannot be ruled out.",
               f"cannot exclude {a}{np_.text}.", f"questionable {np_.text}.", f"there may be {a}{np_.text}."]
        if change == "new":
            out.append(f"possible new {np_.text}.")
        return out

    def changed(self, np_: _NP, sp: _Spec, change: str, kind: str) -> str:
        """A present finding worded by its interval change."""
        a, be, has, the = _a(np_), _is(np_), _has(np_), _the(np_)
        bare, bthe, bhas = sp.bare.text, _the(sp.bare), _has(sp.bare)
        if change in ("increased", "decreased") and kind in ("nodule", "mass"):
            more = "increased" if change == "increased" else "decreased"
            opts = [f"interval {more[:-1]} in size of {bthe}{bare}, now {sp.sevp}.",
                    f"{bthe}{bare} {bhas} {more} in size, now {sp.sevp}."]
        elif change == "new":
            a_new = "a " if np_.number == "sg" else ""
            opts = [f"new {np_.text}.", f"there {be} {a_new}new {np_.text}.", f"{a}{np_.text} {be} new since the "
                    "prior study.", f"interval development of {a}{np_.text}.",
                    f"{a}{np_.text} {has} developed since the prior exam."]
        elif change == "unchanged":
            opts = [f"unchanged {np_.text}.", f"stable {np_.text}.", f"{the}{np_.text} {be} unchanged.",
                    f"again seen {be} {a}{np_.text}.", f"persistent {np_.text}.",
                    f"{the}{np_.text} {be} stable compared to the prior study.",
                    f"{np_.text}, unchanged from the prior exam."]
        elif change == "increased":
            opts = [f"interval increase in {bthe}{bare}, now {sp.sevp}.", f"{bthe}{bare} {bhas} increased, now "
                    f"{sp.sevp}.", f"increased {bare}, now {sp.sevp}.", f"worsening {np_.text}.",
                    f"interval worsening of {bthe}{bare}, now {sp.sevp}."]
        else:
            opts = [f"interval decrease in {bthe}{bare}, now {sp.sevp}.", f"{bthe}{bare} {bhas} decreased, now "
                    f"{sp.sevp}.", f"decreased {bare}, now {sp.sevp}.", f"improving {np_.text}.",
                    f"interval improvement in {bthe}{bare}, now {sp.sevp}."]
        return self.pick(opts)

    def device_words(self, f: Finding) -> tuple[str, str, str]:
        """(noun phrase, trailing clause saying where it ends, short position phrase) for a device."""
        s = f.side if f.side in ("left", "right") else ""
        tip = self.fixed(f, "tip", lambda: self.pick(("in the SVC", "in the mid SVC", "in the lower SVC",
                                                      "in the superior vena cava", "in the proximal SVC")))
        if f.kind == "et_tube":
            n = self.fixed(f, "cm", lambda: int(self.rng.integers(3, 7)))
            np_ = self.pick(("endotracheal tube", "endotracheal tube", "ET tube"))
            rest = self.pick((f"with its tip approximately {n} cm above the carina",
                              f"terminating {n} cm above the carina", "with the tip in the mid thoracic trachea",
                              "with the tip at the level of the clavicular heads"))
            short = self.pick(("in standard position", "in appropriate position", f"{n} cm above the carina"))
        elif f.kind == "ng_tube":
            np_ = self.pick(("nasogastric tube", "nasogastric tube", "NG tube", "enteric tube"))
            rest = self.pick(("coursing below the diaphragm with its tip in the stomach",
                              "with the tip in the stomach", "extending below the diaphragm into the stomach",
                              "with the tip projecting over the gastric fundus",
                              "coursing below the diaphragm, the tip beyond the inferior edge of the image"))
            short = self.pick(("in the stomach", "in appropriate position", "terminating in the stomach"))
        elif f.kind == "central_line":
            vessel = self.fixed(f, "vessel", lambda: self.pick(("internal jugular",) * 3 + ("subclavian",)))
            if f.side == "bilateral":
                np_ = f"bilateral {vessel} central venous catheters"
            else:
                np_ = self.pick((f"{s} {vessel} central venous catheter", f"{s} {vessel} central line",
                                 f"{s}-sided central venous catheter" if s else "central venous catheter",
                                 f"{s} {'IJ' if vessel == 'internal jugular' else vessel} line"))
            rest = self.pick((f"with the tip {tip}", f"terminating {tip}", f"with its tip {tip}"))
            short = self.pick((f"with tip {tip}", "in standard position", f"terminating {tip}"))
        elif f.kind == "picc":
            np_ = self.pick((f"{s} PICC", f"{s}-sided PICC line" if s else "PICC line", f"{s} upper extremity PICC",
                             f"{s} PICC line"))
            rest = self.pick((f"with the tip {tip}", f"terminating {tip}", f"with its tip {tip}"))
            short = self.pick((f"with tip {tip}", "in standard position", f"terminating {tip}"))
        else:
            sided = f"{s}-sided " if s else ""
            np_ = self.pick((f"{sided}pacemaker", f"{s} chest wall pacemaker" if s else "chest wall pacemaker",
                             f"dual-chamber {sided}pacemaker", f"{sided}pacer device"))
            rest = self.pick(("with leads in the right atrium and right ventricle",
                              "with leads terminating in the right atrium and right ventricle",
                              "with leads in expected position"))
            short = self.pick(("in place", "with leads in standard position", "with leads in expected position"))
        rest = self.fixed(f, "rest", lambda: rest)  # where the tip lies is said the same way throughout
        return re.sub(" +", " ", np_).strip(), rest, short

    def describe_device(self, f: Finding, brief: bool) -> Statement:
        np_, rest, short = self.device_words(f)
        a = _article(np_)
        pl = np_.endswith("catheters")
        be = "are" if pl else "is"
        change = self.change_of(f)
        cert = P if f.report == "present" else U
        if cert == U:
            text = self.pick((f"possible {np_}, the tip not well visualized.",
                              f"{a} {np_} may be present but is not well seen."))
        elif change == "new":
            text = self.pick((f"interval placement of {a} {np_} {rest}.", f"new {np_} {rest}.",
                              f"{a} {np_} has been placed, {rest}."))
        elif change is not None:
            text = self.pick((f"unchanged position of the {np_}.", f"the {np_} {be} unchanged in position.",
                              f"{np_} remains in place, {rest}.", f"stable {np_} {rest}."))
        elif brief:
            text = self.pick((f"{np_} {short}.", f"{np_} in standard position.", f"{np_} in appropriate position."))
        else:
            text = self.pick((f"{np_} {rest}.", f"{a} {np_} {be} in place, {rest}.", f"there {be} {a} {np_} {rest}."))
        if pl:  # bilateral catheters take no article
            text = text.replace(f" {a} {np_}", f" {np_}").replace(f"{a} {np_}", np_)
        return _st(text, ((SD, cert),), (f.kind,))

    def devices_summary(self, devices: list[Finding]) -> Statement:
        """One impression sentence for several devices described in the findings."""
        if all(self.change_of(f) == "unchanged" for f in devices):
            text = self.pick(("Lines and tubes are unchanged in position.", "Support devices are unchanged."))
        else:
            text = self.pick(("Lines and tubes in standard position.", "Support devices in expected position.",
                              "Tubes and lines are appropriately positioned."))
        return _st(text, ((SD, P),), tuple(f.kind for f in devices))

    def combined(self, f1: Finding, f2: Finding, brief: bool) -> Statement:
        """Two present findings in one sentence: effusion with adjacent atelectasis, cardiomegaly with edema."""
        if f1.kind == "effusion":
            eff = self.pick(self.spec(f1).nps).text
            asev = {"mild": self.pick(("mild", "minimal")), "moderate": "moderate",
                    "severe": self.pick(("extensive", "marked"))}.get(f2.severity, "mild")
            where = "bibasilar" if f2.side == "bilateral" else "basilar"
            text = self.pick((f"{eff} with {asev} adjacent {where} atelectasis.",
                              f"{eff} with associated {asev} {where} atelectasis.",
                              f"{eff} and {asev} compressive {where} atelectasis."))
            ments = ((EF, P), (AT, P))
        else:
            cm = self.pick(self.spec(f1).nps[:1] + self.spec(f1).nps[2:]).text
            esev = f2.severity if f2.severity in ("mild", "moderate", "severe") else "moderate"
            adv = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}.get(f1.severity, "moderately")
            text = self.pick((f"{cm} with {esev} pulmonary edema.",
                              f"the heart is {adv} enlarged, and there is {esev} interstitial edema.",
                              f"{cm} and {esev} pulmonary vascular congestion."))
            ments = ((CM, P), (ED, P))
        return _st(text, ments, (f1.kind, f2.kind))

    def versus(self, f: Finding, hedge: str) -> Statement:
        """An uncertain lung finding and a hedged alternative named as a differential of one opacity."""
        term = {"atelectasis": "atelectasis", "consolidation": "consolidation",
                "pneumonia": self.pick(("pneumonia", "infection"))}
        both = f.side in (None, "bilateral")
        if f.kind == "atelectasis" and f.location == "lobar":
            where = "in both lower lobes" if both else f"in the {f.side} lower lobe"
        elif f.kind == "atelectasis":
            where = "at both lung bases" if both else f"at the {f.side} lung base"
        else:
            where = "in " + _lobe(f.side, f.location)["the"]
        sev = {"mild": self.pick(("subtle", "patchy", "mild")), "moderate": "moderate",
               "severe": self.pick(("dense", "extensive"))}.get(f.severity, "")
        t1, t2 = term[f.kind], term[hedge]
        text = self.pick((f"{sev} opacity {where}, {t1} versus {t2}.",
                          f"{sev} opacity {where} may represent {t1} or {t2}.",
                          f"{sev} opacity {where}, which could reflect {t1} or {t2}."))
        change = self.change_of(f)
        if change:
            text = f"{_CHANGE_PREFIX[change]} {_tidy(text)[:1].lower()}{_tidy(text)[1:]}"
        return _st(text, ((LO, P), (f.observation, U), (KIND_OBSERVATION[hedge], U)), (f.kind, hedge))

    def hedge(self, kind: str) -> Statement:
        """A kind the images do not show, mentioned as a possibility."""
        side = self._fixed.setdefault((0, "hedge side " + kind), self.pick(("left", "right")))
        o = KIND_OBSERVATION[kind]
        opts = {
            "pneumonia": ("Early pneumonia cannot be excluded.", "Superimposed infection cannot be excluded.",
                          "Cannot exclude early pneumonia in the appropriate clinical setting."),
            "consolidation": ("Focal consolidation cannot be entirely excluded.",
                              "Possible subtle consolidation at the lung bases.",
                              "A developing consolidation cannot be ruled out."),
            "atelectasis": ("Possible minimal bibasilar atelectasis.",
                            "Minimal basilar atelectasis cannot be excluded.",
                            "There may be mild atelectasis at the lung bases."),
            "edema": ("Possible mild interstitial edema.", "Mild pulmonary vascular congestion cannot be excluded.",
                      "There may be minimal interstitial edema."),
            "effusion": ("Possible trace pleural effusion.", "A small pleural effusion cannot be excluded.",
                         f"Questionable trace {side} pleural effusion.", "Possible small amount of pleural fluid."),
            "pneumothorax": ("A tiny apical pneumothorax cannot be excluded.", "Possible tiny apical pneumothorax."),
            "cardiomegaly": ("Heart size may be mildly enlarged.", "Possible mild cardiomegaly."),
            "enlarged_cardiomediastinum": ("The mediastinum may be mildly widened.",
                                           "Possible mild widening of the mediastinum."),
            "nodule": ("A small pulmonary nodule cannot be excluded.",
                       f"Possible small nodule in the {side} mid lung."),
            "mass": ("A hilar mass cannot be excluded on this study.", "Possible mass, not well characterized here."),
            "rib_fracture": ("A nondisplaced rib fracture cannot be excluded.", "Possible subtle rib fracture."),
            "pleural_thickening": ("Possible mild apical pleural thickening.",
                                   "Mild pleural thickening cannot be excluded."),
        }.get(kind, ("Possible overlying catheter.", "A retained catheter fragment cannot be excluded."))
        return _st(self.pick(opts), ((o, U),), (kind,))

    def resolved(self, pf: Finding) -> Statement:
        """A prior finding that is gone: negated as resolved / removed."""
        if pf.kind == "et_tube" and (SD in self.active or self.chance(0.3)):
            # Names no device, so it can be said while other lines and tubes remain.
            return _st(self.pick(("The patient has been extubated.", "Interval extubation.")), (), (pf.kind,))
        if pf.kind in DEVICE_KINDS:
            np_ = self.device_words(pf)[0]
            text = self.pick((f"The {np_} has been removed.", f"Interval removal of the {np_}.",
                              f"The previously seen {np_} has been removed."))
            return _st(text, ((SD, A),), (pf.kind,))
        bare = self.spec(pf).bare
        the = _the(bare)
        if pf.kind in ("cardiomegaly", "enlarged_cardiomediastinum", "nodule", "mass", "pleural_thickening",
                       "rib_fracture"):
            text = self.pick((f"The previously described {bare.text} is no longer seen.",
                              f"The {bare.text} seen on the prior study is no longer visualized."))
        elif pf.report == "uncertain":
            text = self.pick((f"The previously questioned {bare.text} is no longer seen.",
                              f"Previously questioned {bare.text} is not seen on the current study."))
        else:
            text = self.pick((f"Previously seen {bare.text} {'have' if bare.number == 'pl' else 'has'} resolved.",
                              f"Interval resolution of {the}{bare.text}.",
                              f"The {bare.text} seen on the prior study {'have' if bare.number == 'pl' else 'has'} "
                              "resolved."))
        return _st(text, tuple((o, A) for o in bare.obs), (pf.kind,))

    def recommendation(self) -> Statement:
        return _st(self.pick(("Recommend chest CT for further evaluation.",
                              "Further evaluation with dedicated chest CT is recommended.",
                              "A nonurgent chest CT is recommended for further characterization.")))

    # composition -------------------------------------------------------------------------------------------------
    def write(self) -> Report:
        st, style = self.study, self.style
        has_body = style != "no_findings"
        has_concl = style != "no_impression"
        findings = list(st.findings)
        present_obs = {f.observation for f in findings if f.report == "present"}
        # A hedge on something the report already states outright adds nothing a labeler could read differently.
        hedges = [h for h in dict.fromkeys(st.hedges) if h in KIND_OBSERVATION
                  and KIND_OBSERVATION[h] not in present_obs]

        # Uncertain lung findings may take a hedged alternative as their differential ("atelectasis versus
        # pneumonia"), which states both hedges in one sentence.
        pairable = ("atelectasis", "consolidation", "pneumonia")
        pairs: dict[int, str] = {}
        for i, f in enumerate(findings):
            if f.report == "uncertain" and f.kind in pairable:
                partner = next((h for h in hedges if h in pairable and h != f.kind and h not in pairs.values()), None)
                if partner and self.chance(0.7):
                    pairs[i] = partner
        free_hedges = [h for h in hedges if h not in pairs.values()]
        self.hedges = hedges

        body: dict[str, list[Statement]] = {r: [] for r in ("devices", "lungs", "pleura", "heart", "bones")}
        concl: list[tuple[float, Statement]] = []  # (impression rank, statement)

        def rank(kind: str) -> int:
            return PRIORITY.index(kind) if kind in PRIORITY else len(PRIORITY)

        devices = [f for f in findings if f.kind in DEVICE_KINDS]
        others = [i for i, f in enumerate(findings) if f.kind not in DEVICE_KINDS]
        if has_body:
            for unit in self.units(findings, others):
                if len(unit) == 2:
                    s = self.combined(findings[unit[0]], findings[unit[1]], brief=False)
                elif unit[0] in pairs:
                    s = self.versus(findings[unit[0]], pairs[unit[0]])
                else:
                    s = self.describe(findings[unit[0]], brief=False)
                body[REGION_OF[findings[unit[0]].kind]].append(s)
            for f in devices:
                body["devices"].append(self.describe(f, brief=False))
            for h in free_hedges:
                if not has_concl or self.chance(0.6):
                    body[REGION_OF.get(h, "lungs")].append(self.hedge(h))
        if has_concl:
            brief = has_body
            for unit in self.units(findings, others):
                kind = findings[unit[0]].kind
                if len(unit) == 2:
                    s = self.combined(findings[unit[0]], findings[unit[1]], brief)
                elif unit[0] in pairs:
                    s = self.versus(findings[unit[0]], pairs[unit[0]])
                else:
                    s = self.describe(findings[unit[0]], brief)
                concl.append((rank(kind), s))
            dev_rank = -1 if self.chance(0.4) else len(PRIORITY)
            if brief and len(devices) >= 2 and all(f.report == "present" for f in devices) and self.chance(0.5):
                concl.append((dev_rank, self.devices_summary(devices)))
            else:
                concl += [(dev_rank, self.describe(f, brief)) for f in devices]
            for h in free_hedges:
                concl.append((len(PRIORITY) - 0.5, self.hedge(h)))  # after what is seen, before trailing devices
            if any(f.kind in ("nodule", "mass") for f in findings) and self.chance(0.5):
                concl.append((len(PRIORITY) + 2, self.recommendation()))
        concl.sort(key=lambda t: t[0])

        # Observations the report calls present or possible: never negated anywhere in it.
        active = {f.observation for f in findings} | {KIND_OBSERVATION[h] for h in hedges}
        if any(f.kind in PARENCHYMAL for f in findings):
            active.add(LO)
        for s in [s for v in body.values() for s in v] + [s for _, s in concl]:
            active |= {m.observation for m in s.mentions if m.certainty != A}
        self.active = active

        resolved = self.resolved_findings()
        if has_body:
            for pf in resolved:
                body[REGION_OF[pf.kind]].append(self.resolved(pf))
        if has_concl:
            for pf in resolved:
                if self.chance(0.6) or not has_body:
                    concl.append((len(PRIORITY) + 1, self.resolved(pf)))

        body_list = self.body_with_negatives(body) if has_body else []
        concl_list = self.conclusion_with_negatives([s for _, s in sorted(concl, key=lambda t: t[0])], devices) \
            if has_concl else []
        return self.render(body_list, concl_list)

    def units(self, findings: list[Finding], idx: list[int]) -> list[tuple[int, ...]]:
        """Findings to state, one or two per sentence (the pairs that radiologists tend to say together)."""
        used: set[int] = set()
        out: list[tuple[int, ...]] = []
        for i in idx:
            if i in used:
                continue
            f = findings[i]
            partner = None
            if f.report == "present" and self.change_of(f) is None:
                want = {"effusion": "atelectasis", "cardiomegaly": "edema"}.get(f.kind)
                for j in idx:
                    g = findings[j]
                    if j in used or j == i or g.kind != want or g.report != "present" or self.change_of(g):
                        continue
                    if want == "atelectasis" and (g.location != "base" or g.side != f.side):
                        continue
                    if want == "edema" and g.side in ("left", "right"):
                        continue
                    partner = j
                    break
            if partner is not None and self.chance(0.4):
                out.append((i, partner))
                used |= {i, partner}
            else:
                out.append((i,))
                used.add(i)
        return out

    def resolved_findings(self) -> list[Finding]:
        """Prior findings absent now whose observation the report does not otherwise assert."""
        if self.prior is None:
            return []
        now = {f.kind for f in self.study.findings}
        if now & {"consolidation", "pneumonia"}:
            now |= {"consolidation", "pneumonia"}  # a consolidation that became a pneumonia has not resolved
        out, seen = [], set()
        for pf in self.prior.findings:
            if pf.kind in now or pf.kind in seen or (pf.observation in self.active and pf.kind != "et_tube"):
                continue
            seen.add(pf.kind)
            out.append(pf)
        return out

    def allowed(self, blocks: frozenset[str], negates: tuple[str, ...], negated: set[str]) -> bool:
        return not (blocks & self.active) and not (set(negates) & negated)

    def body_with_negatives(self, body: dict[str, list[Statement]]) -> list[list[Statement]]:
        """Findings in reading order with pertinent negatives per region; returns paragraphs."""
        normal = not (self.active - {SD})
        negated: set[str] = {m.observation for v in body.values() for s in v for m in s.mentions
                             if m.certainty == A}
        order = ["lungs", "pleura", "heart", "bones"] if self.chance(0.5) else ["heart", "lungs", "pleura", "bones"]
        p_region = {"lungs": 1.0, "pleura": 1.0, "heart": 1.0, "bones": 0.4} if normal else \
            {"lungs": 0.55, "pleura": 0.65, "heart": 0.6, "bones": 0.15}
        out: dict[str, list[Statement]] = {k: list(v) for k, v in body.items()}
        out["lungs"] = self.technical_remarks() + out["lungs"]
        combo_done = False
        if not body["lungs"] and not body["pleura"] and self.chance(0.3):
            cands = [n for n in _NEGATIVES if n[0] == "combo" and self.allowed(n[3], n[2], negated)]
            if cands:
                _, text, neg, _ = self.pick(cands)
                out["pleura"].append(_st(text, tuple((o, A) for o in neg)))
                negated |= set(neg)
                combo_done = True
        for region in order:
            if combo_done and region in ("lungs", "pleura"):
                continue
            if not self.chance(p_region[region]):
                continue
            s = self.negative(region, negated, otherwise=any(body.values()))
            if s is not None:
                out[region].append(s)
        if all(not out[r] for r in order) or (normal and not negated):
            s = self.negative("pleura", negated) or self.negative("heart", negated)
            if s is not None:
                out["pleura"].append(s)
        regions = ["devices"] + order
        paragraphs: list[list[Statement]] = [[]]
        for r in regions:
            if out[r] and paragraphs[-1] and (r == "devices" or self.chance(0.2)):
                paragraphs.append([])
            paragraphs[-1].extend(out[r])
            if r == "devices" and out[r] and self.chance(0.5):
                paragraphs.append([])
        return [p for p in paragraphs if p]

    def negative(self, region: str, negated: set[str], otherwise: bool = False) -> Statement | None:
        if region == "heart" and CM not in self.active and self.study.ctr >= 0.47 and self.chance(0.5):
            negated.add(CM)
            return _st(self.pick(("Heart size is top normal.", "Heart size is at the upper limit of normal.")),
                       ((CM, A),))
        cands = [n for n in _NEGATIVES if n[0] == region and self.allowed(n[3], n[2], negated)]
        if region == "lungs" and otherwise and not (_LUNGS_BUSY & self.active):
            cands.append(("lungs", "The lungs are otherwise clear.", (), frozenset()))
        if not cands:
            return None
        _, text, neg, _ = self.pick(cands)
        negated |= set(neg)
        return _st(text, tuple((o, A) for o in neg))

    def technical_remarks(self) -> list[Statement]:
        """What the acquisition itself looks like: lung volumes, rotation, body habitus (no observations)."""
        frontal = next((im for im in self.study.images if im.view in FRONTAL_VIEWS), None)
        out = []
        if frontal is not None:
            if frontal.pose.inspiration < 8.6 and self.chance(0.6):
                out.append(_st(self.pick(("Lung volumes are low.", "Low lung volumes.",
                                          "The examination is limited by low lung volumes."))))
            elif frontal.pose.inspiration > 10.4 and self.chance(0.3):
                out.append(_st("The lungs are well expanded."))
            if abs(frontal.pose.rotation) > 3.0 and self.chance(0.5):
                out.append(_st(self.pick(("The patient is slightly rotated.", "Mild rotation of the patient."))))
        if self.anatomy.soft_tissue > 0.85 and self.chance(0.4):
            out.append(_st("Overlying soft tissue limits evaluation of the lung bases."))
        return out

    def conclusion_with_negatives(self, concl: list[Statement], devices: list[Finding]) -> list[Statement]:
        negated = {m.observation for s in concl for m in s.mentions if m.certainty == A}
        abnormal = bool(self.active - {SD})
        out = list(concl)
        if not abnormal:
            text, neg = self.pick([(t, n) for t, n, blocks in _NORMAL_IMPRESSIONS if not (blocks & self.active)])
            out.append(_st(text, tuple((o, A) for o in neg)))
            negated |= set(neg)
            if self.chance(0.25):
                s = self.impression_negative(negated)
                if s is not None:
                    out.append(s)
            if self.prior is not None and self.chance(0.4):
                out.append(_st(self.pick(("No significant interval change.", "No change from the prior study."))))
            return out
        placed = any(self.change_of(f) == "new" or self.prior is None for f in devices
                     if f.kind in ("central_line", "picc", "et_tube"))
        if placed and PX not in self.active and PX not in negated and self.chance(0.7):
            out.append(_st("No pneumothorax.", ((PX, A),)))
            negated.add(PX)
        elif self.chance(0.45):
            s = self.impression_negative(negated)
            if s is not None:
                out.append(s)
        elif self.chance(0.3):
            out.append(_st("Otherwise, no acute cardiopulmonary process."))
        if not out:  # nothing to say would leave an empty impression, which the sectioner would drop
            out.append(_st("No acute cardiopulmonary process."))
        return out

    def impression_negative(self, negated: set[str]) -> Statement | None:
        cands = [(t, neg) for t, neg, blocks in _IMPRESSION_NEGATIVES if self.allowed(blocks, neg, negated)
                 and (self.prior is not None or " new " not in t)]
        if not cands:
            return None
        text, neg = self.pick(cands)
        negated |= set(neg)
        return _st(text, tuple((o, A) for o in neg))

    # header sections ---------------------------------------------------------------------------------------------
    def reason(self) -> tuple[str, tuple]:
        """(complaint, question, mentions) for the indication."""
        kinds = [f.kind for f in self.study.findings if f.kind in _REASONS]
        if kinds and self.chance(0.75):
            complaint, questions = _REASONS[self.pick(kinds)]
        else:
            generic = [r for r in _GENERIC_REASONS if not (self.portable and r[0].startswith("preoperative"))]
            complaint, questions = self.pick(generic)
        q, ments = self.pick(questions)
        return complaint, q, ments

    def indication(self) -> Statement:
        sex = self.anatomy.sex
        noun = self.pick(("woman", "female")) if sex == "F" else self.pick(("man", "male"))
        complaint, q, ments = self.reason()
        text = self.pick((f"___ year old {noun} with {complaint}  // {q}",
                          f"History: ___{sex} with {complaint}",
                          f"___-year-old {noun} with {complaint}.  {q[:1].upper()}{q[1:]}."
                          if not q.endswith("?") else f"___-year-old {noun} with {complaint}, {q}"))
        if text.startswith("History:") and "//" not in text:
            ments = ()  # the question is not part of this wording
        return Statement(text, tuple(Mention(o, c) for o, c in ments))

    def legacy_history(self) -> tuple[Statement, Statement]:
        sex = self.anatomy.sex
        noun = "female" if sex == "F" else "male"
        complaint, q, ments = self.reason()
        hist = Statement(f"___-year-old {noun} with {complaint}.")
        q = q.rstrip("?")
        reason = Statement(self.pick((f"{q[:1].upper()}{q[1:]}.", f"{q[:1].upper()}{q[1:]}?")),
                           tuple(Mention(o, c) for o, c in ments))
        return hist, reason

    def views(self) -> tuple[str, bool]:
        """(frontal projection, whether a lateral was taken), from the images or else the procedure name."""
        views = [im.view for im in self.study.images]
        tokens = set(re.findall(r"[A-Z]+", self.study.procedure.upper()))
        lateral = any(v in ("LATERAL", "LL") for v in views) if views else "LAT" in tokens
        front = "AP" if self.portable or ("AP" in views and "PA" not in views) else "PA"
        return front, lateral

    def technique(self) -> str:
        front, lateral = self.views()
        if self.portable:
            return self.pick(("Portable AP chest radiograph.", "Single portable AP view of the chest.",
                              "AP portable upright view of the chest.", "Portable semi-upright AP view of the chest."))
        if lateral:
            return self.pick((f"Chest {front} and lateral", f"{front} and lateral views of the chest.",
                              "Frontal and lateral views of the chest."))
        return self.pick(("Single PA view of the chest.", "PA view of the chest.", "Chest PA"))

    def comparison(self) -> str:
        if self.prior is None:
            return self.pick(("None.", "None available.", "None."))
        portable = "PORTABLE" in self.prior.procedure.upper()
        kind = "Portable chest radiograph" if portable else "Chest radiograph"
        return self.pick(("___.", f"{kind} ___.", "Prior chest radiographs ___ and ___.", "___", f"{kind} from ___."))

    def opening(self) -> Statement:
        """First sentence of an old-style or headerless report: what was obtained, dates de-identified."""
        front, lateral = self.views()
        if self.portable:
            text = self.pick(("Portable AP chest radiograph ___ at ___ is submitted.",
                              "Single portable AP view of the chest obtained on ___."))
        elif lateral:
            text = self.pick((f"{front} and lateral views of the chest obtained on ___.",
                              "Frontal and lateral chest radiographs ___ are submitted."))
        else:
            text = self.pick((f"Single {front} view of the chest obtained on ___.", f"{front} chest radiograph ___."))
        if self.prior is not None:
            text = text[:-1] + self.pick((", compared to the prior study of ___.", ", compared to ___."))
        return _st(text)

    # rendering ---------------------------------------------------------------------------------------------------
    def para_lines(self, statements: list[Statement], prefix: str = "") -> list[str]:
        return _wrap(self.sep.join(s.text for s in statements), prefix)

    def render(self, body: list[list[Statement]], concl: list[Statement]) -> Report:
        style = self.style
        sections: dict[str, list[Statement]] = {}
        lines: list[str] = []

        def block(name: str, header: str, statements: list[Statement], inline: bool = True) -> None:
            """A section: 'HEADER:  text' on one line, or the header alone, a blank line and the text below."""
            sections[name] = statements
            if lines[-1] != TITLE:
                lines.append(BLANK)
            if inline:
                lines.extend(self.para_lines(statements, f"{header}:  "))
            else:
                lines.extend([f" {header}:", BLANK])

        def findings_block(header: str) -> None:
            block("findings", header, [s for p in body for s in p], inline=False)
            for k, p in enumerate(body):
                lines.extend(([BLANK] if k else []) + self.para_lines(p))

        def impression_block(header: str) -> None:
            block("impression", header, concl, inline=False)
            if len(concl) >= 2 and self.chance(0.3):  # a numbered list, continuation lines hanging
                for k, s in enumerate(concl, 1):
                    lines.extend(_wrap(s.text, f"{k}. ", " " * len(f"{k}. ")))
            else:
                lines.extend(self.para_lines(concl))

        if style == "headerless":
            first = [self.opening()] + [s for p in body for s in p]
            sections["full report"] = first
            sections["last_paragraph"] = concl
            lines = [TITLE] + self.para_lines(first) + [BLANK] + self.para_lines(concl)
            return self.finish(lines, sections, "last_paragraph")

        if style == "wet_read":
            wet = self.wet_read()
            sections["wet read"] = wet
            lines += [f" WET READ: ___ ___ ___ {self.time()}"] + self.para_lines(wet) + [RULE]
        elif style == "addendum":
            add = self.addendum()
            sections["addendum"] = add
            lines += [ADDENDUM_TITLE, " ADDENDUM:", BLANK] + self.para_lines(add) + [RULE]
        lines.append(TITLE)

        if style == "legacy":
            if self.chance(0.5):
                lines.append(" " + self.study.procedure)  # old reports open with a title line (no colon)
            hist, reason = self.legacy_history()
            block("history", "HISTORY", [hist])  # always: it carries the de-identified age
            if self.chance(0.65):
                block("indication", "REASON FOR EXAMINATION", [reason])
            flat = [s for p in body for s in p]
            if self.prior is not None:
                if self.chance(0.7):
                    block("comparison", "COMPARISON", [Statement(self.comparison())])
                else:
                    flat.insert(0, _st("Comparison is made to the prior study of ___."))
            if self.chance(0.6):
                flat.insert(0, self.opening_legacy())
            block("findings", "FINDINGS", flat, inline=True)
            block("impression", "IMPRESSION", concl, inline=True)
            return self.finish(lines, sections, "impression")

        typo = self.pick(sorted(TYPO_HEADERS)) if style == "typo" else None
        hdr = {name: (self.pick(TYPO_HEADERS[name]) if name == typo else name.upper())
               for name in ("findings", "impression", "comparison")}
        block("examination", "EXAMINATION", [Statement(self.study.procedure)])
        block("indication", "INDICATION", [self.indication()])
        block("technique", "TECHNIQUE", [Statement(self.technique())])
        block("comparison", hdr["comparison"], [Statement(self.comparison())])
        if style != "no_findings":
            findings_block(hdr["findings"])
        if style != "no_impression":
            impression_block(hdr["impression"])
            urgent = any(f.kind == "pneumothorax" and f.report == "present" and self.change_of(f) in (None, "new",
                                                                                                       "increased")
                         for f in self.study.findings)
            if urgent and self.chance(0.5):
                block("notification", "NOTIFICATION", [_st(
                    f"The findings were communicated by telephone to Dr. ___ by Dr. ___ at {self.time()} on ___.")])
        label = "findings" if style == "no_impression" else "impression"
        return self.finish(lines, sections, label)

    def opening_legacy(self) -> Statement:
        front, lateral = self.views()
        if self.portable:
            return _st(self.pick(("Single portable AP view of the chest was obtained.",
                                  "A portable AP upright radiograph of the chest was obtained.")))
        if lateral:
            return _st(self.pick((f"{front} and lateral views of the chest were obtained.",
                                  "Frontal and lateral views of the chest were obtained.")))
        return _st(f"A single {front} view of the chest was obtained.")

    def finish(self, lines: list[str], sections: dict[str, list[Statement]], label: str) -> Report:
        text = "\n".join(lines) + "\n"
        stmts = sections.get(label, [])
        labels = aggregate(m for s in stmts for m in s.mentions)
        return Report(text, sections, label, labels)

    def wet_read(self) -> list[Statement]:
        """The resident's preliminary read: the main findings in a few words."""
        out = []
        important = sorted((f for f in self.study.findings if f.kind not in DEVICE_KINDS),
                           key=lambda f: PRIORITY.index(f.kind))
        for f in important[:2]:
            out.append(self.describe_within(f))
        if not out and self.hedges:
            out.append(self.hedge(self.hedges[0]))
        if not out and not (self.active - {SD}):
            out.append(_st(self.pick(("No acute cardiopulmonary process.", "No acute intrathoracic process."))))
        negated: set[str] = set()
        if self.chance(0.5):
            s = self.impression_negative(negated)
            if s is not None:
                out.append(s)
        if not out:
            out.append(_st("Findings as above; see final report."))
        return out

    def addendum(self) -> list[Statement]:
        """A note added after signing: a communication, a recommendation or a second look."""
        main = next((f for f in sorted(self.study.findings, key=lambda f: PRIORITY.index(f.kind))
                     if f.kind not in DEVICE_KINDS), None)
        t = self.time()
        opts: list[Statement] = [_st(f"These findings were communicated to Dr. ___ by telephone at {t} on ___."),
                                 _st("The study was reviewed with the attending radiologist, who agrees with the "
                                     "impression below.")]
        if main is not None:
            np_ = self.pick(self.spec(main).nps)
            cert = P if main.report == "present" else U
            poss = "possible " if cert == U else ""
            was = "were" if np_.number == "pl" else "was"
            opts.append(_st(f"The {poss}{np_.text} {was} discussed with Dr. ___ by telephone at {t} on ___.",
                            tuple((o, cert) for o in np_.obs), (main.kind,)))
            if main.kind in ("nodule", "mass"):
                opts.append(_st(f"Recommend chest CT for further evaluation of the {poss}{np_.text}.",
                                tuple((o, cert) for o in np_.obs), (main.kind,)))
        if EF not in self.active and "LATERAL" in {im.view for im in self.study.images}:
            opts.append(_st("On review of the lateral view, there is no pleural effusion.", ((EF, A),)))
        first = self.pick(opts)
        out = [first]
        if self.chance(0.3):
            out.append(_st("No other change to the report."))
        return out


_PRESENT_SUFFIX = {"new": (", new since the prior study", ", new compared to the prior exam"),
                   "unchanged": (", unchanged from the prior study", ", unchanged"),
                   "increased": (", increased since the prior study", ", larger than on the prior exam"),
                   "decreased": (", decreased since the prior study", ", smaller than on the prior exam")}
_UNCERTAIN_SUFFIX = {"new": (", new since the prior study", ", new compared to the prior exam"),
                     "unchanged": (", unchanged from the prior study", ", similar to the prior exam"),
                     "increased": (", more conspicuous than on the prior study",),
                     "decreased": (", less conspicuous than on the prior study",)}
_CHANGE_PREFIX = {"new": "New", "unchanged": "Unchanged", "increased": "Increased", "decreased": "Decreased"}
