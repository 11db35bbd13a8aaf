"""Synthetic test images shared by several test modules (not a test module itself)."""
import numpy as np


def blobs(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 images of a few smooth Gaussian blobs on a gradient: structured, learnable, distinct."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        img = 0.3 * yy + 0.1
        for _ in range(3):
            cy, cx, r, a = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25), rng.uniform(0.3, 0.6)
            img = img + a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        out.append(np.clip(img, 0, 1))
    return (np.stack(out) * 255).round().astype(np.uint8)
