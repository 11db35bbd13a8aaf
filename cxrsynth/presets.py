"""Named params presets: a set of `section.key=value` overrides of params.yaml, validated like params.yaml.

`real`: MIMIC-CXR at the paper's lineage settings on a GPU box - 256 x 256 images, a VQ-GAN with 1,024 codes and
16 x 16 tokens (codebook preset `paper`), a local clinical BERT for alignment (256-d shared space), top-5 key patches,
and a local pretrained causal LLM (e.g. Dolly-v2-3B) whose vocabulary is extended with the image tokens. Paths to the
data and to the pretrained weights are where the README tells you to put them; override any of them with more `-S`.

    dvc exp run -n real $(python -m cxrsynth preset real)         # run it as an experiment
    python -m cxrsynth preset real --yaml                          # or see the overrides as YAML
"""
from __future__ import annotations

import copy
import json

import yaml

from cxrsynth.config import params_from_dict

PRESETS: dict[str, dict[str, object]] = {
    "real": {
        "base.device": "cuda",
        "paths.raw": "data/raw/physionet.org/files/mimic-cxr/2.0.0",
        "paths.raw_jpg": "data/raw/physionet.org/files/mimic-cxr-jpg/2.0.0",
        "ingest.source": "jpg",
        "ingest.image_size": 256,
        "classifier.input_size": 224,
        "classifier.width": 32,
        "classifier.epochs": 30,
        "classifier.batch_size": 128,
        "codebook.preset": "paper",
        "tokens.batch_size": 256,
        "align.text_encoder": "pretrained",
        "align.text_model_path": "models/pretrained/clinical-bert",
        "align.freeze_text": False,
        "align.embed_dim": 256,
        "align.patch_dim": 256,
        "align.patch_layers": 4,
        "align.steps": 20000,
        "align.batch_size": 128,
        "align.lr": 0.0001,
        "align.warmup_steps": 1000,
        "align.eval_every": 2000,
        "generator.pretrained_path": "models/pretrained/dolly-v2-3b",
        "generator.key_patches": 5,
        "generator.max_text_tokens": 256,
        "generator.steps": 60000,
        "generator.batch_size": 16,
        "generator.lr": 0.0001,
        "generator.warmup_steps": 1000,
        "generator.eval_every": 2000,
        "generator.checkpoint_every": 2000,
        "generator.cpu_threads": 0,
        "synthesize.batch_size": 64,
        "synthesize.dtype": "bfloat16",
        "synthesize.cpu_threads": 0,
        "evaluate.utility_epochs": 0,
        "evaluate.utility_input_size": 0,
        "evaluate.phantom_checks": False,
    },
}


def apply(params: dict, overrides: dict[str, object]) -> dict:
    """params.yaml content with `section.key` overrides applied (a new dict); unknown keys are errors."""
    out = copy.deepcopy(params)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        if section not in out or key not in out[section]:
            raise KeyError(f"preset key {dotted}: not in params.yaml")
        out[section][key] = value
    return out


def check(name: str, params: dict) -> dict:
    """The preset applied to `params`, validated by the same rules as params.yaml (ConfigError on a bad value)."""
    merged = apply(params, PRESETS[name])
    params_from_dict(merged)
    return merged


def set_flags(name: str) -> list[str]:
    """`-S section.key=value` arguments for `dvc exp run` (values as YAML scalars / JSON lists)."""
    flags = []
    for dotted, value in PRESETS[name].items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else yaml.safe_dump(value).strip()
        text = text.removesuffix("\n...").strip()
        flags += ["-S", f"{dotted}={text}"]
    return flags
