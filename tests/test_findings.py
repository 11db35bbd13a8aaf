"""Findings extraction: vocabulary folding, negation / uncertainty with scope, change, anatomy, spans, sections.

Every sentence here is hand-written for this test. Tables are (sentence, expected set); a set of pairs compares
(pathology, certainty) of every finding the extractor reports (implied ones included), a set of triples compares
(pathology, certainty, anatomy).
"""
import time

import pytest

from cxrsynth.text.findings import Finding, canonical_pathology, extract_findings
from cxrsynth.text.vocab import ANATOMY, PATHOLOGIES, canonical_anatomy


def _pairs(text, **kw):
    return {(f.pathology, f.certainty) for f in extract_findings(text, **kw)}


def _triples(text, **kw):
    return {(f.pathology, f.certainty, f.anatomy) for f in extract_findings(text, **kw)}


def _check(sentence, expected):
    if not expected or len(next(iter(expected))) == 2:
        assert _pairs(sentence) == set(expected), sentence
    else:
        assert _triples(sentence) == set(expected), sentence


P, A, U = "present", "absent", "uncertain"
EF, PX, CO, PN, AT, ED = "pleural effusion", "pneumothorax", "consolidation", "pneumonia", "atelectasis", \
    "pulmonary edema"
CM, EC, OP, FX = "cardiomegaly", "enlarged cardiomediastinum", "opacity", "fracture"
NACP = {(CO, A), (ED, A), (EF, A), (PX, A), (PN, A)}
CLEAR = {(OP, A), (CO, A), (ED, A), (PN, A)}

# ------------------------------------------------------------------------------------------------ negation
NEGATION = [
    ("No pneumothorax.", {(PX, A)}),
    ("There is no left pleural effusion.", {(EF, A)}),
    ("The lungs are expanded without focal consolidation.", {(CO, A)}),
    ("Negative for pneumothorax.", {(PX, A)}),
    ("The right base is free of consolidation.", {(CO, A)}),
    ("No evidence of pneumonia on this exam.", {(PN, A)}),
    ("No signs of pulmonary edema.", {(ED, A)}),
    ("There is absence of a pleural effusion.", {(EF, A)}),
    ("Interval resolution of the left lower lobe consolidation.", {(CO, A)}),
    ("Resolved right apical pneumothorax.", {(PX, A)}),
    ("The right apical pneumothorax has resolved.", {(PX, A)}),
    ("Small left effusion resolved.", {(EF, A)}),
    ("Both effusions have resolved since yesterday.", {(EF, A)}),
    ("Heart size is normal.", {(CM, A)}),
    ("The cardiac silhouette is normal.", {(CM, A)}),
    ("The heart size is within normal limits.", {(CM, A)}),
    ("The mediastinal contours are normal.", {(EC, A)}),
    ("The hila are normal.", set()),
    ("The endotracheal tube has been removed.", {("endotracheal tube", A)}),
    ("ET tube removed.", {("endotracheal tube", A)}),
    ("Interval removal of the right PICC.", {("picc", A)}),
    ("The nasogastric tube was removed in the interval.", {("nasogastric tube", A)}),
    ("The left apical pneumothorax is no longer seen.", {(PX, A)}),
    ("A pneumothorax is not identified.", {(PX, A)}),
    ("Consolidation is not seen.", {(CO, A)}),
    ("This is not pneumonia.", {(PN, A)}),
    ("No new consolidation.", {(CO, A)}),
    ("No displaced rib fracture is seen.", {(FX, A)}),
    ("The heart is not enlarged.", {(CM, A)}),
    ("Normal heart size.", {(CM, A)}),
    ("Heart size is top-normal.", {(CM, A)}),
    ("The heart is at the upper limits of normal in size.", {(CM, A)}),
    ("The mediastinum is not widened.", {(EC, A)}),
]

