"""emcjax.legacy: import/export of EMC-for-SMX working directories (METHOD.md §13).

The reference directories are written here by a small independent writer that follows METHOD.md §3, §4 and
§13 literally (pixel-unit geometry, the reference's hkl/voxel enumeration, binary layouts), from simulated
frames. Cell 40 x 40 x 20 Å, P 4 2 2, VN = 6, gw = 2: the reference's Cartesian grid coincides with emcjax's
lattice-aligned grid, so models move between the programs exactly (up to rounding).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from emcjax import data as data_io
from emcjax import emc
from emcjax import legacy
import emcjax.legacy.files
from emcjax import runio, toml_config
from emcjax.detector import DetectorGeometry
from emcjax.errors import DataError
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import SimulationConfig, simulate

# reference config.ini values
REF = dict(num_row=64, num_col=64, px=3.6e-3, detd=0.45, wl=1.0, cx=31.5, cy=31.5, sx=0.0, sy=0.0, sz=-1.0,
           Rstop=6.0, res_max=8.0, qlen=10, res_cutoff=8.0, VN=6, gw=2.0)
CELL = (40.0, 40.0, 20.0, 90.0, 90.0, 90.0)
N_ROT = 2
N_FRAMES = 60


# ---------------------------------------------------------------------------------------------------------
# An independent writer of reference directories (METHOD.md §3, §4.2-4.3, §13)
# ---------------------------------------------------------------------------------------------------------


def ref_detector(mask):
    """(qmax_px, qmin_px, q_px (n,3), pol (n,), raw id (n,)) by METHOD.md §3, loops over rows for clarity."""
    s = np.array([REF["sx"], REF["sy"], REF["sz"]])
    D = REF["detd"] / REF["px"] * np.linalg.norm(s) / abs(s[2])
    b = D * s / np.linalg.norm(s)
    qmax = math.ceil(REF["wl"] * D / REF["res_max"])
    qmin = math.ceil(2 * D * math.sin(0.5 * math.atan(REF["Rstop"] / D)))
    rows = []
    for row in range(REF["num_row"]):
        for col in range(REF["num_col"]):
            S = np.array([b[0] + row - REF["cx"], b[1] + col - REF["cy"], b[2]])
            q = D * (S / np.linalg.norm(S) - b / np.linalg.norm(b))
            pol = (1 - (S[1] / np.linalg.norm(S)) ** 2) * abs(S[2]) / np.linalg.norm(S) ** 3
            qn = np.linalg.norm(q)
            if not mask[row * REF["num_col"] + col] and qmin <= qn <= qmax:
                rows.append((qn, row * REF["num_col"] + col, q, pol))
    rows.sort(key=lambda x: x[0])  # stable merge sort by |q|
    q = np.array([r[2] for r in rows])
    pol = np.array([r[3] for r in rows])
    return qmax, qmin, q, pol / pol.max(), np.array([r[1] for r in rows]), D


def ref_peaks(r_min, r_max, vn, gw):
    """[(h, k, l, v, [g...])] non-partial peaks in lexicographic order, S_h in x-major order (§4.2-4.3).

    Scalar float64 arithmetic in the reference's operation order (low-res-emc/setup.c, restated in issue 8):
    the tie |g - v| = gw falls as the program's rounding makes it fall, no tolerance.
    """
    basis = [[CELL[0], 0.0, 0.0], [0.0, CELL[1], 0.0], [0.0, 0.0, CELL[2]]]  # rows of basis-vec.dat
    a, b, c = ([basis[i][j] for i in range(3)] for j in range(3))

    def cross(u, w):
        return [u[1] * w[2] - u[2] * w[1], u[2] * w[0] - u[0] * w[2], u[0] * w[1] - u[1] * w[0]]

    ab = cross(a, b)
    vol = abs(((0.0 + ab[0] * c[0]) + ab[1] * c[1]) + ab[2] * c[2])
    cols = [[x / vol for x in cross(b, c)], [x / vol for x in cross(c, a)], [x / vol for x in ab]]
    rl = [[cols[j][i] for j in range(3)] for i in range(3)]  # rl[i][j]: component i of vector j
    min_rcell = math.sqrt(min(((0.0 + rl[0][j] ** 2) + rl[1][j] ** 2) + rl[2][j] ** 2 for j in range(3)))
    rescale = vn / min_rcell
    rmax2, rmin2, gw2 = r_max * r_max, r_min * r_min, gw * gw
    half = math.ceil(math.sqrt(rmax2) / min_rcell * vn)
    hmax = [int(math.floor(math.sqrt(rmax2 / (((0.0 + rl[0][j] ** 2) + rl[1][j] ** 2) + rl[2][j] ** 2)))) + 1
            for j in range(3)]  # one more than needed (orthogonal cell): the extra reflections are partial
    e = math.ceil(gw) + 1

    def c_round(x):  # C's round: half away from zero
        r = math.trunc(x)
        return r + (1 if x - r >= 0.5 else -1 if r - x >= 0.5 else 0)

    out = []
    for h in range(-hmax[0], hmax[0] + 1):
        for k in range(-hmax[1], hmax[1] + 1):
            for l in range(-hmax[2], hmax[2] + 1):
                v = [(((0.0 + rl[i][0] * h) + rl[i][1] * k) + rl[i][2] * l) * rescale for i in range(3)]
                t = [c_round(x) for x in v]
                pts, partial = [], False
                for x in range(-e, e + 1):
                    for y in range(-e, e + 1):
                        for z in range(-e, e + 1):
                            g = (t[0] + x, t[1] + y, t[2] + z)
                            d = [g[i] - v[i] for i in range(3)]
                            if (d[0] * d[0] + d[1] * d[1]) + d[2] * d[2] <= gw2:
                                norm = float(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) / (rescale * rescale)
                                partial |= norm > rmax2 or norm < rmin2
                                if max(abs(u) for u in g) <= half:
                                    pts.append(np.array(g))
                if pts and not partial:
                    out.append((h, k, l, np.array(v), pts))
    return out, min_rcell / vn


def analytic_model(h, k, l, g, v):
    """A 4/mmm-symmetric peak model: amplitude from (sorted |h|,|k|), |l|; Gaussian profile in voxels."""
    a, b = sorted((abs(h), abs(k)))
    amp = 1.0 + 0.3 * a + 0.7 * b + 1.3 * abs(l) + 0.1 * a * b
    return amp * math.exp(-float(np.sum((np.asarray(g) - v) ** 2)) / 2.0)


def sym_ops_422():
    """METHOD.md §2.8: the 8 rotations of 422 and the same with the diagonal sign flipped."""
    rots = [np.diag([1, 1, 1]), np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]), np.diag([-1, -1, 1]),
            np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]]), np.diag([-1, 1, -1]), np.diag([1, -1, -1]),
            np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]]), np.array([[0, -1, 0], [-1, 0, 0], [0, 0, -1]])]
    return rots + [-r for r in rots]


def write_reference_dir(root: pathlib.Path, seed: int = 0, n_frames: int = N_FRAMES):
    """A reference working directory from simulated frames; returns what was written (for the checks)."""
    rng = np.random.default_rng(seed)
    total = REF["num_row"] * REF["num_col"]
    mask = np.zeros(total, bool)
    mask[[30 * 64 + 40, 30 * 64 + 41, 31 * 64 + 40, 20 * 64 + 33]] = True  # a few bad pixels
    qmax, qmin, q_px, pol, raw, D = ref_detector(mask)
    lam_d = REF["wl"] * D
    # simulate with the geometry whose exact limits are the reference's pixel limits
    geom = DetectorGeometry(num_rows=64, num_cols=64, pixel_size_m=REF["px"], distance_m=REF["detd"],
                            beam_center_px=(REF["cx"], REF["cy"]), wavelength_A=REF["wl"],
                            beamstop_radius_px=D * math.tan(2 * math.asin(qmin / (2 * D))) * (1 - 1e-12),
                            resolution_max_A=lam_d / qmax, n_shells=REF["qlen"])
    sim = SimulationConfig(n_frames=n_frames, geometry=geom, cell=CELL, space_group="P 4 2 2", vn=REF["VN"],
                           gw=REF["gw"], rotation_n=N_ROT, bragg_photons=150.0, background_photons=20.0, seed=seed)
    frames, truth = simulate(sim)
    n_pix = q_px.shape[0]
    t_of = {int(p): t for t, p in enumerate(raw)}
    dense = np.zeros((n_frames, n_pix), np.int16)
    for d in range(n_frames):
        for p, c in zip(frames.photon_pixels[frames.photon_offsets[d]:frames.photon_offsets[d + 1]],
                        frames.photon_counts[frames.photon_offsets[d]:frames.photon_offsets[d + 1]]):
            if int(p) in t_of:
                dense[d, t_of[int(p)]] = c
    order = rng.permutation(n_frames)  # the reference's load-balanced order
    dense = dense[order]
    dense[3, rng.choice(n_pix, 40, replace=False)] = -1  # dead pixels in (reduced) frame 3
    dense[min(7, n_frames - 1), ::5] = -1
    bg = np.asarray(frames.background, np.float64)[order]
    bg[min(5, n_frames - 1), 4] = -1.0  # a masked shell
    frame_id = np.sort(rng.choice(10 * n_frames, n_frames, replace=False))[order]
    n_rot = 10 * (5 * N_ROT**3 + N_ROT)
    cands = []
    for d in order:
        c = set(rng.choice(n_rot, 6, replace=False).tolist()) | {int(truth["rotation_index"][d])}
        cands.append(np.array(sorted(c), np.int32))
    phi = np.asarray(truth["phi"], np.float32)[order]
    scale = 1.0 / REF["wl"] / D  # the reference's 1/(λD)
    peaks, dv = ref_peaks(qmin * scale, qmax * scale, REF["VN"], REF["gw"])
    model = np.array([analytic_model(h, k, l, g, v) for h, k, l, v, pts in peaks for g in pts])

    (root / "make-detector").mkdir(parents=True)
    (root / "aux").mkdir()
    (root / "Data").mkdir()
    (root / "reduce-data").mkdir()
    cfg = dict(REF)
    cfg.update(home_dir="/nonexistent/home", quat_file="/nonexistent/home/aux/c-quaternion2.bin",
               mpi_datafile="Data/mpi-datafile.bin", mpi_bgfile="Data/mpi-bg_model.bin",
               prob_orien_file="aux/prob-orien.bin", reduced_data_id_file="reduce-data/reduced-data_id.dat",
               start_phi_file="aux/start-phi.dat", start_intens_file="aux/start_intensity.bin", nproc=20)
    lines = ["[make-detector]"] + [f"{k} = {v}" for k, v in cfg.items()]
    (root / "config.ini").write_text("\n".join(lines) + "\n")
    with open(root / "make-detector/rec-vectors.bin", "wb") as f:
        f.write(np.array([qmax, qmin, n_pix], "<i4").tobytes())
        f.write(np.column_stack([q_px, pol]).astype("<f8").tobytes())
    pix_map = np.full(total, -1)
    pix_map[raw] = np.arange(n_pix)
    (root / "make-detector/pix-map.dat").write_text("".join(f"{x}\n" for x in pix_map))
    (root / "aux/basis-vec.dat").write_text(f"{CELL[0]} 0 0\n0 {CELL[1]} 0\n0 0 {CELL[2]}\n")
    ops = sym_ops_422()
    (root / "aux/sym-op.dat").write_text(f"{len(ops)}\n" + "".join(" ".join(map(str, m.ravel())) + "\n" for m in ops))
    s = sample_600cell(N_ROT)
    with open(root / "aux/c-quaternion2.bin", "wb") as f:
        f.write(np.array([n_rot], "<i4").tobytes())
        f.write(np.column_stack([s.quaternions, np.exp(s.log_weights) * 7.0]).astype("<f8").tobytes())
    (root / "Data/mpi-datafile.bin").write_bytes(dense.astype("<i2").tobytes())
    (root / "Data/mpi-bg_model.bin").write_bytes(bg.astype("<f8").tobytes())
    with open(root / "aux/prob-orien.bin", "wb") as f:
        for c in cands:
            f.write(np.array([len(c)], "<i4").tobytes() + c.astype("<i4").tobytes())
    (root / "reduce-data/reduced-data_id.dat").write_text(f"{n_frames}\n" + "".join(f"{i}\n" for i in frame_id))
    (root / "aux/start-phi.dat").write_text("".join(f"{p:.9e}\n" for p in phi))
    (root / "aux/start_intensity.bin").write_bytes(model.astype("<f8").tobytes())
    return dict(dense=dense, raw=raw, bg=bg, frame_id=frame_id, cands=cands, phi=phi, peaks=peaks,
                dv=dv, model=model, q_px=q_px, pol=pol, lam_d=lam_d, n_pix=n_pix, mask=mask, ops=ops)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref") / "work"
    info = write_reference_dir(root)
    out = root.parent / "imported.h5"
    summary = legacy.import_directory(root, out)
    return root, info, out, summary


# ---------------------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------------------


def test_import_every_array(written):
    root, info, out, summary = written
    assert summary["space_group"] == "P 4 2 2"
    with data_io.SparseDataset(out) as ds:
        fr = ds.read_all()
        assert ds.candidate_sampling_n == N_ROT
        assert ds.crystal["space_group"] == "P 4 2 2"
        np.testing.assert_allclose(ds.crystal["cell"], CELL)
        geometry = DetectorGeometry(**ds.geometry)
        mask = ds.mask
    np.testing.assert_array_equal(fr.frame_id, info["frame_id"])
    for d in range(N_FRAMES):
        row = info["dense"][d]
        ph = slice(fr.photon_offsets[d], fr.photon_offsets[d + 1])
        order = np.argsort(info["raw"][row > 0])
        np.testing.assert_array_equal(fr.photon_pixels[ph], info["raw"][row > 0][order])
        np.testing.assert_array_equal(fr.photon_counts[ph], row[row > 0][order])
        dd = slice(fr.dead_offsets[d], fr.dead_offsets[d + 1])
        np.testing.assert_array_equal(fr.dead_pixels[dd], np.sort(info["raw"][row < 0]))
        cs = slice(fr.candidate_offsets[d], fr.candidate_offsets[d + 1])
        np.testing.assert_array_equal(fr.candidate_rotations[cs], info["cands"][d])
    assert fr.dead_offsets[4] - fr.dead_offsets[3] == 40
    np.testing.assert_array_equal(fr.background, info["bg"].astype(np.float32))
    assert fr.background[5, 4] == -1
    # geometry: our detector keeps the file's pixels, q/(λD), polarization and radial bins
    from emcjax.detector import make_detector

    det = make_detector(geometry, mask)
    assert det.n_pix == info["n_pix"]
    pos = {int(p): i for i, p in enumerate(det.pixel_id)}
    ours = np.array([pos[int(p)] for p in info["raw"]])
    np.testing.assert_allclose(det.q[ours], info["q_px"] / info["lam_d"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(det.polarization[ours], info["pol"], atol=1e-12)
    qmax = math.ceil(info["lam_d"] / REF["res_max"])
    ref_shell = np.floor(np.linalg.norm(info["q_px"], axis=1) / (qmax / REF["qlen"])).astype(int)
    np.testing.assert_array_equal(det.shell[ours], ref_shell)
    assert geometry.n_shells == REF["qlen"]
    # phi and the model of the init run
    init = runio.read_run(out.with_name("imported-init"))
    np.testing.assert_array_equal(init.phi, info["phi"])
    cfg = toml_config.parse_toml(out.with_suffix(".toml"))
    assert cfg["emc"]["intensity_update"] == "reference" and cfg["emc"]["prune_mass"] == 0.999
    assert cfg["emc"]["prune_min"] == 1e-4 and cfg["emc"]["update_phi"] is True
    assert cfg["emc"]["max_kept"] == max(len(c) for c in info["cands"])
    from emcjax.lowres import LowresConfig

    lc = toml_config.config_from_toml(LowresConfig, out.with_suffix(".toml"))
    assert lc.emc.vn == REF["VN"] and lc.data == out.resolve()
    grid = legacy.emc_grid(dataclasses.asdict(geometry), mask, _crystal(), lc.emc.d_min, REF["VN"], REF["gw"])
    # the analytic model at our voxel positions (aligned grids: voxels coincide)
    dv = info["dv"]
    values = np.zeros(grid.model_shape)
    seen = np.zeros(grid.model_shape, bool)
    ref_hkl = {(h, k, l) for h, k, l, _, _ in info["peaks"]}
    ref_points = {(h, k, l, *map(int, g)) for h, k, l, _, pts in info["peaks"] for g in pts}
    for i, hkl in enumerate(grid.hkl.tolist()):
        if tuple(hkl) not in ref_hkl:
            continue
        a, g = grid.asu.index[i], grid.asu.op[i]
        for j, o in enumerate(grid.offsets):
            q = (np.asarray(hkl) + o / grid.divisions) @ grid.crystal.reciprocal_basis.T
            gpt = np.rint(q / dv)
            if (*hkl, *map(int, gpt)) not in ref_points:  # a point at exactly gw that this mate's S_h drops
                continue
            v = np.asarray(hkl) * np.array([1 / CELL[0], 1 / CELL[1], 1 / CELL[2]]) / dv
            values[a, grid.perm[g, j]] = analytic_model(*hkl, gpt, v)
            seen[a, grid.perm[g, j]] = True
    assert seen.sum() > 0.9 * seen.size
    np.testing.assert_allclose(init.intensity[seen], values[seen], rtol=1e-6)


def _crystal():
    from emcjax.crystal import Crystal

    return Crystal(cell=CELL, space_group="P 4 2 2")


# ---------------------------------------------------------------------------------------------------------
# Export then import
# ---------------------------------------------------------------------------------------------------------


def test_export_then_import_is_identity(written, tmp_path):
    root, info, out, _ = written
    to = tmp_path / "exported"
    legacy.export_run(out.with_name("imported-init"), to)
    # the model file in the reference's voxel order equals the written one (aligned grids)
    exported = np.fromfile(to / "finish_intensity.bin", "<f8")
    assert exported.shape == info["model"].shape
    # reflections emcjax does not model (its non-partial rule tests the peak sphere against the exact pixel
    # |q| range, the reference tests voxel points against whole-pixel limits) are exported as 0
    with data_io.SparseDataset(out) as ds:
        grid = legacy.emc_grid(ds.geometry, ds.mask, _crystal(), toml_config.parse_toml(out.with_suffix(".toml"))["emc"]["d_min"],
                               REF["VN"], REF["gw"])
    ours = {tuple(h) for h in grid.hkl.tolist()}
    modelled = np.concatenate([np.full(len(p[4]), p[:3] in ours) for p in info["peaks"]])
    assert 0.9 * len(info["peaks"]) < sum(p[:3] in ours for p in info["peaks"]) < len(info["peaks"])
    assert np.all(exported[~modelled] == 0)
    np.testing.assert_allclose(exported[modelled], info["model"][modelled], rtol=1e-6)
    hv = (to / "hkl-val.dat").read_text().split("\n")
    assert int(hv[0].split()[3]) == len(info["peaks"])
    h, k, l, s = hv[1].split()
    assert (int(h), int(k), int(l)) == info["peaks"][0][:3]
    assert len((to / "total-phi.dat").read_text().splitlines()) == N_FRAMES
    out2 = tmp_path / "again.h5"
    legacy.import_directory(to, out2)
    with data_io.SparseDataset(out) as a, data_io.SparseDataset(out2) as b:
        fa, fb = a.read_all(), b.read_all()
        for name in ("frame_id", "photon_offsets", "photon_pixels", "photon_counts", "dead_offsets",
                     "dead_pixels", "background", "candidate_offsets", "candidate_rotations"):
            np.testing.assert_array_equal(getattr(fa, name), getattr(fb, name), err_msg=name)
        assert a.geometry == b.geometry
        assert a.crystal["space_group"] == b.crystal["space_group"]
        np.testing.assert_array_equal(a.mask, b.mask)
    ra, rb = runio.read_run(out.with_name("imported-init")), runio.read_run(tmp_path / "again-init")
    np.testing.assert_array_equal(ra.phi, rb.phi)
    np.testing.assert_allclose(rb.intensity, ra.intensity, rtol=1e-6, atol=1e-6 * ra.intensity.max())


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,action,expect", [
    ("make-detector/rec-vectors.bin", "truncate", "expected"),
    ("make-detector/pix-map.dat", "delete", "no such file"),
    ("Data/mpi-datafile.bin", "truncate", "int16"),
    ("Data/mpi-bg_model.bin", "truncate", "float64"),
    ("aux/prob-orien.bin", "truncate", "int32"),
    ("aux/start_intensity.bin", "truncate", "voxels"),
    ("aux/c-quaternion2.bin", "truncate", "(q0, q1, q2, q3, w)"),
    ("aux/sym-op.dat", "delete", "no such file"),
    ("aux/start-phi.dat", "truncate_text", "one float per reduced frame"),
    ("reduce-data/reduced-data_id.dat", "delete", "no such file"),
])
def test_missing_or_missized_file_is_named(tmp_path, name, action, expect):
    root = tmp_path / "work"
    write_reference_dir(root, n_frames=6)
    path = root / name
    if action == "delete":
        path.unlink()
    elif action == "truncate":
        path.write_bytes(path.read_bytes()[:-8])
    else:
        path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError) as err:
        legacy.import_directory(root, tmp_path / "x.h5")
    msg = str(err.value)
    assert pathlib.Path(name).name in msg and expect in msg, msg


def test_wrong_quaternion_order_is_refused(tmp_path):
    root = tmp_path / "work"
    write_reference_dir(root, n_frames=4)
    path = root / "aux/c-quaternion2.bin"
    raw = np.fromfile(path, "<f8", offset=4).reshape(-1, 5)
    raw[[0, 1]] = raw[[1, 0]]
    path.write_bytes(np.array([raw.shape[0]], "<i4").tobytes() + raw.tobytes())
    with pytest.raises(DataError, match="c-quaternion2.bin: row 0"):
        legacy.import_directory(root, tmp_path / "x.h5")


# ---------------------------------------------------------------------------------------------------------
# One reference-compatible intensity update vs a slow numpy METHOD.md §7.1 on the reference's own grid
# ---------------------------------------------------------------------------------------------------------


def ref_rotation(q):
    """METHOD.md §1: the reference's matrix from a quaternion (q0 scalar), applied to lab vectors."""
    q0, q1, q2, q3 = q
    return np.array([
        [1 - 2 * (q2 * q2 + q3 * q3), 2 * (q1 * q2 + q0 * q3), 2 * (q1 * q3 - q0 * q2)],
        [2 * (q1 * q2 - q0 * q3), 1 - 2 * (q1 * q1 + q3 * q3), 2 * (q0 * q1 + q2 * q3)],
        [2 * (q0 * q2 + q1 * q3), 2 * (q2 * q3 - q0 * q1), 1 - 2 * (q1 * q1 + q2 * q2)],
    ])


