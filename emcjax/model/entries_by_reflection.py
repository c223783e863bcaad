"""In-peak entries driven by reflections (same result as emcjax.model.build_entries, without testing every
pixel): the reflections whose peak can touch the Ewald sphere of a rotation (:func:`near_sphere`), the
detector pixels in a box around their projections (:func:`box_pixels`), and the entries of many rotations
built from them (:func:`build_entries_by_reflection`). The bounds and tables come from emcjax.model.projection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.model.entries import Entries, entries_from_pairs
from emcjax.model.grid import GridTables, ReciprocalGrid
from emcjax.model.projection import ProjectionTables, projection_setup
from emcjax.model.slicing import nearest_reflection
from emcjax.rotations import crystal_from_lab


def _near_sphere(rot: jax.Array, proj: ProjectionTables) -> jax.Array:
    """(n_refl,) bool: reflections of one rotation whose peak can touch the Ewald sphere.

    |C^T G + k|² - 1/λ² = |G|² + 2 G·(C k) (|k| = 1/λ): three multiply-adds per reflection.
    """
    k_crystal = jnp.sum(rot * proj.k_beam[None, :], axis=1)  # C k, elementwise (no matmul precision mode)
    d = proj.centres_sq + 2.0 * (
        proj.centres[:, 0] * k_crystal[0] + proj.centres[:, 1] * k_crystal[1] + proj.centres[:, 2] * k_crystal[2]
    )
    return (d >= proj.shell_lo) & (d <= proj.shell_hi)


@jax.jit
def _count_candidates(quaternions, proj: ProjectionTables):
    """(n_rot_chunk,) int32 number of reflections near the Ewald sphere of every rotation."""
    rot = crystal_from_lab(quaternions)
    return jax.vmap(lambda m: _near_sphere(m, proj).sum(dtype=jnp.int32))(rot)


def box_pixels(rot: jax.Array, proj: ProjectionTables, shape, h_max: int, n_box: int):
    """Pixels in the box around the projection of every reflection near the Ewald sphere at crystal_from_lab
    ``rot`` (3, 3): ``(pixel, refl, count)``: (h_max * n_box²,) int32 valid-pixel index (-1 off the detector,
    masked, or padding), the reflection whose box holds it (same shape), and the reflections near the sphere
    (the result is complete only where count <= h_max). A box pixel is in-peak for ``rot`` iff the reflection
    its crystal-frame q rounds to (``locate``) is its box's reflection."""
    num_rows, num_cols = shape
    n_refl = proj.centres.shape[0]
    step = jnp.arange(n_box, dtype=jnp.int32)
    d_row = jnp.repeat(step, n_box)  # (n_box²,)
    d_col = jnp.tile(step, n_box)
    near = _near_sphere(rot, proj)
    count = near.sum(dtype=jnp.int32)
    (refl,) = jnp.nonzero(near, size=h_max, fill_value=n_refl)
    used = refl < n_refl
    refl = jnp.minimum(refl, n_refl - 1)
    # Lab position g = C^T G of the selected reflections, elementwise; its projection onto the detector.
    g = jnp.sum(rot[None, :, :] * proj.centres[refl][:, :, None], axis=1)  # (h_max, 3)
    s = g + proj.k_beam
    s_norm = jnp.sqrt(jnp.sum(s * s, axis=1))
    ahead = s[:, 2] <= -proj.cos_min * s_norm  # within the cone of directions that can reach a pixel
    scale = proj.beam_px[2] / jnp.where(ahead, s[:, 2], -1.0)  # pixels per 1/Å along s, > 0
    row = s[:, 0] * scale - proj.beam_px[0] + proj.centre_px[0]
    col = s[:, 1] * scale - proj.beam_px[1] + proj.centre_px[1]
    w = proj.half_width
    used = used & ahead & (row + w >= 0) & (row - w <= num_rows - 1) & (col + w >= 0) & (col - w <= num_cols - 1)
    row0 = jnp.ceil(jnp.where(used, row - w, 0.0)).astype(jnp.int32)
    col0 = jnp.ceil(jnp.where(used, col - w, 0.0)).astype(jnp.int32)
    rows = row0[:, None] + d_row[None, :]  # (h_max, n_box²)
    cols = col0[:, None] + d_col[None, :]
    on_det = used[:, None] & (rows >= 0) & (rows < num_rows) & (cols >= 0) & (cols < num_cols)
    pid = jnp.where(on_det, rows * num_cols + cols, 0)
    pixel = jnp.where(on_det, proj.pixel_map[pid], -1)
    return pixel.reshape(-1), jnp.broadcast_to(refl[:, None], pixel.shape).reshape(-1), count


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_box"))
def _reflection_pixels(quaternions, proj: ProjectionTables, tables: GridTables, shape, h_max, n_box):
    """In-peak pixels of a chunk of rotations found from their reflections near the Ewald sphere.

    Returns ``(pixels, counts)``: (n_rot_chunk, h_max * n_box²) int32 valid-pixel index of every kept
    (rotation, box slot), -1 elsewhere; (n_rot_chunk,) int32 reflections near the sphere per rotation (the
    result is complete only where counts <= h_max).
    """
    near_pixel = jax.vmap(jax.vmap(nearest_reflection, in_axes=(0, None)), in_axes=(0, None))
    rot = crystal_from_lab(quaternions)
    pixel, refl, count = jax.vmap(lambda m: box_pixels(m, proj, shape, h_max, n_box))(rot)  # (r, h_max * n_box²) each, (r,)
    # The inside test of build_entries (_classify), on the same (rotation, pixel)-shaped batch.
    q_crystal = jnp.sum(rot[:, None, :, :] * proj.q_lab[jnp.maximum(pixel, 0)][:, :, None, :], axis=-1)
    found, _ = near_pixel(q_crystal, tables)
    keep = (pixel >= 0) & (found == refl)
    return jnp.where(keep, pixel, -1), count


