"""VQ-GAN visual codebook: the discrete vocabulary that alignment and the generator work in.

Built from taming-transformers modules (`Encoder` / `Decoder` with one image channel, `NLayerDiscriminator`) and one
of two quantizers:

- `vq2`: taming's `VectorQuantizer2(legacy=False)`, a codebook learned by gradient (codebook loss + beta x
  commitment loss, straight-through estimator);
- `ema`: vector-quantize-pytorch's `VectorQuantize`, a codebook updated by exponential moving averages of the
  encoder outputs assigned to each code, optional k-means initialisation from the first batch, and dead-code revival
  (a code whose EMA cluster size falls below `dead_code_threshold` is replaced by a random encoder output).

Measured on the phantom (default preset, 520 steps on a 2-core CPU): `ema` reaches 28.9-29.2 dB validation PSNR
with every one of the 512 codes in use (perplexity ~420); `vq2` reaches 27.2 dB with 35 codes (7%, perplexity 17).
`ema` is the default.

Either way the quantizer runs in float32 (also under bf16 autocast: nearest-code search in bf16 would flip indices),
and the quantized latents returned by `encode` in eval mode are exactly the codebook rows of their indices.

Model API (the taming shape):
- `VQGAN.encode(x) -> VQEncoding(quant B x D x h x w, indices B x h x w int64, loss, commitment)`;
- `VQGAN.decode(quant) -> x`, `VQGAN.decode_code(indices) -> x`, `VQGAN(x) -> (reconstruction, VQEncoding)`;
- images: float32 B x 1 x S x S in [-1, 1] (`to_model_input` turns uint8 [0, 255] or float [0, 1] images of any size
  into that, resizing with antialiasing; `to_unit` maps outputs back to [0, 1], clamped);
- `save(path)` / `VQGAN.load(path)`: a self-describing folder, `config.json` + `model.safetensors` (no params needed to
  rebuild it); `weights_sha256(path)` names the exact weights (token stores record it).

Training (`fit`, through the shared loop `cxrsynth.train`): L1 reconstruction, optional perceptual loss (a frozen
TorchScript feature network from a local path), the quantizer's loss, and a PatchGAN discriminator with the hinge
loss, taming's adaptive weight and a delayed start. The shared loop owns one AdamW optimizer, so generator and
discriminator are trained as one module (`VQGANTrainer`) whose single loss is the sum of the generator loss and the
discriminator loss with the gradient paths kept apart: the discriminator loss sees detached reconstructions (no
gradient into the generator) and the generator's adversarial term runs the discriminator with detached weights (no
gradient into the discriminator). AdamW is per-parameter, so this equals two AdamW optimizers with the same
hyper-parameters and schedule; only gradient clipping is shared (one global norm over both networks).

Reads/writes only what the caller passes (model folders, checkpoint and dvclive folders).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrsynth.config import CodebookParams
from cxrsynth.data.arrays import stream_digest, take
from cxrsynth.models import folder
from cxrsynth.images import resize, to_image_tensor
from cxrsynth.train import EpochSampler, TrainConfig, TrainResult, dist_info, seed_everything, train

FORMAT = "cxrsynth-vqgan"
FORMAT_VERSION = 1
QUANTIZERS = ("vq2", "ema")
QUANTIZER_NAMES = {"vq2": "taming VectorQuantizer2 (legacy=False): gradient-learned codebook",
                   "ema": "vector-quantize-pytorch VectorQuantize: EMA codebook, k-means init, dead-code revival"}


# ----------------------------------------------------------------------------------------------------------------
# configuration and outputs

@dataclass(frozen=True)
class VQGANConfig:
    """Everything needed to rebuild the autoencoder and its codebook (stored in config.json)."""

    image_size: int = 64                         # S: input and output side
    in_channels: int = 1                         # grayscale radiographs
    channels: int = 32                           # base width of encoder/decoder (x channel_mult per level)
    channel_mult: tuple[int, ...] = (1, 1, 2)    # one entry per resolution level; len - 1 halvings
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = ()       # feature-map sides with self-attention (the middle always has one)
    z_channels: int = 64                         # encoder output channels, before the 1x1 projection to embed_dim
    embed_dim: int = 32                          # dimension of a codebook vector
    codebook_size: int = 512                     # number of codes K
    quantizer: str = "ema"                       # vq2 (taming, gradient-learned) | ema (vector-quantize-pytorch)
    beta: float = 0.25                           # commitment weight
    ema_decay: float = 0.99                      # ema: codebook EMA decay
    kmeans_init: bool = True                     # ema: initialise the codebook by k-means on the first batch
    dead_code_threshold: float = 1.0             # ema: revive codes whose EMA cluster size falls below this (0 = off)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {list(QUANTIZERS)}, got {self.quantizer!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must list >= 1 positive multipliers, got {list(self.channel_mult)}")
        if self.channels < 1 or any((self.channels * m) % 32 for m in self.channel_mult):
            raise ValueError(f"channels x each channel_mult must be a multiple of 32 (taming's GroupNorm has 32 "
                             f"groups), got channels={self.channels}, channel_mult={list(self.channel_mult)}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < down or self.image_size % down:
            raise ValueError(f"image_size {self.image_size} must be a multiple of {down} "
                             f"({len(self.channel_mult) - 1} halvings)")
        for name in ("in_channels", "num_res_blocks", "z_channels", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(f"codebook_size must be in [2, 65536] (tokens are stored as uint16), "
                             f"got {self.codebook_size}")
        if self.beta < 0 or not 0.0 < self.ema_decay < 1.0 or self.dead_code_threshold < 0:
            raise ValueError(f"need beta >= 0, 0 < ema_decay < 1, dead_code_threshold >= 0; got {self.beta}, "
                             f"{self.ema_decay}, {self.dead_code_threshold}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def grid_size(self) -> int:
        """Side of the token grid: image_size / 2^(levels - 1)."""
        return self.image_size // 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"], d["attn_resolutions"] = list(self.channel_mult), list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown VQ-GAN config keys: {unknown}")
        return cls(**d)


@dataclass
class VQEncoding:
    """What `VQGAN.encode` returns."""

    quant: torch.Tensor        # B x embed_dim x h x w, float32: codebook rows (straight-through in training)
    indices: torch.Tensor      # B x h x w, int64 in [0, codebook_size)
    loss: torch.Tensor         # the quantizer's loss to add (vq2: codebook + beta x commitment; ema: beta x commitment)
    commitment: torch.Tensor   # mean ||z - sg(e)||^2, detached (for logging)


# ----------------------------------------------------------------------------------------------------------------
# images in and out

def to_model_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images, N x H x W or N x 1 x H x W, any side -> float32 N x 1 x size x size in
    [-1, 1] (bilinear with antialiasing when shrinking: the one resize used by training, tokens and evaluation)."""
    return resize(to_image_tensor(images), size) * 2.0 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model-space images ([-1, 1]) -> [0, 1], clamped, float32."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# the model

