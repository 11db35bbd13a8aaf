"""The prompts stage on a tiny phantom: outputs, labels of prompts, paired prompts, and measured quality."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from cxrsynth.config import FixtureParams, IngestParams, PromptsParams
from cxrsynth.stages.ingest import ingest
from cxrsynth.data.phantom.dataset import generate
from cxrsynth.stages.prompts import run
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.specs import Vocabulary

PARAMS = PromptsParams(min_count=2, n_sampled=40)


@pytest.fixture(scope="module")
def interim(tmp_path_factory):
    base = tmp_path_factory.mktemp("p")
    generate(FixtureParams(cohort="t", sizes={"t": 40}, contact_sheet_images=1), 0, base / "raw", None,
             base / "phantom", workers=0)
    ingest(IngestParams(image_size=16, grid_images=1), base / "raw", base / "nojpg", base / "interim", workers=0)
    return base


def test_stage_outputs_and_metrics(interim, tmp_path):
    m = run(PARAMS, 0, interim / "interim" / "manifest.parquet", tmp_path, interim / "phantom" / "ground_truth.jsonl")
    vocab = Vocabulary.from_json((tmp_path / "vocab.json").read_text())
    assert vocab.pathologies and vocab.anatomy
    findings = pd.read_parquet(tmp_path / "findings.parquet")
    manifest = pd.read_parquet(interim / "interim" / "manifest.parquet")
    assert set(findings.study_id) == set(manifest.study_id)
    prompts = pd.read_parquet(tmp_path / "prompts.parquet")
    assert (prompts.kind == "sampled").sum() == 40
    test_studies = set(manifest[manifest.split == "test"].study_id)
    paired = prompts[prompts.kind == "paired"]
    assert set(paired.source_study_id) == test_studies and paired.prompt_id.is_unique
    assert prompts.prompt_id.is_unique
    for r in prompts.itertuples(index=False):
        terms = json.loads(r.terms)
        positive = {t["pathology"] for t in terms if t["certainty"] != "absent"}
        if not positive:
            assert prompts.loc[prompts.prompt_id == r.prompt_id, "No Finding"].iat[0] == 1.0
    assert m["prompts/round_trip_exact"] >= 0.95
    assert m["labels/macro_agreement"] >= 0.95
    assert m["extraction/present/macro_f1"] >= 0.95 and m["extraction/absent/macro_f1"] >= 0.95
    assert m["extraction/uncertain/macro_f1"] >= 0.85
    assert m["counts/reports"] == findings.shape[0]
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_same_seed_same_prompts_other_seed_other_prompts(interim, tmp_path):
    man = interim / "interim" / "manifest.parquet"
    run(PARAMS, 0, man, tmp_path / "a", None)
    run(PARAMS, 0, man, tmp_path / "b", None)
    run(PARAMS, 1, man, tmp_path / "c", None)
    a, b, c = (pd.read_parquet(tmp_path / k / "prompts.parquet") for k in "abc")
    pd.testing.assert_frame_equal(a, b)
    assert list(a.text) != list(c.text)
    assert (tmp_path / "a" / "vocab.json").read_bytes() == (tmp_path / "b" / "vocab.json").read_bytes()


def test_label_mixes(interim, tmp_path):
    man = interim / "interim" / "manifest.parquet"
    tables, normal = {}, {}
    for mix in ("prevalence", "balanced", "test"):
        run(replace(PARAMS, label_mix=mix, paired=False, n_sampled=200), 0, man, tmp_path / mix, None)
        p = pd.read_parquet(tmp_path / mix / "prompts.parquet")
        assert len(p) == 200 and set(OBSERVATIONS) <= set(p.columns)
        labels = p[[o for o in OBSERVATIONS if o != "No Finding"]].to_numpy(dtype=np.float64)
        tables[mix] = labels
        normal[mix] = float((~(labels == 1).any(axis=1)).mean())   # prompts asking for no finding at all
    # the mix decides what is asked for: same seed, three different label tables
    assert not np.array_equal(tables["prevalence"], tables["balanced"], equal_nan=True)
    assert not np.array_equal(tables["test"], tables["balanced"], equal_nan=True)
    # balanced draws "normal" as one class among all pathologies: far rarer than the mined normal share
    assert normal["balanced"] < normal["prevalence"], normal
