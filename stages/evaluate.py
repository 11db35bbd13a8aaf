"""Stage `evaluate`: score the synthetic images (fidelity, semantic consistency, alignment, utility, privacy and, on
the phantom, geometry) against the real data and the reference floors.

Reads: params.yaml (base, paths, classifier, evaluate), `<synthetic>/` (manifest.parquet, images.npy, tokens.npy if
present), `<interim>/` (real images and manifest), `<tokens>/` (real test token grids), `<models>/classifier`,
`<models>/vqgan`, `<models>/align`, `<phantom>/ground_truth.jsonl` (phantom only).
Writes: `<evaluation>/items.parquet` (the per-item table, `cxrsynth.eval.items`), `<metrics>/evaluate.json` (one
number per stable key, headline numbers with `/lo`, `/hi`, `/n`; see README "Stage evaluate"),
`<metrics>/summary.json` (the headline numbers that say whether a run is better, `cxrsynth.eval.headlines`) and the PNGs
`<metrics>/evaluate_roc.png`, `evaluate_samples.png`, `evaluate_label_examples.png`, `evaluate_closest_pairs.png`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cxrsynth.config import stage_params
from cxrsynth.eval import headlines
from cxrsynth.eval.items import ITEMS_FILE, read_items
from cxrsynth.evaluate import Pictures, evaluate_all
from cxrsynth.io import write_json
from cxrsynth.train import pick_device


def main() -> None:
    params = stage_params()
    paths = params.paths
    t0 = time.perf_counter()
    device = pick_device(params.base.device)
    items = Path(paths.evaluation) / ITEMS_FILE
    metrics = evaluate_all(params.evaluate, params.classifier, synthetic_dir=paths.synthetic, interim=paths.interim,
                           tokens_dir=paths.tokens, models=paths.models, phantom=paths.phantom,
                           pictures=Pictures.under(paths.metrics), seed=params.base.seed, device=device.type,
                           items_path=items)
    metrics, summary = headlines.with_intervals(metrics, read_items(items), n_boot=params.evaluate.bootstrap,
                                                seed=params.base.seed)
    synth = Path(paths.metrics) / "synthesize.json"
    summary["synthesis_images_per_second"] = json.loads(synth.read_text()).get("images_per_second") \
        if synth.is_file() else None
    summary["n_synthetic"] = metrics["n_synthetic"]
    write_json(Path(paths.metrics) / "evaluate.json", metrics)
    write_json(Path(paths.metrics) / "summary.json", summary)
    print(f"evaluate: FID {metrics.get('fidelity/classifier/fid')} (floor {metrics.get('floor/classifier/fid')}), "
          f"semantic macro AUROC {metrics.get('semantic/macro_auroc')}, alignment gap {metrics.get('alignment/gap')}, "
          f"utility synthetic-only {metrics.get('utility/synthetic/macro_auroc')} vs real "
          f"{metrics.get('utility/real/macro_auroc')}, near copies {metrics.get('privacy/near_copy_rate')} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
