"""The pictures the evaluate stage draws: sample grid with nearest training neighbours, per-label examples, text tiles."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxrsynth.text.chexpert import OBSERVATIONS
from cxrsynth.viz import image_grid

if TYPE_CHECKING:
    from cxrsynth.data.arrays import RealSplit
    from cxrsynth.data.synthetic import SyntheticSet


def text_tile(text: str, tile: int = 160, chars: int | None = None) -> np.ndarray:
    """A white uint8 tile with `text` wrapped in black (the prompt column of the sample grid)."""
    from PIL import Image, ImageDraw, ImageFont

    im = Image.new("L", (tile, tile), 255)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    lines = []
    for para in str(text).splitlines():
        lines += textwrap.wrap(para, chars or max(10, tile // 6)) or [""]
    for k, line in enumerate(lines[: max(1, (tile - 4) // 11)]):
        draw.text((3, 2 + 11 * k), line, fill=0, font=font)
    return np.asarray(im)


def sample_grid(synthetic: SyntheticSet, train_images: np.ndarray, nn_index: np.ndarray, nn_dist: np.ndarray,
                rows: int, tile: int = 160):
    """Rows of (prompt | synthetic image | nearest real training image in feature space), spread over the set."""
    pick = np.unique(np.linspace(0, len(synthetic.images) - 1, num=min(rows, len(synthetic.images))).astype(int))
    images, captions = [], []
    for i in pick:
        r = synthetic.manifest.iloc[i]
        j = int(nn_index[i])
        images += [text_tile(r["text"], tile), synthetic.images[i], train_images[j]]
        captions += [f"prompt {r['prompt_id']} ({r['kind']}, {r['view']})", f"synthetic {r['synthetic_id']}",
                     f"nearest train #{j} (feature d={nn_dist[i]:.3g})"]
    return image_grid(images, captions, cols=3, tile=tile, caption_lines=2,
                      title="prompt | synthetic | nearest real training image")


def label_examples_grid(synthetic: SyntheticSet, probs: np.ndarray, real: RealSplit, real_images: np.ndarray,
                        per_label: int, tile: int = 128):
    """One row per label asked by some prompt: a real test image with that label, then synthetic images whose prompt
    asks for it (highest first by the classifier's probability), captioned with that probability."""
    labels = synthetic.labels
    images, captions = [], []
    for j, name in enumerate(OBSERVATIONS):
        asked = np.flatnonzero(labels[:, j] == 1.0)
        if not len(asked):
            continue
        real_pos = np.flatnonzero(real.labels[:, j] == 1.0)
        if len(real_pos):
            images.append(real_images[real_pos[0]])
            captions.append(f"{name}: real test #{real_pos[0]}")
        else:
            images.append(np.zeros_like(synthetic.images[0]))
            captions.append(f"{name}: no real test example")
        chosen = asked[np.argsort(-probs[asked, j], kind="stable")][:per_label]
        for i in chosen:
            images.append(synthetic.images[i])
            captions.append(f"{synthetic.manifest.iloc[i]['synthetic_id']} p={probs[i, j]:.2f}")
        for _ in range(per_label - len(chosen)):
            images.append(np.full_like(synthetic.images[0], 255))
            captions.append("")
    if not images:
        images, captions = [np.full_like(synthetic.images[0], 255)], ["no prompt asks for any label"]
    return image_grid(images, captions, cols=1 + per_label, tile=tile, caption_lines=2,
                      title="per label: a real test example, then synthetic images whose prompt asks for it "
                            "(p = classifier probability)")


@dataclass(frozen=True)
class Pictures:
    """Output PNG paths."""

    roc: Path
    samples: Path
    label_examples: Path
    closest_pairs: Path

    @classmethod
    def under(cls, metrics_dir: str | Path) -> Pictures:
        d = Path(metrics_dir)
        return cls(d / "evaluate_roc.png", d / "evaluate_samples.png", d / "evaluate_label_examples.png",
                   d / "evaluate_closest_pairs.png")
