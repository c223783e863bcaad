"""Blocks of frames (host side, numpy): frame sources, rotation sets and the device arrays of a block.

A block is cut evenly over the devices of the mesh; every device's part is read (only the frames of this
process's devices), joined with the in-peak entries of its frames' candidate rotations (emcjax.join) and
padded to static lengths, then stacked into the :class:`~emcjax.core.arrays.BlockArrays` the pure core reads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh

from emcjax import model as model_lib
from emcjax import parallel
from emcjax.core.arrays import BlockArrays, PhotonArrays, Shared
from emcjax.data import SparseDataset, SparseFrames, bucket_length
from emcjax.detector import Detector
from emcjax.join import BACKGROUND_FLOOR, EntryIndex, build_join, pad_join, pixel_records
from emcjax.sampling_600cell import RotationSampling

class FrameSource:
    """Frames from a data set on disk, or frames already in memory. A streamed run re-reads its blocks at
    every E-step: the source reopens the file when the caller's handle was closed after set-up."""

    def __init__(self, dataset: SparseDataset, frames: SparseFrames | None):
        self.dataset = dataset
        self.frames = frames
        self.n_frames = dataset.n_frames if frames is None else frames.n_frames

    def read(self, start: int, stop: int) -> SparseFrames:
        stop = min(stop, self.n_frames)
        start = min(start, stop)
        if self.frames is not None:
            return self.frames.frame_slice(start, stop)
        if self.dataset.closed:
            self.dataset = SparseDataset(self.dataset.path)
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
    join, cell_offsets = build_join(frames, plan.detector, rotations.index, candidates, mask, raw)
    masked, background, weight, _, photons = frame_arrays(plan, frames, start, n_local)
    per_frame = (candidates.astype(np.int32), mask, masked, background, weight, cell_offsets.astype(np.int32))
    return per_frame, join, photons


def frame_arrays(plan, frames: SparseFrames, start: int, n_local: int):
    """Per-frame arrays of the frames [start, start + frames.n_frames) padded to ``n_local`` frames:
    (masked shells, background per shell, weight, pixel records, photon arrays). ``plan`` needs
    ``background``, ``weights``, ``detector`` and ``n_masked`` (a :class:`Plan` or the direct path's plan)."""
    n_real = frames.n_frames
    raw = plan.background[start : start + n_real]
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
        shell=plan.detector.shell[rec.pixel].astype(np.int32),
    )
    return masked, background, weight, rec, photons


def pad_photons(photons: PhotonArrays, length: int, n_local: int) -> PhotonArrays:
    """``photons`` padded to ``length`` records with zero-count, non-dead records of background 1 on the
    block's last local frame (``n_local - 1``), which add nothing to any sum."""
    pad = length - photons.frame.shape[0]
    fill = {"frame": n_local - 1, "count": 0.0, "dead": 0.0, "background": 1.0, "shell": 0}
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
        cell_offsets=stack([p[0][5] for p in parts]),
        masked_shells=stack([p[0][2] for p in parts]),
        background=stack([p[0][3] for p in parts]),
        weight=stack([p[0][4] for p in parts]),
        photons=parallel.stack_tree(plan.mesh, [pad_photons(p[2], lengths[1], block.n_local) for p in parts]),
    )
    return BlockData(arrays, rotations), lengths
