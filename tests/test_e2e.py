"""Hardening, end to end: the whole pipeline at tiny sizes, twice, in fresh git + DVC repos whose paths contain a
space. Run B has the network blocked and its raw inputs read-only. Both have identifiers planted in the raw data.

Checks: both runs finish; a second `dvc repro` does nothing; the two runs' artifacts are byte-identical (except the
documented timing fields); no planted identifier reaches any output or log; lineage of a synthetic image resolves
back to the raw data and `--verify` catches a tampered model; `dvc exp run -S synthesize...` re-runs only synthesize
and evaluate, and the experiment tooling (`exp show`, `params diff`, `metrics diff`) compares them.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from e2e import dvc, env, make_repo, run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

OUTPUT_DIRS = ("data", "models", "metrics", "dvclive")
# Fields that measure time (wall clock, throughput): the only content allowed to differ between two clean runs.
TIMING_KEYS = ("seconds", "per_second", "_time", "timestamp")
PLANT = "{given} {family} seen by Dr. Oyelaran, MRN: 99120345, call 617-555-0199."
PLANTED = ("Oyelaran", "99120345", "555-0199")


def plant_identifiers(repo: Path) -> list[str]:
    """Write each of a few patients' own names (as in their DICOM headers), a physician, a record number and a phone
    number into their reports; return every planted identifier, the phantom's DICOM header names and IDs included."""
    raw = repo / "data" / "raw" / "mimic-cxr"
    truth = [json.loads(x) for x in (repo / "data/raw/phantom/ground_truth.jsonl").read_text().splitlines()]
    name_of = {str(t["study_id"]): t["planted_identifiers"]["patient_name"] for t in truth}
    for p in sorted(raw.glob("files/p*/p*/s*.txt"))[:4]:
        family, given = name_of[p.stem[1:]].split("^")[:2]
        plant = PLANT.format(given=given.title(), family=family.title())
        p.write_text(p.read_text().replace("FINDINGS:", f"FINDINGS: {plant}", 1))
    header = {str(v) for t in truth for v in t["planted_identifiers"].values()}
    return sorted(header | set(PLANTED) | {n.split("^")[1] for n in header if "^" in n})


def readonly(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def pipeline(tmp: Path, name: str, block_network: bool) -> dict:
    repo = make_repo(tmp / name)
    logs = [dvc(repo, "repro", "fixture", block_network=block_network, tmp=tmp)]
    planted = plant_identifiers(repo)
    dvc(repo, "commit", "-f", "fixture", block_network=block_network, tmp=tmp)
    if block_network:
        readonly(repo / "data" / "raw")
    logs.append(dvc(repo, "repro", block_network=block_network, tmp=tmp))
    again = dvc(repo, "repro", block_network=block_network, tmp=tmp)
    return {"repo": repo, "planted": planted, "log": "".join(r.stdout + r.stderr for r in logs),
            "again": again.stdout + again.stderr}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("e2e")
    # the two runs are independent processes trees: run them side by side (each stage uses one thread)
    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(pipeline, tmp, "run a", block_network=False)
        fb = pool.submit(pipeline, tmp, "run b", block_network=True)
        a, b = fa.result(), fb.result()
    yield a, b
    for p in (b["repo"] / "data" / "raw").rglob("*"):  # let pytest clean up
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    (b["repo"] / "data" / "raw").chmod(0o755)


def artifacts(repo: Path) -> dict[str, Path]:
    return {p.relative_to(repo).as_posix(): p for d in OUTPUT_DIRS for p in sorted((repo / d).rglob("*"))
            if p.is_file() and ".gitignore" not in p.name}


def _drop_timing(obj):
    if isinstance(obj, dict):
        return {k: _drop_timing(v) for k, v in obj.items() if not any(t in k for t in TIMING_KEYS)}
    if isinstance(obj, list):
        return [_drop_timing(v) for v in obj]
    return obj


def comparable(path: Path) -> bytes:
    """A file's bytes, with timing fields removed from JSON and dvclive TSV files."""
    if path.suffix == ".json":
        try:
            return json.dumps(_drop_timing(json.loads(path.read_text())), sort_keys=True).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return path.read_bytes()
    if path.suffix == ".tsv":
        rows = [r.split("\t") for r in path.read_text().splitlines()]
        keep = [i for i, h in enumerate(rows[0]) if not any(t in h for t in TIMING_KEYS)] if rows else []
        return "\n".join("\t".join(r[i] for i in keep if i < len(r)) for r in rows).encode()
    return path.read_bytes()


def test_pipeline_runs_and_rerun_does_nothing(runs):
    for r in runs:
        assert "Data and pipelines are up to date" in r["again"], r["again"][-2000:]
        made = artifacts(r["repo"])
        for must in ("data/synthetic/manifest.parquet", "metrics/evaluate.json", "models/generator/config.json",
                     "models/align/config.json", "models/vqgan/model.safetensors", "data/synthetic/contact_sheet.png"):
            assert must in made, must


def test_two_clean_runs_are_byte_identical(runs):
    a, b = (artifacts(r["repo"]) for r in runs)
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if comparable(a[k]) != comparable(b[k]))
    assert differ == [], differ


