"""Canonical vocabularies of the anatomy-pathology prompting module: pathology terms and anatomy terms.

Pure data plus small lookup helpers; reads and writes nothing. The findings extractor (findings.py) compiles its
matchers from these tables, so a synonym added here is recognised everywhere.

Pathologies: canonical term -> PathologyTerm. `synonyms` are surface forms in lower case, singular; the plural of the
last word is generated (effusion -> effusions, opacity -> opacities, pneumothorax -> pneumothoraces), hyphens and
spaces are interchangeable, and "the" inside a form may be followed by a side word ("blunting of the left
costophrenic angle"). `signs` are indirect surface forms (blunting of a costophrenic angle for an effusion, volume
loss for atelectasis): they count as a mention of the term unless the same sentence names the term outright, in
which case they are the evidence for that mention, not a second one ("blunting of the left costophrenic angle may
reflect a small effusion" is one uncertain effusion). `observation` is the CheXpert observation the term is labelled
as (None: not one of the 14). "heart failure" carries Cardiomegaly because the CheXpert labeler reads a heart-failure
mention as an *uncertain* cardiomegaly (labels.py applies that rule).

Anatomy: canonical term -> AnatomyTerm. Lateral structures come in three canonical forms: "right X", "left X" and the
plural for both sides ("lung bases", "apices", "costophrenic angles", "hila", "upper lobes", "pleural spaces", "ribs");
the bare singular ("lung base", "apex", "rib") is used when no side is written. Canonical choices (documented here
because other modules rely on them):
- adjectives fold to their noun: basilar/basal -> lung base, apical -> apex, hilar -> hilum, lingular -> lingula;
  bibasilar/bibasal -> lung bases, biapical -> apices, bihilar -> hila; "lower lung (zone)" -> lung base.
- ribs fold number and position: "left sixth posterior rib", "6th left rib" -> "left rib" (the level is dropped).
- an effusion, pneumothorax or pleural thickening given only a side ("right-sided effusion", "effusion on the
  right") is placed in "right pleural space" by the extractor; an explicit site ("right costophrenic angle") wins.
- "heart", "cardiac silhouette", "heart size" -> heart; "mediastinum", "mediastinal contours", "cardiomediastinal
  silhouette" -> mediastinum; "aortic knob", "aortic arch" -> aorta; "superior vena cava" -> SVC.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cxrsynth.text.chexpert import OBSERVATIONS


@dataclass(frozen=True)
class PathologyTerm:
    term: str
    synonyms: tuple[str, ...]  # surface forms (lower case, singular), the term itself first
    observation: str | None  # CheXpert observation, or None
    kind: str  # finding | device
    signs: tuple[str, ...] = ()  # indirect surface forms (see module docstring)


@dataclass(frozen=True)
class AnatomyTerm:
    term: str
    synonyms: tuple[str, ...]  # surface forms that resolve to this term (side words included where lateral)
    region: str  # lung | pleura | heart | mediastinum | vessel | airway | abdomen | diaphragm | bone | chest wall
    side: str | None = None  # left | right | bilateral | None


# ----------------------------------------------------------------------------------------------------- pathologies
_F, _D = "finding", "device"
_PATHOLOGY_TABLE: tuple[tuple[str, str | None, str, tuple[str, ...], tuple[str, ...]], ...] = (
    # term, observation, kind, synonyms, signs
    ("pleural effusion", "Pleural Effusion", _F,
     ("effusion", "pleural fluid", "fluid in the pleural space", "pleural fluid collection", "hydrothorax",
      "layering fluid", "subpulmonic effusion"),
     ("blunting of the costophrenic angle", "blunting of both costophrenic angles", "blunted costophrenic angle",
      "costophrenic angle blunting", "blunting of the costophrenic sulcus", "blunting of the cp angle")),
    ("pericardial effusion", None, _F, ("pericardial fluid",), ()),
    ("cardiomegaly", "Cardiomegaly", _F,
     ("cardiac enlargement", "enlarged heart", "heart enlargement", "enlargement of the heart",
      "enlargement of the cardiac silhouette", "enlarged cardiac silhouette", "cardiac silhouette enlargement",
      "enlarged cardiac contour", "heart is enlarged", "heart size is enlarged", "cardiac silhouette is enlarged"),
     ()),
    ("enlarged cardiomediastinum", "Enlarged Cardiomediastinum", _F,
     ("widened mediastinum", "mediastinal widening", "widening of the mediastinum", "mediastinal enlargement",
      "enlarged cardiomediastinal silhouette", "enlargement of the cardiomediastinal silhouette",
      "widened mediastinal contour", "widened superior mediastinum", "widening of the superior mediastinum",
      "enlarged cardiomediastinal contour", "mediastinum is widened", "cardiomediastinal silhouette is enlarged"),
     ()),
    ("opacity", "Lung Opacity", _F,
     ("opacification", "opacified", "infiltrate", "infiltration", "infiltrative process", "airspace opacity",
      "air space opacity", "airspace disease", "air space disease", "haziness", "hazy opacity",
      "ground glass opacity", "increased opacity", "parenchymal opacity"),
     ()),
    ("consolidation", "Consolidation", _F,
     ("consolidative opacity", "consolidative process", "consolidated", "airspace consolidation",
      "air space consolidation"),
     ()),
    ("pneumonia", "Pneumonia", _F,
     ("infection", "infectious process", "bronchopneumonia", "pneumonic process", "aspiration pneumonia"), ()),
    ("atelectasis", "Atelectasis", _F,
     ("atelectatic", "atelectatic change", "collapse", "collapsed", "lobar collapse", "subsegmental atelectasis",
      "plate-like atelectasis", "discoid atelectasis"),
     ("volume loss",)),
    ("pulmonary edema", "Edema", _F,
     ("edema", "interstitial edema", "interstitial pulmonary edema", "alveolar edema", "vascular congestion",
      "pulmonary vascular congestion", "pulmonary venous congestion", "pulmonary congestion", "congestion",
      "fluid overload", "volume overload", "edematous", "vascular engorgement", "pulmonary vascular engorgement",
      "perihilar edema", "interstitial fluid"),
     ()),
    ("pneumothorax", "Pneumothorax", _F, ("hydropneumothorax", "ptx"), ()),
    ("nodule", "Lung Lesion", _F,
     ("pulmonary nodule", "nodular opacity", "nodular density", "lung nodule"), ()),
    ("mass", "Lung Lesion", _F, ("pulmonary mass", "lung mass", "mass lesion"), ()),
    ("lesion", "Lung Lesion", _F, ("neoplasm", "tumor", "cavitary lesion", "pulmonary lesion"), ()),
    ("fracture", "Fracture", _F, ("fractured",), ()),
    ("pleural thickening", "Pleural Other", _F,
     ("thickening of the pleura", "pleural scarring", "pleural scar", "pleural parenchymal scarring"), ()),
    ("scarring", "Lung Opacity", _F, ("scar", "parenchymal scarring"), ()),
    ("fibrosis", None, _F, ("fibrotic change", "pulmonary fibrosis"), ()),
    ("emphysema", None, _F, ("emphysematous change", "emphysematous"), ()),
    ("subcutaneous emphysema", None, _F, ("subcutaneous air", "soft tissue emphysema"), ()),
    ("hyperinflation", None, _F, ("hyperinflated", "hyperexpanded", "hyperexpansion"), ()),
    ("pneumomediastinum", None, _F, (), ()),
    ("pneumoperitoneum", None, _F, ("free intraperitoneal air", "free air under the diaphragm"), ()),
    ("hernia", None, _F, ("hiatal hernia", "hiatus hernia"), ()),
    ("calcification", None, _F, ("calcified", "calcific density"), ()),
    ("granuloma", None, _F, ("calcified granuloma", "granulomatous disease"), ()),
    ("heart failure", "Cardiomegaly", _F,
     ("congestive heart failure", "chf", "cardiac failure", "congestive failure"), ()),
    # devices
    ("endotracheal tube", "Support Devices", _D, ("et tube", "ett", "endotracheal", "et-tube"), ()),
    ("tracheostomy tube", "Support Devices", _D, ("tracheostomy", "trach tube", "tracheostomy cannula"), ()),
    ("nasogastric tube", "Support Devices", _D,
     ("ng tube", "ngt", "nasogastric", "enteric tube", "feeding tube", "orogastric tube", "og tube", "dobhoff",
      "dobhoff tube", "nasoenteric tube", "nasogastric catheter", "gastric tube"), ()),
    ("central venous catheter", "Support Devices", _D,
     ("central line", "central venous line", "cvc", "ij line", "ij catheter", "ij central line",
      "ij central venous catheter", "internal jugular line", "internal jugular catheter",
      "internal jugular central line", "internal jugular central venous catheter", "internal jugular venous catheter",
      "subclavian line", "subclavian catheter", "subclavian central line", "subclavian central venous catheter",
      "subclavian venous catheter", "triple lumen catheter", "dialysis catheter", "hemodialysis catheter",
      "central catheter", "introducer sheath"), ()),
    ("picc", "Support Devices", _D,
     ("picc line", "picc catheter", "peripherally inserted central catheter", "upper extremity picc"), ()),
    ("pulmonary artery catheter", "Support Devices", _D, ("swan-ganz catheter", "swan ganz", "swan-ganz"), ()),
    ("pacemaker", "Support Devices", _D,
     ("pacer", "pacer device", "pacemaker device", "icd", "aicd", "defibrillator", "pacing leads", "pacer leads",
      "pacemaker leads", "pacemaker generator", "pacing wires", "leads", "cardiac device", "pacemaker/icd",
      "pacemaker/aicd"), ()),
    ("chest tube", "Support Devices", _D,
     ("pleural drain", "pigtail catheter", "thoracostomy tube", "pleural catheter", "chest drain",
      "pleural tube"), ()),
    ("sternotomy wires", "Support Devices", _D,
     ("median sternotomy wires", "sternal wires", "sternotomy", "median sternotomy", "sternal sutures",
      "sternotomy sutures"), ()),
    ("surgical clips", "Support Devices", _D,
     ("clips", "surgical clip", "cholecystectomy clips", "vascular clips"), ()),
    ("port", "Support Devices", _D,
     ("port-a-cath", "portacath", "mediport", "chest port", "chest wall port", "infusion port", "power port"), ()),
    ("intra-aortic balloon pump", "Support Devices", _D, ("iabp", "intraaortic balloon pump"), ()),
    ("support device", "Support Devices", _D,
     ("support devices", "lines and tubes", "tubes and lines", "lines/tubes", "monitoring devices",
      "monitoring and support devices", "catheter", "tube", "drain"), ()),
)

PATHOLOGIES: dict[str, PathologyTerm] = {
    term: PathologyTerm(term, (term,) + syn, obs, kind, signs) for term, obs, kind, syn, signs in _PATHOLOGY_TABLE}

# Surface forms naming only a pacemaker's leads: dropped where the same sentence names the pacemaker itself.
LEAD_SURFACES = frozenset({"leads", "pacing leads", "pacer leads", "pacemaker leads", "pacing wires"})

_IRREGULAR_PLURAL = {"pneumothorax": "pneumothoraces", "hydropneumothorax": "hydropneumothoraces",
                     "atelectasis": "atelectases", "fibrosis": "fibroses", "hilum": "hila", "apex": "apices",
                     "sulcus": "sulci", "hemithorax": "hemithoraces", "ett": "etts", "picc": "piccs"}


def plural(word: str) -> str:
    """English plural of a (medical) noun, good enough for the vocabulary's head words."""
    if word in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def surface_variants(surface: str) -> tuple[str, ...]:
    """The surface form and the plural of its last word ("pleural effusion" -> + "pleural effusions")."""
    words = surface.split(" ")
    last = words[-1]
    if last.endswith(("ed", "ic", "ous", "ive", "al", "ing", "ar")) or last in ("endotracheal", "nasogastric"):
        return (surface,)
    return (surface, " ".join(words[:-1] + [plural(last)]))


