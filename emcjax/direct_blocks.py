"""The direct candidate path's planning (host side): what a run holds for every block of frames with
candidate lists — the plan (geometry, sampling, candidate lists, the cut geometry of the tabulated signal) and
each block's photon records (packed record rows on the device, padded per frame on the host) and candidate
quaternions — built once at set-up
(emcjax.direct.setup_direct); no in-peak entries. The E-step and the iteration are emcjax.direct's."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax.blocks import FrameSource, frame_arrays
from emcjax.core import cut_signal
from emcjax.core import direct as kernels
from emcjax.core import packed_photons
from emcjax.core.full_search import record_rows
from emcjax.core.arrays import BlockArrays, PhotonArrays
from emcjax.data import bucket_length
from emcjax.detector import Detector
from emcjax.join import BACKGROUND_FLOOR
from emcjax.rotations import crystal_from_lab, misorientation_angle


SIGNAL_CHUNK = 64  # rotations per call of the expected-signal kernel
SHARED_ENTRIES = 1 << 22  # most in-peak entries (estimated) of block 0's rotations that scale the initial model


@dataclasses.dataclass(frozen=True, eq=False)
class DirectPlan:
    """What building a block of the direct path needs (one device)."""

    source: FrameSource
    detector: Detector
    grid: model_lib.ReciprocalGrid
    sampling: object  # quaternions / log_weights indexable by sampling index
    log_w: object  # log prior (normalised), indexable by sampling index
    candidates: tuple[np.ndarray, np.ndarray]  # (offsets, sampling indices)
    n_slots: int
    n_masked: int
    n_records: int  # padded records per frame
    background: np.ndarray  # (n_frames, n_shells) float64, < 0 masked
    weights: np.ndarray  # (n_frames,) float32
    geometry: kernels.Geometry
    projection: tuple  # model.projection_setup
    signal: str = "exact"  # expected signal: "exact" (pixel sums) or "tabulated" (emcjax.core.cut_signal)
    cut: cut_signal.CutGeometry | None = None


@dataclasses.dataclass(eq=False)
class DirectBlockData:
    """A block of the direct path: device arrays (the photon records packed in rows only: ``arrays.records`` is
    None), the sampling index of each block rotation, and the host records padded per frame (for the kept
    pairs' entries)."""

    start: int
    n_local: int
    arrays: kernels.DirectBlock
    rotations: np.ndarray  # (n_rot,) int64 sampling index (padding repeats the last)
    records: dict  # numpy: pixel, count, dead, background, valid (n_local, n_records)
    n_near: int = 0  # tabulated signal: most reflections near the sphere at one candidate (padded, static)
    max_hits: int = 0  # most (row, candidate, record) in-peak triples of a chunk of record rows (packed_photons)
    _host: dict = dataclasses.field(default_factory=dict)

    def host(self, name: str) -> np.ndarray:
        """A numpy copy of ``arrays.quaternions`` or of a field of ``arrays.local``, made once."""
        if name not in self._host:
            value = self.arrays.quaternions if name == "quaternions" else getattr(self.arrays.local, name)
            self._host[name] = np.asarray(value)
        return self._host[name]

    def with_device_records(self) -> kernels.DirectBlock:
        """``arrays`` with ``records``: the host records padded per frame copied to the device, for the
        reference E-step (emcjax.core.direct.photon_terms; about n_local x n_records x 16 bytes), made on each
        call and not kept."""
        return self.arrays._replace(records=kernels.Records(*(jnp.asarray(self.records[k])
                                                              for k in kernels.Records._fields)))


def _records_per_frame(rec, n_local: int, n_records: int | None):
    """Pixel records padded per frame: dict of (n_local, n_records) numpy arrays and the longest frame."""
    order = np.argsort(rec.frame, kind="stable")
    frame = rec.frame[order]
    lengths = np.bincount(frame, minlength=n_local)
    longest = int(lengths.max(initial=0))
    n_records = bucket_length(max(longest, 1)) if n_records is None else n_records
    position = np.arange(frame.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out = {
        "pixel": np.zeros((n_local, n_records), np.int32),
        "count": np.zeros((n_local, n_records), np.float32),
        "dead": np.zeros((n_local, n_records), np.float32),
        "background": np.ones((n_local, n_records), np.float32),
        "valid": np.zeros((n_local, n_records), bool),
    }
    keep = position < n_records
    at = (frame[keep], position[keep])
    out["pixel"][at] = rec.pixel[order][keep]
    out["count"][at] = rec.count[order][keep]
    out["dead"][at] = rec.dead[order][keep]
    out["background"][at] = np.maximum(rec.background[order][keep], BACKGROUND_FLOOR)
    out["valid"][at] = True
    return out, longest


def build_direct_block(plan: DirectPlan, start: int, n_local: int) -> tuple[DirectBlockData, int]:
    """The block of frames [start, start + n_local): (block, most records of one of its frames)."""
    frames = plan.source.read(start, start + n_local)
    n_real = frames.n_frames
    offsets, rotation_ids = plan.candidates
    lists = [rotation_ids[offsets[start + i] : offsets[start + i + 1]] for i in range(n_real)]
    rotations = np.unique(np.concatenate(lists)) if lists else np.zeros(1, np.int64)
    n_rot = bucket_length(rotations.shape[0])
    candidates = np.zeros((n_local, plan.n_slots), np.int32)
    mask = np.zeros((n_local, plan.n_slots), bool)
    for i, c in enumerate(lists):
        candidates[i, : c.shape[0]] = np.searchsorted(rotations, c)
        mask[i, : c.shape[0]] = True
    masked, background, weight, rec, photons = frame_arrays(plan, frames, start, n_local)
    records, longest = _records_per_frame(rec, n_local, plan.n_records)
    padded = np.concatenate([rotations, np.full(n_rot - rotations.shape[0], rotations[-1])])
    prior = np.full(n_rot, -np.inf, np.float32)
    prior[: rotations.shape[0]] = plan.log_w[rotations]
    local = BlockArrays(
        frame_start=jnp.int32(start), candidates=jnp.asarray(candidates), candidate_mask=jnp.asarray(mask),
        join=None, cell_offsets=None, masked_shells=jnp.asarray(masked), background=jnp.asarray(background),
        weight=jnp.asarray(weight), photons=PhotonArrays(*(jnp.asarray(x) for x in photons)),
    )
    quaternions = np.asarray(plan.sampling.quaternions[padded], np.float64)
    reflections, n_near = None, 0
    if plan.signal == "tabulated":
        reflections, n_near = _frame_reflections(plan, quaternions, candidates, mask)
    rows, row_frame = record_rows(records, packed_photons.ROW_LENGTH)
    arrays = kernels.DirectBlock(
        local=local,
        quaternions=jnp.asarray(quaternions, jnp.float32),
        log_prior=jnp.asarray(prior),
        frame_reflections=reflections,
        rows=rows,
        row_frame=row_frame,
    )
    hits = packed_photons.hit_counts(plan.geometry, arrays.quaternions, local.candidates, rows, row_frame)
    max_hits = bucket_hits(int(np.max(np.asarray(hits))))
    return DirectBlockData(start, n_local, arrays, padded, records, n_near, max_hits), longest


def bucket_hits(n: int) -> int:
    """``n`` in-peak triples rounded up to a multiple of 4096 (few compiled shapes), with 1 % slack."""
    return max(4096, -(-int(n * 1.01 + 1) // 4096) * 4096)


def _frame_reflections(plan: DirectPlan, quaternions: np.ndarray, candidates: np.ndarray, mask: np.ndarray):
    """Tabulated signal: (n_local, h) reflections that can cut the sphere at any candidate of each frame,
    preselected around the candidates' mean rotation (the smallest reach), and the most of them near the
    sphere at one candidate (the ``k_max`` of cut_signal.near_frame_signal, a multiple of 32)."""
    quats = quaternions[candidates]  # (n_local, n_slots, 4)
    sign = np.where(np.sum(quats * quats[:, :1], axis=-1, keepdims=True) < 0, -1.0, 1.0)
    centre = np.sum(np.where(mask[..., None], sign * quats, 0.0), axis=1) + 1e-12 * quats[:, 0]
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    angle = np.where(mask, misorientation_angle(quats, centre[:, None, :]), 0.0)
    reach = jnp.asarray(angle.max(axis=1) * (1 + 1e-6) + 1e-6, jnp.float32)
    centre = jnp.asarray(centre, jnp.float32)
    proj = plan.projection[0]
    _, counts = cut_signal.frame_reflection_lists(centre, reach, proj, plan.cut, 32)
    h = model_lib.bucket_count(int(np.max(np.asarray(counts))))
    lists = cut_signal.frame_reflection_lists(centre, reach, proj, plan.cut, h)[0]
    near = np.asarray(cut_signal.near_counts(crystal_from_lab(jnp.asarray(quats, jnp.float32)), lists, proj))
    return lists, model_lib.bucket_count(int(np.where(mask, near, 0).max(initial=1)) + 8)  # slack: fused float32