# ------------------------------------------------------------------------------------------------ uncertainty
UNCERTAINTY = [
    ("Cannot exclude a small left pleural effusion.", {(EF, U)}),
    ("Early pneumonia cannot be excluded.", {(PN, U)}),
    ("A tiny pneumothorax cannot be ruled out on this supine film.", {(PX, U)}),
    ("Right lower lobe pneumonia is not excluded.", {(PN, U)}),
    ("Possible small right pneumothorax.", {(PX, U)}),
    ("There is possibly a trace left effusion.", {(EF, U)}),
    ("Left basilar opacity may represent atelectasis.", {(OP, P), (AT, U)}),
    ("There may be a small left effusion.", {(EF, U)}),
    ("The appearance may be due to mild edema.", {(ED, U)}),
    ("Patchy right lower lobe opacity could represent aspiration pneumonia.", {(OP, P), (PN, U)}),
    ("Linear left basilar opacity could reflect scarring.", {(OP, P), ("scarring", U)}),
    ("Atelectasis versus consolidation at the left base.", {(AT, U), (CO, U)}),
    ("Left basilar opacity, atelectasis vs. pneumonia.", {(OP, P), (AT, U), (PN, U)}),
    ("Left lower lobe opacity, likely atelectasis.", {(OP, P), (AT, U)}),
    ("Probable small bilateral effusions.", {(EF, U)}),
    ("Findings are suggestive of mild pulmonary edema.", {(ED, U)}),
    ("Retrocardiac opacity concerning for pneumonia.", {(OP, P), (PN, U)}),
    ("Questionable left apical pneumothorax.", {(PX, U)}),
    ("Nodular opacity in the right upper lobe is suspicious for a mass.", {("nodule", P), ("mass", U)}),
    ("The differential includes infection and atelectasis.", {(PN, U), (AT, U)}),
    ("Borderline cardiomegaly.", {(CM, U)}),
    ("Heart size is borderline enlarged.", {(CM, U)}),
    ("The heart may be mildly enlarged.", {(CM, U)}),
    ("The mediastinum is possibly widened.", {(EC, U)}),
    ("Pneumonia?", {(PN, U)}),
    ("? left lower lobe pneumonia", {(PN, U)}),
    ("Left lower lobe consolidation, cannot rule out pneumonia.", {(CO, P), (PN, U)}),
    ("Mild pulmonary edema may be present.", {(ED, U)}),
    ("A right PICC may be present but is not well seen.", {("picc", U)}),
    ("Pneumonia is suspected in the lingula.", {(PN, U)}),
    ("Findings worrisome for a right upper lobe mass.", {("mass", U)}),
    ("Evaluate for pneumothorax.", {(PX, U)}),
    ("Pneumonia or a small effusion cannot be excluded.", {(PN, U), (EF, U)}),
]

# ------------------------------------------------------------------------------------- scope termination
SCOPE = [
    ("No pneumothorax, but there is a small left pleural effusion.", {(PX, A), (EF, P)}),
    ("No other abnormality, however a small left effusion persists.", {(EF, P)}),
    ("No focal consolidation; mild bibasilar atelectasis.", {(CO, A), (AT, P)}),
    ("No pleural effusion although mild cardiomegaly is seen.", {(EF, A), (CM, P)}),
    ("No other finding though a small right pneumothorax is present.", {(PX, P)}),
    ("Possible lingular pneumonia, which is superimposed on chronic atelectasis.", {(PN, U), (AT, P)}),
    ("No effusion. Small right pneumothorax.", {(EF, A), (PX, P)}),
    ("No edema\n \nModerate cardiomegaly", {(ED, A), (CM, P)}),
    ("Possible small effusion, no pneumothorax.", {(EF, U), (PX, A)}),
    ("No pneumothorax is seen and the ET tube is in standard position.", {(PX, A), ("endotracheal tube", P)}),
    ("No effusion, and the heart is moderately enlarged.", {(EF, A), (CM, P)}),
    ("Cannot exclude a small left effusion, which is associated with mild atelectasis.", {(EF, U), (AT, P)}),
    ("No pneumothorax except for a tiny left apical one.", {(PX, A)}),
    ("The right effusion has resolved, but left basilar atelectasis persists.", {(EF, A), (AT, P)}),
]

