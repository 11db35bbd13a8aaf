"""Where a synthetic image's PNG lives: loose files, or shards of a tar archive (the layout for 100k+ images).

DVC checks every file of an output on each `dvc status`; with 100k loose PNGs that is minutes per status (about
0.4 ms a file here). `synthesize.png_layout`:
- `loose`: `images/<synthetic_id>.png` (default: one file per image, easy to browse);
- `tar`: `png/<shard>.tar` archives of `synthesize.png_shard_size` PNGs each (webdataset-style, deterministic bytes:
  members in manifest order, zero times and owners), so DVC tracks a handful of files; `tar -xf` gives the PNGs;
- `none`: no PNGs; `images.npy` (always written) is the images, `python -m cxrsynth export-png` writes them on demand.

A manifest row names its PNG with `file` (the loose file or the archive, relative to the synthetic folder) and, for an
archive, `member`; `png_sha256` is the SHA-256 of the PNG's bytes in either case. Without PNGs both are empty and
`pixels_sha256` (the SHA-256 of the image's uint8 pixels, row-major) identifies the image.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

LAYOUTS = ("loose", "tar", "none")


def png_bytes(image: np.ndarray, text: dict) -> bytes:
    """8-bit grayscale PNG with iTXt chunks (deterministic bytes)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_itxt(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8), mode="L").save(buf, format="PNG", pnginfo=info, optimize=False,
                                                                   compress_level=6)
    return buf.getvalue()


def pixels_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


class TarShards:
    """Appends PNGs to `<out>/png/<k>.tar`, `shard_size` per archive, in the order given."""

    def __init__(self, out: str | Path, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"png_shard_size must be >= 1, got {shard_size}")
        self.out, self.shard_size = Path(out), int(shard_size)
        self.count, self._tar, self._name = 0, None, None

    def add(self, member: str, data: bytes) -> str:
        """Append one member; returns the archive's path relative to `out`."""
        if self.count % self.shard_size == 0:
            self.close()
            self._name = f"png/{self.count // self.shard_size:06d}.tar"
            (self.out / "png").mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self.out / self._name, "w", format=tarfile.USTAR_FORMAT)
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        return self._name

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> TarShards:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_png(folder: str | Path, row: dict) -> bytes | None:
    """The PNG bytes of a manifest row (loose file or archive member); None when the row has no PNG."""
    file = row.get("file")
    if not file:
        return None
    path = Path(folder) / file
    member = row.get("member")
    if member:
        with tarfile.open(path, "r") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{path}: no member {member}")
            return f.read()
    return path.read_bytes()
