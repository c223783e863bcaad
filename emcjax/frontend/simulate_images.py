"""Dense detector images of a simulated data set (``python -m emcjax.simulate_images --out DIR``).

The frames of ``emcjax.simulate`` (Bragg photons of continuous or grid orientations, optionally its own
sparse background) are rendered as count images with what real detectors add:

* a dense radial background: Poisson counts with mean ``level_d * pattern_t``, pattern = pol_t x the
  simulator's radial profile (flat + water ring), level_d = ``background_per_pixel`` x U(0.8, 1.2);
* a powder ring at ``ring_q`` (Gaussian in |q| of width ``ring_width``, ``ring_photons`` x U(0.5, 1.5) per frame);
* hot pixels (``hot_value`` + Poisson counts in every frame);
* module gaps (value -1: rows/columns every ``module_size`` pixels, ``gap_size`` wide);
* a beam-stop holder shadow (no counts in a strip ``shadow_width`` pixels wide from the beam centre to the
  row-0 edge), also written as a user mask file ``shadow_mask.npy``.

Outputs in ``--out``: ``images/frame_NNNNN.cbf`` (fabio, byte offset) or ``images.h5`` (bitshuffle + LZ4),
``truth.h5`` (the simulator's sparse data set with its truth plus ``background_level``,
``background_pattern``, ``ring_pattern``, ``lost`` = gap/shadow/hot pixels), ``shadow_mask.npy``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import numpy as np

from emcjax import data as data_io
from emcjax import simulate, simulated_truth
from emcjax.errors import ConfigError, EmcjaxError
from emcjax.frontend import images as images_lib
from emcjax.frontend.background import full_detector


@dataclasses.dataclass(frozen=True)
class ImageSimulationConfig:
    """Simulated detector images."""

    out: pathlib.Path | None = None
    """Output directory (required)."""
    format: Literal["cbf", "h5"] = "cbf"
    """CBF files (one per frame) or one bitshuffle/LZ4-compressed HDF5 stack."""
    simulation: simulate.SimulationConfig = simulate.SimulationConfig(rotation_n=0, background_photons=0.0)
    """The frames (emcjax.simulate); its own sparse background is kept in the photon lists."""
    background_per_pixel: float = 0.05
    """Mean dense background photons per pixel at pol = 1 (before the radial profile)."""
    ring_q: float = 0.2
    """|q| of the powder ring, 1/Å (0: no ring)."""
    ring_width: float = 0.004
    """Gaussian width of the ring in |q|, 1/Å."""
    ring_photons: float = 2000.0
    """Mean photons of the ring per frame (each frame draws U(0.5, 1.5) times this)."""
    hot_pixels: int = 5
    """Number of hot pixels."""
    hot_value: int = 2000
    """Mean counts of a hot pixel."""
    module_size: int = 64
    """Pixels per detector module along rows and columns (0: no gaps)."""
    gap_size: int = 2
    """Width of the gaps between modules, pixels."""
    shadow_width: int = 3
    """Width of the beam-stop holder shadow, pixels (0: none)."""
    saturation: int = 1_000_000
    """Saturation level written into the headers (counts)."""
    overwrite: bool = False
    """Replace existing outputs."""


def static_layout(config: ImageSimulationConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gaps, shadow, hot_ids): (num_rows, num_cols) bool gap and shadow maps and the hot pixel ids."""
    g = config.simulation.geometry
    rows, cols = np.arange(g.num_rows)[:, None], np.arange(g.num_cols)[None, :]
    gaps = np.zeros((g.num_rows, g.num_cols), bool)
    if config.module_size > 0:
        period = config.module_size + config.gap_size
        gaps |= (rows % period >= config.module_size) | (cols % period >= config.module_size)
    shadow = np.zeros_like(gaps)
    if config.shadow_width > 0:
        r0, c0 = g.beam_center_px
        shadow = (np.abs(cols - c0) <= config.shadow_width / 2) & (rows <= r0)
    rng = np.random.default_rng(config.simulation.seed + 1)
    free = np.flatnonzero(~(gaps | shadow).ravel())
    hot = np.sort(rng.choice(free, size=config.hot_pixels, replace=False))
    return gaps, shadow, hot


