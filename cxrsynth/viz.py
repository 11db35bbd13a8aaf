"""Captioned image grids (PNG) for people to look at; deterministic, PIL only."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _fit(img: np.ndarray, tile: int) -> Image.Image:
    """Letterbox a [0,1] float or uint8 grayscale array into a tile x tile square, aspect ratio kept."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    im = Image.fromarray(a, mode="L")
    scale = tile / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (tile, tile), 0)
    canvas.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return canvas


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], cols: int = 6, tile: int = 224,
               caption_lines: int = 5, title: str | None = None) -> Image.Image:
    """A grid of letterboxed images, each with a wrapped caption below it (and an optional title bar)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default()
    line_h = 12
    cap_h = caption_lines * line_h + 6
    rows = max(1, -(-len(images) // cols))
    top = 22 if title else 0
    sheet = Image.new("L", (cols * tile, top + rows * (tile + cap_h)), 255)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 5), title, fill=0, font=font)
    chars = max(10, tile // 6)
    for i, (img, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = c * tile, top + r * (tile + cap_h)
        sheet.paste(_fit(img, tile), (x, y))
        lines = textwrap.wrap(cap, chars)[:caption_lines]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + tile + 2 + k * line_h), line, fill=0, font=font)
    return sheet