_SPACES = re.compile(r"[\s\-]+")
_THE_SIDE = re.compile(r"\bthe (?:right|left|bilateral|both) ")


def normalize_surface(text: str) -> str:
    """Lower case, hyphens and runs of white space to one space, and a side word after "the" dropped."""
    return _THE_SIDE.sub("the ", _SPACES.sub(" ", text.lower()).strip())


_SURFACE_TO_TERM: dict[str, str] = {}
for _t in PATHOLOGIES.values():
    for _s in _t.synonyms + _t.signs:
        for _v in surface_variants(_s):
            _SURFACE_TO_TERM.setdefault(normalize_surface(_v), _t.term)


def pathology_surfaces() -> list[tuple[str, str, bool]]:
    """(normalised surface form, canonical term, is a sign) for every form the extractor should match."""
    out = []
    for t in PATHOLOGIES.values():
        for s in t.synonyms:
            out += [(normalize_surface(v), t.term, False) for v in surface_variants(s)]
        for s in t.signs:
            out += [(normalize_surface(v), t.term, True) for v in surface_variants(s)]
    return out


# ------------------------------------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class _Base:
    """One anatomical structure: its canonical singular/plural, region, whether it has sides, and surface forms."""

    sing: str
    plur: str | None
    region: str
    lateral: bool
    nouns: tuple[str, ...]  # singular surface forms
    nouns_pl: tuple[str, ...] = ()  # plural surface forms (both sides when no side is written)
    adjs: tuple[str, ...] = ()  # adjectives meaning "of one X" (basilar)
    adjs_bi: tuple[str, ...] = ()  # adjectives meaning "of both X" (bibasilar)
    fixed_side: str | None = None  # the only side the structure has (middle lobe: right, lingula: left)


