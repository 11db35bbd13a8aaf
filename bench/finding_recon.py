"""Do small findings survive the codebook? Per finding kind, how much of its contrast is left at the VQ-GAN's input
size and after the VQ-GAN's reconstruction, measured inside the phantom's ground-truth region (issue 21, hypothesis 4).

    python -m bench.finding_recon [split ...]      # default: validate test (images the VQ-GAN did not train on)

For every frontal image of the splits and every one-sided finding of its ground truth with a region (effusion,
pneumothorax, nodule, mass, consolidation, pneumonia, atelectasis, rib fracture, pleural thickening), the finding's
contrast is the mean intensity inside its region minus the mean inside the region mirrored left to right (the same
anatomy on the other side, which the phantom draws without that finding): what a reader or a classifier has to see.
It is measured three times on the same image: on the stored image (ingest.image_size, 128 px), on that image resized
to the VQ-GAN's input side (codebook.image_size, 64 px), and on the VQ-GAN's reconstruction. `kept` is the
reconstruction's contrast over the 128 px one (median over cases, with a bootstrap 95% interval); `area` is the
region's size in pixels at the VQ-GAN's side; `cells` the token-grid cells it covers. Reads the stage outputs of
fixture, ingest and codebook; writes nothing; prints a markdown table.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrsynth.config import stage_params
from cxrsynth.data.arrays import load_real
from cxrsynth.data.phantom.truth import TRUTH_FILE, truth_by_image
from cxrsynth.eval.alignment import region_canvas
from cxrsynth.images import resize, to_image_tensor
from cxrsynth.models.vqgan import VQGAN

LATERAL_KINDS = ("effusion", "pneumothorax", "nodule", "mass", "consolidation", "pneumonia", "atelectasis",
                 "rib_fracture", "pleural_thickening")


def region_mask(region: dict, rows: int, columns: int, image_size: int, mode: str, side: int) -> np.ndarray:
    """The region on the stored image's geometry (ingest's square resize), then at `side` pixels: bool."""
    canvas = region_canvas(region, rows, columns, image_size, mode)
    if side != image_size:
        canvas = np.asarray(Image.fromarray(canvas, mode="F").resize((side, side), Image.Resampling.BOX))
    return canvas >= 0.5


def contrast(image: np.ndarray, mask: np.ndarray) -> float | None:
    mirror = mask[:, ::-1] & ~mask
    if mask.sum() < 1 or mirror.sum() < 1:
        return None
    return float(image[mask].mean() - image[mirror].mean())


def median_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    boots = np.median(values[rng.integers(0, len(values), (n_boot, len(values)))], axis=1)
    return float(np.median(values)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def main(argv: list[str]) -> int:
    params = stage_params()
    paths, ing = params.paths, params.ingest
    splits = argv or ["validate", "test"]
    truth = truth_by_image(Path(paths.phantom) / TRUTH_FILE)
    vq = VQGAN.load(Path(paths.models) / "vqgan").eval()
    side, grid = vq.config.image_size, vq.config.grid_size
    cases: dict[str, list[tuple[float, float, float, int, int]]] = defaultdict(list)
    for split in splits:
        real = load_real(paths.interim, split)
        stored = np.asarray(real.images, np.float32) / 255.0
        with torch.no_grad():
            small = resize(to_image_tensor(np.asarray(real.images)), side)[:, 0].numpy()
            recon = vq.reconstruct(np.asarray(real.images))
        for i, dicom_id in enumerate(real.rows.dicom_id):
            rec = truth.get(str(dicom_id))
            if rec is None or rec.get("view") not in ("PA", "AP"):
                continue
            for f in rec.get("findings", []):
                if f.get("kind") not in LATERAL_KINDS or f.get("side") not in ("left", "right") or not f.get("region"):
                    continue
                m_hi = region_mask(f["region"], rec["rows"], rec["columns"], ing.image_size, ing.resize,
                                   ing.image_size)
                m_lo = region_mask(f["region"], rec["rows"], rec["columns"], ing.image_size, ing.resize, side)
                c = (contrast(stored[i], m_hi), contrast(small[i], m_lo), contrast(recon[i], m_lo))
                if any(v is None for v in c) or abs(c[0]) < 1e-3:
                    continue
                cells = np.asarray(Image.fromarray(m_lo.astype(np.float32), mode="F")
                                   .resize((grid, grid), Image.Resampling.BOX)) >= 0.5
                cases[f["kind"]].append((*c, int(m_lo.sum()), int(cells.sum())))
    print(f"VQ-GAN input {side} px, {grid} x {grid} tokens; stored images {ing.image_size} px; splits "
          f"{', '.join(splits)}\n")
    print("| finding | n | area at VQ-GAN side (px, median) | cells (median) | contrast 128 px | contrast 64 px | "
          "contrast reconstructed | kept (recon / 128 px, median [95% CI]) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in LATERAL_KINDS:
        rows = np.asarray(cases.get(kind, []), np.float64)
        if not len(rows):
            continue
        kept = rows[:, 2] / rows[:, 0]
        k, lo, hi = median_ci(kept)
        print(f"| {kind} | {len(rows)} | {np.median(rows[:, 3]):.0f} | {np.median(rows[:, 4]):.0f} | "
              f"{np.median(rows[:, 0]):+.3f} | {np.median(rows[:, 1]):+.3f} | {np.median(rows[:, 2]):+.3f} | "
              f"{k:.2f} [{lo:.2f}, {hi:.2f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