def texts_of(path: Path) -> list[bytes]:
    """Everything a person or tool could read out of a file: raw bytes, decompressed members, table cells, PNG text."""
    data = path.read_bytes()
    out = [data]
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
        out.append("\n".join(map(str, df.columns)).encode() + df.astype(str).to_csv().encode())
    elif path.suffix == ".gz":
        out.append(gzip.decompress(data))
    elif path.suffix == ".zip":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            out += [z.read(n) for n in z.namelist()]
    elif path.suffix == ".png":
        with Image.open(path) as im:
            out.append(json.dumps({str(k): str(v) for k, v in im.info.items()}).encode())
    return out


def test_no_planted_identifier_reaches_any_output_or_log(runs):
    for r in runs:
        planted = r["planted"]
        assert len(planted) > 10
        hits = []
        for rel, path in artifacts(r["repo"]).items():
            if rel.startswith("data/raw/"):
                continue  # the raw dataset is where they were planted
            blob = b"\n".join(texts_of(path)).lower()
            hits += [(rel, x) for x in planted if x.lower().encode() in blob]
        log = (r["log"] + r["again"]).lower()
        hits += [("dvc log", x) for x in planted if x.lower() in log]
        assert hits == []
    # and the scan can find them: they are in the raw reports and DICOM headers
    raw = b"".join(p.read_bytes() for p in (runs[0]["repo"] / "data/raw/mimic-cxr").rglob("*") if p.is_file())
    assert all(x.encode() in raw for x in ("Oyelaran", "99120345"))


def test_ingest_redacted_the_planted_reports(runs):
    m = json.loads((runs[0]["repo"] / "metrics/ingest.json").read_text())
    assert m["reports_redacted"] >= 1 and m["redactions"] >= 4


def test_lineage_resolves_back_to_the_raw_data(runs):
    repo = runs[0]["repo"]
    png = sorted((repo / "data/synthetic/images").glob("*.png"))[0]
    rep = json.loads(run(repo, sys.executable, "-m", "cxrsynth", "lineage", str(png), "--verify", "--json").stdout)
    assert rep["verify"] == []
    assert rep["image"]["synthetic_id"] == png.stem and rep["image"]["text"]
    assert {"fixture", "ingest", "prompts", "codebook", "tokens", "align", "generator", "synthesize"} <= set(
        rep["stages"])
    assert rep["models"]["generator"]["stage"] == "generator" and rep["models"]["vqgan"]["stage"] == "codebook"
    ingest_deps = {d["path"]: d["md5"] for d in rep["stages"]["ingest"]["deps"]}
    # the release is fingerprinted by its tables and checksum file, not by hashing the image tree
    assert ingest_deps["data/raw/mimic-cxr/SHA256SUMS.txt"] and not any(m.endswith(".dir") for m in ingest_deps.values())
    assert rep["git"]["commit"] and len(rep["git"]["commit"]) == 40
    assert rep["stages"]["synthesize"]["params"]["params.yaml"]["synthesize"]["write_dicom"] is True
    # the same image found through its DICOM copy and its id; human-readable output
    dcm = repo / "data/synthetic/dicom" / f"{png.stem}.dcm"
    text = run(repo, sys.executable, "-m", "cxrsynth", "lineage", str(dcm), "--verify").stdout
    assert f"synthetic image {png.stem}" in text and "verify: OK" in text and "made by stage generator" in text
    assert run(repo, sys.executable, "-m", "cxrsynth", "lineage", png.stem).returncode == 0


