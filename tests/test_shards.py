"""Sharded ingest and synthesize: shards merged in any order give the unsharded run's files byte for byte (metrics
timings aside); merges of incomplete, duplicated or foreign shards stop with a line naming the problem."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from test_ingest import FIX
from test_synthesis import K, TEXTS, tiny_generator

from cxrsynth.data.phantom.dataset import generate
from cxrsynth.keypatches import terms_of_text
from cxrsynth.models.vqgan import VQGAN, VQGANConfig
from cxrsynth.shards import ShardError, check_shards, parse_shard, shard_range, write_shard
from cxrsynth.stages import ingest as ingest_stage
from cxrsynth.stages import synthesize as synthesize_stage

TIMING = {"images_per_second", "sample_seconds", "seconds"}  # wall-clock fields: the only ones allowed to differ
PARAMS = {"base": {"seed": 0, "device": "cpu", "num_workers": 0},
          "paths": {"raw": "raw/mimic-cxr", "raw_jpg": "raw/mimic-cxr-jpg", "interim": "interim", "prompts": "prompts",
                    "models": "models", "metrics": "metrics", "synthetic": "synthetic"},
          "ingest": {"image_size": 32, "grid_images": 4},
          "synthesize": {"samples_per_prompt": 2, "batch_size": 3, "write_dicom": True, "contact_sheet_images": 4}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A working folder as the stages see it: params.yaml, a phantom raw tree, tiny models, prompts.parquet."""
    root = tmp_path_factory.mktemp("project")
    generate(FIX, 0, root / "raw" / "mimic-cxr", root / "raw" / "mimic-cxr-jpg", root / "raw" / "phantom", workers=0)
    gen = tiny_generator()
    torch.manual_seed(0)
    VQGAN(VQGANConfig(image_size=16, channels=32, channel_mult=(1, 1, 2), z_channels=8, embed_dim=8, codebook_size=K,
                      quantizer="vq2")).save(root / "models" / "vqgan")
    gen.save(root / "models" / "generator")
    prompts = [{"prompt_id": f"s{i}", "text": t, "view": ("AP", "PA")[i % 2], "kind": "sampled", "seed": i,
                "terms": json.dumps([asdict(x) for x in terms_of_text(t)]), "Pleural Effusion": float(i == 0),
                "source_study_id": 100.0 + i if i > 2 else float("nan"), "source_dicom_id": f"d{i}" if i > 2 else None}
               for i, t in enumerate(TEXTS[:5])]
    (root / "prompts").mkdir()
    pd.DataFrame(prompts).to_parquet(root / "prompts" / "prompts.parquet", index=False)
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    return root


def run(stage, cwd: Path, *args: str) -> None:
    with contextlib.chdir(cwd):
        stage.main(list(args))


