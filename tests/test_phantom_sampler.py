"""The phantom's ground-truth sampler: realistic prevalence and co-occurrence, unique well-formed identifiers."""
import re
from collections import Counter

import numpy as np
import pytest

from cxrsynth.config import FixtureParams
from cxrsynth.data.phantom.sampler import sample_dataset
from cxrsynth.data.phantom.truth import KIND_OBSERVATION, Finding, finding_anatomy


@pytest.fixture(scope="module")
def default_truth():
    return sample_dataset(FixtureParams(), seed=0)


def _studies(patients):
    return [s for p in patients for s in p.studies]


def test_prevalence_resembles_mimic(default_truth):
    studies = _studies(default_truth)
    n = len(studies)
    obs = Counter(o for s in studies for o in {f.observation for f in s.findings})
    assert len(obs) >= 12  # at least 12 of the 13 non-"No Finding" CheXpert observations are drawn
    share = {k: v / n for k, v in obs.items()}
    assert 0.2 <= sum(1 for s in studies if not s.findings) / n <= 0.45  # normal studies
    assert 0.15 <= share["Pleural Effusion"] <= 0.35
    assert 0.15 <= share["Support Devices"] <= 0.4
    assert 0.1 <= share["Cardiomegaly"] <= 0.3
    assert 0.01 <= share["Pneumothorax"] <= 0.08
    assert share["Pleural Other"] < 0.05


def _odds_ratio(studies, a, b):
    has = [({f.kind for f in s.findings} >= {a}, {f.kind for f in s.findings} >= {b}) for s in studies]
    n11 = sum(x and y for x, y in has) + 0.5
    n10 = sum(x and not y for x, y in has) + 0.5
    n01 = sum(y and not x for x, y in has) + 0.5
    n00 = sum(not x and not y for x, y in has) + 0.5
    return n11 * n00 / (n10 * n01)


def test_findings_co_occur_clinically(default_truth):
    studies = _studies(default_truth)
    assert _odds_ratio(studies, "effusion", "atelectasis") > 2
    assert _odds_ratio(studies, "edema", "cardiomegaly") > 2
    assert _odds_ratio(studies, "et_tube", "ng_tube") > 2
    # ICU devices come with portable AP films
    dev = [s for s in studies if any(f.kind == "et_tube" for f in s.findings)]
    assert np.mean([s.images[0].view == "AP" for s in dev]) > 0.7


def test_ctr_above_half_exactly_for_cardiomegaly(default_truth):
    for s in _studies(default_truth):
        assert (s.ctr > 0.5) == any(f.kind == "cardiomegaly" for f in s.findings)


def test_identifiers_are_well_formed_and_unique(default_truth):
    subjects = [p.subject_id for p in default_truth]
    studies = [s.study_id for s in _studies(default_truth)]
    dicoms = [im.dicom_id for s in _studies(default_truth) for im in s.images]
    assert len(set(subjects)) == len(subjects) and len(set(studies)) == len(studies)
    assert len(set(dicoms)) == len(dicoms)
    assert all(re.fullmatch(r"1\d{7}", str(x)) for x in subjects)
    assert all(re.fullmatch(r"5\d{7}", str(x)) for x in studies)
    assert all(re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", d) for d in dicoms)
    assert all(p.patient_name.startswith("PHANTOM^") for p in default_truth)


def test_follow_ups_reference_their_prior_and_move_forward_in_time(default_truth):
    multi = [p for p in default_truth if len(p.studies) > 1]
    assert len(multi) > 20
    for p in multi:
        for prev, cur in zip(p.studies, p.studies[1:]):
            assert cur.prior_study_id == prev.study_id
            assert cur.study_date > prev.study_date
            assert all(f.change is not None for f in cur.findings)


def test_sampler_is_deterministic_and_seed_sensitive():
    small = FixtureParams(cohort="tiny")
    a, b, c = sample_dataset(small, 1), sample_dataset(small, 1), sample_dataset(small, 2)
    assert a == b
    assert [p.subject_id for p in a] != [p.subject_id for p in c]


def test_every_kind_has_an_anatomy_term():
    for kind in KIND_OBSERVATION:
        for side in ("left", "right", "bilateral", None):
            term = finding_anatomy(Finding(kind, side, "moderate" if kind != "nodule" else "small",
                                           {"rib_fracture": "6", "pleural_thickening": "apical",
                                            "atelectasis": "base"}.get(kind, "lower")))
            assert term and "None" not in term
    with pytest.raises(ValueError, match="unknown finding kind"):
        Finding("alien")
