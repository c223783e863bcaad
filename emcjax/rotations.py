"""Quaternion conventions and algebra, misorientation angles (plain and modulo the crystal's rotations).

Conventions (docs/ARCHITECTURE.md):

* A quaternion is a float array ``(..., 4)`` ``(q0, q1, q2, q3)``, scalar first, unit norm; ``q`` and ``-q``
  are the same rotation.
* :func:`quaternion_to_matrix` gives the usual *active* rotation matrix ``R(q)`` (``R(a ⊗ b) = R(a) R(b)``).
* The crystal-frame coordinates of a lab-frame vector in orientation ``q`` are
  ``q_crystal = crystal_from_lab(q) @ q_lab`` with ``crystal_from_lab(q) = R(q).T``; this is exactly the matrix
  that every program of the reference builds from a quaternion (METHOD.md §1), so the reference's
  quaternion files and candidate lists are used unchanged.

The rotation sets live next door: :mod:`emcjax.sampling_600cell` (the reference's sampling and its weights),
:mod:`emcjax.rotation_symmetry` (point-group reduction of a sampling), :mod:`emcjax.rotation_neighbours`
(neighbour and nearest-rotation queries).

Everything here is numpy (float64) except :func:`quaternion_to_matrix` and :func:`crystal_from_lab`, which
also accept JAX arrays (and work under ``jit``) in the array's own dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.errors import ConfigError

__all__ = [
    "quaternion_to_matrix",
    "crystal_from_lab",
    "matrix_to_quaternion",
    "quaternion_multiply",
    "quaternion_conjugate",
    "misorientation_angle",
    "symmetric_misorientation",
]


# ----------------------------------------------------------------------------------------------------------
# Quaternion algebra
# ----------------------------------------------------------------------------------------------------------


def _namespace(x):
    return jnp if isinstance(x, jax.Array) else np


def quaternion_to_matrix(q):
    """Active rotation matrix of unit quaternions.

    Args:
        q: ``(..., 4)`` scalar-first unit quaternions (numpy or JAX array, any float dtype; JAX arrays and
            tracers are handled with ``jax.numpy`` so the function can be used inside ``jit``/``vmap``).

    Returns:
        ``(..., 3, 3)`` rotation matrices ``R(q)`` of the same array kind and dtype; ``R(q) @ v`` rotates
        ``v`` actively by the angle ``2 arccos(q0)`` about the axis ``(q1, q2, q3)``. ``R(q) == R(-q)``.
    """
    xp = _namespace(q)
    q = xp.asarray(q)
    q0, q1, q2, q3 = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = (
        (1 - 2 * (q2 * q2 + q3 * q3), 2 * (q1 * q2 - q0 * q3), 2 * (q1 * q3 + q0 * q2)),
        (2 * (q1 * q2 + q0 * q3), 1 - 2 * (q1 * q1 + q3 * q3), 2 * (q2 * q3 - q0 * q1)),
        (2 * (q1 * q3 - q0 * q2), 2 * (q2 * q3 + q0 * q1), 1 - 2 * (q1 * q1 + q2 * q2)),
    )
    return xp.stack([xp.stack(row, axis=-1) for row in rows], axis=-2)


def crystal_from_lab(q):
    """The reference program's matrix: crystal-frame coordinates of lab-frame vectors in orientation ``q``.

    ``q_crystal = crystal_from_lab(q) @ q_lab``; equal to ``swapaxes(quaternion_to_matrix(q), -1, -2)``,
    i.e. the element-by-element formula of METHOD.md §1.

    Args:
        q: ``(..., 4)`` scalar-first unit quaternions (numpy or JAX array).

    Returns:
        ``(..., 3, 3)`` matrices, same array kind and dtype as ``q``.
    """
    xp = _namespace(q)
    return xp.swapaxes(quaternion_to_matrix(q), -1, -2)


def matrix_to_quaternion(R) -> np.ndarray:
    """Unit quaternion of active rotation matrices (inverse of :func:`quaternion_to_matrix`).

    Shepperd's method (largest of the four candidate denominators), vectorised.

    Args:
        R: ``(..., 3, 3)`` proper rotation matrices (numpy, float64 used internally).

    Returns:
        ``(..., 4)`` float64 scalar-first unit quaternions with ``q0 >= 0`` (the sign is otherwise arbitrary
        only for 180° rotations, where ``q0 == 0``).
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape[-2:] != (3, 3):
        raise ConfigError(f"matrix_to_quaternion: expected an array of shape (..., 3, 3), got {R.shape}")
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    # candidates: 4 q_i^2 for i = 0..3
    cand = np.stack([1 + tr, 1 + 2 * m[:, 0, 0] - tr, 1 + 2 * m[:, 1, 1] - tr, 1 + 2 * m[:, 2, 2] - tr], axis=-1)
    best = np.argmax(cand, axis=-1)
    q = np.empty((m.shape[0], 4))
    # Off-diagonal combinations: 4 q0 qi and 4 qi qj.
    s21, s12 = m[:, 2, 1], m[:, 1, 2]
    s02, s20 = m[:, 0, 2], m[:, 2, 0]
    s10, s01 = m[:, 1, 0], m[:, 0, 1]
    combos = {
        0: (s21 - s12, s02 - s20, s10 - s01),  # 4 q0 q1, 4 q0 q2, 4 q0 q3
        1: (s21 - s12, s01 + s10, s02 + s20),  # 4 q1 q0, 4 q1 q2, 4 q1 q3
        2: (s02 - s20, s01 + s10, s12 + s21),  # 4 q2 q0, 4 q2 q1, 4 q2 q3
        3: (s10 - s01, s02 + s20, s12 + s21),  # 4 q3 q0, 4 q3 q1, 4 q3 q2
    }
    others = {0: (1, 2, 3), 1: (0, 2, 3), 2: (0, 1, 3), 3: (0, 1, 2)}
    for i in range(4):
        sel = best == i
        if not np.any(sel):
            continue
        qi = 0.5 * np.sqrt(np.maximum(cand[sel, i], 0.0))
        q[sel, i] = qi
        for k, c in zip(others[i], combos[i]):
            q[sel, k] = c[sel] / (4 * qi)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q.reshape(R.shape[:-2] + (4,))


