"""Key patches: the visual clues a prompt hands the generator, and the bank they are looked up in.

A key patch is one codebook entry at one position of the token grid (`KeyPatch(code, row, col, score, term)`).
The `align` stage builds a `KeyPatchBank` after training: for each vocabulary key (a pathology, an anatomy term, a
`pathology|anatomy` pair, or a lateralised `pathology@left` / `pathology@right`) the grid positions and codes most
aligned to it over the training images. Selection is a pure function of the prompt's terms and the bank:

    bank.select(terms, k)      # terms: cxrsynth.text.specs.Term (or their dicts)

so training the generator (terms extracted from each training image's own report) and synthesis (terms of the written
prompt) pick key patches the same way, and nothing is read from the target image. A prompt whose terms are not in
the bank (or that has none) gets no key patches, never an error.

Selection rule (deterministic): positive and uncertain terms in prompt order, duplicates removed; each term uses its
most specific key present in the bank (`pathology|anatomy`, then `pathology@side` for a left or right term, then
`pathology`, then `anatomy`); the terms' ranked entries are interleaved round-robin (every term's best entry before
any term's second), a grid position is used at most once, and the first k are returned.

Building (`build_bank`, after the aligner is trained): a prompt has no image, so its key patches come from the bank,
built by differential alignment: each bank key (`pathology|anatomy`, `pathology`, `anatomy`, the
keys `term_keys` gives a report's present and uncertain terms) has a query vector (its finding words' mean contextual
embedding); every training image's patch-similarity map to it is z-scored over the grid, and the key's score map is
the mean over the images whose report has the key minus the mean over the other images of the same view (and the
same difference of the patch embeddings themselves). Cells every chest lights up cancel; cells the finding adds
remain. A left key pools its evidence with its right mirror key's, flipped. A pair key adds the maps of its
pathology (on its side) and its anatomy, so a rare combination borrows its place from the anatomy. The best-scoring
positions become the key's entries, each with the code its images hold there most often. Training the generator
(terms of the image's own report) and synthesis (terms of the prompt) then both call `bank.select(terms, k)`, so
nothing is read from the target image.

Bank file: `bank.json` (format, version, grid size, codebook size, keys -> entries sorted by score), written with
sorted keys and rounded scores so identical banks give identical bytes.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cxrsynth.errors import UserError
from cxrsynth.config import BankParams
from cxrsynth.io import read_json_object
from cxrsynth.models.text_states import TextStates, texts_sha256
from cxrsynth.text.findings import extract_findings
from cxrsynth.text.specs import Term, spec_from_findings

if TYPE_CHECKING:  # type hints only: the code calls the objects' methods, no import edge
    from cxrsynth.models.align import AlignModel, TextBatch

FORMAT = "cxrsynth-keypatch-bank"
FORMAT_VERSION = 1
BANK_FILE = "bank.json"


class BankError(UserError):
    """A bank file that cannot be read, or an entry outside the grid / codebook; the message names it."""


@dataclass(frozen=True)
class KeyPatch:
    """One visual clue: codebook entry `code` at grid position (`row`, `col`), aligned to `term` with `score`."""

    code: int
    row: int
    col: int
    score: float
    term: str

    def position(self, grid_w: int) -> int:
        """Raster index of the position (row-major, as image tokens are ordered)."""
        return self.row * grid_w + self.col


MIRROR = {"left": "right", "right": "left"}


def term_keys(term: Term | Mapping) -> list[str]:
    """Bank keys for one term, most specific first: `pathology|anatomy`, `pathology@side` (left or right only),
    `pathology`, `anatomy`."""
    if isinstance(term, Mapping):
        pathology, anatomy, side = term.get("pathology"), term.get("anatomy"), term.get("side")
    else:
        pathology, anatomy, side = term.pathology, term.anatomy, term.side
    keys = []
    if pathology and anatomy:
        keys.append(f"{pathology}|{anatomy}")
    if pathology and side in MIRROR:
        keys.append(f"{pathology}@{side}")
    if pathology:
        keys.append(pathology)
    if anatomy:
        keys.append(anatomy)
    return keys


def key_side(key: str) -> str | None:
    """The side a bank key is lateralised to (`left` / `right`), from its `@side` or its anatomy's words; None for a
    key with no side, both sides or bilateral."""
    if "@" in key:
        side = key.rsplit("@", 1)[1]
        return side if side in MIRROR else None
    words = set(re.findall(r"\b(left|right)\b", key.split("|", 1)[-1]))
    return words.pop() if len(words) == 1 else None


def mirror_key(key: str) -> str | None:
    """The same key on the other side (`left` <-> `right` throughout), or None for a key with no single side."""
    if key_side(key) is None:
        return None
    return re.sub(r"\b(left|right)\b", lambda m: MIRROR[m.group(1)], key)


def _certainty(term: Term | Mapping) -> str:
    return term.get("certainty", "present") if isinstance(term, Mapping) else term.certainty


def terms_of_text(text: str) -> list[Term]:
    """The terms a report or prompt text asks for (findings extraction, first mention of a pathology wins)."""
    return list(spec_from_findings(extract_findings(text or "")).terms)


def terms_from_json(doc: str | Sequence[Mapping] | None) -> list[Term]:
    """Terms stored as JSON (the `terms` column of prompts.parquet) -> Term objects."""
    if doc is None or (isinstance(doc, float)):
        return []
    items = json.loads(doc) if isinstance(doc, str) else doc
    fields = set(Term.__dataclass_fields__)
    return [Term(**{k: v for k, v in d.items() if k in fields}) for d in items]


@dataclass
class KeyPatchBank:
    """keys -> ranked key patches, on a grid of `grid` = (H, W) tokens from a codebook of `codebook_size` codes."""

    grid: tuple[int, int]
    codebook_size: int
    entries: dict[str, list[KeyPatch]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.grid = (int(self.grid[0]), int(self.grid[1]))
        for key, items in self.entries.items():
            for kp in items:
                if not (0 <= kp.row < self.grid[0] and 0 <= kp.col < self.grid[1]):
                    raise BankError(f"bank key {key!r}: position ({kp.row}, {kp.col}) outside grid {self.grid}")
                if not 0 <= kp.code < self.codebook_size:
                    raise BankError(f"bank key {key!r}: code {kp.code} outside codebook of {self.codebook_size}")
            self.entries[key] = sorted(items, key=lambda p: (-p.score, p.row, p.col, p.code))

    def key_for(self, term: Term | Mapping) -> str | None:
        """The most specific bank key of a term, or None if the bank knows none of them."""
        return next((k for k in term_keys(term) if self.entries.get(k)), None)

    def select(self, terms: Iterable[Term | Mapping], k: int) -> list[KeyPatch]:
        """The prompt's key patches (see the module docstring for the rule); [] when no term is known."""
        if k <= 0:
            return []
        keys: list[str] = []
        for t in terms:
            if _certainty(t) == "absent":
                continue
            key = self.key_for(t)
            if key is not None and key not in keys:
                keys.append(key)
        out: list[KeyPatch] = []
        used: set[tuple[int, int]] = set()
        depth = max((len(self.entries[key]) for key in keys), default=0)
        for rank in range(depth):
            for key in keys:
                items = self.entries[key]
                if rank < len(items) and (items[rank].row, items[rank].col) not in used:
                    used.add((items[rank].row, items[rank].col))
                    out.append(items[rank])
                    if len(out) == k:
                        return out
        return out

    def select_text(self, text: str, k: int) -> list[KeyPatch]:
        """Key patches for free text (terms extracted from it)."""
        return self.select(terms_of_text(text), k)

    # -- persistence --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "grid": list(self.grid),
                "codebook_size": self.codebook_size, "meta": self.meta,
                "entries": {key: [{**asdict(kp), "score": round(float(kp.score), 6)} for kp in items]
                            for key, items in sorted(self.entries.items())}}

    def save(self, path: str | Path) -> Path:
        """Write the bank to `path` (a folder gets `bank.json`)."""
        path = Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / BANK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> KeyPatchBank:
        """Read a bank file (or a folder holding `bank.json`)."""
        path = Path(path)
        if path.is_dir():
            path = path / BANK_FILE
        if not path.is_file():
            raise BankError(f"{path}: key-patch bank missing")
        doc = read_json_object(path, BankError, "bank")
        if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
            raise BankError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} file")
        try:
            grid, codebook_size = tuple(int(x) for x in doc["grid"]), int(doc["codebook_size"])
            entries = {key: [KeyPatch(int(e["code"]), int(e["row"]), int(e["col"]), float(e["score"]), str(e["term"]))
                             for e in items] for key, items in doc["entries"].items()}
            return cls(grid, codebook_size, entries, doc.get("meta", {}))
        except BankError as err:  # an entry outside the grid / codebook
            raise BankError(f"{path}: {err}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
            raise BankError(f"{path}: malformed entry ({type(err).__name__}: {err})") from None


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
                space: str = "patches", rows: Sequence[int] | None = None):
    """Yield (first row, maps B x K x H x W, vectors B x HW x D): each image's patch similarity to each query, empty
    film set to the map's minimum, z-scored over the grid (so every image weighs the same); and per cell, by
    `space`, its L2-normalised patch embedding (`patches`) or its code's frozen VQ-GAN codebook vector (`codes`),
    empty film set to 0. `rows`: only those rows of `grids`, in that order (first row = position in `rows`), read a
    batch at a time instead of copied out whole."""
    h, w = model.config.grid
    q = queries.to(model.device)
    codebook = model.core.patch_encoder.codebook
    n = len(grids) if rows is None else len(rows)
    for start in range(0, n, batch_size):
        g = model._grids(grids[start:start + batch_size] if rows is None
                         else grids[np.asarray(rows[start:start + batch_size], dtype=np.int64)])
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


def build_bank(model: AlignModel, texts: Sequence[str], grids: np.ndarray, settings: BankParams, *,
               strata: Sequence | None = None, batch_size: int = 64,
               text_states: TextStates | None = None) -> KeyPatchBank:
    """The key-patch bank from training pairs: where the trained model's patches change when a report mentions a
    term, compared within strata (view), pooled over mirror sides, with pair keys composed from their parts.

    `settings` (params.yaml `align.bank`, no defaults of its own here) names the rule, space, size, support,
    mirror, smoothing and adjustment below; `strata` gives one view label per image and is required when
    `settings.strata` is `view` (ignored when it is `none`).

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
    size, min_support, rule, mirror = settings.per_key, settings.min_support, settings.rule, settings.mirror
    smooth, adjust, ridge, space = settings.smooth, settings.adjust, settings.ridge, settings.space
    if settings.strata == "none":
        strata = None
    elif strata is None:
        raise ValueError("bank strata 'view' needs one view label per training image (strata=...)")
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
    for start, maps, _ in _query_maps(model, grids, q, batch_size, rows=need):
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
