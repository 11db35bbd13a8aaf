"""Stage `align`: fine-grained image-text alignment of reports with VQ-GAN token grids, and the key-patch bank.

Reads: params.yaml (base, paths.interim, paths.tokens, paths.models, paths.phantom, paths.metrics, ingest.image_size,
ingest.resize, align), `<interim>/manifest.parquet` (reports: findings + impression, splits, views for the bank's
strata), `<interim>/images_validate.npy` (heat maps), `<tokens>/tokens_<split>.npy` (checked against
`<models>/vqgan`), `<models>/vqgan/` (the frozen codebook), and when present the phantom's
`<phantom>/ground_truth.jsonl` (finding regions for the pointing game).
Writes:
- `<models>/align_checkpoints/`: resumable training state (a killed run resumes from it);
- `<models>/align/`: config.json + model.safetensors (heads, patch encoder with the codebook, temperature),
  `text_encoder/` (BERT + tokenizer) and `bank.json` (the `cxrsynth.keypatches.KeyPatchBank` the generator uses);
- `<metrics>/align.json`: validate retrieval Recall@1/5/10 both ways against chance, the pointing game per finding
  (image-based and bank-based against a random draw and the region's area share), bank size, training time;
- `<metrics>/align_heatmaps.png`: per finding, validate images with their region, the finding words' similarity map
  and the top-k cells; dvclive curves in `align.live_dir`.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth.stages import check_outputs
from cxrsynth.config import stage_params
from cxrsynth.data.arrays import split_images, split_rows
from cxrsynth.data.phantom.truth import TRUTH_FILE, truth_by_image
from cxrsynth.data.tokens import load_tokens
from cxrsynth.eval.alignment import heatmap_tiles, pointing_cases, pointing_metrics, pointing_truth
from cxrsynth.io import write_json
from cxrsynth.keypatches import build_bank
from cxrsynth.models.align_training import Pairs, fit, retrieval_metrics
from cxrsynth.models.vqgan import VQGAN, weights_sha256
from cxrsynth.text.sections import report_text
from cxrsynth.viz import image_grid

ROW_COLUMNS = ("subject_id", "study_id", "dicom_id", "view")  # what callers read of `split_pairs`' rows
HEATMAP_FINDINGS = ("pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "lung lesion")


def split_pairs(manifest: pd.DataFrame, tokens_dir: Path, split: str, vqgan_sha: str) -> tuple[Pairs, pd.DataFrame]:
    """A split's report texts and token grids, row-aligned through manifest.image_row."""
    grids = np.asarray(load_tokens(tokens_dir, split, expected_sha256=vqgan_sha))
    rows = split_rows(manifest, split, len(grids), f"{tokens_dir}/tokens_{split}.npy")
    texts = [report_text(f, i, lp) for f, i, lp in zip(rows.findings, rows.impression, rows.last_paragraph)]
    # the section columns are in `texts` now: the rows keep only what the stage reads later (~1 kB per image less)
    return Pairs(texts, grids, rows.study_id.to_numpy()), rows[[c for c in rows.columns if c in ROW_COLUMNS]]


