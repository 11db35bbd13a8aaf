"""Stage `evaluate`: every metric block on tiny data with known answers, the whole evaluation on a tiny fake pipeline,
and the ablation switches (what the generator sees really changes)."""
import dataclasses
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from cxrsynth.config import ClassifierParams, EvaluateParams, params_from_dict
from cxrsynth.eval.features import Features
from cxrsynth.eval.metrics import memorization
from cxrsynth.stages.evaluate import (agreement, alignment_block, auroc_block, counterparts, derangement, evaluate_all,
                                      fidelity_block, load_align, privacy_block, rare_labels, subsample, to_size,
                                      utility_params)
from cxrsynth.eval.pictures import Pictures, text_tile
from cxrsynth.eval.geometry import effusion_asymmetry, geometry_block, one_sided_effusion
from cxrsynth.data.synthetic import EvaluateError, load_synthetic
from cxrsynth.keypatches import KeyPatch, KeyPatchBank
from cxrsynth.models.classifier import Classifier, ClassifierConfig
from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.text.specs import Term

L = len(OBSERVATIONS)


def _blobs(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 images: a bright disc at a random place on a dark gradient (distinct, structured)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        img = 0.2 + 0.2 * yy + 0.6 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        out.append(np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1))
    return (np.stack(out) * 255).astype(np.uint8)


