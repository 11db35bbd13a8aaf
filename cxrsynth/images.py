"""Image helpers every layer shares (ingest, the models, evaluation): the one square geometry of stored images
(`place_square`, `to_square`) and uint8 arrays to float tensors at a model's size (`to_image_tensor`, `resize`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def place_square(img: np.ndarray, size: int, mode: str,
                 resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """A float image resized to size x size keeping its aspect ratio: pad (centred, zeros around) or crop (centre).
    The one geometry of stored images; anything mapped onto them (e.g. ground-truth regions) goes through it."""
    h, w = img.shape
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((nw, nh), resample))
    out = np.zeros((size, size), np.float32)
    if mode == "pad":
        y, x = (size - nh) // 2, (size - nw) // 2
        out[y:y + nh, x:x + nw] = small
    else:
        y, x = (nh - size) // 2, (nw - size) // 2
        out = small[y:y + size, x:x + size]
    return out


def to_square(img: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize a [0,1] image to size x size keeping its aspect ratio (pad with black, or centre-crop),
    anti-aliased (Lanczos on float data), returned as uint8."""
    return (np.clip(place_square(img, size, mode), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_image_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images, N x H x W or N x 1 x H x W -> float32 tensor N x 1 x H x W in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        a = np.asarray(images)
        x = torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else np.array(a))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grayscale images N x H x W or N x 1 x H x W, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or float images, got {x.dtype}")
    return x.float()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Square-resize N x C x H x W (bilinear with antialiasing when shrinking); a no-op at the right size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
