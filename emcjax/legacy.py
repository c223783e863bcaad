"""Interoperability with EMC-for-SMX working directories (METHOD.md §13): ``python -m emcjax.legacy``.

* ``import DIR --out FILE.h5`` reads a reference working directory (``DIR/config.ini`` and the files it
  names) and writes an emcjax data set ``FILE.h5``, a run configuration ``FILE.toml`` (the
  reference-compatible EMC settings, usable with ``python -m emcjax.lowres --config FILE.toml``) and an
  initial-state run directory ``FILE-init/`` (``intensities.h5`` with the imported phi and model; the
  ``init_from`` of that TOML).
* ``export --run RUN --to DIR`` writes an emcjax run (its ``intensities.h5`` and the data set named in its
  ``config.toml``) as a reference working directory: config.ini, make-detector/rec-vectors.bin and
  pix-map.dat, aux/basis-vec.dat, aux/sym-op.dat, the quaternion file, the reduced data files, start-phi.dat,
  total-phi.dat, finish_intensity.bin and hkl-val.dat.

Conventions kept exactly: frame order (the reduced, load-balanced order of the reference), frame ids,
rotation indices (row r of ``c-quaternion<n>.bin`` is ``sample_600cell(n)`` rotation r; checked on import),
the transposed quaternion convention (``crystal_from_lab``), per-frame dead pixels (-1 in the data file)
and masked background shells (-1). Geometry: emcjax uses exact limits in 1/Å, the reference whole pixel
units; import picks ``resolution_max_A = λD/q_max_px`` and the beam-stop radius whose limit is
``q_min_px/(λD)``, so that ``make_detector`` keeps exactly the pixels of ``rec-vectors.bin`` (checked, with
their q, polarization and radial shells). The voxel grids differ (docs/ARCHITECTURE.md): models are moved
between them by evaluating one program's trilinear model W(q) at the other program's voxel positions; this
is exact (to rounding) when the reference's Cartesian grid coincides with emcjax's lattice-aligned grid
(orthogonal cells with ``VN |a_i*| / min|a*|`` integer), an interpolation otherwise (docs/LEGACY.md).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import sys
from typing import Any

import tyro

import numpy as np

from emcjax import data as data_io
from emcjax import runio
from emcjax.crystal import Crystal
from emcjax.detector import Detector, DetectorGeometry, make_detector
from emcjax.errors import ConfigError, DataError, EmcjaxError

__all__ = [
    "read_config_ini",
    "LegacyDirectory",
    "read_legacy",
    "ReferenceGrid",
    "reference_grid",
    "model_to_reference",
    "reference_to_model",
    "import_directory",
    "export_run",
    "reference_compatible_config",
]

_Positional = tyro.conf.Positional

# Fixed locations inside a reference working directory (METHOD.md §2).
REC_VECTORS = "make-detector/rec-vectors.bin"
PIX_MAP_DAT = "make-detector/pix-map.dat"
PIX_MAP_BIN = "make-detector/pix-map.bin"
BASIS_VEC = "aux/basis-vec.dat"
SYM_OP = "aux/sym-op.dat"

# Space groups tried (in order) when inferring from sym-op.dat: the primitive group of the rotation point
# group of each Laue class (systematic absences cannot be inferred from Laue operators).
_POINT_GROUP_SPACE_GROUPS = (
    "P 1", "P 1 2 1", "P 1 1 2", "P 2 1 1", "P 2 2 2", "P 4", "P 4 2 2", "P 3", "P 3 1 2", "P 3 2 1",
    "P 6", "P 6 2 2", "P 2 3", "P 4 3 2",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# config.ini
# ---------------------------------------------------------------------------------------------------------


def read_config_ini(path: str | pathlib.Path) -> dict[str, str]:
    """Keys of a reference config.ini, parsed like the C programs (METHOD.md §1).

    Each line is split at spaces and '=' (``strtok(line, " =")``); the first token is the key, the second
    its value; section headers and lines with fewer than two tokens are ignored; a later line overrides an
    earlier one with the same key (sections do not scope keys).
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected the reference's config.ini)") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        tokens = [t for t in re.split(r"[ =\t\r\n]+", line) if t]
        if len(tokens) < 2 or tokens[0].startswith(("[", "#", ";")):
            continue
        out[tokens[0]] = tokens[1]
    return out


def _key(cfg: dict, key: str, where: pathlib.Path, kind: type = str, what: str = "") -> Any:
    if key not in cfg:
        raise DataError(f"{where}: key '{key}' is missing; expected {what or kind.__name__}")
    try:
        return kind(cfg[key])
    except ValueError:
        raise DataError(f"{where}: key '{key}' = {cfg[key]!r}; expected {what or kind.__name__}") from None


# ---------------------------------------------------------------------------------------------------------
# Binary/text readers (each names its file and what it expected)
# ---------------------------------------------------------------------------------------------------------


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected {what})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory (expected {what})") from None


def _read_text(path: pathlib.Path, what: str) -> list[str]:
    return _read_bytes(path, what).decode("utf-8", errors="replace").split()


def _floats(path: pathlib.Path, tokens: list[str], what: str) -> np.ndarray:
    try:
        return np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{path}: {err}; expected {what}") from None


def _ints(path: pathlib.Path, tokens: list[str], what: str) -> np.ndarray:
    try:
        return np.array([int(t) for t in tokens], dtype=np.int64)
    except ValueError as err:
        raise DataError(f"{path}: {err}; expected {what}") from None


