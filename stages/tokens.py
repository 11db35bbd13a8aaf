"""Stage `tokens`: the VQ-GAN token grid of every ingested image, cached as memory-mappable uint16 arrays.

Reads: params.yaml (base, paths.interim, paths.models, paths.tokens, paths.metrics, tokens), `<models>/vqgan/`,
`<interim>/manifest.parquet` and `<interim>/images_<split>.npy` for every split.
Writes:
- `<tokens>/tokens_<split>.npy`: uint16 N x H x W, row i = the image with manifest `image_row` i of that split;
- `<tokens>/tokens.json`: grid size, codebook size, image size, SHA-256 of the VQ-GAN weights, counts and hashes
  (`cxrsynth.data.tokens`);
- `<metrics>/tokens.json`: per split count, codes used, usage share and perplexity, the PSNR of the images decoded back
  from the stored tokens (validate and test), encoding speed.

Encoding always runs in float32 (under bf16 a nearest-code search can flip), so tokens do not depend on the device's
precision settings.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.config import stage_params
from cxrsynth.data.ingest import load_split
from cxrsynth.data.layout import SPLITS
from cxrsynth.data.tokens import array_sha256, load_tokens, write_tokens
from cxrsynth.io import write_json
from cxrsynth.models.vqgan import VQGAN, code_usage, psnr, to_model_input, to_unit, weights_sha256
from cxrsynth.train import pick_device


def split_images(interim: str | Path, manifest: pd.DataFrame, split: str) -> np.ndarray:
    """A split's image array, after checking that its rows are the manifest's image_row 0..N-1 of that split."""
    images = load_split(interim, split)
    rows = np.sort(manifest.loc[manifest.split == split, "image_row"].to_numpy())
    if len(rows) != len(images) or not (rows == np.arange(len(images))).all():
        raise SystemExit(f"{Path(interim) / f'images_{split}.npy'}: {len(images)} images but the manifest's "
                         f"image_row of split {split!r} is not 0..{len(rows) - 1}")
    return images


def main() -> None:
    params = stage_params()
    p, paths = params.tokens, params.paths
    vqgan_dir = Path(paths.models) / "vqgan"
    device = pick_device(params.base.device)
    if device.type == "cuda":  # TF32 convolutions flip ~1% of near-tie tokens relative to a CPU run; keep full fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model = VQGAN.load(vqgan_dir, device=device)
    manifest = pd.read_parquet(Path(paths.interim) / "manifest.parquet", columns=["split", "image_row"])
    splits = [s for s in SPLITS if (manifest.split == s).any()]

    tokens, sources, seconds, n_images = {}, {}, 0.0, 0
    for split in splits:
        images = split_images(paths.interim, manifest, split)
        t0 = time.perf_counter()
        tokens[split] = model.tokenize(images, batch_size=p.batch_size)
        seconds += time.perf_counter() - t0
        n_images += len(images)
        sources[split] = array_sha256(images)
    sha = weights_sha256(vqgan_dir)
    meta = write_tokens(paths.tokens, tokens, codebook_size=model.config.codebook_size,
                        image_size=model.config.image_size, vqgan_sha256=sha, vqgan_path=vqgan_dir.as_posix(),
                        images_sha256=sources)

    metrics: dict = {"grid_size": list(meta.grid_size), "codebook_size": meta.codebook_size,
                     "image_size": meta.image_size, "vqgan_sha256": sha[:16],
                     "encode_images_per_second": round(n_images / max(seconds, 1e-9), 1), "device": device.type}
    for split in splits:
        stored = load_tokens(paths.tokens, split, expected_sha256=sha)  # read back through the checked reader
        usage = code_usage(stored, meta.codebook_size)
        metrics[split] = {"count": int(len(stored)), "codes_used": usage["codes_used"],
                          "usage": round(usage["usage"], 4), "perplexity": round(usage["perplexity"], 2),
                          "position_entropy": round(usage["position_entropy"], 4) if "position_entropy" in usage
                          else None}
        if split != "train":  # the round trip: stored tokens -> pixels, against the (resized) originals
            images = load_split(paths.interim, split)
            decoded = torch.from_numpy(model.decode_tokens(stored, batch_size=p.batch_size))
            ref = to_unit(to_model_input(np.asarray(images), model.config.image_size))[:, 0]
            metrics[split]["decoded_psnr"] = round(float(psnr(decoded, ref).mean()), 3) if len(stored) else None
    write_json(Path(paths.metrics) / "tokens.json", metrics)
    print(f"tokens: {', '.join(f'{s} {len(t)}' for s, t in tokens.items())} images -> {meta.grid_size[0]}x"
          f"{meta.grid_size[1]} tokens of {meta.codebook_size} codes in {paths.tokens}")


if __name__ == "__main__":
    main()
