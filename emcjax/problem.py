"""Planning of an EMC run (host side, numpy): geometry, the grid, rotations, and the blocks of frames.

:func:`setup_problem` builds the detector, the model grid, the rotations and their in-peak entries (on the
device, once), and cuts the frames into blocks of ``block_frames`` frames; each block is split evenly over
the devices of the mesh (emcjax.parallel) and every device's part is joined with the in-peak entries of its
frames' candidate rotations (emcjax.join). Each process reads only the frames of its own devices. The
resulting :class:`Problem` holds the device arrays the pure step (emcjax.core.step) reads: a
:class:`~emcjax.core.step.Batch` when every block is resident and shares the problem's rotation set, or
blocks that emcjax.emc feeds one by one (streamed from disk, or each with its own candidate rotations).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh

from emcjax import model as model_lib
from emcjax import parallel
from emcjax.config import EMCConfig
from emcjax.blocks import Block, BlockData, FrameSource, Plan, RotationSet, build_block, rotation_set
from emcjax.core.arrays import BlockArrays, Shared
from emcjax.core.step import Batch, StepSpec
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset, SparseFrames, bucket_length, rotation_count
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError
from emcjax.join import BACKGROUND_FLOOR, pixel_records
from emcjax.frontend.grid_orbits import grid_orbits
from emcjax.sampling_600cell import RotationSampling, sample_600cell


def _sampling(crystal: Crystal, n: int, reduce: bool) -> tuple[RotationSampling, np.ndarray, np.ndarray]:
    """The 600-cell grid, the rotations the E-step evaluates and their log prior (normalised).

    With ``reduce`` the grid is reduced exactly by the point-group operations it shares
    (emcjax.frontend.grid_orbits: the orbits of :func:`emcjax.rotation_symmetry.grid_symmetry_orbits`, found by
    hashing instead of a k-d tree); a representative carries its orbit's total weight.
    """
    sampling = sample_600cell(n)
    if not reduce:
        return sampling, np.arange(sampling.n_rot, dtype=np.int64), sampling.log_weights
    orbits = grid_orbits(sampling, crystal.rotation_ops_cartesian)
    representative, orbit = orbits.representative, orbits.orbit()
    weight = np.bincount(orbit, weights=np.exp(sampling.log_weights - sampling.log_weights.max()))
    return sampling, representative, np.log(weight)


@dataclasses.dataclass(eq=False)
class Problem:
    """Everything fixed during a run: geometry, rotations, blocks of frames and their joins.

    Attributes:
      detector: valid pixels (to ``d_min``).
      grid: the model grid.
      sampling: the orientation sampling rotation indices refer to.
      rotations: (n_rot,) int64 sampling index of each rotation of ``shared`` (all rotations evaluated, or
        block 0's set when frames carry candidate lists).
      mesh: the device mesh.
      geometry: replicated geometry arrays (``Shared`` without a rotation set).
      rotation_set: the problem's rotation set (None when frames carry candidate lists).
      blocks: the blocks of frames.
      batch: every block stacked for the pure step (resident blocks of one rotation set), else None.
      n_frames: number of frames; n_padded: n_frames rounded up to whole blocks.
      n_slots: candidate slots per frame; n_shells: radial shells of the background.
      lengths: (join pairs, photon records) per device and block, padded.
      photons: (n_frames,) float64 photons per frame inside the valid pixels.
      expected_background: (n_frames,) float64 expected background photons per frame.
      frame_weights: (n_frames,) float32 frame weights (0 = not used).
      truth: the data set's truth dict, or None.
      plan: what rebuilding a block from its frames needs (streaming).
      stream: whether blocks are rebuilt at every E-step.
      kept_budget: kept join pairs per device and block the compiled step is sized for (grows on overflow,
        shrinks when over 4x too large).
      kept_needed: the most kept join pairs of one device's block in the last call.
    """

    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: RotationSampling
    rotations: np.ndarray
    mesh: Mesh
    geometry: Shared
    rotation_set: RotationSet | None
    blocks: list[Block]
    batch: Batch | None
    n_frames: int
    n_padded: int
    n_slots: int
    n_shells: int
    lengths: tuple[int, int]
    photons: np.ndarray
    expected_background: np.ndarray
    frame_weights: np.ndarray
    truth: dict | None
    plan: Plan
    stream: bool
    kept_budget: int
    kept_needed: int = 0

    @functools.cached_property
    def shared(self) -> Shared:
        """Replicated arrays of the problem's rotation set (block 0's when frames carry candidate lists)."""
        first = self.rotation_set if self.rotation_set is not None else self.block_data(self.blocks[0]).rotation_set
        return first.shared(self.geometry)

    def spec(self, config: EMCConfig, axis: str | None = None) -> StepSpec:
        """The static description of this problem's step under ``config``."""
        max_entries = max(
            (s.max_entries for s in [self.rotation_set] if s is not None), default=int(self.detector.n_pix)
        )
        return StepSpec(
            n_frames=self.n_frames, n_padded=self.n_padded, n_shells=self.n_shells,
            max_kept=min(config.kept_rotations, self.n_slots), intensity_update=config.intensity_rule,
            inner_iterations=config.inner_iterations, update_phi=config.update_phi,
            kept_budget=None if config.responsibilities == "soft" else self.kept_budget,
            gradient_steps=config.gradient_steps, gradient_learning_rate=config.gradient_learning_rate,
            max_entries=bucket_length(max_entries), refine_background=config.refine_background,
            refine_background_shells=config.refine_background_shells, axis=axis,
        )

    def integrated(self, intensity) -> np.ndarray:
        """(n_asu,) integrated intensity of each unique reflection."""
        return model_lib.integrated_intensity(np.asarray(intensity))

    def cc_true(self, intensity) -> float | None:
        """Pearson correlation of integrated intensities with the truth (common unique hkl), or None."""
        if self.truth is None or "intensity" not in self.truth or "hkl" not in self.truth:
            return None
        return correlation_by_hkl(
            self.grid.asu.hkl, self.integrated(intensity), self.truth["hkl"], np.asarray(self.truth["intensity"]).sum(1)
        )

    def block_data(self, block: Block) -> BlockData:
        """The block's arrays (rebuilt from the frames when streaming)."""
        if block.resident is not None:
            return block.resident
        if self.batch is not None and block.rotations is None:
            b = self.blocks.index(block)
            arrays = jax.tree.map(lambda x: x[:, b], self.batch.blocks)
            return BlockData(arrays, self.rotation_set)
        return build_block(self.plan, block, self.lengths)[0]

    def local_block(self, index: int = 0, device: int = 0) -> BlockArrays:
        """One local device's part of a block, without the device axis (for inspection and tests)."""
        arrays = self.block_data(self.blocks[index]).arrays
        return jax.tree.map(lambda x: parallel.local_pieces(x)[device], arrays)


