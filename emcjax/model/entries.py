"""In-peak entries of a set of rotations, found by testing every pixel (:func:`build_entries`), and what
they make single device operations of: the tomogram (the model at every entry, :func:`tomogram`) and the
expected Bragg signal per rotation and shell (:func:`expected_signal`).

For one orientation the pixels inside any peak are its *in-peak entries* (pixel, reflection, 8 voxel
indices, 8 weights). They depend on geometry only and are built once per run on the device (here, or from the
reflections near the Ewald sphere by emcjax.model.entries_by_reflection; same result).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from emcjax.model.grid import GridTables, ReciprocalGrid
from emcjax.model.slicing import EXACT_PRECISION, nearest_reflection, locate, pad_model
from emcjax.rotations import crystal_from_lab


@dataclasses.dataclass(frozen=True)
class Entries:
    """In-peak pixel entries of a set of rotations, flat and sorted by rotation.

    Attributes:
      rotation: (n_entries,) int32 local rotation index (0..n_rot-1, position in the quaternion list given).
      pixel: (n_entries,) int32 valid-pixel index.
      voxels: (n_entries, 8) int32 flat indices into the padded asymmetric-unit model.
      weights: (n_entries, 8) float32 trilinear weights.
      n_rot: number of rotations.
    """

    rotation: jax.Array
    pixel: jax.Array
    voxels: jax.Array
    weights: jax.Array
    n_rot: int

    @property
    def n_entries(self) -> int:
        return int(self.rotation.shape[0])


jax.tree_util.register_dataclass(
    Entries, data_fields=["rotation", "pixel", "voxels", "weights"], meta_fields=["n_rot"]
)


@jax.jit
def _classify(quaternions: jax.Array, q_lab: jax.Array, tables: GridTables) -> jax.Array:
    """(n_rot_chunk, n_pix) int32 reflection index of every (rotation, pixel), -1 outside all peaks."""
    rot = crystal_from_lab(quaternions)  # (r, 3, 3)
    q_crystal = jnp.einsum("rij,pj->rpi", rot, q_lab, precision=EXACT_PRECISION)
    refl, _ = jax.vmap(jax.vmap(nearest_reflection, in_axes=(0, None)), in_axes=(0, None))(q_crystal, tables)
    return refl


@jax.jit
def entry_stencils(quaternions, rotation, pixel, q_lab, tables):
    """Trilinear stencils of in-peak entries: for each entry e, pixel ``pixel[e]``'s lab q (1/Å, ``q_lab``)
    rotated into the crystal frame of rotation ``rotation[e]`` of ``quaternions``; returns (voxels (n, 8) int32
    flat model indices, weights (n, 8) float32) as :func:`emcjax.model.slicing.locate` gives them."""
    rot = crystal_from_lab(quaternions)[rotation]
    q_crystal = jnp.einsum("eij,ej->ei", rot, q_lab[pixel], precision=EXACT_PRECISION)
    _, voxels, weights = jax.vmap(locate, in_axes=(0, None))(q_crystal, tables)
    return voxels, weights


def build_entries(
    grid: ReciprocalGrid, q_lab: np.ndarray, quaternions: np.ndarray, *, chunk: int = 64
) -> Entries:
    """In-peak entries of every rotation, computed on the device in chunks of rotations.

    Args:
      grid: the model grid.
      q_lab: (n_pix, 3) lab-frame pixel q in 1/Å (the detector's valid pixels).
      quaternions: (n_rot, 4) orientations (scalar first).
      chunk: rotations per device call (bounds memory at chunk x n_pix).

    Returns:
      The entries, sorted by rotation then pixel.
    """
    tables = grid.tables
    q_dev = jnp.asarray(q_lab, jnp.float32)
    quats = jnp.asarray(quaternions, jnp.float32)
    n_rot = int(quaternions.shape[0])
    rotation, pixel = [], []
    for start in range(0, n_rot, chunk):
        block = quats[start : start + chunk]
        if block.shape[0] < chunk:  # keep one compiled shape
            block = jnp.concatenate([block, jnp.tile(block[:1], (chunk - block.shape[0], 1))])
        refl = np.asarray(_classify(block, q_dev, tables))[: min(chunk, n_rot - start)]
        r, p = np.nonzero(refl >= 0)
        rotation.append(r.astype(np.int32) + start)
        pixel.append(p.astype(np.int32))
    rotation = np.concatenate(rotation)
    pixel = np.concatenate(pixel)
    return entries_from_pairs(rotation, pixel, quats, q_dev, tables, n_rot)


def entries_from_pairs(rotation, pixel, quats, q_dev, tables, n_rot) -> Entries:
    """Entries of sorted (rotation, pixel) pairs (host int32 arrays): trilinear stencils on the device."""
    voxels, weights = [], []
    step = 1 << 18
    for start in range(0, rotation.shape[0], step):
        r = rotation[start : start + step]
        p = pixel[start : start + step]
        # padded to one of few lengths (the power of two above, below ``step``): few compiled shapes
        pad = (step if rotation.shape[0] > step else 1 << max(r.shape[0] - 1, 0).bit_length()) - r.shape[0]
        v, w = entry_stencils(quats, jnp.asarray(np.pad(r, (0, pad))), jnp.asarray(np.pad(p, (0, pad))), q_dev, tables)
        voxels.append(v[: r.shape[0]])
        weights.append(w[: r.shape[0]])
    if not voxels:
        voxels, weights = [jnp.zeros((0, 8), jnp.int32)], [jnp.zeros((0, 8), jnp.float32)]
    return Entries(
        rotation=jnp.asarray(rotation),
        pixel=jnp.asarray(pixel),
        voxels=jnp.concatenate(voxels),
        weights=jnp.concatenate(weights),
        n_rot=n_rot,
    )


@jax.jit
def tomogram(intensity: jax.Array, entries: Entries) -> jax.Array:
    """Model value W at every in-peak entry: (n_entries,) float32 (photons per unit pol per unit phi)."""
    flat = pad_model(intensity)
    return jnp.sum(entries.weights * flat[entries.voxels], axis=1)


@functools.partial(jax.jit, static_argnames="n_shells")
def expected_signal(
    intensity: jax.Array, entries: Entries, polarization: jax.Array, shell: jax.Array, n_shells: int
) -> jax.Array:
    """Expected Bragg photons of each rotation per radial shell at phi = 1.

    S[r, s] = sum over in-peak pixels t of rotation r in shell s of pol_t W_rt.

    Args:
      intensity: (n_asu, n_voxels) model.
      entries: in-peak entries of the rotations.
      polarization: (n_pix,) polarization x solid-angle factor of the valid pixels.
      shell: (n_pix,) int32 radial shell of the valid pixels.
      n_shells: number of shells.

    Returns:
      (n_rot, n_shells) float32.
    """
    w = tomogram(intensity, entries) * polarization[entries.pixel]
    seg = entries.rotation * n_shells + shell[entries.pixel]
    return jax.ops.segment_sum(w, seg, num_segments=entries.n_rot * n_shells).reshape(entries.n_rot, n_shells)
