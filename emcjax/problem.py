"""Planning of an EMC run (host side, numpy): geometry, rotation sets, blocks of frames and their joins.

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
from emcjax.core.arrays import BlockArrays, PhotonArrays, Shared
from emcjax.core.step import Batch, StepSpec
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError
from emcjax.join import BACKGROUND_FLOOR, EntryIndex, build_join, pad_join, pixel_records
from emcjax.rotations import RotationSampling, grid_symmetry_orbits, sample_600cell


class FrameSource:
    """Frames from a data set on disk (opened per read, so a closed handle never stops a streamed run), or
    frames already in memory."""

    def __init__(self, dataset: SparseDataset, frames: SparseFrames | None):
        self.dataset = dataset
        self.frames = frames
        self.n_frames = dataset.n_frames if frames is None else frames.n_frames

    def read(self, start: int, stop: int) -> SparseFrames:
        stop = min(stop, self.n_frames)
        start = min(start, stop)
        if self.frames is not None:
            return self.frames.frame_slice(start, stop)
        return self.dataset.read_block(start, stop)

    def candidates(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets, rotations) of every frame's candidate list, or None."""
        if self.frames is not None:
            if self.frames.candidate_offsets is None:
                return None
            return self.frames.candidate_offsets, self.frames.candidate_rotations
        return self.dataset.read_candidates()

    def background(self) -> np.ndarray:
        """(n_frames, n_shells) float64 background of every frame (< 0: masked shell)."""
        if self.frames is not None:
            return np.asarray(self.frames.background, np.float64)
        return np.asarray(self.dataset.read_background(), np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class RotationSet:
    """Rotations evaluated together, with their in-peak entries.

    Attributes:
      rotations: (n_rot,) int64 sampling index of each rotation (ascending).
      entries: their in-peak entries (device, replicated; padded to a multiple of the mesh size).
      log_prior: (n_rot,) float32 log prior weight (device, replicated).
      index: host index of the entries by pixel.
      max_entries: most in-peak entries of one rotation.
    """

    rotations: np.ndarray
    entries: model_lib.Entries
    log_prior: jax.Array
    index: EntryIndex
    max_entries: int

    def shared(self, geometry: Shared) -> Shared:
        """``geometry`` with this set's entries and prior."""
        return geometry._replace(entries=self.entries, log_prior=self.log_prior)


def rotation_set(mesh: Mesh, grid, detector: Detector, sampling: RotationSampling, log_w: np.ndarray, rotations,
                 *, pad: bool = False) -> RotationSet:
    """In-peak entries of ``rotations`` (sampling indices), built on the device, and their prior.

    The entries are padded (zero weight on the model's zero voxel, last rotation, so that they stay sorted by
    rotation) to a multiple of the mesh size, and with ``pad`` to bucketed sizes with bucketed rotation
    counts (zero prior), so that the many sets of a run share a few compiled shapes.
    """
    rotations = np.asarray(rotations, np.int64)
    entries = model_lib.build_entries_by_reflection(grid, detector, sampling.quaternions[rotations])
    rot = np.asarray(entries.rotation)
    index = EntryIndex.build(np.asarray(entries.pixel), rot, detector.n_pix, rotations.shape[0])
    prior = np.asarray(log_w[rotations], np.float32)
    arrays = {name: np.asarray(getattr(entries, name)) for name in ("rotation", "pixel", "voxels", "weights")}
    n_rot = rotations.shape[0]
    n_entries = entries.n_entries
    if pad:
        n_rot = bucket_length(n_rot)
        prior = np.concatenate([prior, np.full(n_rot - prior.shape[0], -np.inf, np.float32)])
        n_entries = bucket_length(n_entries)
    n_entries = -(-max(n_entries, 1) // mesh.size) * mesh.size
    extra = n_entries - entries.n_entries
    fill = {"rotation": n_rot - 1, "pixel": 0, "voxels": grid.n_asu * grid.n_voxels, "weights": 0.0}
    arrays = {k: np.concatenate([v, np.full((extra, *v.shape[1:]), fill[k], v.dtype)]) for k, v in arrays.items()}
    counts = np.bincount(rot, minlength=1)
    device = model_lib.Entries(**{k: parallel.replicate(mesh, v) for k, v in arrays.items()}, n_rot=n_rot)
    return RotationSet(rotations, device, parallel.replicate(mesh, prior), index, int(counts.max()))


@dataclasses.dataclass(eq=False)
class Block:
    """A block of frames, split evenly over the devices.

    Attributes:
      start: global index of the block's first frame; mesh position i holds frames
        [start + i * n_local, start + (i + 1) * n_local).
      n_local: frames per device.
      rotations: (n,) int64 sampling indices of the block's own rotation set (the union of its frames'
        candidates), or None when every frame has all rotations of the problem's set.
      resident: the block's device arrays and rotation set while it is kept in memory (None while streaming).
    """

    start: int
    n_local: int
    rotations: np.ndarray | None = None
    resident: "BlockData | None" = None


@dataclasses.dataclass(frozen=True, eq=False)
class BlockData:
    """A block's device arrays (stacked over devices) and the rotation set its candidates index."""

    arrays: BlockArrays
    rotation_set: RotationSet


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """What building a device's part of a block needs."""

    mesh: Mesh
    source: FrameSource
    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: RotationSampling
    log_w: np.ndarray  # (sampling.n_rot,) log prior of every rotation of the sampling (normalised)
    rotation_set: RotationSet | None  # the problem's set when frames have no candidate lists
    candidates: tuple[np.ndarray, np.ndarray] | None  # (offsets, sampling indices) or None: all of rotation_set
    n_slots: int
    n_masked: int
    background: np.ndarray  # (n_frames, n_shells) float64, < 0 on masked shells
    weights: np.ndarray  # (n_frames,) float32 frame weights


def _sampling(crystal: Crystal, n: int, reduce: bool) -> tuple[RotationSampling, np.ndarray, np.ndarray]:
    """The 600-cell grid, the rotations the E-step evaluates and their log prior (normalised).

    With ``reduce`` the grid is reduced exactly by the point-group operations it shares
    (:func:`emcjax.rotations.grid_symmetry_orbits`); a representative carries its orbit's total weight.
    """
    sampling = sample_600cell(n)
    if not reduce:
        return sampling, np.arange(sampling.n_rot, dtype=np.int64), sampling.log_weights
    representative, orbit = grid_symmetry_orbits(sampling, crystal.rotation_ops_cartesian)
    weight = np.bincount(orbit, weights=np.exp(sampling.log_weights - sampling.log_weights.max()))
    return sampling, representative, np.log(weight)


def block_rotation_set(plan: Plan, block: Block) -> RotationSet:
    if block.rotations is None:
        return plan.rotation_set
    return rotation_set(plan.mesh, plan.grid, plan.detector, plan.sampling, plan.log_w, block.rotations, pad=True)


def _device_part(plan: Plan, rotations: RotationSet, start: int, n_local: int):
    """Reads and joins the frames [start, start + n_local) of one device (fewer at the end of the data):
    (per-frame numpy arrays, join, photon records)."""
    frames = plan.source.read(start, start + n_local)
    n_real = frames.n_frames
    candidates = np.zeros((n_local, plan.n_slots), np.int64)
    mask = np.zeros((n_local, plan.n_slots), bool)
    if plan.candidates is None:
        candidates[:] = np.arange(plan.n_slots)
        mask[:n_real] = True
    else:
        offsets, rotation_ids = plan.candidates
        for i in range(n_real):
            c = np.searchsorted(rotations.rotations, rotation_ids[offsets[start + i] : offsets[start + i + 1]])
            candidates[i, : c.shape[0]] = c
            mask[i, : c.shape[0]] = True
    raw = plan.background[start : start + n_real]
    join, _ = build_join(frames, plan.detector, rotations.index, candidates, mask, raw)
    n_shells = raw.shape[1]
    masked = np.full((n_local, plan.n_masked), n_shells, np.int32)
    for d, row in enumerate(raw):
        m = np.flatnonzero(row < 0)
        masked[d, : m.shape[0]] = m
    background = np.zeros((n_local, n_shells), np.float32)
    background[:n_real] = np.where(raw >= 0, np.maximum(raw, BACKGROUND_FLOOR), 0.0)
    weight = np.zeros(n_local, np.float32)
    weight[:n_real] = plan.weights[start : start + n_real]
    rec = pixel_records(frames, plan.detector, raw)
    photons = PhotonArrays(
        frame=rec.frame.astype(np.int32),
        count=rec.count.astype(np.float32),
        dead=rec.dead.astype(np.float32),
        background=(plan.detector.polarization[rec.pixel] * np.maximum(rec.background, BACKGROUND_FLOOR)).astype(np.float32),
    )
    per_frame = (candidates.astype(np.int32), mask, masked, background, weight)
    return per_frame, join, photons


def _pad_photons(photons: PhotonArrays, length: int, n_local: int) -> PhotonArrays:
    pad = length - photons.frame.shape[0]
    fill = {"frame": n_local - 1, "count": 0.0, "dead": 0.0, "background": 1.0}
    return PhotonArrays(**{k: np.concatenate([v, np.full(pad, fill[k], v.dtype)]) for k, v in photons._asdict().items()})


def build_block(plan: Plan, block: Block, lengths: tuple[int, int] | None = None):
    """The block's device arrays and rotation set; with ``lengths`` = (join, photons) padded to those, else
    to this block's own bucketed maxima over the devices (returned as well)."""
    rotations = block_rotation_set(plan, block)
    positions = parallel.local_positions(plan.mesh)
    parts = [_device_part(plan, rotations, block.start + i * block.n_local, block.n_local) for i in positions]
    if lengths is None:
        lengths = (
            parallel.global_max(bucket_length(max(max(p[1].cell.shape[0] for p in parts), 1))),
            parallel.global_max(bucket_length(max(max(p[2].frame.shape[0] for p in parts), 1))),
        )
    n_cells = block.n_local * plan.n_slots
    stack = functools.partial(parallel.stack, plan.mesh)
    arrays = BlockArrays(
        frame_start=stack([np.int32(block.start + i * block.n_local) for i in positions]),
        candidates=stack([p[0][0] for p in parts]),
        candidate_mask=stack([p[0][1] for p in parts]),
        join=parallel.stack_tree(plan.mesh, [pad_join(p[1], lengths[0], n_cells) for p in parts]),
        masked_shells=stack([p[0][2] for p in parts]),
        background=stack([p[0][3] for p in parts]),
        weight=stack([p[0][4] for p in parts]),
        photons=parallel.stack_tree(plan.mesh, [_pad_photons(p[2], lengths[1], block.n_local) for p in parts]),
    )
    return BlockData(arrays, rotations), lengths


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
      kept_budget: kept join pairs per device and block the compiled step is sized for (grows on overflow).
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

    @property
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
            max_entries=bucket_length(max_entries), axis=axis,
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


def _frame_counts(plan: Plan, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
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
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(parallel.AXIS))
    stack = jax.jit(lambda *xs: jax.tree.map(lambda *a: jax.numpy.stack(a, axis=1), *xs), out_shardings=sharding)
    return stack(*blocks)


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

    candidates = source.candidates()
    if candidates is not None:  # candidate lists: each block evaluates the union of its frames' lists
        sampling, _, log_w = _sampling(crystal, int(dataset.candidate_sampling_n), reduce=False)
        offsets, rotation_ids = candidates
        n_slots = max(int(np.diff(offsets).max()), 1)
        candidates = (np.asarray(offsets, np.int64), np.asarray(rotation_ids, np.int64))
    else:
        sampling, rotations, log_w_set = _sampling(crystal, config.rotation_n, config.reduce_by_symmetry)
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
    batch = None
    if problem_set is not None and not config.stream:
        batch = Batch(problem_set.shared(_geometry(mesh, detector, grid)), _stack_blocks(mesh, [b.resident.arrays for b in blocks]))
        for block in blocks:
            block.resident = None
    counts = np.zeros((2, n_frames))
    for i in parallel.local_positions(mesh):
        for block in blocks:
            start = block.start + i * n_local
            if start < n_frames:
                stop = min(start + n_local, n_frames)
                counts[:, start:stop] = _frame_counts(plan, start, stop)
    counts = parallel.gather_frames(mesh, [counts.T], [0], n_frames).T
    first_rotations = problem_set.rotations if problem_set is not None else blocks[0].rotations
    return Problem(
        detector=detector, grid=grid, sampling=sampling, rotations=first_rotations, mesh=mesh,
        geometry=_geometry(mesh, detector, grid), rotation_set=problem_set, blocks=blocks, batch=batch,
        n_frames=n_frames, n_padded=n_blocks * per_block, n_slots=n_slots, n_shells=int(background.shape[1]),
        lengths=lengths, photons=counts[0], expected_background=counts[1], frame_weights=weights,
        truth=dataset.read_truth() if dataset.has_truth else None, plan=plan, stream=config.stream,
        kept_budget=bucket_length(max(lengths[0] // 16, 1024)),
    )


def _geometry(mesh: Mesh, detector: Detector, grid) -> Shared:
    replicate = functools.partial(jax.tree.map, lambda x: parallel.replicate(mesh, np.asarray(x)))
    return Shared(
        entries=None,
        polarization=replicate(detector.polarization.astype(np.float32)),
        shell=replicate(detector.shell.astype(np.int32)),
        log_prior=None,
        tables=replicate(grid.tables),
    )
