"""Metric functions against hand-computed values: FID (torchmetrics vs closed form), KID, PRDC, AUROC, memorization,
feature extractors (TorchScript from a local file) and the rule that numbers of different extractors never mix."""
import numpy as np
import pytest
import torch
from torch import nn

from cxrsynth.eval.features import Features, IdentityFeatures, TorchScriptFeatures, extract
from cxrsynth.images import resize, to_image_tensor
from cxrsynth.eval.metrics import (ExtractorMismatch, auroc, closest_pairs_grid, compare, fid, fidelity,
                                   frechet_distance, gaussian_stats, kid, macro_auroc, memorization, per_label_auroc,
                                   pixel_vectors, prdc, roc_curve, same_extractor)


def feats(values, name="identity") -> Features:
    return Features(np.asarray(values, dtype=np.float64), name)


def gaussian(n, mean, scale, seed):
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, -0.2], [0.1, 0.0, 1.0]]) * scale
    return rng.normal(size=(n, 3)) @ mix + mean


def test_frechet_distance_closed_form_by_hand():
    # 1-D: (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sigma1_i - sigma2_i)^2 with sigma = standard deviations
    v = frechet_distance([0, 0], np.diag([1.0, 9.0]), [3, 4], np.diag([4.0, 1.0]))
    assert v == pytest.approx(25 + (1 - 2) ** 2 + (3 - 1) ** 2)
    mu, sigma = gaussian_stats(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]]))
    assert np.allclose(mu, [2.0, 4.0]) and np.allclose(sigma, [[4.0, 7.0], [7.0, 13.0]])


def test_fid_of_a_set_with_itself_is_zero():
    a = feats(gaussian(200, 0.0, 1.0, 0))
    assert abs(fid(a, a)["fid"]) < 1e-6


def test_fid_matches_the_closed_form_for_two_gaussian_feature_sets():
    a, b = gaussian(300, 0.0, 1.0, 1), gaussian(250, [0.5, -1.0, 0.0], 1.5, 2)
    expected = frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    got = fid(feats(a), feats(b))
    assert got["fid"] == pytest.approx(expected, rel=1e-6)
    assert expected > 1.0 and got["extractor"] == "identity" and (got["n_real"], got["n_fake"]) == (300, 250)


def test_kid_hand_computed_on_two_points():
    # k(x, y) = (x y / d + 1)^3 with d = 1; unbiased MMD^2 = (2*1 + 2*27) / 2 - 2 * (1 + 1 + 8 + 27) / 4 = 9.5
    out = kid(feats([[0.0], [1.0]]), feats([[1.0], [2.0]]), subsets=5)
    assert out["kid_mean"] == pytest.approx(9.5) and out["kid_std"] == pytest.approx(0.0)
    assert out["kid_subset_size"] == 2


def test_kid_is_seeded_and_near_zero_for_one_distribution():
    a, b = feats(gaussian(120, 0.0, 1.0, 3)), feats(gaussian(120, 0.0, 1.0, 4))
    far = feats(gaussian(120, 2.0, 1.0, 5))
    r1, r2 = kid(a, b, subsets=20, subset_size=50, seed=1), kid(a, b, subsets=20, subset_size=50, seed=1)
    assert r1 == r2
    assert abs(r1["kid_mean"]) < 0.1 * kid(a, far, subsets=20, subset_size=50)["kid_mean"]


def test_prdc_hand_computed_in_one_dimension():
    # real 0,1,2,3: radius (k=1) 1 each; fake 0.5 sits in the balls of 0 and 1, fake 10 in none;
    # fake radii are 9.5 (each other), so every real point is recalled; reals 0 and 1 are covered.
    out = prdc(feats([[0.0], [1.0], [2.0], [3.0]]), feats([[0.5], [10.0]]), k=1)
    assert out["precision"] == 0.5 and out["recall"] == 1.0
    assert out["density"] == 1.0 and out["coverage"] == 0.5
    assert out["k"] == 1 and out["extractor"] == "identity"
    with pytest.raises(ValueError, match="k=5"):
        prdc(feats([[0.0], [1.0]]), feats([[0.0], [1.0]]), k=5)