def read_rec_vectors(path: pathlib.Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """``rec-vectors.bin``: (q_max_px, q_min_px, q_px (n, 3) float64 pixel units, pol (n,) float64)."""
    what = "int32 qmax_px, int32 qmin_px, int32 Npix, then Npix x float64 (qx, qy, qz, pol)"
    raw = _read_bytes(path, what)
    if len(raw) < 12:
        raise DataError(f"{path}: {len(raw)} bytes; expected at least a 12-byte header ({what})")
    qmax_px, qmin_px, n = (int(x) for x in np.frombuffer(raw[:12], "<i4"))
    if n < 0 or len(raw) != 12 + 32 * n:
        raise DataError(f"{path}: {len(raw)} bytes with Npix = {n} in the header; expected {12 + 32 * max(n, 0)} "
                        f"bytes ({what})")
    rec = np.frombuffer(raw[12:], "<f8").reshape(n, 4)
    return qmax_px, qmin_px, rec[:, :3].copy(), rec[:, 3].copy()


def read_pix_map(directory: pathlib.Path, total_pix: int, n_valid: int) -> tuple[np.ndarray, pathlib.Path]:
    """``pix-map.dat`` (text) or ``pix-map.bin`` (int32): valid-pixel index of every raw pixel or -1."""
    what = (f"{total_pix} entries (num_row x num_col), each the index of the raw pixel in rec-vectors.bin "
            f"(0..{n_valid - 1}) or -1")
    dat, binf = directory / PIX_MAP_DAT, directory / PIX_MAP_BIN
    if dat.exists():
        path, pix_map = dat, _ints(dat, _read_text(dat, what), what)
    elif binf.exists():
        raw = _read_bytes(binf, what)
        if len(raw) != 4 * total_pix:
            raise DataError(f"{binf}: {len(raw)} bytes; expected {4 * total_pix} (int32 x {what})")
        path, pix_map = binf, np.frombuffer(raw, "<i4").astype(np.int64)
    else:
        raise DataError(f"{dat}: no such file (nor {binf}); expected {what}")
    if pix_map.shape != (total_pix,):
        raise DataError(f"{path}: {pix_map.shape[0]} entries; expected {what}")
    valid = pix_map >= 0
    if np.any(pix_map < -1) or np.any(pix_map >= n_valid) or valid.sum() != n_valid \
            or not np.array_equal(np.sort(pix_map[valid]), np.arange(n_valid)):
        raise DataError(f"{path}: entries are not a permutation of 0..{n_valid - 1} plus -1; expected {what}")
    return pix_map, path


def read_matrix_file(path: pathlib.Path, count: int | None, what: str) -> np.ndarray:
    """``basis-vec.dat`` (count None: 9 numbers) or ``sym-op.dat`` (a count, then count x 9 numbers)."""
    tokens = _read_text(path, what)
    if count is None:
        vals = _floats(path, tokens, what)
        if vals.shape != (9,):
            raise DataError(f"{path}: {vals.shape[0]} numbers; expected {what}")
        return vals.reshape(3, 3)
    if not tokens:
        raise DataError(f"{path}: empty; expected {what}")
    n = _ints(path, tokens[:1], what)[0]
    vals = _floats(path, tokens[1:], what)
    if n < 1 or vals.shape != (9 * n,):
        raise DataError(f"{path}: count {n} and {vals.shape[0]} numbers; expected {what} (count x 9 numbers)")
    return vals.reshape(n, 3, 3)


def read_quaternion_file(path: pathlib.Path) -> tuple[int, np.ndarray]:
    """``c-quaternion<n>.bin``: (n parsed from the name, (N, 5) float64 rows q0, q1, q2, q3, w)."""
    m = re.search(r"quaternion(\d+)\.bin$", path.name)
    if m is None:
        raise DataError(f"{path}: file name does not end in 'quaternion<n>.bin'; expected the 600-cell sampling "
                        "c-quaternion<n>.bin (n is read from the name)")
    n = int(m.group(1))
    n_rot = data_io.rotation_count(n)
    what = f"int32 N = {n_rot} (10(5n^3+n) for n = {n}), then N x float64 (q0, q1, q2, q3, w)"
    raw = _read_bytes(path, what)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes; expected {what}")
    count = int(np.frombuffer(raw[:4], "<i4")[0])
    if count != n_rot or len(raw) != 4 + 40 * n_rot:
        raise DataError(f"{path}: header N = {count}, {len(raw)} bytes; expected {what} ({4 + 40 * n_rot} bytes)")
    return n, np.frombuffer(raw[4:], "<f8").reshape(n_rot, 5).copy()


def read_prob_orien(path: pathlib.Path, n_frames: int, n_rot: int) -> tuple[np.ndarray, np.ndarray]:
    """``prob-orien.bin``: per frame int32 count + int32 ids -> (offsets (N+1,), rotations) int64."""
    what = f"{n_frames} records of int32 count then count int32 rotation ids in [0, {n_rot})"
    raw_bytes = _read_bytes(path, what)
    if len(raw_bytes) % 4 != 0:
        raise DataError(f"{path}: {len(raw_bytes)} bytes is not a multiple of 4; expected {what}")
    raw = np.frombuffer(raw_bytes, "<i4")
    offsets = np.zeros(n_frames + 1, np.int64)
    pos = 0
    for d in range(n_frames):
        if pos >= raw.shape[0]:
            raise DataError(f"{path}: ends after {d} frame records; expected {what}")
        c = int(raw[pos])
        if c < 0 or pos + 1 + c > raw.shape[0]:
            raise DataError(f"{path}: frame {d} has count {c} at int32 {pos} beyond the file end; expected {what}")
        offsets[d + 1] = offsets[d] + c
        pos += 1 + c
    if pos != raw.shape[0]:
        raise DataError(f"{path}: {raw.shape[0] - pos} int32 values left after {n_frames} frame records; "
                        f"expected {what}")
    keep = np.ones(raw.shape[0], bool)
    keep[(offsets[:-1] + np.arange(n_frames)).astype(np.int64)] = False  # the count words
    ids = raw[keep].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_rot):
        raise DataError(f"{path}: rotation id {int(ids.min()) if ids.min() < 0 else int(ids.max())} out of "
                        f"range; expected {what}")
    return offsets, ids


def read_data_ids(path: pathlib.Path) -> np.ndarray:
    """``reduced-data_id.dat``: N, then N raw frame indices."""
    what = "text: N, then N raw frame indices"
    vals = _ints(path, _read_text(path, what), what)
    if vals.size == 0 or vals[0] < 0 or vals.shape[0] != vals[0] + 1:
        raise DataError(f"{path}: {vals.size} numbers with N = {vals[0] if vals.size else None}; expected {what}")
    return vals[1:]


def read_phi(path: pathlib.Path, n_frames: int) -> np.ndarray:
    what = f"text, one float per reduced frame ({n_frames} values)"
    vals = _floats(path, _read_text(path, what), what)
    if vals.shape != (n_frames,):
        raise DataError(f"{path}: {vals.shape[0]} values; expected {what}")
    return vals


def read_float64_array(path: pathlib.Path, shape: tuple[int, ...], what: str) -> np.ndarray:
    raw = _read_bytes(path, what)
    size = int(np.prod(shape)) * 8
    if len(raw) != size:
        raise DataError(f"{path}: {len(raw)} bytes; expected {size} bytes ({what})")
    return np.frombuffer(raw, "<f8").reshape(shape).copy()


def read_datafile(path: pathlib.Path, n_frames: int, n_pix: int) -> np.ndarray:
    what = f"int16[{n_frames}][{n_pix}] (frames x full_num_pix valid pixels, -1 = invalid)"
    size = n_frames * n_pix * 2
    if not path.exists():
        raise DataError(f"{path}: no such file (expected {what})")
    if path.stat().st_size != size:
        raise DataError(f"{path}: {path.stat().st_size} bytes; expected {size} bytes ({what})")
    return np.memmap(path, dtype="<i2", mode="r", shape=(n_frames, n_pix))


# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------


