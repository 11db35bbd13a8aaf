"""The classifier: self-describing save/load, label policies, augmentation, loss, fitting, reporting."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from cxrsynth.config import ClassifierParams
from cxrsynth.eval.features import extract
from cxrsynth.eval.metrics import fid
from cxrsynth.models.classifier import (Augment, Classifier, ClassifierConfig, augment, fit, masked_bce, pos_weights,
                                        save_roc_png, split_report)
from cxrsynth.models.folder import ModelFolderError
from cxrsynth.text.chexpert import OBSERVATIONS, eval_targets, label_targets
from toys import labeled_squares

NAN = np.nan


def tiny(arch="resnet", **kw) -> Classifier:
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(arch=arch, input_size=32, width=4, depth=(1, 1), **kw))


def images(n=6, size=40, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["resnet", "densenet"])
def test_save_load_gives_identical_predictions_and_features(tmp_path, arch):
    model = tiny(arch, pool="avgmax")
    with torch.no_grad():  # non-trivial batch-norm statistics must travel too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.save(tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["labels"] == list(OBSERVATIONS) and meta["input_size"] == 32
    assert meta["num_features"] == model.num_features and set(meta["normalisation"]) >= {"mean", "std"}
    loaded = Classifier.load(tmp_path / "clf")
    x = images()
    p1, p2 = model.predict(x), loaded.predict(x)
    assert p1.shape == (6, 14) and np.array_equal(p1, p2)
    assert ((p1 >= 0) & (p1 <= 1)).all()
    f = loaded.features(x)
    assert f.shape == (6, loaded.num_features) and np.array_equal(f, model.features(x))
    assert isinstance(loaded.num_features, int) and loaded.weights_digest() == model.weights_digest()
    # float [0, 1] input gives the same answer as uint8, and any input size is accepted
    assert np.allclose(loaded.predict(x.astype(np.float32) / 255.0), p1, atol=1e-6)
    assert loaded.predict(images(2, size=64)).shape == (2, 14)


def test_load_is_strict(tmp_path):
    model = tiny()
    model.save(tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    meta["config"]["width"] = 8
    (tmp_path / "clf" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match="do not match"):
        Classifier.load(tmp_path / "clf")
    with pytest.raises(ModelFolderError, match="config.json missing"):
        Classifier.load(tmp_path / "nothing")


@pytest.mark.parametrize("bad", [{"arch": "vit"}, {"input_size": 8}, {"width": 0}, {"depth": ()}, {"depth": (1, 0)},
                                 {"dropout": 1.0}, {"pool": "max"}, {"stem_downsample": 3},
                                 {"labels": ("a", "a")}, {"std": 0.0}, {"input_size": 16, "depth": (1,) * 6}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ClassifierConfig(**{"input_size": 32, **bad})


def test_uncertain_and_blank_policies():
    labels = np.array([[1.0, 0.0, -1.0, NAN]])
    t, m = label_targets(labels, "ignore", "negative")
    assert t.tolist() == [[1, 0, 0, 0]] and m.tolist() == [[1, 1, 0, 1]]
    t, m = label_targets(labels, "zeros", "negative")
    assert t.tolist() == [[1, 0, 0, 0]] and m.tolist() == [[1, 1, 1, 1]]
    t, m = label_targets(labels, "ones", "ignore")
    assert t.tolist() == [[1, 0, 1, 0]] and m.tolist() == [[1, 1, 1, 0]]
    t, m = label_targets(labels, "ignore", "ignore")
    assert m.tolist() == [[1, 1, 0, 0]]
    truth = eval_targets(labels, "negative")
    assert truth[0, :2].tolist() == [1, 0] and np.isnan(truth[0, 2]) and truth[0, 3] == 0
    assert np.isnan(eval_targets(labels, "ignore")[0, 3])
    with pytest.raises(ValueError, match="uncertain"):
        label_targets(labels, "maybe")
    with pytest.raises(ValueError, match="0.5"):
        label_targets(np.array([[0.5]]))


def test_masked_loss_and_class_balance():
    logits = torch.tensor([[10.0, -3.0], [0.0, 50.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the huge wrong logit is masked out
    expected = (torch.nn.functional.softplus(torch.tensor(-10.0)) + torch.nn.functional.softplus(torch.tensor(-3.0))
                + np.log(2.0)) / 3
    assert masked_bce(logits, targets, mask).item() == pytest.approx(float(expected), rel=1e-5)
    t = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.float32)
    m = np.array([[1, 1], [1, 1], [1, 0], [1, 1]], np.float32)
    assert pos_weights(t, m, max_weight=10.0).tolist() == [3.0, 2.0]
    assert pos_weights(t, m, max_weight=2.5).tolist() == [2.5, 2.0]
    assert pos_weights(np.zeros((3, 1), np.float32), np.ones((3, 1), np.float32)).tolist() == [1.0]


def test_augmentation_is_seeded_bounded_and_does_not_flip_by_default():
    x = torch.rand(4, 1, 32, 32)
    a = augment(x, Augment(), torch.Generator().manual_seed(1))
    b = augment(x, Augment(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, augment(x, Augment(), torch.Generator().manual_seed(2)))
    still = Augment(rotate_deg=0.0, scale_min=1.0, aspect=0.0, brightness=0.0, contrast=0.0)
    assert torch.allclose(augment(x, still, torch.Generator().manual_seed(3)), x, atol=1e-5)
    flips = augment(x, dataclasses.replace(still, hflip=True), torch.Generator().manual_seed(3))
    flipped = [torch.allclose(flips[i], x[i].flip(-1), atol=1e-5) for i in range(4)]
    kept = [torch.allclose(flips[i], x[i], atol=1e-5) for i in range(4)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped)


def test_a_small_classifier_overfits_a_tiny_batch():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((8, 1, 32, 32), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 2, size=(8, 14)).astype(np.float32))
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = masked_bce(model(x), y, torch.ones_like(y))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
    assert ((model.predict(x) > 0.5) == (y.numpy() > 0.5)).all()


def test_feature_extractor_plugs_into_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    model = tiny()
    ext = model.feature_extractor()
    assert ext.num_features == model.num_features and ext.name == f"cxrsynth-classifier@{model.weights_digest()}"
    a, b = images(12, seed=1), images(12, seed=2)
    metric = FrechetInceptionDistance(feature=ext)  # no 3 x 299 x 299 probe: num_features is given
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    ours = fid(extract(ext, a), extract(ext, b))
    assert float(metric.compute()) == pytest.approx(ours["fid"], rel=1e-4, abs=1e-6)
    assert np.allclose(extract(ext, a).values, model.features(a), atol=1e-6)


def test_fit_selects_on_validation_and_reports_stable_keys(tmp_path):
    params = ClassifierParams(input_size=32, width=4, depth=(1, 1), epochs=6, batch_size=16, lr=1e-2,
                              warmup_epochs=0.5, min_count=3, checkpoint_every_epochs=3, ema_decay=0.9,
                              aug_rotate_deg=3.0, aug_scale_min=0.95)
    train_set, val_set, test_set = labeled_squares(64, 0), labeled_squares(24, 1), labeled_squares(24, 2)
    model, result = fit(params, train_set, val_set, seed=0, device="cpu", out_dir=tmp_path / "ckpt",
                        live_dir=tmp_path / "live", progress=False)
    assert result.step == 6 * 4 and result.best_step is not None and len(result.history) == 6
    assert (tmp_path / "ckpt" / "last" / "model.safetensors").is_file()
    assert (tmp_path / "live" / "plots" / "metrics" / "val" / "macro_auroc.tsv").is_file()
    report, per, probs = split_report(model, test_set, min_count=3, n_boot=50)
    assert set(per) == {"Atelectasis", "Cardiomegaly"} and probs.shape == (24, 14)
    assert report["macro_auroc"] > 0.9 and report["macro_auroc_labels"] == 2
    for name in OBSERVATIONS:  # every label has every key, whether it could be scored or not
        assert {f"auroc/{name}", f"positives/{name}", f"negatives/{name}", f"auroc_ci_low/{name}"} <= set(report)
    assert report["auroc/Consolidation"] is None and report["positives/Cardiomegaly"] > 0
    save_roc_png(tmp_path / "roc.png", test_set, probs, model.labels, per)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # a second call with the same params resumes the finished run instead of training again
    again, result2 = fit(params, train_set, val_set, seed=0, device="cpu", out_dir=tmp_path / "ckpt",
                         progress=False)
    assert result2.resumed_from == result.step and np.array_equal(again.predict(test_set.images), probs)


@pytest.mark.parametrize("raw, key", [
    ({"warmup_epochs": 5.0, "epochs": 2}, "classifier.warmup_epochs"),
    ({"depth": [1, 0]}, "classifier.depth"),
    ({"input_size": 16, "depth": [1, 1, 1, 1, 1]}, "classifier.input_size"),
    ({"pool": "max"}, "classifier.pool"),
    ({"blank_policy": "zeros"}, "classifier.blank_policy"),
    ({"stem_downsample": 3}, "classifier.stem_downsample"),
    ({"ema_decay": 1.0}, "classifier.ema_decay"),
])
def test_params_rules_name_the_key(raw, key):
    from cxrsynth.config import ConfigError, params_from_dict

    with pytest.raises(ConfigError, match=key):
        params_from_dict({"classifier": raw})
