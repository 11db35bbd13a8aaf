"""Generator: a `transformers` causal LM that reads a prompt and its key patches and writes an image's codebook tokens.

Lineage (method.md section 2): a Dolly-v2 LLM (GPT-NeoX) with the image codes added to its vocabulary; prompt =
instruction + report + key-patch tokens + view, response = exactly H x W image tokens. Here:

- offline default: a GPT-NeoX (or GPT-2) config trained from scratch (`arch`), with a word-piece BPE tokenizer trained
  on the training reports (`build_tokenizer`) plus the special tokens below;
- with `pretrained_path` (a local folder holding a causal LM and its tokenizer, e.g. on a GPU box): that model, its
  tokenizer extended with the same special tokens and `resize_token_embeddings`, as the lineage code does.

Sequence layout (`Layout`; every prompt has the same length P, left-padded with `<pad>` and masked out, so a prompt's
computation does not depend on what it is batched with):

    <pad>... text tokens (<= max_text_tokens) [<kp> (<pos_i> <img_c>) x <= k </kp>] <view_X> <img> | H*W x <img_c>

`<pos_i>` is the raster index i = row * W + col of a key patch, `<img_c>` codebook entry c. With k = 0 (the ablation
switch `generator.key_patches`) the `<kp>` block is absent altogether. An *unconditional* prompt (prompt dropout in
training, the negative branch of classifier-free guidance) is the same layout with no text and no key patches: only
the view remains. The loss is on the H*W image tokens only (full-vocabulary cross-entropy, as an LM is trained; the
sampler restricts logits to image tokens). `</img>` closes an image in the vocabulary but is never needed: exactly
H*W tokens are sampled.

Key patches come from a `cxrsynth.keypatches.KeyPatchBank`: training uses `bank.select(terms_of_text(report), k)`
of each training image's own report, synthesis the prompt's terms, so both pick them the same way. The bank used in
training is copied into the model folder, and synthesis reads it from there (they cannot disagree).

Folder (`Generator.save` / `Generator.load`): `config.json` + `model.safetensors` (save_pretrained),
`generation_config.json`, the tokenizer files, `bank.json` (the key-patch bank) and `generator.json` (format, the
layout, the VQ-GAN/tokens/bank hashes the model was trained with, the training record). Nothing is unpickled.

Reads/writes only what the caller passes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrsynth.errors import UserError
from cxrsynth.io import file_sha256, read_json_object
from cxrsynth.keypatches import BANK_FILE, KeyPatch, KeyPatchBank
from cxrsynth.models.folder import record_weights
from cxrsynth.train import EpochSampler, TrainConfig, TrainResult, dist_info, seed_everything, train

FORMAT = "cxrsynth-generator"
FORMAT_VERSION = 1
META_FILE = "generator.json"
ARCHS = ("gpt_neox", "gpt2")
VIEWS = ("PA", "AP", "LATERAL", "LL")
PAD, UNK, KP, KP_END, IMG, IMG_END = "<pad>", "<unk>", "<kp>", "</kp>", "<img>", "</img>"
VIEW_OTHER = "<view_other>"


class GeneratorError(UserError):
    """A generator folder or setting that cannot be used; the message names the file or key."""


def view_token(view: str | None) -> str:
    v = (view or "").strip().upper()
    return f"<view_{v}>" if v in VIEWS else VIEW_OTHER


def special_tokens(grid: tuple[int, int], codebook_size: int) -> list[str]:
    """Every token the layout adds to a text vocabulary, in id order (positions then codes are contiguous)."""
    return ([PAD, KP, KP_END, IMG, IMG_END] + [view_token(v) for v in VIEWS] + [VIEW_OTHER]
            + [f"<pos_{i}>" for i in range(grid[0] * grid[1])] + [f"<img_{c}>" for c in range(codebook_size)])


def clean_text(text: str | None) -> str:
    """The one text normalisation of training and synthesis: whitespace collapsed, lower case."""
    return " ".join(str(text or "").split()).lower()


# ----------------------------------------------------------------------------------------------------------------
# layout

@dataclass(frozen=True)
class Layout:
    """Where everything sits in a sequence, and the token ids of the special tokens (stored in generator.json)."""

    grid: tuple[int, int]
    codebook_size: int
    key_patches: int                 # k: key patches per prompt (0 = no key-patch block at all)
    max_text_tokens: int
    pad_id: int
    kp_id: int
    kp_end_id: int
    img_id: int
    img_end_id: int
    pos_offset: int                  # id of <pos_0>; <pos_i> = pos_offset + i
    img_offset: int                  # id of <img_0>; <img_c> = img_offset + c
    view_ids: dict = field(default_factory=dict)   # view token -> id
    vocab_size: int = 0

    @property
    def n_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kp_len(self) -> int:
        return 2 + 2 * self.key_patches if self.key_patches > 0 else 0

    @property
    def prompt_len(self) -> int:
        """P: text + key-patch block + view + <img>."""
        return self.max_text_tokens + self.kp_len + 2

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.n_image_tokens

    def view_id(self, view: str | None) -> int:
        return int(self.view_ids[view_token(view)])

    def prompt(self, text_ids: Sequence[int], key_patches: Sequence[KeyPatch], view: str | None
               ) -> tuple[list[int], list[int]]:
        """(ids, attention mask) of one prompt, left-padded to `prompt_len`."""
        body = list(text_ids)[: self.max_text_tokens]
        if self.key_patches > 0:
            body.append(self.kp_id)
            for kp in list(key_patches)[: self.key_patches]:
                body += [self.pos_offset + kp.position(self.grid[1]), self.img_offset + int(kp.code)]
            body.append(self.kp_end_id)
        body += [self.view_id(view), self.img_id]
        n_pad = self.prompt_len - len(body)
        return [self.pad_id] * n_pad + body, [0] * n_pad + [1] * len(body)

    def key_patch_cells(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(raster cell, code) of each key patch in a prompt made by `prompt`, read back from its ids: the block sits
        just before the view and `<img>`, so it is parsed from the end and text can never be mistaken for it."""
        ids = list(ids)
        if self.key_patches <= 0 or len(ids) < 3 or ids[-3] != self.kp_end_id:
            return []
        out, j = [], len(ids) - 4
        while j >= 1 and ids[j] != self.kp_id:
            pos, code = ids[j - 1] - self.pos_offset, ids[j] - self.img_offset
            if not (0 <= pos < self.n_image_tokens and 0 <= code < self.codebook_size):
                raise GeneratorError(f"key-patch block holds ids {ids[j - 1]}, {ids[j]}: not <pos_i> <img_c>")
            out.append((pos, code))
            j -= 2
        if j < 0 or ids[j] != self.kp_id:
            raise GeneratorError("key-patch block has no opening <kp>")
        return out[::-1]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = list(self.grid)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Layout:
        d = dict(d)
        d["grid"] = tuple(int(x) for x in d["grid"])
        return cls(**d)