# ---------------------------------------------------------------------------- phrasings that need care
CARE = [
    ("No focal consolidation to suggest pneumonia.", {(CO, A), (PN, A)}),
    ("Findings to suggest pneumonia in the lingula.", {(PN, U)}),
    ("Pulmonary edema is likely, though infection is difficult to exclude.", {(ED, U), (PN, U)}),
    ("No pneumothorax is identified after chest tube removal.", {(PX, A), ("chest tube", A)}),
    ("Right pleural effusion has not resolved.", {(EF, P)}),
    ("Subsegmental atelectasis at the left base, otherwise no focal consolidation.",
     {(AT, P, "left lung base"), (CO, A, None)}),
    ("Hazy opacity may represent mild edema or atypical infection.", {(OP, P), (ED, U), (PN, U)}),
    ("Moderate right pleural effusion with adjacent atelectasis, likely compressive.", {(EF, P), (AT, P)}),
    ("Streaky left basilar opacities are most likely atelectasis.", {(OP, P), (AT, U)}),
    ("Pneumonia is likely.", {(PN, U)}),
    ("There is mild blunting of the right costophrenic angle, likely a small effusion.", {(EF, U)}),
    ("Blunting of the left costophrenic angle may reflect a small effusion.", {(EF, U)}),
    ("Left lower lobe volume loss with partial atelectasis.", {(AT, P)}),
    ("Left lower lobe volume loss.", {(AT, P)}),
    ("The left costophrenic angle is blunted.", {(EF, P)}),
    ("The left costophrenic angle is not blunted.", {(EF, A)}),
    ("Pericardial effusion is unchanged; no pleural effusion.", {("pericardial effusion", P), (EF, A)}),
    ("There is no change from the prior study.", set()),
    ("The tip of the right PICC is not well visualized.", {("picc", P)}),
    ("Mild pulmonary vascular congestion without frank edema.", {(ED, P), (ED, A)}),
    ("Lungs are clear of consolidation.", CLEAR),
    ("Tubes and lines are in standard position.", {("support device", P)}),
]

# ------------------------------------------------------------------------------------ list coordination
LISTS = [
    ("No pleural effusion, pneumothorax, or focal consolidation.", {(EF, A), (PX, A), (CO, A)}),
    ("No pneumothorax, pleural effusion or pulmonary edema is seen.", {(PX, A), (EF, A), (ED, A)}),
    ("The lungs are clear without consolidation, effusion or pneumothorax.",
     CLEAR - {(CO, A)} | {(CO, A), (EF, A), (PX, A)}),
    ("There is no focal airspace disease, effusion, or pneumothorax.", {(OP, A), (EF, A), (PX, A)}),
    ("Pneumothorax and pleural effusion have resolved.", {(PX, A), (EF, A)}),
    ("No large pleural effusion or pneumothorax.", {(EF, A), (PX, A)}),
    ("Neither effusion nor pneumothorax.", {(EF, A), (PX, A)}),
    ("No pulmonary nodules or masses are identified.", {("nodule", A), ("mass", A)}),
]