def correlation_by_hkl(hkl_a, values_a, hkl_b, values_b) -> float:
    """Pearson correlation of two per-reflection arrays over the Miller indices they share."""
    key_a = {tuple(h): i for i, h in enumerate(np.asarray(hkl_a).tolist())}
    pairs = [(key_a[tuple(h)], j) for j, h in enumerate(np.asarray(hkl_b).tolist()) if tuple(h) in key_a]
    if len(pairs) < 2:
        return float("nan")
    ia, ib = np.asarray(pairs).T
    return float(np.corrcoef(np.asarray(values_a)[ia], np.asarray(values_b)[ib])[0, 1])


def frame_photon_counts(plan: Plan, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Photons and expected background photons (float64) of the frames [start, stop)."""
    frames = plan.source.read(start, stop)
    background = plan.background[start : start + frames.n_frames]
    detector = plan.detector
    pol_per_shell = np.bincount(detector.shell, weights=detector.polarization, minlength=background.shape[1])
    bg = np.where(background >= 0, np.maximum(background, BACKGROUND_FLOOR), 0.0)
    rec = pixel_records(frames, detector, background)
    dead = rec.dead * detector.polarization[rec.pixel] * np.maximum(rec.background, BACKGROUND_FLOOR)
    photons = np.bincount(rec.frame, weights=rec.count, minlength=frames.n_frames)
    return photons, bg @ pol_per_shell - np.bincount(rec.frame, weights=dead, minlength=frames.n_frames)


def _stack_blocks(mesh: Mesh, blocks: list[BlockArrays]) -> BlockArrays:
    """Resident blocks stacked on a block axis after the device axis, sharded over the devices."""
    return _block_stacker(mesh)(*blocks)


@functools.lru_cache(maxsize=None)
def _block_stacker(mesh: Mesh):
    """The jitted stacking of :func:`_stack_blocks` for ``mesh`` (one per mesh: compiled once per shape)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(parallel.AXIS))
    return jax.jit(lambda *xs: jax.tree.map(lambda *a: jax.numpy.stack(a, axis=1), *xs), out_shardings=sharding)


