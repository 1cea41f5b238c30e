"""Shared test fixtures: tiny synthetic images written with PIL (no dependency on bcc.synth)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest


def image_bytes(seed: int, size: int = 32, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small random-coloured image (blocks of colour, so JPEG stays tiny) encoded as `fmt`."""
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(size), rng.randrange(size)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(size, x + 8), min(size, y + 8)))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def make_class_tree():
    """Factory: write `{folder: n_images}` random JPEGs (size px) under root; returns root."""

    def make(root: Path, counts: dict[str, int], size: int = 32, seed: int = 0, fmt: str = "JPEG") -> Path:
        ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
        for f, (folder, n) in enumerate(counts.items()):
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = image_bytes(seed * 1_000_003 + f * 10_007 + i, size, fmt)
                (root / folder / f"img{i:04d}.{ext}").write_bytes(data)
        return root

    return make