# ------------------------------------------------------------------------------- implied and predicate forms
IMPLIED = [
    ("No acute cardiopulmonary process.", NACP),
    ("No acute intrathoracic abnormality.", NACP),
    ("No evidence of acute cardiopulmonary disease.", NACP),
    ("The lungs are clear.", CLEAR),
    ("Lungs clear.", CLEAR),
    ("The lungs are well expanded and clear.", CLEAR),
    ("Clear lungs.", CLEAR),
    ("The cardiomediastinal silhouette is normal.", {(EC, A), (CM, A)}),
    ("Normal cardiomediastinal silhouette.", {(EC, A), (CM, A)}),
    ("Mediastinal contours are normal.", {(EC, A)}),
    ("Heart size and mediastinal contours are within normal limits.", {(CM, A), (EC, A)}),
    ("Heart size is normal. The lungs are clear.", {(CM, A)} | CLEAR),
    ("Small left effusion. Otherwise, no acute cardiopulmonary process.", {(EF, P), (CO, A), (ED, A), (PX, A),
                                                                          (PN, A)}),
    ("The lungs are clear. Right lower lobe pneumonia cannot be excluded.", {(OP, A), (CO, A), (ED, A), (PN, U)}),
    ("The costophrenic angles are sharp.", {(EF, A)}),
    ("The osseous structures are intact.", {(FX, A)}),
    ("No acute osseous abnormality.", {(FX, A)}),
    ("The patient has been extubated.", {("endotracheal tube", A)}),
    ("Normal chest radiograph.", set()),  # deliberately not expanded: too broad to guess what it excludes
    ("The lungs are not clear.", set()),
]

# --------------------------------------------------------------------------------------------- interval change
CHANGE = [
    ("Unchanged small left pleural effusion.", EF, P, "unchanged"),
    ("Stable mild cardiomegaly.", CM, P, "unchanged"),
    ("Persistent right lower lobe atelectasis.", AT, P, "unchanged"),
    ("Again seen is a small right apical pneumothorax.", PX, P, "unchanged"),
    ("Redemonstrated left basilar opacity.", OP, P, "unchanged"),
    ("The left effusion is unchanged from the prior study.", EF, P, "unchanged"),
    ("No change in the moderate right pleural effusion.", EF, P, "unchanged"),
    ("No interval change in bibasilar atelectasis.", AT, P, "unchanged"),
    ("No significant change in the left lower lobe consolidation.", CO, P, "unchanged"),
    ("No increase in the size of the right effusion.", EF, P, "unchanged"),
    ("The left effusion has not changed.", EF, P, "unchanged"),
    ("Partially resolved right pneumothorax.", PX, P, "decreased"),
    ("Increased left pleural effusion.", EF, P, "increased"),
    ("The right pneumothorax is larger than before.", PX, P, "increased"),
    ("Decreased pulmonary edema.", ED, P, "decreased"),
    ("Worsening pulmonary edema.", ED, P, "worsened"),
    ("Improving right lower lobe consolidation.", CO, P, "improved"),
    ("New right internal jugular central line.", "central venous catheter", P, "new"),
    ("Interval development of a small left effusion.", EF, P, "new"),
    ("Interval resolution of the right pneumothorax.", PX, A, "resolved"),
    ("The ET tube has been removed.", "endotracheal tube", A, "resolved"),
    ("No new consolidation.", CO, A, None),
]

# ----------------------------------------------------------------------------------------------------- devices
DEVICES = [
    ("ET tube terminates 4 cm above the carina.", {("endotracheal tube", P, "carina")}),
    ("Endotracheal tube in standard position.", {("endotracheal tube", P, None)}),
    ("The ETT tip is at the thoracic inlet.", {("endotracheal tube", P, None)}),
    ("Nasogastric tube terminates in the stomach.", {("nasogastric tube", P, "stomach")}),
    ("Enteric tube with tip in the stomach.", {("nasogastric tube", P, "stomach")}),
    ("Feeding tube coils in the stomach.", {("nasogastric tube", P, "stomach")}),
    ("OG tube in appropriate position.", {("nasogastric tube", P, None)}),
    ("Right IJ central venous catheter with tip in the mid SVC.", {("central venous catheter", P, "SVC")}),
    ("Left subclavian line ends at the cavoatrial junction.",
     {("central venous catheter", P, "cavoatrial junction")}),
    ("A CVC is in place.", {("central venous catheter", P, None)}),
    ("Left PICC with tip in the distal SVC.", {("picc", P, "SVC")}),
    ("Left-sided pacemaker with leads in the right atrium and right ventricle.",
     {("pacemaker", P, "right atrium")}),
    ("Left chest wall ICD in place.", {("pacemaker", P, "left chest wall")}),
    ("Right chest tube in place.", {("chest tube", P, None)}),
    ("Median sternotomy wires are intact.", {("sternotomy wires", P, None)}),
    ("Surgical clips project over the upper abdomen.", {("surgical clips", P, "abdomen")}),
    ("Lines and tubes are unchanged.", {("support device", P, None)}),
    ("The chest tube has been removed.", {("chest tube", A, None)}),
    ("Interval removal of the left internal jugular line.", {("central venous catheter", A, None)}),
]

