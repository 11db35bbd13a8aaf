"""Findings extraction from report text: pathology, anatomy, certainty (present / absent / uncertain), modifiers.

Reads a report (MIMIC-CXR layout, see sections.py) or a plain sentence; writes nothing. Pure regex and token rules,
no parser: every rule below is written out here, and the tests exercise each one.

Pipeline per read section:
1. Sentences: split at . ! ? followed by white space (not after "Dr." "vs." "approx.", not at a "?" that precedes its
   word), at blank lines and before numbered list items; a run of more than 600 characters without a sentence end
   is cut at white space. Clauses: a sentence is cut at ";" and at but / however / although / though / which /
   whereas / while / except / aside from / apart from / other than / besides / otherwise.
2. Mentions: every surface form of vocab.PATHOLOGIES (longest match wins), plus
   - predicate mentions, a subject and what is said of it: "heart size is (mildly) enlarged" / "is normal" / "is top
     normal" / "is not enlarged", "normal heart size", "the mediastinum may be widened", "heart size and mediastinal
     contours are normal" (coordinated subjects share the predicate), "the left costophrenic angle is blunted". They
     carry their own certainty: a normal-type predicate or a "not" / "no longer" is absent, "may be" / "possibly" /
     "borderline" inside is uncertain;
   - phrases that imply absences without naming a pathology (Finding.implied = True):
       "no acute cardiopulmonary process" (abnormality / disease; intrathoracic) -> consolidation, pulmonary edema,
         pleural effusion, pneumothorax, pneumonia absent;
       "lungs are clear" / "clear lungs" -> opacity, consolidation, pulmonary edema, pneumonia absent;
       "cardiomediastinal silhouette is normal" -> cardiomegaly absent (enlarged cardiomediastinum absent is stated);
       "costophrenic angles are sharp" -> pleural effusion absent; "pleural spaces are clear" -> pleural effusion,
         pneumothorax absent; "osseous structures are intact" / "no acute osseous abnormality" -> fracture absent;
       "extubated" / "extubation" -> endotracheal tube absent.
     ("Normal chest radiograph" implies nothing: what it rules out is too broad to guess.) An implied finding is
     dropped when the same read text names its pathology explicitly (so "Small left effusion. Otherwise no acute
     cardiopulmonary process." keeps only the effusion). The CheXpert labeler reads none of these phrases, so
     labels.py ignores implied findings (the phantom's reports are labelled the same way).
3. Triggers (NegEx-like, written for this project):
   - negation before the finding: no, not, without, negative for, free of, clear of, no evidence/signs of, absence
     of, neither/nor, resolution of, removal of; after it: is/are normal, within normal limits, unremarkable, is not
     seen, not identified, no longer seen/visualized, has/have resolved, has been removed, "(chest tube) removal";
     either side: resolved, removed. "No consolidation to suggest pneumonia": after a negation in the same clause,
     "to suggest" / "to indicate" negate too (elsewhere they hedge).
   - uncertainty before: cannot exclude, cannot rule out, possible, may represent / reflect / be / indicate, might,
     could represent / reflect / be, suggestive of, concerning for, suspicious for, worrisome for, questionable,
     differential includes, borderline, equivocal, probable, likely, favor, evaluate/assess for, rule out, "?";
     after: cannot be excluded / ruled out, not excluded (a double negative), difficult to exclude, may be present,
     is possible, is suspected, "?". possible / likely / probable / questionable on the far side of a finding ("X,
     probably.", "X is likely.") reach back only when the clause ends there ("atelectasis, likely compressive" is
     not hedged). "versus" / "vs" makes the findings on both sides uncertain ("atelectasis versus pneumonia").
   - interval change that is not a negation: "no change in X", "no increase in X", "X has not changed", "X has not
     resolved" -> X present, change unchanged; "partially resolved X" -> X present, change decreased. "No new X" is a
     plain negation.
   Scope: a trigger before the findings reaches the first finding within 6 words (3 for "not"), then every further
   finding joined to it as a list ("no effusion, pneumothorax, or focal consolidation"; the joints may hold
   modifiers, anatomy, or a conjunction with up to three describing words but no verb); a trigger after the
   findings reaches back the same way. Scope stops at the clause end and at the next trigger. Uncertain beats absent
   when both reach a finding. Predicate and implied mentions only take triggers right next to them.
4. Anatomy: the anatomy inside the mention ("blunting of the left costophrenic angle"), else directly before it with
   only modifiers between ("right lower lobe opacity"), else after it behind a preposition ("opacity in the right
   lower lobe"), else the nearest one earlier in the clause; each only if it fits the pathology (pleural findings
   take no lobe, parenchymal ones only lung regions, a fracture only a bone, cardiomegaly only the heart). With no
   anatomy but a side ("right-sided effusion", "effusion on the right", "effusions bilaterally"), pleural findings go
   to "<side> pleural space" (both sides: "pleural spaces"), parenchymal ones and lesions to "<side> lung",
   fractures to "<side> rib". modifiers['side'] comes from the anatomy or the side words; a bare "right" after a
   finding belongs to the next noun, not to it.
5. Modifiers: severity (trace, small, mild, moderate, large, severe, minimal; tiny -> small, marked -> severe) and
   extent (patchy, diffuse, focal, multifocal, extensive, ...) from inside the mention, the words just before it, or
   right after it up to a preposition/conjunction ("effusion is moderate in size"); change (new, unchanged,
   increased, decreased, improved, worsened, resolved) from a change word before the mention in its clause or the
   first one after it; absent findings carry only change = resolved (from resolved / resolution / removed).

Spans are character offsets into the text passed in (also when only some sections are read).
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cxrsynth.text.sections import split_sections
from cxrsynth.text.vocab import (ANATOMY_WORDS, LEAD_SURFACES, PATHOLOGIES, find_anatomy, normalize_surface,
                                 pathology_surfaces, phrase_regex, stored_pathology)

DEFAULT_SECTIONS = ("findings", "impression", "last_paragraph", "full report")
NEVER_READ = frozenset({"indication", "history", "comparison"})
CERTAINTIES = ("present", "absent", "uncertain")


@dataclass(frozen=True)
class Finding:
    """One statement about one pathology.

    pathology: canonical term (a key of vocab.PATHOLOGIES). anatomy: canonical anatomy term or None.
    certainty: present | absent | uncertain (RadGraph OBS-DP / OBS-DA / OBS-U). modifiers: side, severity, extent,
    change (see the module docstring). span / surface: where the mention is in the input text (for predicate
    mentions the subject through the predicate, "heart size is mildly enlarged"). implied: derived from a phrase that
    names no pathology ("lungs are clear"); the CheXpert labels ignore such findings.
    """

    pathology: str
    anatomy: str | None
    certainty: str
    modifiers: dict[str, str] = field(default_factory=dict)
    span: tuple[int, int] = (0, 0)
    surface: str = ""
    implied: bool = False

    @property
    def observation(self) -> str | None:
        return PATHOLOGIES[self.pathology].observation


# ------------------------------------------------------------------------------------------------- phrase tries
_PATH_INFO: dict[str, tuple[str, bool]] = {}
for _surf, _term, _sign in pathology_surfaces():
    _PATH_INFO.setdefault(_surf, (_term, _sign))
_PATH_RE = re.compile(phrase_regex(_PATH_INFO))

# Triggers: phrase -> (type, flag). Types: neg_pre, neg_post, neg_both, unc_pre, unc_post, unc_both, versus,
# chg_pre / chg_post / chg_both (interval change, finding present; flag = the change), pseudo (neutral).
# Flag "resolved" on negations sets modifiers['change'] = 'resolved'.
_TRIGGERS: dict[str, tuple[str, str | None]] = {}


def _add(kind: str, flag: str | None, *phrases: str) -> None:
    for p in phrases:
        _TRIGGERS[normalize_surface(p)] = (kind, flag)


_add("neg_pre", None, "no", "not", "without", "negative for", "free of", "clear of", "no evidence of",
     "no evidence for", "no signs of", "no sign of", "no radiographic evidence of", "without evidence of",
     "without signs of", "absence of", "never", "neither", "nor", "rather than")
_add("neg_pre", "resolved", "resolution of", "interval resolution of", "complete resolution of", "removal of",
     "interval removal of", "no longer", "status post removal of", "no residual", "clearing of")
_add("neg_post", None, "is normal", "are normal", "within normal limits", "is within normal limits",
     "are within normal limits", "unremarkable", "is unremarkable", "are unremarkable", "is not seen",
     "are not seen", "not seen", "is not identified", "are not identified", "not identified", "not visualized",
     "is not visualized", "are not visualized", "not appreciated", "is not appreciated", "not demonstrated",
     "is not demonstrated", "not present", "is not present", "are not present", "is absent", "are absent",
     "ruled out", "has been ruled out", "not evident", "is not evident")
_add("neg_post", "resolved", "has resolved", "have resolved", "has cleared", "have cleared", "is no longer seen",
     "are no longer seen", "no longer seen", "no longer visualized", "is no longer visualized",
     "are no longer visualized", "no longer present", "is no longer present", "are no longer present",
     "no longer identified", "is no longer identified", "no longer evident", "no longer apparent",
     "has been removed", "have been removed", "was removed", "were removed", "has been discontinued",
     "have been discontinued", "has completely resolved", "have completely resolved", "has since resolved")
_add("neg_both", "resolved", "resolved", "removed")
_add("neg_post", "resolved", "removal", "resolution", "has been extubated")
_add("neg_both", None, "absent")
_add("unc_pre", None, "cannot exclude", "can not exclude", "can't exclude", "cannot be excluded that",
     "could not exclude", "cannot rule out", "can not rule out", "can't rule out", "could not rule out",
     "may represent", "may reflect", "may be", "may indicate", "may relate to", "may be due to",
     "may be related to", "may have", "might be", "might represent", "might reflect", "could be",
     "could represent", "could reflect", "could indicate", "could be due to", "can represent",
     "suggestive of", "suggesting", "suggests", "suggest", "may suggest", "could suggest", "concerning for",
     "concern for", "worrisome for", "suspicious for", "suspicion for", "suspicion of", "suspect",
     "differential includes", "differential diagnosis includes", "differential diagnosis", "differential",
     "differential considerations include", "borderline", "equivocal", "presumed", "presumably", "favor",
     "favored", "favoring", "possibility of", "raise the possibility of", "raises the possibility of",
     "raising the possibility of", "question of", "questionably", "evaluate for", "eval for", "evaluation for",
     "assess for", "assessment for", "r/o", "rule out", "to rule out", "to exclude", "most likely", "more likely",
     "less likely", "uncertain", "may also represent", "may well represent")
_add("unc_post", None, "cannot be excluded", "can not be excluded", "can't be excluded", "could not be excluded",
     "cannot be entirely excluded", "cannot be completely excluded", "cannot be totally excluded",
     "cannot be definitely excluded", "cannot be ruled out", "can not be ruled out", "can't be ruled out",
     "cannot be entirely ruled out", "could not be ruled out", "not excluded", "not entirely excluded",
     "not completely excluded", "is not excluded", "are not excluded", "not ruled out", "not be excluded",
     "is not entirely excluded", "may be present", "may also be present", "may be seen", "is possible",
     "are possible", "is suspected", "are suspected", "is questioned", "is questionable", "is not ruled out",
     "is probable", "is not entirely ruled out", "not entirely ruled out", "difficult to exclude",
     "is difficult to exclude", "hard to exclude", "difficult to rule out", "is difficult to rule out",
     "cannot be totally ruled out", "not be ruled out")
# "no focal consolidation to suggest pneumonia": after a negation in the clause these negate, else they hedge
_add("neg_if_neg", None, "to suggest", "to indicate", "to suggest the presence of", "to represent",
     "suggesting", "to explain")
_add("unc_both", None, "possible", "possibly", "likely", "probable", "probably", "questionable", "suspected",
     "is likely", "are likely", "likely represents", "likely representing", "likely reflecting", "likely reflects")
_add("versus", None, "versus", "vs")
_add("chg_pre", "unchanged", "no change in", "no significant change in", "no interval change in",
     "no significant interval change in", "no substantial change in", "no appreciable change in",
     "no definite change in", "no change of", "without change in", "without interval change in",
     "no increase in", "no significant increase in", "no interval increase in", "no decrease in",
     "no significant decrease in", "no worsening of", "no interval worsening of", "no significant worsening of",
     "no improvement in", "no significant improvement in", "no change in the appearance of",
     "no change in the size of", "no increase in the size of", "no change in size of")
_add("chg_post", "unchanged", "has not changed", "have not changed", "is not changed", "are not changed",
     "not changed", "has not significantly changed", "have not significantly changed")
_add("chg_both", "decreased", "partially resolved", "partial resolution of", "nearly resolved", "almost resolved",
     "near complete resolution of", "near-complete resolution of", "incomplete resolution of",
     "partially resolving", "not completely resolved", "not fully resolved", "has partially resolved",
     "have partially resolved", "has nearly resolved", "has not completely resolved", "has not fully resolved")
_add("chg_both", "unchanged", "has not resolved", "have not resolved", "not resolved", "unresolved")
_add("chg_both", "improved", "resolving")
_add("pseudo", None, "no significant interval change", "no interval change", "no change", "no significant change",
     "no other change", "not well", "not only", "no further", "without change", "no new change", "not clearly",
     "no significant interval change since", "without significant change", "no appreciable change",
     "further evaluation of", "no substantial change", "not included", "not imaged", "not assessed")
_TRIG_RE = re.compile(phrase_regex(_TRIGGERS) + r"|\?")

_TERM_RE = re.compile(r";|(?<![a-z])(?:but|however|although|though|which|whereas|while|except|aside from|"
                      r"apart from|other than|besides|nevertheless|otherwise)(?![a-z])")
_SENT_RE = re.compile(r"[.!?](?=\s|$)|\n[ \t]*\n|\n(?=[ \t]*\d{1,2}[.)]\s)")
_ABBREV_BEFORE_DOT = re.compile(r"(?:^|[^a-z])(?:dr|vs|approx|mr|mrs|ms|st|e\.g|i\.e|no|fig)$")
_WORD_RE = re.compile(r"[a-z0-9]+(?:[\-/'.][a-z0-9]+)*|,")
# groups: 1 "on the right" (follows its noun), 2 "right-sided", 3 bilateral(ly), 4 "on both sides", 5 bare side
_SIDE_TOKEN_RE = re.compile(r"(?<![a-z])(?:(?:on|at)\s+(?:the\s+)?(right|left)(?!\s+(?:side\s+of|of))|"
                            r"(right|left)[\s\-]*sided|(bilateral(?:ly)?)|((?:on\s+)?both\s+sides)|(right|left))"
                            r"(?![a-z])")

# ---------------------------------------------------------------------------------------- predicate mentions
_HEART_SUBJ = (r"heart size|size of the heart|cardiac size|cardiac silhouette size|cardiac silhouette|"
               r"cardiac contours?|cardiac shadow|heart shadow|heart")
_MED_SUBJ = (r"mediastinal and hilar (?:contours|silhouettes|structures)|hilar and mediastinal (?:contours|"
             r"silhouettes|structures)|mediastinal contours?|mediastinal silhouettes?|mediastinal width|"
             r"mediastinal structures|superior mediastinum|mediastinum")
_CMED_SUBJ = (r"cardiomediastinal (?:silhouette|contours?|size|structures)|cardiac and mediastinal "
              r"(?:silhouettes|contours|structures)|cardiomediastinum")
_LUNG_SUBJ = r"(?:(?:right|left|both) )?(?:lungs|lung fields|lung)"
_CPA_SUBJ = r"(?:(?:right|left|both) )?(?:costophrenic angles?|cp angles?|costophrenic sulci|costophrenic sulcus)"
_BONE_SUBJ = r"(?:visualized |included |imaged )?(?:osseous structures|bony structures|bones|osseous skeleton)"
_PLEURA_SUBJ = r"pleural spaces|pleural surfaces"
_SUBJ = (r"(?:(?P<cmed>" + _CMED_SUBJ + r")|(?P<med>" + _MED_SUBJ + r")|(?P<heart>" + _HEART_SUBJ +
         r")|(?P<lung>" + _LUNG_SUBJ + r")|(?P<cpa>" + _CPA_SUBJ + r")|(?P<bone>" + _BONE_SUBJ +
         r")|(?P<pleura>" + _PLEURA_SUBJ + r"))(?![a-z])")
_SUBJ_RE = re.compile(r"(?<![a-z])" + _SUBJ.replace(" ", r"[\s\-]+"))
_SUBJ_NOGROUP = re.sub(r"\?P<[a-z]+>", "", _SUBJ).replace(" ", r"[\s\-]+")
_LINK_WORDS = ("is", "are", "appears", "appear", "remains", "remain", "seems", "seem", "looks", "look", "now",
               "again", "still", "also", "otherwise", "overall", "grossly", "essentially", "likely", "probably",
               "possibly", "perhaps", "may", "might", "could", "be", "at", "least", "slightly", "mildly",
               "moderately", "markedly", "severely", "minimally", "massively", "substantially", "significantly",
               "somewhat", "borderline", "well", "expanded", "and", "not", "no", "longer", "stably", "unchanged",
               "stable", "persistently", "bilaterally", "both", "normally", "fully", "currently", "within",
               "upper", "top", "at", "the", "severely")
_PRED = (r"(?P<enl>enlarged|enlarging|widened|widening|increased in size|large|prominent|dilated|borderline)|"
         r"(?P<norm>normal(?:[\s\-]+(?:in[\s\-]+(?:size|caliber|contour|configuration|appearance)|sized?))?|"
         r"within[\s\-]+normal[\s\-]+limits|unremarkable|top[\s\-]+normal(?:[\s\-]+in[\s\-]+size)?|"
         r"(?:at[\s\-]+)?(?:the[\s\-]+)?upper[\s\-]+limits?[\s\-]+of[\s\-]+normal(?:[\s\-]+in[\s\-]+size)?|"
         r"upper[\s\-]+normal|intact)|"
         r"(?P<clear>clear|sharp|sharply[\s\-]+defined|preserved|well[\s\-]+defined|crisp)|"
         r"(?P<blunt>blunted)")
_LINK = r"(?P<link>(?:[\s,]+(?:" + "|".join(sorted(set(_LINK_WORDS), key=len, reverse=True)) + r"))*?)"
_PRED_RE = re.compile(
    r"(?<![a-z])(?:the[\s\-]+)?(?P<subjects>" + _SUBJ_NOGROUP + r"(?:(?:\s*,)?[\s\-]+(?:and|or|as well as)[\s\-]+"
    r"(?:the[\s\-]+)?" + _SUBJ_NOGROUP + r"|\s*,[\s\-]*(?:the[\s\-]+)?" + _SUBJ_NOGROUP + r")*)" + _LINK +
    r"[\s\-]+(?:" + _PRED + r")(?![a-z])")
_PRE_NORMAL_RE = re.compile(
    r"(?<![a-z])(?P<pred>normal(?:[\s\-]+sized?)?|clear|sharp|intact|unremarkable|top[\s\-]+normal)[\s\-]+"
    r"(?:size[\s\-]+of[\s\-]+the[\s\-]+)?(?P<subjects>" + _SUBJ_NOGROUP + r"(?:(?:\s*,)?[\s\-]+(?:and|or)"
    r"[\s\-]+" + _SUBJ_NOGROUP + r")*)")
_UNC_IN_LINK = re.compile(r"(?<![a-z])(?:may|might|could|possibly|probably|likely|perhaps|borderline)(?![a-z])")
_NEG_IN_LINK = re.compile(r"(?<![a-z])(?:not|no longer)(?![a-z])")

_NORMAL_IMPLIES = {("lung", "clear"): ("opacity", "consolidation", "pulmonary edema", "pneumonia"),
                   ("lung", "norm"): ("opacity", "consolidation", "pulmonary edema", "pneumonia"),
                   ("cpa", "clear"): ("pleural effusion",), ("cpa", "norm"): ("pleural effusion",),
                   ("pleura", "clear"): ("pleural effusion", "pneumothorax"),
                   ("pleura", "norm"): ("pleural effusion", "pneumothorax"), ("bone", "norm"): ("fracture",)}
_NACP = ("consolidation", "pulmonary edema", "pleural effusion", "pneumothorax", "pneumonia")
_GROUP_RE = re.compile(
    r"(?<![a-z])(?:(?P<nacp>acute[\s\-]+(?:cardiopulmonary|intrathoracic|cardiac[\s\-]+or[\s\-]+pulmonary|"
    r"pulmonary|chest|thoracic)[\s\-]+(?:process(?:es)?|abnormalit(?:y|ies)|disease|findings?|pathology|"
    r"changes?)|acute[\s\-]+(?:process|abnormality))|"
    r"(?P<bone>(?:acute[\s\-]+)?(?:osseous|bony|skeletal)[\s\-]+(?:abnormalit(?:y|ies)|injury|injuries|"
    r"process))|"
    r"(?P<extub>extubat(?:ed|ion)))(?![a-z])")

# ---------------------------------------------------------------------------------------------- modifier words
_SEVERITY = {"trace": "trace", "tiny": "small", "small": "small", "smaller": None, "minimal": "minimal",
             "minimally": "minimal", "minor": "minimal", "mild": "mild", "mildly": "mild", "slight": "mild",
             "slightly": "mild", "moderate": "moderate", "moderately": "moderate", "moderate-sized": "moderate",
             "moderate-size": "moderate", "medium": "moderate", "large": "large", "large-sized": "large",
             "big": "large", "sizable": "large", "sizeable": "large", "massive": "large", "severe": "severe",
             "severely": "severe", "marked": "severe", "markedly": "severe", "small-sized": "small",
             "small-to-moderate": "moderate", "mild-to-moderate": "moderate", "moderate-to-large": "large",
             "moderate-to-severe": "severe"}
_SEVERITY = {k: v for k, v in _SEVERITY.items() if v}
_EXTENT = {"patchy": "patchy", "diffuse": "diffuse", "diffusely": "diffuse", "focal": "focal",
           "multifocal": "multifocal", "extensive": "extensive", "streaky": "streaky", "linear": "linear",
           "plate-like": "plate-like", "platelike": "plate-like", "subsegmental": "subsegmental",
           "segmental": "segmental", "lobar": "lobar", "dense": "dense", "subtle": "subtle", "hazy": "hazy",
           "confluent": "confluent", "reticular": "reticular", "reticulonodular": "reticulonodular",
           "scattered": "scattered", "asymmetric": "asymmetric", "asymmetrical": "asymmetric",
           "widespread": "diffuse", "localized": "focal", "loculated": "loculated", "layering": "layering"}
_CHANGE_PHRASES = {
    "new": "new", "newly": "new", "interval development of": "new", "interval development": "new",
    "has developed": "new", "have developed": "new", "developed": "new", "interval placement of": "new",
    "interval placement": "new", "has been placed": "new", "have been placed": "new", "interval appearance of": "new",
    "unchanged": "unchanged", "stable": "unchanged", "stably": "unchanged", "persistent": "unchanged",
    "persists": "unchanged", "persist": "unchanged", "again seen": "unchanged", "again noted": "unchanged",
    "again demonstrated": "unchanged", "again identified": "unchanged", "redemonstrated": "unchanged",
    "re-demonstrated": "unchanged", "redemonstration of": "unchanged", "similar": "unchanged",
    "remains": "unchanged", "remain": "unchanged", "unchanged in position": "unchanged", "not changed": "unchanged",
    "increased": "increased", "increasing": "increased", "increase in": "increased", "larger": "increased",
    "enlarging": "increased", "more conspicuous": "increased", "more prominent": "increased",
    "interval increase": "increased", "decreased": "decreased", "decreasing": "decreased", "decrease in": "decreased",
    "smaller": "decreased", "less conspicuous": "decreased", "less prominent": "decreased",
    "interval decrease": "decreased", "improved": "improved", "improving": "improved", "improvement": "improved",
    "worsened": "worsened", "worsening": "worsened", "worse": "worsened",
}
_CHANGE_RE = re.compile(phrase_regex(normalize_surface(p) for p in _CHANGE_PHRASES))
_FILLER = {"and", "or", "nor", "and/or", ",", "/", "of", "in", "at", "on", "within", "along", "involving", "to",
           "the", "a", "an", "any", "other", "additional", "definite", "definitive", "significant", "acute", "new",
           "focal", "evident", "appreciable", "overt", "frank", "gross", "obvious", "displaced", "nondisplaced",
           "residual", "underlying", "superimposed", "associated", "adjacent", "compressive", "pulmonary", "lung",
           "early", "developing", "apparent", "visible", "discrete", "measurable", "size", "interval", "airspace",
           "air", "space", "pleural", "vascular", "interstitial", "either", "mm", "cm", "sided", "small", "large",
           "moderate", "minimal", "mild", "trace", "tiny", "clinically", "radiographic", "radiographically",
           "persistent", "recurrent", "substantial", "large-sized", "moderate-sized", "small-sized", "more",
           "rounded", "round", "dominant", "suspicious", "chest", "wall", "well", "definitely", "certain",
           "amount", "amounts", "appreciably"}
_LIST_GAP = frozenset(_FILLER | set(_SEVERITY) | set(_EXTENT) | ANATOMY_WORDS)
_ADJ_GAP = frozenset(set(_SEVERITY) | set(_EXTENT) | {"the", "a", "an", "new", "stable", "unchanged", "persistent",
                                                     "increased", "decreased", "increasing", "decreasing",
                                                     "improving", "worsening", "mm", "cm", "sided", "and",
                                                     "displaced", "nondisplaced", "acute", "chronic", "old",
                                                     "healed", "healing", "pulmonary", "pleural", "airspace",
                                                     "rounded", "residual", "small", "large", "tiny", "early",
                                                     "interval", "redemonstrated", "known", "previously",
                                                     "described", "seen", "noted", "apparent", "dual-chamber",
                                                     "single-lead", "dual-lead", "upper", "extremity", "chest",
                                                     "wall", "amount", "of", "is", "are"}
                     | ANATOMY_WORDS)
_PREPOSITIONS = frozenset({"in", "at", "of", "on", "within", "along", "involving", "over", "overlying", "above",
                           "below", "into", "near", "projecting", "projects", "from", "through", "behind",
                           "throughout", "terminating", "terminates", "ending", "ends", "with", "beyond", "to"})

_AFTER_HEDGE_OK = frozenset({"present", "seen", "noted", "identified", "there", "given", "in", "on", "at",
                             "represents", "reflects", "related", "due"})
_CONJ = frozenset({"and", "or", "nor", "and/or", ",", "versus", "vs"})
_VERBISH = frozenset({"is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "seen", "noted",
                      "identified", "present", "there", "which", "that", "demonstrated", "appears", "appear",
                      "remains", "remain", "shows", "show", "may", "could", "might", "can", "will", "would",
                      "suggest", "suggests", "represent", "represents", "with", "without", "no", "not"})
_POST_STOP = frozenset({"with", "and", "or", "of", "in", "at", "on", "to", "without", "but", "from", "by", "as",
                        "for", "than", "compatible", "consistent", "likely", "possibly", "may", "could"})
_PLEURAL = frozenset({"pleural effusion", "pneumothorax", "pleural thickening"})
_PARENCHYMAL = frozenset({"opacity", "consolidation", "pneumonia", "atelectasis", "pulmonary edema", "scarring",
                          "emphysema", "fibrosis"})
_LESION = frozenset({"nodule", "mass", "lesion", "granuloma", "calcification"})
_FIRST_GAP = 6
_FIRST_GAP_SHORT = {"not": 3, "nor": 3, "neither": 3, "versus": 3, "vs": 3}


def _anatomy_fits(path: str, anat: str, region: str) -> bool:
    if PATHOLOGIES[path].kind == "device":
        return True
    if path in _PLEURAL:
        return region in ("pleura", "lung", "chest wall", "diaphragm") and "lobe" not in anat and anat not in (
            "lingula", "perihilar region", "perihilar regions", "right perihilar region", "left perihilar region",
            "hilum", "hila", "right hilum", "left hilum", "retrocardiac")
    if path in _PARENCHYMAL:
        return region == "lung"
    if path in _LESION:
        return region in ("lung", "mediastinum", "pleura", "chest wall", "bone", "heart", "vessel")
    if path == "fracture":
        return region == "bone"
    if path == "cardiomegaly":
        return region == "heart"
    if path == "enlarged cardiomediastinum":
        return region in ("mediastinum", "heart")
    if path == "heart failure":
        return False
    return True


def _default_site(path: str, side: str) -> str | None:
    """Where a finding given only a side goes: "<side> pleural space" / "<side> lung" / "<side> rib"."""
    if path in _PLEURAL:
        base, both = "pleural space", "pleural spaces"
    elif path in _PARENCHYMAL or path in _LESION:
        base, both = "lung", "lungs"
    elif path == "fracture":
        base, both = "rib", "ribs"
    else:
        return None
    return both if side == "bilateral" else f"{side} {base}"


# ------------------------------------------------------------------------------------------------ working types
class _M:
    """A pathology mention while a section is being read."""

    __slots__ = ("start", "end", "path", "sign", "lead", "kind", "fixed", "implied", "neg", "unc", "resolved",
                 "change")

    def __init__(self, start, end, path, kind="term", sign=False, lead=False, fixed=None, implied=False):
        # kind: term (a vocabulary form) | pred (subject + predicate) | group ("no acute cardiopulmonary process")
        # fixed: a certainty the phrase itself states; sign / lead: see vocab.PathologyTerm.signs / LEAD_SURFACES
        self.start, self.end, self.path, self.kind = start, end, path, kind
        self.sign, self.lead, self.fixed, self.implied = sign, lead, fixed, implied
        self.neg = self.unc = self.resolved = False
        self.change: str | None = None


def _lower(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _words(s: str) -> list[str]:
    return _WORD_RE.findall(s)


def _subject_mentions(low: str, s0: int, s1: int, pred: str, link: str, span_end: int | None,
                      out: list[_M]) -> None:
    """Mentions for each subject (between s0 and s1) of a predicate construction.

    pred: enl (enlarged, widened ...), borderline, norm (normal, unremarkable, intact ...), clear (clear, sharp),
    blunt; link: the words between subjects and predicate ("is not", "may be mildly").
    """
    subs = list(_SUBJ_RE.finditer(low, s0, s1))
    not_in_link = bool(_NEG_IN_LINK.search(link))
    normal = pred in ("norm", "clear") and not not_in_link
    for sm in subs:
        fam, st = sm.lastgroup, sm.start()
        en = span_end if (span_end is not None and len(subs) == 1) else sm.end()
        if fam in ("heart", "med", "cmed") and pred in ("enl", "borderline", "norm"):
            path = "cardiomegaly" if fam == "heart" else "enlarged cardiomediastinum"
            if pred == "norm" or not_in_link:
                out.append(_M(st, en, path, "pred", fixed="absent"))
                if fam == "cmed":  # a normal cardiomediastinal silhouette has a normal heart
                    out.append(_M(st, en, "cardiomegaly", "pred", fixed="absent", implied=True))
            else:
                hedged = pred == "borderline" or bool(_UNC_IN_LINK.search(link))
                out.append(_M(st, en, path, "pred", fixed="uncertain" if hedged else None))
        elif fam == "cpa" and pred == "blunt":
            out.append(_M(st, en, "pleural effusion", "pred", sign=True, fixed="absent" if not_in_link else None))
        elif normal and (fam, pred) in _NORMAL_IMPLIES:
            for p in _NORMAL_IMPLIES[fam, pred]:
                out.append(_M(st, en, p, "pred", fixed="absent", implied=True))


def _predicate_mentions(low: str, a: int, b: int) -> list[_M]:
    out: list[_M] = []
    for m in _PRED_RE.finditer(low, a, b):
        pred = m.lastgroup
        if pred == "enl" and m.group("enl") == "borderline":
            pred = "borderline"
        _subject_mentions(low, m.start("subjects"), m.end("subjects"), pred, m.group("link") or "", m.end(), out)
    covered = [(x.start, x.end) for x in out]  # in text order
    for m in _PRE_NORMAL_RE.finditer(low, a, b):
        p = m.group("pred")
        pred = "clear" if p in ("clear", "sharp") else "norm"
        k = bisect.bisect_right(covered, (m.start("subjects"), 1 << 62)) - 1
        if k >= 0 and covered[k][0] <= m.start("subjects") < covered[k][1]:
            continue
        n0 = len(out)
        _subject_mentions(low, m.start("subjects"), m.end("subjects"), pred, "", None, out)
        for x in out[n0:]:
            x.start = m.start()  # the span covers "normal heart size"
    return out


def _group_mentions(low: str, a: int, b: int) -> list[_M]:
    out = []
    for m in _GROUP_RE.finditer(low, a, b):
        g = m.lastgroup
        paths = {"nacp": _NACP, "bone": ("fracture",), "extub": ("endotracheal tube",)}[g]
        fixed = "absent" if g == "extub" else None
        for p in paths:
            out.append(_M(m.start(), m.end(), p, "group", fixed=fixed, implied=True))
    return out


# ------------------------------------------------------------------------------------------------ the reader
_MAX_SENTENCE = 600  # characters; longer runs without a sentence end are cut at white space (scope stays local)


def _boundaries(low: str, a: int, b: int) -> tuple[list[int], list[int]]:
    """Sentence starts and clause starts in low[a:b] (both sorted, both beginning with a)."""
    sents = [a]
    for m in _SENT_RE.finditer(low, a, b):
        ch = m.group()
        if ch == "." and _ABBREV_BEFORE_DOT.search(low, max(a, m.start() - 8), m.start()):
            continue
        if ch == "?" and (m.start() == a or low[m.start() - 1] in " \t\n(") and low[m.end():m.end() + 2].strip():
            continue  # "? pneumonia": a question mark before its word does not end the sentence
        sents.append(m.end())
    sents.append(b)
    cut = [sents[0]]
    for s0, s1 in zip(sents, sents[1:]):
        pos = s0
        while s1 - pos > _MAX_SENTENCE:
            sp = low.rfind(" ", pos + _MAX_SENTENCE // 2, pos + _MAX_SENTENCE)
            pos = sp + 1 if sp > pos else pos + _MAX_SENTENCE
            cut.append(pos)
        cut.append(s1)
    sents = sorted(set(cut))
    clauses = sorted(set(sents + [m.start() for m in _TERM_RE.finditer(low, a, b)]))
    return sents, clauses


def _read(low: str, a: int, b: int) -> list[tuple[_M, str, dict, str | None]]:
    """Read low[a:b] (one section, lower case); returns (mention, certainty, modifiers, anatomy) in text order."""
    # mentions -----------------------------------------------------------------------------------------------
    preds = _predicate_mentions(low, a, b)
    pred_starts = [p.start for p in preds]

    def in_pred(s: int, e: int) -> bool:
        k = bisect.bisect_right(pred_starts, s) - 1
        while k >= 0 and preds[k].start <= s:
            if e <= preds[k].end:
                return True
            k -= 1
            if k >= 0 and s - preds[k].start > _MAX_SENTENCE:
                break
        return False

    terms = []
    for m in _PATH_RE.finditer(low, a, b):
        key = m.group()
        if key not in _PATH_INFO:
            key = normalize_surface(key)
        term, sign = _PATH_INFO.get(key, (None, False))
        if term is None or (preds and in_pred(m.start(), m.end())):
            continue  # a predicate mention wins over a term inside it ("heart size is enlarged" is both)
        terms.append(_M(m.start(), m.end(), term, "term", sign=sign, lead=key in LEAD_SURFACES))
    mentions = sorted(preds + terms + _group_mentions(low, a, b), key=lambda x: (x.start, -x.end))
    if not mentions:
        return []
    sents, clauses = _boundaries(low, a, b)

    def clause_of(pos: int) -> tuple[int, int]:
        k = bisect.bisect_right(clauses, pos) - 1
        return clauses[k], clauses[k + 1] if k + 1 < len(clauses) else b

    # signs and pacemaker leads yield to a named mention of the same term in the same sentence
    if any(x.sign or x.lead for x in mentions):
        by_sent: dict[int, set[str]] = {}
        for x in mentions:
            if not (x.sign or x.lead or x.implied):
                by_sent.setdefault(bisect.bisect_right(sents, x.start), set()).add(x.path)
        mentions = [x for x in mentions if not ((x.sign or x.lead)
                                                and x.path in by_sent.get(bisect.bisect_right(sents, x.start), ()))]
    starts = [x.start for x in mentions]

    triggers = []
    for m in _TRIG_RE.finditer(low, a, b):
        s, e = m.span()
        if m.group() == "?":
            nxt = low[e:e + 2].strip()
            pre = (s == a or low[s - 1] in " \t\n(") and nxt[:1].isalpha()
            triggers.append((s, e, "unc_pre" if pre else "unc_post", None, "?"))
            continue
        key = m.group()
        if key not in _TRIGGERS:
            key = normalize_surface(key)
        kind, flag = _TRIGGERS.get(key, ("pseudo", None))
        if kind == "pseudo" or (preds and in_pred(s, e)):
            continue  # neutral phrases; triggers inside a predicate mention belong to it
        triggers.append((s, e, kind, flag, key))

    def gap_ok(s: int, e: int, allowed: frozenset) -> bool:
        ws = _words(low[s:e])
        if all(w in allowed or w.replace(".", "").isdigit() for w in ws):
            return True
        # "edema or atypical infection": a conjunction and a few describing words, no verb
        return allowed is _LIST_GAP and len(ws) <= 4 and any(w in _CONJ for w in ws) and not any(
            w in _VERBISH or (w.endswith(("ed", "ing")) and w not in allowed) for w in ws)

    def forward(t_end: int, scope_end: int, max_first: int) -> list[_M]:
        out: list[_M] = []
        k = bisect.bisect_left(starts, t_end)
        prev_end = t_end
        while k < len(mentions) and mentions[k].start < scope_end:
            x = mentions[k]
            k += 1
            if x.start < prev_end:  # same span as the previous target (the members of a group mention)
                if out:
                    out.append(x)
                continue
            if x.kind == "pred":  # carries its own certainty: only a trigger right before it reaches it
                if not out and len(_words(low[prev_end:x.start])) <= 1:
                    out.append(x)
                break
            if not out:
                if len(_words(low[prev_end:x.start])) > max_first:
                    break
            elif not gap_ok(prev_end, x.start, _LIST_GAP):
                break
            out.append(x)
            prev_end = x.end
        return out

    def backward(t_start: int, scope_start: int, max_first: int = 8) -> list[_M]:
        out: list[_M] = []
        k = bisect.bisect_left(starts, t_start) - 1
        nxt_start = t_start
        while k >= 0 and mentions[k].start >= scope_start:
            x = mentions[k]
            k -= 1
            if x.end > nxt_start:  # same span as the previous target
                if out and x.start == out[-1].start:
                    out.append(x)
                continue
            n_gap = len(_words(low[x.end:nxt_start]))
            if x.kind == "pred":
                if not out and n_gap == 0:
                    out.append(x)
                break
            if not out:
                if n_gap > max_first:
                    break
            elif not gap_ok(x.end, nxt_start, _LIST_GAP):
                break
            out.append(x)
            nxt_start = x.start
        return out

    for i, (s, e, kind, flag, key) in enumerate(triggers):
        c0, c1 = clause_of(s)
        if kind == "neg_if_neg":
            kind = "neg_pre" if any(t[2] == "neg_pre" and c0 <= t[0] < s for t in triggers[max(0, i - 4):i]) \
                else "unc_pre"
        fwd_end = min(c1, triggers[i + 1][0] if i + 1 < len(triggers) else b)
        bwd_start = max(c0, triggers[i - 1][1] if i > 0 else a)
        max_first = _FIRST_GAP_SHORT.get(key, _FIRST_GAP)
        if kind in ("neg_pre", "unc_pre", "chg_pre"):
            targets = forward(e, fwd_end, max_first)
        elif kind in ("neg_post", "unc_post", "chg_post"):
            targets = backward(s, bwd_start)
        elif kind == "versus":
            targets = backward(s, bwd_start, 3)[:1] + forward(e, fwd_end, 3)
        else:  # *_both: the finding after it if there is one, else the one before
            targets = forward(e, fwd_end, max_first if kind == "unc_both" else 2)
            if not targets:
                rest = [w for w in _words(low[e:c1]) if w != ","]
                if kind != "unc_both" or not rest or rest[0] in _AFTER_HEDGE_OK:
                    targets = backward(s, bwd_start, 3)
        for x in targets:
            if kind.startswith("neg"):
                if x.kind == "pred" and x.fixed is not None:
                    continue
                x.neg = True
                x.resolved = x.resolved or flag == "resolved"
            elif kind.startswith("chg"):
                x.change = flag
                x.fixed = x.fixed or "present"
            else:
                x.unc = True

    # certainty, then modifiers and anatomy clause by clause ----------------------------------------------------
    anats = find_anatomy(low, a, b)
    anat_starts = [t[0] for t in anats]
    sides = []
    for m in _SIDE_TOKEN_RE.finditer(low, a, b):
        k = bisect.bisect_left(anat_starts, m.end()) - 1
        if k >= 0 and anats[k][1] > m.start():
            continue  # part of an anatomy phrase
        g = m.groups()
        side = g[0] or g[1] or g[4] or "bilateral"
        trailing = g[0] is not None or g[2] == "bilaterally" or g[3] is not None
        sides.append((m.start(), m.end(), side, trailing))
    side_starts = [t[0] for t in sides]

    results = []
    for idx, x in enumerate(mentions):
        if x.unc and not (x.fixed == "absent" and x.kind == "pred"):
            cert = "uncertain"
        elif x.fixed is not None:
            cert = x.fixed
        else:
            cert = "absent" if x.neg else "present"
        if x.implied and cert != "absent":
            continue
        c0, c1 = clause_of(x.start)
        lo, hi = bisect.bisect_left(starts, c0), bisect.bisect_left(starts, c1)
        clause_mentions = [m for m in mentions[lo:hi] if m.start != x.start]
        clause_anats = anats[bisect.bisect_left(anat_starts, c0):bisect.bisect_left(anat_starts, c1)]
        clause_sides = sides[bisect.bisect_left(side_starts, c0):bisect.bisect_left(side_starts, c1)]
        mods, anat = _modifiers_and_anatomy(low, x, cert, c0, c1, clause_mentions, clause_anats, clause_sides,
                                            gap_ok)
        results.append((x, cert, mods, anat))
    return results


def _modifiers_and_anatomy(low, x: _M, cert, c0, c1, others, anats, sides, gap_ok):
    """Modifiers and anatomy of mention x from its clause low[c0:c1]; `others` are the clause's other mentions."""
    mods: dict[str, str] = {}
    prev_end = max([m.end for m in others if m.end <= x.start], default=c0)
    nxt_start = min([m.start for m in others if m.start >= x.end], default=c1)
    pre, inside, post = low[prev_end:x.start], low[x.start:x.end], low[x.end:nxt_start]
    # severity / extent: inside the mention, else the words just before it, else just after it
    for name, table in (("severity", _SEVERITY), ("extent", _EXTENT)):
        val = None
        for w in _words(inside):
            val = table.get(w, val)
        if val is None:
            val = next((table[w] for w in reversed(_words(pre)[-5:]) if w in table), None)
        if val is None:
            for w in _words(post)[:6]:
                if w in _POST_STOP:
                    break
                if w in table:
                    val = table[w]
                    break
        if val is not None:
            mods[name] = val
    # interval change: a word before or inside the mention, else the first one after it in the clause
    if cert == "absent":
        if x.resolved:
            mods["change"] = "resolved"
    elif x.change:
        mods["change"] = x.change
    else:
        found = None
        for m in _CHANGE_RE.finditer(low, prev_end, x.end):
            found = _CHANGE_PHRASES.get(normalize_surface(m.group()), found)
        if found is None:
            m = _CHANGE_RE.search(low, x.end, min(c1, x.end + 200))
            if m is not None:
                found = _CHANGE_PHRASES.get(normalize_surface(m.group()))
        if found:
            mods["change"] = found
    # anatomy: inside, directly before, after a preposition, else the nearest earlier one in the clause
    anat = side = None
    cands = [t for t in anats if _anatomy_fits(x.path, t[2], t[4])]
    if cands:
        device = PATHOLOGIES[x.path].kind == "device"
        inside_c = [t for t in cands if x.start <= t[0] and t[1] <= x.end]
        before = [t for t in cands if t[1] <= x.start]
        after = [t for t in cands if t[0] >= x.end]
        pick = None
        if inside_c and not device:
            pick = inside_c[-1]
        if pick is None and before and len(_words(low[before[-1][1]:x.start])) <= 6 \
                and gap_ok(before[-1][1], x.start, _ADJ_GAP):
            pick = before[-1]
        if pick is None and after:
            t = after[0]
            gap = _words(low[x.end:t[0]])
            blocked = any(x.end <= m.start < t[0] for m in others)
            if not blocked and len(gap) <= 7 and (not gap or any(w in _PREPOSITIONS for w in gap)):
                pick = t
        if pick is None and before:
            pick = before[-1]
        if pick is not None:
            anat, side = pick[2], pick[3]
    if side is None:
        for s, e, sd, trailing in sides:
            if e <= x.start and len(_words(low[e:x.start])) <= 4 and gap_ok(e, x.start, _ADJ_GAP):
                side = sd
            elif trailing and s >= x.end and side is None and len(_words(low[x.end:s])) <= 4 \
                    and not any(x.end <= m.start < s for m in others):
                side = sd
        if side is not None and anat is None:
            anat = _default_site(x.path, side)
    if side is not None:
        mods["side"] = side
    return mods, anat


