"""Crystal lattice and symmetry: cell, space group, reciprocal basis, Laue operators, reflections.

All of this is one-time numpy set-up (no JAX). Conventions (docs/ARCHITECTURE.md):

* ``B = Crystal.reciprocal_basis`` has columns a*, b*, c* in 1/Å (no 2π), from gemmi's orthogonalization
  (a along x, b in the xy plane); a crystal-frame scattering vector is ``q = B @ hkl``.
* Laue operators act on Miller indices (column vectors) as integer matrices ``M``: ``hkl' = M @ hkl``, and
  on crystal-frame q as ``R = B @ M @ B^-1`` (orthogonal). The list has the identity first, the proper
  rotations first (``laue_ops[i + n/2] = -laue_ops[i]``) and includes the inversion (Friedel pairs merged).

gemmi's symmetry operators ``x' = W x + w`` act on real-space fractional coordinates; a reflection
transforms as the row vector ``h' = h W``, i.e. as a column vector ``hkl' = W^T @ hkl``. We therefore store
``M = W^T`` (the translation part only matters for systematic absences, which gemmi evaluates).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import gemmi
import numpy as np

from emcjax.errors import ConfigError

__all__ = [
    "Crystal",
    "AsymmetricUnit",
    "reflections",
    "is_absent",
    "asymmetric_unit",
    "lattice_grid_divisions",
]

#: Tolerance on max|R^T R - I| for a cell to be accepted as compatible with the space group's lattice.
_METRIC_TOL = 1e-3

_LATTICE_RULE = {
    "triclinic": "no constraint",
    "monoclinic": "the two angles not involving the unique axis equal to 90",
    "orthorhombic": "alpha = beta = gamma = 90",
    "tetragonal": "a = b and alpha = beta = gamma = 90",
    "trigonal": "a = b, alpha = beta = 90, gamma = 120 (hexagonal setting) or a = b = c, "
    "alpha = beta = gamma (rhombohedral setting)",
    "hexagonal": "a = b, alpha = beta = 90, gamma = 120",
    "cubic": "a = b = c and alpha = beta = gamma = 90",
}


def _lookup_space_group(symbol) -> gemmi.SpaceGroup:
    """Resolve a space-group symbol (H-M, Hall-less short names, or an ITA number as str/int) with gemmi."""
    if isinstance(symbol, bool) or not isinstance(symbol, (str, int, np.integer)):
        raise ConfigError(
            f"space_group: expected a space-group symbol string (e.g. 'P 43 21 2' or '96'), "
            f"got {symbol!r} of type {type(symbol).__name__}"
        )
    try:
        sg = gemmi.find_spacegroup_by_name(str(symbol).strip())
    except (ValueError, RuntimeError) as exc:  # pragma: no cover - gemmi returns None for unknown names
        raise ConfigError(f"space_group: unknown space-group symbol {symbol!r} ({exc})") from exc
    if sg is None:
        raise ConfigError(
            f"space_group: unknown space-group symbol {symbol!r}; expected a Hermann-Mauguin symbol "
            f"gemmi accepts (e.g. 'P 43 21 2', 'R 3', 'H 3', 'I 21 3') or an ITA number 1-230"
        )
    return sg


@dataclasses.dataclass(frozen=True)
class Crystal:
    """A crystal: unit cell and space group, with derived lattice and symmetry matrices.

    Attributes:
        cell: (a, b, c, alpha, beta, gamma); lengths in Å, angles in degrees. Stored as a tuple of floats.
        space_group: Any space-group symbol gemmi accepts (Hermann-Mauguin such as ``"P 43 21 2"``,
            ``"R 3"`` / ``"H 3"`` (hexagonal setting), ``"R 3:R"``, or an ITA number such as ``"19"``).
            Stored as given.

    Raises:
        ConfigError: if a cell length is not positive, the angles do not form a cell, the space group is
            unknown, or the cell contradicts the space group's lattice system (e.g. a != b in a tetragonal
            group). The message names the field (``cell`` or ``space_group``) and the value.
    """

    cell: tuple[float, float, float, float, float, float]
    space_group: str

    def __post_init__(self) -> None:
        try:
            cell = tuple(float(x) for x in self.cell)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"cell: expected 6 numbers (a, b, c in Å, alpha, beta, gamma in degrees), got {self.cell!r}"
            ) from exc
        if len(cell) != 6 or not all(math.isfinite(x) for x in cell):
            raise ConfigError(
                f"cell: expected 6 finite numbers (a, b, c in Å, alpha, beta, gamma in degrees), "
                f"got {self.cell!r}"
            )
        object.__setattr__(self, "cell", cell)
        a, b, c, al, be, ga = cell
        if min(a, b, c) <= 0:
            raise ConfigError(f"cell: lengths a, b, c must be positive (Å), got {cell!r}")
        if not all(0.0 < x < 180.0 for x in (al, be, ga)):
            raise ConfigError(f"cell: angles alpha, beta, gamma must lie in (0, 180) degrees, got {cell!r}")
        ca, cb, cg = (math.cos(math.radians(x)) for x in (al, be, ga))
        vol2 = 1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg
        if vol2 <= 1e-9:
            raise ConfigError(
                f"cell: angles alpha={al}, beta={be}, gamma={ga} do not form a unit cell "
                f"(each angle must be smaller than the sum of the other two, and the sum below 360); "
                f"got {cell!r}"
            )
        sg = self.gemmi_space_group
        # Lattice compatibility: every Laue operator must be an isometry in this cell's metric.
        r = self.laue_ops_cartesian
        dev = np.abs(np.einsum("nji,njk->nik", r, r) - np.eye(3)).max()
        if dev > _METRIC_TOL:
            system = sg.crystal_system_str()
            rule = _LATTICE_RULE.get(system, "")
            if system == "monoclinic":
                rule = f"the angles other than the one at the unique axis {sg.monoclinic_unique_axis()!r} = 90"
            raise ConfigError(
                f"cell: {cell!r} is not compatible with space group {self.space_group!r} "
                f"({sg.xhm()}, {system} lattice: expected {rule}); the symmetry operators do not preserve "
                f"the metric (max deviation {dev:.3g} > {_METRIC_TOL})"
            )

    def __getstate__(self) -> dict:
        # Only the fields: cached gemmi objects (GroupOps) cannot be pickled; everything is recomputed lazily.
        return {"cell": self.cell, "space_group": self.space_group}

    def __setstate__(self, state: dict) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)

    # ------------------------------------------------------------------ gemmi objects
    @functools.cached_property
    def gemmi_space_group(self) -> gemmi.SpaceGroup:
        """The gemmi ``SpaceGroup`` for ``space_group`` (raises ConfigError if unknown)."""
        return _lookup_space_group(self.space_group)

    @functools.cached_property
    def gemmi_ops(self) -> gemmi.GroupOps:
        """gemmi ``GroupOps`` of the space group (symmetry and centring operations)."""
        return self.gemmi_space_group.operations()

    @property
    def gemmi_cell(self) -> gemmi.UnitCell:
        """A fresh gemmi ``UnitCell`` for ``cell``."""
        return gemmi.UnitCell(*self.cell)

    # ------------------------------------------------------------------ bases
    @functools.cached_property
    def real_basis(self) -> np.ndarray:
        """(3, 3) float64, Å: columns are the real-space cell vectors a, b, c (gemmi orthogonalization)."""
        m = np.array(self.gemmi_cell.orth.mat.tolist(), dtype=np.float64)
        m.setflags(write=False)
        return m

    @functools.cached_property
    def reciprocal_basis(self) -> np.ndarray:
        """(3, 3) float64, 1/Å (no 2π): columns a*, b*, c*, so that ``q = B @ hkl``; ``B = inv(real_basis).T``."""
        b = np.ascontiguousarray(np.linalg.inv(self.real_basis).T)
        b.setflags(write=False)
        return b

    # ------------------------------------------------------------------ symmetry
    @functools.cached_property
    def laue_ops(self) -> np.ndarray:
        """(n_ops, 3, 3) int32: Laue group acting on hkl column vectors, ``hkl' = M @ hkl``.

        The identity is first; the first n_ops/2 entries are the proper rotations (det +1, in gemmi's order)
        and entry ``i + n_ops/2`` is ``-laue_ops[i]`` (the inversion is always included).
        """
        proper: list[np.ndarray] = []
        seen: set[bytes] = set()
        for op in self.gemmi_ops.sym_ops:
            w = np.array(op.rot, dtype=np.int64)
            if np.any(w % op.DEN):
                raise AssertionError(f"non-integer rotation part in {op.triplet()}")
            w //= op.DEN
            m = w.T  # acts on hkl column vectors
            if round(np.linalg.det(m)) < 0:
                m = -m
            key = m.astype(np.int32).tobytes()
            if key not in seen:
                seen.add(key)
                proper.append(m)
        ident = np.eye(3, dtype=np.int64)
        idx = next(i for i, m in enumerate(proper) if np.array_equal(m, ident))
        proper.insert(0, proper.pop(idx))
        ops = np.array(proper + [-m for m in proper], dtype=np.int32)
        ops.setflags(write=False)
        return ops

    @functools.cached_property
    def laue_ops_cartesian(self) -> np.ndarray:
        """(n_ops, 3, 3) float64: ``R = B @ M @ B^-1`` acting on crystal-frame q; orthogonal for a valid cell."""
        b = self.reciprocal_basis
        r = b @ self.laue_ops.astype(np.float64) @ np.linalg.inv(b)
        r.setflags(write=False)
        return r

    @functools.cached_property
    def rotation_ops_cartesian(self) -> np.ndarray:
        """(n_ops/2, 3, 3) float64: the proper rotations (det +1) of ``laue_ops_cartesian``, identity first."""
        r = self.laue_ops_cartesian[: len(self.laue_ops) // 2].copy()
        r.setflags(write=False)
        return r

    @property
    def n_ops(self) -> int:
        """Number of Laue operators (order of the Laue group)."""
        return len(self.laue_ops)


# ---------------------------------------------------------------------------------------------- reflections
def _as_hkl(hkl, name: str = "hkl") -> np.ndarray:
    arr = np.asarray(hkl)
    if arr.ndim == 1 and arr.shape == (3,):
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ConfigError(f"{name}: expected an (n, 3) array of Miller indices, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(arr == np.round(arr)):
            raise ConfigError(f"{name}: Miller indices must be integers")
    elif arr.dtype.kind not in "iu":
        raise ConfigError(f"{name}: expected integer Miller indices, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def is_absent(crystal: Crystal, hkl) -> np.ndarray:
    """Systematic absences of the space group (evaluated by gemmi, centring and screw/glide translations).

    Args:
        crystal: the crystal.
        hkl: (n, 3) integer Miller indices.

    Returns:
        (n,) bool, True where the reflection is systematically absent.
    """
    arr = _as_hkl(hkl)
    return np.asarray(crystal.gemmi_ops.systematic_absences(arr), dtype=bool)


def reflections(crystal: Crystal, d_min: float, d_max: float = math.inf, margin: float = 0.0) -> np.ndarray:
    """All allowed reflections in a resolution shell whose whole peak sphere lies inside the shell.

    Keeps hkl with ``1/d_max + margin <= |B @ hkl| <= 1/d_min - margin`` (the reference's non-partial rule,
    with ``margin`` the peak-sphere radius), excluding (0, 0, 0) and systematically absent reflections.

    Args:
        crystal: the crystal.
        d_min: high-resolution limit, Å (> 0).
        d_max: low-resolution limit, Å (> d_min; ``inf`` for none).
        margin: peak-sphere radius in 1/Å (>= 0).

    Returns:
        (n, 3) int32 Miller indices sorted lexicographically by (h, k, l).
    """
    if not (d_min > 0 and math.isfinite(d_min)):
        raise ConfigError(f"d_min: expected a positive finite resolution in Å, got {d_min!r}")
    if not d_max > d_min:
        raise ConfigError(f"d_max: expected a low-resolution limit larger than d_min={d_min} Å, got {d_max!r}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ConfigError(f"margin: expected a non-negative peak radius in 1/Å, got {margin!r}")
    q_max = 1.0 / d_min - margin
    q_min = (0.0 if math.isinf(d_max) else 1.0 / d_max) + margin
    if q_max < q_min or q_max <= 0:
        return np.zeros((0, 3), dtype=np.int32)
    # h = a . q, so |h| <= |q| |a| exactly, for any (oblique) cell.
    lengths = np.linalg.norm(crystal.real_basis, axis=0)
    hmax = np.floor(q_max * lengths + 1e-9).astype(np.int64)
    b = crystal.reciprocal_basis
    ranges = [np.arange(-m, m + 1) for m in hmax]
    # Build shell by h-slices to keep memory moderate; the (k, l) plane is computed once.
    kk, ll = np.meshgrid(ranges[1], ranges[2], indexing="ij")
    kl = np.stack([kk.ravel(), ll.ravel()], axis=1)
    q_kl = kl @ b[:, 1:].T  # (n_kl, 3)
    qmin2, qmax2 = q_min * q_min, q_max * q_max
    eps = 1e-12
    out = []
    for h in ranges[0]:
        q = q_kl + h * b[:, 0]
        q2 = np.einsum("ij,ij->i", q, q)
        keep = (q2 <= qmax2 * (1 + eps)) & (q2 >= qmin2 * (1 - eps))
        if h == 0:
            keep &= np.any(kl != 0, axis=1)
        if np.any(keep):
            sel = kl[keep]
            out.append(np.column_stack([np.full(len(sel), h), sel]))
    if not out:
        return np.zeros((0, 3), dtype=np.int32)
    hkl = np.ascontiguousarray(np.concatenate(out), dtype=np.int32)
    hkl = hkl[~is_absent(crystal, hkl)]
    return hkl


# ---------------------------------------------------------------------------------------------- ASU
@dataclasses.dataclass(frozen=True)
class AsymmetricUnit:
    """Reduction of a reflection list to symmetry-unique reflections under the Laue group.

    Attributes:
        hkl: (n_asu, 3) int32 unique reflections: gemmi's reciprocal-ASU representatives of the orbits present
            in the input, sorted lexicographically by (h, k, l). A representative need not itself be in the
            input list.
        index: (n,) int32: input ``hkl[i]`` is a symmetry mate of ``asu.hkl[index[i]]``.
        op: (n,) int32: ``hkl[i] == crystal.laue_ops[op[i]] @ asu.hkl[index[i]]`` (exactly; the first such op).
        multiplicity: (n_asu,) int32 number of input reflections in each orbit (sums to n).
    """

    hkl: np.ndarray
    index: np.ndarray
    op: np.ndarray
    multiplicity: np.ndarray

    @property
    def n_asu(self) -> int:
        """Number of unique reflections."""
        return len(self.hkl)


def _encode(hkl: np.ndarray, offset: int) -> np.ndarray:
    """Injective int64 key of (..., 3) integer vectors with |components| < offset."""
    span = 2 * offset + 1
    h = hkl.astype(np.int64) + offset
    return (h[..., 0] * span + h[..., 1]) * span + h[..., 2]


def asymmetric_unit(crystal: Crystal, hkl) -> AsymmetricUnit:
    """Map reflections to their Laue-group orbit representatives in gemmi's reciprocal ASU.

    Vectorised: orbits are identified by a canonical key (max over all images), and gemmi's ``to_asu`` is
    called once per orbit, not once per reflection.

    Args:
        crystal: the crystal.
        hkl: (n, 3) integer Miller indices (any list; duplicates allowed).

    Returns:
        The ``AsymmetricUnit`` (see its attributes for shapes and dtypes).
    """
    arr = _as_hkl(hkl)
    n = len(arr)
    ops = crystal.laue_ops.astype(np.int64)
    if n == 0:
        z = np.zeros(0, dtype=np.int32)
        return AsymmetricUnit(np.zeros((0, 3), np.int32), z, z.copy(), z.copy())
    images = np.einsum("oij,nj->oni", ops, arr.astype(np.int64))  # (n_ops, n, 3)
    offset = int(np.abs(images).max()) + 1
    keys = _encode(images, offset).max(axis=0)  # (n,) canonical orbit key
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    asu = gemmi.ReciprocalAsu(crystal.gemmi_space_group)
    gops = crystal.gemmi_ops
    reps = np.array([asu.to_asu(arr[i].tolist(), gops)[0] for i in first], dtype=np.int64).reshape(-1, 3)
    # Sort representatives lexicographically and remap orbit ids.
    order = np.lexsort((reps[:, 2], reps[:, 1], reps[:, 0]))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    reps = reps[order]
    index = rank[inverse.ravel()]
    # Operator: first k with ops[k] @ rep == hkl.
    rep_images = np.einsum("oij,nj->oni", ops, reps[index])  # (n_ops, n, 3)
    match = np.all(rep_images == arr[None].astype(np.int64), axis=2)  # (n_ops, n)
    if not np.all(match.any(axis=0)):
        bad = arr[~match.any(axis=0)][0]
        raise AssertionError(f"gemmi ASU representative is not a Laue mate of hkl {bad.tolist()}")
    op = match.argmax(axis=0)
    mult = np.bincount(index, minlength=len(reps))
    return AsymmetricUnit(
        hkl=reps.astype(np.int32),
        index=index.astype(np.int32),
        op=op.astype(np.int32),
        multiplicity=mult.astype(np.int32),
    )


# ---------------------------------------------------------------------------------------------- voxel grid
def lattice_grid_divisions(crystal: Crystal, vn: int) -> tuple[int, int, int]:
    """Subdivisions per reciprocal axis of the lattice-aligned voxel grid (ARCHITECTURE.md "Voxel grid").

    ``N_i = max(1, round(vn * |a_i*| / min_j |a_j*|))`` (half rounds up), then equalised (to the maximum) on
    axes that any Laue operator mixes (``M[i, j] != 0`` for i != j), so that every operator maps integer
    voxel offsets onto integer voxel offsets (``diag(N)^-1 @ M @ diag(N)`` is an integer matrix).

    Args:
        crystal: the crystal.
        vn: subdivisions of the shortest reciprocal axis (>= 1).

    Returns:
        (N_a, N_b, N_c) ints.
    """
    if isinstance(vn, bool) or not isinstance(vn, (int, np.integer)) or vn < 1:
        raise ConfigError(f"vn: expected a positive integer number of voxel subdivisions, got {vn!r}")
    lens = np.linalg.norm(crystal.reciprocal_basis, axis=0)
    n = [max(1, int(math.floor(vn * x / lens.min() + 0.5))) for x in lens]
    # Union of axes mixed by any operator.
    parent = [0, 1, 2]

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for m in crystal.laue_ops:
        for i in range(3):
            for j in range(3):
                if i != j and m[i, j] != 0:
                    parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(3):
        groups.setdefault(find(i), []).append(i)
    for axes in groups.values():
        top = max(n[i] for i in axes)
        for i in axes:
            n[i] = top
    nd = np.diag(np.array(n, dtype=np.float64))
    for m in crystal.laue_ops:
        t = np.linalg.inv(nd) @ m @ nd
        if not np.allclose(t, np.round(t)):
            raise AssertionError(f"voxel divisions {n} are not invariant under Laue op {m.tolist()}")
    return (int(n[0]), int(n[1]), int(n[2]))