def _labels(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.choice([1.0, 0.0, np.nan], size=(n, L), p=[0.4, 0.4, 0.2])
    y[0, 0] = -1.0
    return y


def _synthetic_manifest(n: int, seed: int, dicom_ids=()) -> pd.DataFrame:
    labels = _labels(n, seed)
    rows = []
    for i in range(n):
        src = dicom_ids[i] if i < len(dicom_ids) else np.nan
        rows.append({"synthetic_id": f"x{i:03d}", "prompt_id": f"p{i:03d}", "sample": 0,
                     "kind": "paired" if isinstance(src, str) else "sampled",
                     "text": f"FINDINGS: finding {i}.", "view": "PA",
                     "terms": json.dumps([{"pathology": "pleural effusion", "certainty": "present",
                                           "side": "left" if i % 2 else "right"}]),
                     "key_patches": "[]", "seed": i, "file": f"images/x{i:03d}.png",
                     **{c: labels[i, j] for j, c in enumerate(OBSERVATIONS)},
                     "source_study_id": np.nan, "source_dicom_id": src})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# inputs


def test_load_synthetic_round_trip_and_errors(tmp_path):
    man = _synthetic_manifest(4, 0)
    images = _blobs(4, 16, 0)
    man.to_parquet(tmp_path / "manifest.parquet")
    np.save(tmp_path / "images.npy", images)
    s = load_synthetic(tmp_path)
    assert s.size == 16 and len(s.images) == 4 and s.tokens is None
    np.testing.assert_array_equal(s.images, images)
    np.testing.assert_array_equal(s.labels, man[list(OBSERVATIONS)].to_numpy(float))
    np.save(tmp_path / "tokens.npy", np.zeros((4, 4, 4), np.uint16))
    assert load_synthetic(tmp_path).tokens.shape == (4, 4, 4)

    np.save(tmp_path / "images.npy", images[:3])
    with pytest.raises(EvaluateError, match="4 rows but there are 3 images"):
        load_synthetic(tmp_path)
    np.save(tmp_path / "images.npy", images.astype(np.float32))
    with pytest.raises(EvaluateError, match="expected uint8"):
        load_synthetic(tmp_path)
    man.drop(columns=["Edema"]).to_parquet(tmp_path / "manifest.parquet")
    np.save(tmp_path / "images.npy", images)
    with pytest.raises(EvaluateError, match="missing columns.*Edema"):
        load_synthetic(tmp_path)
    with pytest.raises(EvaluateError, match="missing"):
        load_synthetic(tmp_path / "nowhere")


def test_counterparts_match_by_dicom_id_and_skip_unknown():
    man = _synthetic_manifest(4, 0, dicom_ids=["b", "zzz", np.nan, "a"])
    test_rows = pd.DataFrame({"dicom_id": ["a", "b", "c"], "image_row": [0, 1, 2]})
    s, r = counterparts(man, test_rows)
    assert s.tolist() == [0, 3] and r.tolist() == [1, 0]
    s, r = counterparts(_synthetic_manifest(3, 0), test_rows)
    assert len(s) == len(r) == 0


def test_to_size_is_the_project_resize():
    img = _blobs(2, 32, 1)
    small = to_size(img, 16)
    assert small.shape == (2, 16, 16) and small.dtype == np.float32 and 0 <= small.min() and small.max() <= 1
    np.testing.assert_allclose(to_size(img, 32), img / 255.0, atol=1e-6)  # same size: untouched


# ----------------------------------------------------------------------------------------------------------------
# metric blocks


def test_fidelity_block_identical_sets_and_tags():
    rng = np.random.default_rng(0)
    x = Features(rng.normal(size=(40, 3)), "ex@1")
    far = Features(rng.normal(size=(40, 3)) + 20.0, "ex@1")
    out = fidelity_block(x, {"fidelity": far, "floor": x}, k=3, kid_subsets=5, kid_subset_size=20, seed=0, tag="clf")
    assert out["floor/clf/fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["floor/clf/precision"] == out["floor/clf/recall"] == out["floor/clf/coverage"] == 1.0
    assert out["fidelity/clf/fid"] > 1000 and out["fidelity/clf/precision"] == 0.0
    assert out["fidelity/clf/extractor"] == "ex@1" and out["fidelity/clf/n"] == 40
    with pytest.raises(ValueError, match="different feature extractors"):
        fidelity_block(x, {"fidelity": Features(far.values, "other@2")}, k=3, kid_subsets=5, kid_subset_size=20,
                       seed=0, tag="clf")


def test_subsample_is_seeded_sorted_and_capped():
    a = subsample(100, 10, 3)
    assert len(a) == 10 and (np.diff(a) > 0).all() and a.tolist() == subsample(100, 10, 3).tolist()
    assert subsample(5, 10, 0).tolist() == [0, 1, 2, 3, 4]


def test_auroc_block_known_values_and_missing_classes():
    t = np.full((8, L), np.nan)
    t[:, 0] = [1, 1, 1, 1, 0, 0, 0, 0]
    t[:, 1] = [1, 1, 1, 1, 0, 0, 0, 0]
    t[:, 2] = 1.0  # no negatives: not scoreable
    s = np.zeros((8, L))
    s[:, 0] = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]   # perfect
    s[:, 1] = s[::-1, 0]                                  # reversed
    out, per = auroc_block("sem", t, s, OBSERVATIONS, min_count=4, n_boot=0, seed=0)
    assert out[f"sem/auroc/{OBSERVATIONS[0]}"] == 1.0 and out[f"sem/auroc/{OBSERVATIONS[1]}"] == 0.0
    assert out[f"sem/auroc/{OBSERVATIONS[2]}"] is None and out[f"sem/positives/{OBSERVATIONS[2]}"] == 8
    assert out["sem/macro_auroc"] == 0.5 and out["sem/macro_auroc_labels"] == 2
    out, _ = auroc_block("sem", t, s, OBSERVATIONS, min_count=5, n_boot=0, seed=0)
    assert out["sem/macro_auroc"] is None and out["sem/macro_auroc_labels"] == 0


def test_agreement_known_values():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.5]])
    full = agreement(a, a)
    assert full["corr"] == pytest.approx(1.0) and full["mae"] == 0.0 and full["decision"] == 1.0
    b = np.array([[0.1, 0.1], [0.8, 0.8], [0.4, 0.5]])  # label 0 inverted, label 1 identical
    out = agreement(a, b)
    assert out["corr"] == pytest.approx(0.0, abs=1e-9) and out["corr_labels"] == 2
    assert out["mae"] == pytest.approx((0.8 + 0.6 + 0.2) / 6, abs=1e-6)
    assert out["decision"] == pytest.approx(3 / 6)
    assert agreement(np.zeros((0, 2)), np.zeros((0, 2)))["corr"] is None
    with pytest.raises(ValueError):
        agreement(a, a[:2])