def common_candidates(offsets: np.ndarray, rotations: np.ndarray) -> np.ndarray | None:
    """The sorted rotation list when every frame's candidate list holds the same rotations, else None
    (such data take the all-rotations path on that set, with the exact symmetry reduction when the set is
    the whole sampling)."""
    lengths = np.diff(np.asarray(offsets))
    if lengths.shape[0] == 0 or np.any(lengths != lengths[0]) or lengths[0] == 0:
        return None
    rows = np.sort(np.asarray(rotations, np.int64).reshape(lengths.shape[0], lengths[0]), axis=1)
    return rows[0] if np.all(rows == rows[0]) else None


def geometry_setup(dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None = None,
                   frame_weights=None) -> tuple[FrameSource, Crystal, Detector, model_lib.ReciprocalGrid, np.ndarray]:
    """The frame source, crystal, detector (to ``d_min``), model grid and checked frame weights of a run
    (see :func:`setup_problem` for the arguments and errors)."""
    source = FrameSource(dataset, frames)
    geometry = DetectorGeometry(**dataset.geometry)
    crystal = Crystal(cell=tuple(dataset.crystal["cell"]), space_group=str(dataset.crystal["space_group"]))
    detector = make_detector(geometry, dataset.mask)
    d_min = geometry.resolution_max_A if config.d_min is None else config.d_min
    if d_min < geometry.resolution_max_A:
        raise ConfigError(
            f"d_min={d_min} Å is beyond the data set's pixels (resolution_max_A={geometry.resolution_max_A} Å)"
        )
    detector = detector.truncate(d_min)
    n_frames = source.n_frames
    if n_frames == 0:
        raise DataError(f"{dataset.path}: the data set holds no frame")
    weights = np.ones(n_frames, np.float32) if frame_weights is None else np.asarray(frame_weights, np.float32)
    if weights.shape != (n_frames,) or not np.all((weights >= 0) & (weights <= 1)) or not weights.any():
        raise ConfigError(
            f"frame_weights: expected {n_frames} values in [0, 1], not all 0; got shape {weights.shape}"
        )
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(crystal, d_min=d_min, d_max=1.0 / max(q_min, 1e-9), vn=config.vn, gw=config.gw)
    return source, crystal, detector, grid, weights


