"""The truth of a simulation before its counts are drawn (numpy): the true voxel model (Wilson or structure-factor
intensities, Gaussian profiles), the radial background profile, uniform random orientations, and which frames
are blank or hold a second crystal."""

from __future__ import annotations

import pathlib

import numpy as np

from emcjax import model as model_lib
from emcjax.crystal import Crystal
from emcjax.errors import ConfigError
from emcjax.rotations import symmetric_misorientation
from emcjax.simulation_config import SimulationConfig


def true_model(grid: model_lib.ReciprocalGrid, config: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_asu, n_voxels) float64 true model with unit mean integrated intensity (before scaling)."""
    hkl = grid.asu.hkl
    q = hkl @ grid.crystal.reciprocal_basis.T
    inv_d2 = np.einsum("ij,ij->i", q, q)
    if config.structure is not None:
        intensity = structure_intensities(config.structure, grid.crystal, hkl)
    else:
        intensity = rng.exponential(size=hkl.shape[0]) * np.exp(-config.wilson_b * inv_d2 / 2)
    spacing = np.linalg.norm(grid.crystal.reciprocal_basis, axis=0).min() / config.vn
    dq = grid.voxel_q()
    profile = np.exp(-np.einsum("ij,ij->i", dq, dq) / (2 * (config.profile_width * spacing) ** 2))
    profile /= profile.sum()
    intensity = intensity / intensity.mean()
    return intensity[:, None] * profile[None, :]


def structure_intensities(path: pathlib.Path, crystal: Crystal, hkl: np.ndarray) -> np.ndarray:
    """|F(hkl)|^2 of the atomic model in ``path`` (PDB or mmCIF), computed by gemmi (X-ray form factors)."""
    import gemmi

    if not path.exists():
        raise ConfigError(f"structure: no such file {path}")
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"structure: {path} is not a readable PDB/mmCIF file ({err})") from err
    st.setup_entities()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    f = np.array([calc.calculate_sf_from_model(st[0], [int(h), int(k), int(l)]) for h, k, l in hkl])
    return np.abs(f) ** 2


def radial_background(shell_q: np.ndarray) -> np.ndarray:
    """Relative background per shell (unit-less): flat plus a water-like ring near 1/3.2 Å."""
    return 1.0 + 2.0 * np.exp(-((shell_q - 0.31) ** 2) / (2 * 0.04**2))


def random_quaternions(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) uniformly distributed unit quaternions (scalar first, q0 >= 0)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


MIN_SECOND_MISORIENTATION_RAD = np.deg2rad(20.0)
"""A second crystal is at least this far (modulo the Laue group) from the first one."""


def frame_kinds(
    config: SimulationConfig, crystal: Crystal, sampling, quaternion: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which frames are blank and which hold a second crystal, from a random stream of their own (the
    other draws of a data set do not depend on the fractions).

    Returns:
      ``(kind, second_quaternion, second_phi)``: (n_frames,) int8 0 one crystal / 1 blank / 2 two crystals;
      (n_frames, 4) orientation of the second crystal (from ``sampling`` when given, else uniform; at least
      ``MIN_SECOND_MISORIENTATION_RAD`` from every symmetry mate of the first); (n_frames,) its scale (same
      lognormal law as phi). Both zero for frames of kind 0 and 1.
    """
    n = config.n_frames
    rng = np.random.default_rng([config.seed, 1])
    n_blank = round(config.blank_fraction * n)
    n_multi = round(config.multi_fraction * n)
    order = rng.permutation(n)
    kind = np.zeros(n, np.int8)
    kind[order[:n_blank]] = 1
    kind[order[n_blank : n_blank + n_multi]] = 2
    multi = np.flatnonzero(kind == 2)
    second = np.zeros((n, 4))
    todo = multi
    for _ in range(1000):
        if todo.size == 0:
            break
        if sampling is not None:
            second[todo] = sampling.quaternions[rng.choice(sampling.n_rot, size=todo.size, p=sampling.weights)]
        else:
            second[todo] = random_quaternions(rng, todo.size)
        angle = symmetric_misorientation(quaternion[todo], second[todo], crystal.rotation_ops_cartesian)
        todo = todo[angle < MIN_SECOND_MISORIENTATION_RAD]
    second_phi = np.zeros(n)
    second_phi[multi] = rng.lognormal(mean=-config.phi_sigma**2 / 2, sigma=config.phi_sigma, size=multi.size)
    return kind, second, second_phi
