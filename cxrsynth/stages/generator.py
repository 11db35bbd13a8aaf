"""Stage `generator`: train the causal LM that writes an image's codebook tokens from a prompt and its key patches.

Reads: params.yaml (base, paths, generator), `<interim>/manifest.parquet` (train/validate reports and views),
`<tokens>/` (token grids of train and validate, checked against their sidecar), `<models>/align/bank.json` (the
key-patch bank; not read when generator.key_patches is 0).
Writes:
- `<models>/generator/`: a self-describing folder (save_pretrained config + safetensors, generation config,
  tokenizer, a copy of the bank, generator.json with the layout and provenance; `Generator.load` needs no params);
- `<models>/generator_checkpoints/`: resume state (a killed run restarts from its last checkpoint);
- `<metrics>/generator.json`: validation loss / perplexity per image token, steps, time, parameters, sequence layout,
  share of training prompts that got key patches;
- dvclive curves in `generator.live_dir`.

`--bank PATH` (development only) reads the bank from another folder than `<models>/align`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

import cxrsynth.models.generator as generator_module
from cxrsynth.stages import check_outputs
from cxrsynth.config import stage_params
from cxrsynth.data.arrays import split_rows
from cxrsynth.data.tokens import load_tokens, read_meta
from cxrsynth.io import write_json
from cxrsynth.keypatches import BANK_FILE, KeyPatchBank, terms_of_text
from cxrsynth.models.generator import (ModelSpec, build_tokenizer, file_sha256, fit, new_generator, training_data,
                                       weights_sha256)
from cxrsynth.text.sections import report_text
from cxrsynth.train import TrainConfig, pick_device


def split_reports(manifest: pd.DataFrame, split: str) -> tuple[list[str], list[str]]:
    """Report texts and views of a split in image_row order (aligned with its token array)."""
    n = int((manifest.split == split).sum())
    rows = split_rows(manifest, split, n, "manifest")
    texts = [report_text(f, i, lp) for f, i, lp in zip(rows.findings, rows.impression, rows.last_paragraph)]
    return texts, [str(v) for v in rows.view]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bank", default=None, help="key-patch bank folder (default: <models>/align)")
    args = ap.parse_args()
    params = stage_params()
    check_outputs(params, "generator")
    p, paths = params.generator, params.paths
    if pick_device(params.base.device).type == "cpu" and p.cpu_threads:
        torch.set_num_threads(p.cpu_threads)
    manifest = pd.read_parquet(Path(paths.interim) / "manifest.parquet",
                               columns=["split", "image_row", "view", "findings", "impression", "last_paragraph"])
    meta = read_meta(paths.tokens)
    grid, k_codes = tuple(meta.grid_size), meta.codebook_size
    tokens = {s: load_tokens(paths.tokens, s) for s in ("train", "validate") if s in meta.splits}  # memory-mapped
    texts, views = {}, {}
    for s in tokens:
        texts[s], views[s] = split_reports(manifest, s)

    bank_dir = Path(args.bank) if args.bank else Path(paths.models) / "align"
    bank = KeyPatchBank.load(bank_dir) if p.key_patches > 0 else KeyPatchBank(grid, k_codes)
    tokenizer = build_tokenizer(texts["train"], p.text_vocab_size, grid, k_codes)
    spec = ModelSpec(arch=p.arch, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, dropout=p.dropout)
    gen = new_generator(spec, tokenizer, grid=grid, codebook_size=k_codes, key_patches=p.key_patches,
                        max_text_tokens=p.max_text_tokens, bank=bank, seed=params.base.seed,
                        pretrained_path=p.pretrained_path)
    kp_stats: dict[str, dict] = {s: {} for s in tokens}
    data = {s: training_data(gen, texts[s], views[s], tokens[s], terms_of_text,
                             key_patch_codes=p.key_patch_codes if s == "train" else "bank",  # validate as synthesis
                             seed=params.base.seed, stats=kp_stats[s]) for s in tokens}
    splits = list(tokens)
    del tokens, texts, views, manifest  # training reads the compact TrainingData only
    val = data.get("validate") or data["train"]

    # checkpoint fingerprint: params, the exact token arrays, the bank, the tokenizer and the model code
    bank_sha = file_sha256(bank_dir / BANK_FILE) if p.key_patches > 0 else ""
    run_id = hashlib.sha256(json.dumps([dataclasses.asdict(p), file_sha256(Path(paths.tokens) / "tokens.json"),
                                        bank_sha, tokenizer.backend_tokenizer.to_str(),
                                        file_sha256(generator_module.__file__)], sort_keys=True).encode()
                            ).hexdigest()[:16]
    cfg = TrainConfig(max_steps=p.steps, lr=p.lr, min_lr_ratio=p.min_lr_ratio, warmup_steps=p.warmup_steps,
                      weight_decay=p.weight_decay, betas=(0.9, 0.95), grad_clip=p.grad_clip, ema_decay=p.ema_decay,
                      device=params.base.device, dtype=p.dtype, compile=p.compile, seed=params.base.seed,
                      log_every=10, eval_every=p.eval_every, checkpoint_every=p.checkpoint_every,
                      select_metric="loss", select_mode="min",
                      out_dir=str(Path(paths.models) / "generator_checkpoints"), live_dir=p.live_dir,
                      run_id=run_id, desc="generator")
    result = fit(gen, data["train"], val, cfg, batch_size=p.batch_size, prompt_dropout=p.prompt_dropout,
                 seed=params.base.seed)
    gen.model.cpu()

    out = Path(paths.models) / "generator"
    lay = gen.layout
    n_params = sum(t.numel() for t in gen.model.parameters())
    last = result.history[-1] if result.history else {}
    best = next((h for h in result.history if h["step"] == result.best_step), last)
    record = {"vqgan_sha256": meta.vqgan_sha256, "tokens_sha256": {s: meta.splits[s]["sha256"] for s in splits},
              "bank_source": bank_dir.as_posix() if p.key_patches > 0 else "",
              "training": {"params": dataclasses.asdict(p), "seed": params.base.seed, "steps": result.step,
                           "best_step": result.best_step, "history": result.history}}
    gen.save(out, extra=record)
    kp_share = float((data["train"].n_key_patches > 0).mean())
    metrics = {"val_loss": round(best.get("loss", float("nan")), 4),
               "val_perplexity": round(best.get("perplexity", float("nan")), 2),
               "best_step": result.best_step, "steps": result.step, "resumed_from_step": result.resumed_from,
               "train_seconds": round(result.total_seconds, 1), "train_seconds_this_run": round(result.seconds, 1),
               "parameters": n_params, "arch": p.arch if not p.pretrained_path else "pretrained",
               "vocab_size": lay.vocab_size, "prompt_len": lay.prompt_len, "seq_len": lay.seq_len,
               "key_patches": lay.key_patches, "train_prompts_with_key_patches": round(kp_share, 4),
               "train_mean_key_patches": round(float(data["train"].n_key_patches.mean()), 3),
               "key_patch_codes": p.key_patch_codes,
               "train_key_patch_image_code_differs": kp_stats["train"].get("image_code_differs"),
               "n_train": len(data["train"].codes), "n_validate": len(val.codes),
               "codebook_size": k_codes, "grid": list(grid), "weights_sha256": weights_sha256(out)}
    write_json(Path(paths.metrics) / "generator.json", metrics)
    print(f"generator: {n_params / 1e6:.2f} M parameters, {result.step} steps in {result.total_seconds:.0f} s, "
          f"validation loss {metrics['val_loss']} (perplexity {metrics['val_perplexity']} over {k_codes} codes), "
          f"{100 * kp_share:.0f}% of training prompts with key patches")

