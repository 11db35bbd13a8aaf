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
from cxrsynth.stages import check_outputs
from cxrsynth.data.arrays import split_rows

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.config import stage_params
from cxrsynth.data.arrays import NpyRows, iter_chunks, split_images, stream_sha256
from cxrsynth.data.layout import SPLITS
from cxrsynth.data.tokens import load_tokens, write_tokens
from cxrsynth.io import write_json
from cxrsynth.models.vqgan import VQGAN, code_usage, psnr, to_model_input, to_unit, weights_sha256
from cxrsynth.train import pick_device


def checked_images(interim: str | Path, manifest: pd.DataFrame, split: str) -> NpyRows:
    """A split's images (read per batch), after checking that its rows are the manifest's image_row 0..N-1."""
    images = split_images(interim, split)
    split_rows(manifest, split, len(images), f"{Path(interim) / f'images_{split}.npy'}")
    return images


def encode_split(model: VQGAN, images, batch_size: int) -> np.ndarray:
    """uint16 token grids of every image, encoded batch by batch (RAM: the grids, 2 bytes per token, plus a batch)."""
    g = model.config.grid_size
    out = np.empty((len(images), g, g), np.uint16)
    for i, chunk in iter_chunks(images, rows=batch_size):
        out[i:i + len(chunk)] = model.tokenize(chunk, batch_size=batch_size)
    return out


def decoded_psnr(model: VQGAN, stored: np.ndarray, images, batch_size: int) -> float | None:
    """Mean PSNR of the images decoded from the stored tokens against the (resized) originals, batch by batch."""
    if not len(stored):
        return None
    total = 0.0
    for i in range(0, len(stored), batch_size):
        decoded = torch.from_numpy(model.decode_tokens(np.asarray(stored[i:i + batch_size]), batch_size=batch_size))
        ref = to_unit(to_model_input(images[i:i + batch_size], model.config.image_size))[:, 0]
        total += float(psnr(decoded, ref).double().sum())
    return total / len(stored)


def main() -> None:
    params = stage_params()
    check_outputs(params, "tokens")
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
        images = checked_images(paths.interim, manifest, split)
        t0 = time.perf_counter()
        tokens[split] = encode_split(model, images, p.batch_size)
        seconds += time.perf_counter() - t0
        n_images += len(images)
        sources[split] = stream_sha256(images)  # the SHA-256 of the array's bytes, read chunk by chunk
    sha = weights_sha256(vqgan_dir)
    meta = write_tokens(paths.tokens, tokens, codebook_size=model.config.codebook_size,
                        image_size=model.config.image_size, vqgan_sha256=sha, vqgan_path=vqgan_dir.as_posix(),
                        images_sha256=sources)

    metrics: dict = {"grid_size": list(meta.grid_size), "codebook_size": meta.codebook_size,
                     "image_size": meta.image_size, "vqgan_sha256": sha[:16],
                     "encode_images_per_second": round(n_images / max(seconds, 1e-9), 1), "device": device.type}
    counts = {s: len(t) for s, t in tokens.items()}
    del tokens
    for split in splits:
        stored = load_tokens(paths.tokens, split, expected_sha256=sha)  # read back through the checked reader
        usage = code_usage(stored, meta.codebook_size)
        metrics[split] = {"count": int(len(stored)), "codes_used": usage["codes_used"],
                          "usage": round(usage["usage"], 4), "perplexity": round(usage["perplexity"], 2),
                          "position_entropy": round(usage["position_entropy"], 4) if "position_entropy" in usage
                          else None}
        if split != "train":  # the round trip: stored tokens -> pixels, against the (resized) originals
            v = decoded_psnr(model, stored, split_images(paths.interim, split), p.batch_size)
            metrics[split]["decoded_psnr"] = round(v, 3) if v is not None else None
    write_json(Path(paths.metrics) / "tokens.json", metrics)
    print(f"tokens: {', '.join(f'{s} {n}' for s, n in counts.items())} images -> {meta.grid_size[0]}x"
          f"{meta.grid_size[1]} tokens of {meta.codebook_size} codes in {paths.tokens}")

