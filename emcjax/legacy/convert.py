"""``import`` (reference directory -> emcjax data set, run config, initial state) and ``export`` (emcjax run ->
reference directory)."""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from emcjax import data as data_io
from emcjax import atomic_files, runio, toml_config
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.errors import DataError
from emcjax.legacy.directory import LegacyDirectory, read_legacy
from emcjax.legacy.files import BASIS_VEC, PIX_MAP_DAT, REC_VECTORS, SYM_OP, write_file
from emcjax.legacy.geometry import beamstop_qmin_px, reference_detector_arrays, reference_limits
from emcjax.legacy.grid import model_to_reference, reference_grid, reference_to_model


def searches_every_rotation(frames: data_io.SparseFrames, n_rot: int) -> bool:
    """True when every frame's candidate list holds every rotation (a full search written as lists)."""
    offsets = frames.candidate_offsets
    if offsets is None or frames.n_frames == 0 or not np.all(np.diff(offsets) == n_rot):
        return False
    lists = np.sort(frames.candidate_rotations.reshape(frames.n_frames, n_rot), axis=1)
    return bool(np.all(lists == np.arange(n_rot)[None, :]))


def reference_compatible_config(legacy: LegacyDirectory, all_rotations: bool = False) -> dict:
    """EMCConfig fields that follow the reference's rules (docs/LEGACY.md).

    With ``all_rotations`` (prob-orien.bin lists every rotation for every frame) the data set holds no lists:
    the EMC searches all rotations of the 600-cell sampling n with the exact point-group reduction (the same
    posterior, |H| times fewer rotations) and keeps the top ``max_kept = 32`` per frame before pruning.
    """
    counts = np.diff(legacy.frames.candidate_offsets)
    return {
        "rotation_n": int(legacy.quaternion_n),
        "reduce_by_symmetry": bool(all_rotations),
        "vn": int(legacy.vn),
        "gw": float(legacy.gw),
        "d_min": float(legacy.d_min),
        "intensity_update": "reference",
        "inner_iterations": 1,
        "update_phi": True,
        "prune_mass": 0.999,
        "prune_min": 1e-4,
        "max_kept": 32 if all_rotations else int(max(int(counts.max()) if counts.size else 1, 1)),
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
    if legacy.quaternion_n is None:
        raise DataError(f"{legacy.quaternion_file}: {legacy.quaternions.shape[0]} rotations, no 600-cell sampling "
                        "(N = 10(5n^3+n)); expected a 600-cell file: emcjax data sets index candidate rotations of a "
                        "600-cell sampling (the reference-compatible update, emcjax.legacy.refupdate, reads any list)")
    crystal = {"cell": np.asarray(legacy.cell), "space_group": legacy.space_group, "vn": legacy.vn, "gw": legacy.gw}
    n_rot = int(legacy.quaternions.shape[0])
    all_rotations = searches_every_rotation(legacy.frames, n_rot)
    frames = legacy.frames
    if all_rotations:  # no lists: the EMC's all-rotations path (emc.rotation_n below records n)
        frames = dataclasses.replace(frames, candidate_offsets=None, candidate_rotations=None)
    data_io.write_dataset(out, frames, geometry=dataclasses.asdict(legacy.geometry), crystal=crystal,
                          mask=legacy.mask if legacy.mask.any() else None, overwrite=overwrite,
                          candidate_sampling_n=None if all_rotations else legacy.quaternion_n)
    emc_fields = reference_compatible_config(legacy, all_rotations)
    init_dir = out.with_name(out.stem + "-init")
    toml = {"data": str(out.resolve()), "init_from": str(init_dir.resolve()), "emc": emc_fields}
    header = (f"imported from {pathlib.Path(directory).resolve()} by python -m emcjax.legacy import\n"
              "reference-compatible EMC settings (docs/LEGACY.md)")
    text = "".join(f"# {line}\n" for line in header.splitlines()) + "\n" + toml_config.to_toml(toml)
    atomic_files.write_text_atomic(out.with_suffix(".toml"), text)

    grid = emc_grid(dataclasses.asdict(legacy.geometry), legacy.mask if legacy.mask.any() else None,
                    Crystal(cell=legacy.cell, space_group=legacy.space_group), legacy.d_min, legacy.vn, legacy.gw)
    counts = np.diff(legacy.frames.candidate_offsets)
    search = (f"all {n_rot} rotations of the 600-cell sampling n = {legacy.quaternion_n} (prob-orien.bin lists every "
              "rotation for every frame: no candidate lists stored; emc.rotation_n = n with the exact point-group "
              "reduction)" if all_rotations else
              f"candidate lists of prob-orien.bin ({int(counts.min())}-{int(counts.max())} rotations per frame)")
    summary = {"n_frames": legacy.frames.n_frames, "n_rot": n_rot, "orientation_search": search,
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
    atomic_files.write_text_atomic(init_dir / runio.CONFIG_FILE,
                                   toml_config.to_toml({"data": str(out.resolve()), "emc": emc_fields}))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------

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
    values = toml_config.parse_toml(cfg_path) if cfg_path.exists() else {}
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
        sampling_n = ds.candidate_sampling_n if ds.has_candidates else emc_values.get("rotation_n")
    if result.phi.shape != (ds.n_frames,):
        raise DataError(f"{run_dir / runio.INTENSITIES_FILE}: phi has {result.phi.shape[0]} frames, the data set "
                        f"{data_path} {ds.n_frames}")
    g = geometry
    dist = g.distance_px
    lam_d = g.wavelength_A * dist
    d_min_eff = g.resolution_max_A if d_min is None else float(d_min)
    qmax_px = int(math.ceil(lam_d / g.resolution_max_A))
    qmin_px = beamstop_qmin_px(dist, g.beamstop_radius_px)
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
    write_file(to / REC_VECTORS, np.array([qmax_px_w, qmin_px_w, ids.shape[0]], "<i4").tobytes() + rec.astype("<f8").tobytes())
    pix_map = np.full(g.num_pixels, -1, np.int64)
    pix_map[ids] = np.arange(ids.shape[0])
    write_file(to / PIX_MAP_DAT, "\n".join(map(str, pix_map.tolist())) + "\n")
    basis = np.array([[float(f"{x:.10g}") for x in row] for row in crystal.real_basis])  # as the file holds it
    write_file(to / BASIS_VEC, "\n".join(" ".join(f"{x:.10g}" for x in row) for row in basis) + "\n")
    ops = _sym_ops_cartesian(crystal)
    write_file(to / SYM_OP, f"{len(ops)}\n" + "".join(" ".join(f"{x:.17g}" for x in m.ravel()) + "\n" for m in ops))
    # model files
    ref = reference_grid(basis, *reference_limits(g, qmin_px, qcut_px), vn, gw)
    values_ref = model_to_reference(grid, result.intensity, ref)
    write_file(to / "finish_intensity.bin", values_ref.astype("<f8").tobytes())
    sums = np.bincount(ref.owner, weights=values_ref, minlength=ref.hkl.shape[0])
    hkl_lines = [f"{ref.box[0]} {ref.box[1]} {ref.box[2]} {ref.hkl.shape[0]}"]
    hkl_lines += [f"{h} {k} {l} {s:.10e}" for (h, k, l), s in zip(ref.hkl.tolist(), sums.tolist())]
    write_file(to / "hkl-val.dat", "\n".join(hkl_lines) + "\n")
    phi = np.asarray(result.phi, np.float64)
    write_file(to / "total-phi.dat", "".join(f"{p:12.5e}\n" for p in phi))
    write_file(to / "aux/start-phi.dat", "".join(f"{p:.9e}\n" for p in np.asarray(result.phi, np.float32).tolist()))
    summary = {"n_hkl": int(ref.hkl.shape[0]), "n_voxels": ref.n_voxels, "n_frames": int(phi.shape[0])}
    if not model_only:
        if sampling_n is None:
            raise DataError(f"{data_path}: no candidate orientations; expected candidate lists (prob-orien.bin) for "
                            "a reference directory (or pass --model-only)")
        from emcjax.sampling_600cell import sample_600cell

        s = sample_600cell(int(sampling_n))
        quats = np.empty((s.n_rot, 5))
        quats[:, :4] = s.quaternions
        quats[:, 4] = np.exp(s.log_weights)
        qname = f"aux/c-quaternion{int(sampling_n)}.bin"
        write_file(to / qname, np.array([s.n_rot], "<i4").tobytes() + quats.astype("<f8").tobytes())
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
        write_file(to / "Data/mpi-datafile.bin", dense.tobytes())
        write_file(to / "Data/mpi-bg_model.bin", np.asarray(frames.background, "<f8").tobytes())
        recs = []
        for d in range(n):  # a data set without lists searched every rotation: list them all
            c = np.arange(s.n_rot) if frames.candidate_offsets is None else \
                frames.candidate_rotations[frames.candidate_offsets[d]:frames.candidate_offsets[d + 1]]
            recs.append(np.concatenate([[c.shape[0]], c]).astype("<i4"))
        write_file(to / "aux/prob-orien.bin", np.concatenate(recs).astype("<i4").tobytes())
        write_file(to / "reduce-data/reduced-data_id.dat", f"{n}\n" + "".join(f"{i}\n" for i in frames.frame_id.tolist()))
        cfg_lines.update({"quat_file": qname, "mpi_datafile": "Data/mpi-datafile.bin",
                          "mpi_bgfile": "Data/mpi-bg_model.bin", "prob_orien_file": "aux/prob-orien.bin",
                          "reduced_data_id_file": "reduce-data/reduced-data_id.dat"})
        summary["photons_outside_reference_pixels"] = lost
    text = "# written by python -m emcjax.legacy export\n[emcjax-export]\n"
    text += "".join(f"{k} = {v}\n" for k, v in cfg_lines.items())
    write_file(to / "config.ini", text)
    return summary