def test_numbers_from_different_extractors_are_never_compared():
    a, b = feats(gaussian(20, 0, 1, 0), "inception@aa"), feats(gaussian(20, 0, 1, 1), "xrv@bb")
    for fn in (fid, kid, prdc, fidelity):
        with pytest.raises(ExtractorMismatch):
            fn(a, b)
    r1 = fidelity(a, feats(gaussian(20, 0, 1, 2), "inception@aa"), k=3, kid_subsets=5)
    r2 = {**r1, "extractor": "xrv@bb"}
    with pytest.raises(ExtractorMismatch):
        compare(r1, r2)
    assert compare(r1, r1)["fid"] == 0.0
    with pytest.raises(ExtractorMismatch):
        same_extractor({"fid": 3.0})  # a number that does not say where it comes from
    with pytest.raises(ValueError):
        Features(np.zeros((3, 2)), "")


def test_auroc_hand_computed():
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(3.5 / 4)  # a tie counts half
    assert auroc([1, 0], [0.9, 0.1]) == 1.0 and auroc([0, 1], [0.9, 0.1]) == 0.0
    with pytest.raises(ValueError):
        auroc([1, 1], [0.2, 0.3])
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert np.allclose(fpr, [0, 0, 0.5, 0.5, 1]) and np.allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert np.allclose(thr[1:], [0.8, 0.4, 0.35, 0.1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


@pytest.mark.parametrize("ties", [False, True])
def test_vectorized_auroc_equals_torchmetrics_and_pins_todays_values(ties):
    from cxrsynth.eval.metrics import _auroc_rows

    rng = np.random.default_rng(5)
    y = rng.random((6, 40)) < 0.4
    s = rng.random((6, 40)) + 0.3 * y
    if ties:
        s = np.round(s * 4) / 4
    rows = _auroc_rows(y, s)
    for b in range(6):
        assert rows[b] == pytest.approx(auroc(y[b], s[b]), abs=1e-6)  # torchmetrics computes in float32
        fpr, tpr, _ = roc_curve(y[b], s[b])
        assert np.trapezoid(tpr, fpr) == pytest.approx(rows[b], abs=1e-6)
    # the values the hand-written AUROC gave before torchmetrics took over (seeded data above)
    pinned = {False: [0.6598, 0.7787, 0.7555, 0.7315, 0.6292, 0.6516],
              True: [0.633, 0.748, 0.7404, 0.6829, 0.6483, 0.6316]}
    assert np.round(rows, 4).tolist() == pytest.approx(pinned[ties], abs=6e-5)


def test_per_label_auroc_skips_one_class_labels_and_is_seeded():
    nan = np.nan
    targets = np.array([[0, 1, 1], [0, 1, nan], [1, 1, 0], [1, 1, 1], [nan, 1, 0], [0, 1, 1]], dtype=float)
    scores = np.array([[0.1, 0.5, 0.9], [0.4, 0.5, 0.0], [0.35, 0.5, 0.2], [0.8, 0.5, 0.7], [0.99, 0.5, 0.6],
                       [0.2, 0.5, 0.8]])
    res = per_label_auroc(targets, scores, ["a", "b", "c"], n_boot=200, seed=3)
    assert set(res) == {"a", "c"}  # b has no negatives
    a = res["a"]
    # rows 0,1,2,3,5: labels 0,0,1,1,0 scores .1,.4,.35,.8,.2 -> positives beat 5 of 6 negative pairs
    assert a.auroc == pytest.approx(5 / 6) and (a.positives, a.negatives) == (2, 3)
    assert res["c"].auroc == pytest.approx(1.0) and (res["c"].positives, res["c"].negatives) == (3, 2)
    assert 0.0 <= a.ci_low <= a.auroc <= a.ci_high <= 1.0
    assert per_label_auroc(targets, scores, ["a", "b", "c"], n_boot=200, seed=3) == res
    assert np.isnan(per_label_auroc(targets, scores, ["a", "b", "c"], n_boot=0)["a"].ci_low)
    assert macro_auroc(res) == (pytest.approx((5 / 6 + 1) / 2), ["a", "c"])
    assert macro_auroc(res, min_positives=3) == (pytest.approx(1.0), ["c"])
    value, used = macro_auroc(res, min_positives=10)
    assert np.isnan(value) and used == []


def test_memorization_flags_planted_copies_and_passes_independent_samples():
    rng = np.random.default_rng(0)
    train_px = rng.integers(0, 256, size=(80, 16, 16), dtype=np.uint8)
    test_px = rng.integers(0, 256, size=(40, 16, 16), dtype=np.uint8)
    new_px = rng.integers(0, 256, size=(30, 16, 16), dtype=np.uint8)
    copied = [3, 17, 42, 61, 77]
    copies_px = np.clip(train_px[copied].astype(int) + rng.integers(-2, 3, size=(5, 16, 16)), 0, 255).astype(np.uint8)
    train_f, test_f, new_f = rng.normal(size=(80, 8)), rng.normal(size=(40, 8)), rng.normal(size=(30, 8))
    copies_f = train_f[copied] + 1e-3 * rng.normal(size=(5, 8))
    synth_px = np.concatenate([new_px, copies_px])
    synth_f = np.concatenate([new_f, copies_f])
    rep = memorization(feats(synth_f), feats(train_f), feats(test_f), pixel_vectors(synth_px, 8),
                       pixel_vectors(train_px, 8), pixel_vectors(test_px, 8), percentile=5.0)
    assert rep.near_copy[30:].all() and rep.near_copy_feature[30:].all() and rep.near_copy_pixel[30:].all()
    assert list(rep.nn_feature[30:]) == copied and list(rep.nn_pixel[30:]) == copied
    assert rep.near_copy[:30].mean() <= 0.2
    s = rep.summary()
    assert s["near_copy_rate"] == pytest.approx(rep.near_copy.mean()) and s["extractor"] == "identity"
    assert set(rep.closest(5)) == set(range(30, 35))
    sheet = closest_pairs_grid(rep, synth_px, train_px, n=4)
    assert sheet.size[0] == 4 * 160
    with pytest.raises(ExtractorMismatch):
        memorization(feats(synth_f, "other"), feats(train_f), feats(test_f), pixel_vectors(synth_px, 8),
                     pixel_vectors(train_px, 8), pixel_vectors(test_px, 8))


def test_pixel_vectors_are_rms_distances():
    a = np.zeros((1, 8, 8), np.uint8)
    b = np.full((1, 8, 8), 255, np.uint8)
    va, vb = pixel_vectors(a, 8), pixel_vectors(b, 8)
    assert np.linalg.norm(va - vb) == pytest.approx(1.0)


class Tiny(nn.Module):
    def __init__(self, with_attributes: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3 if not with_attributes else 1, 4, 3, padding=1)
        if with_attributes:
            self.input_size = 16
            self.num_features = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_extractor_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    net = Tiny(with_attributes=True).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    ext = TorchScriptFeatures(path, name="tiny")
    assert ext.num_features == 4 and ext.input_size == 16 and ext.name.startswith("tiny@")
    images = np.random.default_rng(0).integers(0, 256, size=(6, 20, 20), dtype=np.uint8)
    f = extract(ext, images, batch_size=4)
    assert f.values.shape == (6, 4) and f.extractor == ext.name
    x = torch.nn.functional.interpolate(to_image_tensor(images), size=(16, 16), mode="bilinear", antialias=True)
    assert np.allclose(f.values, net(x).detach().numpy(), atol=1e-6)
    out = fid(f, extract(ext, images[::-1].copy()))
    assert abs(out["fid"]) < 1e-4 and out["extractor"] == ext.name
    # a module without attributes: size and channels given, feature count probed
    path3 = tmp_path / "rgb.pt"
    torch.jit.save(torch.jit.script(Tiny(with_attributes=False)), str(path3))
    ext3 = TorchScriptFeatures(path3, input_size=12, in_channels=3)
    assert ext3.num_features == 4 and extract(ext3, images).values.shape == (6, 4)
    with pytest.raises(ValueError, match="input_size"):
        TorchScriptFeatures(path3, in_channels=3)
    with pytest.raises(FileNotFoundError):
        TorchScriptFeatures(tmp_path / "missing.pt")


def test_torch_export_program_as_extractor(tmp_path):
    net = Tiny(with_attributes=False).eval()
    program = torch.export.export(net, (torch.rand(2, 3, 12, 12),), dynamic_shapes={"x": {0: torch.export.Dim("n")}})
    torch.export.save(program, str(tmp_path / "rgb.pt2"))
    ext = TorchScriptFeatures(tmp_path / "rgb.pt2", input_size=12, in_channels=3)
    images = np.random.default_rng(1).integers(0, 256, size=(5, 12, 12), dtype=np.uint8)
    x = to_image_tensor(images).expand(-1, 3, -1, -1)
    assert ext.num_features == 4 and ext.name.startswith("rgb@")
    assert np.allclose(extract(ext, images).values, net(x).detach().numpy(), atol=1e-6)


def test_identity_features_feed_torchmetrics_directly():
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = gaussian(50, 0.0, 1.0, 7), gaussian(60, 1.0, 1.0, 8)
    metric = FrechetInceptionDistance(feature=IdentityFeatures(3))
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert float(metric.compute()) == pytest.approx(fid(feats(a), feats(b))["fid"])


# ----------------------------------------------------------------------------------------------------------------
# chunked nearest neighbours and PRDC equal the full-matrix computation

def _prdc_full(real, fake, k):
    """The full-matrix PRDC (the algorithm before chunking), as the oracle."""
    from cxrsynth.eval.metrics import pairwise_distances

    def radius(x):
        return np.partition(pairwise_distances(x, x), k, axis=1)[:, k]

    r_real, r_fake = radius(real), radius(fake)
    d = pairwise_distances(real, fake)
    inside = d < r_real[:, None]
    return {"precision": float(inside.any(axis=0).mean()), "recall": float((d < r_fake[None, :]).any(axis=1).mean()),
            "density": float(inside.sum(axis=0).mean() / k), "coverage": float((d.min(axis=1) < r_real).mean())}


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_nearest_and_prdc_equal_the_full_matrix(chunk):
    from cxrsynth.eval.metrics import kth_neighbour_radius, nearest, pairwise_distances, prdc

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(203, 6)), rng.normal(0.3, 1.1, size=(151, 6))
    fake[5] = real[17]                                  # an exact hit
    ref = np.concatenate([real, real[:10]])             # duplicated rows: ties go to the lower index
    full = pairwise_distances(fake, ref)
    idx, dist = nearest(fake, ref, chunk=chunk)
    # a one-row chunk is a matrix-vector product: its last bit may differ from the matrix product's
    assert np.array_equal(idx, full.argmin(axis=1)) and np.allclose(dist, full.min(axis=1), rtol=1e-12, atol=1e-12)
    if chunk is None:  # small sets fit one chunk: bit for bit the full matrix
        assert np.array_equal(dist, full.min(axis=1))
    assert idx[5] == 17 and dist[5] == 0.0 and (idx < len(real)).all()
    assert np.allclose(kth_neighbour_radius(real, 5, chunk),
                       np.partition(pairwise_distances(real, real), 5, axis=1)[:, 5], rtol=1e-12, atol=1e-12)
    got = prdc(Features(real, "x"), Features(fake, "x"), k=5, chunk=chunk)
    assert {k: got[k] for k in ("precision", "recall", "density", "coverage")} == _prdc_full(real, fake, 5)


def test_chunks_stay_within_their_budget(monkeypatch):
    import cxrsynth.eval.metrics as M

    seen = []
    block = M._distance_block
    monkeypatch.setattr(M, "_distance_block", lambda x, b, bb: seen.append(len(x) * len(b)) or block(x, b, bb))
    monkeypatch.setattr(M, "CHUNK_BYTES", 8 * 40 * 50)  # 40 rows against 50 points
    rng = np.random.default_rng(0)
    M.nearest(rng.normal(size=(333, 4)), rng.normal(size=(50, 4)))
    assert max(seen) == 40 * 50 and sum(seen) == 333 * 50


def test_pixel_vectors_are_float32_and_batch_independent():
    from cxrsynth.eval.metrics import pixel_vectors

    imgs = np.random.default_rng(1).integers(0, 256, (7, 40, 40), dtype=np.uint8)
    a = pixel_vectors(imgs, 16)
    assert a.dtype == np.float32 and a.shape == (7, 256)
    for batch in (1, 3):
        assert np.array_equal(pixel_vectors(imgs, 16, batch=batch), a)
    ref = resize(to_image_tensor(imgs), 16).reshape(7, -1).double().numpy() / 16  # the float64 values, rounded once
    assert np.array_equal(a, ref.astype(np.float32))
