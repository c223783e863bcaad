"""Continuous orientation refinement in the EMC iteration (planning, host side).

With ``EMCConfig.refine_orientations``, from iteration ``refine_start`` on, every iteration

1. takes each frame's ``refine_top_k`` most probable rotations of the previous iteration's last E-step
   (grid rotations, or rotations refined before);
2. refines each by gradient ascent of the frame's log-likelihood under the current model
   (:mod:`emcjax.core.refine`, vmapped over frames, in chunks of frames sharded over the device mesh);
3. runs the EMC iteration (:func:`emcjax.emc.iterate`) in candidate-list mode with every frame's candidates
   = its own candidate list of the data set (if any) + the start rotations + the refined ones: the union
   sampling is the base sampling followed by the off-grid rotations, whose in-peak entries the candidate
   machinery builds on the device like any other rotation's.

The recorded ``best_rotation`` and kept rotations stay indices into the base sampling (the nearest base
rotation, so that later stages read them as before); the refined orientations themselves are returned as
``best_quaternion`` and scored by ``orientation_error_median_deg``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from emcjax import parallel
from emcjax.blocks import Block, Plan, build_block
from emcjax.core import refine as refine_core
from emcjax.data import bucket_length
from emcjax.join import BACKGROUND_FLOOR, pixel_records
from emcjax.rotation_neighbours import nearest_rotations
from emcjax.sampling_600cell import RotationSampling

FRAMES_PER_CHUNK = 256  # frames refined per device call (times the mesh size)


def signal_geometry(detector, grid, max_angle: float) -> refine_core.SignalGeometry:
    """The device arrays of the expected-signal approximation (:class:`emcjax.core.refine.SignalGeometry`)."""
    g = detector.geometry
    b = np.asarray(g.beam_vector_px, np.float64)
    rows, cols = np.divmod(np.asarray(detector.pixel_id, np.int64), g.num_cols)
    s = np.stack([b[0] + rows - g.beam_center_px[0], b[1] + cols - g.beam_center_px[1],
                  np.full(rows.shape, b[2])], axis=1)
    cos_phi = np.abs(b[2]) / np.linalg.norm(s, axis=1)
    length = abs(b[2])
    area = cos_phi**3 / (length**2 * g.wavelength_A**2)  # Ewald-sphere area of the pixel (1/Å²)
    weight = np.zeros(g.num_rows * g.num_cols, np.float32)
    weight[detector.pixel_id] = detector.polarization / area
    shell = np.zeros(g.num_rows * g.num_cols, np.int32)
    shell[detector.pixel_id] = detector.shell
    basis = grid.crystal.reciprocal_basis
    step = basis / np.asarray(grid.divisions, np.float64)[None, :]  # columns: one grid step along each axis
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return refine_core.SignalGeometry(
        centres=f32(grid.hkl @ basis.T),
        voxel_offset=f32(grid.voxel_q()),
        stencil_var=f32(step @ step.T / 6.0),
        cell_volume=f32(abs(np.linalg.det(step))),
        k_beam=f32(b / np.linalg.norm(b) / g.wavelength_A),
        beam_px=f32(b),
        centre_px=f32(g.beam_center_px),
        shape=jnp.asarray([g.num_rows, g.num_cols], jnp.int32),
        pixel_weight=jnp.asarray(weight),
        pixel_shell=jnp.asarray(shell),
        reach=f32(grid.radius + np.linalg.norm(grid.hkl @ basis.T, axis=1) * max_angle),
    )


def reflection_budget(geometry: refine_core.SignalGeometry, samples: int = 256, seed: int = 0) -> int:
    """A bucketed bound on the reflections within reach per start rotation: 1.25 x the most over random
    rotations (a start rotation with more makes :func:`refine` raise, and the caller retries larger)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(samples, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    count = jax.jit(jax.vmap(lambda x: refine_core.near_reflections(None, None, x, None, geometry, 0)[1]))
    return bucket_length(int(1.25 * int(np.max(np.asarray(count(jnp.asarray(q, jnp.float32)))))) + 1)


def frame_photons(plan: Plan, start: int, stop: int, length: int | None = None) -> refine_core.FramePhotons:
    """The photons of frames [start, stop) (numpy, padded per frame to ``length`` or their bucketed maximum)."""
    frames = plan.source.read(start, stop)
    background = plan.background[start : start + frames.n_frames]
    rec = pixel_records(frames, plan.detector, background)
    photon = rec.count > 0
    frame, pixel, count = rec.frame[photon], rec.pixel[photon], rec.count[photon]
    bg = rec.background[photon]
    per_frame = np.bincount(frame, minlength=stop - start)
    length = bucket_length(max(int(per_frame.max(initial=0)), 1)) if length is None else length
    slot = np.arange(frame.shape[0]) - np.repeat(np.cumsum(per_frame) - per_frame, per_frame)
    keep = slot < length
    frame, slot, pixel, count, bg = frame[keep], slot[keep], pixel[keep], count[keep], bg[keep]
    pol = plan.detector.polarization[pixel]
    out = {
        "q_lab": np.zeros((stop - start, length, 3), np.float32),
        "count": np.zeros((stop - start, length), np.float32),
        "polarization": np.zeros((stop - start, length), np.float32),
        "background": np.ones((stop - start, length), np.float32),
    }
    out["q_lab"][frame, slot] = plan.detector.q[pixel]
    out["count"][frame, slot] = count
    out["polarization"][frame, slot] = pol
    out["background"][frame, slot] = pol * np.maximum(bg, BACKGROUND_FLOOR)
    return refine_core.FramePhotons(**out)


def start_rotations(kept_frame, kept_rotation, kept_prob, best_rotation, n_frames: int, k: int) -> np.ndarray:
    """(n_frames, k) int64 each frame's k most probable kept rotations (sampling indices), best first; frames
    with fewer repeat their best one."""
    order = np.lexsort((-np.asarray(kept_prob), np.asarray(kept_frame)))
    frame, rotation = np.asarray(kept_frame)[order], np.asarray(kept_rotation)[order]
    counts = np.bincount(frame, minlength=n_frames)
    rank = np.arange(frame.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.repeat(np.asarray(best_rotation, np.int64)[:, None], k, axis=1)
    keep = rank < k
    out[frame[keep], rank[keep]] = rotation[keep]
    return out


def refine(problem, state, start_quaternions: np.ndarray, settings: refine_core.RefineSettings,
           geometry: refine_core.SignalGeometry, photons: list) -> tuple[np.ndarray, np.ndarray]:
    """Refines (n_frames, k, 4) start quaternions in chunks of frames split over the mesh.

    Returns ``(refined (n_frames, k, 4) float64, log-likelihood gain (n_frames, k) nats)``.
    """
    mesh = problem.mesh
    n = problem.n_frames
    per_call = frames_per_call(n, mesh.size)
    sharding = NamedSharding(mesh, P(parallel.AXIS))
    replicated = NamedSharding(mesh, P())
    kernel = _kernel(settings, mesh)
    refined = np.zeros(start_quaternions.shape, np.float64)
    gain = np.zeros(start_quaternions.shape[:2])
    phi = np.asarray(state.phi, np.float32)
    background = problem.plan.background.astype(np.float32)
    for (a, b), ph in zip(_chunks(n, per_call), photons):
        pad = per_call - (b - a)
        padded = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x  # noqa: E731
        args = [padded(np.asarray(start_quaternions[a:b], np.float32)), padded(phi[a:b]),
                jax.tree.map(padded, ph), padded(background[a:b]), padded(np.arange(a, b, dtype=np.int32))]
        args = [jax.device_put(x, sharding) for x in args]
        q, g, count = kernel(state.intensity, jax.device_put(problem.grid.tables, replicated), *args, geometry,
                             state.likelihood)
        if int(np.max(np.asarray(count))) > settings.max_reflections:
            raise _TooManyReflections(int(np.max(np.asarray(count))))
        refined[a:b] = np.asarray(q, np.float64)[: b - a]
        gain[a:b] = np.asarray(g)[: b - a]
    refined /= np.linalg.norm(refined, axis=-1, keepdims=True)
    return refined, gain


class _TooManyReflections(Exception):
    def __init__(self, needed: int):
        self.needed = needed


def frames_per_call(n_frames: int, n_devices: int) -> int:
    """Frames refined per device call: up to ``FRAMES_PER_CHUNK`` per device."""
    return min(FRAMES_PER_CHUNK, -(-n_frames // n_devices)) * n_devices


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


_KERNELS: dict = {}


def _kernel(settings, mesh):
    key = (settings, id(mesh))
    if key not in _KERNELS:
        _KERNELS[key] = jax.jit(
            lambda intensity, tables, start, phi, ph, bg, index, geo, likelihood: refine_core.refine_frames(
                intensity, tables, start, phi, ph, bg, index, geo, likelihood, settings
            )
        )
    return _KERNELS[key]


class Refiner:
    """One EMC iteration with refined orientations (:meth:`iterate`); keeps, between iterations, the base
    problem, the frames' photons, the problem of the last iteration and its per-frame results."""

    def __init__(self, problem, config):
        self.base = problem
        self.config = config
        max_angle = math.radians(config.refine_max_angle_deg)
        self.settings = refine_core.RefineSettings(
            steps=config.refine_steps, learning_rate=math.radians(config.refine_learning_rate_deg),
            max_angle=max_angle, max_reflections=256,
        )
        self.geometry = signal_geometry(problem.detector, problem.grid, max_angle)
        self.settings = self.settings._replace(max_reflections=reflection_budget(self.geometry))
        per_call = frames_per_call(problem.n_frames, problem.mesh.size)
        self.photons = [frame_photons(problem.plan, a, b) for a, b in _chunks(problem.n_frames, per_call)]
        self.current = problem
        self.last = None  # per-frame results of the last iteration (indices into self.current.sampling)
        self.union = None  # how self.current was built from self.base (see snapshot)

    def refined_problem(self, state) -> tuple[object, dict]:
        """The problem with every frame's refined candidates, from the last iteration's kept rotations."""
        last, sampling = self.last, self.current.sampling
        starts = start_rotations(last["kept_frame"], last["kept_rotation"], last["kept_prob"],
                                 last["best_rotation"], self.base.n_frames, self.config.refine_top_k)
        while True:
            try:
                refined, gain = refine(self.current, state, sampling.quaternions[starts], self.settings,
                                       self.geometry, self.photons)
                break
            except _TooManyReflections as too_many:
                self.settings = self.settings._replace(max_reflections=bucket_length(too_many.needed))
        problem = candidate_problem(self.base, sampling, starts, refined)
        n_base = self.base.sampling.n_rot
        self.union = {"start_ids": union_start_ids(starts, n_base),
                      "extra_quaternions": np.asarray(problem.sampling.quaternions[n_base:])}
        return problem, {"refine_gain_median": float(np.median(gain[:, 0]))}

    def iterate(self, state):
        """:func:`emcjax.emc.iterate` on the refined candidates (once ``refine_start`` iterations are done and
        a previous E-step exists), else on the base problem. Returns ``(state, metrics, per_frame)`` like it,
        with rotation indices into the base sampling (nearest base rotation) and ``best_quaternion``."""
        from emcjax import emc as emc_lib

        start = time.perf_counter()
        record = {}
        problem = self.current
        done, first, every = int(state.iteration), self.config.refine_start, self.config.refine_every
        if self.last is not None and done >= first and (done - first) % every == 0:
            problem, record = self.refined_problem(state)
        record["refine_seconds"] = time.perf_counter() - start
        state, metrics, per_frame = emc_lib.iterate(problem, state, self.config)
        self.current, self.last = problem, dict(per_frame)
        quaternions = problem.sampling.quaternions
        per_frame["best_quaternion"] = quaternions[per_frame["best_rotation"]]
        if problem is not self.base:
            per_frame["best_rotation"] = self.to_base(quaternions, per_frame["best_rotation"])
            per_frame["kept_rotation"] = self.to_base(quaternions, per_frame["kept_rotation"])
        metrics = {**metrics, **record, "seconds": metrics["seconds"] + record["refine_seconds"]}
        return state, metrics, per_frame

    def snapshot(self) -> dict[str, np.ndarray]:
        """What the next iteration needs besides the EMC state, as plain arrays (saved next to every checkpoint
        so that a resumed run continues exactly): the last E-step's kept rotations and best rotation (indices
        into the current sampling) and, once refined, how the current candidate problem was built."""
        if self.last is None:
            return {}
        arrays = {f"last_{key}": np.asarray(self.last[key]) for key in LAST_KEYS}
        if self.union is not None:
            arrays.update(self.union)
        return arrays

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """The inverse of :meth:`snapshot`: rebuilds the current candidate problem from the base problem."""
        self.last = {key: np.asarray(arrays[f"last_{key}"]) for key in LAST_KEYS}
        self.current, self.union = self.base, None
        if "start_ids" in arrays:
            start_ids, extra = np.asarray(arrays["start_ids"]), np.asarray(arrays["extra_quaternions"])
            n_off = int(np.sum(start_ids >= self.base.sampling.n_rot))
            quaternions = np.concatenate([self.base.sampling.quaternions, extra[:n_off]])
            before = RotationSampling(quaternions=quaternions, log_weights=np.zeros(quaternions.shape[0]),
                                      n=self.base.sampling.n)
            refined = extra[n_off:].reshape(*start_ids.shape, 4)
            self.current = candidate_problem(self.base, before, start_ids, refined)
            self.union = {"start_ids": start_ids, "extra_quaternions": extra}

    def to_base(self, quaternions: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Sampling indices of the union sampling -> the nearest rotation of the base sampling."""
        n_base = self.base.sampling.n_rot
        rotation = np.asarray(rotation, np.int64).copy()
        off = rotation >= n_base
        if off.any():
            rotation[off] = nearest_rotations(self.base.sampling, quaternions[rotation[off]], 1)[:, 0]
        return rotation


LAST_KEYS = ("kept_frame", "kept_rotation", "kept_prob", "best_rotation")


def union_start_ids(starts: np.ndarray, n_base: int) -> np.ndarray:
    """Start rotations (indices into the last sampling) as indices into the next union sampling: base
    rotations keep their index, off-grid ones are numbered from ``n_base`` in row-major order."""
    off_grid = starts >= n_base
    ids = np.array(starts, np.int64)
    ids[off_grid] = n_base + np.arange(int(off_grid.sum()))
    return ids


def candidate_problem(base, sampling: RotationSampling, starts: np.ndarray, refined: np.ndarray):
    """``base`` in candidate-list mode with every frame's candidates = its data-set candidates (if any) +
    its start rotations ``starts`` (indices into ``sampling``, whose first rotations are the base sampling's)
    + its ``refined`` (n_frames, k, 4) rotations; the union sampling is the base one followed by the
    off-grid rotations (start rotations off the base grid, then the refined ones)."""
    n_base = base.sampling.n_rot
    n, k = starts.shape
    off_grid = starts >= n_base
    extra_q = [sampling.quaternions[starts[off_grid]], refined.reshape(-1, 4)]
    start_ids = union_start_ids(starts, n_base)
    refined_ids = n_base + int(off_grid.sum()) + np.arange(n * k).reshape(n, k)
    quaternions = np.concatenate([base.sampling.quaternions, *extra_q])
    log_w = base.plan.log_w
    level = float(np.mean(log_w[np.isfinite(log_w)]))
    log_w = np.concatenate([log_w, np.full(quaternions.shape[0] - n_base, level)])
    per_frame = [start_ids, refined_ids]
    if base.plan.candidates is not None:
        offsets, ids = base.plan.candidates
        lists = [np.concatenate([ids[offsets[d] : offsets[d + 1]], start_ids[d], refined_ids[d]]) for d in range(n)]
    else:
        lists = list(np.concatenate(per_frame, axis=1))
    lists = [np.unique(x) for x in lists]
    offsets = np.concatenate([[0], np.cumsum([x.shape[0] for x in lists])]).astype(np.int64)
    rotation_ids = np.concatenate(lists).astype(np.int64)
    union = RotationSampling(quaternions=quaternions, log_weights=log_w, n=base.sampling.n)
    n_slots = int(np.diff(offsets).max())
    plan = dataclasses.replace(base.plan, sampling=union, log_w=log_w, rotation_set=None,
                               candidates=(offsets, rotation_ids), n_slots=n_slots)
    blocks, built, lengths = [], [], (0, 0)
    starts_of_blocks = [b.start for b in base.blocks]
    n_local = base.blocks[0].n_local
    per_block = n_local * base.mesh.size
    for start in starts_of_blocks:
        stop = min(start + per_block, n)
        block = Block(start, n_local, rotations=np.unique(rotation_ids[offsets[start] : offsets[stop]]))
        data, block_lengths = build_block(plan, block)
        lengths = tuple(max(a, c) for a, c in zip(lengths, block_lengths))
        blocks.append(block)
        built.append(data)
    for block, data in zip(blocks, built):
        if tuple(x.shape[-1] for x in (data.arrays.join.cell, data.arrays.photons.frame)) != lengths:
            data = build_block(plan, block, lengths)[0]
        block.resident = data
    return dataclasses.replace(
        base, sampling=union, rotations=blocks[0].rotations, rotation_set=None, blocks=blocks, batch=None,
        n_slots=n_slots, lengths=lengths, plan=plan, stream=False,
        kept_budget=bucket_length(max(lengths[0] // 16, 1024)),
    )
