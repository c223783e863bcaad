"""The static detector mask (True = pixel never used), from a few frames and a user mask file.

A pixel is masked when, over the ``n`` sampled frames:

* its value is negative in every sampled frame (module gaps; the reference uses one frame's value < 0),
* it is saturated (>= the saturation level) or an outlier of its frame's radial background
  (emcjax.frontend.background) in at least ``hot_fraction`` of them (hot pixels; Bragg spots of random
  orientations never hit one pixel that often),
* it received no photon at all although its radial background predicts at least ``cold_expected``
  photons over the sample (beam-stop and holder shadows: P(0) = exp(-cold_expected)),
* or the user mask file marks it (any non-zero value; ``.npy`` or any image format fabio reads).

Pixels that are negative or saturated in only some frames are dead pixels of those frames (reduce).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable

import numpy as np

from emcjax.detector import DetectorGeometry
from emcjax.errors import DataError
from emcjax.frontend.background import frame_background, radial_tables


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How the static mask is found."""

    file: pathlib.Path | None = None
    """User mask (.npy or an image fabio reads), shape (num_rows, num_cols), non-zero = masked."""
    frames: int = 50
    """Frames sampled (the first ones) for the hot/cold/gap statistics."""
    hot_fraction: float = 0.5
    """A pixel that is an outlier or saturated in at least this fraction of the sampled frames is hot."""
    cold_expected: float = 10.0
    """A pixel without any photon in the sample although its background predicts at least this many
    photons (summed over the sampled frames) is shadowed."""
    saturation: float | None = None
    """Counts at or above which a pixel is saturated (default: the image header's value, else none)."""


def read_mask_file(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
    """(num_rows, num_cols) bool mask from ``path`` (non-zero = masked)."""
    if not path.is_file():
        raise DataError(f"{path}: no such mask file")
    try:
        if path.suffix == ".npy":
            data = np.load(path)
        else:
            import fabio

            data = fabio.open(str(path)).data
    except Exception as err:
        raise DataError(f"{path}: not a readable mask (.npy or an image fabio reads): {err}") from err
    if data.shape != tuple(shape):
        raise DataError(f"{path}: mask of shape {data.shape}, expected {tuple(shape)} (num_rows, num_cols)")
    return np.asarray(data) != 0


def static_mask(images: Iterable[np.ndarray], geometry: DetectorGeometry, config: MaskConfig,
                saturation: float | None) -> tuple[np.ndarray, dict[str, int]]:
    """The static mask and how many pixels each rule masked.

    Args:
      images: the sampled frames, each (num_rows, num_cols).
      geometry: the detector (resolution limits and beam stop as configured).
      config: the rules' settings.
      saturation: counts at or above which a pixel is saturated (None: no level).

    Returns:
      ``(mask, counts)``: (num_rows, num_cols) bool, and the pixels masked by ``file``, ``gaps``, ``hot``,
      ``cold``.
    """
    shape = (geometry.num_rows, geometry.num_cols)
    user = read_mask_file(config.file, shape) if config.file is not None else np.zeros(shape, bool)
    tables = radial_tables(geometry, user)
    det = tables.detector
    n_pix_raw = geometry.num_pixels
    negative = np.zeros(n_pix_raw, np.int64)
    flagged = np.zeros(det.n_pix, np.int64)
    photons = np.zeros(det.n_pix)
    expected = np.zeros(det.n_pix)
    n = 0
    for image in images:
        flat = np.asarray(image).ravel()
        negative += flat < 0
        k = flat[det.pixel_id].astype(np.float64)
        bad = k < 0
        if saturation is not None:
            bad |= k >= saturation
        background, outlier = frame_background(np.where(bad, 0, k), bad, tables)
        flagged += outlier | (k >= saturation if saturation is not None else False)
        photons += np.where(bad, 0, k)
        expected += background[det.shell] * det.polarization
        n += 1
    if n == 0:
        raise DataError("mask: no frame to sample; expected at least one image")
    gaps = negative == n
    hot = np.zeros(n_pix_raw, bool)
    hot[det.pixel_id] = flagged >= config.hot_fraction * n
    cold = np.zeros(n_pix_raw, bool)
    cold[det.pixel_id] = (photons == 0) & (expected >= config.cold_expected)
    mask = user.ravel() | gaps | hot | cold
    counts = {"file": int(user.sum()), "gaps": int(gaps.sum()), "hot": int(hot.sum()), "cold": int(cold.sum())}
    return mask.reshape(shape), counts
