"""The one training loop of the project: the classifier, VQ-GAN, alignment model and generator all train here.

A model plugs in by supplying four things to `train(...)`:

- `model`: an `nn.Module`, already built (seed first with `seed_everything` so its initial weights are reproducible);
- `loss_fn(model, batch) -> (loss, logs)`: a scalar loss tensor and a dict of extra numbers to log. It must go
  through `model(...)` (the forward), because the module it receives may be the compiled or DDP-wrapped one;
- `batches(step) -> batch`: the batch of optimizer step `step` (0-based), a pure function of the step (and of the
  caller's seed), so a resumed run sees exactly the batches the interrupted one would have (`EpochSampler` gives
  epoch-shuffled indices that way). Tensors inside tuples/lists/dicts are moved to the device here;
- `evaluate(model) -> dict` (optional): called in eval mode without gradients every `eval_every` steps and at the
  end, logged under `val/`; the best value of `TrainConfig.select_metric` is kept and restored at the end.

What the loop does: device from a string ('auto' | 'cpu' | 'cuda'), one autocast context chosen once from a dtype
string ('auto' = bf16 on CUDA, fp32 on CPU), AdamW (weight decay on weights of dim >= 2 only), linear warmup then
cosine decay (`lr_at`), gradient clipping, optional `torch.compile`, seeding, dvclive curves (`dvcyaml=False`,
`save_dvc_exp=False`) in a folder the caller names, checkpoints every N steps and resume from the last one, DDP when
launched by torchrun (WORLD_SIZE > 1; gloo on CPU, nccl on CUDA; rank 0 logs, evaluates and writes), a tqdm bar.

Checkpoints contain no pickle: `model.safetensors` (weights; frozen parameters left out, their hash is in the
fingerprint), `state.safetensors` (optimizer tensors, RNG states) and
`state.json` (step, scheduler, optimizer hyper-parameters, best metric, eval history, a fingerprint of the run).
A checkpoint whose fingerprint differs from the current run's (other params) is not resumed from: the run starts
fresh. Exact resume (bitwise the same weights as an uninterrupted run) holds for single-process runs.

Reads: `<out_dir>/last/` when resuming. Writes: `<out_dir>/last/`, `<out_dir>/best/` (model.safetensors +
best.json), dvclive files under `live_dir` (plots/metrics/*.tsv, metrics.json).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from tqdm import tqdm

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Mapping[str, Any]]]
EvalFn = Callable[[nn.Module], Mapping[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the loop needs besides the model, the loss, the data and the evaluation callback."""

    max_steps: int
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine floor, as a fraction of lr
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    ema_decay: float = 0.0           # exponential moving average of the weights (0 = off); evaluated and kept if on
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "auto"              # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0              # steps between evaluations; 0 = only at the end
    checkpoint_every: int = 0        # steps between checkpoints; 0 = only at the end (needs out_dir)
    select_metric: str | None = None  # key of evaluate()'s dict used to keep the best model
    select_mode: str = "max"          # max | min
    out_dir: str | None = None        # checkpoints; None = no checkpoints, no resume, best kept in memory
    live_dir: str | None = None       # dvclive folder; None = no curves
    resume: bool = True
    run_id: str = ""                  # caller's fingerprint of what else defines the run (model/data params)
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"need lr > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps], got {self.warmup_steps}")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r} (float16 would need a "
                             "gradient scaler; use bfloat16)")
        if self.select_mode not in ("max", "min"):
            raise ValueError(f"select_mode must be max or min, got {self.select_mode!r}")

    def fingerprint(self) -> str:
        """Hash of what determines the trajectory (not logging, progress or paths), plus the caller's run_id."""
        skip = {"log_every", "eval_every", "checkpoint_every", "out_dir", "live_dir", "resume", "progress", "desc",
                "compile"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def kernel_fingerprint() -> str:
    """Which CPU kernels run (ATen's instruction set, MKL's, oneDNN's and numpy's pins: `cxrsynth.pin_cpu_isa`): they change
    the trained bits, so a checkpoint written under other kernels is another run's and is not resumed or returned."""
    state = [torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR", ""),
             os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")),
             os.environ.get("NPY_DISABLE_CPU_FEATURES", "")]
    return hashlib.sha256(json.dumps(state).encode()).hexdigest()[:8]


@dataclass
class TrainResult:
    step: int                       # optimizer steps done
    resumed_from: int               # step of the checkpoint resumed from (0 = fresh start)
    best_step: int | None
    best_metric: float | None
    history: list[dict] = field(default_factory=list)  # every evaluation, with its step
    seconds: float = 0.0            # wall time of this call
    total_seconds: float = 0.0      # training wall time over all calls of this run (resumed ones included)


# ----------------------------------------------------------------------------------------------------------------
# device, precision, distributed, seeding

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK); a single process otherwise.

    `batches(step)` callables use it to give each rank its own share of the data."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")