def test_derangement_has_no_fixed_points():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 50):
        for _ in range(20):
            p = derangement(n, rng)
            assert sorted(p.tolist()) == list(range(n)) and not (p == np.arange(n)).any()
    with pytest.raises(ValueError):
        derangement(1, rng)


def test_alignment_block_matched_beats_shuffled():
    grids = np.stack([np.full((4, 4), i) for i in range(6)])
    texts = [str(i) for i in range(6)]

    def score(t, g):  # 1 for a text with its own image, 0 otherwise
        return np.array([float(int(a) == int(b[0, 0])) for a, b in zip(t, g)])

    out = alignment_block(score, texts, grids, shuffles=3, seed=0)
    assert out["alignment/matched_mean"] == 1.0 and out["alignment/shuffled_mean"] == 0.0
    assert out["alignment/gap"] == 1.0 and out["alignment/win_rate"] == 1.0 and out["alignment/n"] == 6
    blind = alignment_block(lambda t, g: np.ones(len(t)), texts, grids, shuffles=3, seed=0, prefix="a")
    assert blind["a/gap"] == 0.0 and blind["a/win_rate"] == 0.0
    assert alignment_block(score, texts[:1], grids[:1], shuffles=3, seed=0)["alignment/gap"] is None


def test_rare_labels_and_utility_budget():
    train = np.zeros((10, L))
    train[:, 0] = 1.0          # common
    train[:3, 1] = 1.0         # rare
    train[:1, 2] = 1.0         # rarest
    test = np.zeros((12, L))
    test[:6, :3] = 1.0
    assert rare_labels(train, test, OBSERVATIONS, 2, min_count=5) == [OBSERVATIONS[2], OBSERVATIONS[1]]
    assert rare_labels(train, test, OBSERVATIONS, 5, min_count=7) == []  # nothing scoreable
    c = ClassifierParams(epochs=60, input_size=128, warmup_epochs=1.0)
    p = utility_params(c, EvaluateParams(utility_epochs=0, utility_input_size=0))
    assert (p.epochs, p.input_size) == (60, 128)
    p = utility_params(c, EvaluateParams(utility_epochs=3, utility_input_size=32))
    assert (p.epochs, p.input_size, p.lr, p.batch_size) == (3, 32, c.lr, c.batch_size)


def test_privacy_block_flags_copies_not_new_images():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 4))
    test = rng.normal(size=(30, 4))
    f = lambda v: Features(v, "ex@1")  # noqa: E731
    copies = train[:20] + 1e-6
    fresh = rng.normal(size=(20, 4)) + 6.0
    for synth, rate in ((copies, 1.0), (fresh, 0.0)):
        mem = memorization(f(synth), f(train), f(test), synth, train, test, percentile=5.0)
        out = privacy_block(mem, np.ones(30))
        assert out["privacy/near_copy_rate"] == rate
        assert out["privacy/expected_near_copy_rate"] == 0.05 and out["privacy/reference_median_nn_feature"] == 1.0


