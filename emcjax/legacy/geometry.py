"""Detector geometry and crystal of a reference working directory, checked against emcjax's (METHOD.md §3)."""

from __future__ import annotations

import math
import pathlib

import numpy as np

from emcjax.crystal import Crystal
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError
from emcjax.legacy.files import required_key

# Space groups tried (in order) when inferring from sym-op.dat: the primitive group of the rotation point
# group of each Laue class (systematic absences cannot be inferred from Laue operators).
_POINT_GROUP_SPACE_GROUPS = (
    "P 1", "P 1 2 1", "P 1 1 2", "P 2 1 1", "P 2 2 2", "P 4", "P 4 2 2", "P 3", "P 3 1 2", "P 3 2 1",
    "P 6", "P 6 2 2", "P 2 3", "P 4 3 2",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------


def _distance_px(detd: float, px: float, s: np.ndarray) -> float:
    return detd / px * float(np.linalg.norm(s)) / abs(float(s[2]))


def reference_limits(geometry: DetectorGeometry, qmin_px: int, qcut_px: int) -> tuple[float, float]:
    """(r_min, r_max) in 1/Å exactly as low-res-emc/setup.c computes them: ``q_px * (1/wl/D)`` with
    ``D = (detd/px) * sqrt(sx^2 + sy^2 + sz^2) / |sz|`` (same float64 operations, so the same bits)."""
    sx, sy, sz = (float(x) for x in geometry.beam_direction)
    norm = math.sqrt((sx * sx + sy * sy) + sz * sz)
    distance = (geometry.distance_m / geometry.pixel_size_m) * norm / abs(sz)
    scale = 1.0 / geometry.wavelength_A / distance
    return qmin_px * scale, qcut_px * scale


def resolution_for_px(lam_d: float, q_px: int) -> float:
    """The largest-ish d with ceil(λD/d) == q_px (d ≈ λD/q_px, nudged by ulps against rounding)."""
    d = lam_d / q_px
    for _ in range(64):
        if math.ceil(lam_d / d) <= q_px:
            break
        d = float(np.nextafter(d, np.inf))
    return d


def beamstop_qmin_px(distance_px: float, rstop: float) -> int:
    """The reference's inner limit qmin (pixel units of q, integer) of a beam stop of radius ``rstop``
    pixels at ``distance_px`` pixels: ceil(2 D sin(atan(R/D)/2))."""
    return int(math.ceil(2.0 * distance_px * math.sin(0.5 * math.atan(rstop / distance_px))))


def beamstop_for_px(distance_px: float, q_px: int) -> float:
    """Beam-stop radius R (pixels) whose inner limit 2D sin(atan(R/D)/2) is q_px (pixel units)."""
    if q_px <= 0:
        return 0.0
    r = distance_px * math.tan(2.0 * math.asin(min(q_px / (2.0 * distance_px), 1.0)))
    for _ in range(64):
        if beamstop_qmin_px(distance_px, r) <= q_px:
            break
        r = float(np.nextafter(r, 0.0))
    return r


def geometry_from_config(cfg: dict, config_path: pathlib.Path, qmax_px: int, qmin_px: int,
                         rec_path: pathlib.Path) -> DetectorGeometry:
    """A DetectorGeometry whose exact limits reproduce the reference's whole-pixel limits (module doc)."""
    num_row = required_key(cfg, "num_row", config_path, int)
    num_col = required_key(cfg, "num_col", config_path, int)
    px = required_key(cfg, "px", config_path, float, "pixel size in m")
    detd = required_key(cfg, "detd", config_path, float, "detector distance in m")
    wl = required_key(cfg, "wl", config_path, float, "wavelength in Å")
    cx = required_key(cfg, "cx", config_path, float, "beam centre row in pixels")
    cy = required_key(cfg, "cy", config_path, float, "beam centre column in pixels")
    s = np.array([required_key(cfg, k, config_path, float, "beam direction component") for k in ("sx", "sy", "sz")])
    rstop = required_key(cfg, "Rstop", config_path, float, "beam-stop radius in pixels")
    res_max = required_key(cfg, "res_max", config_path, float, "outer resolution in Å")
    qlen = required_key(cfg, "qlen", config_path, int, "number of radial background bins")
    if not s[2] < 0:
        raise DataError(f"{config_path}: sz = {s[2]}; expected < 0 (beam along -z)")
    dist = _distance_px(detd, px, s)
    lam_d = wl * dist
    want_max, want_min = int(math.ceil(lam_d / res_max)), beamstop_qmin_px(dist, rstop)
    if (want_max, want_min) != (qmax_px, qmin_px):
        raise DataError(
            f"{rec_path}: header qmax_px = {qmax_px}, qmin_px = {qmin_px}; expected ({want_max}, {want_min}) from "
            f"{config_path} (res_max = {res_max}, Rstop = {rstop}, detd, px, wl, sx, sy, sz; METHOD.md §3)")
    return DetectorGeometry(
        num_rows=num_row, num_cols=num_col, pixel_size_m=px, distance_m=detd, beam_center_px=(cx, cy),
        beam_direction=tuple(float(x) for x in s), wavelength_A=wl,
        beamstop_radius_px=beamstop_for_px(dist, qmin_px),
        resolution_max_A=resolution_for_px(lam_d, qmax_px), n_shells=qlen,
    )


def reference_detector_arrays(geometry: DetectorGeometry, mask: np.ndarray | None, res_max: float,
                              rstop: float) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """What the reference's make-detector writes (METHOD.md §3), for export: (qmax_px, qmin_px, q_px,
    pol, pixel id of each valid pixel), valid pixels sorted by |q_px| (stable)."""
    g = geometry
    dist = g.distance_px
    b = g.beam_vector_px
    rows, cols = np.meshgrid(np.arange(g.num_rows), np.arange(g.num_cols), indexing="ij")
    S = np.stack([b[0] + rows - g.beam_center_px[0], b[1] + cols - g.beam_center_px[1],
                  np.full(rows.shape, b[2])], axis=-1).reshape(-1, 3)
    norm = np.linalg.norm(S, axis=1)
    q_px = dist * (S / norm[:, None] - b / np.linalg.norm(b))
    qn = np.linalg.norm(q_px, axis=1)
    qmax_px = int(math.ceil(g.wavelength_A * dist / res_max))
    qmin_px = beamstop_qmin_px(dist, rstop)
    valid = (qn >= qmin_px) & (qn <= qmax_px)
    if mask is not None:
        valid &= ~np.asarray(mask, bool).ravel()
    ids = np.flatnonzero(valid)
    ids = ids[np.argsort(qn[ids], kind="stable")]
    pol = (1.0 - (S[ids, 1] / norm[ids]) ** 2) * np.abs(S[ids, 2]) / norm[ids] ** 3
    return qmax_px, qmin_px, q_px[ids], pol / pol.max(), ids


def check_detector(geometry: DetectorGeometry, q_px: np.ndarray, pol: np.ndarray, pixel_of: np.ndarray,
                   qmax_px: int, rec_path: pathlib.Path) -> tuple[Detector, np.ndarray]:
    """Build our Detector with the static mask implied by pix-map and check it against rec-vectors.bin.

    Returns (detector, mask). Raises DataError naming ``rec_path`` on any mismatch (pixel set, q within 1e-9
    relative, polarization within 1e-9, radial shells).
    """
    full = make_detector(geometry)
    mask = np.ones(geometry.num_pixels, bool)
    mask[pixel_of] = False
    mask_2d = mask.reshape(geometry.num_rows, geometry.num_cols)
    # Pixels outside the limits need no mask entry; keep the mask minimal (only pixels our limits keep).
    static = np.zeros(geometry.num_pixels, bool)
    static[full.pixel_id] = mask[full.pixel_id]
    try:
        det = make_detector(geometry, static.reshape(mask_2d.shape))
    except ConfigError as err:
        raise DataError(f"{rec_path}: {err}") from None
    if det.n_pix != pixel_of.shape[0] or not np.array_equal(np.sort(det.pixel_id), np.sort(pixel_of)):
        extra = np.setdiff1d(det.pixel_id, pixel_of).size
        missing = np.setdiff1d(pixel_of, det.pixel_id).size
        raise DataError(f"{rec_path}: {pixel_of.shape[0]} valid pixels, emcjax's make_detector keeps "
                        f"{det.n_pix} ({missing} of the file's missing, {extra} extra); expected the same pixels")
    lam_d = geometry.wavelength_A * geometry.distance_px
    pos = np.empty(geometry.num_pixels, np.int64)
    pos[det.pixel_id] = np.arange(det.n_pix)
    ours = pos[pixel_of]  # our index of the file's pixel t
    q_ref = q_px / lam_d
    err = np.abs(det.q[ours] - q_ref).max() / np.linalg.norm(q_ref, axis=1).max()
    if err > 1e-9:
        raise DataError(f"{rec_path}: pixel q vectors / (λD) differ from emcjax's by {err:.3g} (relative); "
                        "expected < 1e-9 (METHOD.md §3 geometry from config.ini)")
    perr = np.abs(det.polarization[ours] - pol).max()
    if perr > 1e-9:
        raise DataError(f"{rec_path}: polarization differs from emcjax's by {perr:.3g}; expected < 1e-9")
    qn = np.linalg.norm(q_px, axis=1)
    if np.any(np.diff(qn) < -1e-9 * qmax_px):
        raise DataError(f"{rec_path}: pixels are not sorted by |q|; expected ascending |q_px|")
    ref_shell = np.floor(qn / (qmax_px / geometry.n_shells)).astype(np.int64)
    bad = ref_shell != det.shell[ours]
    if np.any(bad):
        raise DataError(f"{rec_path}: {int(bad.sum())} pixels have reference radial bin floor(|q_px|/Δ) different "
                        "from emcjax's shell; expected identical bins")
    return det, static.reshape(mask_2d.shape)


# ---------------------------------------------------------------------------------------------------------
# Crystal
# ---------------------------------------------------------------------------------------------------------


def cell_from_basis(basis: np.ndarray, path: pathlib.Path) -> tuple[float, ...]:
    """(a, b, c, alpha, beta, gamma) of basis-vec.dat (columns a, b, c); the axes must be in emcjax's
    orientation (gemmi: a along x, b in the xy plane), since quaternions relate the lab to that frame."""
    a, b, c = basis[:, 0], basis[:, 1], basis[:, 2]
    la, lb, lc = (float(np.linalg.norm(v)) for v in (a, b, c))

    def angle(u, v):
        return math.degrees(math.acos(float(np.dot(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v))))

    cell = (la, lb, lc, angle(b, c), angle(a, c), angle(a, b))
    cell = tuple(round(x, 10) for x in cell)
    ours = Crystal(cell=cell, space_group="P 1").real_basis
    if np.abs(ours - basis).max() > 1e-6 * max(la, lb, lc):
        raise DataError(f"{path}: cell axes {basis.T.tolist()} (rows a, b, c) are not in emcjax's orientation "
                        f"{np.round(ours.T, 6).tolist()} (a along x, b in the xy plane); expected that orientation, "
                        "since quaternions and candidate lists refer to this crystal frame")
    return cell


def infer_space_group(cell: tuple[float, ...], sym_ops: np.ndarray, path: pathlib.Path) -> str:
    """The primitive point-group space group whose Laue group equals the operators of sym-op.dat."""
    basis = Crystal(cell=cell, space_group="P 1").reciprocal_basis
    hkl_ops = np.einsum("ij,njk,kl->nil", np.linalg.inv(basis), sym_ops, basis)
    rounded = np.rint(hkl_ops)
    if np.abs(hkl_ops - rounded).max() > 1e-6:
        raise DataError(f"{path}: operators are not integer matrices on hkl in this cell; expected Laue operators")
    ops = {r.astype(np.int64).tobytes() for r in rounded}
    ops |= {(-r).astype(np.int64).tobytes() for r in rounded}  # Friedel: emcjax always merges
    for symbol in _POINT_GROUP_SPACE_GROUPS:
        try:
            crystal = Crystal(cell=cell, space_group=symbol)
        except ConfigError:
            continue
        if {m.astype(np.int64).tobytes() for m in crystal.laue_ops} == ops:
            return symbol
    raise DataError(f"{path}: {len(sym_ops)} operators (with inversion {len(ops)}) match no Laue group for cell "
                    f"{cell}; expected a Laue group (pass --space-group)")

