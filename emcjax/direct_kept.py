"""Kept pairs of the direct candidate path, handed to the M-steps (host side).

After each E-step of emcjax.direct every block yields its kept (frame, candidate) pairs and which of the
frame's records lie in a peak of each (the E-step's own photon-peak test). Two hand-offs:

* :func:`direct_kept` (the reference intensity update and the closed-form phi update): the touched entries,
  the distinct (kept rotation, pixel) of the kept records, numbered on the host; the M-steps of
  emcjax.core.direct_mstep build their stencils on the device and back-project every other in-peak entry's
  exposure from the reflections. No per-rotation entry table.
* :func:`kept_from_direct` (other intensity updates): the records numbered into the in-peak entries of the
  union of the kept rotations (``blocks.rotation_set``), the table path's own hand-off.

Padded lengths are powers of two (at least ``MIN_TERMS`` join pairs, ``MIN_PAIRS`` pairs, ``MIN_ROTATIONS``
rotations), so that the M-steps compile for a few shapes only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emcjax import parallel
from emcjax.blocks import RotationSet, rotation_set
from emcjax.core.arrays import Kept
from emcjax.core.direct_mstep import ROTATION_CHUNK, DirectKept

MIN_TERMS = 1 << 12
MIN_PAIRS = 1 << 8
MIN_ROTATIONS = 1 << 6


@dataclasses.dataclass(frozen=True)
class BlockPairs:
    """One block's kept pairs after its E-step (numpy).

    Attributes:
      frame: (m,) global frame; local_frame: (m,) the frame in the block; rotation: (m,) sampling index.
      prob: (m,) weight x P_dr; signal: (m,) S_dr at phi = 1 (the E-step's); quaternion: (m, 4) float32.
      inside: (m, n_records) whether each of the frame's records lies in a peak of the rotation.
      records: the block's padded records (emcjax.direct.DirectBlockData.records).
      masked: (m, n_masked) the frame's masked shells; background: (m, n_shells) its background per shell.
    """

    frame: np.ndarray
    local_frame: np.ndarray
    rotation: np.ndarray
    prob: np.ndarray
    signal: np.ndarray
    quaternion: np.ndarray
    inside: np.ndarray
    records: dict
    masked: np.ndarray
    background: np.ndarray


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(int(n) - 1, 0).bit_length())


def _columns(pairs: list[BlockPairs], union: np.ndarray, polarization: np.ndarray, with_background: bool):
    """Kept columns over all blocks (numpy, unpadded) and each join pair's union rotation and pixel."""
    columns = {f: [] for f in Kept._fields}
    rotation, pixels = [], []
    for p in pairs:
        u = np.searchsorted(union, p.rotation)
        pair, record = np.nonzero(p.inside & p.records["valid"][p.local_frame])
        row = p.local_frame[pair]
        pixel = p.records["pixel"][row, record].astype(np.int64)
        rotation.append(u[pair])
        pixels.append(pixel)
        columns["prob"].append(p.prob[pair])
        columns["count"].append(p.records["count"][row, record])
        columns["dead"].append(p.records["dead"][row, record])
        columns["background"].append(p.records["background"][row, record])
        columns["polarization"].append(polarization[pixel].astype(np.float32))
        columns["frame"].append(p.frame[pair].astype(np.int32))
        columns["pair_frame"].append(p.frame.astype(np.int32))
        columns["pair_rotation"].append(u.astype(np.int32))
        columns["pair_prob"].append(p.prob)
        columns["pair_masked"].append(p.masked)
        columns["pair_background"].append(p.background if with_background
                                          else np.zeros((p.prob.shape[0], 0), np.float32))
    columns = {k: np.concatenate(v) for k, v in columns.items() if v}
    return columns, np.concatenate(rotation), np.concatenate(pixels)


def _padded(columns: dict, n_terms: int, n_pairs: int, n_shells: int, mesh) -> Kept:
    out = []
    for field in Kept._fields:
        v = columns[field]
        length = n_pairs if field.startswith("pair_") else n_terms
        fill = {"background": 1.0, "polarization": 1.0, "pair_masked": n_shells}.get(field, 0)
        v = np.pad(v, [(0, length - v.shape[0])] + [(0, 0)] * (v.ndim - 1), constant_values=fill)
        out.append(parallel.stack(mesh, [v]) if mesh is not None else v)
    return Kept(*out)


def direct_kept(pairs: list[BlockPairs], polarization: np.ndarray, n_shells: int,
                with_background: bool) -> tuple[DirectKept, np.ndarray]:
    """The kept pairs with their touched entries (numpy, padded; ``entry`` numbers the touched entries) and the
    kept rotations' sampling indices (ascending; ``pair_rotation`` indexes them)."""
    union, first = np.unique(np.concatenate([p.rotation for p in pairs]), return_index=True)
    quaternion = np.concatenate([p.quaternion for p in pairs])[first]
    columns, rotation, pixel = _columns(pairs, union, polarization, with_background)
    n_pix = int(polarization.shape[0])
    touched, entry = np.unique(rotation * n_pix + pixel, return_inverse=True)
    columns["entry"] = entry.reshape(-1).astype(np.int32)
    n_terms = _pow2(rotation.shape[0], MIN_TERMS)
    n_pairs = _pow2(columns["pair_frame"].shape[0], MIN_PAIRS)
    n_union = _pow2(union.shape[0], max(MIN_ROTATIONS, ROTATION_CHUNK))
    kept = _padded(columns, n_terms, n_pairs, n_shells, None)
    pad = n_terms - touched.shape[0]
    return DirectKept(
        kept=kept,
        quaternions=np.concatenate([quaternion, np.repeat(quaternion[:1], n_union - union.shape[0], axis=0)]).astype(np.float32),
        touched_rotation=np.pad(touched // n_pix, (0, pad)).astype(np.int32),
        touched_pixel=np.pad(touched % n_pix, (0, pad)).astype(np.int32),
        touched=np.arange(n_terms) < touched.shape[0],
        pair_signal=np.pad(np.concatenate([p.signal for p in pairs]), (0, n_pairs - columns["pair_frame"].shape[0])).astype(np.float32),
    ), union


def kept_from_direct(problem, pairs: list[BlockPairs], with_background: bool) -> tuple[Kept, RotationSet]:
    """Kept pairs of every block numbered into the in-peak entries of the union of the kept rotations (stacked
    on ``problem.mesh``) and that union's rotation set."""
    plan = problem.direct_plan
    union = np.unique(np.concatenate([p.rotation for p in pairs]))
    union_set = rotation_set(problem.mesh, problem.grid, problem.detector, plan.sampling, plan.log_w, union, pad=True)
    columns, rotation, pixel = _columns(pairs, union, problem.detector.polarization, with_background)
    key = union_set.index.rotation * problem.detector.n_pix + union_set.index.pixel
    columns["entry"] = np.searchsorted(key, rotation * problem.detector.n_pix + pixel).astype(np.int32)
    n_terms = _pow2(rotation.shape[0], MIN_TERMS)
    n_pairs = _pow2(columns["pair_frame"].shape[0], MIN_PAIRS)
    return _padded(columns, n_terms, n_pairs, problem.n_shells, problem.mesh), union_set
