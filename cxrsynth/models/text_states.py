"""A frozen text encoder's token states, encoded once and kept on disk (the align stage's text-side cache).

With a frozen BERT the alignment heads train on its token states, which depend on the text alone. At MIMIC-CXR scale
(227k reports x ~100 tokens x 384 floats) they are tens of GB, so they never sit in RAM as one N x L x D tensor:

- `encode_text_states` encodes every distinct text once, in batches of texts with exactly the same token count (no
  padding at all: each text's states equal those of encoding it on its own up to the rounding of a larger matmul,
  and were bit for bit on this 2-core CPU for all of the default phantom's reports; the align stage batches 64) and
  writes them into a ragged store: `states.npy` (all tokens of all distinct texts, T_total x D, float32 or float16),
  `offsets.npy` (int64, distinct texts + 1) and `rows.npy` (int32: input row -> distinct text), plus
  `store.json` (what was encoded: a fingerprint of the encoder, the tokenizer settings and the texts). A folder
  whose fingerprint matches is reused, so a resumed run does not encode again.
- `TextStates.batch(rows, t)` reads the states of a batch (zero-padded to `t` tokens, float32): RAM is one batch.

Bytes: on disk D x itemsize per token (MiniLM float32: 1.5 kB per token; float16 half of it); in RAM 12 bytes per
input row (row map, offsets) plus the batch.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cxrsynth.data.arrays import NpyRows

STORE_FILE = "store.json"
DTYPES = ("float32", "float16")


def texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def encoder_sha256(encoder: torch.nn.Module) -> str:
    """SHA-256 over the encoder's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TextStates:
    """Read side of a store written by `encode_text_states`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / STORE_FILE).read_text(encoding="utf-8"))
        self.states = NpyRows(self.folder / "states.npy")
        self.offsets = np.load(self.folder / "offsets.npy", allow_pickle=False)
        self.rows = np.load(self.folder / "rows.npy", allow_pickle=False)
        self.hidden = int(self.states.shape[1])
        if int(self.offsets[-1]) != len(self.states):
            raise ValueError(f"{self.folder}: offsets end at {int(self.offsets[-1])}, states hold {len(self.states)}")

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self, rows: np.ndarray | None = None) -> np.ndarray:
        u = self.rows if rows is None else self.rows[np.asarray(rows)]
        return (self.offsets[u + 1] - self.offsets[u]).astype(np.int64)

    def batch(self, rows: Sequence[int] | np.ndarray, t: int | None = None) -> torch.Tensor:
        """float32 B x t x D: the states of input rows `rows`, zero beyond each text's length (t: default the
        batch's longest)."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths(rows)
        t = int(lens.max()) if t is None else int(t)
        out = np.zeros((len(rows), t, self.hidden), np.float32)
        for b, r in enumerate(rows):
            u = int(self.rows[r])
            a, n = int(self.offsets[u]), min(int(lens[b]), t)
            out[b, :n] = self.states[a:a + n]
        return torch.from_numpy(out)


def _fingerprint(encoder, tokenizer, max_length: int, texts: Sequence[str], dtype: str) -> dict:
    return {"format": "cxrsynth-text-states", "version": 1, "encoder_sha256": encoder_sha256(encoder),
            "tokenizer": type(tokenizer).__name__, "vocab_size": int(len(tokenizer)), "max_length": int(max_length),
            "texts_sha256": texts_sha256(texts), "n_rows": len(texts), "dtype": dtype}


@torch.no_grad()
def encode_text_states(encoder: torch.nn.Module, tokenizer, texts: Sequence[str], folder: str | Path, *,
                       max_length: int, device: torch.device | str = "cpu", batch_size: int = 64,
                       dtype: str = "float32", progress: bool = False) -> TextStates:
    """Encode every distinct text of `texts` once (length-bucketed batches, no padding) into `folder`; reuse the
    folder when it already holds exactly this encoding. Returns the store."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise ValueError(f"text states dtype must be one of {DTYPES}, got {dtype!r}")
    folder = Path(folder)
    texts = [str(t) for t in texts]
    want = _fingerprint(encoder, tokenizer, max_length, texts, dtype)
    if (folder / STORE_FILE).is_file():
        try:
            have = json.loads((folder / STORE_FILE).read_text(encoding="utf-8"))
            if {k: have.get(k) for k in want} == want:
                return TextStates(folder)
        except (ValueError, OSError):
            pass
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STORE_FILE).unlink(missing_ok=True)   # written last: marks a complete store
    first: dict[str, int] = {}
    rows = np.empty(len(texts), np.int32)
    for i, t in enumerate(texts):
        rows[i] = first.setdefault(t, len(first))
    unique = list(first)
    lengths = np.zeros(len(unique), np.int64)
    for s in range(0, len(unique), 1024):  # token counts, a chunk of texts at a time
        enc = tokenizer(unique[s:s + 1024], truncation=True, max_length=max_length)
        lengths[s:s + len(enc["input_ids"])] = [len(x) for x in enc["input_ids"]]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hidden = int(encoder.config.hidden_size)
    np_dtype = np.dtype(dtype)
    path = folder / "states.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(int(offsets[-1]), hidden)).flush()
    start = NpyRows(path).offset
    row_bytes = hidden * np_dtype.itemsize
    encoder.eval()
    by_length: dict[int, list[int]] = {}
    for u, n in enumerate(lengths):
        by_length.setdefault(int(n), []).append(u)
    jobs = [(n, group[s:s + batch_size]) for n, group in sorted(by_length.items())
            for s in range(0, len(group), batch_size)]
    fd = os.open(path, os.O_WRONLY)
    try:
        for n, us in tqdm(jobs, desc="align text states", unit="batch", disable=not progress, leave=False):
            enc = tokenizer([unique[u] for u in us], truncation=True, max_length=max_length, return_tensors="pt")
            if enc["input_ids"].shape[1] != n:
                raise AssertionError(f"bucket of length {n} tokenised to {enc['input_ids'].shape[1]}")
            h = encoder(input_ids=enc["input_ids"].to(device),
                        attention_mask=enc["attention_mask"].to(device)).last_hidden_state
            h = h.float().cpu().numpy().astype(np_dtype, copy=False)
            for j, u in enumerate(us):
                os.pwrite(fd, np.ascontiguousarray(h[j]).tobytes(), start + int(offsets[u]) * row_bytes)
    finally:
        os.close(fd)
    np.save(folder / "offsets.npy", offsets, allow_pickle=False)
    np.save(folder / "rows.npy", rows, allow_pickle=False)
    (folder / STORE_FILE).write_text(json.dumps(want, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return TextStates(folder)
