"""Feature extractors for fidelity metrics: images in, (N, D) vectors out, always with the extractor's name.

FID, KID and PRDC are only comparable within one feature space, so every `Features` array carries the name of the
extractor that made it and the metric functions (`cxrsynth.eval.metrics`) refuse to mix names.

Extractors are `torch.nn.Module`s with two attributes, `name` (str) and `num_features` (int), so torchmetrics can use
them directly (`FrechetInceptionDistance(feature=extractor)`) without probing them with a 3 x 299 x 299 dummy:

- `ModelFeatures`: any project model with `forward_features(x) -> (N, D)` and `num_features` (the classifier;
  `Classifier.feature_extractor()` builds one named after its weights' hash).
- `TorchScriptFeatures`: a TorchScript module from a local file, for Inception / XRV DenseNet / RadDINO exported
  once by the user (`torch.jit.save(torch.jit.script(m), path)` or `torch.jit.trace`; a `torch.export` program saved
  as `*.pt2` with a dynamic batch dimension works too, given input_size). Contract of the file: it
  takes a float32 tensor N x C x S x S with values in [0, 1] (grayscale repeated when C = 3; any normalisation of
  its own happens inside the module) and returns N x D (or N x D x 1 x 1). C and S come from the module's
  `in_channels` / `input_size` attributes when it has them, else from the arguments; D from `num_features` or from
  one probe.
- `IdentityFeatures`: passes given vectors through (feature vectors computed once and reused by several metrics).

Reads: only a TorchScript file when asked. Writes nothing.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrsynth.images import resize, to_image_tensor


@dataclass(frozen=True)
class Features:
    """Feature vectors (N x D, float64) and the name of the extractor that produced them."""

    values: np.ndarray
    extractor: str

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim != 2:
            raise ValueError(f"features must be N x D, got shape {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"features from {self.extractor!r} contain NaN or inf")
        if not self.extractor:
            raise ValueError("features need the name of their extractor")
        object.__setattr__(self, "values", v)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


# ----------------------------------------------------------------------------------------------------------------
# whole splits, a batch at a time (row sources: numpy arrays, cxrsynth.data.arrays.NpyRows / Concat)

class Resized:
    """Rows of `source` (uint8 or float [0, 1] images, N x H x W) resized per request to float32 N x size x size in
    [0, 1] with the project's resize (`cxrsynth.eval.features.resize`, antialiased, clamped)."""

    def __init__(self, source, size: int) -> None:
        self.source, self.size = source, int(size)
        self.shape = (len(source), self.size, self.size)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return 3

    def __getitem__(self, key) -> np.ndarray:
        single = isinstance(key, (int, np.integer))
        rows = self.source[[int(key)]] if single else self.source[key]
        out = resize(to_image_tensor(rows), self.size)[:, 0].clamp(0.0, 1.0).numpy().astype(np.float32, copy=False)
        return out[0] if single else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[0:len(self)] if len(self) else np.zeros(self.shape, np.float32)
        return a if dtype is None else a.astype(dtype)


def mean_std(source, size: int, batch: int = 256) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of every pixel of `source` after resizing to `size` ([0, 1] scale),
    accumulated per batch in float64 (Chan et al.'s pairwise update), never holding the resized set."""
    n, mean, m2 = 0, 0.0, 0.0
    for i in range(0, len(source), batch):
        x = resize(to_image_tensor(source[i:i + batch]), size).double()
        k = x.numel()
        if not k:
            continue
        bm = float(x.mean())
        bm2 = float(((x - bm) ** 2).sum())
        delta = bm - mean
        tot = n + k
        mean += delta * k / tot
        m2 += bm2 + delta * delta * n * k / tot
        n = tot
    if n < 2:
        return mean, 0.0
    return mean, float(np.sqrt(m2 / (n - 1)))


class FeatureExtractor(nn.Module):
    """Base class: `forward(images) -> (N, num_features)`; `name` identifies the feature space.

    An extractor is a measuring instrument: it stays in eval mode (batch-norm statistics frozen, no dropout) even
    when a container such as a torchmetrics Metric calls `.train()` on it."""

    name: str
    num_features: int

    def train(self, mode: bool = True) -> FeatureExtractor:
        self.training = False
        for child in self.children():
            try:
                child.train(False)
            except NotImplementedError:  # a torch.export program has no train/eval switch (it is always eval)
                pass
        return self


class ModelFeatures(FeatureExtractor):
    """Wraps a model exposing `forward_features(x) -> (N, D)` (x: float N x 1 x H x W in [0, 1]) and `num_features`.

    The wrapped model is put in eval mode (it is shared, not copied)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        if not isinstance(getattr(model, "num_features", None), int):
            raise ValueError(f"{type(model).__name__} has no int attribute num_features")
        self.model = model
        self.name = name
        self.num_features = int(model.num_features)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_image_tensor(images).to(next(self.model.parameters()).device)
        self.model.eval()
        return self.model.forward_features(x).float()


class TorchScriptFeatures(FeatureExtractor):
    """A TorchScript feature network loaded from a local file (see the module docstring for its contract)."""

    def __init__(self, path: str | Path, name: str | None = None, input_size: int | None = None,
                 in_channels: int | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: TorchScript feature extractor not found")
        self.device = torch.device(device)
        if path.suffix == ".pt2":  # a torch.export program (TorchScript's successor); carries no attributes
            self.net = torch.export.load(str(path)).module().to(self.device)
        else:
            with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.x, yet what most users have
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=self.device).eval()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        self.name = f"{name or path.stem}@{digest}"
        self.input_size = int(getattr(self.net, "input_size", input_size or 0))
        self.in_channels = int(getattr(self.net, "in_channels", in_channels or 1))
        if self.input_size <= 0:
            raise ValueError(f"{path}: the module has no input_size attribute; pass input_size")
        if self.in_channels not in (1, 3):
            raise ValueError(f"{path}: in_channels must be 1 or 3, got {self.in_channels}")
        n = getattr(self.net, "num_features", None)
        if n is None:
            with torch.no_grad():
                n = self._run(torch.zeros(1, 1, self.input_size, self.input_size, device=self.device)).shape[1]
        self.num_features = int(n)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = resize(x, self.input_size)
        if self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out = self.net(x)
        return out.reshape(out.shape[0], -1).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(to_image_tensor(images).to(self.device))


class IdentityFeatures(FeatureExtractor):
    """Returns its input: lets torchmetrics consume feature vectors that were computed once."""

    def __init__(self, num_features: int, name: str = "identity") -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected N x {self.num_features} vectors, got shape {tuple(x.shape)}")
        return x


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> Features:
    """Run an extractor over images (uint8 or float [0, 1], N x H x W) in batches; eval mode, no gradients."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    was_training = extractor.training
    extractor.eval()
    try:
        out = [extractor(to_image_tensor(images[i:i + batch_size])).double().cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        extractor.train(was_training)
    values = torch.cat(out).numpy()
    if values.shape[1] != extractor.num_features:
        raise ValueError(f"{extractor.name}: produced {values.shape[1]} features, num_features says "
                         f"{extractor.num_features}")
    return Features(values, extractor.name)
