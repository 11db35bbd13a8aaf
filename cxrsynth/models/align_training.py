"""Training the aligner: report/grid pairs, the frozen text encoder's states cached once on disk, the loop (`fit`) and
its validation metric (text <-> image retrieval Recall@k against chance)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrsynth.models.align import AlignConfig, AlignModel
from cxrsynth.models.text_encoders import load_text_encoder, minilm_path, scratch_text_encoder
from cxrsynth.models.text_states import TextStates, encode_text_states


def _chance_at_k(n: int, relevant: int, k: int) -> float:
    """Probability that a random ranking of n items has one of `relevant` items in its top k."""
    if relevant <= 0:
        return 0.0
    k = min(k, n)
    return 1.0 - math.comb(n - relevant, k) / math.comb(n, k)


def retrieval_metrics(sim: np.ndarray, groups: Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways for a text x image similarity matrix; a hit is any item of the query's own group (e.g.
    the images of the same study share its report), with chance computed the same way."""
    groups = np.asarray(groups)
    n = len(groups)
    out: dict[str, float] = {"n": n}
    same = groups[:, None] == groups[None, :]
    for name, s in (("text_to_image", sim), ("image_to_text", sim.T)):
        order = np.argsort(-s, axis=1, kind="stable")
        for k in ks:
            hit = np.take_along_axis(same, order[:, :k], axis=1).any(axis=1)
            out[f"{name}/R@{k}"] = round(float(hit.mean()), 4)
            out[f"{name}/chance@{k}"] = round(float(np.mean([_chance_at_k(n, int(r), k) for r in same.sum(1)])), 4)
    return out


@dataclass(frozen=True)
class Pairs:
    """Report texts and their images' token grids (uint16 N x H x W), with a group id per row (the study: images
    of one study share its report)."""

    texts: list[str]
    grids: np.ndarray
    groups: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.grids) == len(self.groups):
            raise ValueError(f"{len(self.texts)} texts, {len(self.grids)} grids, {len(self.groups)} groups")

    def head(self, n_max: int) -> Pairs:
        """The first `n_max` pairs (all when n_max is 0 or at least their number): a fixed subset, the same at every
        evaluation and in every run."""
        if n_max <= 0 or n_max >= len(self.texts):
            return self
        return Pairs(list(self.texts[:n_max]), self.grids[:n_max], np.asarray(self.groups)[:n_max])


