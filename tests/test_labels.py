"""CheXpert-style labels: aggregation, the labelled section, and agreement with the phantom's own labels.

The phantom's report writer (cxrsynth.data.phantom.reports) records, for every sentence it writes, the CheXpert
mentions a labeler should read, and the study's label row. The labeler here never sees those: it reads the text.
"""
from collections import Counter

import numpy as np
import pytest

from cxrsynth.config import FixtureParams
from cxrsynth.data.phantom.reports import write_report
from cxrsynth.data.phantom.sampler import sample_dataset
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.findings import extract_findings
from cxrsynth.text.labels import chexpert_labels, chexpert_mentions, label_text, labels_from_findings

LABELLED = ("findings", "impression", "last_paragraph")


def _lab(text):
    return {k: v for k, v in chexpert_labels(text).items() if v is not None}


# -------------------------------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("text,expected", [
    # any positive wins
    ("No pleural effusion. Small right pleural effusion.", {"Pleural Effusion": 1.0}),
    ("Possible left effusion. Moderate left effusion.", {"Pleural Effusion": 1.0}),
    # negative + uncertain -> uncertain
    ("No pneumonia. Cannot exclude early pneumonia.", {"Pneumonia": -1.0}),
    # negative only
    ("No pneumothorax.", {"Pneumothorax": 0.0, "No Finding": 1.0}),
    # No Finding: nothing but support devices positive or uncertain
    ("ET tube in standard position. No pneumothorax.",
     {"Support Devices": 1.0, "Pneumothorax": 0.0, "No Finding": 1.0}),
    ("Possible right PICC.", {"Support Devices": -1.0, "No Finding": 1.0}),
    ("Possible small left effusion.", {"Pleural Effusion": -1.0}),
    ("Mild cardiomegaly.", {"Cardiomegaly": 1.0}),
    ("", {}),  # nothing to label: an all-empty row
    ("   \n \n", {}),
    ("No acute cardiopulmonary process.", {"No Finding": 1.0}),
    # heart failure: an uncertain cardiomegaly (CheXpert), unless cardiomegaly is stated
    ("Findings consistent with congestive heart failure.", {"Cardiomegaly": -1.0}),
    ("Mild CHF.", {"Cardiomegaly": -1.0}),
    ("Cardiomegaly and mild CHF.", {"Cardiomegaly": 1.0}),
    ("Heart size is normal. Possible mild CHF.", {"Cardiomegaly": -1.0}),
    ("No evidence of CHF.", {"No Finding": 1.0}),
    # one observation per term
    ("Right lower lobe consolidation.", {"Consolidation": 1.0}),
    ("Right lower lobe opacity.", {"Lung Opacity": 1.0}),
    ("Left lower lobe opacity may represent pneumonia.", {"Lung Opacity": 1.0, "Pneumonia": -1.0}),
    ("Mild pulmonary vascular congestion.", {"Edema": 1.0}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1.0}),
    ("Right upper lobe nodule and a left hilar mass.", {"Lung Lesion": 1.0}),
    ("Nondisplaced fracture of the left sixth rib.", {"Fracture": 1.0}),
    ("Left apical pleural thickening.", {"Pleural Other": 1.0}),
    ("Blunting of the left costophrenic angle.", {"Pleural Effusion": 1.0}),
    ("Pacemaker leads and sternotomy wires are intact.", {"Support Devices": 1.0, "No Finding": 1.0}),
    ("Moderate hiatal hernia.", {"No Finding": 1.0}),  # not a CheXpert observation
    ("The ET tube has been removed.", {"Support Devices": 0.0, "No Finding": 1.0}),
])
def test_aggregation(text, expected):
    assert _lab(text) == expected


def test_implied_findings_are_not_labelled():
    # extract_findings reads "lungs are clear" / "no acute cardiopulmonary process" as absences; CheXpert does not
    text = "The lungs are clear. No acute cardiopulmonary process."
    assert {f.pathology for f in extract_findings(text)} >= {"opacity", "pneumothorax", "pleural effusion"}
    assert _lab(text) == {"No Finding": 1.0}
    assert _lab("The cardiomediastinal silhouette is normal.") == {"Enlarged Cardiomediastinum": 0.0,
                                                                    "No Finding": 1.0}


def test_labels_from_findings_matches_chexpert_labels():
    text = "Small left effusion. Possible left lower lobe pneumonia. No pneumothorax. Right IJ line in the SVC."
    assert labels_from_findings(extract_findings(text)) == chexpert_labels(text)
    assert list(chexpert_labels(text)) == list(OBSERVATIONS)