def test_geometry_block_known_values():
    ctr = np.array([0.6, 0.55, np.nan, 0.4, 0.45, 0.42])
    asked = np.array([True, True, True, False, False, False])
    sides = ["right", "left", None, "left", None, "right"]
    asym = np.array([0.2, -0.1, np.nan, 0.3, np.nan, np.nan])
    out = geometry_block("g", ctr, asked, sides, asym)
    assert out["g/ctr_mean_asked"] == pytest.approx(0.575) and out["g/ctr_enlarged_rate_asked"] == 1.0
    assert out["g/ctr_enlarged_rate_not_asked"] == 0.0 and out["g/ctr_auroc"] == 1.0
    assert out["g/ctr_unmeasurable_rate"] == pytest.approx(1 / 6, abs=1e-6) and out["g/n_asked"] == 3
    assert out["g/effusion_n"] == 3 and out["g/effusion_side_accuracy"] == pytest.approx(2 / 3, abs=1e-6)


def test_one_sided_effusion_reads_the_terms():
    t = lambda *ts: json.dumps([dict(x) for x in ts])  # noqa: E731
    eff = {"pathology": "pleural effusion", "certainty": "present", "side": "left"}
    assert one_sided_effusion(t(eff)) == "left"
    assert one_sided_effusion(t(eff, {**eff, "side": "right"})) is None          # both sides
    assert one_sided_effusion(t({**eff, "side": "bilateral"})) is None
    assert one_sided_effusion(t({**eff, "certainty": "absent"})) is None
    assert one_sided_effusion(t({**eff, "certainty": "uncertain"})) is None
    assert one_sided_effusion(None) is None


@pytest.mark.parametrize("seed", [0, 1])
def test_effusion_asymmetry_points_to_the_effusion_side_on_phantom_images(seed):
    from cxrsynth.data.phantom.render import render_image
    from cxrsynth.data.phantom.truth import Anatomy, Finding, Pose

    anatomy = Anatomy(sex="M", age=60, thorax_width=0.7, lung_height=0.58, ctr=0.44, mediastinum_width=0.26,
                      soft_tissue=0.3)
    pose = Pose(rotation=0.5, shift_x=0.0, shift_y=0.0, inspiration=10.0, exposure=1.0, noise=0.01, seed=seed)
    values = {}
    for side in ("right", "left"):
        img = render_image(anatomy, [Finding("effusion", side, "large")], 0.44, "PA", pose, 320, 300).image
        values[side] = effusion_asymmetry(to_size(img[None].astype(np.float32), 64)[0])
    # the patient's right is the image's left on a frontal view
    assert values["right"] > 0 > values["left"], values


def test_text_tile_draws_text():
    blank, tile = text_tile(""), text_tile("FINDINGS: large left pleural effusion.")
    assert tile.shape == (160, 160) and tile.dtype == np.uint8
    assert (blank == 255).all() and (tile < 128).sum() > 20


# ----------------------------------------------------------------------------------------------------------------
# the ablation switches change what the generator sees


def test_no_key_patches_means_none_are_selected():
    bank = KeyPatchBank((4, 4), 8, {"pleural effusion": [KeyPatch(1, 3, 0, 0.9, "pleural effusion"),
                                                        KeyPatch(2, 3, 1, 0.8, "pleural effusion")]})
    terms = [Term("pleural effusion", "present", None, "left")]
    assert len(bank.select(terms, 5)) == 2
    assert bank.select(terms, 0) == []


