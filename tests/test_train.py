"""The shared training loop: schedule, determinism, checkpoints without pickle, exact resume, selection, dvclive."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cxrsynth.train import (EMA, EpochSampler, TrainConfig, autocast_context, latest_checkpoint, load_checkpoint,
                            lr_at, lr_factor, make_optimizer, make_scheduler, resolve_dtype, save_checkpoint,
                            seed_everything, train)

X = torch.linspace(-1, 1, 48 * 6).reshape(48, 6)
Y = (X.sum(dim=1, keepdim=True) > 0).float()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 1)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def make_net(seed: int = 0) -> Net:
    seed_everything(seed)
    return Net()


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    acc = ((logits > 0).float() == y).float().mean()
    return nn.functional.binary_cross_entropy_with_logits(logits, y), {"acc": acc}


SAMPLER = EpochSampler(len(X), 8, seed=0)


def batches(step):
    idx = torch.from_numpy(SAMPLER(step))
    g = torch.Generator().manual_seed(step)
    return X[idx] + 0.01 * torch.randn(len(idx), 6, generator=g), Y[idx]


def cfg(**kw) -> TrainConfig:
    base = dict(max_steps=10, lr=1e-2, warmup_steps=2, weight_decay=0.01, device="cpu", seed=0, progress=False,
                log_every=2)
    return TrainConfig(**{**base, **kw})


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_values():
    c = cfg(max_steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.5)    # warmup: (step + 1) / warmup_steps
    assert lr_at(1, c) == pytest.approx(1.0)    # peak at the end of warmup
    assert lr_at(2, c) == pytest.approx(1.0)    # cosine starts at the peak
    # halfway through the cosine part (steps 2..11): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_factor(2 + 4.5, 12, 2, 0.1) == pytest.approx(0.55)
    assert lr_at(11, c) == pytest.approx(0.1)   # the floor is reached at the last step
    assert lr_factor(5, 10, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 9)))
    # the optimizer really uses these values, step by step
    model = make_net()
    opt = make_optimizer(model, c)
    sched = make_scheduler(opt, c)
    for step in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, c))
        opt.step()
        sched.step()


def test_weight_decay_only_on_matrices():
    groups = make_optimizer(make_net(), cfg(weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() < 2 for p in groups[1]["params"])


def test_same_seed_same_weights_other_seed_other_weights():
    runs = []
    for seed in (0, 0, 1):
        model = make_net(seed)
        train(model, loss_fn, batches, cfg(seed=seed))
        runs.append(weights(model))
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, ema_decay):
    full = make_net()
    train(full, loss_fn, batches, cfg(ema_decay=ema_decay))

    def dying(step):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return batches(step)

    out = tmp_path / "ckpt"
    c = cfg(out_dir=str(out), checkpoint_every=3, ema_decay=ema_decay, live_dir=str(tmp_path / "live"))
    with pytest.raises(KeyboardInterrupt):
        train(make_net(), loss_fn, dying, c)
    assert json.loads((out / "last" / "state.json").read_text())["step"] == 6
    resumed = make_net(seed=123)  # a fresh process would build the model from scratch
    result = train(resumed, loss_fn, batches, c)
    assert result.resumed_from == 6 and result.step == 10
    assert same(weights(full), weights(resumed))
    # the curves hold each logged step once, although steps 7 and 8 ran twice
    lines = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    steps = [int(ln.split("\t")[0]) for ln in lines[1:]]
    assert steps == [2, 4, 6, 8, 10]
    assert not (tmp_path / "live" / "dvc.yaml").exists()


def test_checkpoint_of_other_params_is_not_resumed(tmp_path):
    out = str(tmp_path / "ckpt")
    train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4))
    result = train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4, lr=5e-3))
    assert result.resumed_from == 0
    result = train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4, lr=5e-3))
    assert result.resumed_from == 4  # finished run of the same params: nothing left to do


def test_checkpoint_of_other_cpu_kernels_is_not_returned(tmp_path, monkeypatch):
    """The CPU kernels (cxrsynth's ISA pin) change the trained bits: a finished run under other kernels is not this
    run's result."""
    import os

    import cxrsynth.train as tr

    out = str(tmp_path / "ckpt")
    assert train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4)).resumed_from == 0
    assert train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4)).resumed_from == 4
    before = tr.kernel_fingerprint()
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE" if os.environ.get("MKL_CBWR") != "COMPATIBLE" else "AVX2")
    assert tr.kernel_fingerprint() != before
    assert train(make_net(), loss_fn, batches, cfg(out_dir=out, max_steps=4)).resumed_from == 0
    mkl = tr.kernel_fingerprint()
    monkeypatch.setenv("NPY_DISABLE_CPU_FEATURES", os.environ.get("NPY_DISABLE_CPU_FEATURES", "") + " AVX512F")
    assert tr.kernel_fingerprint() != mkl  # numpy's dispatch pin counts too (the phantom's pixels depend on it)


