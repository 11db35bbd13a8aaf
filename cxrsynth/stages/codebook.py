"""Stage `codebook`: train the VQ-GAN visual codebook on the ingested training images and measure it on validate.

Reads: params.yaml (base, paths.interim, paths.models, paths.metrics, codebook), `<interim>/images_train.npy` and
`<interim>/images_validate.npy`.
Writes:
- `<models>/vqgan/`: config.json + model.safetensors (the weights with the best validation PSNR; rebuilt by
  `VQGAN.load` with no params);
- `<models>/vqgan_checkpoints/`: resume state (persistent: a killed run restarts from its last checkpoint; a finished
  one with unchanged params, data and code returns at once);
- `<metrics>/codebook.json`: validation PSNR and SSIM, codebook usage share, codes used and perplexity on validate
  (the final weights), training time and steps, quantizer, grid and codebook size, parameter count;
- `<metrics>/codebook_reconstructions.png`: validation images at the model's resolution (top row) above their
  reconstructions (bottom row, with PSNR);
- dvclive curves (losses, learning rate, validation PSNR / SSIM / usage / perplexity) in `codebook.live_dir`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cxrsynth.stages import check_outputs
from cxrsynth.config import stage_params
from cxrsynth.data.arrays import split_images
from cxrsynth.io import write_json
from cxrsynth.models.vqgan import (QUANTIZER_NAMES, fit, grid_images, psnr, reconstruction_metrics, to_model_input,
                                   to_unit, training_record, weights_sha256)
from cxrsynth.viz import image_grid


def main() -> None:
    params = stage_params()
    check_outputs(params, "codebook")
    p, paths = params.codebook, params.paths
    # read per batch from the files (memory bounded by the batch, not by the split)
    train_images = split_images(paths.interim, "train")
    validate_images = split_images(paths.interim, "validate")
    model, result = fit(p, train_images, validate_images, seed=params.base.seed, device=params.base.device,
                        out_dir=Path(paths.models) / "vqgan_checkpoints", live_dir=p.live_dir)
    model = model.cpu().eval()
    out = Path(paths.models) / "vqgan"
    model.save(out, extra=training_record(p, result))

    val = reconstruction_metrics(model, validate_images)
    n = min(p.grid_images, len(validate_images))
    shown = to_unit(to_model_input(validate_images[:n], p.image_size))[:, 0]  # what the model saw (resized)
    rec = torch.from_numpy(model.reconstruct(validate_images[:n]))
    db = psnr(rec, shown).tolist()
    sheet = image_grid(grid_images(shown.numpy(), rec.numpy()),
                       [f"validate #{i}" for i in range(n)] + [f"reconstruction #{i}: {v:.1f} dB" for i, v in
                                                                enumerate(db)],
                       cols=max(n, 1), tile=160, caption_lines=1,
                       title=f"VQ-GAN ({p.quantizer}, {p.codebook_size} codes, {p.grid_size}x{p.grid_size} tokens, "
                             f"{p.image_size}px): validation images (top) above their reconstructions (bottom)")
    png = Path(paths.metrics) / "codebook_reconstructions.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png, optimize=False)

    n_params = sum(t.numel() for t in model.parameters())
    metrics = {"val_psnr": round(val["psnr"], 3), "val_ssim": round(val["ssim"], 4),
               "val_usage": round(val["usage"], 4), "val_codes_used": val["codes_used"],
               "val_perplexity": round(val["perplexity"], 2),
               "val_position_entropy": round(val["position_entropy"], 4) if "position_entropy" in val else None,
               "quantizer": p.quantizer, "preset": p.preset, "codebook_size": p.codebook_size,
               "grid_size": p.grid_size, "image_size": p.image_size, "embed_dim": p.embed_dim,
               "quantizer_name": QUANTIZER_NAMES[p.quantizer], "parameters": n_params, "steps": result.step,
               "resumed_from_step": result.resumed_from, "gan_steps": max(0, result.step - p.disc_start)
               if p.disc_weight > 0 else 0,
               "train_seconds": round(result.total_seconds, 1), "train_seconds_this_run": round(result.seconds, 1),
               "n_train": len(train_images), "n_validate": len(validate_images),
               "weights_sha256": weights_sha256(out)}
    write_json(Path(paths.metrics) / "codebook.json", metrics)
    print(f"codebook: {p.quantizer}, validate PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.3f}, "
          f"{val['codes_used']}/{p.codebook_size} codes ({100 * val['usage']:.0f}%), perplexity "
          f"{val['perplexity']:.1f}, {result.step} steps in {result.total_seconds:.0f} s")

