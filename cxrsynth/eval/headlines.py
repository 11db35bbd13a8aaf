"""The headline numbers of an evaluation, each a statistic of the per-item table (`cxrsynth.eval.items`) over
resampling units, so that one definition gives the value, its bootstrap interval and the paired difference between
two runs (`cxrsynth.eval.intervals`, `python -m cxrsynth compare`).

What is resampled: the synthetic images by prompt for fidelity, semantics, phantom placement and near copies (the
real test features, the reference, are held fixed: the interval is the spread due to which prompts were drawn, the
quantity two runs on one reference set differ by); the real test images for the utility AUROCs (the three
classifiers are fixed, the test set is the sample). Retraining variability is not in these intervals: that is what
seeds are for (`bench/ablations.sh`).

`HEADLINES` lists them with the `evaluate.json` key their point value is also written under (the summary and
compare tables use these names).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrsynth.eval.intervals import Interval, Units, bootstrap
from cxrsynth.eval.items import Items, label_cols
from cxrsynth.eval.metrics import _auroc_rows, gaussian_stats
from cxrsynth.text.chexpert import OBSERVATIONS, eval_targets


@dataclass(frozen=True)
class Headline:
    name: str                  # summary / compare name
    role: str                  # rows resampled
    key: str                   # evaluate.json key of the point value (intervals under key/lo, key/hi, key/n)
    better: str                # "higher" | "lower" | "closer" (to the floor)
    make: Callable[[Items], Callable[[np.ndarray], float | None]]  # items -> (row indices of `role` -> value)
    doc: str
    set_level: bool = False    # a statistic of the whole set (FID, KID, PRDC): its interval is re-centred
    subset: Callable[[pd.DataFrame], np.ndarray] | None = None  # the role's rows it is defined on (n counts these)


# ----------------------------------------------------------------------------------------------------------------
# statistics (each built once per table: `make(items)` precomputes what every replicate shares)

def _fid(role: str):
    """FID against the fixed real test features: tr((S_r S_f)^1/2) as the sum of the square roots of the eigenvalues
    of S_r^1/2 S_f S_r^1/2 (symmetric, the same trace), S_r^1/2 computed once, so a replicate costs one symmetric
    eigenvalue problem instead of a general matrix square root (tested equal to torchmetrics' FID)."""
    def make(items: Items):
        fake, real = items.features(role).astype(np.float64), items.features("real_test").astype(np.float64)
        if len(real) < 2 or len(fake) < 2:
            return lambda rows: None
        mu_r, s_r = gaussian_stats(real)
        w, v = np.linalg.eigh(s_r)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_r = float(np.trace(s_r))

        def stat(rows: np.ndarray) -> float | None:
            if len(np.unique(rows)) < 2:
                return None
            mu, s_f = gaussian_stats(fake[rows])
            ev = np.linalg.eigvalsh(root @ s_f @ root)
            d = mu_r - mu
            return float(d @ d + tr_r + np.trace(s_f) - 2.0 * np.sqrt(np.clip(ev, 0, None)).sum())
        return stat
    return make


def _kid(items: Items):
    """Unbiased MMD^2 with the cubic polynomial kernel (d^-1 x.y + 1)^3 of the full sets (KID's estimator without
    the subsets; the subset mean torchmetrics reports is in evaluate.json as kid_mean)."""
    fake, real = items.features("synthetic").astype(np.float64), items.features("real_test").astype(np.float64)
    if len(real) < 2 or len(fake) < 2:
        return lambda rows: None
    d = real.shape[1]
    k_rr = (real @ real.T / d + 1.0) ** 3
    m = len(real)
    rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    k_ff_all = (fake @ fake.T / d + 1.0) ** 3
    k_fr_all = (fake @ real.T / d + 1.0) ** 3

    def stat(rows: np.ndarray) -> float | None:
        n = len(rows)
        if n < 2:
            return None
        k_ff = k_ff_all[np.ix_(rows, rows)]
        same = rows[:, None] == rows[None, :]  # a resampled image paired with itself is a diagonal term
        ff = (k_ff.sum() - k_ff[same].sum()) / max(n * n - same.sum(), 1)
        return float(rr + ff - 2.0 * k_fr_all[rows].mean())
    return stat


def _prdc(which: str):
    """One PRDC computation per resample, shared by the four headlines (they draw the same units: same seed), with
    the real balls' radii computed once."""
    def make(items: Items):
        from cxrsynth.eval.metrics import Features, kth_neighbour_radius, prdc

        fake, real = items.features("synthetic"), items.features("real_test")
        k = int(items.meta.get("prdc_k", 5))
        if len(real) <= k or len(fake) <= k:
            return lambda rows: None
        memo = items.memo.setdefault("prdc", {})
        if "ref" not in memo:
            ref = Features(real.astype(np.float64), "items")
            memo["ref"] = (ref, kth_neighbour_radius(ref.values, k), fake.astype(np.float64))
        ref, radius, fake64 = memo["ref"]

        def stat(rows: np.ndarray) -> float | None:
            if len(rows) <= k:
                return None
            key = rows.tobytes()
            got = memo.get(key)
            if got is None:
                if len(memo) > 4 * 1024:  # bound the cache (a bootstrap's replicates, not every draw ever made)
                    for old in [x for x in memo if x != "ref"][:2048]:
                        del memo[old]
                got = memo[key] = prdc(ref, Features(fake64[rows], "items"), k=k, real_radius=radius)
            return got[which]
        return stat
    return make


def _macro_auroc(role: str, label_prefix: str, prob_prefix: str = "prob", restrict_paired: bool = False):
    """Macro AUROC over the labels that have >= min_count positives and negatives on all rows (that label set is
    fixed, so every replicate averages the same labels; a replicate missing a class in one of them is dropped)."""
    def make(items: Items):
        rows_df = items.role(role)
        blank, k_min = items.meta.get("blank_policy", "negative"), int(items.meta.get("min_count", 5))
        cols_t, cols_p = label_cols(label_prefix), label_cols(prob_prefix)
        if not len(rows_df) or any(c not in rows_df.columns for c in cols_t + cols_p):
            return lambda rows: None
        t = eval_targets(rows_df[cols_t].to_numpy(np.float64), blank)
        p = rows_df[cols_p].to_numpy(np.float64)
        ok = np.ones(len(rows_df), bool)
        if restrict_paired:
            ok = rows_df["paired"].to_numpy(bool) if "paired" in rows_df.columns else np.zeros(len(rows_df), bool)
        used = [j for j in range(len(OBSERVATIONS))
                if np.sum(ok & (t[:, j] == 1)) >= k_min and np.sum(ok & (t[:, j] == 0)) >= k_min]

        def stat(rows: np.ndarray) -> float | None:
            rows = rows[ok[rows]]
            if not used or not len(rows):
                return None
            vals = []
            for j in used:
                keep = rows[np.isfinite(t[rows, j])]
                y = t[keep, j] > 0.5
                v = _auroc_rows(y[None], p[keep, j][None])[0]
                if not np.isfinite(v):
                    return None
                vals.append(v)
            return float(np.mean(vals))
        return stat
    return make


def _label_auroc(label: str):
    """AUROC of one label on the synthetic rows (classifier probability vs the prompt's label), over the rows whose
    label is known; a replicate with one class only gives None."""
    def make(items: Items):
        rows_df = items.role("synthetic")
        col_p = f"prob/{label}"
        cols_t = label_cols("label")
        if not len(rows_df) or col_p not in rows_df.columns or any(c not in rows_df.columns for c in cols_t):
            return lambda rows: None
        t = eval_targets(rows_df[cols_t].to_numpy(np.float64), items.meta.get("blank_policy", "negative"))
        t = t[:, OBSERVATIONS.index(label)]
        p = rows_df[col_p].to_numpy(np.float64)

        def stat(rows: np.ndarray) -> float | None:
            rows = rows[np.isfinite(t[rows])]
            y = t[rows] > 0.5
            if y.all() or not y.any():
                return None
            v = _auroc_rows(y[None], p[rows][None])[0]
            return float(v) if np.isfinite(v) else None
        return stat
    return make


def _utility_gain(items: Items):
    a = _macro_auroc("real_test", "label", "utility/real_plus_synthetic/prob")(items)
    b = _macro_auroc("real_test", "label", "utility/real/prob")(items)

    def stat(rows: np.ndarray) -> float | None:
        x, y = a(rows), b(rows)
        return None if x is None or y is None else x - y
    return stat


def _ctr_auroc(items: Items):
    s = items.role("synthetic")
    if "ctr" not in s.columns:
        return lambda rows: None
    ctr = s["ctr"].to_numpy(np.float64)
    asked = s["label/Cardiomegaly"].to_numpy(np.float64) == 1.0

    def stat(rows: np.ndarray) -> float | None:
        rows = rows[np.isfinite(ctr[rows])]
        y = asked[rows]
        if y.all() or not y.any():
            return None
        return float(_auroc_rows(y[None], ctr[rows][None])[0])
    return stat


def _effusion_side(items: Items):
    s = items.role("synthetic")
    if "effusion_side" not in s.columns:
        return lambda rows: None
    want = np.array([{"right": 1.0, "left": -1.0}.get(v if isinstance(v, str) else "", np.nan)
                     for v in s["effusion_side"]])
    asym = s["effusion_asymmetry"].to_numpy(np.float64)
    ok = np.isfinite(want) & np.isfinite(asym)
    hit = np.sign(asym) == want

    def stat(rows: np.ndarray) -> float | None:
        rows = rows[ok[rows]]
        return float(hit[rows].mean()) if len(rows) else None
    return stat


def _near_copy(items: Items):
    s = items.role("synthetic")
    if "near_copy" not in s.columns:
        return lambda rows: None
    flag = s["near_copy"].to_numpy(bool)
    return lambda rows: float(flag[rows].mean()) if len(rows) else None


def _paired_rows(df: pd.DataFrame) -> np.ndarray:
    return df["paired"].to_numpy(bool) if "paired" in df.columns else np.zeros(len(df), bool)


def _finite_ctr(df: pd.DataFrame) -> np.ndarray:
    return np.isfinite(df["ctr"].to_numpy(np.float64)) if "ctr" in df.columns else np.zeros(len(df), bool)


def _one_sided_effusion(df: pd.DataFrame) -> np.ndarray:
    if "effusion_side" not in df.columns:
        return np.zeros(len(df), bool)
    side = np.array([v in ("left", "right") for v in df["effusion_side"]], bool)
    return side & np.isfinite(df["effusion_asymmetry"].to_numpy(np.float64))


HEADLINES: tuple[Headline, ...] = (
    Headline("fid", "synthetic", "fidelity/classifier/fid", "lower", _fid("synthetic"),
             "FID of the synthetic images against the real test images (classifier features)", set_level=True),
    Headline("fid_floor", "floor", "floor/classifier/fid", "lower", _fid("floor"),
             "FID of as many real training images against the real test images: the floor", set_level=True),
    Headline("fid_codebook", "ceiling", "codebook_floor/classifier/fid", "lower", _fid("ceiling"),
             "FID of the VQ-GAN reconstructions of those training images: the best a token generator can do",
             set_level=True),
    Headline("kid", "synthetic", "fidelity/classifier/kid_full", "lower", _kid,
             "KID (unbiased MMD^2, cubic kernel) of the full sets", set_level=True),
    Headline("precision", "synthetic", "fidelity/classifier/precision", "higher", _prdc("precision"),
             "share of synthetic images inside the real images' k-NN balls", set_level=True),
    Headline("recall", "synthetic", "fidelity/classifier/recall", "higher", _prdc("recall"),
             "share of real images inside the synthetic images' k-NN balls", set_level=True),
    Headline("density", "synthetic", "fidelity/classifier/density", "higher", _prdc("density"),
             "mean count of real balls holding a synthetic image, over k", set_level=True),
    Headline("coverage", "synthetic", "fidelity/classifier/coverage", "higher", _prdc("coverage"),
             "share of real images whose ball holds a synthetic image", set_level=True),
    Headline("semantic_auroc", "synthetic", "semantic/macro_auroc", "higher",
             _macro_auroc("synthetic", "label"), "classifier on synthetic images vs the prompt's labels, macro AUROC"),
    Headline("paired_auroc", "synthetic", "paired/macro_auroc", "higher",
             _macro_auroc("synthetic", "source_label", restrict_paired=True),
             "classifier on synthetic images vs the labels of the real image whose report was the prompt",
             subset=_paired_rows),
    Headline("semantic_auroc_pneumothorax", "synthetic", "semantic/auroc/Pneumothorax", "higher",
             _label_auroc("Pneumothorax"), "classifier on synthetic images vs the prompt's pneumothorax label, AUROC"),
    Headline("semantic_auroc_lung_lesion", "synthetic", "semantic/auroc/Lung Lesion", "higher",
             _label_auroc("Lung Lesion"), "classifier on synthetic images vs the prompt's lung lesion label, AUROC"),
    Headline("ctr_auroc", "synthetic", "phantom/ctr_auroc", "higher", _ctr_auroc,
             "measured cardiothoracic ratio as a score of 'cardiomegaly asked' (phantom)", subset=_finite_ctr),
    Headline("effusion_side", "synthetic", "phantom/effusion_side_accuracy", "higher", _effusion_side,
             "share of one-sided effusion prompts whose denser base is on the asked side (phantom)",
             subset=_one_sided_effusion),
    Headline("near_copy_rate", "synthetic", "privacy/near_copy_rate", "lower", _near_copy,
             "share of synthetic images closer to a training image than 5% of real test images are"),
    Headline("utility_real_auroc", "real_test", "utility/real/macro_auroc", "higher",
             _macro_auroc("real_test", "label", "utility/real/prob"), "real-only classifier on real test"),
    Headline("utility_synthetic_auroc", "real_test", "utility/synthetic/macro_auroc", "higher",
             _macro_auroc("real_test", "label", "utility/synthetic/prob"), "synthetic-only classifier on real test"),
    Headline("utility_gain", "real_test", "utility/gain/macro_auroc", "higher", _utility_gain,
             "real + synthetic minus real only, macro AUROC on real test"),
)
BY_NAME = {h.name: h for h in HEADLINES}
# the summary's selection (metrics/summary.json): what answers "is this run better?"
SUMMARY = ("fid", "fid_floor", "fid_codebook", "precision", "coverage", "semantic_auroc", "paired_auroc",
           "ctr_auroc", "effusion_side", "near_copy_rate", "utility_gain")


def units_of(items: Items, role: str, subset: Callable[[pd.DataFrame], np.ndarray] | None = None) -> Units:
    """The resampling units of a role's rows (of those `subset` selects: positions stay the role frame's)."""
    df = items.role(role)
    if subset is None:
        return Units(df["unit"].to_numpy())
    keep = np.flatnonzero(subset(df))
    return Units(df["unit"].to_numpy()[keep], keep)


def intervals(items: Items, *, n_boot: int, seed: int, names=None) -> dict[str, Interval]:
    """Every headline's value and percentile interval from one table."""
    out = {}
    for h in HEADLINES:
        if names is not None and h.name not in names:
            continue
        out[h.name] = bootstrap(h.make(items), units_of(items, h.role, h.subset), n_boot=n_boot, seed=seed,
                                centre=h.set_level)
    return out


def interval_keys(results: dict[str, Interval]) -> dict:
    """`evaluate.json` keys: `<key>/lo`, `<key>/hi`, `<key>/n` (the point values are written by their blocks)."""
    out: dict = {}
    for name, r in results.items():
        key = BY_NAME[name].key
        d = r.as_dict()
        out[f"{key}/lo"], out[f"{key}/hi"], out[f"{key}/n"] = d["lo"], d["hi"], d["n"]
    return out


def summary(results: dict[str, Interval], extra: dict | None = None) -> dict:
    """metrics/summary.json: per summary name, `ci` ("value [lo, hi] n=N": the one column `dvc exp show` needs,
    see the README) plus the numeric `value`, `lo`, `hi` and `n` (for `dvc metrics diff` and plots)."""
    out: dict = {}
    for name in SUMMARY:
        r = results.get(name)
        if r is None:
            continue
        d = r.as_dict(6)
        value = "n/a" if d["value"] is None else f"{d['value']:.3g}"
        ci = f"{value} [{d['lo']:.3g}, {d['hi']:.3g}] n={d['n']}" if d["lo"] is not None else f"{value} n={d['n']}"
        out[name] = {"ci": ci, "value": d["value"], "lo": d["lo"], "hi": d["hi"], "n": d["n"]}
    out.update(extra or {})
    return out


def with_intervals(metrics: dict, items: Items, *, n_boot: int, seed: int) -> tuple[dict, dict]:
    """(metrics with every headline's interval keys and the full-set KID, the summary) from one bootstrap pass."""
    results = intervals(items, n_boot=n_boot, seed=seed)
    out = dict(metrics)
    out["fidelity/classifier/kid_full"] = None if results["kid"].value is None else round(results["kid"].value, 6)
    out.update(interval_keys(results))
    return out, summary(results)
