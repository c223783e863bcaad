"""Synthetic sparse data sets with known truth: ``python -m emcjax.simulate --out FILE.h5``.

Each frame is a draw of the count model ``--likelihood`` (Poisson by default) with mean

    lambda_t = pol_t * (B_d(shell_t) + phi_d * W(R_d q_t))

(METHOD.md §5.2): ``W`` is the true voxel model (a Gaussian profile around every reflection, scaled by
a Wilson-distributed or structure-factor intensity obeying the space group), ``R_d`` the frame's
orientation (a grid rotation of the 600-cell sampling, or a uniformly random one), ``phi_d`` a lognormal
scale with mean 1 and ``B_d`` a smooth radial background. The default mimics the reference experiment
scaled down (lysozyme-like P 43 21 2 cell, 1 Å, 4 Å, ~150 Bragg + ~30 background photons per frame: far
too few to index a single frame). ``--likelihood negbin --dispersion R`` draws over-dispersed counts
(variance mu + mu^2 / R, every pixel drawn through the likelihood's sampler); ``--likelihood poisson-bgscale
--background-scale C`` draws the background C times the one written to the file.

The settings are :class:`emcjax.simulation_config.SimulationConfig`; the true model, background profile and
frame kinds come from ``emcjax.simulated_truth``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

from emcjax import cli
from emcjax import data as data_io
from emcjax import model as model_lib
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.errors import ConfigError
from emcjax.likelihood import Likelihood
from emcjax.rotation_neighbours import nearest_rotations
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulated_truth import frame_kinds, radial_background, random_quaternions, true_model
from emcjax.simulation_config import SimulationConfig


_CHUNK_FRAMES = 4096  # frames whose in-peak entries are held at once
_SAMPLED_PIXELS = 1 << 20  # (frame, pixel) means drawn at once when every pixel goes through the sampler

def simulate(config: SimulationConfig) -> tuple[data_io.SparseFrames, dict]:
    """Draws the frames and their truth.

    Returns:
      ``(frames, truth)``: the sparse frames and a dict of truth arrays (``intensity`` (n_asu, n_voxels),
      ``hkl`` (n_asu, 3), ``phi`` (n_frames,), ``quaternion`` (n_frames, 4) true orientation (scalar first),
      ``rotation_index`` (n_frames,) its index in the 600-cell sampling, -1 for continuous orientations).
      With ``candidates`` the frames carry candidate lists of the ``candidates`` rotations of the
      ``candidate_sampling_n`` sampling nearest each frame's true orientation, nearest first.
      ``frame_kind`` (n_frames,) int8 (0 one crystal, 1 blank, 2 two crystals),
      ``second_quaternion`` (n_frames, 4) and ``second_phi`` (n_frames,) of the second crystal (zero elsewhere).
    """
    rng = np.random.default_rng(config.seed)
    crystal = Crystal(cell=config.cell, space_group=config.space_group)
    detector = make_detector(config.geometry)
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(
        crystal, d_min=config.geometry.resolution_max_A, d_max=1.0 / q_min, vn=config.vn, gw=config.gw
    )
    intensity = true_model(grid, config, rng)

    sampling = None if config.continuous else sample_600cell(config.rotation_n)
    if sampling is not None:
        rotation_index = rng.choice(sampling.n_rot, size=config.n_frames, p=np.exp(sampling.log_weights))
        quaternion = sampling.quaternions[rotation_index]
    else:
        rotation_index = np.full(config.n_frames, -1)
        quaternion = random_quaternions(rng, config.n_frames)
    kind, second_quaternion, second_phi = frame_kinds(config, crystal, sampling, quaternion)
    # One simulated crystal per frame, plus the second crystal of the frames of kind 2.
    multi = np.flatnonzero(kind == 2)
    crystal_frame = np.concatenate([np.arange(config.n_frames), multi])
    crystal_quaternion = np.concatenate([quaternion, second_quaternion[multi]])
    n_crystals = crystal_frame.shape[0]

    # Scale the model so that a frame at phi = 1 holds `bragg_photons` Bragg photons on average.
    # Frames are simulated in chunks so that the in-peak entries of one chunk bound the memory.
    pol = jnp.asarray(detector.polarization, jnp.float32)
    shell = jnp.zeros(detector.n_pix, jnp.int32)  # one segment per frame: the total over all shells
    chunks = [(a, min(a + _CHUNK_FRAMES, n_crystals)) for a in range(0, n_crystals, _CHUNK_FRAMES)]
    unit = jnp.asarray(intensity, jnp.float32)
    def entries_of(a: int, b: int) -> model_lib.Entries:
        return model_lib.build_entries_by_reflection(grid, detector, crystal_quaternion[a:b])

    signal = np.concatenate(
        [np.asarray(model_lib.expected_signal(unit, entries_of(a, b), pol, shell, 1))[:, 0] for a, b in chunks]
    )
    scale = config.bragg_photons / max(float(signal[: config.n_frames].mean()), 1e-30)
    intensity = intensity * scale

    phi = rng.lognormal(mean=-config.phi_sigma**2 / 2, sigma=config.phi_sigma, size=config.n_frames)
    phi = np.where(kind == 1, 0.0, phi)
    if config.multi_equal:
        second_phi = np.where(kind == 2, phi, 0.0)
    crystal_phi = np.concatenate([phi, second_phi[multi]])
    second_rng = np.random.default_rng([config.seed, 2])
    scaled = jnp.asarray(intensity, jnp.float32)
    likelihood = config.likelihood_config().build(config.n_frames)
    if multi.size and not likelihood.poisson_counts:
        raise ConfigError(f"multi_fraction > 0 needs a Poisson count model, got likelihood={config.likelihood!r}")
    if likelihood.poisson_counts:  # Poisson: Bragg photons at the in-peak entries, background photons apart
        ent_frame, ent_pixel, bragg = [], [], []
        for a, b in chunks:
            entries = entries_of(a, b)
            w = np.asarray(model_lib.tomogram(scaled, entries), np.float64)
            crystal_index = np.asarray(entries.rotation) + a
            pixel = np.asarray(entries.pixel)
            mean = crystal_phi[crystal_index] * detector.polarization[pixel] * w
            counts = np.zeros(mean.shape, np.int64)
            second = crystal_index >= config.n_frames  # own random stream: the other frames do not change
            counts[~second] = rng.poisson(mean[~second])
            counts[second] = second_rng.poisson(mean[second])
            hit = counts > 0
            ent_frame.append(crystal_frame[crystal_index[hit]])
            ent_pixel.append(pixel[hit])
            bragg.append(counts[hit])
        ent_frame, ent_pixel, bragg = (np.concatenate(x) for x in (ent_frame, ent_pixel, bragg))
        by_frame = np.argsort(ent_frame, kind="stable")  # second crystals come after all frames: regroup
        ent_frame, ent_pixel, bragg = ent_frame[by_frame], ent_pixel[by_frame], bragg[by_frame]

    n_shells = config.geometry.n_shells
    shell_q = (np.arange(n_shells) + 0.5) * detector.shell_width
    profile = radial_background(shell_q)
    per_pixel = detector.polarization * profile[detector.shell]
    level = config.background_photons / per_pixel.sum()
    frame_level = level * rng.uniform(0.8, 1.2, size=config.n_frames)
    background = (frame_level[:, None] * profile[None, :]).astype(np.float32)
    if likelihood.poisson_counts:
        # a per-frame factor on the background (background_mean is linear for the Poisson models)
        expected_bg = np.asarray(likelihood.background_mean(frame_level * per_pixel.sum(), np.arange(config.n_frames)))
        n_bg = rng.poisson(expected_bg)
    else:  # every pixel drawn by the likelihood: all photons come as (frame, pixel, count), none apart
        ent_frame, ent_pixel, bragg, expected_bg = sampled_photons(
            likelihood, jax.random.key(config.seed), chunks, entries_of, scaled, phi, detector.polarization,
            frame_level, per_pixel,
        )
        n_bg = np.zeros(config.n_frames, np.int64)
    cdf_bg = np.cumsum(per_pixel / per_pixel.sum())
    cdf_bg /= cdf_bg[-1]

    starts = np.searchsorted(ent_frame, np.arange(config.n_frames + 1))
    b_pix, b_cnt = ent_pixel, bragg
    pixels, counts, offsets = [], [], [0]
    for d in range(config.n_frames):
        # = rng.choice(n_pix, size, p=p_bg) (same draws) without recomputing the CDF for every frame
        background_pixels = np.searchsorted(cdf_bg, rng.random(n_bg[d]), side="right")
        pix = np.concatenate([b_pix[starts[d] : starts[d + 1]], background_pixels])
        cnt = np.concatenate([b_cnt[starts[d] : starts[d + 1]], np.ones(n_bg[d], np.int64)])
        raw = detector.pixel_id[pix]
        uniq, inverse = np.unique(raw, return_inverse=True)
        pixels.append(uniq)
        counts.append(np.bincount(inverse, weights=cnt).astype(np.int32))
        offsets.append(offsets[-1] + uniq.shape[0])
    candidate_offsets = candidate_rotations = None
    if config.candidates:
        nearest = nearest_rotations(sample_600cell(config.candidate_sampling_n), quaternion, config.candidates)
        candidate_offsets = np.arange(config.n_frames + 1, dtype=np.int64) * config.candidates
        candidate_rotations = nearest.ravel()
    frames = data_io.SparseFrames(
        frame_id=np.arange(config.n_frames, dtype=np.int64),
        photon_offsets=np.asarray(offsets, np.int64),
        photon_pixels=np.concatenate(pixels).astype(np.int64),
        photon_counts=np.concatenate(counts).astype(np.int32),
        dead_offsets=np.zeros(config.n_frames + 1, np.int64),
        dead_pixels=np.zeros(0, np.int64),
        background=background,
        candidate_offsets=candidate_offsets,
        candidate_rotations=candidate_rotations,
    )
    truth = {
        "intensity": intensity.astype(np.float32),
        "hkl": grid.asu.hkl.astype(np.int32),
        "phi": phi,
        "quaternion": quaternion,
        "rotation_index": np.asarray(rotation_index, np.int64),
        "expected_bragg_photons": np.bincount(
            crystal_frame, weights=crystal_phi * signal * scale, minlength=config.n_frames
        ),
        "expected_background_photons": expected_bg,
        "frame_kind": kind,
        "second_quaternion": second_quaternion,
        "second_phi": second_phi,
    }
    for name, value in dataclasses.asdict(likelihood).items():  # the count model's true parameters, if any
        truth[f"likelihood_{name}"] = np.asarray(value)
    return frames, truth


@jax.jit
def _draw_counts(likelihood: Likelihood, key: jax.Array, bragg: jax.Array, level: jax.Array, per_pixel: jax.Array,
                 frame: jax.Array):
    """(counts, expected background photons per frame) of the (n, n_pix) pixels of the frames ``frame`` (n,)."""
    mean_bg = likelihood.background_mean(level[:, None] * per_pixel[None, :], frame[:, None])
    return likelihood.sample(key, mean_bg + bragg, frame[:, None]), mean_bg.sum(axis=1)


def sampled_photons(
    likelihood: Likelihood, key: jax.Array, chunks: list[tuple[int, int]], entries_of, model: jax.Array,
    phi: np.ndarray, polarization: np.ndarray, level: np.ndarray, per_pixel: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of every valid pixel of every frame drawn with ``likelihood.sample`` (dense, in pieces).

    Args:
      likelihood: the count model.
      key: JAX random key of the draws.
      chunks: ``(a, b)`` frame ranges whose in-peak entries are built at once.
      entries_of: ``entries_of(a, b)`` -> in-peak entries of frames a..b-1 (entry rotation = frame - a).
      model: (n_asu, n_voxels) float32 true model scaled to photons.
      phi: (n_frames,) scale factors.
      polarization: (n_pix,) pol x solid angle of the valid pixels.
      level, per_pixel: (n_frames,) and (n_pix,): the data set's background photons pol * B at pixel t of
        frame d are ``level[d] * per_pixel[t]``.

    Returns:
      ``(frame, pixel, count, expected_background)``: the nonzero counts sorted by frame (pixel = valid-pixel
      index) and the expected background photons per frame (after ``likelihood.background_mean``).
    """
    n_frames, n_pix = level.shape[0], per_pixel.shape[0]
    size = max(1, min(n_frames, _SAMPLED_PIXELS // n_pix))  # frames per draw (the last piece is padded)
    out_frame, out_pixel, out_count, expected = [], [], [], []
    for a, b in chunks:
        entries = entries_of(a, b)
        w = np.asarray(model_lib.tomogram(model, entries), np.float64)
        frame = np.asarray(entries.rotation) + a
        order = np.argsort(frame, kind="stable")
        frame, pixel, w = frame[order], np.asarray(entries.pixel)[order], w[order]
        for c in range(a, b, size):
            d = min(c + size, b)
            lo, hi = np.searchsorted(frame, [c, d])
            bragg = np.zeros((size, n_pix))
            f, t = frame[lo:hi], pixel[lo:hi]
            np.add.at(bragg, (f - c, t), phi[f] * polarization[t] * w[lo:hi])
            rows = np.minimum(np.arange(c, c + size), n_frames - 1).astype(np.int32)
            counts, mean_bg = _draw_counts(likelihood, jax.random.fold_in(key, c), bragg, level[rows], per_pixel, rows)
            counts = np.asarray(counts)[: d - c]
            hit_frame, hit_pixel = np.nonzero(counts)
            out_frame.append(hit_frame + c)
            out_pixel.append(hit_pixel)
            out_count.append(counts[hit_frame, hit_pixel])
            expected.append(np.asarray(mean_bg, np.float64)[: d - c])
    return tuple(np.concatenate(x) for x in (out_frame, out_pixel, out_count, expected))


def check_reach(geometry: DetectorGeometry) -> None:
    """Raises ConfigError if the detector's pixels do not reach ``geometry.resolution_max_A`` (the data set
    would claim a resolution it holds no pixel at)."""
    every_pixel = dataclasses.replace(geometry, resolution_max_A=1e-6)  # no pixel dropped at high q
    outermost_A = 1.0 / float(make_detector(every_pixel).q_norm.max())
    if outermost_A > geometry.resolution_max_A * (1 + 1e-6):
        raise ConfigError(
            f"geometry.resolution_max_A = {geometry.resolution_max_A} Å is beyond the detector: its outermost "
            f"pixel is at {outermost_A:.3f} Å; give geometry.resolution_max_A >= {outermost_A:.3f} (or a larger "
            "detector, a shorter distance or a shorter wavelength)"
        )


def write(config: SimulationConfig) -> pathlib.Path:
    """Simulates and writes ``config.out``; returns the path."""
    if config.out is None:
        raise ConfigError("out: give the output file, e.g. --out demo.h5")
    if config.out.exists() and not config.overwrite:  # before the work; write_dataset checks again
        raise ConfigError(f"out: {config.out} exists; add --overwrite to replace it")
    check_reach(config.geometry)
    frames, truth = simulate(config)
    write_frames(config.out, frames, truth, config)
    return config.out


def write_frames(path: str | os.PathLike, frames, truth: dict, config: SimulationConfig) -> pathlib.Path:
    """Writes simulated ``frames`` and their ``truth`` (from :func:`simulate`, possibly altered, e.g. by a
    test) as a sparse data set at ``path``, with ``config``'s geometry and crystal; returns the path."""
    data_io.write_dataset(
        path,
        frames,
        geometry=dataclasses.asdict(config.geometry),
        crystal={"cell": np.asarray(config.cell), "space_group": config.space_group, "vn": config.vn, "gw": config.gw},
        truth=truth,
        candidate_sampling_n=config.candidate_sampling_n if config.candidates else None,
        overwrite=config.overwrite,
    )
    return pathlib.Path(path)


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.simulate``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(_main, argv, "emcjax.simulate")


def _main(argv: list[str]) -> None:
    config = tyro.cli(SimulationConfig, args=argv, description=__doc__.split("\n\n")[0])
    start = time.perf_counter()
    path = write(config)
    with data_io.SparseDataset(path) as ds:
        photons = ds.read_block(0, ds.n_frames).photons_per_frame()
    print(
        f"wrote {path}: {config.n_frames} frames, {photons.mean():.1f} photons per frame "
        f"(min {photons.min()}, max {photons.max()}) in {time.perf_counter() - start:.1f} s"
        + (
            f"; {round(config.blank_fraction * config.n_frames)} blank, "
            f"{round(config.multi_fraction * config.n_frames)} with two crystals"
            if config.blank_fraction or config.multi_fraction
            else ""
        )
    )


if __name__ == "__main__":
    main()