def slow_reference_update(info, quats, kept, phi):
    """§7.1 on the reference's grid: per-entry 1-D Poisson ML (w >= 0, bisection, float64), compress per
    peak, then the per-voxel numerator and denominator pooled over the 16 operators of sym-op.dat.

    Returns {(h, k, l): (values (|S_h|,), denominators (|S_h|,))} for every kept peak.
    """
    peaks, dv = info["peaks"], info["dv"]
    index = {p[:3]: i for i, p in enumerate(peaks)}
    vox = [{tuple(g): j for j, g in enumerate(p[4])} for p in peaks]
    astar = np.array([1 / CELL[0], 1 / CELL[1], 1 / CELL[2]])
    q = info["q_px"] / info["lam_d"]
    qmax = math.ceil(info["lam_d"] / REF["res_max"])
    shell = np.floor(np.linalg.norm(info["q_px"], axis=1) / (qmax / REF["qlen"])).astype(int)
    dense, bg, pol = info["dense"], info["bg"], info["pol"]
    by_rot: dict[int, list] = {}
    for d, r, p in kept:
        if phi[d] > 0:
            by_rot.setdefault(r, []).append((d, p))
    ent_obs = []  # (entry, A, b, C) observations
    ent_info = []  # (peak, [(j, weight)], c_e)
    for r, obs in sorted(by_rot.items()):
        u = q @ ref_rotation(quats[r]).T / dv  # rows: R q_t in voxel units
        hkl = np.rint(u * dv / astar).astype(int)
        for t in range(q.shape[0]):
            h = index.get(tuple(hkl[t]))
            if h is None or np.sum((u[t] - peaks[h][3]) ** 2) > REF["gw"] ** 2:
                continue
            base = np.floor(u[t]).astype(int)
            f = u[t] - base
            corners = []
            for c in np.ndindex(2, 2, 2):
                j = vox[h].get(tuple(base + np.array(c)))
                if j is not None:
                    corners.append((j, np.prod([f[i] if c[i] else 1 - f[i] for i in range(3)])))
            if not corners:
                continue
            rows = [(d, p) for d, p in obs if dense[d, t] >= 0 and bg[d, shell[t]] >= 0]
            if not rows:
                continue
            e = len(ent_info)
            ent_info.append((h, corners, sum(p * phi[d] for d, p in rows)))
            for d, p in rows:
                ent_obs.append((e, p * dense[d, t], max(bg[d, shell[t]], 1e-6) / phi[d], p * phi[d] * pol[t]))
    e_id, A, b, C = (np.array(x) for x in zip(*ent_obs))
    n = len(ent_info)
    a = np.bincount(e_id, weights=C, minlength=n)

    def f(w):
        return np.bincount(e_id, weights=A / (b + w[e_id]), minlength=n) - a

    lo, hi = np.zeros(n), np.ones(n)
    while np.any(f(hi) > 0):
        hi = np.where(f(hi) > 0, 2 * hi, hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        pos = f(mid) > 0
        lo, hi = np.where(pos, mid, lo), np.where(pos, hi, mid)
    w = np.where(f(np.zeros(n)) > 0, 0.5 * (lo + hi), 0.0)
    num = [np.zeros(len(p[4])) for p in peaks]
    den = [np.zeros(len(p[4])) for p in peaks]
    for (h, corners, c), we in zip(ent_info, w):
        for j, om in corners:
            num[h][j] += c * om * we
            den[h][j] += c * om
    pnum = [np.zeros(len(p[4])) for p in peaks]
    pden = [np.zeros(len(p[4])) for p in peaks]
    for S in info["ops"]:
        for h, p in enumerate(peaks):
            target = index[tuple(int(x) for x in S @ np.array(p[:3]))]
            for j, g in enumerate(p[4]):
                jj = vox[target][tuple(int(x) for x in S @ np.asarray(g))]
                pnum[target][jj] += num[h][j]
                pden[target][jj] += den[h][j]
    return {p[:3]: (np.where(pden[h] > 1e-10, pnum[h] / np.maximum(pden[h], 1e-300), 0.0), pden[h])
            for h, p in enumerate(peaks)}


def _kept_pairs(problem, state, config):
    """[(frame, sampling rotation index, P)] of the (frame, rotation) pairs emcjax's E-step kept."""
    result = emc.estep(problem, state, config)
    k = result.kept  # pairs stacked over devices, zero-padded; rotations index the E-step's rotation set
    frame, rot, prob = (np.asarray(x).ravel() for x in (k.pair_frame, k.pair_rotation, k.pair_prob))
    rotations = result.rotation_set.rotations
    return [(int(d), int(rotations[r]), float(p)) for d, r, p in zip(frame, rot, prob) if p > 0]


def _update(problem, state, config):
    return emc.update_intensity(problem, state, emc.estep(problem, state, config), config)


def test_reference_compatible_update_matches_slow_numpy(written):
    root, info, out, _ = written
    from emcjax.lowres import LowresConfig

    lc = toml_config.config_from_toml(LowresConfig, out.with_suffix(".toml"))
    init = runio.read_run(out.with_name("imported-init"))
    with data_io.SparseDataset(out) as ds:
        problem = emc.setup_problem(ds, lc.emc)
    state = emc.initial_state(problem, lc.emc, seed=0)._replace(intensity=jnp.asarray(init.intensity),
                                                                 phi=jnp.asarray(init.phi))
    kept = _kept_pairs(problem, state, lc.emc)
    new = np.asarray(_update(problem, state, lc.emc), np.float64)
    assert len(kept) > N_FRAMES
    quats = np.fromfile(root / "aux/c-quaternion2.bin", "<f8", offset=4).reshape(-1, 5)[:, :4]
    ref = slow_reference_update(info, quats, kept, np.asarray(init.phi, np.float64))
    legacy_dir = legacy.read_legacy(root)
    got = legacy.model_to_reference(problem.grid, new, legacy_dir.ref_grid)
    ours = {tuple(h) for h in problem.grid.hkl.tolist()}
    exp_v, exp_d, got_v = [], [], []
    for i, p in enumerate(info["peaks"]):
        if p[:3] not in ours:
            continue
        v, dd = ref[p[:3]]
        s = legacy_dir.ref_grid.offsets
        exp_v.append(v)
        exp_d.append(dd)
        got_v.append(got[s[i]:s[i + 1]])
    exp_v, exp_d, got_v = (np.concatenate(x) for x in (exp_v, exp_d, got_v))
    observed = exp_d > 1e-10
    assert observed.sum() > 1000
    np.testing.assert_array_equal(got_v[~observed], 0.0)
    np.testing.assert_allclose(got_v[observed], exp_v[observed], rtol=1e-4, atol=1e-4 * exp_v.max())


@pytest.mark.parametrize("c", [25.0, 31.0])
def test_model_round_trip_on_grids_that_do_not_coincide(c):
    """On a cell whose reference Cartesian grid does not coincide with ours, export then import gives a model
    whose export is the same file (to rounding), and integrated intensities of peak-shaped models come back
    within a few % (measured: 2.1 % median for c = 25 Å, 2.2 % for 31 Å; the reference's interpolation alone
    loses 9-11 %). Voxels the reference's grid cannot see are taken from that interpolation."""
    from emcjax import model as model_lib
    from emcjax.crystal import Crystal

    crystal = Crystal(cell=(40.0, 40.0, c, 90.0, 90.0, 90.0), space_group="P 4 2 2")
    vn, gw, q_min, q_max = 6, 2.0, 0.03, 0.125
    grid = model_lib.make_grid(crystal, d_min=1 / q_max, d_max=1 / q_min, vn=vn, gw=gw)
    ref = legacy.reference_grid(crystal.real_basis, q_min, q_max, vn, gw)
    rng = np.random.default_rng(0)
    spacing = np.linalg.norm(crystal.reciprocal_basis, axis=0).min() / vn
    profile = np.exp(-np.sum(grid.voxel_q() ** 2, axis=1) / (2 * (0.8 * spacing) ** 2))
    model = rng.exponential(size=grid.n_asu)[:, None] * profile[None, :]
    exported = legacy.model_to_reference(grid, model, ref)
    imported, count = legacy.reference_to_model(grid, ref, exported)
    np.testing.assert_allclose(legacy.model_to_reference(grid, imported, ref), exported, rtol=1e-9, atol=1e-12)
    error = np.abs(imported.sum(axis=1) - model.sum(axis=1)) / model.sum(axis=1)
    assert np.median(error) < 0.04
    interpolated, _ = legacy.interpolated_model(grid, ref, exported)
    assert np.median(error) < 0.5 * np.median(np.abs(interpolated.sum(axis=1) - model.sum(axis=1)) / model.sum(axis=1))


# ---------------------------------------------------------------------------------------------------------
# Quaternion files: n from the row count, the name only a cross-check
# ---------------------------------------------------------------------------------------------------------


def _write_quaternions(path: pathlib.Path, quats: np.ndarray) -> None:
    path.write_bytes(np.array([quats.shape[0]], "<i4").tobytes() + quats.astype("<f8").tobytes())


def test_quaternion_n_comes_from_the_row_count(tmp_path):
    s = sample_600cell(3)
    rows = np.column_stack([s.quaternions, np.exp(s.log_weights)])
    assert rows.shape[0] == 1380
    _write_quaternions(tmp_path / "quaternion.bin", rows)
    n, read = legacy.files.read_quaternion_file(tmp_path / "quaternion.bin")
    assert n == 3 and np.array_equal(read, rows)
    _write_quaternions(tmp_path / "c-quaternion4.bin", rows)  # the name contradicts the rows
    with pytest.raises(DataError, match="c-quaternion4.bin: 1380 rows; the name says n = 4"):
        legacy.files.read_quaternion_file(tmp_path / "c-quaternion4.bin")
    _write_quaternions(tmp_path / "rotations.bin", rows[:100])  # no 600-cell count: an arbitrary list
    n, read = legacy.files.read_quaternion_file(tmp_path / "rotations.bin")
    assert n is None and read.shape == (100, 5)


def test_import_with_a_quaternion_file_of_any_name(tmp_path):
    root = tmp_path / "work"
    write_reference_dir(root, n_frames=4)
    (root / "aux/c-quaternion2.bin").rename(root / "aux/quaternion.bin")
    text = (root / "config.ini").read_text().replace("aux/c-quaternion2.bin", "aux/quaternion.bin")
    (root / "config.ini").write_text(text)
    legacy.import_directory(root, tmp_path / "x.h5")
    with data_io.SparseDataset(tmp_path / "x.h5") as ds:
        assert ds.candidate_sampling_n == N_ROT
    # a list that is no 600-cell sampling is read (n = None); emcjax's data sets need a 600-cell one
    raw = np.fromfile(root / "aux/quaternion.bin", "<f8", offset=4).reshape(-1, 5)
    _write_quaternions(root / "aux/quaternion.bin", np.concatenate([raw, raw[:1]]))
    assert legacy.read_legacy(root).quaternion_n is None
    with pytest.raises(DataError, match="no 600-cell sampling"):
        legacy.import_directory(root, tmp_path / "y.h5")


def test_reference_entry_solver_finds_the_minimum():
    """The program's per-entry solve (bracket + golden section, 1e-3 relative) against a fine bisection of
    S'(w) = 0 on random entries; an entry without photons gets -min B (negative), one without a valid
    observation is skipped."""
    from emcjax.legacy.refupdate import solve_entries

    rng = np.random.default_rng(3)
    n, k = 400, 6
    present = rng.uniform(size=(n, k)) < 0.7
    present[:, 0] = True
    P = rng.uniform(0.2, 1.0, size=(n, k))
    phi = rng.uniform(0.5, 2.0, size=(n, k))
    pol = rng.uniform(0.8, 1.0, size=(n, k))
    counts = rng.poisson(rng.uniform(0.1, 3.0, size=(n, 1)), size=(n, k))
    counts[0] = 0  # no photon at all
    A = (P * counts).astype(np.float32).astype(np.float64)
    B = (rng.uniform(0.01, 0.3, size=(n, k)) / phi).astype(np.float32).astype(np.float64)
    C, D = P * phi * pol, np.log(phi * pol)
    valid = present.copy()
    valid[1] = False  # nothing valid: skipped
    w, skip = solve_entries(A, B, C, D, valid)
    assert skip[1] and not skip[0] and not skip[2:].any()
    assert w[0] == np.max(-B[0][valid[0]])
    rows = np.flatnonzero(~skip & np.any(valid & (A > 1e-10), axis=1))
    lo = np.max(np.where(valid[rows], -B[rows], -np.inf), axis=1) + 1e-12
    hi = np.full(rows.shape[0], 1e3)

    def grad(x):
        return np.sum(np.where(valid[rows], C[rows] - A[rows] / (B[rows] + x[:, None]), 0.0), axis=1)

    for _ in range(200):
        mid = 0.5 * (lo + hi)
        up = grad(mid) > 0
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    best = 0.5 * (lo + hi)
    assert (best < 0).sum() >= 5  # the minimum lies below 0 for some entries (no positivity)
    np.testing.assert_allclose(w[rows], best, rtol=2e-3, atol=1e-4)
