"""Self-describing model folders: `config.json` (format, version, config, notes) + `model.safetensors`.

Shared by every network of the project. Nothing is unpickled: weights are safetensors, metadata is JSON. A folder that
is missing a file, is truncated or corrupted, or belongs to another model type raises `ModelFolderError` naming the
offending file.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from cxrsynth.io import read_json_object

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# the JSON files `transformers` reads from a save_pretrained folder (model config, generation config, tokenizer)
HF_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json")


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the reason."""


def save_folder(module: torch.nn.Module, path: str | Path, fmt: str, version: int, meta: dict) -> Path:
    """Write `meta` (plus format/version) as config.json and the module's state dict as model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = {"format": fmt, "format_version": version, **meta}
    (path / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path / WEIGHTS), metadata={"format": fmt})
    return path


def read_meta(path: str | Path, fmt: str, version: int) -> dict:
    """Read and check a folder's config.json (exists, valid JSON, right format and version)."""
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise ModelFolderError(f"{cfg_file}: not a {fmt} folder (config.json missing)")
    meta = read_json_object(cfg_file, ModelFolderError, "config")
    if meta.get("format") != fmt:
        raise ModelFolderError(f"{cfg_file}: format {meta.get('format')!r} is not {fmt!r}")
    if meta.get("format_version") != version:
        raise ModelFolderError(f"{cfg_file}: format_version {meta.get('format_version')!r} is not {version}")
    return meta


def read_config(path: str | Path, meta: dict, from_dict: Callable[[dict], object]):
    """`from_dict(meta["config"])`; a missing or invalid config section raises ModelFolderError naming config.json."""
    try:
        return from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFolderError(f"{Path(path) / CONFIG}: invalid config ({type(err).__name__}: {err})") from None


def one_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors can span many lines), or its type."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def check_files(path: str | Path, error: type[Exception] = ModelFolderError) -> None:
    """Check the files `transformers` will read from a save_pretrained folder before it reads them: every JSON file of
    `HF_JSON` present must parse to an object and every top-level `*.safetensors` must have a sound header that covers
    the file. A damaged one raises `error` naming it (transformers' own errors often do not name the file); weights
    are opened with safetensors only, so a pickle in their place is rejected, never unpickled."""
    path = Path(path)
    for name in HF_JSON:
        if (path / name).is_file():
            read_json_object(path / name, error, "or truncated")
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safetensors.safe_open(str(f), framework="pt"):
                pass
        except Exception as err:  # SafetensorError / OSError for damaged files
            raise error(f"{f}: corrupted or truncated weights ({one_line(err)})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load model.safetensors of a folder; a missing, truncated or corrupted file raises ModelFolderError."""
    w_file = Path(path) / WEIGHTS
    if not w_file.is_file():
        raise ModelFolderError(f"{w_file}: weights missing")
    try:
        return safetensors.torch.load_file(str(w_file))
    except Exception as err:  # safetensors raises SafetensorError / OSError for damaged files
        raise ModelFolderError(f"{w_file}: corrupted or truncated weights ({err})") from None


def load_state(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a folder's weights into `module` strictly (a missing or unexpected weight is an error naming the file)."""
    try:
        module.load_state_dict(read_weights(path), strict=True)
    except RuntimeError as err:
        raise ModelFolderError(f"{Path(path) / WEIGHTS}: weights do not match the config ({err})") from None
    return module
