"""Bootstrap intervals, the per-item table and `python -m cxrsynth compare`: known answers, self-comparison, a planted
effect, pairing and the one-line errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrsynth.__main__ import main
from cxrsynth.compare import CompareError, compare_runs, load_run, markdown
from cxrsynth.eval import headlines
from cxrsynth.eval.intervals import Units, bootstrap, paired_difference, unpaired_difference
from cxrsynth.eval.items import ItemsError, Items, frame, read_items, write_items
from cxrsynth.text.chexpert import OBSERVATIONS

L = len(OBSERVATIONS)


def _table(seed: int = 0, n_prompts: int = 80, samples: int = 2, n_real: int = 60, signal: float = 0.2,
           prompt_prefix: str = "p") -> list[pd.DataFrame]:
    """A per-item table of a fake run: the classifier's probabilities follow the asked labels by `signal`."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n_prompts, L)) < 0.3).astype(np.float64)
    labels[:, 0] = np.nan  # a blank column: skipped by the macro AUROC
    lab = np.repeat(labels, samples, axis=0)
    n = len(lab)
    noise = np.random.default_rng(seed + 100).random((n, L))
    probs = np.clip(noise * (1 - signal) + signal * np.nan_to_num(lab), 0, 1)
    pid = np.repeat([f"{prompt_prefix}{i:03d}" for i in range(n_prompts)], samples)
    feats = np.random.default_rng(seed + 200).normal(size=(n, 6)).astype(np.float32)
    ctr = 0.45 + 0.1 * np.nan_to_num(lab[:, OBSERVATIONS.index("Cardiomegaly")]) + 0.05 * noise[:, 1]
    side = np.where(noise[:, 2] < 0.3, "left", np.where(noise[:, 2] < 0.6, "right", None))
    asym = np.where(side == "left", -1.0, 1.0) * (noise[:, 3] - 0.3)
    near = noise[:, 4] < 0.1
    synth = frame("synthetic", pid, [f"syn-{i}" for i in range(n)], feats, prompt_id=pid, kind=["sampled"] * n,
                  paired=np.arange(n) % 3 == 0, **{"label/": lab, "source_label/": lab, "prob/": probs},
                  ctr=ctr, effusion_side=list(side), effusion_asymmetry=asym, near_copy=near)
    rl = (np.random.default_rng(seed + 300).random((n_real, L)) < 0.4).astype(np.float64)
    rn = np.random.default_rng(seed + 400).random((n_real, L))
    real_cols = {"label/": rl, "prob/": rn}
    for k, arm in enumerate(("real", "synthetic", "real_plus_synthetic")):
        real_cols[f"utility/{arm}/prob/"] = np.clip(rn * 0.7 + 0.3 * rl * (k + 1) / 3, 0, 1)
    rid = [f"d{i}" for i in range(n_real)]
    real = frame("real_test", [f"test:{d}" for d in rid], rid,
                 np.random.default_rng(seed + 500).normal(size=(n_real, 6)), **real_cols)
    floor = frame("floor", [f"floor:{i}" for i in range(n_real)], range(n_real),
                  np.random.default_rng(seed + 600).normal(size=(n_real, 6)))
    return [synth, real, floor]


def _items(tmp_path, name: str = "items.parquet", **kw) -> Items:
    p = write_items(tmp_path / name, _table(**kw), {"blank_policy": "negative", "min_count": 5, "prdc_k": 3})
    return read_items(p)


# ----------------------------------------------------------------------------------------------------------------
# the bootstrap itself


def test_bootstrap_reproduces_a_hand_computed_percentile_interval():
    x = np.random.default_rng(7).normal(size=50)
    iv = bootstrap(lambda rows: float(x[rows].mean()), Units([f"{i:03d}" for i in range(50)]), n_boot=400, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, size=(400, 50))  # the documented draw
    reps = x[idx].mean(axis=1)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert iv.value == pytest.approx(x.mean(), abs=1e-15)
    assert iv.lo == pytest.approx(lo, abs=1e-15) and iv.hi == pytest.approx(hi, abs=1e-15)
    assert iv.n == 50 and iv.n_boot == 400 and iv.dropped == 0
    # a t-interval's width agrees with the bootstrap's to within sampling error
    half = 1.96 * x.std(ddof=1) / np.sqrt(50)
    assert (iv.hi - iv.lo) / 2 == pytest.approx(half, rel=0.2)