def layout_for(tokenizer, grid: tuple[int, int], codebook_size: int, key_patches: int,
               max_text_tokens: int) -> Layout:
    """The layout of a tokenizer that holds `special_tokens(grid, codebook_size)`; positions and codes must be
    contiguous id ranges (they are when added in one call, as `build_tokenizer` / `extend_tokenizer` do)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens(grid, codebook_size)}
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in ids.items() if i is None or (unk is not None and i == unk and t != UNK)]
    if missing:
        raise GeneratorError(f"tokenizer lacks special tokens {missing[:5]}")
    hw = grid[0] * grid[1]
    pos0, img0 = ids["<pos_0>"], ids["<img_0>"]
    if any(ids[f"<pos_{i}>"] != pos0 + i for i in range(hw)) or \
            any(ids[f"<img_{c}>"] != img0 + c for c in range(codebook_size)):
        raise GeneratorError("tokenizer: <pos_i> / <img_c> ids are not contiguous")
    return Layout(grid=(int(grid[0]), int(grid[1])), codebook_size=int(codebook_size), key_patches=int(key_patches),
                  max_text_tokens=int(max_text_tokens), pad_id=ids[PAD], kp_id=ids[KP], kp_end_id=ids[KP_END],
                  img_id=ids[IMG], img_end_id=ids[IMG_END], pos_offset=pos0, img_offset=img0,
                  view_ids={view_token(v): ids[view_token(v)] for v in VIEWS} | {VIEW_OTHER: ids[VIEW_OTHER]},
                  vocab_size=len(tokenizer))


# ----------------------------------------------------------------------------------------------------------------
# tokenizer

def build_tokenizer(texts: Sequence[str], text_vocab_size: int, grid: tuple[int, int], codebook_size: int):
    """A BPE tokenizer trained on `texts` (after `clean_text`), special tokens first (ids 0..), as a
    `PreTrainedTokenizerFast`. Deterministic: the same texts give the same vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK] + special_tokens(grid, codebook_size)
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + int(text_vocab_size), special_tokens=specials,
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(sorted(clean_text(t) for t in texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD,
                                   model_max_length=1_000_000)


def extend_tokenizer(tokenizer, grid: tuple[int, int], codebook_size: int) -> int:
    """Add the layout's tokens to a pretrained tokenizer (one call: contiguous ids); returns how many were added."""
    new = [t for t in special_tokens(grid, codebook_size) if t not in tokenizer.get_vocab()]
    return tokenizer.add_tokens(new, special_tokens=True)


def encode_text(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Text ids (no special tokens added), cut to `max_tokens`."""
    return list(tokenizer(clean_text(text), add_special_tokens=False)["input_ids"])[:max_tokens]


# ----------------------------------------------------------------------------------------------------------------
# model

@dataclass(frozen=True)
class ModelSpec:
    """A from-scratch network (ignored with a pretrained model)."""

    arch: str = "gpt_neox"
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model {self.d_model} must split into n_heads {self.n_heads} heads of even size")


def build_model(spec: ModelSpec, layout: Layout) -> nn.Module:
    """A causal LM from a config (random weights; seed first)."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    common = dict(vocab_size=layout.vocab_size, bos_token_id=layout.img_id, eos_token_id=layout.img_end_id,
                  pad_token_id=layout.pad_id, tie_word_embeddings=False)
    if spec.arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=spec.d_model, num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                            intermediate_size=4 * spec.d_model, max_position_embeddings=layout.seq_len + 1,
                            hidden_dropout=spec.dropout, attention_dropout=spec.dropout, **common)
    else:
        cfg = GPT2Config(n_embd=spec.d_model, n_layer=spec.n_layers, n_head=spec.n_heads,
                         n_positions=layout.seq_len + 1, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
                         attn_pdrop=spec.dropout, **common)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..L-1 of every row, padding included (it is masked out). Every prompt has the same padded length,
    so image token j always sits at position P + j: a learned absolute position embedding (GPT-2) then names the
    grid cell directly, which the from-scratch model learns much faster than from relative offsets alone."""
    return torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape[0], -1)


def folder_sha256(path: str | Path, names: Sequence[str]) -> str:
    """SHA-256 over the named files of a folder that exist (name + content hash, sorted); '' if none exists."""
    path = Path(path)
    found = sorted(n for n in names if (path / n).is_file())
    if not found:
        return ""
    if len(found) == 1:
        return file_sha256(path / found[0])
    h = hashlib.sha256()
    for n in found:
        h.update(f"{n}:{file_sha256(path / n)}\n".encode())
    return h.hexdigest()


class Generator:
    """The causal LM, its tokenizer, the layout and the key-patch bank, as one object."""

    def __init__(self, model: nn.Module, tokenizer, layout: Layout, bank: KeyPatchBank | None = None,
                 meta: dict | None = None) -> None:
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.bank = bank if bank is not None else KeyPatchBank(layout.grid, layout.codebook_size)
        self.meta = dict(meta or {})
        if self.bank.grid != layout.grid or self.bank.codebook_size != layout.codebook_size:
            raise GeneratorError(f"key-patch bank grid {self.bank.grid} / {self.bank.codebook_size} codes does not "
                                 f"match the generator's {layout.grid} / {layout.codebook_size}")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def key_patches(self, terms: Sequence) -> list[KeyPatch]:
        return self.bank.select(terms, self.layout.key_patches)

    def encode_prompt(self, text: str, key_patches: Sequence[KeyPatch], view: str | None
                      ) -> tuple[list[int], list[int]]:
        return self.layout.prompt(encode_text(self.tokenizer, text, self.layout.max_text_tokens), key_patches, view)

    def unconditional_prompt(self, view: str | None) -> tuple[list[int], list[int]]:
        return self.layout.prompt([], [], view)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits B x L x V of whole sequences (no cache)."""
        return self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits

    # -- folder ----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """save_pretrained (config.json + model.safetensors + generation_config.json), tokenizer, bank.json,
        generator.json."""
        from transformers import GenerationConfig

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        lay = self.layout
        GenerationConfig(max_new_tokens=lay.n_image_tokens, min_new_tokens=lay.n_image_tokens, do_sample=True,
                         bos_token_id=lay.img_id, eos_token_id=lay.img_end_id, pad_token_id=lay.pad_id
                         ).save_pretrained(path)
        self.bank.save(path / BANK_FILE)
        meta = {**self.meta, **(extra or {})}
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": lay.to_dict(),
               "image_tokens": f"ids {lay.img_offset}..{lay.img_offset + lay.codebook_size - 1} = codes "
                               f"0..{lay.codebook_size - 1}, {lay.grid[0]}x{lay.grid[1]} raster order", **meta}
        (path / META_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        record_weights(path)  # last: a save cut short leaves no record and the folder is refused
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Generator:
        """Rebuild from a folder written by `save`; eval mode."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from cxrsynth.models.folder import check_files, one_line, verify_weights

        path = Path(path)
        meta_file, w_file = path / META_FILE, path / "model.safetensors"
        if not meta_file.is_file():
            raise GeneratorError(f"{meta_file}: not a generator folder (generator.json missing; train it with "
                                 "`dvc repro generator` or `python -m stages.generator`)")
        meta = read_json_object(meta_file, GeneratorError)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise GeneratorError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} file")
        if not w_file.is_file():
            raise GeneratorError(f"{w_file}: weights missing")
        verify_weights(path, GeneratorError)  # sizes and sha256 against weights.sha256.json, before anything is read
        check_files(path, GeneratorError)  # damaged JSON / safetensors files, named, before transformers reads them
        try:
            layout = Layout.from_dict(meta.pop("layout"))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise GeneratorError(f"{meta_file}: invalid layout ({type(err).__name__}: {err})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:
            raise GeneratorError(f"{path}: cannot load the tokenizer (tokenizer.json, tokenizer_config.json): "
                                 f"{one_line(err)}") from err
        if layout_for(tokenizer, layout.grid, layout.codebook_size, layout.key_patches,
                      layout.max_text_tokens) != layout:
            raise GeneratorError(f"{meta_file}: layout does not match the folder's tokenizer (tokenizer.json, "
                                 "tokenizer_config.json)")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as err:
            raise GeneratorError(f"{path / 'config.json'}: invalid model config ({one_line(err)})") from err
        try:  # safetensors only: a pickle (pytorch_model.bin) is never read
            model, info = AutoModelForCausalLM.from_pretrained(path, config=config, use_safetensors=True,
                                                               output_loading_info=True)
        except Exception as err:
            raise GeneratorError(f"{w_file}: corrupted or truncated, or does not match config.json "
                                 f"({one_line(err)})") from err
        if info.get("missing_keys") or info.get("unexpected_keys"):  # transformers would re-initialise them silently
            raise GeneratorError(f"{w_file}: weights do not match config.json (missing "
                                 f"{sorted(info.get('missing_keys') or [])[:5]}, unexpected "
                                 f"{sorted(info.get('unexpected_keys') or [])[:5]})")
        bank = KeyPatchBank.load(path / BANK_FILE)
        for k in ("format", "format_version", "image_tokens"):
            meta.pop(k, None)
        try:
            return cls(model.to(device).eval(), tokenizer, layout, bank, meta)
        except GeneratorError as err:  # the bank does not fit the layout
            raise GeneratorError(f"{path / BANK_FILE}: {err}") from None


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a generator folder's model.safetensors."""
    return file_sha256(Path(path) / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# training

@dataclass
class TrainingData:
    """Prompts (conditional and unconditional) and target codes of a split, stored compactly (O(N) in RAM: 10 bytes
    per prompt position, 2 bytes per code while the codebook fits int16); `sequence_batch` widens a batch to int64.
    """

    prompt: torch.Tensor          # N x P int32
    mask: torch.Tensor            # N x P bool
    uncond: torch.Tensor          # N x P int32 (view only)
    uncond_mask: torch.Tensor     # N x P bool
    codes: torch.Tensor           # N x H*W int16 (int32 for codebooks over 32768 codes): codes, not ids
    n_key_patches: np.ndarray     # N: key patches each prompt got


def code_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 32768 else torch.int32


KEY_PATCH_CODES = ("bank", "image", "mix")


def training_data(gen: Generator, texts: Sequence[str], views: Sequence[str], tokens: np.ndarray,
                  terms_fn: Callable[[str], list], *, key_patch_codes: str = "bank", seed: int = 0,
                  stats: dict | None = None) -> TrainingData:
    """Sequences of one split. Key patches sit at the cells the bank names for the report's terms
    (`gen.key_patches(terms)`, exactly as at synthesis time); their codes, by `key_patch_codes`:
    - `bank`: the bank's code for the cell (what synthesis gives): the same for every image with that term, so the
      block says which cells matter but nothing about this image;
    - `image`: the training image's own code at that cell (the lineage's grounding): the block then carries
      information the model can copy, so it learns to place and use it; at synthesis the bank's code stands in;
    - `mix`: per image, one or the other with probability 1/2 (seeded by `seed`), so the model sees both.
    `stats` (a dict) receives the train/test mismatch: the share of key patches whose image code differs from the
    bank's code."""
    if key_patch_codes not in KEY_PATCH_CODES:
        raise ValueError(f"key_patch_codes must be one of {KEY_PATCH_CODES}, got {key_patch_codes!r}")
    lay = gen.layout
    n, width = len(texts), lay.prompt_len
    cond, cmask = torch.zeros(n, width, dtype=torch.int32), torch.zeros(n, width, dtype=torch.bool)
    unc, umask = torch.zeros(n, width, dtype=torch.int32), torch.zeros(n, width, dtype=torch.bool)
    nkp = np.zeros(n, np.int64)
    uncond_of: dict[str, tuple[list[int], list[int]]] = {}
    own = np.random.default_rng(seed).random(n) < 0.5 if key_patch_codes == "mix" else \
        np.full(n, key_patch_codes == "image")
    n_kp = n_differ = 0
    for i, (text, view) in enumerate(zip(texts, views)):
        kps = gen.key_patches(terms_fn(text)) if lay.key_patches > 0 else []
        if kps:
            grid = np.asarray(tokens[i]).reshape(lay.grid)
            codes = [int(grid[kp.row, kp.col]) for kp in kps]
            n_kp += len(kps)
            n_differ += sum(c != kp.code for c, kp in zip(codes, kps))
            if own[i]:
                kps = [dataclasses.replace(kp, code=c) for kp, c in zip(kps, codes)]
        ids, m = gen.encode_prompt(text, kps, view)
        if view not in uncond_of:
            uncond_of[view] = gen.unconditional_prompt(view)
        u, um = uncond_of[view]
        cond[i], cmask[i] = torch.tensor(ids, dtype=torch.int32), torch.tensor(m, dtype=torch.bool)
        unc[i], umask[i] = torch.tensor(u, dtype=torch.int32), torch.tensor(um, dtype=torch.bool)
        nkp[i] = len(kps)
    if stats is not None:
        stats.update(key_patches=n_kp, image_code_differs=round(n_differ / n_kp, 4) if n_kp else None,
                     own_codes_share=round(float(own.mean()), 4) if n else None)
    dt = code_dtype(lay.codebook_size)
    codes = torch.empty(len(tokens), lay.n_image_tokens, dtype=dt)
    for s in range(0, len(tokens), 4096):  # a chunk at a time: no int64 copy of the whole split
        chunk = np.asarray(tokens[s:s + 4096]).reshape(-1, lay.n_image_tokens)
        codes[s:s + len(chunk)] = torch.from_numpy(chunk.astype(np.int32)).to(dt)
    return TrainingData(cond, cmask, unc, umask, codes, nkp)


def sequence_batch(layout: Layout, prompt: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor) -> dict:
    """Whole training sequences: prompt ids + image ids (int64); the mask covers the image tokens too."""
    codes = torch.as_tensor(codes).long()
    img = codes + layout.img_offset
    return {"ids": torch.cat([prompt.long(), img], 1), "mask": torch.cat([mask.long(), torch.ones_like(img)], 1),
            "codes": codes}


def image_loss(model: nn.Module, batch: dict, layout: Layout) -> torch.Tensor:
    """Cross-entropy of the H*W image tokens only (each predicted from everything before it)."""
    n = layout.n_image_tokens
    ids, mask = batch["ids"], batch["mask"]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=n + 1)
    logits = out.logits[:, :-1].float()                     # predictions of the n image tokens
    target = batch["codes"] + layout.img_offset
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def dropout_rows(seed: int, step: int, n: int, p: float) -> torch.Tensor:
    """Which rows of step `step` lose their prompt (a pure function of seed and step: resume-safe)."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    return torch.from_numpy(np.random.default_rng([seed, 7919, step]).random(n) < p)


@dataclass
class TrainingSetup:
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]
    batches: Callable[[int], dict]
    cfg: TrainConfig
    evaluate: Callable[[nn.Module], dict]


def training_setup(gen: Generator, train: TrainingData, val: TrainingData, cfg: TrainConfig, *,
                   batch_size: int, prompt_dropout: float, seed: int) -> TrainingSetup:
    """Loss, step -> batch (epoch-shuffled, prompt dropout per row) and validation loss (conditional prompts)."""
    info = dist_info()
    sampler = EpochSampler(len(train.codes), batch_size, seed, rank=info.rank, world_size=info.world_size)
    lay = gen.layout

    def batches(step: int) -> dict:
        idx = torch.from_numpy(sampler(step))
        drop = dropout_rows(seed, step, len(idx), prompt_dropout)[:, None]
        prompt = torch.where(drop, train.uncond[idx], train.prompt[idx])
        mask = torch.where(drop, train.uncond_mask[idx], train.mask[idx])
        return sequence_batch(lay, prompt, mask, train.codes[idx])

    def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return image_loss(net, batch, lay), {}

    def evaluate(net: nn.Module) -> dict:
        dev = next(net.parameters()).device
        total, n = 0.0, 0
        for i in range(0, len(val.codes), 64):
            b = sequence_batch(lay, val.prompt[i:i + 64], val.mask[i:i + 64], val.codes[i:i + 64])
            b = {k: v.to(dev) for k, v in b.items()}
            total += float(image_loss(net, b, lay)) * len(b["codes"])
            n += len(b["codes"])
        # loss per image token; perplexity relative to the codebook size is easier to read
        return {"loss": total / max(n, 1), "perplexity": float(np.exp(total / max(n, 1)))}

    return TrainingSetup(gen.model, loss_fn, batches, cfg, evaluate)


def fit(gen: Generator, train_data: TrainingData, val_data: TrainingData, cfg: TrainConfig, *, batch_size: int,
        prompt_dropout: float, seed: int) -> TrainResult:
    """Train `gen.model` in place through the shared loop; the weights with the best validation loss are kept."""
    s = training_setup(gen, train_data, val_data, cfg, batch_size=batch_size, prompt_dropout=prompt_dropout,
                       seed=seed)
    result = train(s.model, s.loss_fn, s.batches, s.cfg, s.evaluate if len(val_data.codes) else None)
    gen.model.eval()
    return result


def new_generator(spec: ModelSpec, tokenizer, *, grid: tuple[int, int], codebook_size: int, key_patches: int,
                  max_text_tokens: int, bank: KeyPatchBank | None, seed: int,
                  pretrained_path: str = "") -> Generator:
    """A fresh generator: a from-scratch network from `spec` (seeded), or a local pretrained LM whose vocabulary
    is extended with the layout's tokens (then `tokenizer` is ignored: the pretrained one is extended)."""
    seed_everything(seed)
    if pretrained_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(pretrained_path).is_dir():
            raise GeneratorError(f"generator.pretrained_path: {pretrained_path} is not a folder")
        tokenizer = AutoTokenizer.from_pretrained(pretrained_path)
        extend_tokenizer(tokenizer, grid, codebook_size)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = PAD
        model = AutoModelForCausalLM.from_pretrained(pretrained_path, use_safetensors=True)
        model.resize_token_embeddings(len(tokenizer))
        layout = layout_for(tokenizer, grid, codebook_size, key_patches, max_text_tokens)
        need = layout.seq_len
        have = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if have is not None and have < need:
            raise GeneratorError(f"generator.pretrained_path: the model handles {have} positions, the layout "
                                 f"needs {need} (lower generator.max_text_tokens)")
    else:
        layout = layout_for(tokenizer, grid, codebook_size, key_patches, max_text_tokens)
        model = build_model(spec, layout)
    return Generator(model, tokenizer, layout, bank)

