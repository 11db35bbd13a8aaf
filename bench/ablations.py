"""The ablation table: one column per arm of `bench/ablations.sh`, read from the arms' `evaluate.json` copies.

    python -m bench.ablations bench/ablations/a.json bench/ablations/b.json bench/ablations/c.json > bench/ablations.md

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


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m bench.ablations ARM.json ... (file stems a, b, c name the arms)")
    metrics = {}
    for p in map(Path, argv):
        if p.stem not in ARMS:
            raise SystemExit(f"{p}: name the file after its arm (a.json, b.json or c.json)")
        metrics[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    sys.stdout.write(table(metrics))


if __name__ == "__main__":
    main(sys.argv[1:])