def render(config: ImageSimulationConfig):
    """Simulates the frames; returns ``(frames, truth, images)`` with ``images`` a generator of
    (num_rows, num_cols) int32 images (drawn lazily, one at a time) and ``truth`` extended by the
    dense-image truth."""
    sim = config.simulation
    g = sim.geometry
    frames, truth = simulate.simulate(sim)
    full = full_detector(g)
    q_norm = np.empty(g.num_pixels)
    pol = np.empty(g.num_pixels)
    q_norm[full.pixel_id], pol[full.pixel_id] = full.q_norm, full.polarization
    pattern = pol * simulated_truth.radial_background(q_norm)
    ring = np.zeros(g.num_pixels)
    if config.ring_q > 0:
        ring = pol * np.exp(-((q_norm - config.ring_q) ** 2) / (2 * config.ring_width**2))
        ring *= config.ring_photons / ring.sum()
    gaps, shadow, hot = static_layout(config)
    rng = np.random.default_rng(sim.seed + 2)
    level = config.background_per_pixel * rng.uniform(0.8, 1.2, size=frames.n_frames)
    ring_level = rng.uniform(0.5, 1.5, size=frames.n_frames)
    lost = (gaps | shadow).ravel().copy()
    lost[hot] = True
    truth = dict(truth, background_level=level, ring_level=ring_level, background_pattern=pattern.reshape(g.num_rows, g.num_cols),
                 ring_pattern=ring.reshape(g.num_rows, g.num_cols), lost=lost.reshape(g.num_rows, g.num_cols))

    def images():
        for d in range(frames.n_frames):
            a, b = frames.photon_offsets[d], frames.photon_offsets[d + 1]
            image = rng.poisson(level[d] * pattern + ring_level[d] * ring)
            image[frames.photon_pixels[a:b]] += frames.photon_counts[a:b]
            image[hot] = rng.poisson(config.hot_value, size=hot.size)
            image[shadow.ravel()] = 0
            image[gaps.ravel()] = -1
            yield image.reshape(g.num_rows, g.num_cols).astype(np.int32)

    return frames, truth, images()


def write(config: ImageSimulationConfig) -> pathlib.Path:
    """Writes the images, truth.h5 and shadow_mask.npy into ``config.out``; returns the directory."""
    if config.out is None:
        raise ConfigError("out: give the output directory, e.g. --out sim_images")
    out = pathlib.Path(config.out)
    if (out / "truth.h5").exists() and not config.overwrite:
        raise ConfigError(f"{out}: holds a simulation already (truth.h5); pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    sim = config.simulation
    g = sim.geometry
    frames, truth, images = render(config)
    _, shadow, _ = static_layout(config)
    np.save(out / "shadow_mask.npy", shadow)
    if config.format == "cbf":
        (out / "images").mkdir(exist_ok=True)
        for old in (out / "images").glob("frame_*.cbf"):  # a previous simulation's frames (overwrite)
            old.unlink()
        header = images_lib.cbf_header_text(g, config.saturation)
        for d, image in enumerate(images):
            images_lib.write_cbf(out / "images" / f"frame_{d:05d}.cbf", image, header)
    else:
        images_lib.write_h5_stack(out / "images.h5", images, frames.n_frames, (g.num_rows, g.num_cols), g,
                                  config.saturation)
    data_io.write_dataset(
        out / "truth.h5", frames, geometry=dataclasses.asdict(g),
        crystal={"cell": np.asarray(sim.cell), "space_group": sim.space_group, "vn": sim.vn, "gw": sim.gw},
        truth=truth, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(ImageSimulationConfig, args=argv, prog="python -m emcjax.simulate_images",
                      description=__doc__.split("\n\n")[0])
    try:
        out = write(config)
    except EmcjaxError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {config.simulation.n_frames} {config.format} images, truth.h5 and shadow_mask.npy to {out}")
