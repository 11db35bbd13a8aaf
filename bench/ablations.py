"""The ablation tables of `bench/ablations.sh`: each arm run under several seeds (`base.seed` 0..k-1) as DVC
experiments, read through `python -m cxrsynth compare`'s loader (each experiment's per-item table, nothing re-run).

    python -m bench.ablations --arm a=abl-a-s0,abl-a-s1 --arm b=... --arm c=... > bench/ablations.md
    python -m bench.ablations --json bench/ablations/a.json bench/ablations/c.json   # one seed, evaluate.json copies

Tables: (1) per arm, every headline's mean and standard deviation over the seeds (the retraining / resampling noise
the bootstrap intervals do not see) with the per-seed bootstrap half-widths; (2) per seed, the compare table: arm (c)
first, the other arms' paired differences to it (paired where the arms share prompts: (a) and (c) at one seed;
(b) draws its prompts from the test reports, so its semantic rows are unpaired), `*` where the 95% interval excludes
0; (3) the evaluate.json table of the last seed.

Arms (issue 9): (a) no key patches (`generator.key_patches=0`), (b) original test reports instead of
anatomy-pathology prompts (`synthesize.prompt_source=reports`), (c) both modules on (the defaults). The last
column is the real-data reference of arm (c)'s run (the same extractor, images, classifier and alignment model).
Reads only the JSON files named; writes markdown to stdout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ARMS = {"a": "(a) no key patches", "b": "(b) original reports", "c": "(c) both modules"}
# (label, key in each arm, key of the real-data reference in arm c or None, direction: + higher is better)
ROWS = [
    ("images", "n_synthetic", "n_real_test", ""),
    ("FID (classifier features) vs real test", "fidelity/classifier/fid", "floor/classifier/fid", "-"),
    ("KID (mean over subsets)", "fidelity/classifier/kid_mean", "floor/classifier/kid_mean", "-"),
    ("precision", "fidelity/classifier/precision", "floor/classifier/precision", "+"),
    ("recall", "fidelity/classifier/recall", "floor/classifier/recall", "+"),
    ("density", "fidelity/classifier/density", "floor/classifier/density", "+"),
    ("coverage", "fidelity/classifier/coverage", "floor/classifier/coverage", "+"),
    ("FID of VQ-GAN reconstructions (codebook ceiling)", "codebook_floor/classifier/fid", None, "-"),
    ("semantic macro AUROC (prompt labels)", "semantic/macro_auroc", None, "+"),
    ("paired macro AUROC (real image's labels)", "paired/macro_auroc", "paired/real_macro_auroc", "+"),
    ("paired agreement (mean r, synthetic vs real)", "paired/agreement_corr", None, "+"),
    ("alignment: matched", "alignment/matched_mean", "alignment/real/matched_mean", "+"),
    ("alignment: gap over shuffled", "alignment/gap", "alignment/real/gap", "+"),
    ("alignment: win rate", "alignment/win_rate", "alignment/real/win_rate", "+"),
    ("utility: synthetic-only classifier, macro AUROC", "utility/synthetic/macro_auroc", "utility/real/macro_auroc",
     "+"),
    ("utility: real + synthetic, macro AUROC", "utility/real_plus_synthetic/macro_auroc", "utility/real/macro_auroc",
     "+"),
    ("utility: real + synthetic, rare-label AUROC", "utility/real_plus_synthetic/rare_macro_auroc",
     "utility/real/rare_macro_auroc", "+"),
    ("privacy: near-copy rate (expected ~0.05-0.10)", "privacy/near_copy_rate", "privacy/expected_near_copy_rate",
     "-"),
    ("privacy: median NN distance (features)", "privacy/median_nn_feature", "privacy/reference_median_nn_feature", ""),
    ("phantom: CTR AUROC, cardiomegaly asked vs not", "phantom/ctr_auroc", "phantom/real/ctr_auroc", "+"),
    ("phantom: CTR > 0.5 when cardiomegaly asked", "phantom/ctr_enlarged_rate_asked",
     "phantom/real/ctr_enlarged_rate_asked", "+"),
    ("phantom: CTR > 0.5 when not asked", "phantom/ctr_enlarged_rate_not_asked",
     "phantom/real/ctr_enlarged_rate_not_asked", "-"),
    ("phantom: effusion on the asked side", "phantom/effusion_side_accuracy", "phantom/real/effusion_side_accuracy",
     "+"),
]


def fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if "kid_mean" in key else f"{v:.3f}"
    return str(v)


def table(metrics: dict[str, dict]) -> str:
    """Markdown table: rows = ROWS, columns = the arms present (a, b, c order) and the reference from arm c."""
    arms = [a for a in ARMS if a in metrics]
    ref = metrics.get("c") or metrics[arms[-1]]
    lines = ["| metric | " + " | ".join(ARMS[a] for a in arms) + " | real-data reference |",
             "|---|" + "---:|" * (len(arms) + 1)]
    for label, key, ref_key, direction in ROWS:
        arrow = {"+": " (higher better)", "-": " (lower better)"}.get(direction, "")
        cells = [fmt(key, metrics[a].get(key)) for a in arms]
        reference = fmt(ref_key, ref.get(ref_key)) if ref_key else ""
        lines.append(f"| {label}{arrow} | " + " | ".join(cells) + f" | {reference} |")
    rare = ref.get("utility/rare_labels")
    notes = [f"Rare labels (fewest real training positives): {rare}." if rare else "",
             f"Feature extractor: {ref.get('fidelity/classifier/extractor')}; images compared at "
             f"{ref.get('compare_size')} px; reference floor = real train (subsampled to the synthetic count) vs "
             "real test."]
    skipped = sorted({f"{k.split('/', 1)[1]}: {v}" for m in metrics.values() for k, v in m.items()
                      if k.startswith("skipped/")})
    if skipped:
        notes.append("Skipped: " + "; ".join(skipped) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(n for n in notes if n) + "\n"


def seed_table(runs: dict, *, n_boot: int, seed: int = 0) -> str:
    """Per arm: each headline's mean and SD over seeds (`runs[arm]` = one per-item table per seed)."""
    import numpy as np

    from cxrsynth.eval.headlines import HEADLINES, intervals

    arms = [a for a in ARMS if a in runs]
    res = {a: [intervals(it, n_boot=n_boot, seed=seed) for it in runs[a]] for a in arms}
    lines = ["| metric | better | " + " | ".join(f"{ARMS[a]} (k={len(runs[a])})" for a in arms) + " |",
             "|---|---|" + "---:|" * len(arms)]
    for h in HEADLINES:
        cells = []
        for a in arms:
            vals = [r[h.name].value for r in res[a] if r[h.name].value is not None]
            halves = [(r[h.name].hi - r[h.name].lo) / 2 for r in res[a] if r[h.name].lo is not None]
            if not vals:
                cells.append("n/a")
                continue
            sd = f" ± {np.std(vals, ddof=1):.3g}" if len(vals) > 1 else ""
            half = f" (CI ±{np.mean(halves):.2g})" if halves else ""
            cells.append(f"{np.mean(vals):.4g}{sd}{half}")
        lines.append(f"| {h.name} | {h.better} | " + " | ".join(cells) + " |")
    lines += ["", "Mean ± SD over the seeds (k runs per arm, `base.seed` 0..k-1: everything from the phantom's prompts "
                  "to the generator retrained); CI: the mean bootstrap 95% half-width of one run."]
    return "\n".join(lines) + "\n"