def main() -> None:
    params = stage_params()
    check_outputs(params, "align")
    p, paths = params.align, params.paths
    t0 = time.perf_counter()
    vqgan_dir = Path(paths.models) / "vqgan"
    sha = weights_sha256(vqgan_dir)
    codebook = VQGAN.load(vqgan_dir).codebook.detach().float().clone()
    manifest = pd.read_parquet(Path(paths.interim) / "manifest.parquet", columns=[
        "split", "image_row", "study_id", "dicom_id", "view", "findings", "impression", "last_paragraph"])
    data = {s: split_pairs(manifest, Path(paths.tokens), s, sha) for s in ("train", "validate", "test")
            if (manifest.split == s).any()}
    del manifest
    train_pairs = data["train"][0]
    validate = data.get("validate", (Pairs([], train_pairs.grids[:0], np.zeros(0)), None))[0]

    # the frozen encoder's token states go to an on-disk store in this folder (TMPDIR; MIMIC-CXR: ~1.5 kB per
    # token in float32, see README), read per batch by training and the bank
    with tempfile.TemporaryDirectory(prefix="cxrsynth-align-") as work:
        model, result = fit(p, train_pairs, validate, codebook, seed=params.base.seed, device=params.base.device,
                            live_dir=p.live_dir, workdir=work, out_dir=Path(paths.models) / "align_checkpoints")
        model.bank = build_bank(model, train_pairs.texts, train_pairs.grids, p.bank,
                                strata=data["train"][1].view.to_numpy(),
                                text_states=getattr(model, "text_states", None))
        out = model.save(Path(paths.models) / "align", extra={
            "vqgan": {"path": vqgan_dir.as_posix(), "weights_sha256": sha},
            "training": {"steps": result.step, "best_step": result.best_step,
                         "best_recall_at_5": None if result.best_metric is None else round(result.best_metric, 4)}})

    metrics: dict = {"text_encoder": model.config.text_source, "text_frozen": model.config.text_frozen,
                     "train_pairs": len(train_pairs.texts), "steps": result.step, "best_step": result.best_step,
                     "train_seconds": round(result.seconds, 1), "temperature": round(
                         float(1.0 / model.core.logit_scale.detach().exp()), 4),
                     "bank/keys": len(model.bank.entries),
                     "bank/pathology_anatomy_keys": sum("|" in k for k in model.bank.entries)}
    if len(validate.texts):
        held = validate.head(p.retrieval_max)
        sim = model.similarity_matrix(held.texts, held.grids)
        metrics.update({f"retrieval/{k}": v for k, v in retrieval_metrics(sim, held.groups).items()})
        metrics["retrieval/n"] = len(held.texts)

    sidecar = Path(paths.phantom) / TRUTH_FILE
    tiles, caps = [], []
    if sidecar.is_file():
        held_splits = [s for s in ("validate", "test") if s in data]
        # only the held-out images' records, and only what the pointing game reads of them
        truth = truth_by_image(sidecar, pointing_truth, ids={d for s in held_splits for d in data[s][1].dicom_id})
        cases_by_split = {}
        for split in held_splits:
            pairs, rows = data[split]
            cases_by_split[split] = pointing_cases(model, pairs, [truth.get(d) for d in rows.dicom_id],
                                                   k=p.pointing_k, image_size=params.ingest.image_size,
                                                   resize=params.ingest.resize,
                                                   keep_maps=p.heatmap_examples if split == "validate" else 0)
        del truth
        held_out = [c for cs in cases_by_split.values() for c in cs]
        metrics["pointing/k"] = p.pointing_k
        metrics["pointing/splits"] = sorted(cases_by_split)
        metrics.update(pointing_metrics(held_out, p.pointing_k, seed=params.base.seed))
        if p.heatmap_examples and cases_by_split.get("validate"):
            images = split_images(paths.interim, "validate")
            for name in HEATMAP_FINDINGS:
                chosen = [c for c in cases_by_split["validate"] if c.finding == name and c.word_map is not None]
                for c in chosen[:p.heatmap_examples]:
                    tiles += heatmap_tiles(images[c.index], c)
                    caps += [f"validate #{c.index} {name}: region cells", "its words -> patch similarity",
                             f"top-{p.pointing_k}: image-based white, bank grey"]
    if not tiles:  # no phantom ground truth (real data): the plot output still exists
        tiles, caps = [np.zeros((8, 8), np.uint8)], ["no finding regions known (phantom ground truth absent)"]
    image_grid(tiles, caps, cols=6, tile=192, caption_lines=2,
               title="align: word-to-patch similarity of finding words over validate images"
               ).save(Path(paths.metrics) / "align_heatmaps.png")
    metrics["stage_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(Path(paths.metrics) / "align.json", metrics)
    keys = [k for k in metrics if k.startswith(("retrieval/text_to_image/R@", "pointing/ratio/"))]
    print(f"align: model in {out}; " + ", ".join(f"{k}={metrics[k]}" for k in keys))

