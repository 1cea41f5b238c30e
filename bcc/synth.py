"""Synthetic peripheral-blood-smear crops in the default ALL folder layout.

`synthesize(out, per_class)` writes ``out/<Class>/<class>_<index:05d>.<fmt>`` for the four folders of the
default taxonomy (Benign, Early, Pre, Pro). It is the embedded dataset of the demo and the test suite.

Each image is rendered with an absorption (Beer-Lambert) model: a pale plasma background times
``exp(-optical density)`` of the stained objects, so overlapping red cells darken like real ones. The
classes differ only by *distributions* of morphology (cell size, nucleus/cytoplasm ratio, nuclear
outline, chromatin texture, nucleoli, cytoplasm basophilia) that overlap between classes, under random
stain, brightness, blur and noise shifts of the whole image; no single feature separates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bcc.errors import BccError

__all__ = ["SYNTH_CLASSES", "SynthError", "render_cell", "synthesize"]

SYNTH_CLASSES = ("Benign", "Early", "Pre", "Pro")
FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {})}

# Optical densities (R, G, B) of the stains; exp(-od) is the transmitted colour.
_RBC_OD = np.array([0.07, 0.40, 0.30], np.float32)  # eosinophilic pink
_NUCLEUS_OD = np.array([0.95, 1.30, 0.42], np.float32)  # haematoxylin-like purple
_CYTO_PALE_OD = np.array([0.20, 0.11, 0.04], np.float32)  # pale sky-blue
_CYTO_BASO_OD = np.array([0.62, 0.36, 0.10], np.float32)  # deep basophilic blue
_BACKGROUND = np.array([0.94, 0.88, 0.85], np.float32)


class SynthError(BccError):
    """Options `synthesize` cannot use."""


class SynthOutputExistsError(SynthError, FileExistsError):
    """The output directory exists and is not empty."""


@dataclass(frozen=True)
class CellStyle:
    """Per-class (mean, sd) of the morphology parameters of the central white cell.

    Sizes are fractions of the image side; ``nc_ratio`` is nucleus radius / cell radius. The standard
    deviations are wide on purpose so neighbouring classes overlap on every single parameter.
    """

    cell_radius: tuple[float, float]
    nc_ratio: tuple[float, float]
    lobe_amp: tuple[float, float]  # irregularity of the nuclear outline
    notch_prob: float  # chance of an indented (cleaved) nucleus
    grain: tuple[float, float]  # amplitude of chromatin texture
    grain_cells: tuple[float, float]  # texture cells across the nucleus: low = coarse clumps
    darkness: tuple[float, float]  # nuclear stain intensity
    nucleoli: float  # Poisson mean of visible nucleoli
    basophilia: tuple[float, float]  # 0 = pale blue cytoplasm, 1 = deep blue
    vacuoles: float  # Poisson mean of cytoplasmic vacuoles


# Benign: small mature lymphocyte, dense clumped chromatin, round nucleus, pale cytoplasm.
# The blasts are larger and differ among themselves by shifts smaller than the spreads:
# Early: round nucleus filling the cell, fine pale chromatin, little pale cytoplasm;
# Pre: mostly indented (cleaved) nucleus, several nucleoli, medium basophilia;
# Pro: lobulated irregular nucleus, coarser chromatin, more deep-blue vacuolated cytoplasm.
CELL_STYLES: dict[str, CellStyle] = {
    "Benign": CellStyle(
        cell_radius=(0.25, 0.03), nc_ratio=(0.74, 0.05), lobe_amp=(0.025, 0.015), notch_prob=0.15,
        grain=(0.40, 0.08), grain_cells=(4.0, 0.8), darkness=(1.15, 0.10), nucleoli=0.1,
        basophilia=(0.20, 0.15), vacuoles=0.1,
    ),
    "Early": CellStyle(
        cell_radius=(0.29, 0.03), nc_ratio=(0.89, 0.045), lobe_amp=(0.03, 0.015), notch_prob=0.05,
        grain=(0.08, 0.04), grain_cells=(10.0, 1.5), darkness=(0.80, 0.08), nucleoli=0.5,
        basophilia=(0.32, 0.15), vacuoles=0.1,
    ),
    "Pre": CellStyle(
        cell_radius=(0.31, 0.03), nc_ratio=(0.80, 0.05), lobe_amp=(0.07, 0.03), notch_prob=0.85,
        grain=(0.22, 0.06), grain_cells=(7.0, 1.5), darkness=(0.92, 0.08), nucleoli=2.5,
        basophilia=(0.58, 0.15), vacuoles=0.3,
    ),
    "Pro": CellStyle(
        cell_radius=(0.33, 0.03), nc_ratio=(0.73, 0.05), lobe_amp=(0.17, 0.04), notch_prob=0.35,
        grain=(0.35, 0.07), grain_cells=(5.0, 1.2), darkness=(1.05, 0.08), nucleoli=1.0,
        basophilia=(0.85, 0.15), vacuoles=1.5,
    ),
}


def _normal(rng: np.random.Generator, mean_sd: tuple[float, float], lo: float, hi: float) -> float:
    return float(np.clip(rng.normal(*mean_sd), lo, hi))


def _soft(inside_px: np.ndarray, edge_px: float = 0.8) -> np.ndarray:
    """Anti-aliased mask from a signed distance in pixels (positive inside)."""
    return np.clip(0.5 + inside_px / edge_px, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth noise of roughly `cells` blobs across the image: a random grid upsampled with smoothstep."""
    n = max(1, int(np.ceil(cells)))
    grid = rng.standard_normal((n + 2, n + 2)).astype(np.float32)
    ty, tx = rng.uniform(0.0, 1.0, 2)  # random phase so blobs don't align with the pixel grid

    def axis(offset: float) -> tuple[np.ndarray, np.ndarray]:
        t = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size) + offset
        i = t.astype(np.int64)
        f = t - i
        return i, f * f * (3.0 - 2.0 * f)

    iy, fy = axis(ty)
    ix, fx = axis(tx)
    rows = grid[iy] * (1.0 - fy)[:, None] + grid[iy + 1] * fy[:, None]
    return rows[:, ix] * (1.0 - fx)[None, :] + rows[:, ix + 1] * fx[None, :]


