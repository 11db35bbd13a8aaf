"""Benchmark the VQ-GAN: training images/s (reconstruction phase and GAN phase), encode and decode images/s.

    python -m bench.codebook                 # params.yaml's codebook section: CPU (+ CUDA fp32 and bf16 if present)
    python -m bench.codebook quantizer=vq2 batch_size=16 bench_steps=10   # overrides; bench_steps = timed steps

Uses the ingested training images when `<interim>/images_train.npy` exists, random images otherwise. Each training
number is the median of timed optimizer steps (after warm-up steps) of the same module, loss, optimizer and autocast
context the codebook stage trains with; encode / decode run in eval mode without gradients, 64 images per call.
Writes nothing; prints a table (and one JSON line with the same numbers).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from cxrsynth.config import CodebookParams, build_section, stage_params
from cxrsynth.models.vqgan import VQGAN, VQGANTrainer, config_from_params, to_model_input
from cxrsynth.train import TrainConfig, autocast_context, make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(p: CodebookParams, x: torch.Tensor, device: torch.device, dtype: str, gan: bool,
                  steps: int, warmup: int) -> float:
    """Training images per second (median step time) with the GAN phase on or off."""
    torch.manual_seed(0)
    trainer = VQGANTrainer(VQGAN(config_from_params(p)), disc_layers=p.disc_layers, disc_channels=p.disc_channels,
                           disc_start=0 if gan else 10**12, disc_weight=p.disc_weight).to(device).train()
    opt = make_optimizer(trainer, TrainConfig(max_steps=1, lr=p.lr, betas=(0.5, 0.9)))
    ctx = autocast_context(device, dtype)
    times = []
    for i in range(warmup + steps):
        batch = x[torch.randint(0, len(x), (p.batch_size,), generator=torch.Generator().manual_seed(i))].to(device)
        _sync(device)
        t0 = time.perf_counter()
        with ctx:
            loss, _ = trainer(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return p.batch_size / float(np.median(times))


@torch.no_grad()
def time_inference(p: CodebookParams, x: torch.Tensor, device: torch.device, dtype: str,
                   reps: int) -> tuple[float, float]:
    """(encode images/s, decode images/s) in eval mode, 64 images per call."""
    torch.manual_seed(0)
    model = VQGAN(config_from_params(p)).to(device).eval()
    ctx = autocast_context(device, dtype)
    batch = x[:64].to(device)
    if len(batch) < 64:
        batch = batch.repeat(-(-64 // len(batch)), 1, 1, 1)[:64]
    with ctx:
        idx = model.encode(batch).indices  # warm-up (and the EMA codebook stays as initialised: eval mode)
        model.decode_code(idx)
    out = []
    for fn in (lambda: model.encode(batch).indices, lambda: model.decode_code(idx)):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            with ctx:
                fn()
        _sync(device)
        out.append(64 * reps / (time.perf_counter() - t0))
    return out[0], out[1]


def main(argv: list[str]) -> None:
    params = stage_params()
    over = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in argv)}
    bench_steps = int(over.pop("bench_steps", 6))
    raw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params.codebook).items()}
    if "preset" in over:  # a new preset fills the fields that params.yaml leaves null
        raw = {k: v for k, v in raw.items() if k not in CodebookParams.PRESETS[over["preset"]]}
    p = build_section(CodebookParams, "codebook", {**raw, **over})
    src = Path(params.paths.interim) / "images_train.npy"
    images = np.load(src) if src.is_file() else \
        np.random.default_rng(0).integers(0, 256, (128, p.image_size, p.image_size), dtype=np.uint8)
    x = to_model_input(images[:256], p.image_size)
    runs = [("cpu", "float32")]
    if torch.cuda.is_available():
        runs += [("cuda", "float32"), ("cuda", "bfloat16")]
    rows = []
    for dev_name, dtype in runs:
        device = torch.device(dev_name)
        reps = 3 if dev_name == "cpu" else 50
        warm = 2 if dev_name == "cpu" else 5
        steps = bench_steps if dev_name == "cpu" else max(20, bench_steps)
        rec = time_training(p, x, device, dtype, gan=False, steps=steps, warmup=warm)
        gan = time_training(p, x, device, dtype, gan=True, steps=steps, warmup=warm)
        enc, dec = time_inference(p, x, device, dtype, reps)
        rows.append({"device": dev_name, "dtype": dtype, "threads": torch.get_num_threads(),
                     "train_img_s": round(rec, 1), "train_gan_img_s": round(gan, 1), "encode_img_s": round(enc, 1),
                     "decode_img_s": round(dec, 1)})
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"
    print(f"VQ-GAN {p.quantizer}, {p.image_size}px -> {p.grid_size}x{p.grid_size} tokens, {p.codebook_size} codes, "
          f"batch {p.batch_size}, {sum(t.numel() for t in VQGAN(config_from_params(p)).parameters()):,} parameters "
          f"({name})")
    cols = ["device", "dtype", "threads", "train_img_s", "train_gan_img_s", "encode_img_s", "decode_img_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    print(json.dumps({"overrides": over, "preset": p.preset, "quantizer": p.quantizer, "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
