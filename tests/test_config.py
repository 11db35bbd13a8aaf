"""Params validation: every rule stops with one line naming the key."""
import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrsynth.config import ConfigError, FixtureParams, Params, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid_and_complete():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.fixture.patients == p.fixture.sizes[p.fixture.cohort]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every field of every section is spelled out in params.yaml, so `dvc params diff` shows all knobs
    import dataclasses

    def check(section, raw_section, name):
        keys = {f.name for f in dataclasses.fields(section)}
        assert set(raw_section) == keys, name
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(getattr(section, f.name)):  # a nested section (align.bank)
                check(getattr(section, f.name), raw_section[f.name], f"{name}.{f.name}")

    for sec in dataclasses.fields(Params):
        check(getattr(p, sec.name), raw[sec.name], sec.name)


@pytest.mark.parametrize("raw, key", [
    ({"fixture": {"patiens": 3}}, "fixture.patiens"),
    ({"fixture": {"image_scale": 3.0}}, "fixture.image_scale"),
    ({"fixture": {"image_scale": "big"}}, "fixture.image_scale"),
    ({"fixture": {"cohort": "huge"}}, "fixture.cohort"),
    ({"fixture": {"size": "tiny"}}, "fixture.size"),
    ({"align": {"bank": {"size": 4}}}, "align.bank.size"),
    ({"fixture": {"write_jpg": 1}}, "fixture.write_jpg"),
    ({"fixture": {"max_studies_per_patient": 2.5}}, "fixture.max_studies_per_patient"),
    ({"fixture": {"sizes": {"tiny": 1}, "cohort": "tiny"}}, "fixture.sizes.tiny"),
    ({"fixture": {"validate_fraction": 0.5, "test_fraction": 0.45}}, "fixture.test_fraction"),
    ({"base": {"seed": -1}}, "base.seed"),
    ({"base": {"seed": True}}, "base.seed"),
    ({"base": {"device": "tpu"}}, "base.device"),
    ({"nonsense": {}}, "nonsense"),
    ({"align": {"bank": {"rule": "nearest"}}}, "align.bank.rule"),
    ({"align": {"bank": {"sise": 3}}}, "align.bank.sise"),
    ({"align": {"bank": 3}}, "align.bank"),
    ({"align": {"bank": {"smooth": -1.0}}}, "align.bank.smooth"),
    ({"base": [1, 2]}, "base"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    msg = str(e.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_defaults_and_types():
    p = params_from_dict({"fixture": {"cohort": "tiny", "image_scale": 1}})
    assert p.fixture.patients == 12
    assert isinstance(p.fixture.image_scale, float)
    assert p.base.seed == 0
    with pytest.raises(dataclasses_frozen_error()):
        p.fixture.cohort = "default"  # type: ignore[misc]
    assert FixtureParams().patients == 300


def test_params_yaml_holds_the_code_defaults():
    """params.yaml spells out every default: a key left out of a user's file means the same as in the shipped one."""
    import dataclasses

    shipped, defaults = load_params(ROOT / "params.yaml"), params_from_dict({})
    differ = [f"{sec.name}.{f.name}" for sec in dataclasses.fields(shipped)
              for f in dataclasses.fields(getattr(shipped, sec.name))
              if getattr(getattr(shipped, sec.name), f.name) != getattr(getattr(defaults, sec.name), f.name)]
    assert differ == []


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_stage_stops_with_one_line_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text("fixture:\n  patiens: 3\n")
    r = subprocess.run([sys.executable, "-m", "stages.fixture"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("params error: fixture.patiens: unknown key (known: cohort, contact_sheet_images, cr_fraction, "
                                "image_defect_fraction, image_scale, jpeg2000_fraction, lateral_fraction, "
                                "max_studies_per_patient, monochrome1_fraction, report_defect_fraction, rle_fraction, "
                                "sizes, test_fraction, validate_fraction, write_jpg, write_reports_zip)")
    assert not (tmp_path / "data").exists()


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "p.yaml"
    bad.write_text("fixture: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_a_nested_section_takes_its_defaults_key_by_key():
    p = params_from_dict({"align": {"bank": {"per_key": 4}}})
    assert p.align.bank.per_key == 4 and p.align.bank == dataclasses.replace(params_from_dict({}).align.bank, per_key=4)


def _leaves(d, path=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, path + (k,))
        else:
            yield path + (k,)


def test_every_param_changes_dvcs_run_cache_key():
    """DVC restores a stage's outputs from its run cache when the key of (cmd, deps, params) matches; the key is
    hashed by DVC's own function, which drops keys named like output metadata. Every leaf of params.yaml, changed,
    must change that key, or `dvc exp run -S` of it would silently restore the old value's outputs."""
    from dvc.stage.cache import _get_cache_hash

    from cxrsynth.config import DVC_IGNORED_KEYS

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def key(params):
        return _get_cache_hash({"cmd": "python -m stages.x", "deps": [], "params": {"params.yaml": params},
                                "outs": [{"path": "out"}]}, key=True)

    base = key(raw)
    leaves = list(_leaves(raw))
    assert len(leaves) > 200
    for path in leaves:
        changed = copy.deepcopy(raw)
        node = changed
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = ["changed", node[path[-1]]]
        assert key(changed) != base, ".".join(path)
    # and the guard's premise holds: DVC does drop these names (if a DVC release stops, the renames are harmless)
    assert key({**raw, "fixture": {**raw["fixture"], DVC_IGNORED_KEYS[0]: "x"}}) == base


def test_a_param_under_its_old_dvc_ignored_name_says_where_it_went():
    with pytest.raises(ConfigError, match=r"^fixture.size: renamed to fixture.cohort \(DVC's run cache"):
        params_from_dict({"fixture": {"size": "bench"}})
    with pytest.raises(ConfigError, match=r"^align.bank.size: renamed to align.bank.per_key"):
        params_from_dict({"align": {"bank": {"size": 4}}})
