"""Synthesis: prompt -> key patches -> image tokens -> pixels, with lineage.

The pipeline a prompt goes through, shared by the `synthesize` stage and `python -m cxrsynth generate`: prompt
records (from prompts.parquet or from test reports), key patches from the bank by the prompt's terms, image tokens
from `cxrsynth.models.token_sampler`, pixels from the VQ-GAN decoder, and every image's lineage (seed, model hashes).
Files are written by `cxrsynth.data.synthetic`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.errors import UserError
from cxrsynth.keypatches import BANK_FILE, terms_from_json, terms_of_text
from cxrsynth.models.generator import Generator, folder_sha256
from cxrsynth.models.token_sampler import Sampling, image_seed, sample_codes
from cxrsynth.shards import digest
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.sections import report_text


class SynthesisError(UserError):
    """Models that cannot be used together, or missing inputs; one line naming the file."""


@dataclass
class PromptRecord:
    """One prompt to draw images for."""

    prompt_id: str
    text: str
    view: str = "PA"
    kind: str = "sampled"
    terms: list = field(default_factory=list)            # cxrsynth.text.specs.Term
    labels: dict = field(default_factory=dict)           # CheXpert observation -> 1/0/-1/NaN
    seed: int = 0
    source_study_id: float = float("nan")
    source_dicom_id: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# prompts

def _labels(row) -> dict:
    return {o: float(row[o]) if o in row and pd.notna(row[o]) else float("nan") for o in OBSERVATIONS}


def prompts_from_parquet(df: pd.DataFrame) -> list[PromptRecord]:
    """prompts.parquet rows (both kinds), terms from its `terms` column."""
    out = []
    for _, r in df.iterrows():
        out.append(PromptRecord(
            prompt_id=str(r["prompt_id"]), text=str(r["text"]), view=str(r.get("view") or "PA"),
            kind=str(r.get("kind") or "sampled"), terms=terms_from_json(r.get("terms")), labels=_labels(r),
            seed=int(r.get("seed") or 0),
            source_study_id=float(r["source_study_id"]) if pd.notna(r.get("source_study_id")) else float("nan"),
            source_dicom_id=str(r["source_dicom_id"]) if pd.notna(r.get("source_dicom_id")) else None))
    return out


def prompts_from_reports(manifest: pd.DataFrame, split: str = "test") -> list[PromptRecord]:
    """One prompt per study of `split` from its own report (findings + impression), paired with the study's first
    image (by dicom_id) through source_dicom_id; terms extracted from the report text; labels from the manifest."""
    rows = manifest[manifest.split == split].sort_values(["study_id", "dicom_id"])
    out = []
    for study, g in rows.groupby("study_id", sort=True):
        r = g.iloc[0]
        text = report_text(r.get("findings"), r.get("impression"), r.get("last_paragraph"))
        out.append(PromptRecord(prompt_id=f"r{int(study)}", text=text, view=str(r["view"]), kind="report",
                                terms=terms_of_text(text), labels=_labels(r), seed=0,
                                source_study_id=float(study), source_dicom_id=str(r["dicom_id"])))
    return out


# ----------------------------------------------------------------------------------------------------------------
# the sampler


def decode(vqgan, codes: np.ndarray, chunk: int = 16) -> np.ndarray:
    """uint8 N x S x S images from token grids. The decoder always sees batches of exactly `chunk` grids (the last
    one padded), so the kernels chosen, and hence every image, do not depend on how many images are decoded."""
    s = vqgan.config.image_size
    codes = np.asarray(codes, np.int64)
    out = np.zeros((len(codes), s, s), np.uint8)
    for i in range(0, len(codes), chunk):
        part = codes[i:i + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), *part.shape[1:]), np.int64)])
        imgs = vqgan.decode_tokens(padded, batch_size=chunk)[:len(part)]
        out[i:i + len(part)] = (np.clip(imgs, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------------------
# prompts -> images, with lineage

@dataclass
class Synthesis:
    """What `synthesize` made: the manifest rows (without `file`), codes and images in the same order."""

    rows: list[dict]
    codes: np.ndarray
    images: np.ndarray
    seconds: float
    sample_seconds: float
    total: int = 0            # items of the whole (prompt, sample) list; rows are items [start, start + len(rows))
    start: int = 0
    work_sha256: str = ""     # hash of all the rows of the whole list (shards of one run agree on it)


def model_hashes(generator_dir: str | Path, vqgan_dir: str | Path) -> dict:
    """sha256 of the weights / bank files that made the images (the bank is the copy in the generator folder)."""
    return {"generator_sha256": folder_sha256(generator_dir, ["model.safetensors"]),
            "vqgan_sha256": folder_sha256(vqgan_dir, ["model.safetensors"]),
            "align_sha256": folder_sha256(generator_dir, [BANK_FILE])}


def check_models(gen: Generator, vqgan, vqgan_sha256: str) -> None:
    """The generator speaks the VQ-GAN's codebook (same grid and size, and the tokens it learned came from exactly
    these weights, when recorded)."""
    lay, c = gen.layout, vqgan.config
    if lay.codebook_size != c.codebook_size or lay.grid != (c.grid_size, c.grid_size):
        raise SynthesisError(f"generator grid {lay.grid} / {lay.codebook_size} codes does not fit the VQ-GAN "
                             f"({c.grid_size}x{c.grid_size}, {c.codebook_size} codes)")
    trained_on = gen.meta.get("vqgan_sha256")
    if trained_on and trained_on != vqgan_sha256:
        raise SynthesisError(f"the generator was trained on tokens of VQ-GAN {trained_on[:12]}, but the VQ-GAN "
                             f"folder holds {vqgan_sha256[:12]}: retrain the generator (dvc repro generator)")


def synthesize(gen: Generator, vqgan, prompts: Sequence[PromptRecord], sampling: Sampling, *, base_seed: int,
               samples_per_prompt: int = 1, hashes: dict | None = None, progress: bool = True,
               items: tuple[int, int] | None = None) -> Synthesis:
    """Key patches, tokens and pixels for every (prompt, sample), plus the manifest rows (contract columns); with
    `items` = (start, stop) only those items of the (prompt, sample) list (a shard)."""
    t0 = time.perf_counter()
    rows, encoded, seeds, views = [], [], [], []
    for p in prompts:
        kps = gen.key_patches(p.terms)
        ids = gen.encode_prompt(p.text, kps, p.view)
        for s in range(samples_per_prompt):
            seed = image_seed(base_seed, p.prompt_id, p.seed, s)
            rows.append({"synthetic_id": f"syn-{p.prompt_id}-{s}", "prompt_id": p.prompt_id, "sample": s,
                         "kind": p.kind, "text": p.text, "view": p.view,
                         "terms": json.dumps([t if isinstance(t, dict) else asdict(t) for t in p.terms],
                                             sort_keys=True),
                         "key_patches": json.dumps([asdict(kp) for kp in kps], sort_keys=True), "seed": seed,
                         **{o: float(p.labels.get(o, float("nan"))) for o in OBSERVATIONS},
                         "source_study_id": p.source_study_id, "source_dicom_id": p.source_dicom_id,
                         "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                         "guidance_scale": sampling.guidance_scale,
                         "key_patch_placement": sampling.key_patch_placement, **(hashes or {}),
                         "n_key_patches": len(kps)})
            encoded.append(ids)
            seeds.append(seed)
            views.append(p.view)
    start, stop = items if items is not None else (0, len(rows))
    t1 = time.perf_counter()
    codes = sample_codes(gen, encoded[start:stop], seeds[start:stop], sampling, views=views[start:stop],
                         progress=progress, desc="synthesize")
    t2 = time.perf_counter()
    images = decode(vqgan, codes)
    return Synthesis(rows[start:stop], codes, images, time.perf_counter() - t0, t2 - t1, total=len(rows), start=start,
                     work_sha256=digest(rows))


# ----------------------------------------------------------------------------------------------------------------
# files


def load_models(models_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, object, dict]:
    """The trained generator and VQ-GAN under `models_dir` (generator/, vqgan/), checked against each other, and
    their hashes; a clear error when either has not been trained yet."""
    from cxrsynth.models.vqgan import VQGAN

    models_dir = Path(models_dir)
    g_dir, v_dir = models_dir / "generator", models_dir / "vqgan"
    for d, stage in ((v_dir, "codebook"), (g_dir, "generator")):
        if not (d / "model.safetensors").is_file():
            raise SynthesisError(f"{d}: no trained model there; train it first (`dvc repro {stage}`)")
    gen = Generator.load(g_dir, device=device)
    vqgan = VQGAN.load(v_dir, device=device)
    hashes = model_hashes(g_dir, v_dir)
    check_models(gen, vqgan, hashes["vqgan_sha256"])
    return gen, vqgan, hashes


# ----------------------------------------------------------------------------------------------------------------
# the stage, whole or sharded


