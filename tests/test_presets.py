"""Named presets: valid against params.yaml, printed as `dvc exp run -S` flags that round-trip."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxrsynth.config import ConfigError, params_from_dict
from cxrsynth.presets import PRESETS, apply, check, set_flags

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_real_preset_is_valid_and_sets_the_lineage_settings():
    p = params_from_dict(check("real", PARAMS))
    assert p.codebook.preset == "paper" and p.ingest.image_size == 256 and p.generator.key_patches == 5
    assert p.generator.pretrained_path and p.align.text_encoder == "pretrained"


def test_flags_round_trip():
    flags = set_flags("real")
    assert flags[::2] == ["-S"] * len(PRESETS["real"])
    parsed = {}
    for f in flags[1::2]:
        k, v = f.split("=", 1)
        parsed[k] = yaml.safe_load(v)
    assert parsed == PRESETS["real"]


def test_bad_presets_are_refused():
    with pytest.raises(KeyError, match="codebook.nope"):
        apply(PARAMS, {"codebook.nope": 1})
    with pytest.raises(ConfigError, match="generator.key_patches"):
        params_from_dict(apply(PARAMS, {"generator.key_patches": -1}))


def test_command_prints_flags():
    out = subprocess.run([sys.executable, "-m", "cxrsynth", "preset", "real"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert shlex.split(out) == set_flags("real")