# ----------------------------------------------------------------------------------------------------- anatomy
ANATOMY_CASES = [
    ("Opacity in the right lower lobe.", {(OP, P, "right lower lobe")}),
    ("Right lower lobe opacity.", {(OP, P, "right lower lobe")}),
    ("RLL consolidation.", {(CO, P, "right lower lobe")}),
    ("Left basilar atelectasis.", {(AT, P, "left lung base")}),
    ("Bibasilar atelectasis.", {(AT, P, "lung bases")}),
    ("Atelectasis at both lung bases.", {(AT, P, "lung bases")}),
    ("Effusion on the right.", {(EF, P, "right pleural space")}),
    ("Right-sided pleural effusion.", {(EF, P, "right pleural space")}),
    ("Small pleural effusions bilaterally.", {(EF, P, "pleural spaces")}),
    ("Small bilateral pleural effusions.", {(EF, P, "pleural spaces")}),
    ("Blunting of the left costophrenic angle.", {(EF, P, "left costophrenic angle")}),
    ("Small effusion at the right costophrenic angle.", {(EF, P, "right costophrenic angle")}),
    ("Retrocardiac opacity.", {(OP, P, "retrocardiac")}),
    ("Fracture of the left sixth posterior rib.", {(FX, P, "left rib")}),
    ("Healing fractures of the right fourth and fifth ribs.", {(FX, P, "right rib")}),
    ("Mild enlargement of the cardiac silhouette.", {(CM, P, "heart")}),
    ("Widened mediastinum.", {(EC, P, "mediastinum")}),
    ("Small right apical pneumothorax.", {(PX, P, "right apex")}),
    ("Consolidation in the lingula.", {(CO, P, "lingula")}),
    ("Perihilar haziness.", {(OP, P, "perihilar region")}),
    ("Opacities in both upper lobes.", {(OP, P, "upper lobes")}),
    ("Nodule in the right upper lung zone.", {("nodule", P, "right upper lung")}),
    ("Left hilar mass.", {("mass", P, "left hilum")}),
    ("Left lower lobe consolidation and a small left effusion.",
     {(CO, P, "left lower lobe"), (EF, P, "left pleural space")}),
    ("In the right middle lobe there is patchy consolidation.", {(CO, P, "right middle lobe")}),
    ("Opacification of the left lower lobe, consistent with consolidation.",
     {(OP, P, "left lower lobe"), (CO, P, "left lower lobe")}),
    ("No pneumothorax at the right apex.", {(PX, A, "right apex")}),
    ("Left pneumothorax.", {(PX, P, "left pleural space")}),
]


