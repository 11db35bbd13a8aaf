"""Worker for tests/test_distributed.py and tests/test_interrupt.py: a tiny regression model trained with the shared
loop, run alone (one process) or under torchrun (several processes, gloo on CPU).

    python tests/train_worker.py OUT.safetensors [--global-batch 16] [--ckpt DIR] [--sleep S] [--steps N]

Writes the final weights of rank 0 to OUT; with --ckpt, checkpoints every 5 steps into DIR (and resumes from it);
--dropout adds randomness
that a resumed run must replay (RNG states are checkpointed); --sleep slows each step down so a test can interrupt the run mid-way. Prints `resumed_from=<step>` at the end.
"""
import argparse
import time

import safetensors.torch
import torch

from cxrsynth.train import EpochSampler, TrainConfig, dist_info, seed_everything, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dropout", type=float, default=0.0)  # random per step: checks that resume restores RNGs
    args = ap.parse_args()
    info = dist_info()
    g = torch.Generator().manual_seed(123)
    x = torch.randn(96, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(96, 1, generator=g)
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(args.dropout), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    sampler = EpochSampler(len(x), args.global_batch // info.world_size, seed=0, rank=info.rank,
                           world_size=info.world_size)

    def batches(step):
        idx = torch.as_tensor(sampler(step))
        return x[idx], y[idx]

    def loss_fn(m, batch):
        time.sleep(args.sleep)
        xb, yb = batch
        return torch.nn.functional.mse_loss(m(xb), yb), {}

    cfg = TrainConfig(max_steps=args.steps, lr=0.05, warmup_steps=3, grad_clip=1.0, device="cpu", progress=False,
                      out_dir=args.ckpt, checkpoint_every=5 if args.ckpt else 0)
    result = train(model, loss_fn, batches, cfg)
    if info.is_main:
        safetensors.torch.save_model(model, args.out)
        print(f"resumed_from={result.resumed_from}", flush=True)
    if info.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