def pooled_table(per_seed: list[list], arms: list[str]) -> str:
    """Arm (c) minus each other arm, over seeds: per headline the mean of the per-seed point differences (sign
    turned so that + means (c) is better), a t interval over the seeds (k - 1 degrees of freedom: the training noise
    the per-seed bootstrap does not see, as far as k seeds can show it) and how many seeds' own 95% bootstrap
    interval puts (c) ahead. `per_seed[s]` is `compare_runs`' rows at seed s with arm (c) first, then `arms`."""
    import numpy as np
    from scipy import stats

    k = len(per_seed)
    head = ["metric", "better"] + [f"(c) - {ARMS[a].split(' ', 1)[0]}" for a in arms]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(per_seed[0]):
        h = row.headline
        if h.better not in ("higher", "lower"):
            continue
        sign = 1.0 if h.better == "higher" else -1.0
        cells = []
        for j in range(len(arms)):
            diffs = [rows[i].diffs[j] for rows in per_seed]
            d = [-sign * x.value for x in diffs if x is not None and x.value is not None]
            if not d:
                cells.append("n/a")
                continue
            mean = float(np.mean(d))
            if len(d) > 1:
                half = float(stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / np.sqrt(len(d)))
                ci = f" [{mean - half:+.3g}, {mean + half:+.3g}]" + (" *" if mean - half > 0 or mean + half < 0
                                                                    else "")
            else:
                ci = ""
            # (c) ahead at a seed: its paired interval of (other - c) lies wholly on the side where c is better
            ahead = sum(1 for x in diffs if x is not None and x.lo is not None
                        and (x.hi < 0 if sign > 0 else x.lo > 0))
            cells.append(f"{mean:+.3g}{ci}; ahead {ahead}/{k}")
        lines.append(f"| {h.name} | {h.better} | " + " | ".join(cells) + " |")
    lines += ["", f"Per contrast: the mean over {k} seeds of (c)'s advantage (+ = (c) better, whichever way the "
                  "headline runs) [95% t interval over seeds; `*`: it excludes 0]; ahead m/k: the seeds at which "
                  "(c)'s paired (or, for (b)'s prompt-level rows, unpaired) bootstrap interval lies wholly on its "
                  "better side."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.ablations", description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", default=[], metavar="ARM=RUN[,RUN...]",
                    help="an arm (a, b, c) and its runs, one per seed (dvc exp names, revisions or 'workspace')")
    ap.add_argument("--json", nargs="*", default=None, metavar="ARM.json",
                    help="one-seed mode: evaluate.json copies named after their arm")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--items", default=None, help="per-item table path (default: from params.yaml)")
    args = ap.parse_args(argv)
    if args.json is not None:
        metrics = {}
        for p in map(Path, args.json):
            if p.stem not in ARMS:
                raise SystemExit(f"{p}: name the file after its arm (a.json, b.json or c.json)")
            metrics[p.stem] = json.loads(p.read_text(encoding="utf-8"))
        sys.stdout.write(table(metrics))
        return
    from cxrsynth.compare import CompareError, compare_runs, default_items_path, load_run, markdown

    runs: dict[str, list[str]] = {}
    for spec in args.arm:
        arm, _, revs = spec.partition("=")
        if arm not in ARMS or not revs:
            raise SystemExit(f"--arm: expected a=RUN[,RUN...] with arm a, b or c, got {spec!r}")
        runs[arm] = [r for r in revs.split(",") if r]
    if not runs:
        raise SystemExit("--arm: at least one arm")
    k = {len(v) for v in runs.values()}
    if len(k) != 1:
        raise SystemExit(f"--arm: every arm needs the same number of seeds, got {sorted(k)}")
    path = args.items or default_items_path()
    try:
        items = {a: [load_run(r, path) for r in revs] for a, revs in runs.items()}
    except CompareError as e:
        raise SystemExit(f"error: {e}") from None
    order = [a for a in ("c", "a", "b") if a in runs]
    out = ["## Over seeds", "", seed_table(items, n_boot=args.n_boot)]
    per_seed, seeds_out = [], []
    for s in range(k.pop()):
        names = [ARMS[a].split(" ", 1)[0] for a in order]
        rows = compare_runs([items[a][s] for a in order], n_boot=args.n_boot, seed=s) if len(order) > 1 else None
        per_seed.append(rows)
        seeds_out += [f"## Seed {s}: differences to arm (c)", "",
                      "Runs: " + ", ".join(f"{ARMS[a]} = `{runs[a][s]}`" for a in order) + ".", "",
                      markdown(names, rows) if rows is not None
                      else seed_table({order[0]: [items[order[0]][s]]}, n_boot=args.n_boot)]
    if len(order) > 1 and "c" in runs:
        out += ["## Does arm (c) beat the others? Pooled over seeds", "", pooled_table(per_seed, order[1:])]
    sys.stdout.write("\n".join(out + seeds_out))


if __name__ == "__main__":
    main(sys.argv[1:])
