"""Stage `evaluate`: score the synthetic images (fidelity, semantic consistency, alignment, utility, privacy and, on
the phantom, geometry) against the real data and the reference floors.

Reads: params.yaml (base, paths, classifier, evaluate), `<synthetic>/` (manifest.parquet, images.npy, tokens.npy if
present), `<interim>/` (real images and manifest), `<tokens>/` (real test token grids), `<models>/classifier`,
`<models>/vqgan`, `<models>/align`, `<phantom>/ground_truth.jsonl` (phantom only).
Writes: `<evaluation>/items.parquet` (the per-item table, `cxrsynth.eval.items`), `<metrics>/evaluate.json` (one
number per stable key, headline numbers with `/lo`, `/hi`, `/n`; see README "Stage evaluate"),
`<metrics>/summary.json` (the headline numbers that say whether a run is better, `cxrsynth.eval.headlines`) and the PNGs
`<metrics>/evaluate_roc.png`, `evaluate_samples.png`, `evaluate_label_examples.png`, `evaluate_closest_pairs.png`.

In detail: it scores fidelity, semantic consistency, alignment, utility and privacy (CheXGenBench's three axes plus
the paper's claim) and, on the phantom, checks the findings against the phantom's known geometry.

Every metric block is a pure function over arrays (images, labels, probabilities, features) that returns a flat dict
of stable keys (`block/name`, `None` where a number cannot be computed, so `dvc metrics diff` always lines the keys
up); `evaluate_all` loads the inputs, runs the blocks and draws the pictures.

Conventions:
- Resolution: synthetic images come out of the VQ-GAN at its side (64 px on the phantom); real images are stored
  larger. Every comparison resizes the real images to `compare_size` (default: the synthetic side) first, with the
  project's one resize (`cxrsynth.images.resize`, antialiased), so the resolution gap itself is not scored
  as infidelity. The reference floor (real train vs real test) is computed here on exactly those images with the same
  extractor and, by default, with the train set subsampled to the synthetic set's size (FID is biased by N).
- Labels: a prompt's 14 CheXpert columns (1 / 0 / -1 / blank) are the targets of the semantic AUROC, scored with the
  classifier's own rule (`eval_targets`: uncertain excluded; blank = not asked = negative unless the classifier's
  `blank_policy` says ignore).
- Paired rows: synthetic images whose prompt came from a real test report (`source_dicom_id` set: kind paired or
  report) are also scored against that real image's labels, and the classifier's outputs on the two images are
  compared.
- Utility: three classifiers with identical params and budget (`utility_epochs`, `utility_input_size`), selected on
  the real validate split and tested on the real test split: real only, synthetic only, real + synthetic.

Reads (via `evaluate_all`): the synthetic folder (`manifest.parquet`, `images.npy`, optional `tokens.npy`), the
interim images and manifest, the token store (real test grids), the classifier, VQ-GAN and alignment model folders,
the phantom's `ground_truth.jsonl` (when present). Writes: the PNGs named in `Pictures`; the caller writes the metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrsynth.stages import check_outputs
from cxrsynth.config import ClassifierParams, EvaluateParams, stage_params
from cxrsynth.data.arrays import Concat, LabeledImages, RealSplit, iter_chunks, load_real
from cxrsynth.data.phantom.truth import TRUTH_FILE, truth_by_image
from cxrsynth.data.synthetic import SyntheticSet, load_synthetic
from cxrsynth.eval import headlines
from cxrsynth.eval.features import FeatureExtractor, Features, Resized, TorchScriptFeatures, extract
from cxrsynth.eval.geometry import geometry_block, measure_geometry, one_sided_effusion
from cxrsynth.eval.items import ITEMS_FILE, frame, read_items, write_items
from cxrsynth.eval.metrics import (Memorization, closest_pairs_grid, fidelity, macro_auroc, nearest, per_label_auroc,
                                   pixel_vectors, same_extractor)
from cxrsynth.eval.pictures import Pictures, label_examples_grid, sample_grid
from cxrsynth.images import resize, to_image_tensor
from cxrsynth.io import json_number, write_json
from cxrsynth.models.classifier import Classifier, fit, save_roc_png
from cxrsynth.text.chexpert import eval_targets
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.train import pick_device


def main() -> None:
    params = stage_params()
    check_outputs(params, "evaluate")
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



def to_size(images: np.ndarray, size: int, batch: int = 256) -> np.ndarray:
    """uint8 / [0, 1] images N x H x W -> float32 N x size x size in [0, 1] (the project's antialiased resize), in
    memory: for small sets only (whole splits go through the lazy `cxrsynth.data.arrays.Resized`, same values)."""
    out = [resize(to_image_tensor(images[i:i + batch]), size)[:, 0].clamp(0.0, 1.0).numpy()
           for i in range(0, len(images), batch)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, size, size), np.float32)


def counterparts(synthetic: pd.DataFrame, real_test: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(synthetic row indices, real test image rows) of the synthetic images made from a real test report whose
    image is in the test split (matched by `source_dicom_id`)."""
    where = {str(d): int(r) for d, r in zip(real_test.dicom_id, real_test.image_row)}
    pairs = [(i, where[str(d)]) for i, d in enumerate(synthetic.source_dicom_id)
             if isinstance(d, str) and str(d) in where]
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int)
    a, b = zip(*pairs)
    return np.asarray(a, int), np.asarray(b, int)


