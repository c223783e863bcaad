"""The intensity model: voxel profiles around every reflection, and slicing it with the Ewald sphere.

The 3D intensity W(q) is non-zero only inside small spheres (radius ``radius`` in 1/Å) around the
reciprocal-lattice nodes kept by :func:`make_grid`; inside each sphere the peak profile is free and sampled
on a grid aligned with the reciprocal lattice (``divisions`` points per reciprocal axis, see
docs/ARCHITECTURE.md "Voxel grid"). Every reflection has the same set of integer voxel ``offsets``, so the
model is one dense array

    intensity: (n_asu, n_voxels) float32   photons per unit polarization factor per unit phi

over the asymmetric unit; reflection ``h`` (a mate ``M_g @ hkl_a`` of unique reflection ``a``) reads voxel
``j`` from ``intensity[a, perm[g, j]]``. That map is stored flat (``ReciprocalGrid.full_to_asu``) so that
slicing gathers directly from the asymmetric unit and back-projection scatters directly into it: symmetry
costs nothing at run time.

A detector pixel at crystal-frame q samples the model by trilinear interpolation (METHOD.md §5.2): the pixel
belongs to reflection h iff |q - B hkl_h| <= radius; the 8 grid corners around it contribute with
trilinear weights, corners outside the support are dropped without renormalisation.

For one orientation the pixels inside any peak are its *in-peak entries* (pixel, reflection, 8 voxel
indices, 8 weights). They depend on geometry only, are built once per run on the device
(:func:`build_entries`, which tests every pixel, or :func:`build_entries_by_reflection`, which tests only
the pixels around the projections of the reflections near the Ewald sphere; same result), and make a
tomogram (the model sliced at every in-peak pixel of every rotation) a single gather (:func:`tomogram`); the
expected Bragg signal of a rotation is a segment sum (:func:`expected_signal`).

The package, one module per job (the names below are its public API, ``from emcjax import model as model_lib``):

* ``grid.py`` -- :class:`ReciprocalGrid` and :func:`make_grid` (reflections, asymmetric unit, voxel offsets,
  symmetry maps) and the device lookup tables :class:`GridTables`;
* ``slicing.py`` -- kernels of one point: :func:`locate` (trilinear stencil), :func:`slice_points`,
  :func:`pad_model`; :func:`symmetrize` / :func:`stabilizer_sum`; :func:`integrated_intensity`;
* ``entries.py`` -- :class:`Entries`, :func:`build_entries` (every pixel tested), :func:`tomogram`,
  :func:`expected_signal`;
* ``projection.py`` -- set-up of the reflection-driven search: proven bounds and device tables
  (:func:`projection_setup`);
* ``entries_by_reflection.py`` -- reflections near the Ewald sphere (:func:`near_sphere`,
  :func:`near_sphere_counts`), the pixel boxes around their projections (:func:`box_pixels`,
  :func:`reflection_pixels`) and :func:`build_entries_by_reflection`.
"""

from emcjax.model.entries import Entries, build_entries, expected_signal, tomogram
from emcjax.model.entries_by_reflection import (
    box_pixels,
    bucket_count,
    build_entries_by_reflection,
    near_sphere,
    near_sphere_counts,
    reflection_pixels,
)
from emcjax.model.grid import GridTables, ReciprocalGrid, make_grid
from emcjax.model.projection import projection_setup
from emcjax.model.slicing import integrated_intensity, locate, pad_model, slice_points, stabilizer_sum, symmetrize

__all__ = [
    "Entries",
    "GridTables",
    "ReciprocalGrid",
    "box_pixels",
    "bucket_count",
    "build_entries",
    "build_entries_by_reflection",
    "expected_signal",
    "integrated_intensity",
    "locate",
    "make_grid",
    "near_sphere",
    "near_sphere_counts",
    "pad_model",
    "projection_setup",
    "reflection_pixels",
    "slice_points",
    "stabilizer_sum",
    "symmetrize",
    "tomogram",
]
