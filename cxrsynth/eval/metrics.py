"""Evaluation metrics as pure functions over feature vectors, labels and scores.

Reads nothing, writes nothing (except `closest_pairs_grid`, which returns a PIL image for the caller to save).

Fidelity (all on `Features`, i.e. vectors that carry their extractor's name; mixing names raises
`ExtractorMismatch`, and every returned dict carries `extractor`):
- `fid`: Fréchet distance between Gaussians fitted to real and synthetic features, computed by torchmetrics'
  `FrechetInceptionDistance` fed through an identity extractor (so features are computed once, by any extractor).
  `frechet_distance` / `gaussian_stats` are the plain numpy/scipy closed form, used to test it.
- `kid`: torchmetrics `KernelInceptionDistance` (cubic polynomial kernel, unbiased MMD^2 over random subsets), seeded.
- `prdc`: precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
  Generative Models") with k nearest neighbours in Euclidean feature space; balls are open (strict `<`), as in the
  authors' reference implementation.

Semantics: `auroc`, `roc_curve` (torchmetrics), `per_label_auroc` (bootstrap confidence intervals, seeded; labels without both
classes are skipped), `macro_auroc`.

Privacy: `memorization` finds each synthetic image's nearest training image in feature space and in pixel space and
flags near copies (see its docstring for the threshold), `closest_pairs_grid` shows the closest pairs.

PRDC and the near-copy rule are written here because no kept library (torchmetrics, scipy) provides them. Every
nearest-neighbour computation (`nearest`, the k-th neighbour radii, PRDC) runs over row chunks of at most
`CHUNK_BYTES` of float64 distances against the other set and keeps only per-row reductions, so memory is
O(n_query + n_reference) vectors plus one chunk (64 MB), never the n_query x n_reference matrix; each chunk's
distances are computed with the whole matrix's formula: indices and PRDC equal the full-matrix ones, distances to the
last bit while a set fits one chunk (within 1e-12 relative otherwise: a smaller product may round differently).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from scipy.stats import rankdata

from cxrsynth.errors import UserError
from cxrsynth.eval.features import Features, IdentityFeatures
from cxrsynth.images import resize, to_image_tensor

# ----------------------------------------------------------------------------------------------------------------
# comparability


class ExtractorMismatch(UserError):
    """Two numbers (or feature sets) from different feature extractors were about to be compared."""


def same_extractor(*items: Features | Mapping) -> str:
    """The one extractor name shared by Features objects and/or result dicts (key `extractor`); raises otherwise."""
    names = []
    for it in items:
        name = it.extractor if isinstance(it, Features) else it.get("extractor") if isinstance(it, Mapping) else None
        if not name:
            raise ExtractorMismatch(f"{type(it).__name__} does not say which feature extractor it comes from")
        names.append(name)
    if len(set(names)) != 1:
        raise ExtractorMismatch(f"numbers from different feature extractors are not comparable: {sorted(set(names))}")
    return names[0]


def compare(result: Mapping, reference: Mapping) -> dict[str, float]:
    """result - reference for every numeric key both share (e.g. FID of synthetic images minus the real floor).

    Raises ExtractorMismatch unless both come from the same feature extractor.
    """
    extractor = same_extractor(result, reference)
    out: dict = {"extractor": extractor}
    for k, v in result.items():
        r = reference.get(k)
        if k != "extractor" and isinstance(v, (int, float)) and isinstance(r, (int, float)):
            out[k] = float(v) - float(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# fidelity

def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1) of N x D vectors."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 vectors as an N x D array, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Fréchet (2-Wasserstein^2) distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge both covariances off the boundary
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean).real)


def _check_pair(real: Features, fake: Features) -> str:
    name = same_extractor(real, fake)
    if real.dim != fake.dim:
        raise ValueError(f"feature dimensions differ: {real.dim} vs {fake.dim}")
    return name


def fid(real: Features, fake: Features) -> dict:
    """FID (torchmetrics) between two feature sets of one extractor: {fid, extractor, n_real, n_fake}."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    name = _check_pair(real, fake)
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least 2 real and 2 synthetic samples")
    metric = FrechetInceptionDistance(feature=IdentityFeatures(real.dim))
    metric.update(torch.from_numpy(real.values), real=True)
    metric.update(torch.from_numpy(fake.values), real=False)
    return {"fid": float(metric.compute()), "extractor": name, "n_real": len(real), "n_fake": len(fake)}