def _segments(text: str, sections: Iterable[str] | None) -> list[tuple[int, int]]:
    """(start, end) character ranges of the text to read."""
    if sections is None:
        return [(0, len(text))]
    wanted = set(sections)
    bad = wanted & NEVER_READ
    if bad:
        raise ValueError(f"sections {sorted(bad)} never produce findings (indication/history/comparison); "
                         "leave them out")
    secs = split_sections(text)
    if secs and secs[0].name == "full report":
        return [(0, len(text))]
    return [(s.start, s.start + len(s.text)) for s in secs if s.name in wanted]


def extract_findings(text: str, sections: Iterable[str] | None = DEFAULT_SECTIONS) -> list[Finding]:
    """Findings of a report or sentence, in text order (see the module docstring for the rules).

    sections: the canonical section names to read when the text has headers (None: read everything); text without
    headers is read whole. Spans index `text`.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_findings expects str, got {type(text).__name__}")
    if not text.strip():
        return []
    low = _lower(text)
    raw = []
    for a, b in _segments(text, sections):
        raw += _read(low, a, b)
    explicit = {x.path for x, *_ in raw if not x.implied}
    out: list[Finding] = []
    seen: set = set()
    for x, cert, mods, anat in raw:
        if x.implied:
            key = (x.path, "implied")
            if x.path in explicit or key in seen:
                continue
            seen.add(key)
        else:
            key = (x.path, cert, anat, x.start, x.end)
            if key in seen:
                continue
            seen.add(key)
        out.append(Finding(x.path, anat, cert, mods, (x.start, x.end), text[x.start:x.end], x.implied))
    return out


def canonical_pathology(surface: str) -> str | None:
    """Canonical pathology term of a surface form ("effusions", "ET tube", "enlarged heart", "heart size is mildly
    enlarged"), or None. Falls back to the extractor for phrasings that are not stored forms."""
    if not normalize_surface(surface):
        return None
    stored = stored_pathology(surface)
    if stored is not None:
        return stored
    terms = {f.pathology for f in extract_findings(surface, sections=None) if not f.implied}
    return terms.pop() if len(terms) == 1 else None