_BASES: tuple[_Base, ...] = (
    _Base("upper lobe", "upper lobes", "lung", True, ("upper lobe",), ("upper lobes",)),
    _Base("right middle lobe", None, "lung", False, ("middle lobe",), (), ("middle lobe",), (), "right"),
    _Base("lower lobe", "lower lobes", "lung", True, ("lower lobe",), ("lower lobes",)),
    _Base("lingula", None, "lung", False, ("lingula", "lingular segment"), (), ("lingular",), (), "left"),
    _Base("upper lung", "upper lungs", "lung", True,
          ("upper lung", "upper lung zone", "upper zone", "upper lung field", "upper hemithorax"),
          ("upper lungs", "upper lung zones", "upper zones", "upper lung fields")),
    _Base("mid lung", "mid lungs", "lung", True,
          ("mid lung", "midlung", "middle lung", "mid lung zone", "mid zone", "mid lung field", "middle lung zone"),
          ("mid lungs", "midlungs", "mid lung zones", "mid zones", "mid lung fields")),
    _Base("lung base", "lung bases", "lung", True,
          ("lung base", "base", "lower lung", "lower lung zone", "lower zone", "lower lung field",
           "lower hemithorax", "basilar region", "basal region"),
          ("lung bases", "bases", "lower lungs", "lower lung zones", "lower zones", "lower lung fields"),
          ("basilar", "basal", "basally"), ("bibasilar", "bibasal", "bibasally")),
    _Base("apex", "apices", "lung", True, ("apex", "lung apex", "apical region", "apical area"),
          ("apices", "lung apices"), ("apical", "apically"), ("biapical",)),
    _Base("costophrenic angle", "costophrenic angles", "pleura", True,
          ("costophrenic angle", "costophrenic sulcus", "cp angle", "costophrenic recess"),
          ("costophrenic angles", "costophrenic sulci", "cp angles", "costophrenic recesses")),
    _Base("pleural space", "pleural spaces", "pleura", True,
          ("pleural space", "pleural surface", "pleura", "pleural cavity"),
          ("pleural spaces", "pleural surfaces", "pleurae", "pleural cavities")),
    _Base("hemithorax", "hemithoraces", "lung", True, ("hemithorax",), ("hemithoraces",)),
    _Base("lung", "lungs", "lung", True, ("lung", "lung field"), ("lungs", "lung fields")),
    _Base("hilum", "hila", "lung", True, ("hilum", "hilus", "hilar region"), ("hila", "hilar regions"),
          ("hilar",), ("bihilar",)),
    _Base("perihilar region", "perihilar regions", "lung", True, ("perihilar region", "perihilar area"),
          ("perihilar regions",), ("perihilar",), ()),
    _Base("retrocardiac", None, "lung", False,
          ("retrocardiac region", "retrocardiac area", "retrocardiac space", "behind the heart"), (),
          ("retrocardiac",)),
    _Base("mediastinum", None, "mediastinum", False,
          ("mediastinum", "superior mediastinum", "cardiomediastinal silhouette", "cardiomediastinal contour",
           "mediastinal contour", "mediastinal silhouette", "paratracheal region"), (),
          ("mediastinal", "cardiomediastinal", "paratracheal")),
    _Base("heart", None, "heart", False,
          ("heart", "cardiac silhouette", "heart size", "cardiac size", "cardiac contour", "heart shadow",
           "cardiac shadow"), (), ("cardiac",)),
    _Base("heart border", "heart borders", "heart", True, ("heart border", "cardiac border"),
          ("heart borders", "cardiac borders")),
    _Base("atrium", None, "heart", True, ("atrium",), ()),
    _Base("ventricle", None, "heart", True, ("ventricle",), ()),
    _Base("aorta", None, "vessel", False,
          ("aorta", "aortic knob", "aortic arch", "thoracic aorta", "descending aorta", "ascending aorta",
           "aortic contour", "aortic knuckle"), (), ("aortic",)),
    _Base("SVC", None, "vessel", False, ("svc", "superior vena cava", "superior vena cava"), ()),
    _Base("cavoatrial junction", None, "vessel", False, ("cavoatrial junction", "cavo-atrial junction"), ()),
    _Base("jugular vein", "jugular veins", "vessel", True, ("jugular vein", "internal jugular vein"),
          ("jugular veins", "internal jugular veins")),
    _Base("subclavian vein", "subclavian veins", "vessel", True, ("subclavian vein",), ("subclavian veins",)),
    _Base("brachiocephalic vein", "brachiocephalic veins", "vessel", True,
          ("brachiocephalic vein", "innominate vein"), ("brachiocephalic veins", "innominate veins")),
    _Base("pulmonary artery", "pulmonary arteries", "vessel", True, ("pulmonary artery",),
          ("pulmonary arteries",)),
    _Base("trachea", None, "airway", False, ("trachea", "thoracic trachea"), (), ("tracheal",)),
    _Base("carina", None, "airway", False, ("carina",), (), ("carinal",)),
    _Base("main bronchus", "main bronchi", "airway", True,
          ("main bronchus", "mainstem bronchus", "main stem bronchus", "bronchus"),
          ("main bronchi", "mainstem bronchi", "bronchi")),
    _Base("stomach", None, "abdomen", False, ("stomach", "gastric fundus", "fundus", "gastric body"), (),
          ("gastric",)),
    _Base("abdomen", None, "abdomen", False, ("abdomen", "upper abdomen"), (), ("abdominal",)),
    _Base("diaphragm", None, "diaphragm", False, ("diaphragm",), (), ("diaphragmatic",)),
    _Base("hemidiaphragm", "hemidiaphragms", "diaphragm", True, ("hemidiaphragm",), ("hemidiaphragms",)),
    _Base("rib", "ribs", "bone", True, ("rib",), ("ribs",)),
    _Base("clavicle", "clavicles", "bone", True, ("clavicle", "clavicular head"), ("clavicles", "clavicular heads")),
    _Base("scapula", "scapulae", "bone", True, ("scapula",), ("scapulae", "scapulas")),
    _Base("humerus", "humeri", "bone", True, ("humerus", "humeral head", "shoulder"), ("humeri", "shoulders")),
    _Base("spine", None, "bone", False,
          ("spine", "thoracic spine", "vertebral body", "vertebra", "thoracic vertebra"),
          (), ("spinal", "vertebral")),
    _Base("sternum", None, "bone", False, ("sternum",), (), ("sternal",)),
    _Base("chest wall", "chest walls", "chest wall", True, ("chest wall",), ("chest walls",)),
)
# Lobe abbreviations: (surface, canonical, side)
_ABBREVIATIONS = {"rul": ("right upper lobe", "right"), "rml": ("right middle lobe", "right"),
                  "rll": ("right lower lobe", "right"), "lul": ("left upper lobe", "left"),
                  "lll": ("left lower lobe", "left")}