def quaternion_multiply(a, b) -> np.ndarray:
    """Hamilton product ``a ⊗ b`` of scalar-first quaternions (broadcasting).

    ``quaternion_to_matrix(a ⊗ b) == quaternion_to_matrix(a) @ quaternion_to_matrix(b)``.

    Args:
        a: ``(..., 4)`` quaternions.
        b: ``(..., 4)`` quaternions, broadcast against ``a``.

    Returns:
        ``(..., 4)`` float64 product (not re-normalised).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a0, a1, a2, a3 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    b0, b1, b2, b3 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return np.stack(
        [
            a0 * b0 - a1 * b1 - a2 * b2 - a3 * b3,
            a0 * b1 + a1 * b0 + a2 * b3 - a3 * b2,
            a0 * b2 - a1 * b3 + a2 * b0 + a3 * b1,
            a0 * b3 + a1 * b2 - a2 * b1 + a3 * b0,
        ],
        axis=-1,
    )


def quaternion_conjugate(q) -> np.ndarray:
    """Conjugate (inverse rotation for unit quaternions) ``(q0, -q1, -q2, -q3)``; ``(..., 4)`` float64."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def misorientation_angle(a, b) -> np.ndarray:
    """Rotation angle of ``R(a)^T R(b)``, i.e. ``2 arccos(min(1, |a·b|))``, in radians, in ``[0, π]``.

    Handles ``q ≡ -q``. Evaluated in the numerically stable equivalent form
    ``4 atan2(|a - s b|, |a + s b|)`` with ``s = sign(a·b)`` (exact for unit quaternions, accurate also for
    tiny angles where ``arccos`` loses half the digits).

    Args:
        a: ``(..., 4)`` unit quaternions.
        b: ``(..., 4)`` unit quaternions, broadcast against ``a``.

    Returns:
        ``(...)`` float64 angles in radians.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    s = np.where(np.sum(a * b, axis=-1) < 0, -1.0, 1.0)[..., None]
    return 4.0 * np.arctan2(np.linalg.norm(a - s * b, axis=-1), np.linalg.norm(a + s * b, axis=-1))


# ----------------------------------------------------------------------------------------------------------
# Misorientation modulo the crystal's rotation group
# ----------------------------------------------------------------------------------------------------------


def symmetric_misorientation(a, b, rotation_ops_cartesian) -> np.ndarray:
    """Smallest rotation angle between orientations ``a`` and ``b`` over the crystal's proper rotations.

    A crystal in orientation ``q`` looks the same as one in ``q ⊗ conj(h_g)`` for every proper rotation
    ``g`` of its Laue group (``crystal_from_lab`` becomes ``R_g @ crystal_from_lab(q)``), so two frames'
    orientations are related by symmetry iff this angle is ~0.

    Args:
        a: ``(..., 4)`` unit quaternions.
        b: ``(..., 4)`` unit quaternions, broadcast against ``a``.
        rotation_ops_cartesian: ``(n_ops, 3, 3)`` proper rotations acting on crystal-frame vectors
            (``Crystal.rotation_ops_cartesian``).

    Returns:
        ``(...)`` float64 angles in radians, in ``[0, π]``.
    """
    ops = np.asarray(rotation_ops_cartesian, dtype=np.float64)
    h_conj = quaternion_conjugate(matrix_to_quaternion(ops))  # (n_ops, 4)
    b_images = quaternion_multiply(np.asarray(b, np.float64)[..., None, :], h_conj)  # (..., n_ops, 4)
    return misorientation_angle(np.asarray(a, np.float64)[..., None, :], b_images).min(axis=-1)