def fails(stage, cwd: Path, capsys, *args: str) -> str:
    """The one-line error of a stage run that must stop with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(stage, cwd, *args)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def assert_same_outputs(a: Path, b: Path, metrics_a: Path, metrics_b: Path) -> dict:
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()] == []
    ma, mb = json.loads(metrics_a.read_text()), json.loads(metrics_b.read_text())
    assert ma.keys() == mb.keys() and TIMING & ma.keys()
    assert {k: v for k, v in ma.items() if k not in TIMING} == {k: v for k, v in mb.items() if k not in TIMING}
    return mb


@pytest.mark.parametrize("n, count", [(0, 1), (0, 3), (1, 1), (5, 3), (10, 4), (3, 7), (22, 3), (101, 9)])
def test_shard_ranges_cover_every_item_exactly_once(n, count):
    ranges = [shard_range(n, i, count) for i in range(count)]
    assert [k for start, stop in ranges for k in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1  # balanced; with count > n some shards are empty


def test_bad_shard_values_are_refused():
    assert parse_shard("2/3") == (2, 3) and parse_shard("0/1") == (0, 1)
    for bad in ("3/2", "2/2", "0/0", "x", "1", "-1/2", "1/2/3", "", "a/b"):
        with pytest.raises(ShardError, match="--shard"):
            parse_shard(bad)
    for args in ((5, 3, 3), (5, -1, 3), (5, 0, 0), (-1, 0, 1)):
        with pytest.raises(ShardError):
            shard_range(*args)


def test_check_shards_names_what_is_wrong(tmp_path):
    def shard(name, i, count=3, n=10, params="p", work="w", stage="ingest"):
        write_shard(tmp_path / name, stage, i, count, n, params_sha256=params, work_sha256=work)
        return tmp_path / name

    good = [shard(f"s{i}", i) for i in range(3)]
    assert [s.index for s in check_shards(good[::-1], "ingest", "p")] == [0, 1, 2]
    cases = [([good[0], good[2]], "shard 1/3 missing"),
             ([*good, good[1]], "shard 1/3 given twice"),
             ([good[0], shard("o", 1, params="q"), good[2]], "other ingest params than the current params.yaml"),
             ([good[0], shard("w", 1, work="v"), good[2]], "different runs"),
             ([good[0], shard("n", 1, count=2), good[2]], "different splits"),
             ([good[0], shard("y", 1, stage="synthesize"), good[2]], "not 'ingest'"),
             ([good[0], tmp_path, good[2]], "no shard.json")]
    for folders, message in cases:
        with pytest.raises(ShardError, match=message):
            check_shards(folders, "ingest", "p")
    with pytest.raises(ShardError, match="other ingest params"):
        check_shards(good, "ingest", "q")
    with pytest.raises(ShardError, match="cannot write into a shard folder"):
        check_shards(good, "ingest", "p", out=good[1])


@pytest.fixture(scope="module")
def ingest_runs(project):
    """An unsharded ingest and three shards of it."""
    run(ingest_stage, project)
    for i in range(3):
        run(ingest_stage, project, "--shard", f"{i}/3", "--out", f"shards/ingest{i}")
    return [project / "shards" / f"ingest{i}" for i in range(3)]


def test_ingest_shards_merge_into_the_unsharded_outputs(project, ingest_runs):
    ranges = [json.loads((d / "shard.json").read_text()) for d in ingest_runs]
    assert [(r["start"], r["stop"]) for r in ranges] == [shard_range(ranges[0]["n"], i, 3) for i in range(3)]
    run(ingest_stage, project, "--merge", *map(str, [ingest_runs[2], ingest_runs[0], ingest_runs[1]]),
        "--out", "merged/interim", "--metrics", "merged/ingest.json")
    m = assert_same_outputs(project / "interim", project / "merged" / "interim", project / "metrics" / "ingest.json",
                            project / "merged" / "ingest.json")
    assert m["read"] == m["accepted"] + m["rejected"]
    # not vacuous: decode failures (found by the shards) and table-level rejections (by collect) both merged
    assert {"corrupt", "truncated", "view_excluded", "report_missing"} <= m["rejected_by_reason"].keys()


def test_ingest_merge_refuses_missing_duplicated_and_foreign_shards(project, ingest_runs, capsys):
    d = list(map(str, ingest_runs))
    assert "shard 1/3 missing" in fails(ingest_stage, project, capsys, "--merge", d[0], d[2], "--out", "bad")
    assert "shard 2/3 given twice" in fails(ingest_stage, project, capsys, "--merge", *d, d[2], "--out", "bad")
    other = project / "other"  # the same data, other ingest params
    other.mkdir()
    params = {**PARAMS, "paths": {k: f"../{v}" for k, v in PARAMS["paths"].items()},
              "ingest": {**PARAMS["ingest"], "grid_images": 3}}
    (other / "params.yaml").write_text(yaml.safe_dump(params))
    run(ingest_stage, other, "--shard", "1/3", "--out", "../shards/other1")
    err = fails(ingest_stage, project, capsys, "--merge", d[0], str(project / "shards" / "other1"), d[2],
                "--out", "bad")
    assert err.startswith("ingest error: shard 1/3") and "other ingest params than the current params.yaml" in err
    assert fails(ingest_stage, project, capsys, "--shard", "3/2", "--out", "x") == (
        "ingest error: --shard '3/2': expected 0 <= I < N, with N >= 1")
    assert "needs --out" in fails(ingest_stage, project, capsys, "--shard", "0/2")
    assert not (project / "bad").exists()


def test_synthesize_shards_merge_into_the_unsharded_outputs_with_dicom(project, capsys):
    run(synthesize_stage, project)
    for i in range(2):
        run(synthesize_stage, project, "--shard", f"{i}/2", "--out", f"shards/syn{i}")
    shards = [str(project / "shards" / f"syn{i}") for i in range(2)]
    run(synthesize_stage, project, "--merge", shards[1], shards[0], "--out", "merged/synthetic",
        "--metrics", "merged/synthesize.json")
    m = assert_same_outputs(project / "synthetic", project / "merged" / "synthetic",
                            project / "metrics" / "synthesize.json", project / "merged" / "synthesize.json")
    assert m["count"] == 10 and len(list((project / "merged" / "synthetic" / "dicom").iterdir())) == 10
    # per-position entropy of the drawn grids (vqgan.code_usage), the same merged as unsharded (checked above)
    assert 0.0 < m["code_position_entropy"] <= math.log(min(K, 10)) + 1e-9
    assert "shard 0/2 missing" in fails(synthesize_stage, project, capsys, "--merge", shards[1], "--out", "bad")


def test_synthesize_shards_merge_into_tar_shards_like_an_unsharded_run(project, tmp_path):
    """png_layout tar: the merged archives are byte-identical to an unsharded run's (shards keep loose PNGs)."""
    import shutil

    work = tmp_path / "tarproj"
    shutil.copytree(project, work, ignore=shutil.ignore_patterns("synthetic", "shards", "merged", "metrics"))
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["synthesize"].update(png_layout="tar", png_shard_size=3, write_dicom=False)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run(synthesize_stage, work)
    for i in range(2):
        run(synthesize_stage, work, "--shard", f"{i}/2", "--out", f"shards/syn{i}")
    run(synthesize_stage, work, "--merge", "shards/syn0", "shards/syn1", "--out", "merged/synthetic",
        "--metrics", "merged/synthesize.json")
    assert sorted(p.name for p in (work / "synthetic" / "png").iterdir()) == [f"{k:06d}.tar" for k in range(4)]
    assert not (work / "synthetic" / "images").exists()
    assert_same_outputs(work / "synthetic", work / "merged" / "synthetic", work / "metrics" / "synthesize.json",
                        work / "merged" / "synthesize.json")
