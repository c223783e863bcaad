"""Fine rotations around coarse ones: the sampling of the high-resolution local update (METHOD.md §2.11, §9.2-9.3).

The reference's local update refines a low-resolution reconstruction (600-cell sampling ``n_c``, cutoff
``res_coarse``) to a higher resolution ``res_fine`` on the finer sampling ``n_f = ceil(n_c res_coarse /
res_fine)`` (the angular step times q_max stays constant), searching for every frame only the fine rotations
near its probable coarse ones:

* :func:`fine_sampling_n` -- ``n_f``;
* :func:`neighbour_radius` -- the reference's neighbourhood of a coarse rotation, ``|c - f| < δ`` with
  ``δ = 1.01 x 0.944 / (2 n_c)`` (a chord between unit quaternions), as a misorientation angle
  ``4 arcsin(δ / 2) ≈ 1.01 x 0.944 / n_c`` rad;
* :func:`neighbour_table` -- for coarse rotations, their fine neighbours within ``δ`` (CSR). Unlike the
  reference's range search over sign-normalised (q0 >= 0) quaternions, which misses neighbours across
  q0 = 0, it is correct over the whole sphere (``q ≡ -q``, :func:`emcjax.rotation_neighbours.neighbours`);
* :func:`frame_candidates` -- every frame's candidate list: the union of the fine neighbours of its coarse
  rotations with P >= ``min_probability`` in the last low-resolution E-step.

The table is a function of misorientation angles only, so it commutes with every operation that maps both
grids onto themselves: with the point-group reduction of the coarse grid
(:func:`emcjax.rotation_symmetry.grid_symmetry_orbits`, the same operations for every ``n``) the neighbours of a
coarse representative's orbit mate are the images of its neighbours (tested). A frame's candidates are the
neighbours of the representatives it kept, in the full fine grid (the likelihood and the prior of the
600-cell are invariant under those operations, so one neighbourhood per orbit suffices).

Numpy set-up code.
"""

from __future__ import annotations

import math

import numpy as np

from emcjax.errors import ConfigError
from emcjax.rotation_neighbours import neighbours
from emcjax.sampling_600cell import COVERING_RADIUS_COEFF, RotationSampling

NEIGHBOUR_MARGIN = 1.01
"""The reference's safety factor on the neighbour radius (METHOD.md §9.2)."""


def fine_sampling_n(coarse_n: int, coarse_resolution_A: float, fine_resolution_A: float) -> int:
    """``n_f = ceil(n_c res_coarse / res_fine)``: the fine 600-cell parameter (METHOD.md §2.11).

    Args:
        coarse_n: 600-cell parameter of the low-resolution sampling, >= 1.
        coarse_resolution_A: low-resolution cutoff d_min in Å.
        fine_resolution_A: high-resolution cutoff d_min in Å (<= the coarse one).

    Returns:
        ``n_f >= n_c``.
    """
    if isinstance(coarse_n, bool) or not isinstance(coarse_n, (int, np.integer)) or coarse_n < 1:
        raise ConfigError(f"coarse_n must be a positive integer, got {coarse_n!r}")
    if not (fine_resolution_A > 0 and coarse_resolution_A > 0):
        raise ConfigError(
            f"resolutions must be > 0 Å, got coarse {coarse_resolution_A!r} and fine {fine_resolution_A!r}"
        )
    if fine_resolution_A > coarse_resolution_A:
        raise ConfigError(
            f"the high resolution ({fine_resolution_A} Å) must not be lower than the low resolution "
            f"({coarse_resolution_A} Å)"
        )
    # the small tolerance keeps exact ratios (4 x 3/3) from rounding up through float error
    return max(int(coarse_n), math.ceil(coarse_n * coarse_resolution_A / fine_resolution_A - 1e-9))


def neighbour_radius(coarse_n: int, fine_n: int) -> float:
    """Misorientation radius (rad) of the fine neighbours of a coarse rotation (METHOD.md §9.2).

    The reference keeps the fine ``f`` with ``2 - 2 |c · f| < δ²``, ``δ = 1.01 x 0.944 / (2 n_c)`` (``1.01 x
    0.944 / n_c`` when ``n_f == n_c``): ``δ`` is a chord between unit quaternions, not a rotation angle. The
    same set in misorientation angle is ``angle < 2 arccos(1 - δ²/2) = 4 arcsin(δ / 2) ≈ 2 δ``, about the
    coarse grid's covering radius ``0.944 / n_c``: the neighbourhoods of the coarse rotations cover the
    sphere, ~5.5 fine rotations each.
    """
    delta = NEIGHBOUR_MARGIN * COVERING_RADIUS_COEFF / (coarse_n if fine_n == coarse_n else 2 * coarse_n)
    return 4.0 * math.asin(min(delta / 2.0, 1.0))


