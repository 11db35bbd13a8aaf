"""Token store: the VQ-GAN token grid of every ingested image, as memory-mappable uint16 arrays plus a JSON sidecar.

Layout of a token folder (nanoGPT-style flat token data, one file per split):
- `tokens_<split>.npy`: uint16 N x H x W (`np.load(..., mmap_mode="r")` maps it without reading it); row i holds the
  tokens of row i of `images_<split>.npy`, i.e. of the manifest row whose `image_row` is i in that split;
- `tokens.json`: format and version, grid size [H, W], codebook size, image size, dtype, the SHA-256 of the VQ-GAN
  weights file that made the tokens (and its folder), and per split the count, the array file's SHA-256 and the
  SHA-256 of the source image array.

`load_tokens(dir, split)` checks the array against the sidecar (shape, dtype, content hash; and, given a VQ-GAN
folder or hash, that the tokens were made by exactly those weights), raising `TokenStoreError` naming the file.

Reads/writes only the folder it is given.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrsynth.errors import UserError
from cxrsynth.data.arrays import NpyRows
from cxrsynth.io import file_sha256

FORMAT = "cxrsynth-tokens"
FORMAT_VERSION = 1
SIDECAR = "tokens.json"
DTYPE = np.uint16


class TokenStoreError(UserError):
    """A token folder does not match its sidecar, or the VQ-GAN it is checked against; one line naming the file."""


def tokens_file(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"tokens_{split}.npy"


@dataclass(frozen=True)
class TokensMeta:
    """The sidecar, `tokens.json`."""

    grid_size: tuple[int, int]
    codebook_size: int
    image_size: int
    vqgan_sha256: str
    vqgan_path: str = ""
    splits: dict[str, dict] = field(default_factory=dict)   # split -> {count, file, sha256, images_sha256}
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    dtype: str = "uint16"

    def to_dict(self) -> dict:
        return {"format": self.format, "format_version": self.format_version, "dtype": self.dtype,
                "grid_size": list(self.grid_size), "codebook_size": self.codebook_size,
                "image_size": self.image_size, "vqgan": {"path": self.vqgan_path, "weights_sha256": self.vqgan_sha256},
                "splits": self.splits, "counts": {s: int(v["count"]) for s, v in self.splits.items()}}

    @classmethod
    def from_dict(cls, d: Mapping, source: str = SIDECAR) -> TokensMeta:
        try:
            if d["format"] != FORMAT:
                raise TokenStoreError(f"{source}: format {d['format']!r} is not {FORMAT!r}")
            if d["format_version"] != FORMAT_VERSION:
                raise TokenStoreError(f"{source}: format_version {d['format_version']!r} is not {FORMAT_VERSION}")
            return cls(grid_size=(int(d["grid_size"][0]), int(d["grid_size"][1])),
                       codebook_size=int(d["codebook_size"]), image_size=int(d["image_size"]),
                       vqgan_sha256=str(d["vqgan"]["weights_sha256"]), vqgan_path=str(d["vqgan"].get("path", "")),
                       splits={str(k): dict(v) for k, v in d["splits"].items()}, dtype=str(d["dtype"]))
        except (KeyError, TypeError, IndexError) as e:
            raise TokenStoreError(f"{source}: malformed sidecar (missing or bad {e})") from None


def read_meta(directory: str | Path) -> TokensMeta:
    path = Path(directory) / SIDECAR
    if not path.is_file():
        raise TokenStoreError(f"{path}: token sidecar missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenStoreError(f"{path}: not valid JSON ({e.msg})") from None
    return TokensMeta.from_dict(raw, str(path))


def write_tokens(directory: str | Path, tokens: Mapping[str, np.ndarray], *, codebook_size: int, image_size: int,
                 vqgan_sha256: str, vqgan_path: str = "",
                 images_sha256: Mapping[str, str] | None = None) -> TokensMeta:
    """Write `tokens_<split>.npy` (uint16 N x H x W) for every split and then the sidecar (written last: a folder
    with a sidecar is complete). Every token must be in [0, codebook_size); all splits share one grid size."""
    directory = Path(directory)
    if not 2 <= codebook_size <= 65536:
        raise ValueError(f"codebook_size {codebook_size} does not fit uint16 tokens")
    if not tokens:
        raise ValueError("no splits to write")
    grids = {np.asarray(t).shape[1:] for t in tokens.values()}
    if len(grids) != 1 or len(next(iter(grids))) != 2:
        raise ValueError(f"every split must be N x H x W with one grid size, got {sorted(grids)}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SIDECAR).unlink(missing_ok=True)
    splits = {}
    for split, arr in tokens.items():
        arr = np.asarray(arr)
        if arr.size and (arr.min() < 0 or arr.max() >= codebook_size):
            raise ValueError(f"split {split!r}: tokens outside [0, {codebook_size})")
        path = tokens_file(directory, split)
        np.save(path, np.ascontiguousarray(arr, dtype=DTYPE), allow_pickle=False)
        splits[split] = {"count": int(len(arr)), "file": path.name, "sha256": file_sha256(path)}
        if images_sha256 is not None and split in images_sha256:
            splits[split]["images_sha256"] = images_sha256[split]
    h, w = next(iter(grids))
    meta = TokensMeta(grid_size=(int(h), int(w)), codebook_size=int(codebook_size), image_size=int(image_size),
                      vqgan_sha256=vqgan_sha256, vqgan_path=str(vqgan_path), splits=splits)
    (directory / SIDECAR).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def load_tokens(directory: str | Path, split: str, *, vqgan: str | Path | None = None,
                expected_sha256: str | None = None, verify: bool = True) -> np.ndarray:
    """The uint16 token array of a split, N x H x W, after checking it against the sidecar, as `NpyRows` (rows read
    on demand; `np.asarray(...)` reads it all).

    `vqgan` (a VQ-GAN folder) or `expected_sha256` (its weights' hash): the tokens must come from exactly those
    weights. `verify`: also compare the array file's SHA-256 with the sidecar (reads the file once)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if split not in meta.splits:
        raise TokenStoreError(f"{directory / SIDECAR}: no split {split!r} (have {sorted(meta.splits)})")
    if vqgan is not None:
        weights = Path(vqgan) / "model.safetensors" if Path(vqgan).is_dir() else Path(vqgan)
        if not weights.is_file():
            raise TokenStoreError(f"{weights}: VQ-GAN weights file not found")
        expected_sha256 = file_sha256(weights)
    if expected_sha256 is not None and expected_sha256 != meta.vqgan_sha256:
        raise TokenStoreError(f"{directory / SIDECAR}: tokens were made by VQ-GAN weights {meta.vqgan_sha256[:12]}, "
                              f"not by {expected_sha256[:12]} (re-run the tokens stage)")
    path = tokens_file(directory, split)
    if not path.is_file():
        raise TokenStoreError(f"{path}: token array missing")
    entry = meta.splits[split]
    if verify and file_sha256(path) != entry.get("sha256"):
        raise TokenStoreError(f"{path}: content hash differs from {SIDECAR} (file changed after it was written)")
    arr = NpyRows(path)  # read on demand (pread), never mapped whole: see cxrsynth.data.arrays
    want = (int(entry["count"]), *meta.grid_size)
    if arr.dtype != DTYPE or arr.shape != want:
        raise TokenStoreError(f"{path}: expected uint16 {list(want)}, got {arr.dtype} {list(arr.shape)}")
    return arr