def test_generator_prompts_differ_between_ablation_arms():
    gen_mod = pytest.importorskip("cxrsynth.models.generator")
    grid, codes = (4, 4), 8
    bank = KeyPatchBank(grid, codes, {"pleural effusion": [KeyPatch(1, 3, 0, 0.9, "pleural effusion"),
                                                          KeyPatch(2, 3, 1, 0.8, "pleural effusion")]})
    texts = ["FINDINGS: Large left pleural effusion.", "FINDINGS: No pleural effusion. Normal heart size."] * 3
    tok = gen_mod.build_tokenizer(texts, 30, grid, codes)
    spec = gen_mod.ModelSpec(d_model=16, n_layers=1, n_heads=2)
    tokens = np.zeros((len(texts), *grid), np.uint16)
    terms = [[Term("pleural effusion", "present", None, "left")], []] * 3
    seen = {}
    for k in (5, 0):
        gen = gen_mod.new_generator(spec, tok, grid=grid, codebook_size=codes, key_patches=k, max_text_tokens=16,
                                    bank=bank, seed=0)
        data = gen_mod.training_data(gen, texts, ["PA"] * len(texts), tokens, lambda t: terms[texts.index(t)])
        seen[k] = (gen.layout, data)
    lay5, d5 = seen[5]
    lay0, d0 = seen[0]
    assert d5.n_key_patches.tolist()[:2] == [2, 0] and d0.n_key_patches.sum() == 0
    assert (d5.prompt == lay5.kp_id).any() and not (d0.prompt == lay0.kp_id).any()
    # the key patch (code 1 at row 3, col 0) is in the prompt of arm (c) only
    assert (d5.prompt[0] == lay5.img_offset + 1).any() and (d5.prompt[0] == lay5.pos_offset + 12).any()
    assert not (d0.prompt >= lay0.pos_offset).logical_and(d0.prompt < lay0.pos_offset + 16).any()


def test_ablation_params_are_switches():
    p = params_from_dict({"generator": {"key_patches": 0}, "synthesize": {"prompt_source": "reports"}})
    assert p.generator.key_patches == 0 and p.synthesize.prompt_source == "reports"
    assert params_from_dict({}).generator.key_patches > 0


# ----------------------------------------------------------------------------------------------------------------
# the whole evaluation on a tiny fake pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from cxrsynth.data.tokens import write_tokens
    from cxrsynth.models.vqgan import VQGAN, VQGANConfig, weights_sha256

    root = tmp_path_factory.mktemp("pipe")
    interim, models, synth, tokens = root / "interim", root / "models", root / "synthetic", root / "tokens"
    for d in (interim, models, synth):
        d.mkdir()
    n = {"train": 24, "validate": 12, "test": 12}
    rows, images = [], {}
    for k, (split, m) in enumerate(n.items()):
        images[split] = _blobs(m, 32, 10 + k)
        np.save(interim / f"images_{split}.npy", images[split])
        labels = _labels(m, 20 + k)
        labels[:, 3] = np.arange(m) % 2  # a label with both classes everywhere
        for i in range(m):
            rows.append({"subject_id": 1000 * k + i, "study_id": 5000 + 100 * k + i, "dicom_id": f"{split}-{i}",
                         "split": split, "view": "PA", "image_row": i,
                         **{c: labels[i, j] for j, c in enumerate(OBSERVATIONS)}})
    pd.DataFrame(rows).to_parquet(interim / "manifest.parquet")
    torch.manual_seed(0)
    Classifier(ClassifierConfig(width=4, depth=(1,), input_size=16, stem_downsample=2)).save(models / "classifier")
    vq = VQGAN(VQGANConfig(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
                           embed_dim=8, codebook_size=32))
    grids = {s: vq.tokenize(images[s]) for s in n}  # first use: the k-means codebook initialisation happens here
    vq.save(models / "vqgan")
    write_tokens(tokens, grids, codebook_size=32, image_size=16, vqgan_sha256=weights_sha256(models / "vqgan"))
    from cxrsynth.config import AlignParams
    from cxrsynth.models.align_training import build_model

    torch.manual_seed(0)  # an untrained alignment model: the score contract is what is tested here
    ap = AlignParams(text_encoder="scratch", scratch_vocab_size=60, scratch_hidden=16, scratch_layers=1,
                     scratch_heads=2, text_head_layers=0, embed_dim=16, patch_dim=16, patch_layers=0, patch_heads=2)
    align = build_model(ap, [f"FINDINGS: finding {i}." for i in range(20)], vq.codebook.detach().clone(), (8, 8),
                        root / "align-work")
    align.save(models / "align")
    man = _synthetic_manifest(14, 3, dicom_ids=[f"test-{i}" for i in range(6)])
    man.to_parquet(synth / "manifest.parquet")
    np.save(synth / "images.npy", _blobs(14, 16, 30))
    cp = dataclasses.replace(ClassifierParams(), width=4, depth=(1,), input_size=16, batch_size=8, epochs=1,
                             warmup_epochs=0.0, bootstrap=0)
    ep = EvaluateParams(prdc_k=2, kid_subsets=3, bootstrap=20, min_count=2, utility_epochs=1, utility_input_size=16,
                        rare_labels=2, closest_pairs=2, sample_rows=3, label_examples=2)
    return dict(root=root, interim=interim, models=models, synth=synth, tokens=tokens, cp=cp, ep=ep)