def _quiet(fn: Callable[[], nn.Module]) -> nn.Module:
    """Build a taming module without its construction-time prints ("Working with z of shape ...")."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def _fp32(device: torch.device):
    """Leave any autocast region: the quantizer must measure distances in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


class VQGAN(nn.Module):
    """Encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder; images float B x 1 x S x S in [-1, 1]."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder

        self.config = c = config
        arch = dict(ch=c.channels, out_ch=c.in_channels, ch_mult=c.channel_mult, num_res_blocks=c.num_res_blocks,
                    attn_resolutions=c.attn_resolutions, dropout=c.dropout, resamp_with_conv=True,
                    in_channels=c.in_channels, resolution=c.image_size, z_channels=c.z_channels)
        self.encoder = _quiet(lambda: Encoder(**arch, double_z=False))
        self.decoder = _quiet(lambda: Decoder(**arch))
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        if c.quantizer == "vq2":
            from taming.modules.vqvae.quantize import VectorQuantizer2

            self.quantize = VectorQuantizer2(c.codebook_size, c.embed_dim, beta=c.beta, sane_index_shape=True,
                                             legacy=False)
        else:
            from vector_quantize_pytorch import VectorQuantize

            # rotation_trick=False: the same straight-through estimator as vq2, so the comparison is about the
            # codebook update rule (EMA + revival vs gradient). Under torchrun the EMA statistics are all-reduced
            # (the library's default when torch.distributed is initialised).
            self.quantize = VectorQuantize(dim=c.embed_dim, codebook_size=c.codebook_size, decay=c.ema_decay,
                                           commitment_weight=c.beta, kmeans_init=c.kmeans_init,
                                           threshold_ema_dead_code=c.dead_code_threshold, accept_image_fmap=True,
                                           rotation_trick=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def codebook(self) -> torch.Tensor:
        """The codes, K x embed_dim (a view of the current weights / EMA buffer)."""
        if self.config.quantizer == "vq2":
            return self.quantize.embedding.weight
        return self.quantize.codebook

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight (taming's adaptive GAN weight balances gradients there)."""
        return self.decoder.conv_out.weight

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook rows of B x h x w indices -> B x embed_dim x h x w float32."""
        return F.embedding(indices, self.codebook.float()).permute(0, 3, 1, 2).contiguous()

    def encode(self, x: torch.Tensor) -> VQEncoding:
        z = self.quant_conv(self.encoder(x))
        with _fp32(z.device):
            z = z.float()
            if self.config.quantizer == "vq2":
                quant, loss, (_, _, indices) = self.quantize(z)
            else:  # in training this also moves the EMA codebook and revives dead codes (after choosing indices)
                quant, indices, loss = self.quantize(z)
            indices = indices.long()
            if not (self.training and torch.is_grad_enabled()):
                # exactly the codebook rows (the straight-through form z + (e - z) is e only up to rounding)
                quant = self.lookup(indices)
            # in training: the quantizer's straight-through output, the codes chosen before any EMA update or revival
            commitment = F.mse_loss(z.detach(), quant.detach())
        return VQEncoding(quant=quant, indices=indices, loss=loss.float(), commitment=commitment)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """Images from token grids B x h x w (any integer dtype)."""
        return self.decode(self.lookup(indices.long().to(self.codebook.device)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, VQEncoding]:
        enc = self.encode(x)
        return self.decode(enc.quant), enc

    # -- batched numpy helpers (eval mode, no gradients, float32) -------------------------------------------------

    @torch.no_grad()
    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], items: np.ndarray | torch.Tensor,
                 batch_size: int) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            out = [fn(items[i:i + batch_size]).cpu() for i in range(0, len(items), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)

    def tokenize(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Token grids of uint8 / [0, 1] images of any size: int64 N x h x w."""
        size = self.config.image_size
        return self._batched(lambda b: self.encode(to_model_input(b, size).to(self.device)).indices, images,
                             batch_size)

    def reconstruct(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Encode + decode: float32 N x S x S in [0, 1]."""
        size = self.config.image_size
        return self._batched(lambda b: to_unit(self(to_model_input(b, size).to(self.device))[0])[:, 0], images,
                             batch_size)

    def decode_tokens(self, tokens: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Images from token grids: float32 N x S x S in [0, 1]."""
        return self._batched(lambda t: to_unit(self.decode_code(torch.as_tensor(np.asarray(t, np.int64))))[:, 0],
                             tokens, batch_size)

    # -- self-describing folder ------------------------------------------------------------------------------------

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write `config.json` (architecture, codebook, input convention, `extra` provenance) + `model.safetensors`."""
        c = self.config
        folder.save_folder(self, path, FORMAT, FORMAT_VERSION, {
            "config": c.to_dict(), "grid_size": [c.grid_size, c.grid_size], "codebook_size": c.codebook_size,
            "input": f"float32 N x {c.in_channels} x {c.image_size} x {c.image_size} in [-1, 1] "
                     "(uint8 / 127.5 - 1, resized with antialiasing); outputs in the same range, unclamped",
            **({"training": extra} if extra else {})})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """Rebuild from a folder written by `save` (strict: a missing or unexpected weight is an error); eval mode."""
        meta = folder.read_meta(path, FORMAT, FORMAT_VERSION)
        model = folder.load_state(cls(folder.read_config(path, meta, VQGANConfig.from_dict)), path)
        return model.to(device).eval()


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a VQ-GAN folder's `model.safetensors` (or of the given file): names the exact weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_from_params(p: CodebookParams) -> VQGANConfig:
    return VQGANConfig(image_size=p.image_size, channels=p.channels, channel_mult=p.channel_mult,
                       num_res_blocks=p.num_res_blocks, attn_resolutions=p.attn_resolutions, z_channels=p.z_channels,
                       embed_dim=p.embed_dim, codebook_size=p.codebook_size, quantizer=p.quantizer, beta=p.beta,
                       ema_decay=p.ema_decay, kmeans_init=p.kmeans_init, dead_code_threshold=p.dead_code_threshold)


# ----------------------------------------------------------------------------------------------------------------
# measurements

def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [0, 1] images N x ... (data range 1; identical images give +inf)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of [0, 1] grayscale images N x 1 x H x W (or N x H x W): Gaussian window
    11 / 1.5, K1 = 0.01, K2 = 0.03, data range 1, 'valid' windows only, mean over the map."""
    # float64: E[x^2] - E[x]^2 in float32 leaves variance noise of the order of c2 on flat regions
    a, b = (t.double()[:, None] if t.dim() == 3 else t.double() for t in (a, b))
    w = _gaussian_window(min(window, a.shape[-1], a.shape[-2]), sigma).to(a.device, torch.float64)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a ** 2
    var_b = F.conv2d(b * b, w) - mu_b ** 2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).float()


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of histograms along the last dimension (0 for an empty one)."""
    p = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    return -(p * p.clamp(min=1e-300).log()).sum(-1)


def code_usage(indices: np.ndarray | torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Share of the codebook used by these indices, and the perplexity exp(H) of their code histogram (in codes;
    codebook_size when uniform, 1 when a single code). For grids (N x h x w) also `position_entropy`: the entropy
    (nats) of the codes seen at each grid position over the N grids, averaged over positions. It is what a model
    that knows only the position would pay per token, so it tracks how hard the generator's job is: a codebook
    that spends many codes on near-identical patches (blank film) scores high there with no gain in fidelity.
    Counted a chunk of grids at a time (memmaps and `NpyRows` included): memory O(positions x codebook), not O(N)."""
    n = len(indices)
    shape = tuple(indices.shape)
    counts = torch.zeros(codebook_size, dtype=torch.float64)
    hist = torch.zeros(int(np.prod(shape[1:])) if len(shape) >= 3 else 0, codebook_size, dtype=torch.float64)
    step = max(1, 4096 if len(shape) < 2 else (1 << 20) // max(1, int(np.prod(shape[1:]))))
    for i in range(0, n, step):
        chunk = indices[i:i + step]
        idx = chunk.long() if isinstance(chunk, torch.Tensor) else \
            torch.from_numpy(np.asarray(chunk).astype(np.int64))  # a copy: memmaps are read-only
        counts += torch.bincount(idx.flatten(), minlength=codebook_size).double()[:codebook_size] \
            if idx.numel() else 0.0
        if len(shape) >= 3 and len(idx):
            per_pos = idx.flatten(1).T  # positions x chunk
            hist.scatter_add_(1, per_pos, torch.ones_like(per_pos, dtype=torch.float64))
    out = {"codes_used": int((counts > 0).sum()), "usage": float((counts > 0).double().mean()),
           "perplexity": float(_entropy(counts).exp())}
    if len(shape) >= 3 and n:
        out["position_entropy"] = float(_entropy(hist).mean())
    return out


@torch.no_grad()
def reconstruction_metrics(model: VQGAN, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """PSNR / SSIM (mean over images, at the model's resolution, [0, 1] range), codebook usage and perplexity of a
    set of uint8 or [0, 1] images."""
    size = model.config.image_size
    ps, ss, idx = [], [], []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = to_model_input(images[i:i + batch_size], size).to(model.device)
            rec, enc = model(x)
            ref, out = to_unit(x), to_unit(rec)
            ps.append(psnr(out, ref).cpu())
            ss.append(ssim(out, ref).cpu())
            idx.append(enc.indices.cpu())
    finally:
        model.train(was_training)
    usage = code_usage(torch.cat(idx), model.config.codebook_size)
    return {"psnr": float(torch.cat(ps).mean()), "ssim": float(torch.cat(ss).mean()), **usage}


# ----------------------------------------------------------------------------------------------------------------
# losses and the discriminator

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming's balance: ||d nll / d last|| / (||d g_loss / d last|| + 1e-4), clamped to [0, max], detached."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def _disc_init(m: nn.Module) -> None:
    """pix2pix / taming initialisation of the PatchGAN discriminator."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class PerceptualLoss:
    """Feature-space distance under a frozen TorchScript network from a local file (not a submodule: it is neither
    trained nor checkpointed). Contract of the file: it takes float32 N x 1 x S x S in [-1, 1] and returns one feature
    tensor or a list/tuple of them; the loss is the mean over feature tensors of the MSE between channel-normalised
    features (the LPIPS recipe without learned weights)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: perceptual model file not found")
        self.path = path
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if next(iter(self.net.parameters()), x).device != x.device:
            self.net = self.net.to(x.device)
        fx, fy = self.net(x), self.net(y.detach())
        fx = list(fx) if isinstance(fx, (list, tuple)) else [fx]
        fy = list(fy) if isinstance(fy, (list, tuple)) else [fy]
        norm = lambda f: f.float() / (f.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # noqa: E731
        return torch.stack([F.mse_loss(norm(a), norm(b)) for a, b in zip(fx, fy)]).mean()


class VQGANTrainer(nn.Module):
    """The VQ-GAN and its PatchGAN discriminator as one module for the shared loop.

    forward(x, step) -> (loss, logs): loss = L1 + perceptual + quantizer loss [+ adaptive_weight x disc_weight x
    generator hinge + discriminator hinge, from step `disc_start` on]. The two adversarial terms are built so that
    each network only receives the gradient of its own objective (see the module docstring)."""

    def __init__(self, vqgan: VQGAN, *, disc_layers: int = 2, disc_channels: int = 32, disc_start: int = 0,
                 disc_weight: float = 0.8, perceptual: PerceptualLoss | None = None,
                 perceptual_weight: float = 0.0) -> None:
        super().__init__()
        from taming.modules.discriminator.model import NLayerDiscriminator

        self.vqgan = vqgan
        self.disc = NLayerDiscriminator(input_nc=vqgan.config.in_channels, ndf=disc_channels, n_layers=disc_layers)
        self.disc.apply(_disc_init)
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight

    def gan_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rec, enc = self.vqgan(x)
        l1 = (rec.float() - x.float()).abs().mean()
        nll = l1
        logs: dict[str, torch.Tensor] = {"l1": l1.detach(), "quant_loss": enc.loss.detach(),
                                         "commitment": enc.commitment}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p_loss = self.perceptual(rec, x)
            nll = nll + self.perceptual_weight * p_loss
            logs["perceptual"] = p_loss.detach()
        loss = nll + enc.loss
        if self.gan_active(step):
            frozen = {**{n: p.detach() for n, p in self.disc.named_parameters()}, **dict(self.disc.named_buffers())}
            g_loss = -torch.func.functional_call(self.disc, frozen, (rec,)).float().mean()
            if torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, self.vqgan.last_layer) * self.disc_weight
            else:
                d_weight = torch.tensor(self.disc_weight, device=x.device)
            logits_real = self.disc(x.detach()).float()
            logits_fake = self.disc(rec.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            loss = loss + d_weight * g_loss + d_loss
            logs.update(g_loss=g_loss.detach(), d_loss=d_loss.detach(), d_weight=d_weight,
                        logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            # DDP (the shared loop does not pass find_unused_parameters) needs every parameter in the graph
            loss = loss + 0.0 * sum(p.sum() for p in self.disc.parameters())
        with torch.no_grad():
            counts = torch.bincount(enc.indices.flatten(), minlength=self.vqgan.config.codebook_size)
            logs["batch_codes_used"] = (counts > 0).sum().float()
        return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# training

def _digest(*parts: bytes) -> str:
    """Fingerprint of parts given as bytes, or as `Digested` (the SHA-256 of data streamed from a file)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.digest if isinstance(part, Digested) else hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Digested:
    """A part of `_digest` whose SHA-256 was computed elsewhere (chunk by chunk, never as one bytes object)."""

    digest: bytes


def train_config(p: CodebookParams, *, seed: int = 0, device: str = "auto", out_dir: str | Path | None = None,
                 live_dir: str | Path | None = None, run_id: str = "", progress: bool = True) -> TrainConfig:
    """The shared loop's settings for the codebook: AdamW with taming's betas (0.5, 0.9), warmup + cosine.

    The last weights are kept, not the best validation PSNR: selecting on PSNR would hand back the weights from before
    the adversarial phase (which trades PSNR for sharpness), silently undoing it."""
    return TrainConfig(max_steps=p.steps, lr=p.lr, min_lr_ratio=p.min_lr_ratio, warmup_steps=p.warmup_steps,
                       weight_decay=p.weight_decay, betas=(0.5, 0.9), grad_clip=p.grad_clip, device=device,
                       dtype=p.dtype, compile=p.compile, seed=seed, log_every=max(1, min(25, p.eval_every)),
                       eval_every=p.eval_every, checkpoint_every=p.checkpoint_every, select_metric=None,
                       out_dir=str(out_dir) if out_dir else None,
                       live_dir=str(live_dir) if live_dir else None, run_id=run_id, progress=progress,
                       desc="codebook")


@dataclass
class TrainingSetup:
    """Everything `cxrsynth.train.train` needs for the codebook; `fit` runs it (tests run it with interruptions)."""

    trainer: VQGANTrainer
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]]
    batches: Callable[[int], dict]
    cfg: TrainConfig
    evaluate: Callable[[nn.Module], dict]


def training_setup(p: CodebookParams, train_images: np.ndarray, validate_images: np.ndarray, *, seed: int = 0,
                   device: str = "auto", out_dir: str | Path | None = None, live_dir: str | Path | None = None,
                   progress: bool = True) -> TrainingSetup:
    """Build the model (seeded), the loss, the step -> batch function and the validation callback.

    Training images stay where they are (a uint8 `.npy` read per batch, `cxrsynth.data.arrays.NpyRows`, or any
    array): each batch reads its rows and is resized to `p.image_size` on its own, so memory is bounded by the batch
    and each DDP rank reads only its sampler's rows. Batches are epoch-shuffled (`EpochSampler`) and carry their step,
    so the discriminator's delayed start is a function of the batch (resume-safe)."""
    seed_everything(seed)
    vqgan = VQGAN(config_from_params(p))
    perceptual = PerceptualLoss(p.perceptual_model) if p.perceptual_weight > 0 else None
    trainer = VQGANTrainer(vqgan, disc_layers=p.disc_layers, disc_channels=p.disc_channels, disc_start=p.disc_start,
                           disc_weight=p.disc_weight, perceptual=perceptual, perceptual_weight=p.perceptual_weight)
    info = dist_info()
    sampler = EpochSampler(len(train_images), p.batch_size, seed, rank=info.rank, world_size=info.world_size)

    def batches(step: int) -> dict:
        return {"x": to_model_input(take(train_images, sampler(step)), p.image_size).contiguous(), "step": step}

    def loss_fn(net: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        return net(batch["x"], batch["step"])

    def evaluate(net: VQGANTrainer) -> dict:
        m = reconstruction_metrics(net.vqgan, validate_images)
        return {"psnr": m["psnr"], "ssim": m["ssim"], "usage": m["usage"], "perplexity": m["perplexity"]}

    # the checkpoint fingerprint: params, data and this file's code (a finished checkpoint of older code must not be
    # handed back as the result of new code)
    run_id = _digest(json.dumps(dataclasses.asdict(p), sort_keys=True, default=list).encode(),
                     Digested(stream_digest(train_images)), Digested(stream_digest(validate_images)),
                     Path(__file__).read_bytes())
    cfg = train_config(p, seed=seed, device=device, out_dir=out_dir, live_dir=live_dir, run_id=run_id,
                       progress=progress)
    return TrainingSetup(trainer, loss_fn, batches, cfg, evaluate)


def fit(p: CodebookParams, train_images: np.ndarray, validate_images: np.ndarray, *, seed: int = 0,
        device: str = "auto", out_dir: str | Path | None = None, live_dir: str | Path | None = None,
        progress: bool = True) -> tuple[VQGAN, TrainResult]:
    """Train a VQ-GAN on `train_images` (uint8 or [0, 1], any side); validation metrics are logged along the way.

    Checkpoints (resume) go to `out_dir`, curves to `live_dir` (dvclive). Returns the VQ-GAN (eval mode, on the
    training device) and the loop's result."""
    s = training_setup(p, train_images, validate_images, seed=seed, device=device, out_dir=out_dir,
                       live_dir=live_dir, progress=progress)
    result = train(s.trainer, s.loss_fn, s.batches, s.cfg, s.evaluate)
    return s.trainer.vqgan.eval(), result


def training_record(p: CodebookParams, result: TrainResult) -> dict:
    """Provenance stored in the model folder's config.json."""
    return {"params": json.loads(json.dumps(dataclasses.asdict(p), default=list)), "steps": result.step,
            "history": result.history}


def grid_images(originals: np.ndarray, reconstructions: np.ndarray) -> list[np.ndarray]:
    """Originals (row 1) above their reconstructions (row 2), for `cxrsynth.viz.image_grid(..., cols=n)`."""
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    return [np.asarray(o) for o in originals] + [np.asarray(r) for r in reconstructions]
