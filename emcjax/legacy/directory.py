"""Reading a whole reference working directory (``read_legacy``) into arrays in the reference's orders."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from emcjax import data as data_io
from emcjax.crystal import Crystal
from emcjax.detector import Detector, DetectorGeometry
from emcjax.errors import ConfigError, DataError
from emcjax.legacy.files import (BASIS_VEC, REC_VECTORS, SYM_OP, required_key, read_config_ini, read_data_ids, read_datafile,
                                 read_float64_array, read_matrix_file, read_phi, read_pix_map, read_prob_orien,
                                 read_quaternion_file, read_rec_vectors)
from emcjax.legacy.geometry import (resolution_for_px, cell_from_basis, check_detector, geometry_from_config,
                                    infer_space_group, reference_limits)
from emcjax.legacy.grid import ReferenceGrid, reference_grid

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
    quaternion_n: int | None  # 600-cell n (from the row count); None: an arbitrary rotation list
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
    quaternion_file: pathlib.Path
    basis: np.ndarray  # (3, 3) aux/basis-vec.dat, columns a, b, c in Å
    pixel_limits: tuple[int, int, int]  # (q_min_px, q_max_px, q_cut_px) pixel units
    q_px: np.ndarray  # (full_num_pix, 3) rec-vectors.bin, pixel units
    polarization: np.ndarray  # (full_num_pix,) rec-vectors.bin
    background: np.ndarray  # (n_frames, qlen) float64 mpi-bg_model.bin (frames hold it as float32)


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
    from emcjax.sampling_600cell import sample_600cell

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
    if check_quaternions and n is not None:
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

    vn = required_key(cfg, "VN", cfg_path, int, "voxels per min|a*| (VN)")
    gw = required_key(cfg, "gw", cfg_path, float, "peak radius in voxels (gw)")
    res_cutoff = required_key(cfg, "res_cutoff", cfg_path, float, "low-res cutoff in Å")
    lam_d = geometry.wavelength_A * geometry.distance_px
    qcut_px = int(math.ceil(lam_d / res_cutoff))
    if qcut_px > qmax_px:
        raise DataError(f"{cfg_path}: res_cutoff = {res_cutoff} Å is beyond res_max = {required_key(cfg, 'res_max', cfg_path, float)} "
                        "Å; expected res_cutoff >= res_max")
    d_min = resolution_for_px(lam_d, qcut_px)
    ref = reference_grid(basis, *reference_limits(geometry, qmin_px, qcut_px), vn, gw)

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
        res_cutoff=res_cutoff, d_min=d_min, ref_grid=ref, quaternion_file=quat_path, basis=basis,
        pixel_limits=(qmin_px, qmax_px, qcut_px), q_px=q_px, polarization=pol,
        background=background,
    )