def kid(real: Features, fake: Features, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> dict:
    """KID (torchmetrics): mean and std of the unbiased polynomial-kernel MMD^2 over `subsets` random subsets.

    `subset_size` is capped at the smaller set's size (torchmetrics would refuse); the subsets are drawn from a
    seeded generator, so the result is reproducible. Returns {kid_mean, kid_std, kid_subset_size, extractor, ...}.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    name = _check_pair(real, fake)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 real and 2 synthetic samples")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=IdentityFeatures(real.dim), subsets=subsets, subset_size=size,
                                         degree=degree, gamma=gamma, coef=float(coef))
    metric.update(torch.from_numpy(real.values), real=True)
    metric.update(torch.from_numpy(fake.values), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid_mean": float(mean), "kid_std": float(std), "kid_subset_size": size, "extractor": name,
            "n_real": len(real), "n_fake": len(fake)}


CHUNK_BYTES = 64 << 20  # float64 distances per chunk of rows


def chunk_rows(n_other: int, chunk: int | None = None) -> int:
    """Rows of one distance chunk against `n_other` points: `chunk` if given, else what fits CHUNK_BYTES."""
    return int(chunk) if chunk else max(1, CHUNK_BYTES // (8 * max(1, n_other)))


def _distance_block(x: np.ndarray, b: np.ndarray, bb: np.ndarray) -> np.ndarray:
    """Euclidean distances of the rows x to all of b (bb: the squared norms of b), float64."""
    x = np.asarray(x, dtype=np.float64)
    d2 = (x * x).sum(axis=1)[:, None] + bb[None, :] - 2.0 * x @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _blocks(a: np.ndarray, b: np.ndarray, chunk: int | None):
    """(start, distances of a[start:start + rows] to all of b) over row chunks of a."""
    b = np.asarray(b, dtype=np.float64)
    bb = (b * b).sum(axis=1)
    step = chunk_rows(len(b), chunk)
    for i in range(0, len(a), step):
        yield i, _distance_block(a[i:i + step], b, bb)


def pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Euclidean distances, len(a) x len(b), float64 (computed in row chunks): the whole matrix, for small sets and
    tests; the functions below never build it."""
    out = np.empty((len(a), len(b)))
    for i, d in _blocks(a, b, chunk):
        out[i:i + len(d)] = d
    return out


def kth_neighbour_radius(x: np.ndarray, k: int, chunk: int | None = None) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour within the same set (itself excluded)."""
    out = np.empty(len(x))
    for i, d in _blocks(x, x, chunk):
        out[i:i + len(d)] = np.partition(d, k, axis=1)[:, k]  # column 0 of a sorted row is the point itself
    return out


def prdc(real: Features, fake: Features, k: int = 5, chunk: int | None = None,
         real_radius: np.ndarray | None = None) -> dict:
    """Precision, recall, density, coverage with k nearest neighbours (Naeem et al. 2020).

    With r_i the distance of real point i to its k-th nearest real neighbour and B(x, r) the open ball:
    precision = share of fake points inside some B(real_i, r_i); recall = share of real points inside some
    B(fake_j, s_j) (s_j from the fake set); density = (1/k) * mean over fake points of how many real balls hold them;
    coverage = share of real points whose ball holds at least one fake point. `real_radius`: the r_i computed
    before (`kth_neighbour_radius(real.values, k)`), for many fake sets against one real set (the bootstraps).
    """
    name = _check_pair(real, fake)
    if k < 1 or len(real) <= k or len(fake) <= k:
        raise ValueError(f"PRDC with k={k} needs more than k real and k synthetic samples "
                         f"(got {len(real)} and {len(fake)})")
    r_real = kth_neighbour_radius(real.values, k, chunk) if real_radius is None else real_radius
    r_fake = kth_neighbour_radius(fake.values, k, chunk)
    in_some_real = np.zeros(len(fake), bool)       # per fake point: inside some real ball (precision)
    real_balls = np.zeros(len(fake), np.int64)      # per fake point: how many real balls hold it (density)
    recalled = np.zeros(len(real), bool)            # per real point: inside some fake ball (recall)
    covered = np.zeros(len(real), bool)             # per real point: its ball holds a fake point (coverage)
    for i, d in _blocks(real.values, fake.values, chunk):  # chunk of real rows x all fake points
        rows = slice(i, i + len(d))
        inside = d < r_real[rows, None]
        in_some_real |= inside.any(axis=0)
        real_balls += inside.sum(axis=0)
        recalled[rows] = (d < r_fake[None, :]).any(axis=1)
        covered[rows] = d.min(axis=1) < r_real[rows]
    return {
        "precision": float(in_some_real.mean()),
        "recall": float(recalled.mean()),
        "density": float(real_balls.mean() / k),
        "coverage": float(covered.mean()),
        "k": k, "extractor": name, "n_real": len(real), "n_fake": len(fake),
    }


def fidelity(real: Features, fake: Features, *, k: int = 5, kid_subsets: int = 100, kid_subset_size: int = 1000,
             seed: int = 0) -> dict:
    """FID, KID and PRDC of one pair of feature sets, in one flat dict with `extractor`."""
    out = fid(real, fake)
    out.update(kid(real, fake, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed))
    out.update(prdc(real, fake, k=k))
    return out


# ----------------------------------------------------------------------------------------------------------------
# semantics: AUROC

def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney U / (P N), ties count half) for each row of boolean labels y and scores s (B x n).

    Hand-written because the bootstraps evaluate hundreds of resamples at once (one `rankdata` over a B x n array);
    torchmetrics' AUROC takes one sample per call. `tests/test_metrics.py` pins it equal to `auroc` below
    (torchmetrics) on tied and untied scores."""
    ranks = rankdata(s, axis=1)
    pos = y.sum(axis=1)
    neg = y.shape[1] - pos
    u = (ranks * y).sum(axis=1) - pos * (pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), u / (pos * neg), np.nan)