@pytest.mark.parametrize("victim, expect", [
    ("models/generator/model.safetensors", "models/generator: weights changed"),
    ("data/synthetic/images/{png}", "image edited since it was made"),
])
def test_lineage_verify_catches_tampering(runs, victim, expect):
    repo = runs[0]["repo"]
    png = sorted((repo / "data/synthetic/images").glob("*.png"))[0]
    path = repo / victim.format(png=png.name)
    original = path.read_bytes()
    try:
        path.chmod(0o644)
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        res = run(repo, sys.executable, "-m", "cxrsynth", "lineage", str(png), "--verify", check=False)
        assert res.returncode == 1, res.stderr
        assert expect in res.stdout and "verify: MISMATCH" in res.stdout
        assert "modified" in res.stdout  # DVC's own status of the stage output agrees
    finally:
        path.write_bytes(original)


def test_experiments_rerun_only_what_changed_and_compare(runs):
    repo, tmp = runs[1]["repo"], runs[1]["repo"].parent
    res = dvc(repo, "exp", "run", "-n", "cooler", "-S", "synthesize.temperature=0.5", block_network=True, tmp=tmp)
    ran = sorted(set(re.findall(r"Running stage '([\w-]+)'", res.stdout + res.stderr)))
    assert ran == ["evaluate", "synthesize"], res.stdout[-3000:]
    show = dvc(repo, "exp", "show", "--md", block_network=True, tmp=tmp).stdout
    assert "cooler" in show and "synthesize.temperature" in show
    params = dvc(repo, "params", "diff", "--md", block_network=True, tmp=tmp).stdout  # workspace vs HEAD
    assert "synthesize.temperature" in params and "0.5" in params
    metrics = dvc(repo, "metrics", "diff", "--md", block_network=True, tmp=tmp).stdout
    assert "metrics/synthesize.json" in metrics or "metrics/evaluate.json" in metrics