# Words that may stand between a side word and the structure without changing the canonical term.
_QUALIFIERS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
               "eleventh", "twelfth", "1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th", "9th", "10th", "11th",
               "12th", "anterior", "posterior", "lateral", "medial", "anterolateral", "posterolateral", "proximal",
               "distal", "mid", "lower", "upper", "inferior", "superior")


def _canonical(base: _Base, side: str | None, plural_form: bool) -> tuple[str, str | None]:
    """(canonical term, side) of a structure given the side written and whether the form was plural."""
    if base.fixed_side is not None:
        return base.sing, base.fixed_side
    if not base.lateral:
        return base.sing, None
    if side == "bilateral" or (plural_form and side is None):
        return (base.plur or base.sing), "bilateral"
    if side in ("left", "right"):
        return f"{side} {base.sing}", side
    return base.sing, None


def _build_anatomy() -> dict[str, AnatomyTerm]:
    syn: dict[str, list[str]] = {}
    meta: dict[str, tuple[str, str | None]] = {}

    def add(canon: str, side: str | None, region: str, surface: str) -> None:
        syn.setdefault(canon, [])
        if surface not in syn[canon]:
            syn[canon].append(surface)
        meta[canon] = (region, side)

    for b in _BASES:
        for n in b.nouns + b.adjs:
            c, s = _canonical(b, None, False)
            add(c, s, b.region, n)
            if b.lateral:
                for sw in ("right", "left"):
                    c, s = _canonical(b, sw, False)
                    add(c, s, b.region, f"{sw} {n}")
        for n in b.nouns_pl + b.adjs_bi:
            c, s = _canonical(b, None, True)
            add(c, s, b.region, n)
        if b.lateral:
            for n in b.nouns + b.adjs:
                c, s = _canonical(b, "bilateral", False)
                add(c, s, b.region, f"bilateral {n}")
    for ab, (canon, side) in _ABBREVIATIONS.items():
        add(canon, side, "lung", ab)
    return {c: AnatomyTerm(c, tuple(v), meta[c][0], meta[c][1]) for c, v in syn.items()}