def _binary(y_true: Sequence, y_score: Sequence, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(y_score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of one length, got {y.shape} and {s.shape}")
    if y.all() or not y.any():
        raise ValueError(f"{what} needs at least one positive and one negative sample")
    return torch.from_numpy(s), torch.from_numpy(y.astype(np.int64))


def auroc(y_true: Sequence, y_score: Sequence) -> float:
    """Area under the ROC curve of binary labels (1/0 or bool) and scores (torchmetrics' `binary_auroc`, which
    computes in float32 whatever the input: the trapezoid over distinct thresholds, i.e. ties count half);
    ValueError without both classes."""
    from torchmetrics.functional.classification import binary_auroc

    s, y = _binary(y_true, y_score, "AUROC")
    return float(binary_auroc(s, y, thresholds=None))


def roc_curve(y_true: Sequence, y_score: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from torchmetrics' `binary_roc`, starting at (0, 0) (threshold +inf there); one point
    per distinct score, highest threshold first."""
    from torchmetrics.functional.classification import binary_roc

    s, y = _binary(y_true, y_score, "a ROC curve")
    fpr, tpr, thr = binary_roc(s, y, thresholds=None)
    thr = thr.double().numpy().copy()
    thr[0] = np.inf
    return fpr.double().numpy(), tpr.double().numpy(), thr


@dataclass(frozen=True)
class LabelAUROC:
    label: str
    auroc: float
    ci_low: float
    ci_high: float
    positives: int
    negatives: int


def per_label_auroc(targets: np.ndarray, scores: np.ndarray, labels: Sequence[str], *, n_boot: int = 1000,
                    ci: float = 0.95, seed: int = 0) -> dict[str, LabelAUROC]:
    """AUROC per label with a percentile bootstrap confidence interval.

    targets: N x L with 1 (positive), 0 (negative) or NaN (excluded, e.g. uncertain); scores: N x L.
    Labels without at least one positive and one negative are skipped (absent from the result). The bootstrap
    resamples the label's usable images with replacement (seeded; draws with a single class are dropped); with
    n_boot = 0 the interval is (nan, nan).
    """
    t = np.asarray(targets, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 2 or t.shape[1] != len(labels):
        raise ValueError(f"targets {t.shape} and scores {s.shape} must both be N x {len(labels)}")
    rng = np.random.default_rng(seed)
    out: dict[str, LabelAUROC] = {}
    for j, name in enumerate(labels):
        keep = ~np.isnan(t[:, j])
        y, sc = t[keep, j] > 0.5, s[keep, j]
        pos, neg = int(y.sum()), int((~y).sum())
        if pos == 0 or neg == 0:
            continue
        value = float(_auroc_rows(y[None], sc[None])[0])
        lo = hi = float("nan")
        if n_boot > 0:
            idx = rng.integers(0, len(y), size=(n_boot, len(y)))
            boots = _auroc_rows(y[idx], sc[idx])
            boots = boots[~np.isnan(boots)]
            if boots.size:
                alpha = (1.0 - ci) / 2.0
                lo, hi = (float(v) for v in np.quantile(boots, [alpha, 1.0 - alpha]))
        out[name] = LabelAUROC(name, value, lo, hi, pos, neg)
    return out


def macro_auroc(results: Mapping[str, LabelAUROC], min_positives: int = 1,
                min_negatives: int = 1) -> tuple[float, list[str]]:
    """Mean AUROC over labels with at least min_positives positives and min_negatives negatives, and those labels.

    NaN (and an empty list) when no label qualifies.
    """
    used = [k for k, r in results.items() if r.positives >= min_positives and r.negatives >= min_negatives]
    if not used:
        return float("nan"), []
    return float(np.mean([results[k].auroc for k in used])), used


# ----------------------------------------------------------------------------------------------------------------
# privacy: memorization

def pixel_vectors(images: np.ndarray, size: int = 32, batch: int = 1024) -> np.ndarray:
    """Images (uint8 or float [0,1], N x H x W; any row source) -> float32 N x size^2 vectors, scaled by 1/size so
    that Euclidean distances between them are root-mean-square pixel differences; resized a batch at a time
    (4 bytes per pixel of the vectors: 4 kB per image at size 32)."""
    out = np.empty((len(images), size * size), np.float32)
    for i in range(0, len(images), batch):
        x = resize(to_image_tensor(np.asarray(images[i:i + batch])), size)
        out[i:i + len(x)] = (x.reshape(len(x), -1).double() / size).float().numpy()
    return out


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index and Euclidean distance of each query vector's nearest reference vector (ties: the lowest index), over
    row chunks of the query (memory: one chunk of distances)."""
    idx = np.zeros(len(query), np.int64)
    dist = np.zeros(len(query))
    for i, d in _blocks(query, reference, chunk):
        j = d.argmin(axis=1)
        idx[i:i + len(d)], dist[i:i + len(d)] = j, d[np.arange(len(j)), j]
    return idx, dist


@dataclass(frozen=True)
class Memorization:
    """Nearest training neighbours of synthetic images and the near-copy flags (see `memorization`)."""

    extractor: str
    percentile: float
    threshold_feature: float
    threshold_pixel: float
    nn_feature: np.ndarray       # index into the training set, per synthetic image
    dist_feature: np.ndarray
    nn_pixel: np.ndarray
    dist_pixel: np.ndarray

    @property
    def near_copy_feature(self) -> np.ndarray:
        return self.dist_feature < self.threshold_feature

    @property
    def near_copy_pixel(self) -> np.ndarray:
        return self.dist_pixel < self.threshold_pixel

    @property
    def near_copy(self) -> np.ndarray:
        return self.near_copy_feature | self.near_copy_pixel

    def summary(self) -> dict:
        return {
            "near_copy_rate": float(self.near_copy.mean()),
            "near_copy_rate_feature": float(self.near_copy_feature.mean()),
            "near_copy_rate_pixel": float(self.near_copy_pixel.mean()),
            "threshold_feature": self.threshold_feature, "threshold_pixel": self.threshold_pixel,
            "percentile": self.percentile, "n_synthetic": int(len(self.dist_feature)),
            "median_nn_feature": float(np.median(self.dist_feature)),
            "median_nn_pixel": float(np.median(self.dist_pixel)),
            "extractor": self.extractor,
        }

    def closest(self, n: int) -> np.ndarray:
        """Synthetic indices of the n closest pairs, ranked by distance relative to the feature-space threshold."""
        return np.argsort(self.dist_feature / max(self.threshold_feature, 1e-12), kind="stable")[:n]


def memorization(synthetic: Features, train: Features, test: Features, synthetic_pixels: np.ndarray,
                 train_pixels: np.ndarray, test_pixels: np.ndarray, percentile: float = 5.0) -> Memorization:
    """Nearest training image of each synthetic image, in feature space and in pixel space, and near-copy flags.

    Threshold (per space): the `percentile`-th percentile of the distances from real *test* images to their nearest
    training image. A synthetic image closer to a training image than that is a near copy. By construction about
    percentile/100 of genuinely new real images fall below it, so a generator that does not copy shows a near-copy
    rate near that value (at most about twice it for `near_copy`, the union of both spaces); a clearly higher rate
    means memorization. Pixel vectors come from `pixel_vectors` (RMS pixel distance after downsampling).
    """
    name = same_extractor(synthetic, train, test)
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    if len(synthetic_pixels) != len(synthetic) or len(train_pixels) != len(train) or len(test_pixels) != len(test):
        raise ValueError("pixel vectors and features must describe the same images (lengths differ)")
    _, test_feat = nearest(test.values, train.values)
    _, test_pix = nearest(test_pixels, train_pixels)
    nn_f, d_f = nearest(synthetic.values, train.values)
    nn_p, d_p = nearest(synthetic_pixels, train_pixels)
    return Memorization(name, float(percentile), float(np.percentile(test_feat, percentile)),
                        float(np.percentile(test_pix, percentile)), nn_f, d_f, nn_p, d_p)


def closest_pairs_grid(report: Memorization, synthetic_images: np.ndarray, train_images: np.ndarray, n: int = 8):
    """A PIL image: the n closest (synthetic, nearest training image) pairs side by side, with distances."""
    from cxrsynth.viz import image_grid

    images, captions = [], []
    for i in report.closest(n):
        j = int(report.nn_feature[i])
        flag = "NEAR COPY" if report.near_copy[i] else "ok"
        images += [synthetic_images[i], train_images[j]]
        captions += [f"synthetic #{i}: {flag}; feature NN d={report.dist_feature[i]:.3g} "
                     f"(threshold {report.threshold_feature:.3g})",
                     f"train #{j} (feature NN); pixel NN d={report.dist_pixel[i]:.3g} "
                     f"(threshold {report.threshold_pixel:.3g})"]
    return image_grid(images, captions, cols=4, tile=160, caption_lines=4,
                      title=f"closest synthetic/train pairs ({report.extractor})")


