"""Data reduction: detector images -> the sparse data set (``python -m emcjax.reduce``).

Per frame (streamed, one image in memory; blocks of frames are appended and committed to the output):

1. counts on the valid pixels (static mask, beam stop and resolution limit applied); pixels negative or
   saturated in this frame only are dead pixels of the frame;
2. radial background per unit pol with Poisson outlier rejection, ring shells excluded
   (emcjax.frontend.background);
3. spots = patches of outlier pixels (emcjax.frontend.spots); diffuse patches become dead pixels;
4. the photon list: every valid, live pixel with counts > 0 outside excluded shells;
5. initial phi (METHOD.md §2.8): mean photons of the frame's spots, normalised to mean 1 over the data set.

The static mask (emcjax.frontend.mask) is found first from the first ``mask.frames`` frames.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import sys
import time
from typing import Literal

import numpy as np

from emcjax import toml_config
from emcjax.data import SparseFrames
from emcjax.detector import DetectorGeometry
from emcjax.errors import ConfigError, EmcjaxError
from emcjax.frontend import images as images_lib
from emcjax.frontend.background import RadialTables, frame_background, radial_tables, ring_shells
from emcjax.frontend.mask import MaskConfig, static_mask
from emcjax.frontend.spots import find_spots
from emcjax.frontend.writer import SparseWriter


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Data reduction of detector images (CBF files or HDF5 stacks) into a sparse data set."""

    images: tuple[str, ...] = ()
    """CBF files, glob patterns (quoted) or HDF5 stack files, in frame order."""
    out: pathlib.Path = pathlib.Path("reduced.h5")
    """Output sparse data set (docs/FORMATS.md)."""
    h5_path: str = images_lib.H5_DATA_PATH
    """Dataset of the image stack inside HDF5 files."""
    geometry: DetectorGeometry = DetectorGeometry()
    """Detector geometry (num_rows/num_cols follow the images when header='use')."""
    poni: pathlib.Path | None = None
    """pyFAI PONI file: distance, beam centre, detector rotations (as a tilted beam), pixel size and wavelength
    from it (overrides --geometry.*)."""
    header: Literal["use", "check", "ignore"] = "use"
    """Image header values: 'use' them where present (and check every CBF against the first), 'check' them
    against the configured geometry, or 'ignore' them."""
    cell: tuple[float, float, float, float, float, float] = (79.1, 79.1, 37.9, 90.0, 90.0, 90.0)
    """Unit cell a, b, c (Å), alpha, beta, gamma (degrees)."""
    space_group: str = "P 43 21 2"
    """Space group symbol."""
    mask: MaskConfig = MaskConfig()
    """Static mask rules."""
    background_iterations: int = 5
    """Outlier rejection passes of the radial background."""
    quantile: float = 0.99999
    """Poisson CDF level above which a pixel is an outlier."""
    clip_quantile: float | None = 0.97
    """Poisson CDF level above which a pixel is left out of the background estimate (truncated-Poisson
    rate of the rest; keeps weak Bragg spots out of the background); None: the plain mean (the reference)."""
    neighbour_quantile: float | None = None
    """Poisson CDF level (e.g. 0.9) above which the photons of a pixel's 8 neighbours leave it out of the
    background estimate (keeps the weak spots spread over adjacent pixels out; unbiased for Poisson
    background); None: no neighbour test (default: with 0.9 the tutorial's cc_true fell, docs/METHOD-NOTES.md)."""
    ring_excess: float = 0.05
    """Relative excess of a background maximum that makes it a ring."""
    ring_sigma: float = 5.0
    """Required significance of a ring's excess photons (Poisson standard deviations)."""
    ring_photons: float = 100.0
    """Required excess photons of a ring's peak shell (Bragg photons of sparse frames make smaller bumps)."""
    min_spot_pixels: int = 2
    """Smallest patch of outlier pixels that is a spot."""
    max_spot_pixels: int = 10
    """Largest spot; larger patches are diffuse and their pixels dead in that frame."""
    max_spots_per_shell: int = 5
    """A shell with more spot centroids is a powder ring."""
    n_frames: int = 0
    """Reduce only the first this many frames (0: all)."""
    block_frames: int = 256
    """Frames per committed block of the output (memory is bounded by one block)."""
    truth: pathlib.Path | None = None
    """Copy the /truth group of this sparse data set (e.g. emcjax.simulate_images' truth.h5)."""
    resume: bool = False
    """Continue an interrupted reduction of the same settings (its .OUT.partial file)."""
    overwrite: bool = False
    """Replace an existing output file."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override)."""

    def __post_init__(self) -> None:
        for name in ("background_iterations", "min_spot_pixels", "block_frames", "max_spots_per_shell"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_spot_pixels < self.min_spot_pixels:
            raise ConfigError(f"max_spot_pixels = {self.max_spot_pixels} must be >= min_spot_pixels = "
                              f"{self.min_spot_pixels}")
        if not 0.5 < self.quantile < 1:
            raise ConfigError(f"quantile must be in (0.5, 1), got {self.quantile}")
        if self.clip_quantile is not None and not 0.5 < self.clip_quantile <= self.quantile:
            raise ConfigError(f"clip_quantile must be in (0.5, quantile = {self.quantile}], got {self.clip_quantile}")
        if self.n_frames < 0:
            raise ConfigError(f"n_frames must be >= 0 (0: all), got {self.n_frames}")


@dataclasses.dataclass(frozen=True)
class ReducedFrame:
    """One reduced frame: raw pixel ids (ascending) and counts of its photons, its dead pixels, its
    background (n_shells,) float32 with -1 for excluded shells, and its spots."""

    pixels: np.ndarray
    counts: np.ndarray
    dead: np.ndarray
    background: np.ndarray
    spot_q: np.ndarray
    spot_photons: np.ndarray
    spot_size: np.ndarray


def reduce_frame(image: np.ndarray, tables: RadialTables, config: ReduceConfig, saturation: float | None) -> ReducedFrame:
    """Reduces one (num_rows, num_cols) image (see the module docstring)."""
    det = tables.detector
    flat = np.asarray(image).ravel()
    k = flat[det.pixel_id].astype(np.int64)
    dead = k < 0
    if saturation is not None:
        dead |= k >= saturation
    k = np.where(dead, 0, k)
    background, outlier = frame_background(k, dead, tables, config.background_iterations, config.quantile,
                                           config.clip_quantile, config.neighbour_quantile)
    spots = find_spots(image, det.pixel_id[outlier], tables, config.min_spot_pixels, config.max_spot_pixels,
                       config.max_spots_per_shell)
    excluded = ring_shells(background, tables.shell_pol, config.ring_excess, config.ring_sigma, config.ring_photons)
    excluded |= spots.ring_shells
    dead[np.isin(det.pixel_id, spots.diffuse_pixels, assume_unique=True)] = True
    live = ~excluded[det.shell]
    take = live & ~dead & (k > 0)
    order = np.argsort(det.pixel_id[take])
    spot_shell = np.minimum((np.linalg.norm(spots.q, axis=1) / det.shell_width).astype(np.int64),
                            det.geometry.n_shells - 1)
    keep = ~excluded[spot_shell]
    return ReducedFrame(
        pixels=det.pixel_id[take][order], counts=k[take][order].astype(np.int32),
        dead=np.sort(det.pixel_id[dead & live]),
        background=np.where(excluded, -1.0, background).astype(np.float32),
        spot_q=spots.q[keep], spot_photons=spots.photons[keep], spot_size=spots.size[keep])


def _block(indices: list[int], reduced: list[ReducedFrame]) -> tuple[SparseFrames, dict]:
    def offsets(arrays):
        return np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64)

    frames = SparseFrames(
        frame_id=np.asarray(indices, np.int64),
        photon_offsets=offsets([r.pixels for r in reduced]),
        photon_pixels=np.concatenate([r.pixels for r in reduced]),
        photon_counts=np.concatenate([r.counts for r in reduced]),
        dead_offsets=offsets([r.dead for r in reduced]),
        dead_pixels=np.concatenate([r.dead for r in reduced]),
        background=np.stack([r.background for r in reduced]))
    phi = [float(r.spot_photons.mean()) if r.spot_photons.size else 0.0 for r in reduced]
    spots = {"offsets": offsets([r.spot_q for r in reduced]), "q": np.concatenate([r.spot_q for r in reduced]),
             "photons": np.concatenate([r.spot_photons for r in reduced]),
             "size": np.concatenate([r.spot_size for r in reduced]), "initial_phi": np.asarray(phi)}
    return frames, spots