def _run(t, ep=None, phantom=None):
    pics = Pictures.under(t["root"] / "metrics")
    m = evaluate_all(ep or t["ep"], t["cp"], synthetic_dir=t["synth"], interim=t["interim"], tokens_dir=t["tokens"],
                     models=t["models"], phantom=phantom or t["root"] / "no-phantom", pictures=pics, seed=0,
                     progress=False, log=lambda s: None)
    return m, pics


def test_evaluate_all_on_a_tiny_pipeline(tiny_pipeline):
    t = tiny_pipeline
    phantom = t["root"] / "phantom"
    phantom.mkdir(exist_ok=True)
    with open(phantom / "ground_truth.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"dicom_id": f"test-{i}", "ctr": 0.45 + 0.02 * (i % 2), "view": "PA",
                                "findings": [{"kind": "effusion", "side": "left"}] if i % 3 == 0 else []}) + "\n")
    m, pics = _run(t, phantom=phantom)
    for p in (pics.roc, pics.samples, pics.label_examples, pics.closest_pairs):
        assert p.is_file() and p.stat().st_size > 1000
    assert m["n_synthetic"] == 14 and m["compare_size"] == 16 and m["paired/n"] == 6
    assert m["n_kind/paired"] == 6 and m["n_kind/sampled"] == 8
    for block in ("fidelity", "floor", "codebook_floor"):
        assert m[f"{block}/classifier/fid"] >= 0 and m[f"{block}/classifier/extractor"].startswith("cxrsynth-classif")
    assert m["floor/classifier/n"] == 14  # train subsampled to the synthetic count
    assert 0 <= m["semantic/macro_auroc"] <= 1 and m["semantic/macro_auroc_labels"] >= 1
    assert m["paired/agreement_mae"] is not None and m["paired/real_macro_auroc"] is not None
    assert m["alignment/n"] == 14 and m["alignment/real/n"] == 6 and "skipped/alignment" not in m
    assert -1 <= m["alignment/matched_mean"] <= 1 and 0 <= m["alignment/win_rate"] <= 1
    assert load_align(t["root"] / "nowhere") == (None, f"{t['root'] / 'nowhere'}: alignment model missing")
    assert 0 <= m["privacy/near_copy_rate"] <= 1 and m["privacy/median_nn_feature"] > 0
    for arm in ("real", "synthetic", "real_plus_synthetic"):
        assert f"utility/{arm}/macro_auroc" in m
    assert m["utility/real_plus_synthetic/n_train"] == 24 + 14 and m["utility/epochs"] == 1
    assert "phantom/ctr_auroc" in m and m["phantom/real/n_asked"] == 0 and "skipped/phantom" not in m
    json.dumps(m, allow_nan=False)  # a valid metrics file: no NaN
    assert all(not isinstance(v, float) or math.isfinite(v) for v in m.values())


