"""`python -m cxrsynth compare A B [C ...]`: the headline numbers of several runs side by side, each run's
difference to the first with a bootstrap 95% interval, paired where the runs share their resampling units.

A run is a git revision, a branch, a tag or a `dvc exp` name (anything `dvc.api` resolves as `rev`), or
`workspace` for the files on disk. Each run's per-item table (`paths.evaluation`/items.parquet, a DVC output of the
evaluate stage) is read through DVC (`dvc.api.read`: from the DVC cache or the run-cache of that revision); nothing
is re-run. A run whose table cannot be read is a one-line error naming it.

Pairing: a headline's units (prompt ids for synthetic rows, image ids for real test rows) are compared between the
two runs. The same set: a paired bootstrap (each replicate draws one set of units for both runs). Overlapping sets:
paired on the shared units, and the table says how many (not for set statistics such as FID or PRDC, which on a
subset would be another number: those are unpaired unless the sets are equal). Disjoint: each run is resampled on
its own ("unpaired").
A mark (`*`) flags an interval that excludes 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrsynth.errors import UserError
from cxrsynth.eval.headlines import HEADLINES, Headline, units_of
from cxrsynth.eval.intervals import Interval, bootstrap, paired_difference, unpaired_difference
from cxrsynth.eval.items import ITEMS_FILE, Items, ItemsError, read_items

WORKSPACE = "workspace"


class CompareError(UserError):
    """A run or its per-item table that cannot be compared; the message names it."""


def load_run(rev: str, path: str, repo: str | None = None) -> Items:
    """A run's per-item table: the file on disk for `workspace`, else through `dvc.api.read` at `rev`."""
    if rev == WORKSPACE:
        p = Path(repo or ".") / path
        if not p.is_file():
            raise CompareError(f"run {rev!r}: {p} missing (run `dvc repro` first)")
        try:
            return read_items(p, f"{rev}:{path}")
        except ItemsError as e:
            raise CompareError(f"run {rev!r}: {e}") from None
    import dvc.api

    try:
        data = dvc.api.read(path, repo=repo, rev=rev, mode="rb")
    except Exception as e:  # dvc raises many types (unknown revision, missing from cache, path not tracked ...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CompareError(f"run {rev!r}: cannot read {path} ({msg})") from None
    try:
        return read_items(data, f"{rev}:{path}")
    except ItemsError as e:
        raise CompareError(f"run {rev!r}: {e}") from None


def restrict(items: Items, role: str, names: Sequence[str]) -> Items:
    """The table with the rows of `role` limited to the given units (other roles untouched)."""
    keep = set(names)
    df = items.df
    mask = (df.role != role) | df.unit.isin(keep)
    return Items(df[mask], items.meta, items.source)


@dataclass(frozen=True)
class Row:
    headline: Headline
    values: list[Interval]            # per run
    diffs: list[Interval | None]      # per run after the first: run - first
    pairing: list[str]                # "paired" | "paired on k of n" | "unpaired"


def compare_runs(runs: Sequence[Items], *, n_boot: int = 1000, seed: int = 0,
                 names: Sequence[str] | None = None) -> list[Row]:
    """Every headline (or those in `names`) per run, and each later run's difference to the first."""
    if len(runs) < 2:
        raise CompareError("compare needs at least two runs")
    rows = []
    for h in HEADLINES:
        if names is not None and h.name not in names:
            continue
        values = [bootstrap(h.make(r), units_of(r, h.role, h.subset), n_boot=n_boot, seed=seed, centre=h.set_level)
                  for r in runs]
        diffs, pairing = [], []
        base = runs[0]
        for other in runs[1:]:
            ua, ub = units_of(base, h.role, h.subset), units_of(other, h.role, h.subset)
            shared = sorted(set(ua.names) & set(ub.names))
            full = len(shared) == len(ua) == len(ub)
            # a set statistic (FID, PRDC) on a subset is another statistic: pair it only on identical units
            if len(shared) >= 2 and (full or not h.set_level):
                a, b = restrict(base, h.role, shared), restrict(other, h.role, shared)
                ua2, ub2 = units_of(a, h.role, h.subset), units_of(b, h.role, h.subset)
                d = paired_difference(h.make(a), ua2, h.make(b), ub2, n_boot=n_boot, seed=seed,
                                      centre=h.set_level)
                pairing.append("paired" if full else f"paired on {len(shared)} of {max(len(ua), len(ub))}")
            else:
                d = unpaired_difference(h.make(base), ua, h.make(other), ub, n_boot=n_boot, seed=seed,
                                        centre=h.set_level)
                pairing.append("unpaired")
            diffs.append(d)
        rows.append(Row(h, values, diffs, pairing))
    return rows


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def markdown(names: Sequence[str], rows: Sequence[Row]) -> str:
    """The comparison table: value [95% interval] per run, then each difference to the first run."""
    head = ["metric", "better"] + [f"{n}" for n in names] + [f"{n} - {names[0]}" for n in names[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.headline.name, r.headline.better]
        for v in r.values:
            cells.append(f"{_fmt(v.value)} [{_fmt(v.lo)}, {_fmt(v.hi)}] n={v.n}" if v.value is not None else "n/a")
        for d, how in zip(r.diffs, r.pairing):
            if d is None or d.value is None:
                cells.append("n/a")
                continue
            mark = " *" if d.excludes_zero else ""
            cells.append(f"{d.value:+.4g} [{_fmt(d.lo)}, {_fmt(d.hi)}]{mark} ({how})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Values: the headline on all items [bootstrap 95% percentile interval] n = resampling units "
                  "(prompts, or real test images for utility). Differences: run minus the first run; `*`: the "
                  "interval excludes 0. See `cxrsynth/eval/headlines.py` for what each number resamples."]
    return "\n".join(lines) + "\n"


def default_items_path() -> str:
    from cxrsynth.config import ConfigError, load_params

    try:
        if Path("params.yaml").is_file():
            return f"{load_params('params.yaml').paths.evaluation}/{ITEMS_FILE}"
    except ConfigError:
        pass
    return f"data/evaluation/{ITEMS_FILE}"


def run_compare(revs: Sequence[str], *, path: str, repo: str | None = None, n_boot: int = 1000,
                seed: int = 0) -> str:
    runs = [load_run(r, path, repo) for r in revs]
    return markdown(list(revs), compare_runs(runs, n_boot=n_boot, seed=seed))

