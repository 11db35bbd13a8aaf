"""Synthesis speed: a naive sampler (as the public LLM-based code does) against ours, on the same prompts.

    python bench/synthesize.py                      # CPU: naive vs ours at batch 32, ratio and peak memory
    python bench/synthesize.py --sweep              # also images/s at batch 1..256 in fp32 and bf16 (GPU: default)

naive: one image at a time, no KV cache (the whole sequence is run again for every new token), sampling over the
whole vocabulary, and an image that gets a non-image token before its H*W codes are complete is thrown away and
started again (retries counted). ours: `cxrsynth.pipeline.sample_codes` (batched, KV cache, logits restricted to
image tokens: no retries). Each mode runs in its own child process so its peak memory (max RSS on CPU; max allocated
on CUDA) is its own. Uses the trained models in `--models` (default models/) and the first prompts of
data/prompts/prompts.parquet; prints one JSON line per measurement and a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(args):
    import pandas as pd
    import torch

    from cxrsynth.models.generator import Generator
    from cxrsynth.pipeline import prompts_from_parquet

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    gen = Generator.load(Path(args.models) / "generator", device=device)   # the sampler needs no VQ-GAN
    records = prompts_from_parquet(pd.read_parquet(args.prompts))
    encoded = [gen.encode_prompt(p.text, gen.key_patches(p.terms), p.view) for p in records]
    return gen, encoded, device


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@__import__("torch").no_grad()
def naive(gen, encoded, n: int, temperature: float = 1.0, max_retries: int = 20) -> dict:
    """Batch 1, no cache, unconstrained sampling over the whole vocabulary, restart on an invalid token."""
    import torch

    lay = gen.layout
    retries = failures = 0
    t0 = time.perf_counter()
    for i in range(n):
        ids0, mask0 = encoded[i % len(encoded)]
        real = [t for t, m in zip(ids0, mask0) if m]           # no padding: one prompt at a time
        g = torch.Generator().manual_seed(i)
        for attempt in range(max_retries + 1):
            seq = list(real)
            ok = True
            for _ in range(lay.n_image_tokens):
                x = torch.tensor([seq], device=gen.device)
                logits = gen.model(input_ids=x, use_cache=False).logits[0, -1].float().cpu()
                tok = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g))
                if not lay.img_offset <= tok < lay.img_offset + lay.codebook_size:
                    ok = False
                    break
                seq.append(tok)
            if ok:
                break
            retries += 1
        else:
            failures += 1
    seconds = time.perf_counter() - t0
    return {"mode": "naive", "images": n, "seconds": seconds, "images_per_second": n / seconds,
            "retries": retries, "failures": failures}


def ours(gen, encoded, n: int, batch: int, dtype: str = "float32") -> dict:
    import torch

    from cxrsynth.models.token_sampler import Sampling, sample_codes

    prompts = [encoded[i % len(encoded)] for i in range(n)]
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    codes = sample_codes(gen, prompts, list(range(n)), Sampling(batch_size=batch, dtype=dtype))
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    assert codes.shape == (n, *gen.layout.grid)
    return {"mode": "ours", "batch": batch, "dtype": dtype, "images": n, "seconds": seconds,
            "images_per_second": n / seconds}


SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def child(args) -> None:
    gen, encoded, device = _setup(args)
    if args.mode == "naive":
        res = naive(gen, encoded, args.n_naive)
    elif args.mode == "sweep":  # every batch size in one process; peak memory per size (exact on CUDA only)
        import torch

        ours(gen, encoded, 4, 4, args.dtype)                                            # warm-up
        res = {"mode": "sweep", "dtype": args.dtype, "rows": []}
        for b in SWEEP:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = ours(gen, encoded, b, b, args.dtype)
            r["peak_memory_mb"] = round(_peak_mb(device), 1)
            res["rows"].append(r)
    else:
        ours(gen, encoded, min(args.batch, 4), min(args.batch, 4), args.dtype)       # warm-up
        if device.type == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
        res = ours(gen, encoded, max(args.n_ours, args.batch), args.batch, args.dtype)
    res.update({"device": device.type, "peak_memory_mb": round(_peak_mb(device), 1)})
    print("RESULT " + json.dumps(res), flush=True)


def run_child(args, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", "--models", args.models, "--prompts", args.prompts,
           "--threads", str(args.threads), "--device", args.device]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"bench child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    res = json.loads(line[len("RESULT "):])
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models")
    ap.add_argument("--prompts", default="data/prompts/prompts.parquet")
    ap.add_argument("--n-naive", type=int, default=4, help="images the naive sampler draws")
    ap.add_argument("--n-ours", type=int, default=64, help="images our sampler draws")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = default)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu"))
    ap.add_argument("--sweep", action="store_true", help="batch 1..256 in fp32 and bf16 (default on a GPU)")
    ap.add_argument("--sweep-only", action="store_true", help="only the batch-size sweep")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    import torch

    gpu = torch.cuda.is_available() and args.device != "cpu"
    if not args.sweep_only:
        nv = run_child(args, mode="naive", n_naive=args.n_naive)
        us = run_child(args, mode="ours", n_ours=args.n_ours, batch=args.batch)
        print(f"\n{'GPU' if gpu else 'CPU'}: naive {nv['images_per_second']:.3f} images/s ({nv['retries']} retries, "
              f"peak {nv['peak_memory_mb']:.0f} MB) vs ours at batch {args.batch} {us['images_per_second']:.2f} "
              f"images/s (peak {us['peak_memory_mb']:.0f} MB): {us['images_per_second'] / nv['images_per_second']:.1f}x")
    if args.sweep or args.sweep_only or gpu:
        sweeps = {d: run_child(args, mode="sweep", dtype=d)["rows"] for d in ("float32", "bfloat16")}
        print("\nbatch   fp32 img/s (peak MB)   bf16 img/s (peak MB)")
        for i, b in enumerate(SWEEP):
            a, c = sweeps["float32"][i], sweeps["bfloat16"][i]
            print(f"{b:5d}  {a['images_per_second']:10.2f} ({a['peak_memory_mb']:6.0f})  "
                  f"{c['images_per_second']:10.2f} ({c['peak_memory_mb']:6.0f})")

if __name__ == "__main__":
    main()