@pytest.mark.parametrize("sentence,expected", NEGATION)
def test_negation(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", UNCERTAINTY)
def test_uncertainty(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", SCOPE)
def test_scope_ends(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", LISTS)
def test_list_coordination(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", IMPLIED)
def test_implied_and_predicates(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", CARE)
def test_phrasings_that_need_care(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", DEVICES)
def test_devices(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,expected", ANATOMY_CASES)
def test_anatomy_attachment(sentence, expected):
    _check(sentence, expected)


@pytest.mark.parametrize("sentence,pathology,certainty,change", CHANGE)
def test_change(sentence, pathology, certainty, change):
    fs = [f for f in extract_findings(sentence) if f.pathology == pathology]
    assert len(fs) == 1, (sentence, fs)
    assert fs[0].certainty == certainty, sentence
    assert fs[0].modifiers.get("change") == change, (sentence, fs[0].modifiers)


def test_implied_flag_marks_only_derived_findings():
    fs = extract_findings("Heart size is normal. The lungs are clear.")
    assert {f.pathology for f in fs if not f.implied} == {CM}
    assert {f.pathology for f in fs if f.implied} == {OP, CO, ED, PN}


# ---------------------------------------------------------------------------------------------------- modifiers
@pytest.mark.parametrize("sentence,pathology,mods", [
    ("Small left pleural effusion.", EF, {"side": "left", "severity": "small"}),
    ("Moderate-sized right-sided pleural effusion.", EF, {"side": "right", "severity": "moderate"}),
    ("Trace bilateral effusions.", EF, {"side": "bilateral", "severity": "trace"}),
    ("Patchy right lower lobe opacity.", OP, {"side": "right", "extent": "patchy"}),
    ("Diffuse interstitial edema, severe.", ED, {"extent": "diffuse", "severity": "severe"}),
    ("Multifocal consolidation.", CO, {"extent": "multifocal"}),
    ("The heart is markedly enlarged.", CM, {"severity": "severe"}),
    ("Minimal bibasilar atelectasis.", AT, {"side": "bilateral", "severity": "minimal"}),
    ("Large right pneumothorax.", PX, {"side": "right", "severity": "large"}),
    ("Mild pulmonary edema.", ED, {"severity": "mild"}),
    ("Cardiomegaly with mild interstitial edema.", CM, {}),  # "mild" belongs to the edema
    ("The right effusion is moderate in size.", EF, {"side": "right", "severity": "moderate"}),
])
def test_modifiers(sentence, pathology, mods):
    f = next(f for f in extract_findings(sentence) if f.pathology == pathology)
    for k, v in mods.items():
        assert f.modifiers.get(k) == v, (sentence, f.modifiers)
    if not mods:
        assert "severity" not in f.modifiers, (sentence, f.modifiers)


def test_a_following_bare_side_word_belongs_to_the_next_noun():
    fs = {f.pathology: f for f in extract_findings("ET tube, NG tube and right IJ line in standard position.")}
    assert "side" not in fs["nasogastric tube"].modifiers
    assert fs["central venous catheter"].modifiers["side"] == "right"


def test_side_goes_to_modifiers_and_anatomy():
    (f,) = extract_findings("Left lower lobe consolidation.")
    assert f.anatomy == "left lower lobe" and f.modifiers["side"] == "left"
    (f,) = extract_findings("Bibasilar atelectasis.")
    assert f.anatomy == "lung bases" and f.modifiers["side"] == "bilateral"


# ------------------------------------------------------------------------------------------ vocabulary folding
@pytest.mark.parametrize("surface,term", [
    ("effusion", EF), ("effusions", EF), ("pleural effusions", EF), ("pleural fluid", EF),
    ("fluid in the pleural space", EF), ("blunting of the costophrenic angle", EF),
    ("blunting of the left costophrenic angle", EF),
    ("enlarged heart", CM), ("heart size is enlarged", CM), ("cardiac enlargement", CM),
    ("enlargement of the cardiac silhouette", CM), ("heart is enlarged", CM), ("The heart is mildly enlarged", CM),
    ("widened mediastinum", EC), ("mediastinal widening", EC), ("enlarged cardiomediastinal silhouette", EC),
    ("opacities", OP), ("opacification", OP), ("opacified", OP), ("infiltrate", OP), ("infiltrates", OP),
    ("airspace disease", OP), ("haziness", OP), ("consolidations", CO), ("infection", PN),
    ("infectious process", PN), ("atelectatic", AT), ("volume loss", AT), ("collapse", AT), ("edema", ED),
    ("vascular congestion", ED), ("interstitial edema", ED), ("fluid overload", ED), ("pneumothoraces", PX),
    ("nodules", "nodule"), ("masses", "mass"), ("lesions", "lesion"), ("fractures", FX), ("fractured", FX),
    ("pleural thickening", "pleural thickening"), ("scarring", "scarring"), ("emphysema", "emphysema"),
    ("hiatal hernia", "hernia"), ("calcifications", "calcification"), ("granuloma", "granuloma"),
    ("ET tube", "endotracheal tube"), ("ETT", "endotracheal tube"), ("NG tube", "nasogastric tube"),
    ("enteric tube", "nasogastric tube"), ("feeding tube", "nasogastric tube"), ("OG tube", "nasogastric tube"),
    ("central line", "central venous catheter"), ("IJ line", "central venous catheter"),
    ("subclavian line", "central venous catheter"), ("CVC", "central venous catheter"), ("PICC line", "picc"),
    ("pacer", "pacemaker"), ("ICD", "pacemaker"), ("leads", "pacemaker"), ("chest tube", "chest tube"),
    ("sternotomy wires", "sternotomy wires"), ("surgical clips", "surgical clips"),
    ("pericardial effusion", "pericardial effusion"), ("CHF", "heart failure"),
])
def test_canonical_pathology(surface, term):
    assert canonical_pathology(surface) == term


def test_canonical_pathology_unknown():
    assert canonical_pathology("banana") is None
    assert canonical_pathology("") is None


@pytest.mark.parametrize("surface,term", [
    ("right lower lobe", "right lower lobe"), ("RLL", "right lower lobe"), ("left basilar", "left lung base"),
    ("bibasilar", "lung bases"), ("both lung bases", "lung bases"), ("right base", "right lung base"),
    ("left costophrenic angle", "left costophrenic angle"), ("costophrenic angles", "costophrenic angles"),
    ("the left sixth posterior rib", "left rib"), ("6th left rib", "left rib"), ("ribs", "ribs"),
    ("apices", "apices"), ("right apical", "right apex"), ("biapical", "apices"), ("hila", "hila"),
    ("left hilar", "left hilum"), ("lingular", "lingula"), ("middle lobe", "right middle lobe"),
    ("retrocardiac", "retrocardiac"), ("cardiac silhouette", "heart"), ("aortic knob", "aorta"),
    ("superior vena cava", "SVC"), ("right hemidiaphragm", "right hemidiaphragm"), ("left hemithorax",
                                                                                   "left hemithorax"),
    ("carina", "carina"), ("trachea", "trachea"), ("stomach", "stomach"), ("mediastinum", "mediastinum"),
    ("perihilar", "perihilar region"), ("lungs", "lungs"), ("bilateral upper lobes", "upper lobes"),
    ("right-sided pleural space", "right pleural space"), ("banana", None),
])
def test_canonical_anatomy(surface, term):
    assert canonical_anatomy(surface) == term
    if term is not None:
        assert term in ANATOMY


def test_vocab_integrity():
    assert all(t.kind in ("finding", "device") for t in PATHOLOGIES.values())
    assert all(t.observation == "Support Devices" for t in PATHOLOGIES.values() if t.kind == "device")
    assert all(a.region for a in ANATOMY.values())
    assert {"right lower lobe", "left lower lobe", "lingula", "lung bases", "apices", "hila", "retrocardiac",
            "mediastinum", "heart", "aorta", "trachea", "carina", "SVC", "stomach", "diaphragm", "left rib",
            "right hemidiaphragm", "right costophrenic angle", "perihilar region", "lungs"} <= set(ANATOMY)


# ----------------------------------------------------------------------------------------------------- spans
def test_spans_point_at_the_mention():
    text = "Small left pleural effusion and right lower lobe opacities.  No pneumothorax."
    fs = extract_findings(text)
    for f in fs:
        assert text[f.span[0]:f.span[1]] == f.surface
    assert [f.surface for f in fs] == ["pleural effusion", "opacities", "pneumothorax"]


def test_spans_across_wrapped_lines():
    text = "FINDINGS:\n There is a small left pleural\n effusion.\n"
    (f,) = extract_findings(text)
    assert f.surface == "pleural\n effusion" and text[f.span[0]:f.span[1]] == f.surface


def test_predicate_span_covers_subject_and_predicate():
    text = "The heart is mildly enlarged."
    (f,) = extract_findings(text)
    assert f.surface == "heart is mildly enlarged"


# --------------------------------------------------------------------------------------------------- sections
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___-year-old man with fever.  Eval for pneumonia.

 COMPARISON:  Chest radiograph ___ showed a right pleural effusion.

 FINDINGS:

 There is a small left pleural effusion.  No pneumothorax.

 IMPRESSION:

 Small left pleural effusion.
"""


def test_sections_filter_skips_indication_and_comparison():
    fs = extract_findings(REPORT)
    assert {(f.pathology, f.certainty) for f in fs} == {(EF, P), (PX, A)}
    assert all(REPORT[f.span[0]:f.span[1]] == f.surface for f in fs)
    assert len([f for f in fs if f.pathology == EF]) == 2  # one in findings, one in impression
    assert all(f.span[0] > REPORT.index("FINDINGS") for f in fs)


def test_sections_subset_and_none():
    only_impr = extract_findings(REPORT, sections=("impression",))
    assert [(f.pathology, f.certainty) for f in only_impr] == [(EF, P)]
    everything = _pairs(REPORT, sections=None)
    assert (PN, U) in everything  # the indication's "Eval for pneumonia" when everything is read


def test_indication_never_read():
    text = " INDICATION:  eval for pneumonia\n \n FINDINGS:  Lungs are clear.\n"
    assert PN not in {f.pathology for f in extract_findings(text) if not f.implied}
    with pytest.raises(ValueError, match="indication"):
        extract_findings(text, sections=("indication",))


def test_headerless_text_is_read_whole():
    assert _pairs("Moderate cardiomegaly.\n \nNo pneumothorax.") == {(CM, P), (PX, A)}


# ------------------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("text", ["", "   ", "\n \n", "?", ";;;", "...", "No", "No.", "versus",
                                  "Pleuraerguss links — Größe unverändert. İ ŞĞ ß ﬁ effusion ✓",
                                  "\x00\x01 effusion \ud7ff", " IMPRESSION: \n", "FINDINGS:"])
def test_odd_inputs_do_not_crash(text):
    fs = extract_findings(text)
    for f in fs:
        assert isinstance(f, Finding) and text[f.span[0]:f.span[1]] == f.surface
    # the only pathology word in these inputs is "effusion": it is read as a present effusion, nothing else is
    want = [("pleural effusion", "present")] if "effusion" in text else []
    assert [(f.pathology, f.certainty) for f in fs] == want
    assert extract_findings(text) == fs


def test_non_ascii_keeps_spans():
    text = "İİİ Größe: small left pleural effusion."
    (f,) = extract_findings(text)
    assert text[f.span[0]:f.span[1]] == "pleural effusion"


def test_very_long_input():
    unit = "No pleural effusion.  Moderate cardiomegaly.  Possible left basilar atelectasis.  "
    text = unit * (50_000 // len(unit) + 1)
    assert len(text) >= 50_000
    t = time.perf_counter()
    fs = extract_findings(text)
    assert time.perf_counter() - t < 5.0
    assert len(fs) == 3 * (50_000 // len(unit) + 1)
    one_line = "effusion " * 6000  # no sentence end at all
    assert len(extract_findings(one_line)) == 6000


def test_rejects_non_string():
    with pytest.raises(TypeError):
        extract_findings(None)