def test_evaluate_all_is_deterministic_uses_synthesize_tokens_and_skips_without_phantom(tiny_pipeline, monkeypatch):
    import cxrsynth.stages.evaluate as ev

    seen = []

    class FakeAlign:
        def score(self, texts, grids):
            seen.append(np.asarray(grids).copy())
            return np.arange(len(texts), dtype=float)

    monkeypatch.setattr(ev, "load_align", lambda path: (FakeAlign(), ""))
    synth = tiny_pipeline["synth"]
    grids = np.arange(14 * 64).reshape(14, 8, 8).astype(np.uint16) % 32
    np.save(synth / "tokens.npy", grids)
    class Pool(torch.nn.Module):  # a second feature space: 2 x 2 average pooling
        def __init__(self):
            super().__init__()
            self.input_size, self.num_features = 16, 4

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, yet what most users export
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Pool()), str(tiny_pipeline["root"] / "pool.pt"))
    ep = dataclasses.replace(tiny_pipeline["ep"], utility=False, extra_extractor=str(tiny_pipeline["root"] / "pool.pt"))
    try:
        a, _ = _run(tiny_pipeline, ep)
        n_calls = len(seen)
        b, _ = _run(tiny_pipeline, ep)
    finally:
        (synth / "tokens.npy").unlink()
    assert a == b
    assert a["fidelity/extra/extractor"].startswith("pool@") and a["floor/extra/fid"] >= 0
    assert a["fidelity/extra/fid"] != a["fidelity/classifier/fid"]
    np.testing.assert_array_equal(seen[0], grids)  # synthesize's tokens, not a re-encoding
    np.testing.assert_array_equal(seen[n_calls], grids)
    assert a["alignment/n"] == 14 and a["alignment/real/n"] == 6 and a["alignment/matched_mean"] == 6.5
    assert a["phantom/ctr_auroc"] is None and "no phantom ground truth" in a["skipped/phantom"]
    assert a["skipped/utility"] and "utility/real/macro_auroc" not in a


def test_report_prompts_differ_from_anatomy_pathology_prompts():
    syn = pytest.importorskip("cxrsynth.pipeline")
    report = "FINDINGS: There is a moderate left pleural effusion.\n\nIMPRESSION: Left effusion."
    manifest = pd.DataFrame([{"subject_id": 1, "study_id": 7, "dicom_id": "d7", "split": "test", "view": "PA",
                              "findings": "There is a moderate left pleural effusion.",
                              "impression": "Left effusion.", "report": report,
                              **{c: (1.0 if c == "Pleural Effusion" else np.nan) for c in OBSERVATIONS}}])
    prompts = pd.DataFrame([{"prompt_id": "p7", "kind": "paired", "text": "FINDINGS: Moderate effusion in the left "
                             "costophrenic angle.", "view": "PA", "seed": 0, "source_study_id": 7.0,
                             "source_dicom_id": "d7", "terms": json.dumps([{"pathology": "pleural effusion",
                                                                            "certainty": "present",
                                                                            "anatomy": "left costophrenic angle",
                                                                            "side": "left"}]),
                             **{c: (1.0 if c == "Pleural Effusion" else np.nan) for c in OBSERVATIONS}}])
    (a,), (b,) = syn.prompts_from_parquet(prompts), syn.prompts_from_reports(manifest)
    assert a.source_dicom_id == b.source_dicom_id == "d7"   # the same real image behind both arms
    assert a.kind == "paired" and b.kind == "report" and a.text != b.text
    assert "costophrenic" in a.text and "costophrenic" not in b.text


def test_ablation_table_lines_up_arms_and_reference():
    from bench.ablations import table

    c = {"n_synthetic": 266, "n_real_test": 70, "fidelity/classifier/fid": 12.5, "floor/classifier/fid": 3.5,
         "fidelity/classifier/kid_mean": 0.0123, "semantic/macro_auroc": 0.71, "utility/rare_labels": "Fracture",
         "skipped/alignment": "models/align: alignment model missing"}
    a = {**c, "fidelity/classifier/fid": 20.25, "semantic/macro_auroc": None}
    md = table({"a": a, "c": c})
    row = next(line for line in md.splitlines() if line.startswith("| FID"))
    assert row.split("|")[2:5] == [" 20.250 ", " 12.500 ", " 3.500 "]
    assert "(b)" not in md and "| KID (mean over subsets) (lower better) | 0.0123 | 0.0123 |" in md
    assert "semantic macro AUROC" in md and "| - | 0.710 |" in md
    assert "Rare labels (fewest real training positives): Fracture." in md and "alignment model missing" in md