def setup_problem(dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None = None, *,
                  mesh: Mesh | None = None, frame_weights=None) -> Problem:
    """One-time set-up: detector, grid, rotations, in-peak entries, blocks and their joins.

    Args:
      dataset: the data set (geometry, crystal, truth and, unless ``frames`` is given, the frames).
      config: algorithm settings (``block_frames``, ``stream``).
      frames: frames to use instead of those of ``dataset``.
      mesh: devices to use (default: every device of every process).
      frame_weights: (n_frames,) weights in [0, 1] (0: rejected, or not in this half set); default all 1.

    Raises:
      ConfigError: settings that contradict the data (e.g. ``d_min`` beyond the detector), bad weights.
      DataError: no frame.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    if config.candidate_path != "table":  # candidate lists by direct photon-peak tests (emcjax.direct)
        from emcjax import candidate_path, direct

        if candidate_path.use_direct(dataset, config, frames, mesh):
            return direct.setup_direct(dataset, config, frames, mesh=mesh, frame_weights=frame_weights)
    source, crystal, detector, grid, weights = geometry_setup(dataset, config, frames, frame_weights)
    n_frames = source.n_frames
    candidates = source.candidates()
    common = None if candidates is None else common_candidates(*candidates)
    if candidates is not None and common is None:  # each block evaluates the union of its frames' lists
        sampling, _, log_w = _sampling(crystal, int(dataset.candidate_sampling_n), reduce=False)
        offsets, rotation_ids = candidates
        n_slots = max(int(np.diff(offsets).max()), 1)
        candidates = (np.asarray(offsets, np.int64), np.asarray(rotation_ids, np.int64))
    else:  # no lists, or one list shared by every frame: the all-rotations path on that set
        n = config.rotation_n if common is None else int(dataset.candidate_sampling_n)
        reduce = config.reduce_by_symmetry and (common is None or common.shape[0] == rotation_count(n))
        sampling, rotations, log_w_set = _sampling(crystal, n, reduce)
        if common is not None and not reduce:
            rotations, log_w_set = common, sampling.log_weights[common]
        candidates = None
        log_w = np.full(sampling.n_rot, -np.inf)
        log_w[rotations] = log_w_set
        n_slots = int(rotations.shape[0])
    log_w = log_w - np.logaddexp.reduce(log_w[np.isfinite(log_w)])
    problem_set = None
    if candidates is None:
        problem_set = rotation_set(mesh, grid, detector, sampling, log_w, rotations)

    per_block = n_frames if config.block_frames == 0 else min(config.block_frames, n_frames)
    n_local = math.ceil(per_block / mesh.size)
    per_block = n_local * mesh.size
    n_blocks = math.ceil(n_frames / per_block)
    background = source.background()
    n_masked = max(int((background < 0).sum(axis=1).max()), 1)
    plan = Plan(mesh, source, detector, grid, sampling, log_w, problem_set, candidates, n_slots, n_masked,
                background, weights)
    blocks, built, lengths = [], [], (0, 0)
    for b in range(n_blocks):
        block = Block(b * per_block, n_local)
        if candidates is not None:
            stop = min(block.start + per_block, n_frames)
            block.rotations = np.unique(candidates[1][candidates[0][block.start] : candidates[0][stop]])
        if config.stream and candidates is None:  # streamed full search: the join cached on disk (emcjax.streaming)
            from emcjax import streaming

            data, block_lengths = None, streaming.cache_block(plan, block)
        else:
            data, block_lengths = build_block(plan, block)
        lengths = tuple(max(a, c) for a, c in zip(lengths, block_lengths))
        built.append(data)
        blocks.append(block)
        if config.stream:
            built[-1] = None
    if not config.stream:  # one padded length for every block: one compiled shape
        for block, data in zip(blocks, built):
            if tuple(x.shape[-1] for x in (data.arrays.join.cell, data.arrays.photons.frame)) != lengths:
                data = build_block(plan, block, lengths)[0]
            block.resident = data
    del built
    geometry_arrays = replicated_geometry(mesh, detector, grid)
    batch = None
    if problem_set is not None and not config.stream:
        batch = Batch(problem_set.shared(geometry_arrays), _stack_blocks(mesh, [b.resident.arrays for b in blocks]))
        for block in blocks:
            block.resident = None
    counts = np.zeros((2, n_frames))
    for i in parallel.local_positions(mesh):
        for block in blocks:
            start = block.start + i * n_local
            if start < n_frames:
                stop = min(start + n_local, n_frames)
                counts[:, start:stop] = frame_photon_counts(plan, start, stop)
    counts = parallel.gather_frames(mesh, [counts.T], [0], n_frames).T
    first_rotations = problem_set.rotations if problem_set is not None else blocks[0].rotations
    return Problem(
        detector=detector, grid=grid, sampling=sampling, rotations=first_rotations, mesh=mesh,
        geometry=geometry_arrays, rotation_set=problem_set, blocks=blocks, batch=batch,
        n_frames=n_frames, n_padded=n_blocks * per_block, n_slots=n_slots, n_shells=int(background.shape[1]),
        lengths=lengths, photons=counts[0], expected_background=counts[1], frame_weights=weights,
        truth=dataset.read_truth() if dataset.has_truth else None, plan=plan, stream=config.stream,
        kept_budget=bucket_length(max(lengths[0] // 16, 1024)),
    )


def replicated_geometry(mesh: Mesh, detector: Detector, grid) -> Shared:
    """The detector's polarization (float32) and shell (int32) per valid pixel and the grid's tables,
    replicated on every device of ``mesh``, as a :class:`Shared` without entry tables or log prior."""
    replicate = functools.partial(jax.tree.map, lambda x: parallel.replicate(mesh, np.asarray(x)))
    return Shared(
        entries=None,
        polarization=replicate(detector.polarization.astype(np.float32)),
        shell=replicate(detector.shell.astype(np.int32)),
        log_prior=None,
        tables=replicate(grid.tables),
    )
