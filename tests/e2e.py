"""Tiny end-to-end pipeline runs for the hardening tests (tests/test_e2e.py); not collected by pytest.

`make_repo(dest)` copies the project's source files (what git tracks plus untracked files it does not ignore; no
data, models or metrics) into `dest`, writes a params.yaml with the TINY overrides, and makes it a git repo with one
commit. `dvc(repo, *args)` runs DVC there with the venv on PATH, the offline switches set and, with
`block_network=True`, every IP socket refused (a sitecustomize module that makes `socket.connect` raise), so any
attempt to reach the network fails the run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP_TOP = {"data", "models", "metrics", "dvclive", "dvc_plots", ".venv", ".git", ".dvc/cache", ".dvc/tmp"}

# Every stage at the smallest size that still exercises its code paths (~2-3 minutes for the whole pipeline).
TINY = {
    "fixture": {"cohort": "e2e", "sizes": {"tiny": 12, "default": 300, "bench": 1500, "e2e": 40},
                "contact_sheet_images": 4},
    "ingest": {"image_size": 64, "grid_images": 4},
    "prompts": {"n_sampled": 12, "min_count": 2},
    "classifier": {"input_size": 32, "width": 4, "depth": [1, 1], "epochs": 2, "batch_size": 16, "bootstrap": 20,
                   "kid_subsets": 5, "checkpoint_every_epochs": 1, "min_count": 1},
    "codebook": {"image_size": 32, "channel_mult": [1, 2], "channels": 32, "z_channels": 32, "embed_dim": 16,
                 "codebook_size": 64, "steps": 12, "batch_size": 4, "warmup_steps": 2, "eval_every": 6,
                 "checkpoint_every": 6, "disc_start": 6, "grid_images": 4},
    "align": {"text_encoder": "scratch", "scratch_vocab_size": 300, "scratch_hidden": 32, "scratch_layers": 1,
              "steps": 8, "batch_size": 8, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 4, "embed_dim": 32, "patch_dim": 32,
              "patch_layers": 1, "heatmap_examples": 1, "bank": {"min_support": 1}},
    "generator": {"d_model": 32, "n_layers": 1, "n_heads": 2, "text_vocab_size": 300, "steps": 8, "batch_size": 4,
                  "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 4},
    "synthesize": {"contact_sheet_images": 4, "batch_size": 8, "write_dicom": True},
    "evaluate": {"utility_epochs": 1, "bootstrap": 20, "kid_subsets": 5, "alignment_shuffles": 2, "closest_pairs": 2,
                 "sample_rows": 2, "label_examples": 1, "rare_labels": 2},
}


def source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return sorted(f for f in out if (ROOT / f).is_file() and not any(f == s or f.startswith(s + "/")
                                                                        for s in SKIP_TOP) and f != "dvc.lock")


def tiny_params(overrides: dict = TINY) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        for key, value in values.items():
            if key not in params[section]:
                raise KeyError(f"TINY override {section}.{key} is not a params.yaml key")
            if isinstance(value, dict) and isinstance(params[section][key], dict):  # nested: key by key
                params[section][key] = {**params[section][key], **value}
            else:
                params[section][key] = value
    return params


def env(block_network: bool = False, tmp: Path | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTHONPATH")}
    e.update({"PATH": f"{Path(sys.executable).parent}:{e.get('PATH', '/usr/bin:/bin')}", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "GIT_AUTHOR_NAME": "e2e",
              "GIT_AUTHOR_EMAIL": "e2e@cxrsynth.invalid", "GIT_COMMITTER_NAME": "e2e",
              "GIT_COMMITTER_EMAIL": "e2e@cxrsynth.invalid", "DVC_NO_ANALYTICS": "1",
              "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # one thread per stage: two runs share two cores
    if block_network:
        assert tmp is not None
        site = tmp / "netblock"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            "import socket\n"
            "_connect = socket.socket.connect\n"
            "def _refuse(self, address, *a, **k):\n"
            "    if self.family in (socket.AF_INET, socket.AF_INET6):\n"
            "        raise OSError('network blocked by the cxrsynth e2e test: connect to %r' % (address,))\n"
            "    return _connect(self, address, *a, **k)\n"
            "socket.socket.connect = _refuse\n"
            "socket.socket.connect_ex = _refuse\n")
        e["PYTHONPATH"] = str(site)
    return e


def make_repo(dest: Path, overrides: dict = TINY) -> Path:
    dest.mkdir(parents=True)
    for f in source_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params(overrides), sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.name", "e2e"],
                ["git", "config", "user.email", "e2e@cxrsynth.invalid"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "tiny"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env(), capture_output=True)
    return dest


def run(repo: Path, *args: str, block_network: bool = False, tmp: Path | None = None, check: bool = True,
        timeout: int = 900) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), cwd=repo, env=env(block_network, tmp), capture_output=True, text=True,
                         timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


def dvc(repo: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return run(repo, str(Path(sys.executable).parent / "dvc"), *args, **kw)
