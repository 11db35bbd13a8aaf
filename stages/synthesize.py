"""Stage `synthesize`: prompts -> key patches -> image tokens -> synthetic chest X-rays, with lineage.

Reads: params.yaml (base, paths, synthesize), `<models>/generator/` (with its copy of the key-patch bank),
`<models>/vqgan/`, and per `synthesize.prompt_source`: `<prompts>/prompts.parquet` (`prompts`: sampled and paired
prompts) or `<interim>/manifest.parquet` (`reports`: one prompt per test study from its own report).
Writes `<synthetic>/`: `images/<synthetic_id>.png`, `images.npy` (uint8 N x S x S, manifest order),
`manifest.parquet` (one row per image: prompt, terms, labels, key patches, seed, sampling params, model hashes),
`contact_sheet.png` (prompts beside their images), optional `dicom/`; and `<metrics>/synthesize.json` (count, images
per second, time, share of prompts with key patches, code usage).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.config import stage_params
from cxrsynth.io import write_json
from cxrsynth.synthesis import (Sampling, code_usage, load_models, prompts_from_parquet, prompts_from_reports,
                                synthesize, write_outputs)
from cxrsynth.train import pick_device


def main() -> None:
    params = stage_params()
    p, paths = params.synthesize, params.paths
    t0 = time.perf_counter()
    device = pick_device(params.base.device)
    if device.type == "cpu" and p.cpu_threads:
        torch.set_num_threads(p.cpu_threads)
    gen, vqgan, hashes = load_models(paths.models, device=device)
    if p.prompt_source == "prompts":
        prompts = prompts_from_parquet(pd.read_parquet(Path(paths.prompts) / "prompts.parquet"))
    else:
        prompts = prompts_from_reports(pd.read_parquet(Path(paths.interim) / "manifest.parquet"))
    sampling = Sampling(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, guidance_scale=p.guidance_scale,
                        batch_size=p.batch_size, dtype=p.dtype)
    torch.manual_seed(params.base.seed)
    syn = synthesize(gen, vqgan, prompts, sampling, base_seed=params.base.seed,
                     samples_per_prompt=p.samples_per_prompt, hashes=hashes)
    out = Path(paths.synthetic)
    for old in (out / "images", out / "dicom"):  # fixed names: stale files of an earlier run must not linger
        if old.is_dir():
            for f in old.iterdir():
                f.unlink()
    df = write_outputs(out, syn, write_dicom=p.write_dicom, sheet_images=p.contact_sheet_images,
                       dicom_seed=params.base.seed,
                       title=f"synthetic chest X-rays ({p.prompt_source}; T={p.temperature}, top-k {p.top_k}, "
                             f"top-p {p.top_p}, guidance {p.guidance_scale}; k={gen.layout.key_patches} key patches)")
    usage = code_usage(syn.codes, gen.layout.codebook_size)
    n_prompts = len(prompts)
    with_kp = float((df.groupby("prompt_id")["n_key_patches"].first() > 0).mean()) if n_prompts else 0.0
    metrics = {"count": int(len(df)), "prompts": n_prompts, "prompt_source": p.prompt_source,
               "samples_per_prompt": p.samples_per_prompt, "device": device.type,
               "images_per_second": round(len(df) / max(syn.sample_seconds, 1e-9), 2),
               "sample_seconds": round(syn.sample_seconds, 2), "seconds": round(time.perf_counter() - t0, 2),
               "prompts_with_key_patches": round(with_kp, 4),
               "mean_key_patches": round(float(df["n_key_patches"].mean()), 3) if len(df) else 0.0,
               "codes_used": usage["codes_used"], "code_usage": round(usage["usage"], 4),
               "code_perplexity": round(usage["perplexity"], 2), "mean_pixel": round(float(np.mean(syn.images)), 2),
               **{k: v[:16] for k, v in hashes.items()}}
    write_json(Path(paths.metrics) / "synthesize.json", metrics)
    print(f"synthesize: {len(df)} images from {n_prompts} prompts ({p.prompt_source}) in {metrics['seconds']} s "
          f"({metrics['images_per_second']} images/s sampling), {100 * with_kp:.0f}% of prompts with key patches, "
          f"{usage['codes_used']}/{gen.layout.codebook_size} codes used -> {out}")


if __name__ == "__main__":
    main()
