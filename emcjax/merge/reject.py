"""Which frames to trust after a reconstruction: per-frame tests and the weights that drop the others.

Reasons (bits of the ``flags`` array; a frame may have several):

* ``phi_zero`` (1): the scale phi went to (nearly) 0: phi <= ``phi_min`` times the median phi (no Bragg
  signal; the reference's phi = 0 rule, relative because the phi update leaves a blank frame a small phi
  from background photons that fall into peaks by chance).
* ``undetermined`` (2): the orientation is not clearly determined: the posterior mass within
  ``cluster_angle`` of the most likely rotation, or of any of its symmetry mates, is below ``min_certainty``.
* ``two_orientations`` (4): besides that cluster, a second cluster of orientations that no rotation of the
  Laue group maps onto the first holds at least ``second_probability`` (the reference's "multiple crystals"
  test, P >= 0.05, here modulo the Laue group of any space group).
* ``unexplained_photons`` (8): more photons fall outside the peaks the most likely orientation predicts
  than the background there explains: the robust z-score (median and MAD over the frames no test flags,
  iterated until the flagged set is stable) of
  (observed - expected) / sqrt(expected) exceeds ``max_unexplained_z``. A second crystal puts most of its
  photons there, so this catches two-crystal frames whose posterior is (as usual with ~10^2 photons) sharp
  on one of the two crystals, where the posterior test sees nothing.
* ``no_crystal`` (16): the log Bayes factor of "a crystal of scale ``evidence_scale`` x median phi in one of
  the run's orientations (uniform prior; its lower bound from the most likely one)" against "background
  only" is below ``min_crystal_evidence``
  (emcjax.merge.evidence). Unlike phi_zero it needs no threshold on phi, whose spread grows as photons get
  fewer (at 40 Bragg over 100 background photons a blank frame's phi reached 0.16 x the median).
* ``second_crystal`` (32): the log Bayes factor of a second crystal of that scale in a sampled orientation
  (of the ``evidence_rotation_n`` sampling) unrelated to the first (farther from it, modulo the Laue group,
  than ``cluster_angle`` spacings of the coarser of the run's and the scan's sampling; the first crystal's
  predicted photons explained) against none exceeds
  ``max_second_evidence``. With a sharp posterior the second crystal's photons hardly change the first
  cluster's mass, and those outside the peaks drown in the background at ~40 Bragg photons per frame, but
  they fall on the second orientation's peaks. A frame it would flag is tested again with the first
  crystal's orientation refined off the grid (``evidence_refine_step``): with continuous orientations the
  grid rotation's peaks miss some of the crystal's own photons, which another orientation then explains.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import numpy as np

from emcjax.rotations import symmetric_misorientation

MAX_CLIPPING_PASSES = 20
"""Passes of the unexplained-photon test, each with the reference frames of the last pass less those it flagged."""
REASONS = {"phi_zero": 1, "undetermined": 2, "two_orientations": 4, "unexplained_photons": 8, "no_crystal": 16,
           "second_crystal": 32}
"""Reason name -> bit of the flags array."""
Reason = Literal["phi_zero", "undetermined", "two_orientations", "unexplained_photons", "no_crystal", "second_crystal"]
"""A reason's name (a key of REASONS), for the ``drop`` settings of emcjax.reject and the pipeline."""
assert set(typing.get_args(Reason)) == set(REASONS)


