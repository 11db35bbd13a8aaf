"""Key patches: the visual clues a prompt hands the generator, and the bank they are looked up in.

A key patch is one codebook entry at one position of the token grid (`KeyPatch(code, row, col, score, term)`).
The `align` stage builds a `KeyPatchBank` after training: for each vocabulary key (a pathology, an anatomy term, a
`pathology|anatomy` pair, or a lateralised `pathology@left` / `pathology@right`) the grid positions and codes most
aligned to it over the training images. Selection is a pure function of the prompt's terms and the bank:

    bank.select(terms, k)      # terms: cxrsynth.text.prompting.Term (or their dicts)

so training the generator (terms extracted from each training image's own report) and synthesis (terms of the written
prompt) pick key patches the same way, and nothing is read from the target image. A prompt whose terms are not in
the bank (or that has none) gets no key patches, never an error.

Selection rule (deterministic): positive and uncertain terms in prompt order, duplicates removed; each term uses its
most specific key present in the bank (`pathology|anatomy`, then `pathology@side` for a left or right term, then
`pathology`, then `anatomy`); the terms' ranked entries are interleaved round-robin (every term's best entry before
any term's second), a grid position is used at most once, and the first k are returned.

Bank file: `bank.json` (format, version, grid size, codebook size, keys -> entries sorted by score), written with
sorted keys and rounded scores so identical banks give identical bytes.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cxrsynth.io import read_json_object
from cxrsynth.text.findings import extract_findings
from cxrsynth.text.prompting import Term, spec_from_findings

FORMAT = "cxrsynth-keypatch-bank"
FORMAT_VERSION = 1
BANK_FILE = "bank.json"


class BankError(ValueError):
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