def _frame(size: int, cx: float, cy: float, angle: float, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by `angle` about (cx, cy), the x axis stretched by `aspect`."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    c, s = np.cos(angle), np.sin(angle)
    return (c * dx + s * dy) / aspect, -s * dx + c * dy


def _red_cells(rng: np.random.Generator, size: int) -> np.ndarray:
    """Optical density (H, W) of a few overlapping discocytes with central pallor."""
    od = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(2, 7))):
        radius = size * rng.normal(0.17, 0.015)
        cx, cy = rng.uniform(-0.1, 1.1, 2) * size
        u, v = _frame(size, cx, cy, rng.uniform(0, np.pi), rng.uniform(1.0, 1.15))
        r = np.hypot(u, v)
        rel = r / radius
        pallor = rng.uniform(0.45, 0.75) * np.exp(-((rel / 0.5) ** 2))
        rim = 0.15 * np.exp(-(((rel - 0.85) / 0.15) ** 2))  # biconcave edge is a bit denser
        od += _soft(radius - r) * (1.0 - pallor + rim) * rng.uniform(0.8, 1.1)
    return od


def _nucleus_radius(phi: np.ndarray, rng: np.random.Generator, style: CellStyle, base: float) -> np.ndarray:
    """Polar outline r(phi) of the nucleus: low harmonics for lobes, a Gaussian notch for indentation."""
    amp = _normal(rng, style.lobe_amp, 0.0, 0.3)
    shape = np.ones_like(phi)
    for k in (2, 3, 4, 5):
        weight = rng.uniform(0.3, 1.0) / (k - 1)
        shape += amp * weight * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    if rng.random() < style.notch_prob:
        where = rng.uniform(0, 2 * np.pi)
        gap = np.angle(np.exp(1j * (phi - where)))
        shape -= rng.uniform(0.2, 0.45) * np.exp(-((gap / rng.uniform(0.25, 0.5)) ** 2))
    return base * shape