@dataclasses.dataclass(frozen=True)
class RejectionCriteria:
    """Thresholds of the frame tests."""

    phi_min: float = 0.05
    """Frames with phi <= this fraction of the median phi (of the frames tested) are rejected (phi_zero)."""
    min_certainty: float = 0.5
    """Posterior mass the most likely orientation's cluster must hold (undetermined below)."""
    second_probability: float = 0.05
    """Posterior mass of a second, symmetry-unrelated cluster that marks two orientations."""
    cluster_angle: float = 1.5
    """Radius of an orientation cluster, in units of the sampling's covering radius 0.944/n rad."""
    max_unexplained_z: float = 6.0
    """Robust z-score of the photons outside the predicted peaks above which a frame is rejected."""
    evidence_scale: float = 1.0
    """Scale of the crystal the evidence tests look for, in units of the median phi of the frames tested."""
    evidence_rotation_n: int = 4
    """600-cell parameter of the rotations searched for a second crystal (0: the run's sampling; cost grows
    as n^3: 810 rotations at n = 4 in P 43 21 2). A second crystal between them is found only when its peaks
    still overlap theirs."""
    evidence_refine_step: float = 0.5
    """Step of the local search that refines the first crystal's orientation off the grid (emcjax.merge.evidence.
    refine_first: 26 rotations around the most likely one), in units of the run's covering radius 0.944/n,
    for the frames the second-crystal test flags with the grid rotation, which are tested again with it;
    0: no search (the grid rotation only)."""
    min_crystal_evidence: float = 0.0
    """log Bayes factor (nats) of a crystal against background only below which a frame is rejected
    (no_crystal; 0: the background alone explains the photons better)."""
    max_second_evidence: float = 0.0
    """log Bayes factor (nats) of a second crystal against none above which a frame is rejected
    (second_crystal; 0: a second crystal explains the photons better)."""