ANATOMY: dict[str, AnatomyTerm] = _build_anatomy()

# Surface form (normalised) -> (base, plural form?) for the anatomy matcher.
_ANAT_FORMS: dict[str, tuple[_Base, bool]] = {}
for _b in _BASES:
    for _n in _b.nouns + _b.adjs:
        _ANAT_FORMS.setdefault(normalize_surface(_n), (_b, False))
    for _n in _b.nouns_pl + _b.adjs_bi:
        _ANAT_FORMS.setdefault(normalize_surface(_n), (_b, True))


def phrase_regex(phrases) -> str:
    """A regex matching any of the (normalised, space-separated) phrases as whole words, longest first, where words
    may be separated by spaces, newlines or hyphens and "the" may be followed by a side word. Built as a word trie so
    that matching costs little more than one phrase."""
    root: dict = {}
    for p in phrases:
        node = root
        for w in p.split(" "):
            node = node.setdefault(w, {})
        node[""] = True

    def emit(node: dict) -> str:
        alts = []
        for w in sorted((k for k in node if k), key=lambda k: (-len(k), k)):
            child = node[w]
            word = r"the(?:[\s\-]+(?:right|left|bilateral|both))?" if w == "the" else re.escape(w)
            part = word + r"(?![a-z0-9])"
            rest = emit(child) if any(k for k in child) else ""
            if rest:
                part += r"(?:[\s\-]+(?:" + rest + "))" + ("?" if "" in child else "")
            alts.append(part)
        return "|".join(alts)

    # the look-ahead lets the engine skip positions that cannot start a word
    return r"(?<![a-z0-9])(?=[a-z0-9])(?:" + emit(root) + ")"


