"""The EMC iteration on sparse frames, over all devices and hosts, in memory or streamed from disk.

One iteration (METHOD.md §6-7) is an E-step + intensity update, then (``update_phi``) an E-step + phi
update with the mean-1 normalisation. The kernels are pure (emcjax.estep, emcjax.mstep); this module owns
the orchestration:

* **Set-up** (:func:`setup_problem`): detector, model grid, rotations and their in-peak entries (on the
  device, once), and the frames cut into blocks of ``block_frames`` frames; each block is split evenly over
  the devices of the mesh (emcjax.parallel) and every device's part is joined with the in-peak entries of
  its frames' candidate rotations (emcjax.join). Each process reads only the frames of its own devices.
* **E-step** (:func:`estep`): the tomograms and expected signals of all rotations are computed once, then
  block by block and device by device (``jax.shard_map``) the log-likelihood of every (frame, candidate),
  the pruned responsibilities and the join pairs of the kept pairs. With ``stream`` a block's join is
  rebuilt from disk when needed, while the devices work on the previous block; per-frame state stays
  O(frames x kept rotations).
* **M-steps** (:func:`update_intensity`, :func:`update_phi`): on the kept pairs of every device, every sum
  over frames ending in a ``psum``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import math
import time
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from scipy.special import gammaln

from emcjax import model as model_lib
from emcjax import parallel
from emcjax.crystal import Crystal
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError
from emcjax.estep import BlockArrays, Responsibilities, Shared, block_log_likelihood, responsibilities, rotation_tables
from emcjax.join import BACKGROUND_FLOOR, EntryIndex, build_join, pad_join, pixel_records, ragged_ranges
from emcjax.mstep import Kept, mlem_update, phi_update, reference_update
from emcjax.rotations import RotationSampling, grid_symmetry_orbits, sample_600cell

_EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class EMCConfig:
    """Settings of the EMC algorithm (what the reference program read from config.ini)."""

    rotation_n: int = 4
    """600-cell refinement parameter n of the orientation sampling (10(5n^3+n) rotations); used when the data
    set carries no candidate lists."""
    reduce_by_symmetry: bool = True
    """Evaluate one rotation per orbit of the point-group operations that map the grid onto itself (exact:
    the same posterior, up to |H| x faster; 4x for 422 on the 600-cell)."""
    vn: int = 10
    """Voxel grid points per shortest reciprocal-lattice vector."""
    gw: float = 2.0
    """Peak support radius, in grid spacings (min|a*|/vn)."""
    d_min: float | None = None
    """High-resolution limit in Å (default: the data set's detector limit)."""
    intensity_update: Literal["mlem", "reference"] = "reference"
    """Intensity M-step: the reference's per-pixel ML + compress (default, see docs/METHOD-NOTES.md) or
    multiplicative EM on voxels."""
    inner_iterations: int = 1
    """MLEM sub-iterations per intensity M-step (no new E-step between them)."""
    update_phi: bool = True
    """Alternate (E-step, intensity update) with (E-step, phi update); False keeps phi fixed."""
    prune_mass: float = 0.999
    """Keep the most likely rotations of a frame until this much probability mass is covered."""
    prune_min: float = 1e-4
    """Drop rotations with a probability below this."""
    max_kept: int = 32
    """At most this many rotations are kept per frame (top-k)."""
    block_frames: int = 0
    """Frames per block of the E-step (0: all frames in one block); memory grows with the block, not the data."""
    stream: bool = False
    """Re-read and re-join each block from disk at every E-step (the next block is prepared while the devices
    work on the current one) instead of keeping every block's join in memory."""

    def __post_init__(self):
        if self.rotation_n < 1:
            raise ConfigError(f"rotation_n must be >= 1, got {self.rotation_n}")
        if self.inner_iterations < 1:
            raise ConfigError(f"inner_iterations must be >= 1, got {self.inner_iterations}")
        if not 0 < self.prune_mass <= 1:
            raise ConfigError(f"prune_mass must be in (0, 1], got {self.prune_mass}")
        if not 0 <= self.prune_min < 1:
            raise ConfigError(f"prune_min must be in [0, 1), got {self.prune_min}")
        if self.max_kept < 1:
            raise ConfigError(f"max_kept must be >= 1, got {self.max_kept}")
        if self.block_frames < 0:
            raise ConfigError(f"block_frames must be >= 0 (0: one block), got {self.block_frames}")
        if self.intensity_update not in ("mlem", "reference"):
            raise ConfigError(f"intensity_update must be 'mlem' or 'reference', got {self.intensity_update!r}")


class EMCState(NamedTuple):
    """What an iteration changes (a pytree; what a checkpoint holds).

    Attributes:
      iteration: () int32, iterations done.
      intensity: (n_asu, n_voxels) float32 model (photons per unit pol per unit phi).
      phi: (n_frames,) float32 per-frame scale, mean 1, 0 marks a blank frame.
    """

    iteration: jax.Array
    intensity: jax.Array
    phi: jax.Array


class _FrameSource:
    """Frames from a data set on disk, or frames already in memory."""

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
        """(n_frames, n_shells) float64 background of every frame."""
        if self.frames is not None:
            return np.asarray(self.frames.background, np.float64)
        return np.asarray(self.dataset.read_background(), np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class RotationSet:
    """Rotations evaluated together, with their in-peak entries.

    Attributes:
      rotations: (n_rot,) int64 sampling index of each rotation (ascending).
      entries: their in-peak entries (device, replicated).
      log_prior: (n_rot,) float32 log prior weight (device, replicated).
      index: host index of the entries by pixel.
    """

    rotations: np.ndarray
    entries: model_lib.Entries
    log_prior: jax.Array
    index: EntryIndex

    def shared(self, shared: Shared) -> Shared:
        """``shared`` with this set's entries and prior."""
        return shared._replace(entries=self.entries, log_prior=self.log_prior)


def _rotation_set(
    mesh: Mesh, grid, detector: Detector, sampling: RotationSampling, log_w: np.ndarray, rotations, *, pad: bool = False
) -> RotationSet:
    """In-peak entries of ``rotations`` (sampling indices), built on the device, and their prior.

    With ``pad`` the device arrays are padded to bucketed sizes (rotations with zero prior, entries with
    zero weight), so that the many sets of a run (one per block, one per M-step) share a few compiled shapes.
    """
    rotations = np.asarray(rotations, np.int64)
    entries = model_lib.build_entries_by_reflection(grid, detector, sampling.quaternions[rotations])
    index = EntryIndex.build(np.asarray(entries.pixel), np.asarray(entries.rotation), detector.n_pix, rotations.shape[0])
    prior = np.asarray(log_w[rotations], np.float32)
    arrays = {name: np.asarray(getattr(entries, name)) for name in ("rotation", "pixel", "voxels", "weights")}
    n_rot = rotations.shape[0]
    if pad:
        n_rot = bucket_length(n_rot)
        prior = np.concatenate([prior, np.full(n_rot - prior.shape[0], -np.inf, np.float32)])
        extra = bucket_length(entries.n_entries) - entries.n_entries
        sentinel = grid.n_asu * grid.n_voxels  # the zero voxel of the padded model
        fill = {"rotation": 0, "pixel": 0, "voxels": sentinel, "weights": 0.0}
        arrays = {
            k: np.concatenate([v, np.full((extra, *v.shape[1:]), fill[k], v.dtype)]) for k, v in arrays.items()
        }
    entries = model_lib.Entries(**{k: parallel.replicate(mesh, v) for k, v in arrays.items()}, n_rot=n_rot)
    return RotationSet(rotations, entries, parallel.replicate(mesh, prior), index)


@dataclasses.dataclass(eq=False)
class Block:
    """A block of frames, split evenly over the devices.

    Attributes:
      start: global index of the block's first frame; mesh position i holds frames
        [start + i * n_local, start + (i + 1) * n_local).
      n_local: frames per device.
      join_length: padded join length per device (the same on every device and process).
      rotations: (n,) int64 sampling indices of the block's own rotation set (the union of its frames'
        candidates), or None when every frame has all rotations of the problem's set.
      resident: the block's arrays while it is kept in memory (None while streaming).
    """

    start: int
    n_local: int
    join_length: int
    rotations: np.ndarray | None = None
    resident: "BlockData | None" = None


class BlockData(NamedTuple):
    """A block's device arrays and the host tables the kept-pair selection needs.

    Attributes:
      arrays: the stacked device arrays.
      cell_offsets: per local device, (n_local * n_slots + 1,) int32 CSR offsets of its join by cell.
      candidates: per local device, (n_local, n_slots) int32 candidate rotations (in ``rotation_set``).
      rotation_set: the rotations the candidates index.
    """

    arrays: BlockArrays
    cell_offsets: list[np.ndarray]
    candidates: list[np.ndarray]
    rotation_set: RotationSet


@dataclasses.dataclass(frozen=True, eq=False)
class _Inputs:
    """What building a device's part of a block needs."""

    source: _FrameSource
    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: RotationSampling
    log_w: np.ndarray  # (sampling.n_rot,) log prior of every rotation of the sampling (normalised)
    rotation_set: RotationSet | None  # the problem's set when frames have no candidate lists
    candidates: tuple[np.ndarray, np.ndarray] | None  # (offsets, sampling indices) or None: all of rotation_set
    n_slots: int
    background: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """Everything fixed during a run: geometry, rotations, blocks of frames and their joins.

    Attributes:
      detector: valid pixels (to ``d_min``).
      grid: the model grid.
      sampling: the orientation sampling rotation indices refer to.
      rotations: (n_rot,) int64 sampling index of each rotation of ``shared`` (all rotations evaluated, or
        block 0's set when frames carry candidate lists).
      mesh: the device mesh.
      shared: replicated device arrays.
      blocks: the blocks of frames.
      n_frames: number of frames; n_padded: n_frames rounded up to whole blocks.
      n_slots: candidate slots per frame.
      n_shells: radial shells of the background.
      log_offset: (n_frames,) float64 per-frame constant of the Poisson log-likelihood (nats).
      photons: (n_frames,) float64 photons per frame inside the valid pixels.
      expected_background: (n_frames,) float64 expected background photons per frame.
      truth: the data set's truth dict, or None.
      inputs: what rebuilding a block from its frames needs (streaming).
      stream: whether blocks are rebuilt at every E-step.
    """

    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: RotationSampling
    rotations: np.ndarray
    mesh: Mesh
    shared: Shared
    blocks: list[Block]
    n_frames: int
    n_padded: int
    n_slots: int
    n_shells: int
    log_offset: np.ndarray
    photons: np.ndarray
    expected_background: np.ndarray
    truth: dict | None
    inputs: _Inputs
    stream: bool

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
        """The block's arrays and host tables (rebuilt from the frames when streaming)."""
        return block.resident if block.resident is not None else _block_data(self.mesh, self.inputs, block)

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


# ---------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------


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


def _frame_constants(frames: SparseFrames, detector: Detector, background: np.ndarray):
    """Per-frame photons, expected background and log-likelihood constant (all float64)."""
    n_frames, n_shells = background.shape
    pol_per_shell = np.bincount(detector.shell, weights=detector.polarization, minlength=n_shells)
    bg = np.where(background >= 0, np.maximum(background, BACKGROUND_FLOOR), 0.0)
    rec = pixel_records(frames, detector, background)
    rec_bg = np.maximum(rec.background, BACKGROUND_FLOOR)
    pol = detector.polarization[rec.pixel]
    photons = np.bincount(rec.frame, weights=rec.count, minlength=n_frames)
    expected = bg @ pol_per_shell - np.bincount(rec.frame, weights=rec.dead * pol * rec_bg, minlength=n_frames)
    term = rec.count * np.log(pol * rec_bg) - gammaln(rec.count + 1)
    log_offset = np.bincount(rec.frame, weights=term, minlength=n_frames) - expected
    return photons, expected, log_offset


class _DevicePart(NamedTuple):
    candidates: np.ndarray
    mask: np.ndarray
    join: object
    cell_offsets: np.ndarray
    constants: tuple


def _device_part(inputs: _Inputs, rotation_set: RotationSet, start: int, n_local: int) -> _DevicePart:
    """Reads and joins the frames [start, start + n_local) of one device (fewer at the end of the data)."""
    frames = inputs.source.read(start, start + n_local)
    n_real = frames.n_frames
    candidates = np.zeros((n_local, inputs.n_slots), np.int64)
    mask = np.zeros((n_local, inputs.n_slots), bool)
    if inputs.candidates is None:
        candidates[:] = np.arange(inputs.n_slots)
        mask[:n_real] = True
    else:
        offsets, rotation_ids = inputs.candidates
        for i in range(n_real):
            c = np.searchsorted(rotation_set.rotations, rotation_ids[offsets[start + i] : offsets[start + i + 1]])
            candidates[i, : c.shape[0]] = c
            mask[i, : c.shape[0]] = True
    background = inputs.background[start : start + n_real]
    join, cell_offsets = build_join(frames, inputs.detector, rotation_set.index, candidates, mask, background)
    return _DevicePart(candidates, mask, join, cell_offsets, _frame_constants(frames, inputs.detector, background))


def _stack_block(mesh: Mesh, block: Block, parts: list[_DevicePart], rotation_set: RotationSet) -> BlockData:
    """Pads every device's join to the block's length and stacks the device parts."""
    n_cells = block.n_local * parts[0].candidates.shape[1]
    positions = parallel.local_positions(mesh)
    candidates = [p.candidates.astype(np.int32) for p in parts]
    arrays = BlockArrays(
        frame_start=parallel.stack(mesh, [np.int32(block.start + i * block.n_local) for i in positions]),
        candidates=parallel.stack(mesh, candidates),
        candidate_mask=parallel.stack(mesh, [p.mask for p in parts]),
        join=parallel.stack_tree(mesh, [pad_join(p.join, block.join_length, n_cells) for p in parts]),
    )
    return BlockData(arrays, [p.cell_offsets.astype(np.int32) for p in parts], candidates, rotation_set)


def _block_rotation_set(mesh: Mesh, inputs: _Inputs, block: Block) -> RotationSet:
    if block.rotations is None:
        return inputs.rotation_set
    return _rotation_set(mesh, inputs.grid, inputs.detector, inputs.sampling, inputs.log_w, block.rotations, pad=True)


def _block_parts(mesh: Mesh, inputs: _Inputs, block: Block) -> tuple[list[_DevicePart], RotationSet]:
    rotation_set = _block_rotation_set(mesh, inputs, block)
    positions = parallel.local_positions(mesh)
    parts = [_device_part(inputs, rotation_set, block.start + i * block.n_local, block.n_local) for i in positions]
    return parts, rotation_set


def _block_data(mesh: Mesh, inputs: _Inputs, block: Block) -> BlockData:
    parts, rotation_set = _block_parts(mesh, inputs, block)
    return _stack_block(mesh, block, parts, rotation_set)


def setup_problem(
    dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None = None, *, mesh: Mesh | None = None
) -> Problem:
    """One-time set-up: detector, grid, rotations, in-peak entries, blocks and their joins.

    Args:
      dataset: the data set (geometry, crystal, truth and, unless ``frames`` is given, the frames).
      config: algorithm settings (``block_frames``, ``stream``).
      frames: frames to use instead of those of ``dataset``.
      mesh: devices to use (default: every device of every process).

    Raises:
      ConfigError: settings that contradict the data (e.g. ``d_min`` beyond the detector).
      DataError: no frame.
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    source = _FrameSource(dataset, frames)
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
    q_min = float(np.linalg.norm(detector.q, axis=1).min())
    grid = model_lib.make_grid(crystal, d_min=d_min, d_max=1.0 / max(q_min, 1e-9), vn=config.vn, gw=config.gw)

    candidates = source.candidates()
    if candidates is not None:
        # Candidate lists (e.g. from spot matching): each block evaluates the union of its frames' lists.
        sampling, _, log_w = _sampling(crystal, int(dataset.candidate_sampling_n), reduce=False)
        offsets, rotation_ids = candidates
        n_slots = max(int(np.diff(offsets).max()), 1)
        candidates = (np.asarray(offsets, np.int64), np.asarray(rotation_ids, np.int64))
        rotation_set = None
    else:
        sampling, rotations, log_w_set = _sampling(crystal, config.rotation_n, config.reduce_by_symmetry)
        log_w = np.full(sampling.n_rot, -np.inf)
        log_w[rotations] = log_w_set
        n_slots = int(rotations.shape[0])
    log_w = log_w - np.logaddexp.reduce(log_w[np.isfinite(log_w)])
    if candidates is None:
        rotation_set = _rotation_set(mesh, grid, detector, sampling, log_w, rotations)

    n_dev = mesh.size
    per_block = n_frames if config.block_frames == 0 else min(config.block_frames, n_frames)
    n_local = math.ceil(per_block / n_dev)
    per_block = n_local * n_dev
    n_blocks = math.ceil(n_frames / per_block)
    n_padded = n_blocks * per_block

    background = source.background()
    masked = [np.flatnonzero(row < 0) for row in background]
    masked_shells = np.full((n_padded, max((m.shape[0] for m in masked), default=0)), background.shape[1], np.int32)
    for d, m in enumerate(masked):
        masked_shells[d, : m.shape[0]] = m
    inputs = _Inputs(source, detector, grid, sampling, log_w, rotation_set, candidates, n_slots, background)
    constants = np.zeros((3, n_padded))  # photons, expected background, log-likelihood constant
    positions = parallel.local_positions(mesh)
    blocks = []
    for b in range(n_blocks):
        start = b * per_block
        block = Block(start, n_local, 0)
        if candidates is not None:
            stop = min(start + per_block, n_frames)
            block.rotations = np.unique(candidates[1][candidates[0][start] : candidates[0][stop]])
        parts, block_set = _block_parts(mesh, inputs, block)
        for i, part in zip(positions, parts):
            first = start + i * n_local
            for row, values in enumerate(part.constants):
                constants[row, first : first + values.shape[0]] = values
        block.join_length = parallel.global_max(bucket_length(max(max(p.join.cell.shape[0] for p in parts), 1)))
        if not config.stream:
            block.resident = _stack_block(mesh, block, parts, block_set)
        blocks.append(block)
    photons, expected_bg, log_offset = (
        parallel.gather_frames(mesh, [row], [0], n_padded)[:n_frames] for row in constants
    )
    first_set = rotation_set if rotation_set is not None else _block_rotation_set(mesh, inputs, blocks[0])
    replicate = functools.partial(jax.tree.map, lambda x: parallel.replicate(mesh, np.asarray(x)))
    shared = first_set.shared(  # the set's entries and prior are on the devices already
        Shared(
            entries=None,
            polarization=replicate(detector.polarization.astype(np.float32)),
            shell=replicate(detector.shell.astype(np.int32)),
            log_prior=None,
            tables=replicate(grid.tables),
            masked_shells=replicate(masked_shells),
            frame_valid=replicate(np.arange(n_padded) < n_frames),
        )
    )
    return Problem(
        detector=detector,
        grid=grid,
        sampling=sampling,
        rotations=first_set.rotations,
        mesh=mesh,
        shared=shared,
        blocks=blocks,
        n_frames=n_frames,
        n_padded=n_padded,
        n_slots=n_slots,
        n_shells=int(background.shape[1]),
        log_offset=log_offset,
        photons=photons,
        expected_background=expected_bg,
        truth=dataset.read_truth() if dataset.has_truth else None,
        inputs=inputs,
        stream=config.stream,
    )


def initial_state(problem: Problem, config: EMCConfig, seed: int) -> EMCState:
    """Random symmetric model (U(0,1) x exp(-r^2/gw^2) per voxel, the reference's start) and phi from counts.

    The model is scaled so that a frame at phi = 1 expects the mean number of non-background photons (over
    the prior of the rotations), and phi_d is proportional to the frame's photons above its expected
    background (mean 1).
    """
    rng = np.random.default_rng(seed)
    grid = problem.grid
    spacing = np.linalg.norm(grid.crystal.reciprocal_basis, axis=0).min() / config.vn
    r2 = np.einsum("ij,ij->i", grid.voxel_q(), grid.voxel_q()) / spacing**2
    intensity = rng.uniform(size=grid.model_shape) * np.exp(-r2 / config.gw**2)[None, :]
    intensity = np.asarray(model_lib.symmetrize(jnp.asarray(intensity, jnp.float32), grid.tables), np.float64)
    signal = problem.photons - problem.expected_background
    target = max(float(signal.mean()), 1e-3)
    total = np.asarray(rotation_tables(jnp.asarray(intensity, jnp.float32), problem.shared, problem.n_shells).total)
    intensity *= target / max(float(np.exp(np.asarray(problem.shared.log_prior, np.float64)) @ total), _EPS)
    phi = np.maximum(signal, 0.1 * target) / target
    phi /= phi.mean()
    return EMCState(
        iteration=parallel.replicate(problem.mesh, np.int32(0)),
        intensity=parallel.replicate(problem.mesh, intensity.astype(np.float32)),
        phi=parallel.replicate(problem.mesh, phi.astype(np.float32)),
    )


# ---------------------------------------------------------------------------------------------------------
# E-step over blocks and devices
# ---------------------------------------------------------------------------------------------------------


def padded_phi(problem: Problem, phi: jax.Array) -> jax.Array:
    """(n_padded,) phi with zeros for the frames that fill the last block."""
    return jnp.pad(phi, (0, problem.n_padded - problem.n_frames))


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _expand(tree):
    return jax.tree.map(lambda x: x[None], tree)


@functools.lru_cache(maxsize=None)
def _estep_kernel(mesh: Mesh, k: int, prune_mass: float, prune_min: float):
    def local(tables, phi, shared, block):
        logl = block_log_likelihood(tables, phi, shared, _squeeze(block))
        return _expand(responsibilities(logl, k, prune_mass, prune_min))

    specs = (P(), P(), P(), P(parallel.AXIS))
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(parallel.AXIS)))


@functools.lru_cache(maxsize=None)
def _gather_kernel(mesh: Mesh):
    def local(block, index, prob):
        block, index, prob = _squeeze(block), index[0], prob[0]
        join = block.join
        frame = block.frame_start + join.cell[index] // block.candidates.shape[1]
        fields = (join.entry, join.count, join.dead, join.background, join.polarization)
        entry, count, dead, background, polarization = (f[index] for f in fields)
        return _expand((entry, prob, count, dead, background, polarization, frame))

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS)))


class EStep(NamedTuple):
    """Result of an E-step.

    Attributes:
      kept: the kept join pairs and (frame, rotation) pairs, stacked over devices; entries and rotations
        index ``rotation_set``.
      rotation_set: the rotations (and in-peak entries) of the M-steps: the problem's set, or the union of
        the kept rotations when frames carry candidate lists.
      log_evidence: (n_frames,) float64 log sum_r w_r p(K_d | r) up to the frame constant (nats).
      max_prob: (n_frames,) float64 probability of the most likely rotation.
      best_rotation: (n_frames,) int64 sampling index of the most likely rotation.
      n_kept: (n_frames,) int64 rotations kept.
    """

    kept: Kept
    rotation_set: RotationSet
    log_evidence: np.ndarray
    max_prob: np.ndarray
    best_rotation: np.ndarray
    n_kept: np.ndarray


class _HostKept(NamedTuple):
    """Kept pairs of one device on the host: the fields of :class:`Kept` (pair rotations as sampling
    indices), plus, when the block had its own rotation set, each join pair's sampling rotation and pixel
    (``entry`` is then -1 until :func:`_assemble_kept` knows the M-step set; else the two are empty)."""

    entry: np.ndarray
    prob: np.ndarray
    count: np.ndarray
    dead: np.ndarray
    background: np.ndarray
    polarization: np.ndarray
    frame: np.ndarray
    pair_frame: np.ndarray
    pair_rotation: np.ndarray
    pair_prob: np.ndarray
    rotation: np.ndarray
    pixel: np.ndarray


def _kept_of_block(problem: Problem, block: Block, data: BlockData, resp: Responsibilities) -> list[_HostKept]:
    """Host-side selection of the kept pairs of one block, a device gather of their join pairs, back to host."""
    mesh = problem.mesh
    slots, probs = parallel.local_pieces(resp.slot), parallel.local_pieces(resp.prob)
    index, term_prob, pairs = [], [], []
    for i, slot, prob, offsets, cand in zip(
        parallel.local_positions(mesh), slots, probs, data.cell_offsets, data.candidates
    ):
        n_local, k = slot.shape
        frame = np.repeat(np.arange(n_local), k)
        cell = frame * problem.n_slots + slot.ravel()
        p = prob.ravel()
        live = p > 0
        start = offsets[cell[live]]
        idx, owner = ragged_ranges(start, offsets[cell[live] + 1] - start)
        index.append(idx)
        term_prob.append(p[live][owner])
        rotation = data.rotation_set.rotations[cand[frame[live], slot.ravel()[live]]]
        pairs.append(((block.start + i * n_local + frame[live]).astype(np.int32), rotation, p[live].astype(np.float32)))
    length = parallel.global_max(bucket_length(max(max(x.shape[0] for x in index), 1)))
    n_terms = [x.shape[0] for x in index]
    index = parallel.stack(mesh, [np.pad(x, (0, length - x.shape[0])).astype(np.int32) for x in index])
    term_prob = parallel.stack(mesh, [np.pad(x, (0, length - x.shape[0])).astype(np.float32) for x in term_prob])
    gathered = [parallel.local_pieces(x) for x in _gather_kernel(mesh)(data.arrays, index, term_prob)]
    out = []
    for j, (n, pair) in enumerate(zip(n_terms, pairs)):
        entry, prob, count, dead, background, polarization, frame = (g[j][:n] for g in gathered)
        ent = data.rotation_set.index
        if data.rotation_set is problem.inputs.rotation_set:  # entries already index the M-step set
            rotation = pixel = np.zeros(0, np.int32)
            entry = np.array(entry)
        else:
            rotation = data.rotation_set.rotations[ent.rotation[entry]].astype(np.int32)
            pixel = ent.pixel[entry].astype(np.int32)
            entry = np.full(entry.shape, -1, np.int32)
        out.append(
            _HostKept(
                entry,
                *(np.array(x) for x in (prob, count, dead, background, polarization, frame)),  # own, compact copies
                pair[0], pair[1].astype(np.int32), pair[2],
                rotation, pixel,
            )
        )
    return out


def _assemble_kept(problem: Problem, per_device: list[list[_HostKept]]) -> tuple[Kept, RotationSet]:
    """Concatenates every block's kept pairs per device and indexes them into the M-step rotation set."""
    merged = [_HostKept(*(np.concatenate(parts) for parts in zip(*blocks))) for blocks in per_device]
    per_device.clear()  # the per-block pieces are merged: free them before the columns are built
    rotation_set = problem.inputs.rotation_set
    if rotation_set is None:  # candidate lists: the union of the rotations kept anywhere
        kept_rotations = parallel.global_union(np.unique(np.concatenate([m.pair_rotation for m in merged])))
        inputs = problem.inputs
        rotation_set = _rotation_set(
            problem.mesh, inputs.grid, inputs.detector, inputs.sampling, inputs.log_w, kept_rotations, pad=True
        )
        # (sampling rotation, pixel) of each join pair -> entry of the M-step set (sorted by rotation, pixel)
        n_pix = problem.detector.n_pix
        entry_key = rotation_set.index.rotation * n_pix + rotation_set.index.pixel
        for i, m in enumerate(merged):
            local_rotation = np.searchsorted(rotation_set.rotations, m.rotation).astype(np.int64)
            merged[i] = m._replace(entry=np.searchsorted(entry_key, local_rotation * n_pix + m.pixel).astype(np.int32))
    merged = [m._replace(pair_rotation=np.searchsorted(rotation_set.rotations, m.pair_rotation)) for m in merged]
    n_terms = parallel.global_max(bucket_length(max(max(m.entry.shape[0] for m in merged), 1)))
    n_pairs = parallel.global_max(bucket_length(max(max(m.pair_rotation.shape[0] for m in merged), 1)))
    columns = []
    for field in Kept._fields:  # one field at a time, so only one padded copy is alive
        length = n_pairs if field.startswith("pair_") else n_terms
        dtype = np.int32 if field in ("entry", "frame", "pair_frame", "pair_rotation") else np.float32
        fill = 1.0 if field == "background" else 0  # padding contributes nothing and divides by nothing
        pieces = [getattr(m, field).astype(dtype, copy=False) for m in merged]
        columns.append(parallel.stack(
            problem.mesh, [np.pad(v, (0, length - v.shape[0]), constant_values=fill) for v in pieces]
        ))
    return Kept(*columns), rotation_set


def _blocks_with_data(problem: Problem):
    """Yields (block, data); while streaming, the next block is built while the caller uses this one."""
    if not problem.stream:
        for block in problem.blocks:
            yield block, block.resident
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        build = functools.partial(_block_data, problem.mesh, problem.inputs)
        pending = executor.submit(build, problem.blocks[0])
        for b, block in enumerate(problem.blocks):
            data = pending.result()
            if b + 1 < len(problem.blocks):
                pending = executor.submit(build, problem.blocks[b + 1])
            yield block, data
            del data
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Returns freed heap memory to the system (glibc keeps it per thread arena otherwise: streamed blocks
    built in a worker thread would leave the process holding several blocks' worth). A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def estep(problem: Problem, state: EMCState, config: EMCConfig) -> EStep:
    """E-step over every block and device: responsibilities, kept pairs and per-frame summaries.

    The tomograms and expected signals are computed once per rotation set: once per E-step for the
    problem's set, once per block when each block has its own candidate rotations.
    """
    kernel = _estep_kernel(problem.mesh, config.max_kept, config.prune_mass, config.prune_min)
    positions = parallel.local_positions(problem.mesh)
    phi = padded_phi(problem, state.phi)
    per_device: list[list[_HostKept]] = [[] for _ in positions]
    per_frame = np.zeros((4, problem.n_padded))  # log evidence, max prob, best rotation, kept count
    current_set, tables = None, None
    for block, data in _blocks_with_data(problem):
        shared = data.rotation_set.shared(problem.shared)
        if data.rotation_set is not current_set:
            current_set, tables = data.rotation_set, rotation_tables(state.intensity, shared, problem.n_shells)
        resp = kernel(tables, phi, shared, data.arrays)
        for i, host in enumerate(_kept_of_block(problem, block, data, resp)):
            per_device[i].append(host)
        slots = parallel.local_pieces(resp.slot)
        rows = (
            parallel.local_pieces(resp.log_evidence),
            parallel.local_pieces(resp.max_prob),
            [data.rotation_set.rotations[c[np.arange(c.shape[0]), s[:, 0]]] for c, s in zip(data.candidates, slots)],
            [np.sum(p > 0, axis=1) for p in parallel.local_pieces(resp.prob)],
        )
        for row, values in enumerate(rows):
            for i, v in zip(positions, values):
                first = block.start + i * block.n_local
                per_frame[row, first : first + v.shape[0]] = v
    per_frame = parallel.gather_frames(problem.mesh, [per_frame.T], [0], problem.n_padded).T
    kept, rotation_set = _assemble_kept(problem, per_device)
    n = problem.n_frames
    return EStep(
        kept=kept,
        rotation_set=rotation_set,
        log_evidence=per_frame[0, :n],
        max_prob=per_frame[1, :n],
        best_rotation=per_frame[2, :n].astype(np.int64),
        n_kept=per_frame[3, :n].astype(np.int64),
    )


def total_log_likelihood(problem: Problem, result: EStep) -> float:
    """Marginal Poisson log-likelihood of all frames (nats): sum_d log sum_r w_r p(K_d | r)."""
    ok = np.isfinite(result.log_evidence)
    return float(np.sum(result.log_evidence[ok] + problem.log_offset[ok]))


# ---------------------------------------------------------------------------------------------------------
# M-steps over devices
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mstep_kernel(mesh: Mesh, rule: str, n_shells: int, inner_iterations: int):
    def local(intensity, phi, kept, shared):
        kept = _squeeze(kept)
        if rule == "reference":
            return reference_update(intensity, phi, kept, shared, n_shells, axis=parallel.AXIS)
        if rule == "mlem":
            return mlem_update(intensity, phi, kept, shared, n_shells, inner_iterations, axis=parallel.AXIS)
        return phi_update(intensity, phi, kept, shared, n_shells, axis=parallel.AXIS)

    specs = (P(), P(), P(parallel.AXIS), P())
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))


def update_intensity(problem: Problem, state: EMCState, result: EStep, config: EMCConfig) -> jax.Array:
    """Intensity M-step with the configured rule, on the kept pairs of an E-step."""
    kernel = _mstep_kernel(problem.mesh, config.intensity_update, problem.n_shells, config.inner_iterations)
    shared = result.rotation_set.shared(problem.shared)
    return kernel(state.intensity, padded_phi(problem, state.phi), result.kept, shared)


def update_phi(problem: Problem, state: EMCState, result: EStep) -> tuple[jax.Array, jax.Array]:
    """phi M-step followed by the mean-1 normalisation with the inverse factor on the model."""
    kernel = _mstep_kernel(problem.mesh, "phi", problem.n_shells, 1)
    shared = result.rotation_set.shared(problem.shared)
    phi = kernel(state.intensity, padded_phi(problem, state.phi), result.kept, shared)[: problem.n_frames]
    mean = jnp.maximum(jnp.mean(phi), _EPS)
    return state.intensity * mean, phi / mean


# ---------------------------------------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------------------------------------


def iterate(problem: Problem, state: EMCState, config: EMCConfig) -> tuple[EMCState, dict, dict]:
    """One EMC iteration: E-step + intensity update, then (if ``update_phi``) E-step + phi update.

    Returns:
      ``(state, metrics, per_frame)``: the new state; python floats ``log_likelihood`` (of the first E-step,
      nats), ``model_change`` (relative L2), ``phi_mean``, ``phi_std``, ``phi_zero_fraction``, ``certainty``
      (mean most-likely probability), ``kept_mean`` (rotations kept per frame), ``cc_true`` (when the data
      have truth), ``seconds``; and per-frame numpy arrays ``best_rotation`` (index into the sampling) and
      ``best_probability``.
    """
    start = time.perf_counter()
    result = estep(problem, state, config)
    logl = total_log_likelihood(problem, result)
    intensity = update_intensity(problem, state, result, config)
    phi = state.phi
    if config.update_phi:
        mid = state._replace(intensity=intensity)
        result = estep(problem, mid, config)
        intensity, phi = update_phi(problem, mid, result)
    new = EMCState(iteration=state.iteration + 1, intensity=intensity, phi=phi)
    old = np.asarray(state.intensity, np.float64)
    new_i = np.asarray(intensity, np.float64)
    phi_np = np.asarray(phi, np.float64)
    metrics = {
        "log_likelihood": logl,
        "model_change": float(np.linalg.norm(new_i - old) / max(np.linalg.norm(old), _EPS)),
        "phi_mean": float(phi_np.mean()),
        "phi_std": float(phi_np.std()),
        "phi_zero_fraction": float(np.mean(phi_np <= 1e-10)),
        "certainty": float(np.mean(result.max_prob)),
        "kept_mean": float(np.mean(result.n_kept)),
    }
    cc = problem.cc_true(intensity)
    if cc is not None:
        metrics["cc_true"] = cc
    metrics["seconds"] = time.perf_counter() - start
    per_frame = {
        "best_rotation": result.best_rotation.astype(np.int64),
        "best_probability": result.max_prob.astype(np.float32),
    }
    return new, metrics, per_frame