def render_cell(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one RGB blood-smear crop of class `cls` (one of SYNTH_CLASSES), `size` x `size` pixels."""
    if cls not in CELL_STYLES:
        raise SynthError(f"unknown synthetic class {cls!r}; expected one of {SYNTH_CLASSES}")
    style = CELL_STYLES[cls]
    s = float(size)

    # Per-image stain batch: strength and hue of the dyes vary between slides.
    stain = rng.normal(1.0, 0.10) * rng.normal(1.0, 0.07, 3).astype(np.float32)

    od = _red_cells(rng, size)[..., None] * (_RBC_OD * stain)

    # White cell: centre jittered around the middle, random rotation and slight ellipticity.
    cell_r = s * _normal(rng, style.cell_radius, 0.17, 0.42)
    cx, cy = s / 2 + rng.normal(0.0, 0.07, 2) * s
    u, v = _frame(size, cx, cy, rng.uniform(0, 2 * np.pi), rng.uniform(1.0, 1.12))
    r, phi = np.hypot(u, v), np.arctan2(v, u)
    wobble = 1.0 + 0.03 * np.cos(3 * phi + rng.uniform(0, 2 * np.pi))
    cell = _soft(cell_r * wobble - r)

    # Nucleus sits eccentrically inside the cell, offset along the rotated x axis.
    nuc_r = cell_r * _normal(rng, style.nc_ratio, 0.55, 0.95)
    shift = (cell_r - nuc_r) * rng.uniform(0.2, 0.9)
    nu, nv = u - shift, v
    nr, nphi = np.hypot(nu, nv), np.arctan2(nv, nu)
    nucleus = _soft(_nucleus_radius(nphi, rng, style, nuc_r) - nr) * cell

    # Chromatin: smooth noise whose blob size sets coarse (clumped) vs fine texture.
    cells_across = _normal(rng, style.grain_cells, 2.5, 14.0) * s / (2 * nuc_r)
    texture = _smooth_noise(rng, size, cells_across) + 0.3 * _smooth_noise(rng, size, 2 * cells_across)
    chromatin = _normal(rng, style.darkness, 0.55, 1.5) * (1.0 + _normal(rng, style.grain, 0.0, 0.7) * texture)
    for _ in range(int(rng.poisson(style.nucleoli))):
        a, d = rng.uniform(0, 2 * np.pi), nuc_r * rng.uniform(0.0, 0.55)
        spot_r = nuc_r * rng.uniform(0.13, 0.22)
        spot = _soft(spot_r - np.hypot(nu - d * np.cos(a), nv - d * np.sin(a)))
        chromatin = chromatin * (1.0 - 0.55 * spot)
    chromatin = np.clip(chromatin, 0.15, None)

    baso = _normal(rng, style.basophilia, 0.0, 1.0)
    cyto_od = (1.0 - baso) * _CYTO_PALE_OD + baso * _CYTO_BASO_OD
    cyto_density = 1.0 + 0.15 * _smooth_noise(rng, size, s / 6)
    for _ in range(int(rng.poisson(style.vacuoles))):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(nuc_r, cell_r) * 0.9
        hole_r = cell_r * rng.uniform(0.05, 0.1)
        cyto_density = cyto_density * (1.0 - 0.8 * _soft(hole_r - np.hypot(u + d * np.cos(a), v - d * np.sin(a))))

    # The white cell lies on top of the red cells, hiding them.
    od *= (1.0 - 0.85 * cell)[..., None]
    od += ((cell - nucleus) * cyto_density)[..., None] * (cyto_od * stain)
    od += (nucleus * chromatin)[..., None] * (_NUCLEUS_OD * stain)

    # Plasma background with uneven illumination, then global brightness / colour cast.
    background = _BACKGROUND + rng.uniform(-0.03, 0.03, 3).astype(np.float32)
    light = 1.0 + 0.03 * _smooth_noise(rng, size, 3.0)
    image = background * light[..., None] * np.exp(-od)
    image *= rng.normal(1.0, 0.05) * rng.normal(1.0, 0.03, 3)

    # Focus blur, then sensor noise after it so noise stays sharp like a real camera's.
    blur = rng.uniform(0.2, 0.9) * s / 64
    pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), "RGB")
    pil = pil.filter(ImageFilter.GaussianBlur(blur))
    noisy = np.asarray(pil, np.float32) + rng.normal(0.0, rng.uniform(1.0, 6.0), (size, size, 3))
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), "RGB")


def _image_path(out: Path, ci: int, i: int, fmt: str) -> Path:
    cls = SYNTH_CLASSES[ci]
    return out / cls / f"{cls.lower()}_{i:05d}.{fmt}"


def _write_one(job: tuple[Path, int, int, int, int, str]) -> None:
    out, ci, i, size, seed, fmt = job
    # One generator per image, keyed by (seed, class, index): output does not depend on worker count.
    image = render_cell(SYNTH_CLASSES[ci], size, np.random.default_rng([seed, ci, i]))
    format_name, options = FORMATS[fmt]
    image.save(_image_path(out, ci, i, fmt), format=format_name, **options)


def _jobs(out: Path, per_class: int, size: int, seed: int, fmt: str) -> Iterator[tuple]:
    for ci in range(len(SYNTH_CLASSES)):
        for i in range(per_class):
            yield out, ci, i, size, seed, fmt


def synthesize(
    out: Path, per_class: int, size: int = 64, seed: int = 0, fmt: str = "jpg", workers: int = 1
) -> dict[str, int]:
    """Write `per_class` synthetic images per class under ``out/<Class>/``; return counts per class folder.

    Same (seed, per_class, size, fmt) gives byte-identical files whatever `workers` is. `out` may exist
    only if empty (else FileExistsError).
    """
    out = Path(out)
    if fmt not in FORMATS:
        raise SynthError(f"fmt must be one of {sorted(FORMATS)}, got {fmt!r}")
    if per_class < 0:
        raise SynthError(f"per_class must be >= 0, got {per_class}")
    if size < 16:
        raise SynthError(f"size must be >= 16 pixels, got {size}")
    if workers < 1:
        raise SynthError(f"workers must be >= 1, got {workers}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SynthOutputExistsError(f"output directory exists and is not empty: {out}")
    for cls in SYNTH_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)

    jobs = _jobs(out, per_class, size, seed, fmt)
    workers = min(workers, os.cpu_count() or 1, max(1, per_class * len(SYNTH_CLASSES)))
    if workers == 1:
        for job in jobs:
            _write_one(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=32):
                pass
    return {cls: per_class for cls in SYNTH_CLASSES}