def resolve_dtype(device: torch.device, dtype: str = "auto") -> str:
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dtype


def autocast_context(device: torch.device, dtype: str = "auto"):
    """The one mixed-precision context of a run: nothing for float32, bf16 autocast otherwise."""
    if resolve_dtype(device, dtype) == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy's global generator and python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _init_distributed(device_name: str) -> DistInfo:
    info = dist_info()
    if info.enabled and not torch.distributed.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside (nested) tuples, lists and dicts to the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# optimizer and schedule

def lr_factor(step: int, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup to 1 over warmup_steps
    ((step + 1) / warmup_steps), then cosine decay from 1 to min_lr_ratio, reached at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max_steps - 1 - warmup_steps
    progress = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate used by optimizer step `step`."""
    return cfg.lr * lr_factor(step, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on weight matrices and kernels (dim >= 2), not on biases and norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio))


class EpochSampler:
    """Indices of the batch of each optimizer step: a fresh permutation per epoch from (seed, epoch), so the batch of
    any step can be computed directly (resume needs no sampler state). The last partial batch of an epoch is dropped
    when drop_last (default), so every batch has the same size. With several ranks each takes its slice."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got {n}, {batch_size}")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.batch_size = min(batch_size, n) if drop_last else batch_size
        self.global_batch = self.batch_size * world_size
        self.steps_per_epoch = max(1, n // self.global_batch) if drop_last else -(-n // self.global_batch)

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        if self.global_batch > self.n:  # tiny data with several ranks: wrap around
            perm = np.resize(perm, self.global_batch)
        chunk = perm[i * self.global_batch:(i + 1) * self.global_batch]
        return chunk[self.rank::self.world]


class EMA:
    """Exponential moving average of a model's weights (buffers such as batch-norm statistics are copied).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so early averages are not dominated
    by the random initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> None:
        d = min(self.decay, (1.0 + n) / (10.0 + n))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: safetensors for tensors, JSON for the rest (no pickle)

def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a state dict; tensors go to `tensors` under their path and are referenced by it."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    return obj


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(tuple(state["numpy"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; a crash in between leaves `final` or `<final>.old` intact."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def frozen_names(model: nn.Module) -> set[str]:
    """Parameters that do not train (requires_grad False, e.g. a frozen pretrained text encoder)."""
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def frozen_digest(model: nn.Module) -> str:
    """Hash of the frozen parameters ("" when none): part of a run's fingerprint, since checkpoints leave them out."""
    frozen = frozen_names(model)
    if not frozen:
        return ""
    h = hashlib.sha256()
    for name, t in sorted((k, v) for k, v in model.state_dict().items() if k in frozen):
        h.update(name.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_weights(model: nn.Module, file: str | Path, frozen: set[str] | None = None) -> None:
    """model.safetensors of the trained weights: frozen parameters (`frozen`, default `frozen_names(model)`; an EMA
    copy passes its model's) are left out: they come back from their own source when the model is rebuilt, and
    `frozen_digest` in the fingerprint guards that they are the same."""
    frozen = frozen_names(model) if frozen is None else frozen
    if not frozen:
        safetensors.torch.save_model(model, str(file))
        return
    keep = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items() if k not in frozen}
    safetensors.torch.save_file(keep, str(file))


def load_weights(model: nn.Module, file: str | Path, device: str, frozen: set[str] | None = None) -> None:
    """Inverse of `save_weights`: every weight but the frozen ones must be in the file, and nothing else."""
    frozen = frozen_names(model) if frozen is None else frozen
    if not frozen:
        safetensors.torch.load_model(model, str(file), strict=True, device=device)
        return
    tensors = safetensors.torch.load_file(str(file), device=device)
    expected = set(model.state_dict()) - frozen
    if set(tensors) != expected:
        raise ValueError(f"{file}: weights do not match the model (missing {sorted(expected - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:5]})")
    model.load_state_dict(tensors, strict=False)


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, extra: Mapping | None = None,
                    ema: EMA | None = None) -> None:
    """Write a resumable checkpoint folder (model.safetensors, [ema.safetensors,] state.safetensors, state.json)
    atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    frozen = frozen_names(model)
    save_weights(model, tmp / "model.safetensors", frozen)
    if ema is not None:
        save_weights(ema.model, tmp / "ema.safetensors", frozen)
    tensors: dict[str, torch.Tensor] = {}
    state = {"step": step, "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
             "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors),
             "rng": _encode(_rng_state(), "rng", tensors), "extra": dict(extra or {})}
    safetensors.torch.save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")  # written last: marks completion
    _replace_dir(tmp, path)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """`<out_dir>/last`, or the `.old` copy a crash during a swap left behind; None when there is none."""
    for name in ("last", "last.old"):
        p = Path(out_dir) / name
        if (p / "state.json").is_file():
            return p
    return None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, restore_rng: bool = True,
                    ema: EMA | None = None) -> dict:
    """Restore a checkpoint written by save_checkpoint (strict: missing or unexpected weights are errors).

    Returns {'step': int, 'extra': dict}."""
    path = Path(path)
    device = next(model.parameters()).device
    frozen = frozen_names(model)
    load_weights(model, path / "model.safetensors", str(device), frozen)
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{path}: ema.safetensors missing (checkpoint written without EMA)")
        load_weights(ema.model, path / "ema.safetensors", str(device), frozen)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = safetensors.torch.load_file(str(path / "state.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(_decode(state["optimizer"], tensors))
    if scheduler is not None:
        scheduler.load_state_dict(_decode(state["scheduler"], tensors))
    if restore_rng:
        _set_rng_state(_decode(state["rng"], tensors))
    return {"step": int(state["step"]), "extra": state["extra"]}


# ----------------------------------------------------------------------------------------------------------------
# dvclive

def _truncate_history(live_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (the run died after its last checkpoint; those steps are replayed)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        col = lines[0].split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        tsv.write_text("\n".join(kept) + "\n", encoding="utf-8")


class _Curves:
    """dvclive on rank 0 only; a no-op without a folder."""

    def __init__(self, live_dir: str | None, resume_step: int, enabled: bool) -> None:
        self.live = None
        if live_dir is None or not enabled:
            return
        from dvclive import Live

        if resume_step > 0:
            _truncate_history(Path(live_dir), resume_step)
        self.live = Live(str(live_dir), resume=resume_step > 0, dvcyaml=False, save_dvc_exp=False, report=None)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for k, v in values.items():
            self.live.log_metric(k, float(v))
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


# ----------------------------------------------------------------------------------------------------------------
# the loop

def code_fingerprint(*objs: Any) -> str:
    """Hash of the source files that define a run's trajectory: this loop and the modules defining each object's
    type (or the function itself). A checkpoint of older code (finished or not) is then never resumed after an edit
    to the model, its loss or the loop; a caller's run_id adds whatever else the run depends on."""
    files = {Path(__file__).resolve()}
    for obj in objs:
        name = type(obj).__module__ if isinstance(obj, nn.Module) else getattr(obj, "__module__", None)
        f = getattr(sys.modules.get(name or ""), "__file__", None)
        if f and Path(f).is_file():
            files.add(Path(f).resolve())
    h = hashlib.sha256()
    for name, data in sorted((f.name, f.read_bytes()) for f in files):  # by name, not by where the checkout is
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()[:12]


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if math.isnan(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _to_float(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def train(model: nn.Module, loss_fn: LossFn, batches: Callable[[int], Any], cfg: TrainConfig,
          evaluate: EvalFn | None = None) -> TrainResult:
    """Train `model` in place for cfg.max_steps optimizer steps (resuming from `<out_dir>/last` when it exists and
    belongs to this run); at the end the best evaluated weights (if any) are loaded into `model`."""
    t0 = time.perf_counter()
    info = _init_distributed(cfg.device)
    device = pick_device(cfg.device, info.local_rank)
    with _tf32(device.type == "cuda"):  # TF32 matmuls while training; the caller's settings come back afterwards
        return _train(model, loss_fn, batches, cfg, evaluate, t0=t0, info=info, device=device)


@contextmanager
def _tf32(enabled: bool):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _train(model: nn.Module, loss_fn: LossFn, batches: Callable[[int], Any], cfg: TrainConfig,
           evaluate: EvalFn | None, *, t0: float, info: DistInfo, device: torch.device) -> TrainResult:
    model.to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    kept = ema.model if ema is not None else model  # the weights evaluated, selected and handed back
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    ctx = autocast_context(device, cfg.dtype)
    frozen = frozen_names(model)
    fingerprint = (cfg.fingerprint() + f"-{code_fingerprint(model, loss_fn)}-{kernel_fingerprint()}"
                   + (f"-{cfg.run_id}" if cfg.run_id else "")
                   + (f"-{frozen_digest(model)}" if frozen else ""))
    out = Path(cfg.out_dir) if cfg.out_dir else None

    start, best_step, best, history, earlier_seconds = 0, None, None, [], 0.0
    best_state: dict[str, torch.Tensor] | None = None
    ckpt = latest_checkpoint(out) if out is not None and cfg.resume else None
    if ckpt is not None:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["extra"]
        if meta.get("fingerprint") != fingerprint:
            print(f"{ckpt}: checkpoint of a different run (params changed); starting from scratch", file=sys.stderr)
        else:
            loaded = load_checkpoint(ckpt, model, optimizer, scheduler, restore_rng=not info.enabled, ema=ema)
            start = loaded["step"]
            best_step, best, history = meta.get("best_step"), meta.get("best_metric"), meta.get("history", [])
            if info.is_main:
                print(f"{cfg.desc}: resuming from step {start} of {cfg.max_steps} ({ckpt})", file=sys.stderr)
            earlier_seconds = float(meta.get("seconds", 0.0))
    if out is not None and start == 0:  # a fresh run: no stale checkpoint or best model may survive
        for name in ("last", "last.old", "last.tmp", "best", "best.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
    if info.enabled and ckpt is not None:
        seed_everything(cfg.seed + info.rank + start)

    fwd: nn.Module = torch.compile(model) if cfg.compile else model
    if info.enabled:
        ids = [device.index] if device.type == "cuda" else None
        fwd = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids)
    curves = _Curves(cfg.live_dir, start, info.is_main)

    def save_best(step: int) -> None:
        nonlocal best_state
        if out is None:
            best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
            return
        tmp = out / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(kept, tmp / "model.safetensors", frozen)
        (tmp / "best.json").write_text(json.dumps({"step": step, cfg.select_metric: best}), encoding="utf-8")
        _replace_dir(tmp, out / "best")

    def run_eval(step: int) -> None:
        nonlocal best, best_step
        kept.eval()
        with torch.no_grad():
            res = {k: _to_float(v) for k, v in evaluate(kept).items()}
        model.train()
        history.append({"step": step, **res})
        curves.log(step, {f"val/{k}": v for k, v in res.items()})
        if cfg.select_metric is not None:
            if cfg.select_metric not in res:
                raise KeyError(f"evaluate() returned no {cfg.select_metric!r} (select_metric); got {sorted(res)}")
            if _is_better(res[cfg.select_metric], best, cfg.select_mode):
                best, best_step = res[cfg.select_metric], step
                save_best(step)

    # SIGTERM (a scheduler's pre-emption, `kill`, Ctrl-C's polite cousin) finishes the current step, writes a
    # checkpoint and exits with status 143; SIGKILL cannot be caught: the next run resumes from the last periodic one.
    stop = {"signal": None}
    handling = out is not None and threading.current_thread() is threading.main_thread()
    if handling:
        def on_term(signum, frame):
            stop["signal"] = signum
        old_handler = signal.signal(signal.SIGTERM, on_term)

    # interrupt tests slow every step down (seconds), so that a signal can land mid-run; never set otherwise
    step_delay = float(os.environ.get("CXRSYNTH_STEP_DELAY", "0") or 0)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=start, desc=cfg.desc, disable=not (cfg.progress and info.is_main),
               dynamic_ncols=True, file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        loss_sum, n_sum = torch.zeros((), device=device), 0
        for step in range(start, cfg.max_steps):
            batch = to_device(batches(step), device)
            with ctx:
                loss, logs = loss_fn(fwd, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            optimizer.step()
            scheduler.step()
            done = step + 1
            if ema is not None:
                ema.update(model, step)
            loss_sum += loss.detach().float()
            n_sum += 1
            last = done == cfg.max_steps
            if info.is_main and cfg.log_every and (done % cfg.log_every == 0 or last):
                values = {"train/loss": loss_sum.item() / n_sum, "train/lr": lr_at(step, cfg)}
                if grad_norm is not None:
                    values["train/grad_norm"] = _to_float(grad_norm)
                values.update({f"train/{k}": _to_float(v) for k, v in logs.items()})
                curves.log(done, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
                loss_sum, n_sum = torch.zeros((), device=device), 0
            if evaluate is not None and info.is_main and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
                run_eval(done)
            if info.enabled and handling:  # every rank stops at the same step
                flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
                torch.distributed.all_reduce(flag)
                stop["signal"] = stop["signal"] or (signal.SIGTERM if flag.item() > 0 else None)
            if out is not None and info.is_main and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0)
                                                     or last or stop["signal"]):
                save_checkpoint(out / "last", model, optimizer, scheduler, done,
                                {"fingerprint": fingerprint, "best_step": best_step, "best_metric": best,
                                 "history": history, "seconds": earlier_seconds + time.perf_counter() - t0}, ema=ema)
            if info.enabled:
                torch.distributed.barrier()
            bar.update(1)
            if step_delay > 0:
                time.sleep(step_delay)
            if stop["signal"] and not last:
                bar.close()
                curves.close()
                print(f"{cfg.desc}: SIGTERM at step {done}; checkpoint written to {out / 'last'}, re-run to resume",
                      file=sys.stderr)
                raise SystemExit(143)
    finally:
        if handling:
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None else signal.SIG_DFL)
    bar.close()
    curves.close()

    if best_step is not None:  # hand back the selected weights, not merely the last ones
        if out is not None:
            load_weights(model, out / "best" / "model.safetensors", str(device), frozen)
        elif best_state is not None:
            model.load_state_dict(best_state)
    elif ema is not None:
        model.load_state_dict(ema.model.state_dict())
    seconds = time.perf_counter() - t0
    return TrainResult(step=cfg.max_steps, resumed_from=start, best_step=best_step, best_metric=best,
                       history=history, seconds=seconds, total_seconds=earlier_seconds + seconds)