def _distance_px(detd: float, px: float, s: np.ndarray) -> float:
    return detd / px * float(np.linalg.norm(s)) / abs(float(s[2]))


def _resolution_for_px(lam_d: float, q_px: int) -> float:
    """The largest-ish d with ceil(λD/d) == q_px (d ≈ λD/q_px, nudged by ulps against rounding)."""
    d = lam_d / q_px
    for _ in range(64):
        if math.ceil(lam_d / d) <= q_px:
            break
        d = float(np.nextafter(d, np.inf))
    return d


def _qmin_px(distance_px: float, rstop: float) -> int:
    return int(math.ceil(2.0 * distance_px * math.sin(0.5 * math.atan(rstop / distance_px))))


def _beamstop_for_px(distance_px: float, q_px: int) -> float:
    """Beam-stop radius R (pixels) whose inner limit 2D sin(atan(R/D)/2) is q_px (pixel units)."""
    if q_px <= 0:
        return 0.0
    r = distance_px * math.tan(2.0 * math.asin(min(q_px / (2.0 * distance_px), 1.0)))
    for _ in range(64):
        if _qmin_px(distance_px, r) <= q_px:
            break
        r = float(np.nextafter(r, 0.0))
    return r


def geometry_from_config(cfg: dict, config_path: pathlib.Path, qmax_px: int, qmin_px: int,
                         rec_path: pathlib.Path) -> DetectorGeometry:
    """A DetectorGeometry whose exact limits reproduce the reference's whole-pixel limits (module doc)."""
    num_row = _key(cfg, "num_row", config_path, int)
    num_col = _key(cfg, "num_col", config_path, int)
    px = _key(cfg, "px", config_path, float, "pixel size in m")
    detd = _key(cfg, "detd", config_path, float, "detector distance in m")
    wl = _key(cfg, "wl", config_path, float, "wavelength in Å")
    cx = _key(cfg, "cx", config_path, float, "beam centre row in pixels")
    cy = _key(cfg, "cy", config_path, float, "beam centre column in pixels")
    s = np.array([_key(cfg, k, config_path, float, "beam direction component") for k in ("sx", "sy", "sz")])
    rstop = _key(cfg, "Rstop", config_path, float, "beam-stop radius in pixels")
    res_max = _key(cfg, "res_max", config_path, float, "outer resolution in Å")
    qlen = _key(cfg, "qlen", config_path, int, "number of radial background bins")
    if not s[2] < 0:
        raise DataError(f"{config_path}: sz = {s[2]}; expected < 0 (beam along -z)")
    dist = _distance_px(detd, px, s)
    lam_d = wl * dist
    want_max, want_min = int(math.ceil(lam_d / res_max)), _qmin_px(dist, rstop)
    if (want_max, want_min) != (qmax_px, qmin_px):
        raise DataError(
            f"{rec_path}: header qmax_px = {qmax_px}, qmin_px = {qmin_px}; expected ({want_max}, {want_min}) from "
            f"{config_path} (res_max = {res_max}, Rstop = {rstop}, detd, px, wl, sx, sy, sz; METHOD.md §3)")
    return DetectorGeometry(
        num_rows=num_row, num_cols=num_col, pixel_size_m=px, distance_m=detd, beam_center_px=(cx, cy),
        beam_direction=tuple(float(x) for x in s), wavelength_A=wl,
        beamstop_radius_px=_beamstop_for_px(dist, qmin_px),
        resolution_max_A=_resolution_for_px(lam_d, qmax_px), n_shells=qlen,
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
    qmin_px = _qmin_px(dist, rstop)
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


# ---------------------------------------------------------------------------------------------------------
# The reference's voxel grid (METHOD.md §4.2-4.3)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReferenceGrid:
    """Kept (non-partial) reflections and their voxel sets S_h on the reference's Cartesian grid.

    Attributes:
      spacing: δv = min|a*|/VN (1/Å).
      hkl: (n_hkl, 3) int64 kept reflections, lexicographic (the reference's hkl_table).
      box: (hmax, kmax, lmax) of the reference's hkl box (hkl-val.dat header).
      voxels: (n_vox_total, 3) int64 grid points g (voxel units), concatenated over hkl in S_h order.
      owner: (n_vox_total,) int64 row of ``hkl`` each voxel belongs to.
      offsets: (n_hkl + 1,) int64 CSR offsets of each reflection's voxels.
    """

    spacing: float
    hkl: np.ndarray
    box: tuple[int, int, int]
    voxels: np.ndarray
    owner: np.ndarray
    offsets: np.ndarray

    @property
    def n_voxels(self) -> int:
        return int(self.voxels.shape[0])


def _reference_reciprocal(real_basis: np.ndarray) -> np.ndarray:
    a, b, c = real_basis[:, 0], real_basis[:, 1], real_basis[:, 2]
    vol = abs(float(np.dot(np.cross(a, b), c)))
    return np.stack([np.cross(b, c) / vol, np.cross(c, a) / vol, np.cross(a, b) / vol], axis=1)


def reference_grid(real_basis: np.ndarray, r_min: float, r_max: float, vn: int, gw: float) -> ReferenceGrid:
    """The reference's hkl table and S_h (METHOD.md §4.2-4.3), in its orders.

    Boundary points at distance exactly gw are included (relative tolerance 1e-9, as emcjax's grid does).
    """
    rl = _reference_reciprocal(np.asarray(real_basis, np.float64))
    lens = np.linalg.norm(rl, axis=0)
    spacing = float(lens.min()) / vn
    box = [int(math.floor(r_max / x)) for x in lens]
    # grow the box while a lattice point on a face lies inside the sphere (oblique cells)
    for axis in range(3):
        while True:
            rng = [np.arange(-m, m + 1) for m in box]
            rng[axis] = np.array([-box[axis], box[axis]])
            g = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3) @ rl.T
            if np.any(np.einsum("ij,ij->i", g, g) < r_max**2):
                box[axis] += 1
            else:
                break
    rng = [np.arange(-m, m + 1) for m in box]
    hkl = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
    centre = (hkl @ rl.T) / spacing
    half_grid = int(math.ceil(r_max / spacing))
    ext = int(math.ceil(gw)) + 1
    cube = np.stack(np.meshgrid(*[np.arange(-ext, ext + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    # cheap pre-filter: only reflections whose sphere can touch the shell
    cn = np.linalg.norm(centre, axis=1) * spacing
    cand = np.flatnonzero((cn <= r_max + 2 * gw * spacing) & (cn >= r_min - 2 * gw * spacing))
    t = np.rint(centre[cand]).astype(np.int64)
    pts = t[:, None, :] + cube[None]  # (n, c, 3) x-major order
    d2 = np.sum((pts - centre[cand][:, None, :]) ** 2, axis=-1)
    inside = (d2 <= gw * gw * (1 + 1e-9)) & np.all(np.abs(pts) <= half_grid, axis=-1)
    r = np.linalg.norm(pts, axis=-1) * spacing
    ok = np.where(inside, (r >= r_min) & (r <= r_max), True).all(axis=1) & inside.any(axis=1)
    keep = cand[ok]
    inside = inside[ok]
    pts = pts[ok]
    counts = inside.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ReferenceGrid(spacing=spacing, hkl=hkl[keep].astype(np.int64), box=(box[0], box[1], box[2]),
                         voxels=pts[inside].astype(np.int64),
                         owner=np.repeat(np.arange(keep.shape[0]), counts).astype(np.int64),
                         offsets=offsets)


def _snap(x: np.ndarray) -> np.ndarray:
    r = np.rint(x)
    return np.where(np.abs(x - r) < 1e-7, r, x)


_CORNERS = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], np.int64)


def _encode(parts: list[np.ndarray], span: int) -> np.ndarray:
    key = np.zeros(parts[0].shape, np.int64)
    for p in parts:
        key = key * span + (p + span // 2)
    return key


def _reference_sampling(grid, ref: ReferenceGrid) -> tuple[np.ndarray, np.ndarray]:
    """The linear map from emcjax's model to the reference's voxels: (columns, weights), each (n_ref, 8).

    Row r is reference voxel r (finish_intensity.bin order); its value is sum_k weights[r, k] *
    flat[columns[r, k]] with ``flat`` the asymmetric-unit model raveled, column ``n_asu * n_voxels`` (the
    zero sentinel) for corners outside the support and for reflections emcjax does not model. W is evaluated
    like ``emcjax.model.slice_points`` (trilinear on the lattice-aligned grid, corners outside the support
    dropped) but in float64 and with the reflection fixed to the voxel's own h (so a voxel at exactly the
    support radius is not lost to rounding).
    """
    full_to_asu = grid.full_to_asu()
    n_vox = grid.n_voxels
    sentinel = grid.n_asu * n_vox
    span = 2 * int(np.abs(grid.hkl).max() + np.abs(ref.hkl).max() + 2) + 1
    our_keys = _encode([grid.hkl[:, 0], grid.hkl[:, 1], grid.hkl[:, 2]], span)
    order = np.argsort(our_keys)
    ref_keys = _encode([ref.hkl[:, 0], ref.hkl[:, 1], ref.hkl[:, 2]], span)
    at = np.clip(np.searchsorted(our_keys[order], ref_keys), 0, len(order) - 1)
    ours_of_ref = np.where(our_keys[order][at] == ref_keys, order[at], -1)
    refl = ours_of_ref[ref.owner]
    q = ref.voxels * ref.spacing  # crystal frame, 1/Å
    frac = q @ np.linalg.inv(grid.crystal.reciprocal_basis).T
    local = _snap(grid.divisions * (frac - ref.hkl[ref.owner]))
    base = np.floor(local).astype(np.int64)
    t = local - base
    off_span = 2 * int(np.abs(grid.offsets).max() + 3) + 1
    off_keys = _encode([grid.offsets[:, i].astype(np.int64) for i in range(3)], off_span)
    off_order = np.argsort(off_keys)
    columns = np.empty((ref.n_voxels, 8), np.int64)
    weights = np.empty((ref.n_voxels, 8))
    for k, c in enumerate(_CORNERS):
        corner = base + c
        key = _encode([corner[:, i] for i in range(3)], off_span)
        pos = np.clip(np.searchsorted(off_keys[off_order], key), 0, n_vox - 1)
        j = np.where(off_keys[off_order][pos] == key, off_order[pos], n_vox)
        columns[:, k] = np.where(refl >= 0, full_to_asu[np.maximum(refl, 0), j], sentinel)
        weights[:, k] = np.prod(np.where(c == 1, t, 1.0 - t), axis=1)
    return columns, weights


def model_to_reference(grid, intensity: np.ndarray, ref: ReferenceGrid) -> np.ndarray:
    """emcjax's model W(q) at every reference voxel (float64, in finish_intensity.bin order).

    Reflections emcjax does not model (systematic absences, reflections its non-partial rule drops) get 0.
    """
    flat = np.append(np.asarray(intensity, np.float64).ravel(), 0.0)
    columns, weights = _reference_sampling(grid, ref)
    return np.sum(weights * flat[columns], axis=1)


def _interpolated_model(grid, ref: ReferenceGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's model W(q) at emcjax's voxels, averaged over symmetry mates.

    For every reflection h of ``grid.hkl`` that the reference also holds and every voxel j, W is the
    reference's trilinear interpolation (METHOD.md §5.2: corners outside S_h dropped, no renormalisation) at
    G_h + offset_j; the value lands on the asymmetric-unit voxel that (h, j) shows, averaged over the mates.

    Returns:
      ((n_asu, n_voxels) float64 model, (n_asu, n_voxels) int64 number of mates averaged; 0 = no data, 0).
    """
    values = np.asarray(values, np.float64)
    span = 2 * int(np.abs(grid.hkl).max() + np.abs(ref.hkl).max() + 2) + 1
    ref_keys = _encode([ref.hkl[:, i] for i in range(3)], span)  # sorted: lexicographic hkl
    our_keys = _encode([grid.hkl[:, i] for i in range(3)], span)
    at = np.clip(np.searchsorted(ref_keys, our_keys), 0, len(ref_keys) - 1)
    ref_of_ours = np.where(ref_keys[at] == our_keys, at, -1)
    hs = np.flatnonzero(ref_of_ours >= 0)
    n_vox = grid.n_voxels
    h_idx = np.repeat(hs, n_vox)
    j_idx = np.tile(np.arange(n_vox), hs.shape[0])
    q = (grid.hkl[h_idx] + grid.offsets[j_idx] / grid.divisions) @ grid.crystal.reciprocal_basis.T
    u = _snap(q / ref.spacing)
    base = np.floor(u).astype(np.int64)
    t = u - base
    vspan = 2 * int(max(np.abs(ref.voxels).max(), np.abs(base).max()) + 3) + 1
    vox_keys = ref.owner * vspan**3 + _encode([ref.voxels[:, i] for i in range(3)], vspan)
    vorder = np.argsort(vox_keys)
    sorted_keys = vox_keys[vorder]
    owner = ref_of_ours[h_idx]
    value = np.zeros(h_idx.shape[0])
    for c in _CORNERS:
        corner = base + c
        key = owner * vspan**3 + _encode([corner[:, i] for i in range(3)], vspan)
        pos = np.clip(np.searchsorted(sorted_keys, key), 0, len(vorder) - 1)
        hit = sorted_keys[pos] == key
        w = np.prod(np.where(c == 1, t, 1.0 - t), axis=1)
        value += np.where(hit, w * values[vorder[pos]], 0.0)
    target = grid.full_to_asu()[h_idx, j_idx]
    size = grid.n_asu * n_vox
    total = np.bincount(target, weights=value, minlength=size)[:size]
    count = np.bincount(target, minlength=size)[:size]
    model = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return model.reshape(grid.model_shape), count.reshape(grid.model_shape)


def reference_to_model(grid, ref: ReferenceGrid, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The emcjax model whose reference-voxel values (:func:`model_to_reference`) best match ``values``.

    Least squares over every reference voxel of every symmetry mate, solved per unique reflection (the map is
    block diagonal: a reference voxel only sees its own reflection's profile). Where the reference's voxels
    do not determine emcjax's (grids that do not coincide), the solution closest to the reference's own
    trilinear interpolation at emcjax's voxels (:func:`_interpolated_model`) is taken. So exporting the
    imported model reproduces the file exactly (up to rounding) whenever it came from an emcjax export, and
    on grids that coincide the model itself comes back exactly. Voxels no reference voxel sees keep the
    interpolated value.

    Returns:
      ((n_asu, n_voxels) float64 model, (n_asu, n_voxels) int64 number of reference voxels that see each voxel).
    """
    values = np.asarray(values, np.float64)
    columns, weights = _reference_sampling(grid, ref)
    n_asu, n_vox = grid.model_shape
    live = columns < n_asu * n_vox
    weights = np.where(live, weights, 0.0)
    has = np.any(live & (weights > 0), axis=1)
    start, _ = _interpolated_model(grid, ref, values)
    columns, weights, values = columns[has], weights[has], values[has]
    block = columns[np.arange(columns.shape[0]), np.argmax(live[has], axis=1)] // n_vox  # one reflection per row
    j = np.where(columns < n_asu * n_vox, columns % n_vox, 0)
    normal = np.zeros((n_asu, n_vox, n_vox))
    rhs = np.zeros((n_asu, n_vox))
    np.add.at(normal, (block[:, None, None], j[:, :, None], j[:, None, :]), weights[:, :, None] * weights[:, None, :])
    np.add.at(rhs, (block[:, None], j), weights * values[:, None])
    count = np.zeros((n_asu, n_vox), np.int64)
    np.add.at(count, (block[:, None], j), (weights > 0).astype(np.int64))
    residual = rhs - np.einsum("aij,aj->ai", normal, start)
    model = start + np.einsum("aij,aj->ai", np.linalg.pinv(normal, rcond=1e-10, hermitian=True), residual)
    return model, count


# ---------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LegacyDirectory:
    """Everything read from a reference working directory (arrays in the reference's orders)."""

    root: pathlib.Path
    config: dict
    geometry: DetectorGeometry
    detector: Detector
    mask: np.ndarray
    pixel_of: np.ndarray  # (full_num_pix,) raw pixel id of the file's valid pixel t
    cell: tuple
    space_group: str
    sym_ops: np.ndarray
    quaternion_n: int
    quaternions: np.ndarray  # (n_rot, 5)
    frames: data_io.SparseFrames
    phi: np.ndarray
    phi_file: pathlib.Path
    intensity_file: pathlib.Path | None
    intensity: np.ndarray | None  # reference voxel values
    vn: int
    gw: float
    res_cutoff: float
    d_min: float
    ref_grid: ReferenceGrid


def _resolve(root: pathlib.Path, cfg: dict, key: str, default: str | None = None) -> pathlib.Path:
    """Path of a config value: as written if it exists, else rebased from home_dir onto root, else root/value."""
    if key not in cfg:
        if default is None:
            raise DataError(f"{root / 'config.ini'}: key '{key}' is missing; expected a file path")
        return root / default
    value = pathlib.Path(cfg[key])
    if value.is_absolute():
        if value.exists():
            return value
        home = cfg.get("home_dir")
        if home:
            try:
                return root / value.relative_to(home)
            except ValueError:
                pass
        return root / value.name if not (root / value.name).exists() else root / value.name
    return root / value


def _sampling_check(n: int, quats: np.ndarray, path: pathlib.Path) -> None:
    from emcjax.rotations import sample_600cell

    s = sample_600cell(n)
    dots = np.abs(np.einsum("ij,ij->i", s.quaternions, quats[:, :4]))
    bad = np.flatnonzero(dots < 1 - 1e-9)
    if bad.size:
        r = int(bad[0])
        raise DataError(f"{path}: row {r} is {quats[r, :4].tolist()}, emcjax's sample_600cell({n}) row {r} is "
                        f"{s.quaternions[r].tolist()} ({bad.size} rows differ); expected the reference's 600-cell "
                        "order (rotation indices would not carry over)")
    w = quats[:, 4] / quats[:, 4].sum()
    werr = np.abs(np.log(w) - s.log_weights).max()
    if werr > 1e-6:
        raise DataError(f"{path}: weights differ from sample_600cell({n})'s by {werr:.3g} in log; expected < 1e-6")


def read_legacy(root: str | pathlib.Path, space_group: str | None = None, check_quaternions: bool = True) -> LegacyDirectory:
    """Reads and checks a reference working directory (see module docstring). Raises DataError naming the
    file and what was expected on anything missing, mis-sized or inconsistent."""
    root = pathlib.Path(root)
    cfg_path = root / "config.ini"
    cfg = read_config_ini(cfg_path)
    rec_path = root / REC_VECTORS
    qmax_px, qmin_px, q_px, pol = read_rec_vectors(rec_path)
    geometry = geometry_from_config(cfg, cfg_path, qmax_px, qmin_px, rec_path)
    n_pix = q_px.shape[0]
    pix_map, _ = read_pix_map(root, geometry.num_pixels, n_pix)
    pixel_of = np.empty(n_pix, np.int64)
    pixel_of[pix_map[pix_map >= 0]] = np.flatnonzero(pix_map >= 0)
    detector, mask = check_detector(geometry, q_px, pol, pixel_of, qmax_px, rec_path)

    basis_path, sym_path = root / BASIS_VEC, root / SYM_OP
    basis = read_matrix_file(basis_path, None, "text 3x3, columns = a, b, c in Å")
    cell = cell_from_basis(basis, basis_path)
    sym_ops = read_matrix_file(sym_path, 0, "text: count, then count lines of 9 numbers (row-major 3x3)")
    inferred = infer_space_group(cell, sym_ops, sym_path)
    if space_group is None:
        space_group = inferred
    else:
        given = Crystal(cell=cell, space_group=space_group)
        if {m.tobytes() for m in given.laue_ops.astype(np.int64)} != \
                {m.tobytes() for m in Crystal(cell=cell, space_group=inferred).laue_ops.astype(np.int64)}:
            raise ConfigError(f"space_group {space_group!r} has another Laue group than {sym_path} "
                              f"({inferred!r}); expected the same Laue group")

    quat_path = _resolve(root, cfg, "quat_file")
    n, quats = read_quaternion_file(quat_path)
    if check_quaternions:
        _sampling_check(n, quats, quat_path)

    ids_path = _resolve(root, cfg, "reduced_data_id_file")
    frame_id = read_data_ids(ids_path)
    n_frames = frame_id.shape[0]
    qlen = geometry.n_shells
    bg_path = _resolve(root, cfg, "mpi_bgfile")
    background = read_float64_array(bg_path, (n_frames, qlen), f"float64[{n_frames}][{qlen}] (frames x qlen)")
    bad_bg = (background < 0) & (background != -1)
    if np.any(bad_bg) or not np.all(np.isfinite(background)):
        raise DataError(f"{bg_path}: values must be finite and >= 0 or exactly -1 (masked shell)")
    data_path = _resolve(root, cfg, "mpi_datafile")
    dense = read_datafile(data_path, n_frames, n_pix)
    po_path = _resolve(root, cfg, "prob_orien_file")
    cand_off, cand = read_prob_orien(po_path, n_frames, quats.shape[0])

    photon_off, photon_pix, photon_cnt, dead_off, dead_pix = [0], [], [], [0], []
    for d in range(n_frames):
        row = np.asarray(dense[d])
        if np.any(row < -1):
            raise DataError(f"{data_path}: frame {d} holds counts < -1; expected counts >= 0 or -1 (invalid)")
        hit = np.flatnonzero(row > 0)
        pids = pixel_of[hit]
        o = np.argsort(pids)
        photon_pix.append(pids[o])
        photon_cnt.append(row[hit][o].astype(np.int32))
        photon_off.append(photon_off[-1] + hit.size)
        dead = np.sort(pixel_of[row < 0])
        dead_pix.append(dead)
        dead_off.append(dead_off[-1] + dead.size)
    frames = data_io.SparseFrames(
        frame_id=frame_id, photon_offsets=np.asarray(photon_off), photon_pixels=np.concatenate(photon_pix),
        photon_counts=np.concatenate(photon_cnt), dead_offsets=np.asarray(dead_off),
        dead_pixels=np.concatenate(dead_pix), background=background.astype(np.float32),
        candidate_offsets=cand_off, candidate_rotations=cand,
    )
    frames.validate(num_pixels=geometry.num_pixels, num_rotations=quats.shape[0], n_shells=qlen)

    phi_path = None
    for key in ("start_phi_file",):
        if key in cfg:
            phi_path = _resolve(root, cfg, key)
    if phi_path is None or not phi_path.exists():
        alt = root / "total-phi.dat"
        phi_path = alt if alt.exists() else (phi_path or root / "aux/start-phi.dat")
    phi = read_phi(phi_path, n_frames)

    vn = _key(cfg, "VN", cfg_path, int, "voxels per min|a*| (VN)")
    gw = _key(cfg, "gw", cfg_path, float, "peak radius in voxels (gw)")
    res_cutoff = _key(cfg, "res_cutoff", cfg_path, float, "low-res cutoff in Å")
    lam_d = geometry.wavelength_A * geometry.distance_px
    qcut_px = int(math.ceil(lam_d / res_cutoff))
    if qcut_px > qmax_px:
        raise DataError(f"{cfg_path}: res_cutoff = {res_cutoff} Å is beyond res_max = {_key(cfg, 'res_max', cfg_path, float)} "
                        "Å; expected res_cutoff >= res_max")
    d_min = _resolution_for_px(lam_d, qcut_px)
    real_basis = Crystal(cell=cell, space_group="P 1").real_basis
    ref = reference_grid(real_basis, qmin_px / lam_d, qcut_px / lam_d, vn, gw)

    intensity_file, intensity = None, None
    candidates = []
    if "start_intens_file" in cfg:
        candidates.append(_resolve(root, cfg, "start_intens_file"))
    candidates += [root / "finish_intensity.bin", root / "aux/start_intensity.bin"]
    for p in candidates:
        if p.exists():
            intensity_file = p
            intensity = read_float64_array(
                p, (ref.n_voxels,), f"float64 x {ref.n_voxels} voxels ({len(ref.hkl)} non-partial hkl to "
                f"res_cutoff {res_cutoff} Å, VN = {vn}, gw = {gw}; METHOD.md §4.3)")
            break
    return LegacyDirectory(
        root=root, config=cfg, geometry=geometry, detector=detector, mask=mask, pixel_of=pixel_of, cell=cell,
        space_group=space_group, sym_ops=sym_ops, quaternion_n=n, quaternions=quats, frames=frames, phi=phi,
        phi_file=phi_path, intensity_file=intensity_file, intensity=intensity, vn=vn, gw=gw,
        res_cutoff=res_cutoff, d_min=d_min, ref_grid=ref,
    )


def reference_compatible_config(legacy: LegacyDirectory) -> dict:
    """EMCConfig fields that follow the reference's rules (docs/LEGACY.md)."""
    counts = np.diff(legacy.frames.candidate_offsets)
    return {
        "rotation_n": int(legacy.quaternion_n),
        "reduce_by_symmetry": False,
        "vn": int(legacy.vn),
        "gw": float(legacy.gw),
        "d_min": float(legacy.d_min),
        "intensity_update": "reference",
        "inner_iterations": 1,
        "update_phi": True,
        "prune_mass": 0.999,
        "prune_min": 1e-4,
        "max_kept": int(max(int(counts.max()) if counts.size else 1, 1)),
    }


def emc_grid(dataset_geometry: dict, mask, crystal: Crystal, d_min: float | None, vn: int, gw: float):
    """The model grid that ``emcjax.emc.setup_problem`` builds for these settings (without the data)."""
    from emcjax import model as model_lib

    geometry = DetectorGeometry(**dataset_geometry)
    det = make_detector(geometry, mask)
    d_min = geometry.resolution_max_A if d_min is None else d_min
    det = det.truncate(d_min)
    q_min = float(np.linalg.norm(det.q, axis=1).min())
    return model_lib.make_grid(crystal, d_min=d_min, d_max=1.0 / max(q_min, 1e-9), vn=vn, gw=gw)


def import_directory(directory: str | pathlib.Path, out: str | pathlib.Path, *, space_group: str | None = None,
                     overwrite: bool = False) -> dict:
    """``import``: writes OUT (data set), OUT.toml (run config) and OUT-init/ (initial phi and model).

    Returns a summary dict (n_frames, n_rot, space_group, model_source, model mapping statistics).
    """
    out = pathlib.Path(out)
    legacy = read_legacy(directory, space_group=space_group)
    crystal = {"cell": np.asarray(legacy.cell), "space_group": legacy.space_group, "vn": legacy.vn, "gw": legacy.gw}
    data_io.write_dataset(out, legacy.frames, geometry=dataclasses.asdict(legacy.geometry), crystal=crystal,
                          mask=legacy.mask if legacy.mask.any() else None, overwrite=overwrite,
                          candidate_sampling_n=legacy.quaternion_n)
    emc_fields = reference_compatible_config(legacy)
    init_dir = out.with_name(out.stem + "-init")
    toml = {"data": str(out.resolve()), "init_from": str(init_dir.resolve()), "emc": emc_fields}
    header = (f"imported from {pathlib.Path(directory).resolve()} by python -m emcjax.legacy import\n"
              "reference-compatible EMC settings (docs/LEGACY.md)")
    text = "".join(f"# {line}\n" for line in header.splitlines()) + "\n" + runio.to_toml(toml)
    runio.write_text_atomic(out.with_suffix(".toml"), text)

    grid = emc_grid(dataclasses.asdict(legacy.geometry), legacy.mask if legacy.mask.any() else None,
                    Crystal(cell=legacy.cell, space_group=legacy.space_group), legacy.d_min, legacy.vn, legacy.gw)
    summary = {"n_frames": legacy.frames.n_frames, "n_rot": int(legacy.quaternions.shape[0]),
               "space_group": legacy.space_group, "phi_file": str(legacy.phi_file),
               "model_file": None if legacy.intensity_file is None else str(legacy.intensity_file)}
    if legacy.intensity is not None:
        model, count = reference_to_model(grid, legacy.ref_grid, legacy.intensity)
        summary["model_voxels_without_data"] = int((count == 0).sum())
    else:
        model = np.zeros(grid.model_shape)
        summary["model_voxels_without_data"] = int(model.size)
    init_dir.mkdir(parents=True, exist_ok=True)
    runio.write_intensities(init_dir, model.astype(np.float32), grid.asu.hkl, model.sum(axis=1), legacy.phi,
                            attrs={"iteration": 0, "source": str(pathlib.Path(directory).resolve())})
    runio.write_text_atomic(init_dir / runio.CONFIG_FILE, runio.to_toml({"data": str(out.resolve()), "emc": emc_fields}))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def _write(path: pathlib.Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with runio.atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def _sym_ops_cartesian(crystal: Crystal) -> np.ndarray:
    return crystal.laue_ops_cartesian


def export_run(run_dir: str | pathlib.Path, to: str | pathlib.Path, *, data: str | pathlib.Path | None = None,
               model_only: bool = False) -> dict:
    """``export``: writes an emcjax run as a reference working directory ``to`` (module docstring).

    The run's ``config.toml`` names the data set (``data``) and the EMC settings (``emc.vn``, ``emc.gw``,
    ``emc.d_min``); ``data`` overrides the data set. With ``model_only`` only total-phi.dat, start-phi.dat,
    finish_intensity.bin and hkl-val.dat (plus the geometry/crystal files they need) are written.
    """
    run_dir, to = pathlib.Path(run_dir), pathlib.Path(to)
    result = runio.read_run(run_dir)
    cfg_path = run_dir / runio.CONFIG_FILE
    values = runio.parse_toml(cfg_path) if cfg_path.exists() else {}
    data_path = pathlib.Path(data) if data is not None else (pathlib.Path(values["data"]) if "data" in values else None)
    if data_path is None:
        raise DataError(f"{cfg_path}: no 'data' key (the run's data set); expected it, or pass --data")
    emc_values = values.get("emc", {})
    vn, gw, d_min = int(emc_values.get("vn", 10)), float(emc_values.get("gw", 2.0)), emc_values.get("d_min")
    with data_io.SparseDataset(data_path) as ds:
        geometry = DetectorGeometry(**ds.geometry)
        crystal = Crystal(cell=tuple(ds.crystal["cell"]), space_group=str(ds.crystal["space_group"]))
        mask = ds.mask
        grid = emc_grid(ds.geometry, mask, crystal, d_min, vn, gw)
        if tuple(result.intensity.shape) != grid.model_shape or not np.array_equal(result.hkl, grid.asu.hkl):
            raise DataError(f"{run_dir / runio.INTENSITIES_FILE}: model of shape {result.intensity.shape} does not fit the "
                            f"grid of {data_path} with vn = {vn}, gw = {gw}, d_min = {d_min} ({grid.model_shape})")
        frames = None if model_only else ds.read_all()
        sampling_n = ds.candidate_sampling_n if ds.has_candidates else None
    if result.phi.shape != (ds.n_frames,):
        raise DataError(f"{run_dir / runio.INTENSITIES_FILE}: phi has {result.phi.shape[0]} frames, the data set "
                        f"{data_path} {ds.n_frames}")
    g = geometry
    dist = g.distance_px
    lam_d = g.wavelength_A * dist
    d_min_eff = g.resolution_max_A if d_min is None else float(d_min)
    qmax_px = int(math.ceil(lam_d / g.resolution_max_A))
    qmin_px = _qmin_px(dist, g.beamstop_radius_px)
    qcut_px = int(math.ceil(lam_d / d_min_eff))
    exact = abs(lam_d / g.resolution_max_A - qmax_px) < 1e-6 and \
        abs(2 * dist * math.sin(0.5 * math.atan(g.beamstop_radius_px / dist)) - qmin_px) < 1e-6
    if not model_only and not exact:
        raise DataError(
            f"{data_path}: geometry limits are not whole pixel units (λD/resolution_max_A = {lam_d / g.resolution_max_A:.6f}, "
            f"beam-stop limit {2 * dist * math.sin(0.5 * math.atan(g.beamstop_radius_px / dist)):.6f} px): the reference's "
            "make-detector would keep other pixels and other background shells; expected a data set imported from "
            "a reference directory (or pass --model-only)")
    # geometry + crystal files
    cfg_lines = {
        "num_row": g.num_rows, "num_col": g.num_cols, "px": repr(g.pixel_size_m), "detd": repr(g.distance_m),
        "wl": repr(g.wavelength_A), "cx": repr(g.beam_center_px[0]), "cy": repr(g.beam_center_px[1]),
        "sx": repr(g.beam_direction[0]), "sy": repr(g.beam_direction[1]), "sz": repr(g.beam_direction[2]),
        "Rstop": repr(g.beamstop_radius_px), "res_max": repr(g.resolution_max_A), "qlen": g.n_shells,
        "res_cutoff": repr(d_min_eff), "VN": vn, "gw": repr(gw), "home_dir": str(to.resolve()),
        "start_phi_file": "aux/start-phi.dat", "start_intens_file": "finish_intensity.bin",
    }
    qmax_px_w, qmin_px_w, q_px, pol, ids = reference_detector_arrays(g, mask, g.resolution_max_A, g.beamstop_radius_px)
    rec = np.empty((ids.shape[0], 4))
    rec[:, :3], rec[:, 3] = q_px, pol
    _write(to / REC_VECTORS, np.array([qmax_px_w, qmin_px_w, ids.shape[0]], "<i4").tobytes() + rec.astype("<f8").tobytes())
    pix_map = np.full(g.num_pixels, -1, np.int64)
    pix_map[ids] = np.arange(ids.shape[0])
    _write(to / PIX_MAP_DAT, "\n".join(map(str, pix_map.tolist())) + "\n")
    _write(to / BASIS_VEC, "\n".join(" ".join(f"{x:.10g}" for x in row) for row in crystal.real_basis) + "\n")
    ops = _sym_ops_cartesian(crystal)
    _write(to / SYM_OP, f"{len(ops)}\n" + "".join(" ".join(f"{x:.17g}" for x in m.ravel()) + "\n" for m in ops))
    # model files
    ref = reference_grid(crystal.real_basis, qmin_px / lam_d, qcut_px / lam_d, vn, gw)
    values_ref = model_to_reference(grid, result.intensity, ref)
    _write(to / "finish_intensity.bin", values_ref.astype("<f8").tobytes())
    sums = np.bincount(ref.owner, weights=values_ref, minlength=ref.hkl.shape[0])
    hkl_lines = [f"{ref.box[0]} {ref.box[1]} {ref.box[2]} {ref.hkl.shape[0]}"]
    hkl_lines += [f"{h} {k} {l} {s:.10e}" for (h, k, l), s in zip(ref.hkl.tolist(), sums.tolist())]
    _write(to / "hkl-val.dat", "\n".join(hkl_lines) + "\n")
    phi = np.asarray(result.phi, np.float64)
    _write(to / "total-phi.dat", "".join(f"{p:12.5e}\n" for p in phi))
    _write(to / "aux/start-phi.dat", "".join(f"{p:.9e}\n" for p in np.asarray(result.phi, np.float32).tolist()))
    summary = {"n_hkl": int(ref.hkl.shape[0]), "n_voxels": ref.n_voxels, "n_frames": int(phi.shape[0])}
    if not model_only:
        if sampling_n is None:
            raise DataError(f"{data_path}: no candidate orientations; expected candidate lists (prob-orien.bin) for "
                            "a reference directory (or pass --model-only)")
        from emcjax.rotations import sample_600cell

        s = sample_600cell(int(sampling_n))
        quats = np.empty((s.n_rot, 5))
        quats[:, :4] = s.quaternions
        quats[:, 4] = np.exp(s.log_weights)
        qname = f"aux/c-quaternion{int(sampling_n)}.bin"
        _write(to / qname, np.array([s.n_rot], "<i4").tobytes() + quats.astype("<f8").tobytes())
        pos = np.full(g.num_pixels, -1, np.int64)
        pos[ids] = np.arange(ids.shape[0])
        n = frames.n_frames
        dense = np.zeros((n, ids.shape[0]), "<i2")
        lost = 0
        for d in range(n):
            sl = slice(frames.photon_offsets[d], frames.photon_offsets[d + 1])
            t = pos[frames.photon_pixels[sl]]
            c = frames.photon_counts[sl]
            if np.any(c > 32767):
                raise DataError(f"{data_path}: frame {d} has a count {int(c.max())} > 32767; int16 data file cannot hold it")
            lost += int(c[t < 0].sum())
            dense[d, t[t >= 0]] = c[t >= 0]
            sl = slice(frames.dead_offsets[d], frames.dead_offsets[d + 1])
            t = pos[frames.dead_pixels[sl]]
            dense[d, t[t >= 0]] = -1
        _write(to / "Data/mpi-datafile.bin", dense.tobytes())
        _write(to / "Data/mpi-bg_model.bin", np.asarray(frames.background, "<f8").tobytes())
        recs = []
        for d in range(n):
            c = frames.candidate_rotations[frames.candidate_offsets[d]:frames.candidate_offsets[d + 1]]
            recs.append(np.concatenate([[c.shape[0]], c]).astype("<i4"))
        _write(to / "aux/prob-orien.bin", np.concatenate(recs).astype("<i4").tobytes())
        _write(to / "reduce-data/reduced-data_id.dat", f"{n}\n" + "".join(f"{i}\n" for i in frames.frame_id.tolist()))
        cfg_lines.update({"quat_file": qname, "mpi_datafile": "Data/mpi-datafile.bin",
                          "mpi_bgfile": "Data/mpi-bg_model.bin", "prob_orien_file": "aux/prob-orien.bin",
                          "reduced_data_id_file": "reduce-data/reduced-data_id.dat"})
        summary["photons_outside_reference_pixels"] = lost
    text = "# written by python -m emcjax.legacy export\n[emcjax-export]\n"
    text += "".join(f"{k} = {v}\n" for k, v in cfg_lines.items())
    _write(to / "config.ini", text)
    return summary


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _cli_import(
    directory: _Positional[pathlib.Path],
    out: pathlib.Path = pathlib.Path("imported.h5"),
    space_group: str | None = None,
    overwrite: bool = False,
) -> None:
    """Import a reference working directory DIR into OUT (data set), OUT.toml (reference-compatible run
    config) and OUT-init/ (initial phi and model).

    Args:
      directory: reference working directory holding config.ini.
      out: emcjax data set to write (HDF5).
      space_group: space group (default: the primitive point-group group of aux/sym-op.dat's Laue group;
        absences cannot be inferred from Laue operators).
      overwrite: replace an existing OUT.
    """
    summary = import_directory(directory, out, space_group=space_group, overwrite=overwrite)
    print(f"wrote {out}, {pathlib.Path(out).with_suffix('.toml')}, {pathlib.Path(out).with_name(pathlib.Path(out).stem + '-init')}/: "
          + ", ".join(f"{k} = {v}" for k, v in summary.items()))


def _cli_export(run: pathlib.Path, to: pathlib.Path, data: pathlib.Path | None = None, model_only: bool = False) -> None:
    """Export an emcjax run directory as a reference working directory.

    Args:
      run: emcjax run directory (intensities.h5, config.toml).
      to: reference working directory to write.
      data: data set of the run (default: the run config's 'data').
      model_only: write only the model/phi files (and the geometry/crystal files they need).
    """
    summary = export_run(run, to, data=data, model_only=model_only)
    print(f"wrote {to}: " + ", ".join(f"{k} = {v}" for k, v in summary.items()))


def main(argv: list[str] | None = None) -> None:
    try:
        tyro.extras.subcommand_cli_from_dict({"import": _cli_import, "export": _cli_export}, args=argv,
                                             prog="python -m emcjax.legacy")
    except EmcjaxError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