MODEL_SOURCE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, x):
        return self.fc(x)
"""


def test_checkpoint_of_other_code_is_not_resumed(tmp_path, monkeypatch):
    """A finished checkpoint must not be handed back after an edit to the model's source (same params)."""
    import importlib
    import sys

    (tmp_path / "tiny_model_mod.py").write_text(MODEL_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(out: str):
        sys.modules.pop("tiny_model_mod", None)
        mod = importlib.import_module("tiny_model_mod")
        seed_everything(0)
        return train(mod.Tiny(), loss_fn, batches, cfg(out_dir=out, max_steps=4))

    out = str(tmp_path / "ckpt")
    assert run(out).resumed_from == 0
    assert run(out).resumed_from == 4          # same code, same params: the finished run is reused
    (tmp_path / "tiny_model_mod.py").write_text(MODEL_SOURCE.replace("nn.Linear(6, 1)", "nn.Linear(6, 1, bias=True)"),
                                                encoding="utf-8")
    assert run(out).resumed_from == 0          # the model's code changed: train again
    assert run(out).resumed_from == 4
    sys.modules.pop("tiny_model_mod", None)


def test_checkpoint_files_are_safetensors_and_json_and_round_trip(tmp_path):
    c = cfg()
    model = make_net()
    opt = make_optimizer(model, c)
    sched = make_scheduler(opt, c)
    for step in range(3):
        loss, _ = loss_fn(model, batches(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "last", model, opt, sched, 3, {"note": "x"})
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["model.safetensors", "state.json",
                                                                    "state.safetensors"]
    json.loads((tmp_path / "last" / "state.json").read_text())
    assert latest_checkpoint(tmp_path) == tmp_path / "last"
    rng_after_save = torch.rand(3)

    other = make_net(seed=5)
    opt2 = make_optimizer(other, c)
    sched2 = make_scheduler(opt2, c)
    meta = load_checkpoint(tmp_path / "last", other, opt2, sched2)
    assert meta == {"step": 3, "extra": {"note": "x"}}
    assert same(weights(model), weights(other))
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG state restored
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    with pytest.raises(RuntimeError):  # strict: a model of another shape does not load silently
        load_checkpoint(tmp_path / "last", nn.Linear(6, 1))


def test_best_evaluation_is_kept_and_handed_back(tmp_path):
    snapshots = {}
    scores = {2: 0.1, 4: 0.9, 6: 0.5, 8: 0.3}

    def evaluate(model):
        step = len(snapshots) * 2 + 2
        snapshots[step] = weights(model)
        return {"auc": scores[step], "other": 1.0}

    model = make_net()
    result = train(model, loss_fn, batches, cfg(max_steps=8, eval_every=2, select_metric="auc",
                                                 out_dir=str(tmp_path)), evaluate)
    assert result.best_step == 4 and result.best_metric == pytest.approx(0.9)
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    assert same(weights(model), snapshots[4])
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"step": 4, "auc": 0.9}
    # without an out_dir the best weights are kept in memory
    snapshots.clear()
    model = make_net()
    train(model, loss_fn, batches, cfg(max_steps=8, eval_every=2, select_metric="auc"), evaluate)
    assert same(weights(model), snapshots[4])


def test_missing_select_metric_is_an_error():
    with pytest.raises(KeyError, match="select_metric"):
        train(make_net(), loss_fn, batches, cfg(max_steps=2, select_metric="auc"), lambda m: {"loss": 1.0})


def test_ema_tracks_the_weights():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 100)  # decay 0.5: halfway
    assert torch.allclose(ema.model.weight, torch.full((1, 2), 0.5))