def resolve_geometry(config: ReduceConfig, stack: images_lib.ImageStack) -> tuple[DetectorGeometry, images_lib.ImageHeader]:
    """The geometry of the run: config (or PONI), then header values per ``config.header``."""
    geometry = config.geometry
    if config.poni is not None:
        geometry = images_lib.geometry_from_poni(config.poni, geometry)
    header = stack.header()
    if config.header == "use":
        geometry = images_lib.geometry_with_header(geometry, header, stack.shape)
    elif config.header == "check":
        images_lib.check_header(geometry, header, stack.files[0])
    if (geometry.num_rows, geometry.num_cols) != tuple(stack.shape):
        raise ConfigError(f"{stack.files[0]}: images of shape {tuple(stack.shape)}, expected (num_rows, num_cols) = "
                          f"({geometry.num_rows}, {geometry.num_cols}) from the geometry")
    return geometry, header


def run(config: ReduceConfig, log=print) -> pathlib.Path:
    """Reduces ``config.images`` into ``config.out``; returns the output path."""
    from tqdm import tqdm

    stack = images_lib.ImageStack(config.images, config.h5_path)
    geometry, header = resolve_geometry(config, stack)
    saturation = config.mask.saturation if config.mask.saturation is not None else header.saturation
    n_total = stack.n_frames if config.n_frames == 0 else min(config.n_frames, stack.n_frames)
    n_sample = min(config.mask.frames, n_total)
    mask, masked = static_mask((im for _, im in stack.frames(0, n_sample)), geometry, config.mask, saturation)
    log(f"static mask: {int(mask.sum())} pixels ({', '.join(f'{k} {v}' for k, v in masked.items())})")
    tables = radial_tables(geometry, mask)
    settings = toml_config.config_to_dict(config)
    for key in ("resume", "overwrite", "out", "config"):
        settings.pop(key, None)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    writer = SparseWriter(config.out, dataclasses.asdict(geometry),
                          {"cell": config.cell, "space_group": config.space_group}, mask, geometry.n_shells,
                          spots=True, fingerprint=fingerprint, resume=config.resume, overwrite=config.overwrite)
    start = writer.frames_done
    if start:
        log(f"resuming after {start} frames already reduced")
    check = geometry if (stack.kind == "cbf" and config.header != "ignore") else None
    t0 = time.perf_counter()
    indices: list[int] = []
    reduced: list[ReducedFrame] = []
    try:
        with tqdm(total=n_total, initial=start, unit="frame", desc="reduce", disable=None, file=sys.stderr) as bar:
            for index, image in stack.frames(start, n_total, check=check):
                indices.append(index)
                reduced.append(reduce_frame(image, tables, config, saturation))
                if len(reduced) == config.block_frames or index == n_total - 1:
                    writer.append(*_block(indices, reduced))
                    bar.update(len(reduced))
                    indices, reduced = [], []
        path = writer.finish(truth_from=config.truth)
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    log(f"wrote {path}: {n_total} frames ({(n_total - start) / max(seconds, 1e-9):.0f} frames/s)")
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.reduce [--config run.toml] [flags]``: errors become one line and a non-zero exit."""
    try:
        config = toml_config.parse_stage_args(ReduceConfig, argv, "python -m emcjax.reduce", __doc__.split("\n\n")[0])
        if not config.images:
            raise ConfigError("images: give the detector images, e.g. --images 'run1/*.cbf' or --images run1.h5")
        run(config)
    except EmcjaxError as err:
        sys.exit(f"error: {err}")