def _readme_exp_show() -> list[str]:
    """The README's `dvc exp show` line (the one a user copies), as arguments."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(x.strip() for x in readme.splitlines() if x.strip().startswith("dvc exp show --only-changed"))
    return shlex.split(line.split("#")[0])[1:]


def test_compare_reads_two_experiments_without_rerunning(runs):
    repo, tmp = runs[1]["repo"], runs[1]["repo"].parent
    if "cooler" not in dvc(repo, "exp", "list", block_network=True, tmp=tmp).stdout:
        dvc(repo, "exp", "run", "-n", "cooler", "-S", "synthesize.temperature=0.5", block_network=True, tmp=tmp)
    dvc(repo, "exp", "run", "-n", "warmer", "-S", "synthesize.temperature=1.0", block_network=True, tmp=tmp)
    before = dvc(repo, "status", block_network=True, tmp=tmp).stdout
    res = run(repo, sys.executable, "-m", "cxrsynth", "compare", "cooler", "warmer", "--n-boot", "50", "--out",
              str(tmp / "compare.md"), block_network=True, tmp=tmp)
    table = (tmp / "compare.md").read_text()
    assert table == res.stdout and "Running stage" not in res.stdout + res.stderr
    head = table.splitlines()[0]
    assert "cooler" in head and "warmer - cooler" in head
    sem = next(x for x in table.splitlines() if x.startswith("| semantic_auroc |"))
    assert "(paired)" in sem  # the same prompts in both runs
    assert dvc(repo, "status", block_network=True, tmp=tmp).stdout == before  # nothing re-ran or changed
    bad = run(repo, sys.executable, "-m", "cxrsynth", "compare", "cooler", "no-such-exp", block_network=True,
              tmp=tmp, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no-such-exp" in bad.stderr
    # the README's view of experiments: the summary's intervals and the changed params, <= 20 columns
    show = dvc(repo, *_readme_exp_show(), "--md", block_network=True, tmp=tmp).stdout
    header = next(x for x in show.splitlines() if x.startswith("|"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert len(cols) <= 20, cols
    assert "synthesize.temperature" in cols and "semantic_auroc.ci" in cols and "fid.ci" in cols, cols
    assert "warmer" in show and "cooler" in show


def test_queued_experiments_run_in_the_background(runs):
    repo, tmp = runs[1]["repo"], runs[1]["repo"].parent
    dvc(repo, "exp", "run", "--queue", "-n", "topk", "-S", "synthesize.top_k=5", block_network=True, tmp=tmp)
    dvc(repo, "queue", "start", "-j", "1", block_network=True, tmp=tmp)
    deadline = time.time() + 600
    status = ""
    while time.time() < deadline:
        status = dvc(repo, "queue", "status", block_network=True, tmp=tmp).stdout
        if "topk" in status and not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert re.search(r"topk.*Success", status), status
    dvc(repo, "queue", "stop", "--kill", block_network=True, tmp=tmp, check=False)
    show = dvc(repo, "exp", "show", "--md", "--all-commits", block_network=True, tmp=tmp).stdout
    assert "topk" in show


# training stage -> (model folder under models/, signal): each is killed mid-run and re-run
KILLED = (("codebook", "vqgan", signal.SIGKILL), ("classifier", "classifier", signal.SIGTERM),
          ("align", "align", signal.SIGKILL), ("generator", "generator", signal.SIGTERM))


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "last" / "state.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_killed_training_stages_resume_and_finish(runs, tmp_path):
    """Every training stage, killed (SIGKILL or SIGTERM) after its first checkpoint, resumes from it on the next run,
    finishes, and writes exactly the model of the uninterrupted run (single process, CPU)."""
    repo = tmp_path / "killed run"
    shutil.copytree(runs[0]["repo"], repo, symlinks=True)
    for stage, model, sig in KILLED:
        want = _folder_bytes(repo / "models" / model)
        ckpt = repo / "models" / f"{model}_checkpoints"
        shutil.rmtree(ckpt)  # start over, slowed down so that the signal lands mid-run
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=repo, text=True,
                                env={**env(), "CXRSYNTH_STEP_DELAY": "0.5"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while _checkpoint_step(ckpt) == 0 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), (stage, err[-2000:])
        stopped = _checkpoint_step(ckpt)
        assert stopped > 0, stage
        res = run(repo, sys.executable, "-m", f"stages.{stage}")
        assert f"resuming from step {stopped} " in res.stderr, (stage, res.stderr[-2000:])
        got = _folder_bytes(repo / "models" / model)
        assert got.keys() == want.keys(), stage
        assert [k for k in want if got[k] != want[k]] == [], stage


def test_replicated_data_feeds_the_stages_and_slopes_are_per_image(runs, tmp_path):
    """bench/replicate.py: F copies of a finished run's data line up (rows, tokens, ground truth) so the stages run
    on them as on a real N x F dataset."""
    import yaml

    from bench.replicate import replicate, run_stages
    from bench.scale import BUDGET, merge
    from cxrsynth.data.arrays import split_rows
    from cxrsynth.data.tokens import load_tokens

    src = runs[0]["repo"]
    params = merge(yaml.safe_load((src / "params.yaml").read_text()), BUDGET)
    work = tmp_path / "x3"
    counts = replicate(src, work, 3, params)
    one = pd.read_parquet(src / "data/interim/manifest.parquet")
    man = pd.read_parquet(work / "data/interim/manifest.parquet")
    assert len(man) == 3 * len(one) and man.dicom_id.is_unique
    assert man.groupby("study_id").subject_id.nunique().max() == 1  # a copy's studies keep their own patient
    truth = [json.loads(x) for x in (work / "data/raw/phantom/ground_truth.jsonl").read_text().splitlines()]
    assert len(truth) == 3 * len((src / "data/raw/phantom/ground_truth.jsonl").read_text().splitlines())
    assert set(man.dicom_id.astype(str)) <= {r["dicom_id"] for r in truth}
    for split, n in counts.items():
        tokens = load_tokens(work / "data/tokens", split)  # the sidecar's hashes match the repeated arrays
        rows = split_rows(man, split, len(tokens), split)  # image_row 0..3n-1, each copy after the other
        assert len(tokens) == n == 3 * (one.split == split).sum() - 3 * ((one.split == split) & (one.image_row < 0)).sum()
        third = n // 3
        assert np.array_equal(np.asarray(tokens[:third]), np.asarray(tokens[third:2 * third]))
        assert list(rows.dicom_id[third:2 * third]) == [f"{d}-r1" for d in rows.dicom_id[:third]]
    recs = run_stages(work, ("tokens", "align"), "default")
    assert [r["label"] for r in recs] == ["tokens", "align"] and all(r["rc"] == 0 for r in recs)
    assert json.loads((work / "metrics/align.json").read_text())["train_pairs"] == counts["train"]
    # the tokens stage re-encoded the repeated images: the same codes as the source's, three times
    again = np.asarray(load_tokens(work / "data/tokens", "train"))
    assert np.array_equal(again, np.concatenate([np.asarray(load_tokens(src / "data/tokens", "train"))] * 3))