_ANAT_CORE_RE = re.compile(phrase_regex(list(_ANAT_FORMS) + list(_ABBREVIATIONS)))
_SIDES = {"right": "right", "left": "left", "bilateral": "bilateral", "both": "bilateral"}
_QUAL_SET = frozenset(_QUALIFIERS)
_BACK_TOKEN = re.compile(r"[a-z0-9]+|,")

# Every word that can be part of an anatomy phrase (the extractor treats them as modifiers in lists).
ANATOMY_WORDS = frozenset(w for f in list(_ANAT_FORMS) + list(_QUALIFIERS) + list(_ABBREVIATIONS)
                          for w in f.split(" ")) | {"right", "left", "bilateral", "both", "sided", "right-sided",
                                                    "left-sided"}


def _resolve(core_text: str, side_word: str | None) -> tuple[str, str | None, str]:
    core = normalize_surface(core_text)
    if core in _ABBREVIATIONS:
        canon, s = _ABBREVIATIONS[core]
        return canon, s, "lung"
    base, pl = _ANAT_FORMS[core]
    canon, s = _canonical(base, _SIDES.get(side_word or ""), pl)
    return canon, s, base.region


def find_anatomy(low: str, a: int = 0, b: int | None = None) -> list[tuple[int, int, str, str | None, str]]:
    """Anatomy phrases in low[a:b] (lower-case text): (start, end, canonical term, side, region), in text order.

    A phrase is a structure's surface form, extended to the left over side words (right, left, bilateral, both,
    "right-sided") and qualifiers (ordinals, anterior/posterior/lateral, proximal/mid/distal, upper/lower, joined by
    "and" or commas): "the left sixth and seventh posterior ribs" -> (…, "left rib", "left", "bone")."""
    b = len(low) if b is None else b
    out = []
    last_end = a
    for m in _ANAT_CORE_RE.finditer(low, a, b):
        cs, ce = m.span()
        lo = max(last_end, cs - 80)
        toks = [(t.start() + lo, t.end() + lo, t.group()) for t in _BACK_TOKEN.finditer(low[lo:cs])]
        start, side, pos = cs, None, cs
        pending: list[int] = []  # positions of "and" / "," that only count when a qualifier precedes them
        for ts, te, w in reversed(toks):
            if low[te:pos].strip(" \t\n-") not in ("", ","):
                break
            if w in ("and", "through", "to", ","):
                pending.append(ts)
            elif w == "sided" and not pending:
                pass  # "right-sided": the side word comes next
            elif w in _QUAL_SET or (w in _SIDES and not pending):
                if w in _SIDES:
                    side = w
                start, pending = ts, []
            else:
                break
            pos = ts
        out.append((start, ce) + _resolve(m.group(), side))
        last_end = ce
    return out


def stored_pathology(surface: str) -> str | None:
    """The pathology term a stored surface form names ("effusions", "ET tube"), or None. Phrasings that are not
    stored forms need the extractor: `cxrsynth.text.findings.canonical_pathology`."""
    return _SURFACE_TO_TERM.get(normalize_surface(surface))


def canonical_anatomy(surface: str) -> str | None:
    """Canonical anatomy term of a surface form ("left basilar" -> "left lung base", "both apices" -> "apices",
    "the left sixth posterior rib" -> "left rib"), or None when the whole phrase is not one structure."""
    s = re.sub(r"[\s\-]+", " ", surface.lower()).strip()
    s = re.sub(r"^(?:of |at |in )?the\s+", "", s)
    found = find_anatomy(s)
    if len(found) != 1 or found[0][0] != 0 or found[0][1] != len(s):
        return None
    return found[0][2]


def _check() -> None:
    for t in PATHOLOGIES.values():
        if t.observation is not None and t.observation not in OBSERVATIONS:
            raise ValueError(f"pathology {t.term!r}: unknown CheXpert observation {t.observation!r}")
        if t.kind not in (_F, _D):
            raise ValueError(f"pathology {t.term!r}: kind must be finding or device, got {t.kind!r}")


_check()
