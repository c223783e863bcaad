"""The expected signal S(rotation, shell) from tabulated per-reflection cut integrals (an approximation).

The exact S_r sums the model over every in-peak pixel of rotation r: at the paper's detector (~1.5 M pixels
at 4 Å, ~100 pixels per peak) that is ~25,000 terms per rotation, 4e11 per iteration at 80,000 frames x 200
candidates. But S_r depends only on which reflections the Ewald sphere cuts and where: reflection h at
signed distance delta from the sphere (|C^T G_h + k| - 1/λ) contributes the model integrated over the disk
in which the sphere (locally a plane with normal n, the scattered direction) cuts its peak sphere, times the
pixels per unit q-area there. So, per E-step,

    table[h, i, j] = ∫_{disk(delta_i, psi_j)} W_h dA    (1/Å² x photons per unit pol per unit phi),

for ``n_delta`` distances in [-radius, radius] and ``n_psi`` azimuths psi of the normal on the cone
n · Ĝ_h = sin θ_h that every normal of h lies on (a ``n_disk``-point disk quadrature of the trilinear
model), and per rotation

    S[r, shell(t_h)] ≈ Σ_{h near the sphere} pol(t_h) / a(t_h) x table[h](delta_rh, psi_rh)    (linear interpolation),

t_h the pixel where the peak centre's scattered ray meets the detector, a(t) = Ω_t / λ² its q-area.
Errors (bounded against the exact pixel sum by experiments/bench_paper_scale.py): the pixel sum replaced by
an integral (large when a peak spans few pixels: use the exact S there), pol and pixel density taken at the
peak centre, a peak counted whole in the shell of its centre and not at all when its centre misses the valid
pixels (detector edges, beamstop, masked pixels), the interpolation in delta and psi.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax.rotations import crystal_from_lab


class CutGeometry(NamedTuple):
    """Per reflection and per pixel constants of the tabulated signal (device arrays, float32).

    Attributes:
      centre: (n_refl, 3) crystal-frame G_h (1/Å).
      axis_g, axis_1, axis_2: (n_refl, 3) orthonormal frame: Ĝ_h and two vectors perpendicular to it.
      sin_theta, cos_theta: (n_refl,) of the Bragg angle (n · Ĝ = sin θ on the sphere).
      disk: (n_disk, 2) unit-disk quadrature points; disk_weight: (n_disk,) weights (sum π).
      density: (n_pix,) pol_t / a_t: polarization x solid angle over the pixel's q-area (Å²).
      radius: () peak radius (1/Å); inv_wavelength: () 1/λ.
      density_map: (num_rows * num_cols,) ``density`` by raw pixel id, 0 where no valid pixel;
      shell_map: (num_rows * num_cols,) int32 the valid pixel's shell by raw pixel id, -1 where none (one
        lookup per peak centre instead of the pixel map, then density and shell by valid pixel).
    """

    centre: jax.Array
    axis_g: jax.Array
    axis_1: jax.Array
    axis_2: jax.Array
    sin_theta: jax.Array
    cos_theta: jax.Array
    disk: jax.Array
    disk_weight: jax.Array
    density: jax.Array
    radius: jax.Array
    inv_wavelength: jax.Array
    density_map: jax.Array
    shell_map: jax.Array


def disk_quadrature(n_rings: int = 4, n_angles: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre in the radius (weight r dr) x the midpoint rule in the angle on the unit disk: points
    (n, 2), weights (n,) summing to π (exact for radial polynomials of degree 2 n_rings - 2)."""
    x, w = np.polynomial.legendre.leggauss(n_rings)
    r, w = 0.5 * (x + 1.0), 0.5 * w
    angle = (np.arange(n_angles) + 0.5) * 2 * np.pi / n_angles
    points = np.stack([np.outer(r, np.cos(angle)).ravel(), np.outer(r, np.sin(angle)).ravel()], axis=1)
    weights = np.repeat(w * r, n_angles) * (2 * np.pi / n_angles)
    return points, weights