def test_every_headline_is_recomputed_from_the_per_item_table(tiny_pipeline, tmp_path):
    from cxrsynth.eval import headlines
    from cxrsynth.eval.items import read_items

    t = tiny_pipeline
    phantom = tmp_path / "phantom"
    phantom.mkdir()
    with open(phantom / "ground_truth.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"dicom_id": f"test-{i}", "ctr": 0.5, "view": "PA",
                                "findings": [{"kind": "effusion", "side": "right"}] if i % 2 else []}) + "\n")
    items_path = tmp_path / "evaluation" / "items.parquet"
    m = evaluate_all(t["ep"], t["cp"], synthetic_dir=t["synth"], interim=t["interim"], tokens_dir=t["tokens"],
                     models=t["models"], phantom=phantom, pictures=Pictures.under(tmp_path / "metrics"), seed=0,
                     progress=False, log=lambda s: None, items_path=items_path)
    items = read_items(items_path)
    assert (items.df.role == "synthetic").sum() == 14 and (items.df.role == "real_test").sum() == 12
    res = headlines.intervals(items, n_boot=20, seed=0)
    checked = 0
    for h in headlines.HEADLINES:
        if h.key not in m or m[h.key] is None:
            continue
        tol = 1e-3 if "fid" in h.name else 1e-4  # FID: torchmetrics (float64 sqrtm) vs the closed form
        assert res[h.name].value == pytest.approx(m[h.key], rel=tol, abs=1e-4), h.name
        checked += 1
    assert checked >= 10
    out, summary = headlines.with_intervals(m, items, n_boot=20, seed=0)
    assert out["semantic/macro_auroc/n"] == len(set(items.role("synthetic").unit))
    assert summary["fid"]["value"] == pytest.approx(m["fidelity/classifier/fid"], rel=1e-3)
    json.dumps(out, allow_nan=False)


def test_ablation_pooled_table_turns_signs_and_counts_seeds():
    from types import SimpleNamespace

    from bench.ablations import pooled_table
    from cxrsynth.compare import Row
    from cxrsynth.eval.intervals import Interval

    def hl(name, better):
        return SimpleNamespace(name=name, better=better)

    def iv(v, lo, hi):
        return Interval(v, lo, hi, 10, 100)

    # (a) - (c) at three seeds: AUROC (higher better) -0.1, -0.2, -0.3 -> (c) ahead by 0.2 on average;
    # FID (lower better) +1, +1, +4 -> (c) ahead by 2
    per_seed = [[Row(hl("semantic_auroc", "higher"), [], [iv(-d, -d - 0.05, -d + 0.05)], ["paired"]),
                 Row(hl("fid", "lower"), [], [iv(f, f - 2, f + 2)], ["paired"]),
                 Row(hl("ctr_gap", "closer"), [], [iv(0.0, -1, 1)], ["paired"])]
                for d, f in ((0.1, 1.0), (0.2, 1.0), (0.3, 4.0))]
    md = pooled_table(per_seed, ["a"])
    sem = next(line for line in md.splitlines() if line.startswith("| semantic_auroc"))
    half = 4.302653 * 0.1 / 3 ** 0.5  # t(0.975, 2) x sd / sqrt(k)
    assert f"+0.2 [{0.2 - half:+.3g}, {0.2 + half:+.3g}]" in sem and "ahead 3/3" in sem and "*" not in sem
    fid = next(line for line in md.splitlines() if line.startswith("| fid"))
    assert "+2 [" in fid and "ahead 1/3" in fid  # only the +4 seed's interval [2, 6] excludes 0
    assert "ctr_gap" not in md  # no direction: not a contest