def test_epoch_sampler_permutes_each_epoch_and_is_a_function_of_the_step():
    s = EpochSampler(10, 3, seed=7)
    assert s.steps_per_epoch == 3
    epoch0 = np.concatenate([s(i) for i in range(3)])
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert not np.array_equal(s(0), s(3))
    assert np.array_equal(s(4), EpochSampler(10, 3, seed=7)(4))
    ranks = [EpochSampler(10, 2, seed=7, rank=r, world_size=2)(1) for r in (0, 1)]
    assert len(set(np.concatenate(ranks))) == 4  # ranks take disjoint shares of the global batch


def test_precision_context_and_config_validation():
    cpu = torch.device("cpu")
    assert resolve_dtype(cpu, "auto") == "float32"
    with autocast_context(cpu, "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_context(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    for bad in ({"max_steps": 0}, {"dtype": "float16"}, {"device": "tpu"}, {"warmup_steps": 20},
                {"select_mode": "best"}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError):
            cfg(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            train(make_net(), loss_fn, batches, cfg(device="cuda"))


def test_dvclive_curves_without_dvcyaml(tmp_path):
    live = tmp_path / "live"
    train(make_net(), loss_fn, batches, cfg(max_steps=4, live_dir=str(live), eval_every=2), lambda m: {"auc": 0.5})
    metrics = json.loads((live / "metrics.json").read_text())
    assert metrics["step"] == 4 and "loss" in metrics["train"] and metrics["val"]["auc"] == 0.5
    assert (live / "plots" / "metrics" / "train" / "lr.tsv").is_file()
    assert not (live / "dvc.yaml").exists()


class PartlyFrozen(nn.Module):
    """A frozen 'pretrained' layer under a trained head, as the align model's frozen text encoder."""

    def __init__(self, frozen_seed: int = 7) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(frozen_seed)
        self.base = nn.Linear(6, 6)
        with torch.no_grad():
            self.base.weight.copy_(torch.randn(6, 6, generator=g))
            self.base.bias.copy_(torch.randn(6, generator=g))
        self.base.requires_grad_(False)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x)))


def test_frozen_weights_stay_out_of_checkpoints_and_guard_resume(tmp_path):
    import safetensors.torch

    seed_everything(0)
    full = PartlyFrozen()
    train(full, loss_fn, batches, cfg(max_steps=6))

    def dying(step):
        if step == 4:
            raise KeyboardInterrupt("killed")
        return batches(step)

    out = str(tmp_path / "ckpt")
    c = cfg(out_dir=out, max_steps=6, checkpoint_every=2)
    seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        train(PartlyFrozen(), loss_fn, dying, c)
    saved = safetensors.torch.load_file(str(tmp_path / "ckpt" / "last" / "model.safetensors"))
    assert set(saved) == {"head.weight", "head.bias"}  # the frozen layer is not copied into every checkpoint
    seed_everything(5)
    resumed = PartlyFrozen()  # rebuilt: its frozen layer comes back from its own source
    result = train(resumed, loss_fn, batches, c)
    assert result.resumed_from == 4 and same(weights(full), weights(resumed))
    # other frozen weights (say, another pretrained encoder at the same path) make it another run: no resume
    result = train(PartlyFrozen(frozen_seed=8), loss_fn, batches, c)
    assert result.resumed_from == 0


def test_tf32_is_switched_on_for_training_only_and_restored():
    from cxrsynth.train import _tf32
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with _tf32(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), _tf32(True):  # restored when training fails, too
            raise RuntimeError("boom")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with _tf32(False):  # a CPU run leaves the caller's settings alone
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