def test_chexpert_mentions_drop_non_chexpert_terms():
    ms = chexpert_mentions(extract_findings("Emphysema. Calcified granuloma. Hiatal hernia."))
    assert ms == []


# ---------------------------------------------------------------------------------------------- labelled section
def _report(findings=None, impression=None, indication="eval for pneumonia"):
    lines = ["                                 FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             f" INDICATION:  {indication}", " ", " COMPARISON:  None."]
    if findings is not None:
        lines += [" ", " FINDINGS:", " ", f" {findings}"]
    if impression is not None:
        lines += [" ", " IMPRESSION:", " ", f" {impression}"]
    return "\n".join(lines) + "\n"


def test_impression_wins_over_findings():
    text = _report(findings="No pleural effusion.", impression="Small left pleural effusion.")
    assert _lab(text)["Pleural Effusion"] == 1.0


def test_only_the_impression_counts_when_present():
    text = _report(findings="Small left pleural effusion. Mild cardiomegaly.", impression="No acute process.")
    assert _lab(text) == {"No Finding": 1.0}


def test_findings_labelled_when_no_impression():
    text = _report(findings="Small left pleural effusion.")
    assert _lab(text) == {"Pleural Effusion": 1.0}


def test_indication_is_never_labelled():
    text = _report(findings="Lungs are clear.", indication="eval for pneumonia? r/o effusion")
    assert _lab(text) == {"No Finding": 1.0}


def test_report_without_conclusion_section_is_unlabelled():
    text = " INDICATION:  cough\n \n TECHNIQUE:  PA and lateral\n"
    assert _lab(text) == {}


def test_headerless_text_uses_last_paragraph_or_whole_text():
    assert _lab("Moderate cardiomegaly.") == {"Cardiomegaly": 1.0}
    two = "                                 FINAL REPORT\n Mild cardiomegaly.\n \n No pneumothorax.\n"
    assert label_text(two).strip() == "No pneumothorax."  # the official sectioner's last paragraph
    assert _lab(two) == {"Pneumothorax": 0.0, "No Finding": 1.0}


# ----------------------------------------------------------------------------------- agreement with the phantom
@pytest.fixture(scope="module")
def phantom_reports():
    """Reports (and their truth labels) for two tiny phantom datasets: ~550 studies, every report style."""
    out = []
    for seed in (3, 11):
        for patient in sample_dataset(FixtureParams(cohort="tiny", sizes={"tiny": 150}), seed=seed):
            prior = None
            for study in patient.studies:
                out.append(write_report(study, prior, patient.anatomy, np.random.default_rng(study.study_id)))
                prior = study
    return out


def test_report_labels_agree_with_phantom(phantom_reports):
    agree = Counter()
    for rep in phantom_reports:
        got = chexpert_labels(rep.text)
        for obs in OBSERVATIONS:
            agree[obs] += got[obs] == rep.labels[obs]
    n = len(phantom_reports)
    table = {obs: agree[obs] / n for obs in OBSERVATIONS}
    print(f"\nper-label agreement over {n} phantom reports")
    for obs, v in table.items():
        print(f"  {obs:28s} {v:.4f}")
    macro = sum(table.values()) / len(table)
    print(f"  {'macro':28s} {macro:.4f}")
    assert macro >= 0.97
    assert min(table.values()) >= 0.9


def _f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def test_statement_mentions_agree_with_phantom(phantom_reports):
    exact = total = 0
    tp, fp, fn = Counter(), Counter(), Counter()
    wrong = []
    for rep in phantom_reports:
        for sec in LABELLED:
            for st in rep.sections.get(sec, []):
                got = {(m.observation, m.certainty)
                       for m in chexpert_mentions(extract_findings(st.text, sections=None))}
                want = {(m.observation, m.certainty) for m in st.mentions}
                total += 1
                exact += got == want
                if got != want:
                    wrong.append((st.text, sorted(got), sorted(want)))
                for o, c in got & want:
                    tp[c] += 1
                for o, c in got - want:
                    fp[c] += 1
                for o, c in want - got:
                    fn[c] += 1
    f1 = {c: _f1(tp[c], fp[c], fn[c]) for c in ("present", "absent", "uncertain")}
    print(f"\nstatements: {total}, exact mention sets {exact / total:.4f}; F1 " +
          ", ".join(f"{c} {v:.4f} (support {tp[c] + fn[c]})" for c, v in f1.items()))
    for w in wrong[:10]:
        print("  mismatch:", w)
    assert exact / total >= 0.95
    assert (f1["present"] + f1["absent"]) / 2 >= 0.95
    assert f1["uncertain"] >= 0.85
