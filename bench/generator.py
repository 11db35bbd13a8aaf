"""How fast the generator trains on this CPU, against what the CPU can do: training tokens per second and achieved
FLOP/s of one optimizer step, beside a matmul peak measured in the same run.

    python -m bench.generator [steps] [threads]     # default 20 timed steps after 3 warm-up steps, 1 thread

The model is params.yaml's generator (`generator.*`: width, depth, heads, batch size) on the default layout (16 x 16
tokens, 512 codes, 5 key patches, 64 text tokens), fed random sequences: the speed of a step does not depend on
what the tokens are. FLOPs come from `torch.utils.flop_counter` on one forward + backward (what the step really
runs, attention included), not from a formula. Variants, each timed the same way:

- `stage`: the stage's loss (`image_loss`: the full-vocabulary head at the image positions only);
- `image head`: logits over the K image codes only (the slice of the head the sampler uses);
- `compile`: `torch.compile` of the stage's model (inductor on CPU);
- `threads N`: the stage's loss with N torch threads.

Prints a table and one JSON line. Writes nothing.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cxrsynth.config import stage_params
from cxrsynth.models.generator import ModelSpec, build_tokenizer, image_loss, new_generator, position_ids

TEXTS = ["FINDINGS: Moderate right pleural effusion. IMPRESSION: Right pleural effusion.",
         "FINDINGS: Severe cardiomegaly with mild pulmonary edema.", "No acute cardiopulmonary process."] * 20


def matmul_peak(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of an n x n float32 matmul with `threads` threads (the best of `repeats`)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def image_head_loss(model: nn.Module, batch: dict, layout) -> torch.Tensor:
    """Cross-entropy over the K image codes only: hidden states at the image positions times the head's image rows."""
    n = layout.n_image_tokens
    ids, mask = batch["ids"], batch["mask"]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    h = hidden[:, -(n + 1):-1]
    w = model.get_output_embeddings().weight[layout.img_offset:layout.img_offset + layout.codebook_size]
    logits = h @ w.T
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["codes"].reshape(-1))


def time_steps(model: nn.Module, loss_of, batch: dict, steps: int, warmup: int = 3) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_flops(model: nn.Module, loss_of, batch: dict) -> int:
    with FlopCounterMode(display=False) as fc:
        loss_of(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def main(argv: list[str]) -> int:
    steps = int(argv[0]) if argv else 20
    threads = int(argv[1]) if len(argv) > 1 else 1
    if steps < 1 or threads < 1:
        raise SystemExit("steps and threads: expected ints >= 1")
    p = stage_params().generator
    grid, k = (16, 16), 512
    spec = ModelSpec(arch=p.arch, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads, dropout=p.dropout)
    tok = build_tokenizer(TEXTS, p.text_vocab_size, grid, k)
    gen = new_generator(spec, tok, grid=grid, codebook_size=k, key_patches=p.key_patches,
                        max_text_tokens=p.max_text_tokens, bank=None, seed=0)
    lay = gen.layout
    g = torch.Generator().manual_seed(0)
    b = p.batch_size
    codes = torch.randint(0, k, (b, lay.n_image_tokens), generator=g)
    prompt = torch.randint(0, lay.img_offset, (b, lay.prompt_len), generator=g)
    batch = {"ids": torch.cat([prompt, codes + lay.img_offset], 1),
             "mask": torch.ones(b, lay.seq_len, dtype=torch.long), "codes": codes}
    image_tokens = b * lay.n_image_tokens
    seq_tokens = b * lay.seq_len

    def stage_loss(m, bt):
        return image_loss(m, bt, lay)

    def head_loss(m, bt):
        return image_head_loss(m, bt, lay)

    peak = {t: matmul_peak(t) for t in sorted({1, threads, 2})}
    torch.set_num_threads(threads)
    rows = []
    model = gen.model.train()
    flops = step_flops(model, stage_loss, batch)
    rows.append(("stage", threads, time_steps(model, stage_loss, batch, steps), flops))
    flops_head = step_flops(model, head_loss, batch)
    rows.append(("image head", threads, time_steps(model, head_loss, batch, steps), flops_head))
    try:
        compiled = torch.compile(model)
        rows.append(("compile", threads, time_steps(compiled, stage_loss, batch, steps), flops))
    except Exception as err:  # inductor needs a C++ compiler; say so instead of failing the bench
        print(f"compile: not available ({type(err).__name__}: {str(err).splitlines()[0][:100]})")
    for t in sorted({1, 2} - {threads}):
        torch.set_num_threads(t)
        rows.append((f"threads {t}", t, time_steps(model, stage_loss, batch, steps), flops))
    torch.set_num_threads(threads)
    base = rows[0][2]
    print(f"generator {p.d_model} x {p.n_layers} layers, batch {b}, sequence {lay.seq_len} ({lay.n_image_tokens} "
          f"image tokens), {sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters; matmul peak "
          + ", ".join(f"{v:.1f} GFLOP/s on {t} thread(s)" for t, v in peak.items()))
    print(f"{'variant':<12} {'threads':>7} {'s/step':>8} {'image tok/s':>11} {'seq tok/s':>9} {'GFLOP/step':>10} "
          f"{'GFLOP/s':>8} {'of peak':>7} {'speed-up':>8}")
    out = []
    for name, t, s, f in rows:
        gf = f / s / 1e9
        print(f"{name:<12} {t:7d} {s:8.3f} {image_tokens / s:11.0f} {seq_tokens / s:9.0f} {f / 1e9:10.2f} "
              f"{gf:8.1f} {gf / peak.get(t, peak[threads]):7.0%} {base / s:8.2f}")
        out.append({"variant": name, "threads": t, "seconds_per_step": round(s, 4),
                    "image_tokens_per_second": round(image_tokens / s), "gflop_per_step": round(f / 1e9, 3),
                    "gflops": round(gf, 2), "speedup": round(base / s, 3)})
    print(json.dumps({"matmul_peak_gflops": {str(t): round(v, 1) for t, v in peak.items()}, "rows": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
