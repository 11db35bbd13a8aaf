"""The sampler: image tokens from a trained generator, kept apart from file writing (as diffusers keeps schedulers
apart from pipelines).

Sampler (`sample_codes`): prompts are batched (all have the same length, see `cxrsynth.models.generator.Layout`),
the prompt is run once and every image token after it reuses the KV cache (one new token per step). At every step the
logits are restricted to the K image tokens, so exactly H x W valid codes come out: no retry loop, nothing to repair.
Temperature (0 = greedy), top-k, top-p and classifier-free guidance (`guidance_scale` s: logits = u + s (c - u), u
from the unconditional prompt that keeps only the view; 1 = off, no extra pass) apply to those K logits. With
`key_patch_placement: force` the prompt's key patches are also placements: at a key patch's cell the sampler emits
that patch's code instead of drawing one (the image's uniform for that cell goes unused), and every later token
conditions on it through the cache, as it would on a drawn one.

Randomness: one seeded `torch.Generator` per image draws that image's H*W uniforms up front, and each token is picked
by inverse-CDF sampling with its own uniform. Every prompt has the same padded length, and a row's computation does
not depend on the other rows of its batch, so an image regenerated alone equals the one made in a batch (tested bit
for bit on CPU). Seeds derive from (base seed, prompt id, prompt seed, sample) by `image_seed`, and the manifest
stores them, so any single image can be regenerated from its manifest row.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

from cxrsynth.config import SynthesizeParams, check_field
from cxrsynth.models.generator import Generator, position_ids
from cxrsynth.train import autocast_context


def _default(name: str):
    """The documented default of params `synthesize.<name>`: one source for the sampler's settings."""
    return next(f.default for f in fields(SynthesizeParams) if f.name == name)


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: params `synthesize` (`from_params`); each default is that section's default."""

    temperature: float = _default("temperature")        # 0 = greedy
    top_k: int = _default("top_k")                      # 0 = off
    top_p: float = _default("top_p")                    # 1 = off
    guidance_scale: float = _default("guidance_scale")  # 1 = no classifier-free guidance
    key_patch_placement: str = _default("key_patch_placement")  # prompt | force (codes written at their cells)
    batch_size: int = _default("batch_size")
    dtype: str = _default("dtype")                      # auto (bf16 autocast on CUDA) | float32 | bfloat16

    @classmethod
    def from_params(cls, p: SynthesizeParams) -> Sampling:
        return cls(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, guidance_scale=p.guidance_scale,
                   key_patch_placement=p.key_patch_placement, batch_size=p.batch_size, dtype=p.dtype)

    def __post_init__(self) -> None:
        """Each setting by the rules of its params key (type, bounds, finiteness): one table for params.yaml, the
        command line and code; a bad one raises ConfigError (a ValueError) naming it."""
        for f in fields(self):
            check_field(SynthesizeParams, f.name, getattr(self, f.name), key=f"synthesize.{f.name}")


def image_seed(base_seed: int, prompt_id: str, prompt_seed: int, sample: int) -> int:
    """The seed of one image: a 63-bit hash of (base seed, prompt id, prompt seed, sample)."""
    key = json.dumps([int(base_seed), str(prompt_id), int(prompt_seed), int(sample)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities (float64) after temperature, top-k and top-p; filtered entries are exactly 0."""
    x = logits.double() / max(temperature, 1e-8)
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    p = torch.softmax(x, -1)
    if top_p < 1.0:
        sp, si = torch.sort(p, dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p              # keep the smallest prefix reaching top_p (>= 1 entry)
        p = p.scatter(-1, si, sp.masked_fill(drop, 0.0))
        p = p / p.sum(-1, keepdim=True)
    return p


def pick(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one index per row with the row's uniform u in [0, 1); zero-probability entries are never
    picked."""
    cdf = probs.cumsum(-1)
    x = (u.double() * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV cache argument `cache` (older models and remote code: `past_key_values`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(res):
    cache = getattr(res, "cache", None)
    return cache if cache is not None else res.past_key_values


@torch.no_grad()
def sample_codes(gen: Generator, prompts: Sequence[tuple[list[int], list[int]]], seeds: Sequence[int],
                 sampling: Sampling, views: Sequence[str] | None = None, progress: bool = False,
                 desc: str = "sample") -> np.ndarray:
    """Image token grids (int64 N x H x W, every code in [0, K)) for prompts given as (ids, mask) from
    `gen.encode_prompt`; `views` are needed for guidance (the unconditional prompt keeps the view)."""
    lay = gen.layout
    n, hw, k = len(prompts), lay.n_image_tokens, lay.codebook_size
    if len(seeds) != n:
        raise ValueError(f"{n} prompts but {len(seeds)} seeds")
    cfg = sampling.guidance_scale != 1.0
    if cfg and views is None:
        raise ValueError("guidance needs the prompts' views")
    device = gen.device
    gen.model.eval()
    cache_kw = _cache_kwarg(gen.model)
    out = np.zeros((n, hw), np.int64)
    bar = tqdm(total=n * hw, desc=desc, disable=not progress, unit="tok", unit_scale=True, mininterval=1.0)
    for start in range(0, n, sampling.batch_size):
        sl = range(start, min(n, start + sampling.batch_size))
        b = len(sl)
        ids = torch.tensor([prompts[i][0] for i in sl], dtype=torch.long)
        mask = torch.tensor([prompts[i][1] for i in sl], dtype=torch.long)
        if cfg:
            unc = [gen.unconditional_prompt(views[i]) for i in sl]
            ids = torch.cat([ids, torch.tensor([u[0] for u in unc])])
            mask = torch.cat([mask, torch.tensor([u[1] for u in unc])])
        uniforms = torch.stack([torch.rand(hw, generator=torch.Generator().manual_seed(int(seeds[i])),
                                           dtype=torch.float64) for i in sl])
        ids, mask = ids.to(device), mask.to(device)
        pos = position_ids(mask)
        codes = torch.zeros(b, hw, dtype=torch.long)
        forced = torch.full((b, hw), -1, dtype=torch.long)  # a key patch's code at its cell, -1 = draw
        if sampling.key_patch_placement == "force":
            for r, i in enumerate(sl):
                for cell, c in lay.key_patch_cells(prompts[i][0]):
                    forced[r, cell] = c
        with autocast_context(device, sampling.dtype):  # auto: bf16 only where the GPU has it
            res = gen.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
            past, last = _cache_of(res), pos[:, -1:]
            for t in range(hw):
                logits = res.logits[:, -1, lay.img_offset:lay.img_offset + k].float().cpu()
                if cfg:
                    c, u = logits[:b], logits[b:]
                    logits = u + sampling.guidance_scale * (c - u)
                if sampling.temperature == 0:
                    code = logits.argmax(-1)
                else:
                    code = pick(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p),
                                uniforms[:, t])
                code = torch.where(forced[:, t] >= 0, forced[:, t], code)
                codes[:, t] = code
                bar.update(b)
                if t == hw - 1:
                    break
                nxt = (code + lay.img_offset).to(device)[:, None]
                if cfg:
                    nxt = torch.cat([nxt, nxt])
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                last = last + 1
                res = gen.model(input_ids=nxt, attention_mask=mask, position_ids=last, use_cache=True,
                                **{cache_kw: past})
                past = _cache_of(res)
        out[start:start + b] = codes.numpy()
    bar.close()
    return out.reshape(n, *lay.grid)