def test_bootstrap_moves_the_rows_of_a_unit_together():
    # two rows per unit with equal values: a resample of units gives the same mean as a resample of unit means
    vals = np.repeat(np.arange(10.0), 2)
    keys = np.repeat([f"u{i}" for i in range(10)], 2)
    iv = bootstrap(lambda rows: float(vals[rows].mean()), Units(keys), n_boot=300, seed=1)
    idx = np.random.default_rng(1).integers(0, 10, size=(300, 10))
    lo, hi = np.quantile(np.arange(10.0)[idx].mean(axis=1), [0.025, 0.975])
    assert iv.n == 10 and (iv.lo, iv.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_undefined_replicates_are_dropped_and_counted():
    y = np.array([1] + [0] * 9)
    iv = bootstrap(lambda rows: None if y[rows].all() or not y[rows].any() else float(y[rows].mean()),
                   Units(range(10)), n_boot=200, seed=0)
    assert iv.dropped > 0 and iv.n_boot + iv.dropped == 200


def test_paired_difference_cancels_what_runs_share():
    x = np.random.default_rng(0).normal(size=40)
    u = Units([f"{i:03d}" for i in range(40)])
    same = paired_difference(lambda r: float(x[r].mean()), u, lambda r: float(x[r].mean()), u, n_boot=200, seed=0)
    assert same.value == 0.0 and same.lo == 0.0 and same.hi == 0.0 and not same.excludes_zero
    shifted = paired_difference(lambda r: float(x[r].mean()), u, lambda r: float(x[r].mean() + 0.1), u,
                                n_boot=200, seed=0)
    assert shifted.value == pytest.approx(0.1) and shifted.lo == pytest.approx(0.1) and shifted.excludes_zero
    # unpaired, the same shift drowns in the spread of two independent resamples
    loose = unpaired_difference(lambda r: float(x[r].mean()), u, lambda r: float(x[r].mean() + 0.1), u,
                                n_boot=200, seed=0)
    assert loose.value == pytest.approx(0.1) and loose.lo < 0 < loose.hi
    with pytest.raises(ValueError, match="same units"):
        paired_difference(lambda r: 0.0, u, lambda r: 0.0, Units(range(39)), n_boot=10, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# the per-item table and the headline statistics


def test_items_round_trip_and_bad_files(tmp_path):
    it = _items(tmp_path)
    assert set(it.df.role) == {"synthetic", "real_test", "floor"} and it.meta["prdc_k"] == 3
    assert it.features("synthetic").dtype == np.float32 and it.features("synthetic").shape == (160, 6)
    again = read_items((tmp_path / "items.parquet").read_bytes(), "bytes")
    pd.testing.assert_frame_equal(it.df.drop(columns="feature"), again.df.drop(columns="feature"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ItemsError, match="junk.parquet: not a readable"):
        read_items(tmp_path / "junk.parquet")
    pd.DataFrame({"role": ["synthetic"], "unit": ["a"], "item_id": ["a"]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ItemsError, match="no cxrsynth metadata"):
        read_items(tmp_path / "plain.parquet")


def test_headlines_recompute_known_values(tmp_path):
    from cxrsynth.eval.metrics import _auroc_rows

    it = _items(tmp_path)
    res = headlines.intervals(it, n_boot=50, seed=0)
    s = it.role("synthetic")
    # semantic macro AUROC by hand: labels with >= 5 positives and negatives, blank column 0 left out
    vals = []
    for o in OBSERVATIONS[1:]:
        y, p = s[f"label/{o}"].to_numpy() == 1, s[f"prob/{o}"].to_numpy()
        if 5 <= y.sum() <= len(y) - 5:
            vals.append(_auroc_rows(y[None], p[None])[0])
    assert res["semantic_auroc"].value == pytest.approx(np.mean(vals), abs=1e-12)
    assert res["semantic_auroc"].n == 80  # prompts, not images
    assert res["paired_auroc"].n == s[s.paired].unit.nunique() < 80  # only the prompts made from a real report
    assert res["effusion_side"].n == s[s.effusion_side.isin(["left", "right"])].unit.nunique() < 80
    assert res["near_copy_rate"].value == pytest.approx(s.near_copy.mean())
    side = s.effusion_side.to_numpy(object)
    ok = np.array([v in ("left", "right") for v in side])
    hit = np.sign(s.effusion_asymmetry.to_numpy()[ok]) == np.where(side[ok] == "left", -1, 1)
    assert res["effusion_side"].value == pytest.approx(hit.mean())
    assert res["fid"].value > 0 and res["fid_codebook"].value is None  # no ceiling rows: undefined, not zero
    for name in ("semantic_auroc", "fid", "precision", "utility_gain", "ctr_auroc"):
        r = res[name]
        assert r.lo <= r.value <= r.hi, name
    summ = headlines.summary(res)
    assert summ["semantic_auroc"]["ci"].startswith(f"{res['semantic_auroc'].value:.3g} [")
    assert summ["fid_codebook"]["ci"] == "n/a n=0"


# ----------------------------------------------------------------------------------------------------------------
# comparing runs


def test_a_run_compared_with_itself_differs_by_exactly_zero(tmp_path):
    it = _items(tmp_path)
    rows = compare_runs([it, it], n_boot=40, seed=0)
    defined = [r for r in rows if r.values[0].value is not None]
    assert len(defined) >= 12
    for r in defined:
        d = r.diffs[0]
        assert r.pairing == ["paired"], r.headline.name
        assert d.value == 0.0 and d.lo == 0.0 and d.hi == 0.0 and not d.excludes_zero, r.headline.name
    assert "*" not in markdown(["a", "b"], rows).split("Values:")[0]


def test_a_planted_shift_is_detected_with_its_sign(tmp_path):
    base = _items(tmp_path, "a.parquet", signal=0.2)
    better = _items(tmp_path, "b.parquet", signal=0.6)  # same prompts, the asked labels' probabilities raised
    rows = {r.headline.name: r for r in compare_runs([base, better], n_boot=200, seed=0,
                                                     names=("semantic_auroc", "near_copy_rate"))}
    sem = rows["semantic_auroc"]
    assert sem.pairing == ["paired"] and sem.diffs[0].value > 0 and sem.diffs[0].lo > 0
    assert rows["near_copy_rate"].diffs[0].value == 0.0  # untouched by the planted change
    worse = compare_runs([better, base], n_boot=200, seed=0, names=("semantic_auroc",))[0]
    assert worse.diffs[0].value == pytest.approx(-sem.diffs[0].value) and worse.diffs[0].hi < 0
    table = markdown(["base", "better"], list(rows.values()))
    line = next(x for x in table.splitlines() if x.startswith("| semantic_auroc"))
    assert "*" in line and "(paired)" in line


def test_runs_on_different_prompts_are_compared_unpaired(tmp_path):
    a = _items(tmp_path, "a.parquet")
    b = _items(tmp_path, "b.parquet", prompt_prefix="q", seed=1)
    rows = {r.headline.name: r for r in compare_runs([a, b], n_boot=50, seed=0,
                                                     names=("semantic_auroc", "utility_gain"))}
    assert rows["semantic_auroc"].pairing == ["unpaired"]
    assert rows["utility_gain"].pairing == ["paired"]  # both score the same real test images
    half = _items(tmp_path, "c.parquet", n_prompts=40)  # a subset of a's prompts
    rows = {r.headline.name: r for r in compare_runs([a, half], n_boot=20, seed=0, names=("semantic_auroc",))}
    assert rows["semantic_auroc"].pairing == ["paired on 40 of 80"]


def test_missing_runs_and_tables_are_one_line_errors(tmp_path, capsys, monkeypatch):
    with pytest.raises(CompareError, match="run 'workspace': .*missing"):
        load_run("workspace", "data/evaluation/items.parquet", repo=str(tmp_path))
    with pytest.raises(CompareError, match="at least two runs"):
        compare_runs([_items(tmp_path)])
    monkeypatch.chdir(tmp_path)
    write_items(tmp_path / "data" / "evaluation" / "items.parquet", _table(), {"min_count": 5})
    code = main(["compare", "workspace", "no-such-rev", "--n-boot", "10"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: run 'no-such-rev'"), err
    code = main(["compare", "workspace", "workspace", "--n-boot", "-1"])
    assert code == 2 and "--n-boot" in capsys.readouterr().err
    out = tmp_path / "cmp.md"
    assert main(["compare", "workspace", "workspace", "--n-boot", "20", "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out and "| semantic_auroc" in out.read_text()


def test_ablation_seed_table_gives_mean_and_spread_over_seeds(tmp_path):
    from bench.ablations import seed_table

    runs = {"a": [_items(tmp_path, f"a{s}.parquet", seed=s, signal=0.1) for s in range(2)],
            "c": [_items(tmp_path, f"c{s}.parquet", seed=s, signal=0.5) for s in range(2)]}
    text = seed_table(runs, n_boot=20)
    vals = [headlines.intervals(it, n_boot=0, seed=0, names=("semantic_auroc",))["semantic_auroc"].value
            for it in runs["c"]]
    row = next(x for x in text.splitlines() if x.startswith("| semantic_auroc |"))
    assert f"{np.mean(vals):.4g} ± {np.std(vals, ddof=1):.3g}" in row.split("|")[4]
    assert "(k=2)" in text.splitlines()[0]


def test_set_statistics_are_recentred_and_fast_fid_equals_the_closed_form(tmp_path):
    from cxrsynth.eval.metrics import frechet_distance, gaussian_stats

    it = _items(tmp_path)
    fake, real = it.features("synthetic"), it.features("real_test")
    fid = headlines.BY_NAME["fid"].make(it)
    rows = np.random.default_rng(0).integers(0, len(fake), len(fake))
    want = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake[rows]))
    assert fid(rows) == pytest.approx(want, rel=1e-9)
    res = headlines.intervals(it, n_boot=100, seed=0)
    for name in ("fid", "kid", "precision", "recall", "density", "coverage"):
        r = res[name]
        assert r.lo <= r.value <= r.hi, (name, r)
    # without re-centring FID's replicates sit above the value (duplicates shrink the synthetic set)
    raw = bootstrap(fid, headlines.units_of(it, "synthetic"), n_boot=100, seed=0)
    assert raw.lo > r.lo or raw.lo > res["fid"].lo
    assert np.median([fid(np.random.default_rng(s).integers(0, 160, 160)) for s in range(20)]) > res["fid"].value


def test_set_statistics_on_partly_shared_units_are_unpaired(tmp_path):
    a = _items(tmp_path, "a.parquet")
    half = _items(tmp_path, "c.parquet", n_prompts=40)
    rows = {r.headline.name: r for r in compare_runs([a, half], n_boot=10, seed=0, names=("fid", "fid_floor"))}
    assert rows["fid"].pairing == ["unpaired"]
    assert rows["fid_floor"].pairing == ["paired"]  # the same real reference rows in both