def background_codes(grids: np.ndarray, share: float = 0.02, inner_rate: float = 0.005) -> tuple[int, ...]:
    """Codes of empty film: those found in the four corner cells of at least `share` of the images, and in at most
    `inner_rate` of the cells of the grid's central half (where the chest is). A small codebook may spend one code on
    the letterbox and on dark lung alike (the phantom's no-revival codebook does: the corner codes fill 1-4% of the
    central cells, and a pneumothorax's lucent apex is made of them); masking such a code would hide lung."""
    g = np.asarray(grids)
    if not len(g):
        return ()
    h, w = g.shape[1:]
    corners = np.stack([g[:, 0, 0], g[:, 0, -1], g[:, -1, 0], g[:, -1, -1]], 1)
    seen: dict[int, int] = {}
    for row in corners:
        for c in set(int(x) for x in row):
            seen[c] = seen.get(c, 0) + 1
    inner = g[:, h // 4:h - h // 4, w // 4:w - w // 4].astype(np.int64).ravel()
    rate = np.bincount(inner, minlength=max(seen, default=0) + 1) / max(len(inner), 1)
    return tuple(sorted(c for c, n in seen.items() if n >= share * len(g) and rate[c] <= inner_rate))


def build_model(p, texts: Sequence[str], codebook: torch.Tensor, grid: tuple[int, int], workdir: str | Path,
                text_model_path: str | Path | None = None, background: Sequence[int] = ()) -> AlignModel:
    """An untrained AlignModel for AlignParams `p` (seed torch first). `texts` (training reports) make the scratch
    vocabulary; `text_model_path` overrides the folder of a pretrained encoder (tests)."""
    if p.text_encoder == "scratch":
        encoder, tokenizer = scratch_text_encoder(texts, vocab_size=p.scratch_vocab_size, hidden=p.scratch_hidden,
                                                  layers=p.scratch_layers, heads=p.scratch_heads,
                                                  max_length=p.max_length, workdir=workdir)
        source, frozen = "scratch", False
    else:
        path = Path(text_model_path or (minilm_path() if p.text_encoder == "minilm" else p.text_model_path))
        encoder, tokenizer = load_text_encoder(path)
        source = "minilm" if p.text_encoder == "minilm" else f"pretrained:{path.as_posix()}"
        frozen = p.freeze_text
    hidden = int(encoder.config.hidden_size)
    heads = p.text_head_heads if hidden % p.text_head_heads == 0 else 1
    cfg = AlignConfig(grid=grid, codebook_size=int(codebook.shape[0]), code_dim=int(codebook.shape[1]),
                      text_hidden=hidden, embed_dim=p.embed_dim, patch_dim=p.patch_dim, patch_layers=p.patch_layers,
                      patch_heads=p.patch_heads, patch_window=p.patch_window, text_head_layers=p.text_head_layers,
                      text_head_heads=heads, max_length=p.max_length, temperature=p.temperature,
                      global_weight=p.global_weight, background_codes=tuple(background),
                      background_border=1 if background else 0, text_source=source,
                      text_frozen=frozen)
    return AlignModel(cfg, encoder, tokenizer, codebook)


@dataclass
class TextCache:
    """What training reads of the texts per batch: token counts (int64 N), word masks (bool N x T, T = the longest
    text, capped at max_length), token ids (int32 N x T; trainable encoders only) and, for a frozen encoder, its
    token states on disk (`TextStates`). O(N) in RAM: T + 8 bytes per text (ids: 4 T more)."""

    lengths: np.ndarray
    word_mask: torch.Tensor
    input_ids: torch.Tensor | None = None
    states: TextStates | None = None

    def batch(self, rows: np.ndarray) -> dict:
        """The text part of a training batch (padding every text of the batch shares trimmed): int64 attention
        mask, bool word mask, and the cached states (frozen) or the int64 token ids."""
        lens = torch.from_numpy(self.lengths[rows])
        t = int(lens.max())
        idx = torch.from_numpy(rows)
        out = {"attention_mask": (torch.arange(t)[None, :] < lens[:, None]).long(),
               "word_mask": self.word_mask[idx, :t]}
        if self.states is not None:
            out["hidden"] = self.states.batch(rows, t)
        else:
            out["input_ids"] = self.input_ids[idx, :t].long()
        return out


@torch.no_grad()
def cache_hidden(model: AlignModel, texts: Sequence[str], workdir: str | Path | None = None, *,
                 chunk: int = 1024, dtype: str = "float32", progress: bool = False) -> TextCache:
    """Tokenise every text (a chunk at a time) and, for a frozen text encoder, encode each distinct text once into
    an on-disk store under `workdir` (`cxrsynth.models.text_states`; a temporary folder when None is not
    allowed: the caller owns the disk)."""
    texts = list(texts)
    lengths = np.zeros(len(texts), np.int64)
    masks, ids = [], []
    for s in range(0, len(texts), chunk):
        tb = model.tokenize(texts[s:s + chunk])
        lengths[s:s + len(tb.input_ids)] = tb.attention_mask.sum(1).numpy()
        masks.append(tb.word_mask)
        if not model.config.text_frozen:
            ids.append(tb.input_ids.to(torch.int32))
    t = max((m.shape[1] for m in masks), default=0)

    def pad(parts: list[torch.Tensor], dtype) -> torch.Tensor:
        out = torch.zeros(len(texts), t, dtype=dtype)
        at = 0
        for x in parts:
            out[at:at + len(x), :x.shape[1]] = x
            at += len(x)
        return out

    cache = TextCache(lengths, pad(masks, torch.bool), pad(ids, torch.int32) if ids else None)
    if model.config.text_frozen:
        if workdir is None:
            raise ValueError("a frozen text encoder's states need a workdir for their on-disk store")
        model.text_encoder.eval()
        # batches of texts with exactly the same token count (no padding): on this 2-core CPU with 2 torch threads
        # every state of the default phantom's 489 distinct reports equals its one-text-per-call encoding bit for
        # bit (2.4x faster); a batch's contents are fixed by the texts, so the store is deterministic either way
        batch = 64
        cache.states = encode_text_states(model.text_encoder, model.tokenizer, texts, Path(workdir) / "text_states",
                                          max_length=model.config.max_length, device=model.device, dtype=dtype,
                                          batch_size=batch, progress=progress)
        if not np.array_equal(cache.states.lengths(), lengths):
            raise AssertionError("text state store and tokenizer disagree on token counts")
    return cache


def fit(p, train_pairs: Pairs, validate: Pairs, codebook: torch.Tensor, *, seed: int = 0, device: str = "auto",
        live_dir: str | Path | None = None, progress: bool = True, workdir: str | Path = ".",
        text_model_path: str | Path | None = None, out_dir: str | Path | None = None):
    """Train the alignment model on `train_pairs` with the project's loop; validation retrieval (mean R@5 both
    ways) selects the kept weights. A frozen text encoder's token states are computed once and cached. With
    `out_dir`, checkpoints every `p.checkpoint_every` steps go there and a killed run resumes from the last one.

    Returns (model in eval mode on the CPU, TrainResult)."""
    import hashlib
    import json

    from cxrsynth.train import EpochSampler, TrainConfig, seed_everything, train

    seed_everything(seed)
    grid = tuple(int(s) for s in train_pairs.grids.shape[1:])
    model = build_model(p, train_pairs.texts, codebook, grid, workdir, text_model_path,
                        background_codes(train_pairs.grids) if p.mask_background else ())
    cache = cache_hidden(model, train_pairs.texts, workdir, dtype=getattr(p, "text_states_dtype", "float32"),
                         progress=progress)
    grids = np.asarray(train_pairs.grids)  # uint16: 2 bytes per token; int64 per batch
    sampler = EpochSampler(len(grids), p.batch_size, seed)

    def batches(step: int) -> dict:
        rows = sampler(step)
        return {"grids": torch.from_numpy(grids[rows].astype(np.int64)), **cache.batch(rows)}

    def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return model.loss(net(**batch))

    held = validate.head(p.retrieval_max)

    def evaluate(net: AlignModel) -> dict:
        r = retrieval_metrics(net.similarity_matrix(held.texts, held.grids), held.groups, ks=(1, 5))
        return {"recall_at_5": 0.5 * (r["text_to_image/R@5"] + r["image_to_text/R@5"]),
                "recall_at_1": 0.5 * (r["text_to_image/R@1"] + r["image_to_text/R@1"])}

    h = hashlib.sha256(json.dumps(asdict(p), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(train_pairs.grids).tobytes())
    h.update("\n".join(train_pairs.texts).encode())
    cfg = TrainConfig(max_steps=p.steps, lr=p.lr, min_lr_ratio=p.min_lr_ratio, warmup_steps=min(p.warmup_steps,
                      p.steps), weight_decay=p.weight_decay, grad_clip=p.grad_clip, ema_decay=p.ema_decay,
                      device=device, dtype=p.dtype, compile=p.compile, seed=seed, log_every=max(1, p.eval_every // 4),
                      eval_every=p.eval_every, select_metric="recall_at_5" if len(validate.texts) else None,
                      checkpoint_every=p.checkpoint_every if out_dir else 0,
                      out_dir=str(out_dir) if out_dir else None, live_dir=str(live_dir) if live_dir else None,
                      run_id=h.hexdigest()[:16],
                      progress=progress, desc="align")
    result = train(model, loss_fn, batches, cfg, evaluate if len(validate.texts) else None)
    model.text_states = cache.states  # build_bank reads the training texts' states from the same store
    return model.cpu().eval(), result