def neighbour_table(
    coarse: RotationSampling | np.ndarray, fine: RotationSampling | np.ndarray, radius_rad: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fine rotations within ``radius_rad`` of every coarse rotation (the reference's quat_table).

    Args:
        coarse: the coarse rotations (a sampling or ``(n_coarse, 4)`` unit quaternions), e.g. only those
            some frame needs.
        fine: the fine sampling (or ``(n_fine, 4)`` unit quaternions).
        radius_rad: misorientation radius in radians.

    Returns:
        ``(offsets, indices)`` CSR: ``offsets`` ``(n_coarse + 1,)`` int64; the neighbours of coarse rotation
        ``i`` are ``indices[offsets[i]:offsets[i + 1]]`` (fine indices, ascending).
    """
    q_coarse = coarse.quaternions if isinstance(coarse, RotationSampling) else np.asarray(coarse, np.float64)
    return neighbours(fine, q_coarse, radius_rad)


def frame_candidates(
    kept_frame: np.ndarray,
    kept_rotation: np.ndarray,
    kept_prob: np.ndarray,
    n_frames: int,
    coarse: RotationSampling,
    fine: RotationSampling,
    radius_rad: float,
    min_probability: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame fine candidates: the fine neighbours of the coarse rotations a frame kept with P >= a threshold.

    Only the coarse rotations some frame needs are looked up (rotations no frame needs are never touched).

    Args:
        kept_frame: ``(n_pairs,)`` int frame index of each kept (frame, coarse rotation) pair.
        kept_rotation: ``(n_pairs,)`` int coarse sampling index of the pair.
        kept_prob: ``(n_pairs,)`` float probability of the pair in the low-resolution E-step.
        n_frames: number of frames.
        coarse: the coarse sampling ``kept_rotation`` indexes.
        fine: the fine sampling.
        radius_rad: neighbour radius (:func:`neighbour_radius`).
        min_probability: pairs with a lower probability are ignored (the reference's 0.01).

    Returns:
        ``(offsets, rotations, n_coarse)``: CSR ``offsets`` ``(n_frames + 1,)`` int64 and ``rotations`` int64
        fine sampling indices (ascending and unique within a frame), and ``n_coarse`` ``(n_frames,)`` int64
        the number of coarse rotations each frame contributed. A frame without such a pair has no candidate.
    """
    kept_frame = np.asarray(kept_frame, np.int64)
    kept_rotation = np.asarray(kept_rotation, np.int64)
    kept_prob = np.asarray(kept_prob, np.float64)
    if not kept_frame.shape == kept_rotation.shape == kept_prob.shape or kept_frame.ndim != 1:
        raise ConfigError(
            f"kept pairs: frame, rotation and probability must be 1-D of one length, got shapes "
            f"{kept_frame.shape}, {kept_rotation.shape}, {kept_prob.shape}"
        )
    if kept_frame.size and (kept_frame.min() < 0 or kept_frame.max() >= n_frames):
        raise ConfigError(f"kept pairs: frame indices must lie in [0, {n_frames}), got {kept_frame.min()}..{kept_frame.max()}")
    if kept_rotation.size and (kept_rotation.min() < 0 or kept_rotation.max() >= coarse.n_rot):
        raise ConfigError(
            f"kept pairs: rotation indices must lie in [0, {coarse.n_rot}) (coarse sampling n = {coarse.n}), "
            f"got {kept_rotation.min()}..{kept_rotation.max()}"
        )
    use = kept_prob >= min_probability
    frame, rotation = kept_frame[use], kept_rotation[use]
    needed, which = np.unique(rotation, return_inverse=True)
    table_offsets, table = neighbour_table(coarse.quaternions[needed], fine, radius_rad)
    lengths = np.diff(table_offsets)[which]
    # expand every (frame, coarse) pair to its fine neighbours, then sort and deduplicate per frame
    pair_of = np.repeat(np.arange(frame.shape[0]), lengths)
    starts = np.repeat(table_offsets[which] - np.cumsum(lengths) + lengths, lengths)
    fine_index = table[np.arange(pair_of.shape[0]) + starts]
    key = np.unique(frame[pair_of] * fine.n_rot + fine_index)
    cand_frame, cand_rotation = key // fine.n_rot, key % fine.n_rot
    offsets = np.searchsorted(cand_frame, np.arange(n_frames + 1)).astype(np.int64)
    n_coarse = np.bincount(frame, minlength=n_frames).astype(np.int64)
    return offsets, cand_rotation.astype(np.int64), n_coarse