def cut_geometry(grid: model_lib.ReciprocalGrid, detector, n_rings: int = 4, n_angles: int = 6) -> CutGeometry:
    """The constants of :func:`cut_table` and :func:`tabulated_signal` for a grid and detector."""
    geo = detector.geometry
    centre = grid.hkl @ grid.crystal.reciprocal_basis.T
    length = np.linalg.norm(centre, axis=1)
    axis_g = centre / length[:, None]
    helper = np.where(np.abs(axis_g[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    axis_1 = np.cross(axis_g, helper)
    axis_1 /= np.linalg.norm(axis_1, axis=1, keepdims=True)
    axis_2 = np.cross(axis_g, axis_1)
    sin_theta = 0.5 * length * geo.wavelength_A
    rows, cols = np.divmod(np.asarray(detector.pixel_id, np.int64), geo.num_cols)
    b = geo.beam_vector_px
    s = np.stack([b[0] + rows - geo.beam_center_px[0], b[1] + cols - geo.beam_center_px[1],
                  np.full(rows.shape, b[2])], axis=1)
    solid_angle = np.abs(s[:, 2]) / np.linalg.norm(s, axis=1) ** 3  # sr per pixel (pixel units)
    q_area = solid_angle / geo.wavelength_A**2
    disk, weight = disk_quadrature(n_rings, n_angles)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    density = (detector.polarization / q_area).astype(np.float32)
    density_map = np.zeros(geo.num_pixels, np.float32)
    density_map[detector.pixel_id] = density
    shell_map = np.full(geo.num_pixels, -1, np.int32)
    shell_map[detector.pixel_id] = detector.shell
    return CutGeometry(f32(centre), f32(axis_g), f32(axis_1), f32(axis_2), f32(sin_theta),
                       f32(np.sqrt(1 - sin_theta**2)), f32(disk), f32(weight), f32(density), f32(grid.radius),
                       f32(1.0 / geo.wavelength_A), f32(density_map), jnp.asarray(shell_map, jnp.int32))


def _normal(cut: CutGeometry, psi: jax.Array) -> jax.Array:
    """(n_refl, n_psi, 3) sphere normal of every reflection at azimuths psi (n_psi,)."""
    c, s = jnp.cos(psi)[None, :, None], jnp.sin(psi)[None, :, None]
    return (cut.sin_theta[:, None, None] * cut.axis_g[:, None, :]
            + cut.cos_theta[:, None, None] * (c * cut.axis_1[:, None, :] + s * cut.axis_2[:, None, :]))


@functools.partial(jax.jit, static_argnames=("n_delta", "n_psi", "chunk"))
def cut_table(intensity, cut: CutGeometry, tables: model_lib.GridTables, n_delta: int = 9, n_psi: int = 4,
              chunk: int = 1024) -> jax.Array:
    """(n_refl, n_delta, n_psi) float32 model integrated over the cut disks (1/Å² x model units)."""
    delta = cut.radius * jnp.linspace(-1.0, 1.0, n_delta)
    psi = jnp.arange(n_psi) * (2 * jnp.pi / n_psi)
    flat = model_lib.pad_model(intensity)
    n_refl = cut.centre.shape[0]
    pad = -n_refl % chunk

    def one_chunk(xs):
        centre, normal = xs  # (c, 3), (c, n_psi, 3)
        u1 = jnp.cross(normal, jnp.broadcast_to((centre / jnp.linalg.norm(centre, axis=1, keepdims=True))[:, None], normal.shape))
        u1 = u1 / jnp.linalg.norm(u1, axis=-1, keepdims=True)
        u2 = jnp.cross(normal, u1)
        half = jnp.sqrt(jnp.maximum(cut.radius**2 - delta**2, 0.0))  # (n_delta,) disk radius
        middle = centre[:, None, None, :] - delta[None, :, None, None] * normal[:, None, :, :]  # (c, nd, np, 3)
        offset = (cut.disk[:, 0][:, None] * u1[:, :, None, :] + cut.disk[:, 1][:, None] * u2[:, :, None, :])  # (c, np, m, 3)
        points = middle[:, :, :, None, :] + half[None, :, None, None, None] * offset[:, None, :, :, :]
        _, voxels, weights = jax.vmap(model_lib.locate, in_axes=(0, None))(points.reshape(-1, 3), tables)
        value = jnp.sum(weights * flat[voxels], axis=1).reshape(points.shape[:-1])
        return jnp.sum(value * cut.disk_weight, axis=-1) * (half**2)[None, :, None]

    normal = _normal(cut, psi)
    xs = (jnp.pad(cut.centre, ((0, pad), (0, 0)), constant_values=1.0), jnp.pad(normal, ((0, pad), (0, 0), (0, 0)), constant_values=1.0))
    out = jax.lax.map(one_chunk, jax.tree.map(lambda x: x.reshape(-1, chunk, *x.shape[1:]), xs))
    return out.reshape(-1, n_delta, n_psi)[:n_refl]


ATAN2_ERROR = 3e-7  # most |azimuth - atan2| (radians) of :func:`azimuth`, measured over 1e6 random points: 2.7e-7


def azimuth(y: jax.Array, x: jax.Array) -> jax.Array:
    """atan2(y, x) in (-π, π], elementwise, by Cephes' atanf polynomial after reduction to [0, tan(π/8)]:
    within ``ATAN2_ERROR`` of the exact angle (float32 rounding; XLA's atan2 on a CPU costs ~35 ns per element,
    this ~3 ns). Used only where it is interpolated, so an error of 3e-7 rad moves S by as little."""
    ax, ay = jnp.abs(x), jnp.abs(y)
    big, small = jnp.maximum(ax, ay), jnp.minimum(ax, ay)
    a = small / jnp.where(big > 0, big, 1.0)
    reduced = a > 0.41421356  # tan(π/8): atan(a) = π/4 + atan((a - 1) / (a + 1))
    z = jnp.where(reduced, (a - 1.0) / (a + 1.0), a)
    z2 = z * z
    p = ((((8.05374449538e-2 * z2 - 1.38776856032e-1) * z2 + 1.99777106478e-1) * z2 - 3.33329491539e-1) * z2) * z + z
    t = jnp.where(reduced, np.float32(np.pi / 4) + p, p)
    t = jnp.where(ay > ax, np.float32(np.pi / 2) - t, t)
    t = jnp.where(x < 0, np.float32(np.pi) - t, t)
    return jnp.where(y < 0, -t, t)


def _cut_terms(table, m, refl, proj, cut: CutGeometry, shape):
    """Per reflection ``refl`` (h,) at crystal_from_lab ``m`` (3, 3): (table value x pixel density, shell of the
    peak centre's pixel or -1; both 0 / -1 for ``refl`` = n_refl, the padding).

    Written elementwise over the reflections (3-vectors as three arrays, no reductions over a length-3 axis),
    so that XLA fuses it into a few loops instead of materialising (h, 3, 3) products."""
    num_rows, num_cols = shape
    n_refl, n_delta, n_psi = table.shape
    used = refl < n_refl
    refl = jnp.minimum(refl, n_refl - 1)
    rows = jnp.concatenate([cut.centre, cut.axis_1, cut.axis_2], axis=1)[refl]  # (h, 9): one gather
    c = [rows[:, i] for i in range(3)]
    k = proj.k_beam
    s = [m[0, i] * c[0] + m[1, i] * c[1] + m[2, i] * c[2] + k[i] for i in range(3)]  # lab C^T G + k
    s_norm = jnp.sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2])
    delta = s_norm - cut.inv_wavelength
    ahead = s[2] < 0
    scale = proj.beam_px[2] / jnp.where(ahead, s[2], -1.0)
    row = jnp.round(s[0] * scale - proj.beam_px[0] + proj.centre_px[0]).astype(jnp.int32)
    col = jnp.round(s[1] * scale - proj.beam_px[1] + proj.centre_px[1]).astype(jnp.int32)
    on = used & ahead & (jnp.abs(delta) < cut.radius) & (row >= 0) & (row < num_rows) & (col >= 0) & (col < num_cols)
    at = jnp.where(on, row * num_cols + col, 0)
    density = jnp.where(on, cut.density_map[at], 0.0)
    shell = jnp.where(on, cut.shell_map[at], -1)
    x = jnp.clip((delta / cut.radius + 1.0) * 0.5 * (n_delta - 1), 0.0, n_delta - 1.0)
    i0 = jnp.minimum(jnp.floor(x).astype(jnp.int32), n_delta - 2)
    fx = x - i0
    flat = table.reshape(-1)
    base = refl * (n_delta * n_psi) + i0 * n_psi
    if n_psi == 1:
        value = (1 - fx) * flat[base] + fx * flat[base + 1]
    else:
        u = [si / s_norm for si in s]
        normal = [m[i, 0] * u[0] + m[i, 1] * u[1] + m[i, 2] * u[2] for i in range(3)]  # crystal-frame C ŝ
        a1, a2 = rows[:, 3:6], rows[:, 6:9]
        psi = azimuth(normal[0] * a2[:, 0] + normal[1] * a2[:, 1] + normal[2] * a2[:, 2],
                      normal[0] * a1[:, 0] + normal[1] * a1[:, 1] + normal[2] * a1[:, 2])
        y = jnp.mod(psi, 2 * jnp.pi) * (n_psi / (2 * jnp.pi))
        j0 = jnp.floor(y).astype(jnp.int32) % n_psi
        j1 = (j0 + 1) % n_psi
        fy = y - jnp.floor(y)
        value = ((1 - fx) * ((1 - fy) * flat[base + j0] + fy * flat[base + j1])
                 + fx * ((1 - fy) * flat[base + n_psi + j0] + fy * flat[base + n_psi + j1]))
    return jnp.where(on, value * density, 0.0), shell


def _valid_shell(shell, masked):
    """Whether each term's ``shell`` (h,) is none of the frame's ``masked`` (n_masked,) shells (elementwise)."""
    valid = shell != masked[0]
    for j in range(1, masked.shape[0]):
        valid = valid & (shell != masked[j])
    return valid


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_shells"))
def tabulated_signal(table, quaternions, proj, cut: CutGeometry, shape, h_max: int, n_shells: int):
    """Approximate S[r, shell] (n_rot, n_shells) of a chunk of rotations from the cut table, and the
    reflections near the sphere per rotation (n_rot,) int32 (complete where <= h_max)."""

    def one(m):
        near = model_lib.near_sphere(m, proj)
        (refl,) = jnp.nonzero(near, size=h_max, fill_value=table.shape[0])
        value, shell = _cut_terms(table, m, refl, proj, cut, shape)
        return jax.ops.segment_sum(value, jnp.maximum(shell, 0), num_segments=n_shells), near.sum(dtype=jnp.int32)

    return jax.vmap(one)(crystal_from_lab(quaternions))


@functools.partial(jax.jit, static_argnames=("shape", "chunk"))
def frame_signal(table, rotations, frame_reflections, masked_shells, proj, cut: CutGeometry, shape, chunk: int = 8):
    """Approximate S_dr (n_local, n_slots) at phi = 1 over each frame's valid shells.

    Args:
      rotations: (n_local, n_slots, 3, 3) crystal_from_lab of every candidate.
      frame_reflections: (n_local, h) int32 reflections that can be near the sphere at any of the frame's
        candidates (:func:`frame_reflection_lists`; n_refl on padding): evaluated densely, no compaction.
      masked_shells: (n_local, n_masked) int32 the frame's excluded shells.
    """

    def one(xs):
        rot, refl, masked = xs
        def slot(m):
            value, shell = _cut_terms(table, m, refl, proj, cut, shape)
            return jnp.sum(jnp.where(_valid_shell(shell, masked), value, 0.0))
        return jax.vmap(slot)(rot)

    return _frame_chunks(one, (rotations, frame_reflections, masked_shells), chunk)


def _near_in_list(m, refl, proj, n_refl: int, k_max: int):
    """The reflections of a frame's list ``refl`` (h,) near the Ewald sphere at crystal_from_lab ``m``: (k_max,)
    int32 ids, ``n_refl`` on padding, and how many there are (complete where <= k_max).

    The test is model.near_sphere's (|C^T G + k|² - 1/λ² = |G|² + 2 G·(C k) within the peak radius plus a
    1e-3 margin), so every reflection that :func:`_cut_terms` can count (|delta| < radius) is among them.
    """
    used = refl < n_refl
    safe = jnp.minimum(refl, n_refl - 1)
    k = proj.k_beam
    k_crystal = [m[i, 0] * k[0] + m[i, 1] * k[1] + m[i, 2] * k[2] for i in range(3)]  # C k, elementwise
    centres = proj.centres[safe]
    d = proj.centres_sq[safe] + 2.0 * (centres[:, 0] * k_crystal[0] + centres[:, 1] * k_crystal[1]
                                       + centres[:, 2] * k_crystal[2])
    near = used & (d >= proj.shell_lo) & (d <= proj.shell_hi)
    (position,) = jnp.nonzero(near, size=k_max, fill_value=refl.shape[0])
    return jnp.append(refl, n_refl)[position], near.sum(dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("chunk",))
def near_counts(rotations, frame_reflections, proj, chunk: int = 8):
    """(n_local, n_slots) int32 reflections of each frame's list near the sphere at each candidate
    ``rotations`` (n_local, n_slots, 3, 3): the ``k_max`` of :func:`near_frame_signal` is their maximum."""
    n_refl = proj.centres.shape[0]

    def one(xs):
        rot, refl = xs
        return jax.vmap(lambda m: _near_in_list(m, refl, proj, n_refl, 1)[1])(rot)

    return _frame_chunks(one, (rotations, frame_reflections), chunk)


@functools.partial(jax.jit, static_argnames=("shape", "k_max", "chunk"))
def near_frame_signal(table, rotations, frame_reflections, masked_shells, proj, cut: CutGeometry, shape, k_max: int,
                      chunk: int = 4):
    """:func:`frame_signal` from only the reflections near the sphere at each candidate: per (frame,
    candidate) the ~230 of the frame's list (thousands) that pass model.near_sphere's test, compacted to
    ``k_max`` (>= every count of :func:`near_counts`), then ``k_max`` table interpolations. The same terms
    as :func:`frame_signal` (the others are 0 there), summed in another order.
    """
    n_refl = table.shape[0]

    def one(xs):
        rot, refl, masked = xs
        def slot(m):
            near, _ = _near_in_list(m, refl, proj, n_refl, k_max)
            value, shell = _cut_terms(table, m, near, proj, cut, shape)
            return jnp.sum(jnp.where(_valid_shell(shell, masked), value, 0.0))
        return jax.vmap(slot)(rot)

    return _frame_chunks(one, (rotations, frame_reflections, masked_shells), chunk)


def _frame_chunks(one, xs, chunk: int):
    """``one`` vmapped over frames in chunks of ``chunk`` (lax.map): (n_local, ...) from (n_local, ...) inputs."""
    n_local = xs[0].shape[0]
    pad = -n_local % chunk
    xs = jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), xs)
    out = jax.lax.map(lambda c: jax.vmap(one)(c), jax.tree.map(lambda x: x.reshape(-1, chunk, *x.shape[1:]), xs))
    return out.reshape(-1, *out.shape[2:])[:n_local]


@functools.partial(jax.jit, static_argnames=("h_max",))
def frame_reflection_lists(centres, reach, proj, cut: CutGeometry, h_max: int):
    """Reflections whose peak can touch the Ewald sphere at any rotation within ``reach`` (n_local,) radians of
    ``centres`` (n_local, 4) quaternions: ((n_local, h_max) int32, n_refl on padding; counts (n_local,)).

    Rotating by at most ``reach`` moves C^T G by at most |G| reach, so | |C^T G + k| - 1/λ | <= radius +
    |G| reach holds at the centre for every reflection near the sphere at any such rotation.
    """
    n_refl = cut.centre.shape[0]
    length = jnp.linalg.norm(cut.centre, axis=1)

    def one(m, r):
        g = jnp.sum(m[None, :, :] * cut.centre[:, :, None], axis=1)
        distance = jnp.abs(jnp.linalg.norm(g + proj.k_beam, axis=1) - cut.inv_wavelength)
        near = distance <= (cut.radius + length * r) * 1.001 + 1e-6
        return jnp.nonzero(near, size=h_max, fill_value=n_refl)[0].astype(jnp.int32), near.sum(dtype=jnp.int32)

    return jax.vmap(one)(crystal_from_lab(centres), reach)
