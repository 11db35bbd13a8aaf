"""Hostile input at every edge: each row of the README's Hardening table, as a test. A bad value stops with one line
(exit status 2) naming it, before any work; an unexpected error is one line plus the file holding its traceback; a
model folder whose weights changed after saving is refused; a failed write leaves no half-written file."""
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxrsynth.__main__ import main as cli
from cxrsynth.__main__ import view_option
from cxrsynth.config import ConfigError, load_params, params_from_dict
from cxrsynth.errors import UserError, run_guarded
from cxrsynth.io import check_output_dir, write_json
from cxrsynth.models.generator import Generator, GeneratorError
from cxrsynth.pipeline import load_models
from test_synthesis import models  # noqa: F401  (the tiny models/ folder fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _one_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _stage(tmp_path: Path, name: str, edit=None, text: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m stages.<name>` in `tmp_path` with the repo's params.yaml, edited by `edit(raw)` or replaced by
    `text`."""
    if text is None:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        edit(raw)
        text = yaml.safe_dump(raw, sort_keys=False)
    (tmp_path / "params.yaml").write_text(text)
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)


# -- params.yaml ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["temperature", "top_p", "guidance_scale"])
def test_nan_and_infinite_params_are_refused(key):
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ConfigError, match=rf"^synthesize.{key}: expected a finite number, got"):
            params_from_dict({"synthesize": {key: bad}})


def test_a_nan_in_params_yaml_stops_the_stage_with_one_line(tmp_path):
    r = _stage(tmp_path, "synthesize", lambda raw: raw["synthesize"].update(temperature=float("nan")))
    assert r.returncode == 2
    assert _one_line(r.stderr) == "params error: synthesize.temperature: expected a finite number, got nan"


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    doubled = text.replace("  top_p: 1.0", "  top_p: 1.0\n  top_p: 0.5", 1)
    assert doubled != text
    line = next(i for i, x in enumerate(doubled.splitlines(), 1) if x.startswith("  top_p: 0.5"))
    (tmp_path / "params.yaml").write_text(doubled)
    with pytest.raises(ConfigError, match=rf"^synthesize.top_p: key written twice \(lines {line - 1} and {line}\)"):
        load_params(tmp_path / "params.yaml")
    nested = text.replace("    per_key: 16", "    per_key: 16\n    per_key: 4", 1)  # inside align.bank
    (tmp_path / "params.yaml").write_text(nested)
    with pytest.raises(ConfigError, match=r"^align.bank.per_key: key written twice"):
        load_params(tmp_path / "params.yaml")
    r = _stage(tmp_path, "synthesize", text=doubled)
    assert r.returncode == 2 and _one_line(r.stderr).startswith("params error: synthesize.top_p: key written twice")


def test_an_output_path_under_a_file_stops_the_stage_before_any_work(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder must be")
    r = _stage(tmp_path, "synthesize", lambda raw: raw["paths"].update(synthetic="blocker/synthetic"))
    assert r.returncode == 2, r.stderr
    line = _one_line(r.stderr)
    assert line.startswith("synthesize error: blocker: a file, where blocker/synthetic needs a folder"), line
    assert not (tmp_path / "metrics").exists()  # nothing was written


# -- the command line ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--temperature", "nan"], "synthesize.temperature rules: expected a finite number"),
    (["--temperature", "inf"], "synthesize.temperature rules: expected a finite number"),
    (["--temperature", "hot"], "expected float, got 'hot'"),
    (["--top-p", "nan"], "synthesize.top_p rules: expected a finite number"),
    (["--top-p", "0"], "synthesize.top_p rules: expected float in [0.01, 1.0]"),
    (["--top-p", "1.5"], "synthesize.top_p rules: expected float in [0.01, 1.0]"),
    (["--guidance", "-1"], "synthesize.guidance_scale rules: expected float in [1.0, 50.0]"),
    (["--guidance", "0"], "synthesize.guidance_scale rules: expected float in [1.0, 50.0]"),
    (["--view", "FOO"], "expected one of PA, AP, LATERAL, LL (any case), got 'FOO'"),
    (["-n", "0"], "synthesize.samples_per_prompt rules: expected int in [1, 1000]"),
    (["-n", "100000"], "synthesize.samples_per_prompt rules: expected int in [1, 1000]"),
    (["--top-k", "-3"], "synthesize.top_k rules: expected int in [0, 1000000]"),
    (["--seed", "-1"], "base.seed rules"),
])
def test_bad_generate_options_are_one_line_exit_2_and_write_nothing(models, tmp_path, capsys, args, says):  # noqa: F811
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli(["generate", "Right pleural effusion.", "--out", str(out), "--models", str(models), *args])
    assert e.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("python -m cxrsynth generate: error: argument") and says in line, line
    assert not out.exists()


def test_views_are_case_insensitive():
    assert [view_option(v) for v in ("pa", "Ap", "lateral", "LL")] == ["PA", "AP", "LATERAL", "LL"]


def test_out_naming_a_file_or_a_path_under_a_file_is_one_line(models, tmp_path, capsys):  # noqa: F811
    f = tmp_path / "a_file"
    f.write_text("x")
    for out, says in ((f, "a_file: exists and is not a folder"), (f / "sub", "a_file: a file, where")):
        with pytest.raises(SystemExit) as e:
            cli(["generate", "x", "--out", str(out), "--models", str(models)])
        line = _one_line(capsys.readouterr().err)
        assert e.value.code == 2 and "--out" in line and says in line, line
    assert f.read_text() == "x"


def test_lowercase_view_generates_with_the_view_token(models, tmp_path, capsys):  # noqa: F811
    rc = cli(["generate", "Right pleural effusion.", "--view", "ap", "--out", str(tmp_path / "o"), "--models",
              str(models), "--device", "cpu"])
    assert rc == 0
    assert pd.read_parquet(tmp_path / "o" / "manifest.parquet").view.tolist() == ["AP"]


def test_a_flipped_byte_in_the_generator_weights_is_refused_by_generate(models, tmp_path, capsys):  # noqa: F811
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    w = copy / "generator" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(GeneratorError, match="model.safetensors: corrupted or replaced weights"):
        Generator.load(copy / "generator")
    with pytest.raises(GeneratorError):
        load_models(copy)
    rc = cli(["generate", "x", "--out", str(tmp_path / "o"), "--models", str(copy)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error: ") and "model.safetensors: corrupted or replaced weights" in line
    assert not (tmp_path / "o" / "images").exists()


# -- failures of the machine ---------------------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_naming_its_traceback_file(capsys):
    def bug():
        return {}["missing"]

    assert run_guarded(bug, "demo") == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("demo internal error: KeyError: 'missing' (full traceback in ")
    trace = Path(line.rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert "Traceback" in trace.read_text() and "def bug" not in line
    trace.unlink()
    assert run_guarded(lambda: (_ for _ in ()).throw(UserError("x.yaml: bad")), "demo") == 2
    assert _one_line(capsys.readouterr().err) == "demo error: x.yaml: bad"


def test_a_full_disk_names_the_file_and_leaves_the_old_one_whole(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk (the write fails part-way with EFBIG, as ENOSPC would)."""
    target = tmp_path / "metrics.json"
    write_json(target, {"old": 1})
    before = target.read_bytes()
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from cxrsynth.errors import run_guarded\n"
            "from cxrsynth.io import write_json\n"
            f"sys.exit(run_guarded(write_json, 'demo', {str(target)!r}, {{'x': 'y' * 100000}}))\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert _one_line(r.stderr) == f"demo error: {target}: File too large"
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_enospc_is_named_as_a_full_disk(capsys):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "data/synthetic/images.npy")

    assert run_guarded(full, "synthesize") == 2
    assert _one_line(capsys.readouterr().err) == \
        "synthesize error: data/synthetic/images.npy: no space left on the device"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_a_folder_without_write_permission_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="no permission to write here"):
            check_output_dir(ro / "out")
    finally:
        ro.chmod(0o700)


def test_a_dangling_symlink_in_the_raw_tree_is_a_rejected_record(tmp_path):
    from test_ingest import FIX, ING  # the small phantom the ingest tests use

    from cxrsynth.data.phantom.dataset import generate
    from cxrsynth.stages.ingest import ingest

    base = tmp_path / "raw"
    generate(FIX, 0, base / "mimic-cxr", base / "mimic-cxr-jpg", base / "phantom", workers=0)
    records = pd.read_csv(base / "mimic-cxr" / "cxr-record-list.csv.gz", dtype=str)
    victim = next(p for p in records.path if (base / "mimic-cxr" / p).is_file())
    (base / "mimic-cxr" / victim).unlink()
    (base / "mimic-cxr" / victim).symlink_to(base / "nowhere.dcm")
    m = ingest(ING, base / "mimic-cxr", base / "mimic-cxr-jpg", tmp_path / "out", workers=0)
    rej = pd.read_parquet(tmp_path / "out" / "rejected.parquet")
    row = rej[rej.path == victim]
    assert len(row) == 1 and row.reason.iat[0] == "missing_file", rej
    assert row.detail.iat[0] == f"broken symbolic link to {base / 'nowhere.dcm'}"
    assert m["read"] == m["accepted"] + m["rejected"]