def fidelity_block(real_test: Features, candidates: dict[str, Features], *, k: int, kid_subsets: int,
                   kid_subset_size: int, seed: int, tag: str) -> dict:
    """FID, KID, precision/recall/density/coverage of each candidate set against the real test features.

    `candidates` maps a block name (e.g. `fidelity`, `floor`, `codebook_floor`) to features of one extractor; keys
    are `<block>/<tag>/<metric>` plus `<block>/<tag>/extractor` (the extractor's full name)."""
    out: dict = {}
    for name, feats in candidates.items():
        r = fidelity(real_test, feats, k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
        for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage"):
            out[f"{name}/{tag}/{key}"] = json_number(r[key])
        out[f"{name}/{tag}/n"] = r["n_fake"]
        out[f"{name}/{tag}/extractor"] = r["extractor"]
    return out


def subsample(n_total: int, n: int, seed: int) -> np.ndarray:
    """Sorted seeded choice of min(n, n_total) indices out of n_total."""
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def auroc_block(prefix: str, targets: np.ndarray, probs: np.ndarray, labels: Sequence[str], *, min_count: int,
                n_boot: int, seed: int) -> tuple[dict, dict]:
    """Per-label AUROC (`<prefix>/auroc/<label>`, None where a class is missing), positives, and the macro AUROC over
    labels with >= min_count positives and negatives (`<prefix>/macro_auroc`, `<prefix>/macro_auroc_labels`).
    targets: N x L of 1 / 0 / NaN (excluded)."""
    per = per_label_auroc(targets, probs, labels, n_boot=n_boot, seed=seed)
    macro, used = macro_auroc(per, min_count, min_count)
    out: dict = {}
    for j, name in enumerate(labels):
        r = per.get(name)
        out[f"{prefix}/auroc/{name}"] = json_number(r.auroc, 4) if r else None
        out[f"{prefix}/positives/{name}"] = int(np.nansum(targets[:, j] == 1.0))
    out[f"{prefix}/macro_auroc"] = json_number(macro, 4)
    out[f"{prefix}/macro_auroc_labels"] = len(used)
    return out, per


def agreement(probs_a: np.ndarray, probs_b: np.ndarray, threshold: float = 0.5) -> dict:
    """How closely two sets of classifier outputs on paired images agree: mean over labels of the Pearson
    correlation across pairs (labels where either side is constant are left out), mean absolute difference of the
    probabilities, and the share of (image, label) decisions at `threshold` that agree."""
    a, b = np.asarray(probs_a, np.float64), np.asarray(probs_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired outputs must have one shape N x L, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return {"corr": None, "mae": None, "decision": None, "corr_labels": 0}
    rs = []
    for j in range(a.shape[1]):
        if len(a) > 2 and a[:, j].std() > 1e-9 and b[:, j].std() > 1e-9:
            rs.append(float(np.corrcoef(a[:, j], b[:, j])[0, 1]))
    return {"corr": json_number(np.mean(rs)) if rs else None, "mae": json_number(np.abs(a - b).mean()),
            "decision": json_number(((a >= threshold) == (b >= threshold)).mean()), "corr_labels": len(rs)}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (n >= 2): every text is paired with another image."""
    if n < 2:
        raise ValueError("shuffled pairs need at least 2 items")
    while True:  # rejection: uniform over derangements, about e tries on average
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            break
    return perm


def alignment_block(score: Callable[[list[str], np.ndarray], np.ndarray], texts: Sequence[str], grids: np.ndarray,
                    *, shuffles: int, seed: int, prefix: str = "alignment") -> dict:
    """Mean fine-grained alignment of each text with its own image's tokens against the same texts with other
    images' tokens (`shuffles` seeded derangements): matched mean, shuffled mean, their gap, and the win rate (share
    of texts scoring higher with their own image than on average with the shuffled ones)."""
    texts = list(texts)
    keys = ("matched_mean", "shuffled_mean", "gap", "win_rate")
    if len(texts) < 2:
        return {**{f"{prefix}/{k}": None for k in keys}, f"{prefix}/n": len(texts)}
    matched = np.asarray(score(texts, grids), np.float64)
    rng = np.random.default_rng(seed)
    shuffled = np.stack([np.asarray(score(texts, np.asarray(grids)[derangement(len(texts), rng)]), np.float64)
                         for _ in range(max(1, shuffles))])
    other = shuffled.mean(axis=0)
    return {f"{prefix}/matched_mean": json_number(matched.mean()), f"{prefix}/shuffled_mean": json_number(other.mean()),
            f"{prefix}/gap": json_number(matched.mean() - other.mean()), f"{prefix}/win_rate": json_number((matched > other).mean()),
            f"{prefix}/n": len(texts)}


UTILITY_ARMS = ("real", "synthetic", "real_plus_synthetic")


def utility_params(classifier: ClassifierParams, e: EvaluateParams) -> ClassifierParams:
    """The classifier's params with the evaluation's budget (epochs, input size); the same for all three arms."""
    epochs = e.utility_epochs or classifier.epochs
    size = e.utility_input_size or classifier.input_size
    return dataclasses.replace(classifier, epochs=epochs, input_size=size,
                               warmup_epochs=min(classifier.warmup_epochs, float(epochs)))


def rare_labels(train_labels: np.ndarray, test_targets: np.ndarray, labels: Sequence[str], n: int,
                min_count: int) -> list[str]:
    """The n labels with the fewest real training positives among those the test split can score (>= min_count
    positives and negatives), rarest first (ties by name)."""
    pos_train = (np.asarray(train_labels) == 1.0).sum(axis=0)
    ok = [j for j in range(len(labels)) if np.nansum(test_targets[:, j] == 1) >= min_count
          and np.nansum(test_targets[:, j] == 0) >= min_count]
    return [labels[j] for j in sorted(ok, key=lambda j: (pos_train[j], labels[j]))[:n]]


def utility_block(params: ClassifierParams, train: LabeledImages, synthetic: LabeledImages, validate: LabeledImages,
                  test: LabeledImages, *, rare: int, min_count: int, seed: int, device: str = "cpu",
                  progress: bool = True, arms: Sequence[str] = UTILITY_ARMS, probs_out: dict | None = None) -> dict:
    """Train one classifier per arm (same params, seed and epochs), select on real validate, test on real test.

    All images must already be at one side (`to_size`, or lazily: `Resized`); they are read per batch. Keys: `utility/<arm>/macro_auroc`, `.../auroc/<label>`,
    `.../rare_macro_auroc` (over the `rare` rarest labels), `utility/rare_labels`, and the gains of
    real + synthetic over real only. `probs_out`: filled with each arm's probabilities on `test`."""
    sets = {"real": train, "synthetic": synthetic,
            "real_plus_synthetic": LabeledImages(Concat(train.images, synthetic.images),
                                                 np.concatenate([train.labels, synthetic.labels]))}
    truth = eval_targets(test.labels, params.blank_policy)
    rare_names = rare_labels(train.labels, truth, OBSERVATIONS, rare, min_count)
    out: dict = {"utility/epochs": params.epochs, "utility/input_size": params.input_size,
                 "utility/rare_labels": ", ".join(rare_names)}
    for arm in arms:
        model, _ = fit(params, sets[arm], validate, seed=seed, device=device, progress=progress)
        probs = model.cpu().predict(test.images)
        if probs_out is not None:  # the per-item table keeps each arm's probabilities on real test
            probs_out[arm] = probs
        block, per = auroc_block(f"utility/{arm}", truth, probs, OBSERVATIONS, min_count=min_count, n_boot=0,
                                 seed=seed)
        out.update({k: v for k, v in block.items() if "/positives/" not in k})
        rare_vals = [per[n].auroc for n in rare_names if n in per]
        out[f"utility/{arm}/rare_macro_auroc"] = json_number(np.mean(rare_vals), 4) if rare_vals else None
        out[f"utility/{arm}/n_train"] = len(sets[arm].images)
    for key in ("macro_auroc", "rare_macro_auroc"):
        a, b = out.get(f"utility/real_plus_synthetic/{key}"), out.get(f"utility/real/{key}")
        out[f"utility/gain/{key}"] = json_number(a - b, 4) if a is not None and b is not None else None
    return out


def nearest_in_stream(queries: Sequence[np.ndarray], reference, to_vectors: Callable[[np.ndarray], np.ndarray],
                      rows: int = 1024) -> list[tuple[np.ndarray, np.ndarray]]:
    """(index, distance) of each query vector's nearest reference item, the reference read `rows` at a time and
    turned into vectors by `to_vectors`: the same as `nearest` against all reference vectors at once (ties: the
    lowest index), with memory O(queries + rows). 1,024 rows: bench/scale measured the privacy phase of evaluate at
    +520 MB over its base with 4,096 (a chunk of 128 px images, its float32 resize and pixel vectors)."""
    best = [(np.zeros(len(q), np.int64), np.full(len(q), np.inf)) for q in queries]
    for start, chunk in iter_chunks(reference, rows=rows):
        ref = to_vectors(chunk)
        for (idx, dist), q in zip(best, queries):
            if not len(q):
                continue
            j, d = nearest(q, ref)
            better = d < dist  # strictly: an equal distance keeps the earlier (lower) index
            idx[better], dist[better] = j[better] + start, d[better]
    return best


def streamed_memorization(features: dict[str, Features], synthetic_images, train_images, test_images, *,
                          percentile: float) -> tuple[Memorization, np.ndarray]:
    """`cxrsynth.eval.metrics.memorization` with the training set streamed: feature-space neighbours from the
    (O(N), float64) feature matrix, pixel-space neighbours from the training images read and reduced to pixel
    vectors a chunk at a time (the training pixel vectors, 4 kB per image, are never held together). Returns the
    report and the real test images' feature distances to their nearest training image."""
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    name = same_extractor(features["synthetic"], features["train"], features["test"])
    if len(train_images) != len(features["train"]):
        raise ValueError("training images and features differ in length")
    _, test_feat = nearest(features["test"].values, features["train"].values)
    nn_f, d_f = nearest(features["synthetic"].values, features["train"].values)
    px_syn, px_test = pixel_vectors(np.asarray(synthetic_images)), pixel_vectors(np.asarray(test_images))
    (nn_p, d_p), (_, test_pix) = nearest_in_stream([px_syn, px_test], train_images, pixel_vectors)
    report = Memorization(name, float(percentile), float(np.percentile(test_feat, percentile)),
                          float(np.percentile(test_pix, percentile)), nn_f, d_f, nn_p, d_p)
    return report, test_feat


def privacy_block(report: Memorization, test_to_train_feature: np.ndarray) -> dict:
    """Near-copy rates and nearest-neighbour distances (`cxrsynth.eval.metrics.memorization`), with the real test
    images' own median distance to the training set as the reference."""
    s = report.summary()
    out = {f"privacy/{k}": json_number(v) if isinstance(v, float) else v for k, v in s.items()}
    out["privacy/expected_near_copy_rate"] = json_number(report.percentile / 100.0)
    out["privacy/reference_median_nn_feature"] = json_number(np.median(test_to_train_feature))
    return out


def load_truth(path: str | Path, ids: Collection[str] | None = None) -> dict[str, dict]:
    """The phantom sidecar as dicom_id -> {ctr, view, findings: [{kind, side}]} (only what the checks use), of the
    images `ids` (None: all)."""
    return truth_by_image(path, lambda r: {"ctr": r.get("ctr"), "view": r.get("view"),
                                           "findings": [{"kind": x.get("kind"), "side": x.get("side")}
                                                        for x in r.get("findings", [])]}, ids=ids)


def item_frames(synthetic: SyntheticSet, test: RealSplit, feats: dict[str, Features], floor_idx: np.ndarray,
                probs: np.ndarray, test_probs: np.ndarray, s_idx: np.ndarray, r_idx: np.ndarray, mem: Memorization,
                geo: dict, utility_probs: dict) -> list[pd.DataFrame]:
    """The rows of `cxrsynth.eval.items` for one evaluation (synthetic, real test, floor and ceiling images)."""
    man, n = synthetic.manifest, len(synthetic.images)
    paired = np.zeros(n, bool)
    paired[s_idx] = True
    source_labels = np.full((n, len(OBSERVATIONS)), np.nan)
    source_labels[s_idx] = test.labels[r_idx]
    cols: dict = {"prompt_id": man["prompt_id"].astype(str).to_numpy(), "kind": man["kind"].astype(str).to_numpy(),
                  "view": man["view"].astype(str).to_numpy(),
                  "source_dicom_id": [d if isinstance(d, str) else None for d in man["source_dicom_id"]],
                  "paired": paired, "label/": synthetic.labels, "source_label/": source_labels, "prob/": probs,
                  "nn_feature_distance": mem.dist_feature, "nn_feature_index": mem.nn_feature,
                  "nn_pixel_distance": mem.dist_pixel, "near_copy_feature": mem.near_copy_feature,
                  "near_copy_pixel": mem.near_copy_pixel, "near_copy": mem.near_copy}
    real_cols: dict = {"view": [None] * len(test.rows), "label/": test.labels, "prob/": test_probs}
    if geo:
        ctr, sides, asym = geo["synthetic"]
        cols.update({"ctr": ctr, "effusion_side": list(sides), "effusion_asymmetry": asym})
        r_ctr, r_sides, r_asym, r_cardio = geo["real_test"]
        real_cols.update({"ctr": r_ctr, "effusion_side": list(r_sides), "effusion_asymmetry": r_asym,
                          "cardiomegaly": r_cardio})
    for arm, p in utility_probs.items():
        real_cols[f"utility/{arm}/prob/"] = p
    ids = test.rows.dicom_id.astype(str).to_numpy()
    return [frame("synthetic", man["prompt_id"].astype(str), man["synthetic_id"].astype(str),
                  feats["synthetic"].values, **cols),
            frame("real_test", [f"test:{d}" for d in ids], ids, feats["test"].values, **real_cols),
            frame("floor", [f"floor:{i}" for i in floor_idx], [str(i) for i in floor_idx],
                  feats["train"].values[floor_idx]),
            frame("ceiling", [f"ceiling:{i}" for i in floor_idx], [str(i) for i in floor_idx], feats["recon"].values)]


def synthetic_tokens(synthetic: SyntheticSet, vqgan) -> np.ndarray:
    """The synthetic images' token grids: as written by synthesize, else re-encoded with the VQ-GAN."""
    if synthetic.tokens is not None:
        return np.asarray(synthetic.tokens)
    return vqgan.tokenize(synthetic.images)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with n intra-op torch threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def codebook_ceiling(vqgan, tokens_dir: str | Path, models: str | Path, train_images: np.ndarray,
                     rows: np.ndarray) -> np.ndarray:
    """What a perfect token generator would draw: the VQ-GAN decoding of real training images' own token grids
    (the token store the generator learned from; a fresh encoding if the store was made by other weights)."""
    from cxrsynth.data.tokens import TokenStoreError, load_tokens

    try:
        grids = load_tokens(tokens_dir, "train", vqgan=Path(models) / "vqgan")[np.asarray(rows)]
    except TokenStoreError:
        return vqgan.reconstruct(train_images[rows])
    return vqgan.decode_tokens(grids)


def load_align(path: str | Path):
    """The alignment model, or (None, reason) when it is not available."""
    if not (Path(path) / "config.json").is_file():
        return None, f"{path}: alignment model missing"
    try:
        from cxrsynth.models.align import AlignModel
    except ImportError as e:  # pragma: no cover - only while the align stage is being written
        return None, f"cxrsynth.models.align not importable ({e})"
    return AlignModel.load(path), ""


def evaluate_all(e: EvaluateParams, classifier_params: ClassifierParams, *, synthetic_dir: str | Path,
                 interim: str | Path, tokens_dir: str | Path, models: str | Path, phantom: str | Path,
                 pictures: Pictures, seed: int = 0, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] = print, items_path: str | Path | None = None) -> dict:
    """Run every block on the pipeline's files and draw the pictures; returns the flat metrics dict. With
    `items_path`, the per-item table (`cxrsynth.eval.items`) is written there: every headline number and its
    interval is computed from it (`cxrsynth.eval.headlines.with_intervals`)."""
    from cxrsynth.data.tokens import load_tokens
    from cxrsynth.models.vqgan import VQGAN

    t_start = time.perf_counter()
    synthetic = load_synthetic(synthetic_dir)
    real = {s: load_real(interim, s) for s in ("train", "validate", "test")}
    size = e.compare_size or synthetic.size
    # every image is resized when a batch of it is read: no split is ever held at compare size
    real_small = {s: Resized(r.images, size) for s, r in real.items()}
    synth_small = to_size(synthetic.images, size)
    classifier = Classifier.load(Path(models) / "classifier")
    vqgan = VQGAN.load(Path(models) / "vqgan")
    blank, k_min = classifier_params.blank_policy, e.min_count
    metrics: dict = {"n_synthetic": len(synthetic.images), "synthetic_size": synthetic.size, "compare_size": size,
                     "n_real_train": len(real["train"].images), "n_real_test": len(real["test"].images)}
    metrics.update({f"n_kind/{k}": int(v) for k, v in sorted(synthetic.manifest["kind"].value_counts().items())})
    skipped: dict[str, str] = {}

    # -- fidelity (+ the reference floors, same extractor, same images size) ---------------------------------------
    extractors: list[tuple[str, FeatureExtractor]] = [("classifier", classifier.feature_extractor())]
    if e.extra_extractor:
        extractors.append(("extra", TorchScriptFeatures(e.extra_extractor, input_size=e.extra_extractor_input_size
                                                         or None)))
    floor_idx = subsample(len(real_small["train"]), len(synth_small) if e.floor_same_n else len(real_small["train"]),
                          seed)
    recon = to_size(codebook_ceiling(vqgan, tokens_dir, models, real_small["train"], floor_idx), size)
    feats: dict[str, dict[str, Features]] = {}
    for tag, ex in extractors:
        f = {"test": extract(ex, real_small["test"]), "train": extract(ex, real_small["train"]),
             "synthetic": extract(ex, synth_small), "recon": extract(ex, recon)}
        feats[tag] = f
        floor_train = Features(f["train"].values[floor_idx], f["train"].extractor)
        with torch_threads(1):  # many tiny matrix products: extra threads only add synchronisation
            metrics.update(fidelity_block(f["test"], {"fidelity": f["synthetic"], "floor": floor_train,
                                                      "codebook_floor": f["recon"]},
                                          k=e.prdc_k, kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size,
                                          seed=seed, tag=tag))
    log(f"evaluate: fidelity done ({time.perf_counter() - t_start:.0f} s)")

    # -- semantic consistency -------------------------------------------------------------------------------------
    probs = classifier.predict(synth_small)
    targets = eval_targets(synthetic.labels, blank)
    block, per = auroc_block("semantic", targets, probs, OBSERVATIONS, min_count=k_min, n_boot=e.bootstrap, seed=seed)
    metrics.update(block)
    save_roc_png(pictures.roc, LabeledImages(synthetic.images, synthetic.labels), probs, OBSERVATIONS, per, blank,
                 title=f"classifier on synthetic images vs prompt labels: macro AUROC {block['semantic/macro_auroc']}"
                       f" over {block['semantic/macro_auroc_labels']} labels", min_count=k_min)
    s_idx, r_idx = counterparts(synthetic.manifest, real["test"].rows)
    metrics["paired/n"] = len(s_idx)
    real_targets = eval_targets(real["test"].labels[r_idx], blank)
    real_probs = classifier.predict(real_small["test"][r_idx]) if len(r_idx) else np.zeros((0, len(OBSERVATIONS)))
    test_probs = classifier.predict(real_small["test"]) if items_path is not None else None
    pb, _ = auroc_block("paired", real_targets, probs[s_idx], OBSERVATIONS, min_count=k_min, n_boot=0, seed=seed)
    metrics.update({k: v for k, v in pb.items() if "/positives/" not in k})
    rb, _ = auroc_block("paired/real", real_targets, real_probs, OBSERVATIONS, min_count=k_min, n_boot=0, seed=seed)
    metrics["paired/real_macro_auroc"] = rb["paired/real/macro_auroc"]
    metrics.update({f"paired/agreement_{k}": v for k, v in agreement(probs[s_idx], real_probs).items()})
    log(f"evaluate: semantic consistency done ({time.perf_counter() - t_start:.0f} s)")

    # -- alignment ------------------------------------------------------------------------------------------------
    align, why = load_align(Path(models) / "align")
    keys_a = ("matched_mean", "shuffled_mean", "gap", "win_rate", "n")
    if align is None:
        skipped["alignment"] = why
        metrics.update({f"{p}/{k}": None for p in ("alignment", "alignment/real") for k in keys_a})
    else:
        grids = synthetic_tokens(synthetic, vqgan)
        score = lambda t, g: align.score(t, g)  # noqa: E731
        metrics.update(alignment_block(score, synthetic.texts, grids, shuffles=e.alignment_shuffles, seed=seed))
        real_grids = load_tokens(tokens_dir, "test")[np.asarray(r_idx)]
        metrics.update(alignment_block(score, [synthetic.texts[i] for i in s_idx], real_grids,
                                       shuffles=e.alignment_shuffles, seed=seed, prefix="alignment/real"))
    log(f"evaluate: alignment done ({time.perf_counter() - t_start:.0f} s)")

    # -- privacy --------------------------------------------------------------------------------------------------
    f = feats["classifier"]
    mem, test_nn = streamed_memorization(f, synth_small, real_small["train"], real_small["test"],
                                         percentile=e.near_copy_percentile)
    metrics.update(privacy_block(mem, test_nn))
    pictures.closest_pairs.parent.mkdir(parents=True, exist_ok=True)
    closest_pairs_grid(mem, synth_small, real_small["train"], n=e.closest_pairs).save(pictures.closest_pairs)
    sample_grid(synthetic, real_small["train"], mem.nn_feature, mem.dist_feature, e.sample_rows).save(pictures.samples)
    label_examples_grid(synthetic, probs, real["test"], real_small["test"], e.label_examples).save(
        pictures.label_examples)

    # -- phantom geometry -----------------------------------------------------------------------------------------
    truth_path = Path(phantom) / TRUTH_FILE
    geo: dict = {}
    gkeys = ("ctr_mean_asked", "ctr_mean_not_asked", "ctr_enlarged_rate_asked", "ctr_enlarged_rate_not_asked",
             "n_asked", "n_not_asked", "ctr_auroc", "ctr_unmeasurable_rate", "effusion_side_accuracy", "effusion_n")
    if not e.phantom_checks or not truth_path.is_file():
        skipped["phantom"] = "phantom_checks off" if not e.phantom_checks else f"{truth_path}: no phantom ground truth"
        metrics.update({f"{p}/{k}": None for p in ("phantom", "phantom/real") for k in gkeys})
        metrics["phantom/paired_ctr_corr"] = None
    else:
        truth = load_truth(truth_path, ids=set(real["test"].rows.dicom_id.astype(str)))  # the test images only
        sides = [one_sided_effusion(t) for t in synthetic.manifest["terms"]]
        ctr, asym = measure_geometry(synth_small, sides, progress)
        metrics.update(geometry_block("phantom", ctr, synthetic.labels[:, OBSERVATIONS.index("Cardiomegaly")] == 1.0,
                                      sides, asym))
        recs = [truth.get(str(d), {"ctr": None, "findings": []}) for d in real["test"].rows.dicom_id]
        r_kinds = [{x["kind"] for x in r["findings"]} for r in recs]
        r_sides = []
        for r in recs:
            s = {x["side"] for x in r["findings"] if x["kind"] == "effusion"}
            r_sides.append(next(iter(s)) if len(s) == 1 and s <= {"left", "right"} else None)
        r_ctr, r_asym = measure_geometry(real_small["test"], r_sides, progress)
        geo = {"synthetic": (ctr, sides, asym), "real_test": (r_ctr, r_sides, r_asym,
                                                              np.array(["cardiomegaly" in k for k in r_kinds]))}
        metrics.update(geometry_block("phantom/real", r_ctr, np.array(["cardiomegaly" in k for k in r_kinds]),
                                      r_sides, r_asym))
        true_ctr = np.array([np.nan if recs[j]["ctr"] is None else float(recs[j]["ctr"]) for j in r_idx])
        ok = np.isfinite(true_ctr) & np.isfinite(ctr[s_idx]) if len(s_idx) else np.zeros(0, bool)
        metrics["phantom/paired_ctr_corr"] = json_number(np.corrcoef(ctr[s_idx][ok], true_ctr[ok])[0, 1]) \
            if ok.sum() > 2 else None
    log(f"evaluate: privacy and phantom geometry done ({time.perf_counter() - t_start:.0f} s)")

    # -- utility --------------------------------------------------------------------------------------------------
    utility_probs: dict = {}
    if e.utility:
        up = utility_params(classifier_params, e)
        us = up.input_size
        sized = {s: (real_small[s] if us == size else Resized(real[s].images, us)) for s in real}
        syn = synth_small if us == size else to_size(synthetic.images, us)
        metrics.update(utility_block(up, LabeledImages(sized["train"], real["train"].labels),
                                     LabeledImages(syn, synthetic.labels),
                                     LabeledImages(sized["validate"], real["validate"].labels),
                                     LabeledImages(sized["test"], real["test"].labels), rare=e.rare_labels,
                                     min_count=k_min, seed=seed, device=device, progress=progress,
                                     probs_out=utility_probs))
    else:
        skipped["utility"] = "evaluate.utility is false"
    log(f"evaluate: utility done ({time.perf_counter() - t_start:.0f} s)")

    metrics.update({f"skipped/{k}": v for k, v in sorted(skipped.items())})
    if items_path is not None:
        parts = item_frames(synthetic, real["test"], feats["classifier"], floor_idx, probs, test_probs, s_idx, r_idx,
                            mem, geo, utility_probs)
        write_items(items_path, parts, {"blank_policy": blank, "min_count": k_min, "prdc_k": e.prdc_k,
                                        "threshold_feature": mem.threshold_feature,
                                        "threshold_pixel": mem.threshold_pixel, "extractor": mem.extractor,
                                        "seed": seed})
        log(f"evaluate: per-item table written ({time.perf_counter() - t_start:.0f} s)")
    lineage = synthetic.manifest
    for col in ("generator_sha256", "vqgan_sha256", "align_sha256"):
        if col in lineage.columns and lineage[col].nunique() == 1:
            metrics[f"lineage/{col}"] = str(lineage[col].iloc[0])[:16]
    return metrics
