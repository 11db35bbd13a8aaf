"""dvc.yaml is honest: each stage depends on every package module it imports and on the params it reads."""
from pathlib import Path

import pytest
import yaml

from cxrsynth.deps import local_imports

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
