"""The tables of `bench/conditioning.sh`: each lever's run (a DVC experiment) read through `python -m cxrsynth
compare`'s loader (its per-item table; nothing re-run), the issue's target numbers with bootstrap 95% intervals,
and each lever's difference to the baseline (paired: every lever synthesizes the same prompts at the same seed).

    python -m bench.conditioning base=cond-base-... codes_image=cond-codes_image-... [...]
    python -m bench.conditioning --n-boot 1000 base=workspace ...

The first run is the baseline. Next to each run the copies the script kept (bench/conditioning/<lever>.json,
.generator.json, .run.json) give the generator's validation loss and the run's wall time. Writes markdown to
stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxrsynth.compare import compare_runs, default_items_path, load_run

# (headline, target as the issue states it, shown as)
TARGETS = [
    ("semantic_auroc", ">= 0.80", "semantic AUROC"),
    ("paired_auroc", ">= 0.85", "paired AUROC"),
    ("ctr_auroc", ">= 0.80", "CTR AUROC"),
    ("effusion_side", ">= 0.80", "effusion side"),
    ("semantic_auroc_pneumothorax", ">= 0.75", "pneumothorax"),
    ("semantic_auroc_lung_lesion", ">= 0.70", "lung lesion"),
    ("fid", "<= 2x ceiling", "FID"),
    ("fid_codebook", "", "codebook ceiling"),
    ("precision", ">= base", "precision"),
    ("recall", ">= base", "recall"),
]
KEPT = Path("bench/conditioning")


def _cell(v) -> str:
    if v is None or v.value is None:
        return "n/a"
    digits = 3 if abs(v.value) < 10 else 1
    return f"{v.value:.{digits}f} [{v.lo:.{digits}f}, {v.hi:.{digits}f}]"


def _diff(d) -> str:
    if d is None or d.value is None:
        return "n/a"
    digits = 3 if max(abs(d.lo), abs(d.hi)) < 10 else 1
    return f"{d.value:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}]{' *' if d.excludes_zero else ''}"


def _kept(lever: str) -> tuple[str, str]:
    try:
        gen = json.loads((KEPT / f"{lever}.generator.json").read_text())
        run = json.loads((KEPT / f"{lever}.run.json").read_text())
        return f"{gen.get('val_loss')}", f"{run.get('seconds')}"
    except (OSError, ValueError):
        return "n/a", "n/a"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="lever=run (a dvc exp name, a git revision or workspace)")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args(argv)
    pairs = [r.split("=", 1) for r in args.runs]
    if any(len(p) != 2 for p in pairs) or len(pairs) < 2:
        raise SystemExit("expected at least two lever=run arguments")
    levers = [p[0] for p in pairs]
    items = [load_run(p[1], default_items_path()) for p in pairs]
    names = [t[0] for t in TARGETS]
    rows = {r.headline.name: r for r in compare_runs(items, n_boot=args.n_boot, seed=0, names=names)}
    shown = [t for t in TARGETS if t[0] in rows]
    print("Each number: the headline on all items [bootstrap 95% percentile interval] (n in the compare output; "
          "`python -m cxrsynth compare` gives the same numbers). Targets from issue 21.\n")
    head = ["lever", "generator val loss", "run s"] + [t[2] for t in shown]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| target | | | " + " | ".join(t[1] for t in shown) + " |")
    for i, lever in enumerate(levers):
        loss, secs = _kept(lever)
        print(f"| {lever} | {loss} | {secs} | " + " | ".join(_cell(rows[t[0]].values[i]) for t in shown) + " |")
    print(f"\nDifferences to `{levers[0]}` (lever minus baseline, paired bootstrap over the shared prompts; `*`: the "
          "95% interval excludes 0):\n")
    head = ["lever"] + [t[2] for t in shown]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, lever in enumerate(levers[1:]):
        print(f"| {lever} | " + " | ".join(_diff(rows[t[0]].diffs[i]) for t in shown) + " |")
    n = {t[0]: rows[t[0]].values[0].n for t in shown}
    print("\nResampling units of the baseline: " + ", ".join(f"{t[2]} n={n[t[0]]}" for t in shown) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