def near_sphere(rot: jax.Array, proj: ProjectionTables) -> jax.Array:
    """(n_refl,) bool reflections whose peak can touch the Ewald sphere at crystal_from_lab ``rot`` (3, 3)."""
    return _near_sphere(rot, proj)


def bucket_count(n: int) -> int:
    """``n`` rounded up to a multiple of 32 (few distinct compiled shapes)."""
    return _bucket(n)


def near_sphere_counts(quaternions: jax.Array, proj: ProjectionTables) -> jax.Array:
    """(n_rot,) int32 reflections whose peak can touch the Ewald sphere at each rotation (the ``h_max`` that
    :func:`reflection_pixels` needs is their maximum)."""
    return _count_candidates(quaternions, proj)


def reflection_pixels(quaternions: jax.Array, proj: ProjectionTables, tables: GridTables, shape, h_max: int,
                      n_box: int):
    """In-peak pixels of a chunk of rotations (valid-pixel index or -1, (n_rot, h_max * n_box²)) and the
    reflections near the sphere per rotation (complete where <= h_max); see :func:`build_entries_by_reflection`."""
    return _reflection_pixels(quaternions, proj, tables, shape, h_max, n_box)


def _bucket(n: int) -> int:
    """Rounds a candidate count up to a multiple of 32 (few distinct compiled shapes)."""
    return max(32, -(-n // 32) * 32)


def build_entries_by_reflection(
    grid: ReciprocalGrid, detector, quaternions: np.ndarray, *, chunk: int = 64, h_max: int | None = None
) -> Entries:
    """In-peak entries of every rotation, found from the reflections near the Ewald sphere.

    Same result as ``build_entries(grid, detector.q, quaternions)`` (same pairs, stencils and order), but
    instead of testing every pixel against every rotation it projects each reflection whose peak can touch
    the Ewald sphere onto the detector and tests only the pixels in a small box around its projection (the
    box half-width is a proven bound, see :func:`projection_bounds`). A pixel is kept by exactly the test of
    :func:`build_entries`: its float32 crystal-frame q rounds to that reflection and lies within the radius,
    evaluated by the same kernel on a (rotation, pixel)-shaped batch (bitwise the same entries on the CPU in
    the tests; differently fused float32 arithmetic could only flip pixels within ~1e-5 of a peak boundary).
    Cost per rotation: three multiply-adds per reflection, then ~(reflections near the sphere) x (box pixels)
    tests instead of n_pix.

    Args:
      grid: the model grid.
      detector: an :class:`emcjax.detector.Detector` (its valid pixels are the pixel indices).
      quaternions: (n_rot, 4) orientations (scalar first).
      chunk: rotations per device call.
      h_max: reflections near the Ewald sphere per rotation held by the padded kernel; None counts them
        for every rotation first. A chunk with more is recomputed with a larger ``h_max``.

    Returns:
      The entries, sorted by rotation then pixel.
    """
    proj, shape, n_box = projection_setup(grid, detector)
    tables = grid.tables
    quats = jnp.asarray(quaternions, jnp.float32)
    n_rot = int(quaternions.shape[0])
    if h_max is None:  # the largest count over all rotations (cheap: three multiply-adds per reflection)
        step = max(chunk, min(1024, 1 << max(n_rot - 1, 0).bit_length()))
        most = 0
        for start in range(0, n_rot, step):
            block = quats[start : start + step]
            if block.shape[0] < step:
                block = jnp.concatenate([block, jnp.tile(block[:1], (step - block.shape[0], 1))])
            most = max(most, int(np.max(_count_candidates(block, proj))))
        h_max = _bucket(most)
    rotation, pixel = [], []
    for start in range(0, n_rot, chunk):
        block = quats[start : start + chunk]
        n = block.shape[0]
        if n < chunk:  # keep one compiled shape
            block = jnp.concatenate([block, jnp.tile(block[:1], (chunk - n, 1))])
        while True:
            found, counts = _reflection_pixels(block, proj, tables, shape, h_max, n_box)
            most = int(np.max(counts))
            if most <= h_max:
                break
            h_max = _bucket(most)
        found = np.sort(np.asarray(found)[:n], axis=1)  # per rotation: the -1 slots first, then pixels ascending
        kept = found >= 0
        rotation.append(np.repeat(np.arange(start, start + n, dtype=np.int32), kept.sum(axis=1)))
        pixel.append(found[kept].astype(np.int32))
    rotation = np.concatenate(rotation) if rotation else np.zeros(0, np.int32)
    pixel = np.concatenate(pixel) if pixel else np.zeros(0, np.int32)
    return entries_from_pairs(rotation, pixel, quats, jnp.asarray(detector.q, jnp.float32), tables, n_rot)
