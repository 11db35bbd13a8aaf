"""Stage `classifier`: train the chest X-ray classifier (semantic judge, default FID feature space) and measure it.

Reads: params.yaml (base, paths.interim, paths.models, paths.metrics, classifier), `<interim>/manifest.parquet` and
`<interim>/images_{train,validate,test}.npy`.
Writes:
- `<models>/classifier/` (config.json + model.safetensors: the model selected on validate by macro AUROC);
- `<models>/classifier_checkpoints/` (resume state; persistent, so a killed run restarts from its last checkpoint);
- `<metrics>/classifier.json`: per-label test AUROC with bootstrap CI, positives and negatives, macro AUROC over
  labels with >= min_count positives and negatives, training time and steps, and the reference floor (real test
  vs real train FID / KID / PRDC in the classifier's feature space, under `floor/`, with the extractor's name);
- `<metrics>/classifier_roc.png` (test ROC curves) and dvclive training curves in `classifier.live_dir`.
"""
from __future__ import annotations
from cxrsynth.stages import check_outputs
from cxrsynth.data.arrays import split_rows

from pathlib import Path

import numpy as np
import pandas as pd

from cxrsynth.config import stage_params
from cxrsynth.data.arrays import split_images
from cxrsynth.eval.features import extract
from cxrsynth.eval.metrics import fidelity
from cxrsynth.io import write_json
from cxrsynth.models.classifier import fit, save_roc_png, split_report
from cxrsynth.data.arrays import LabeledImages
from cxrsynth.text.chexpert import OBSERVATIONS


def load_labeled(interim: str | Path, split: str) -> LabeledImages:
    """A split's uint8 images (read per batch from the file) and its 14 CheXpert label columns, row-aligned via manifest.image_row."""
    manifest = pd.read_parquet(Path(interim) / "manifest.parquet", columns=["split", "image_row", *OBSERVATIONS])
    images = split_images(interim, split)  # read per batch, never whole
    rows = split_rows(manifest, split, len(images), f"{interim}/images_{split}.npy")
    labels = rows[list(OBSERVATIONS)].to_numpy(dtype=np.float64)
    return LabeledImages(images, labels)


def main() -> None:
    params = stage_params()
    check_outputs(params, "classifier")
    p, paths = params.classifier, params.paths
    data = {s: load_labeled(paths.interim, s) for s in ("train", "validate", "test")}
    model, result = fit(p, data["train"], data["validate"], seed=params.base.seed, device=params.base.device,
                        out_dir=Path(paths.models) / "classifier_checkpoints", live_dir=p.live_dir)
    trained_on = str(model.device)
    model = model.cpu()
    model.save(Path(paths.models) / "classifier")

    report, per, probs = split_report(model, data["test"], blank=p.blank_policy, min_count=p.min_count,
                                     n_boot=p.bootstrap, seed=params.base.seed)
    save_roc_png(Path(paths.metrics) / "classifier_roc.png", data["test"], probs, model.labels, per, p.blank_policy,
                 title=f"classifier, test split: macro AUROC {report['macro_auroc']} "
                       f"over {report['macro_auroc_labels']} labels", min_count=p.min_count)

    # the reference floor: what "as good as real" scores, in this classifier's feature space
    extractor = model.feature_extractor()
    real_train = extract(extractor, data["train"].images)
    real_test = extract(extractor, data["test"].images)
    floor = fidelity(real_train, real_test, k=p.prdc_k, kid_subsets=p.kid_subsets, kid_subset_size=p.kid_subset_size,
                     seed=params.base.seed)

    metrics = {**report, **{f"floor/{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in floor.items()},
               "extractor": extractor.name, "num_features": model.num_features,
               "train_seconds": round(result.total_seconds, 1), "resumed_from_step": result.resumed_from,
               "steps": result.step, "epochs": p.epochs, "device": trained_on,
               "best_step": result.best_step, "val_macro_auroc": round(result.best_metric, 4)
               if result.best_metric is not None else None,
               "n_train": len(data["train"].images), "n_validate": len(data["validate"].images),
               "n_test": len(data["test"].images)}
    write_json(Path(paths.metrics) / "classifier.json", metrics)
    print(f"classifier: test macro AUROC {report['macro_auroc']} over {report['macro_auroc_labels']} labels, "
          f"floor FID {floor['fid']:.3f} ({extractor.name}), trained in {result.total_seconds:.0f} s")

