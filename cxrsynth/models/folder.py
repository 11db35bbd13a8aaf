"""Self-describing model folders: `config.json` (format, version, config, notes) + `model.safetensors`.

Shared by every network of the project. Nothing is unpickled: weights are safetensors, metadata is JSON. A folder that
is missing a file, is truncated or corrupted, or belongs to another model type raises `ModelFolderError` naming the
offending file.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from cxrsynth.errors import UserError, one_line
from cxrsynth.io import file_sha256, read_json_object

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHT_RECORD = "weights.sha256.json"  # size and sha256 of every *.safetensors of the folder, written last by save
RECORD_FORMAT = "cxrsynth-weight-record"
# "sha256" (default): sizes, then every weight file's sha256, on every load | "size": sizes only (for a multi-GB
# pretrained LLM generator whose hashing would cost more than loading it)
CHECK_ENV = "CXRSYNTH_WEIGHTS_CHECK"
# the JSON files `transformers` reads from a save_pretrained folder (model config, generation config, tokenizer)
HF_JSON = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json")


class ModelFolderError(UserError):
    """A model folder that cannot be loaded; the message names the file and the reason."""


def save_folder(module: torch.nn.Module, path: str | Path, fmt: str, version: int, meta: dict) -> Path:
    """Write `meta` (plus format/version) as config.json and the module's state dict as model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    doc = {"format": fmt, "format_version": version, **meta}
    (path / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    safetensors.torch.save_file(state, str(path / WEIGHTS), metadata={"format": fmt})
    record_weights(path)
    return path


def _weight_files(path: Path) -> list[Path]:
    return sorted(f for f in path.rglob("*.safetensors") if f.is_file())


def record_weights(path: str | Path) -> Path:
    """Write `weights.sha256.json`: the byte size and sha256 of every `*.safetensors` under the folder. A model's
    `save` calls it last, so a folder whose save was cut short has no record (or an older one) and is refused."""
    path = Path(path)
    files = {f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in _weight_files(path)}
    out = path / WEIGHT_RECORD
    out.write_text(json.dumps({"format": RECORD_FORMAT, "files": files}, indent=1, sort_keys=True) + "\n",
                   encoding="utf-8")
    return out


def verify_weights(path: str | Path, error: type[Exception] = ModelFolderError) -> None:
    """Compare the folder's weight files with its `weights.sha256.json`: the same set of files, each of the recorded
    size and (unless $CXRSYNTH_WEIGHTS_CHECK=size) sha256. A mismatch raises `error` naming the file; one flipped
    byte is found before any weight is used."""
    path = Path(path)
    rec_file = path / WEIGHT_RECORD
    if not rec_file.is_file():
        raise error(f"{rec_file}: missing (a save that did not finish, or a folder from before weight records); "
                    "re-run the stage that writes this model")
    rec = read_json_object(rec_file, error, "weight record")
    files = rec.get("files")
    if rec.get("format") != RECORD_FORMAT or not isinstance(files, dict):
        raise error(f"{rec_file}: not a {RECORD_FORMAT} file")
    mode = os.environ.get(CHECK_ENV, "sha256")
    if mode not in ("sha256", "size"):
        raise error(f"${CHECK_ENV}: expected sha256 or size, got {mode!r}")
    present = {f.relative_to(path).as_posix() for f in _weight_files(path)}
    for name in sorted(present - set(files)):
        raise error(f"{path / name}: weight file not in {WEIGHT_RECORD} (added after saving)")
    for name, entry in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise error(f"{f}: weights missing (listed in {WEIGHT_RECORD})")
        want = entry.get("bytes") if isinstance(entry, dict) else None
        if f.stat().st_size != want:
            raise error(f"{f}: corrupted or truncated weights ({f.stat().st_size} bytes, {WEIGHT_RECORD} says "
                        f"{want!r})")
        if mode == "sha256" and file_sha256(f) != entry.get("sha256"):
            raise error(f"{f}: corrupted or replaced weights (sha256 differs from {WEIGHT_RECORD})")


def read_meta(path: str | Path, fmt: str, version: int) -> dict:
    """Read and check a folder's config.json (exists, valid JSON, right format and version) and its weights against
    their record (`verify_weights`)."""
    cfg_file = Path(path) / CONFIG
    if not cfg_file.is_file():
        raise ModelFolderError(f"{cfg_file}: not a {fmt} folder (config.json missing)")
    meta = read_json_object(cfg_file, ModelFolderError, "config")
    if meta.get("format") != fmt:
        raise ModelFolderError(f"{cfg_file}: format {meta.get('format')!r} is not {fmt!r}")
    if meta.get("format_version") != version:
        raise ModelFolderError(f"{cfg_file}: format_version {meta.get('format_version')!r} is not {version}")
    verify_weights(path)
    return meta


def read_config(path: str | Path, meta: dict, from_dict: Callable[[dict], object]):
    """`from_dict(meta["config"])`; a missing or invalid config section raises ModelFolderError naming config.json."""
    try:
        return from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFolderError(f"{Path(path) / CONFIG}: invalid config ({type(err).__name__}: {err})") from None


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
