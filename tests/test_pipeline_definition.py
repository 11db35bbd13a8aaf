"""dvc.yaml is honest: each stage depends on exactly the package modules it imports and on the params it reads."""
from pathlib import Path

import pytest
import yaml

from cxrsynth.deps import expected, local_imports, main, rewrite, stage_modules, stale_stages

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]


def _covered(path: Path, deps: list[str]) -> bool:
    s = path.as_posix()
    return any(s == d or s.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_imports(name):
    stage = STAGES[name]
    assert stage["cmd"] == f"python -m stages.{name}"
    deps = [d for d in stage["deps"] if not d.startswith("${")]
    assert f"stages/{name}.py" in deps
    for d in deps:
        assert (ROOT / d).exists(), f"{name}: dep {d} does not exist"
    # empty package markers carry no logic; anything with code must be a dep
    missing = sorted(p.as_posix() for p in local_imports(ROOT, f"stages.{name}")
                     if not _covered(p, deps) and (ROOT / p).read_text().strip())
    assert not missing, f"stage {name} imports modules not listed as deps: {missing}"


def test_dvc_yaml_module_deps_are_what_the_imports_give():
    stale = stale_stages(ROOT, ROOT / "dvc.yaml")
    assert not stale, f"dvc.yaml module deps are stale for {stale}: run `python -m cxrsynth.deps --write`"
    text, new = expected(ROOT, ROOT / "dvc.yaml")
    assert new == text


def test_deps_writer_repairs_a_stale_dvc_yaml_and_keeps_the_rest(tmp_path):
    text = (ROOT / "dvc.yaml").read_text()
    lines = text.splitlines()
    # drop one module dep of codebook and add a needless one: both are stale
    i = lines.index("      - cxrsynth/models/vqgan.py")
    stale = "\n".join(lines[:i] + ["      - cxrsynth/data/dicom.py"] + lines[i + 1:]) + "\n"
    (tmp_path / "dvc.yaml").write_text(stale)
    for sub in ("stages", "cxrsynth"):
        (tmp_path / sub).symlink_to(ROOT / sub)
    assert "codebook" in stale_stages(tmp_path, tmp_path / "dvc.yaml")
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert main(["--write", "--root", str(tmp_path)]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == text      # comments, data deps and order of the rest unchanged
    assert main(["--check", "--root", str(tmp_path)]) == 0


def test_rewrite_touches_only_module_lines_of_deps():
    text = ("stages:\n  a:\n    cmd: python -m stages.a\n    deps:\n      - stages/a.py\n      - cxrsynth/old.py\n"
            "      # a comment\n      - data/x\n    outs:\n      - cxrsynth/not_a_dep.txt\n")
    new = rewrite(text, {"a": ["stages/a.py", "cxrsynth/new.py"]})
    assert new == ("stages:\n  a:\n    cmd: python -m stages.a\n    deps:\n      - stages/a.py\n"
                   "      - cxrsynth/new.py\n      # a comment\n      - data/x\n    outs:\n"
                   "      - cxrsynth/not_a_dep.txt\n")


def test_type_checking_imports_are_not_deps():
    # the bank builder names the align network only in type hints: the generator stage must not re-run for it
    assert "cxrsynth/models/align.py" not in stage_modules(ROOT, "generator")
    assert "cxrsynth/keypatches.py" in stage_modules(ROOT, "generator")


def test_codebook_does_not_depend_on_the_dicom_reader():
    for name in ("codebook", "tokens", "classifier", "evaluate"):
        assert "cxrsynth/data/dicom.py" not in stage_modules(ROOT, name), name


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_params_exist(name):
    for key in STAGES[name].get("params", []):
        node = PARAMS
        for part in key.split("."):
            assert part in node, f"{name}: param {key} not in params.yaml"
            node = node[part]


def test_dependency_scanner_sees_transitive_imports():
    files = {p.as_posix() for p in local_imports(ROOT, "stages.fixture")}
    assert "cxrsynth/config.py" in files
    assert "cxrsynth/text/chexpert.py" in files  # via data.layout, two hops away


def test_check_outputs_names_the_folders_dvc_yaml_declares():
    """cxrsynth.stages.OUTPUTS (what each stage checks before work) is dvc.yaml's outs under `${paths.*}`, metrics
    and dvclive folders aside, so the two cannot drift apart."""
    import re

    from cxrsynth.stages import OUTPUTS

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(OUTPUTS) == set(stages)
    for name, stage in stages.items():
        declared = set()
        for out in stage.get("outs", []):
            path = next(iter(out)) if isinstance(out, dict) else out
            m = re.fullmatch(r"\$\{paths\.(\w+)\}(?:/(.+))?", path)
            if m and m.group(1) != "metrics":
                declared.add(m.group(1) + (f"/{m.group(2)}" if m.group(2) else ""))
        assert set(OUTPUTS[name]) == declared, name