def per_frame_pairs(kept_frame, kept_rotation, kept_prob, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept (frame, rotation, probability) pairs as padded (n_frames, k) arrays sorted by falling probability
    (rotation -1 and probability 0 pad)."""
    frame = np.asarray(kept_frame, np.int64)
    prob = np.asarray(kept_prob, np.float64)
    order = np.lexsort((-prob, frame))
    frame, rotation, prob = frame[order], np.asarray(kept_rotation, np.int64)[order], prob[order]
    counts = np.bincount(frame, minlength=n_frames)
    k = max(int(counts.max()) if counts.size else 0, 1)
    slot = np.arange(frame.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    rotations = np.full((n_frames, k), -1, np.int64)
    probs = np.zeros((n_frames, k))
    rotations[frame, slot] = rotation
    probs[frame, slot] = prob
    return rotations, probs


def cluster_masses(
    rotations, probs, quaternions, rotation_ops, radius: float, *, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mass of the two leading orientation clusters of every frame.

    The first cluster holds the kept rotations within ``radius`` (rad, modulo the Laue group) of the most
    likely one; the second those within ``radius`` of the most likely rotation outside the first.

    Args:
      rotations: (n_frames, k) sampling indices, -1 for padding, sorted by falling probability.
      probs: (n_frames, k) their posterior probabilities.
      quaternions: (n_rot, 4) the sampling's quaternions.
      rotation_ops: (n_ops, 3, 3) proper rotations of the Laue group (crystal frame).
      radius: cluster radius in radians.

    Returns:
      ``(first, second)``: (n_frames,) masses (second is 0 when every kept rotation is in the first).
    """
    rotations = np.asarray(rotations)
    probs = np.asarray(probs, np.float64)
    first = np.zeros(rotations.shape[0])
    second = np.zeros(rotations.shape[0])
    for a in range(0, rotations.shape[0], chunk):
        rot, p = rotations[a : a + chunk], probs[a : a + chunk]
        live = rot >= 0
        q = np.asarray(quaternions, np.float64)[np.maximum(rot, 0)]  # (c, k, 4)
        near_first = (symmetric_misorientation(q[:, :1], q, rotation_ops) <= radius) & live
        rest = live & ~near_first
        seed = np.argmax(rest, axis=1)  # most likely rotation outside the first cluster (sorted order)
        q_seed = np.take_along_axis(q, seed[:, None, None], axis=1)
        near_second = (symmetric_misorientation(q_seed, q, rotation_ops) <= radius) & rest
        first[a : a + chunk] = np.sum(p * near_first, axis=1)
        second[a : a + chunk] = np.sum(p * near_second, axis=1)
    return first, second


def robust_z(values, reference) -> np.ndarray:
    """(values - median) / (1.4826 MAD), median and MAD over ``reference`` (a sub-array of values)."""
    reference = np.asarray(reference, np.float64)
    median = float(np.median(reference)) if reference.size else 0.0
    mad = 1.4826 * float(np.median(np.abs(reference - median))) if reference.size else 1.0
    return (np.asarray(values, np.float64) - median) / max(mad, 1e-12)


def frame_flags(
    phi,
    first_mass,
    second_mass,
    unexplained,
    criteria: RejectionCriteria,
    evidence=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Flags (bitmask of REASONS) of every frame and the unexplained-photon z-scores.

    Args:
      phi: (n,) per-frame scale (NaN: frame not tested).
      first_mass, second_mass: (n,) masses of the two leading orientation clusters (second NaN: not known).
      unexplained: ``(observed, expected)`` photons outside the predicted peaks (NaN: frame not tested), or
        None to skip that test. The z-scores are relative to the frames no other test flags.
      criteria: thresholds.
      evidence: ``(crystal, second)`` (n,) log Bayes factors (nats, NaN: frame not tested) of
        emcjax.merge.evidence, or None to skip those tests.

    Returns:
      ``(flags, z)``: (n,) uint8 and (n,) float64 (NaN when the test was skipped).
    """
    phi = np.asarray(phi, np.float64)
    flags = np.zeros(phi.shape[0], np.uint8)
    with np.errstate(invalid="ignore"):
        flags[phi <= criteria.phi_min * max(float(np.nanmedian(phi)), 0.0)] |= REASONS["phi_zero"]
        flags[np.asarray(first_mass) < criteria.min_certainty] |= REASONS["undetermined"]
    second = np.nan_to_num(np.asarray(second_mass, np.float64), nan=0.0)
    flags[second >= criteria.second_probability] |= REASONS["two_orientations"]
    if evidence is not None:
        crystal, second_crystal = (np.asarray(x, np.float64) for x in evidence)
        with np.errstate(invalid="ignore"):
            flags[crystal < criteria.min_crystal_evidence] |= REASONS["no_crystal"]
            flags[second_crystal > criteria.max_second_evidence] |= REASONS["second_crystal"]
    z = np.full(phi.shape[0], np.nan)
    if unexplained is not None:
        observed, expected = (np.asarray(x, np.float64) for x in unexplained)
        excess = (observed - expected) / np.sqrt(np.maximum(expected, 1.0))
        finite = np.isfinite(excess)  # NaN: frame not tested
        reference = finite & (flags == 0) if np.any(finite & (flags == 0)) else finite
        # iterated clipping: the frames this test flags leave the reference (many two-crystal frames inflate
        # the MAD of a first pass: 53 % of them were caught at 30 % two-crystal frames, 100 % after clipping)
        for _ in range(MAX_CLIPPING_PASSES):
            z = robust_z(excess, excess[reference])
            with np.errstate(invalid="ignore"):
                outlier = z > criteria.max_unexplained_z
            clipped = reference & ~outlier
            if np.array_equal(clipped, reference) or not clipped.any():
                break
            reference = clipped
        flags[outlier] |= REASONS["unexplained_photons"]
    return flags, z


def reason_counts(flags) -> dict[str, int]:
    """Frames flagged for each reason."""
    flags = np.asarray(flags)
    return {name: int(np.sum((flags & bit) != 0)) for name, bit in REASONS.items()}


def weights_from_flags(weights, flags, drop=tuple(REASONS)) -> np.ndarray:
    """(n,) float64 frame weights: ``weights`` set to 0 for the frames flagged for any reason in ``drop``
    (names of REASONS); frames flagged only for other reasons keep theirs."""
    unknown = sorted(set(drop) - set(REASONS))
    if unknown:
        from emcjax.errors import ConfigError

        raise ConfigError(f"drop: unknown reasons {unknown}; expected some of {list(REASONS)}")
    mask = sum(REASONS[name] for name in set(drop))
    return np.asarray(weights, np.float64) * ((np.asarray(flags) & mask) == 0)


def describe(flags) -> list[str]:
    """Comma-separated reasons of each frame ("" for an accepted one)."""
    return [",".join(n for n, b in REASONS.items() if f & b) for f in np.asarray(flags).tolist()]
