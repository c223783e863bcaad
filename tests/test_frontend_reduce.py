"""Images -> sparse data set: readers, static mask, radial background, spots, reduction (CBF and HDF5).

The images are rendered from the simulator's photon lists (emcjax.frontend.simulate_images) with a dense
radial background, a powder ring, hot pixels, module gaps and a beam-stop holder shadow, so the truth of
every part is known.
"""

from __future__ import annotations

import dataclasses
import pathlib

import h5py
import numpy as np
import pytest
from scipy import stats

from emcjax import data as data_io
from emcjax import toml_config
from emcjax.detector import DetectorGeometry, make_detector
from emcjax.errors import ConfigError
from emcjax.frontend import background as bg_lib
from emcjax.frontend import images as images_lib
from emcjax.frontend import reduce as reduce_lib
from emcjax.frontend import simulate_images as si
from emcjax.frontend.spots import find_spots
from emcjax.simulate import SimulationConfig

GEOMETRY = DetectorGeometry(num_rows=128, num_cols=128, pixel_size_m=1.8e-3, beam_center_px=(63.3, 64.6),
                            resolution_max_A=4.5, n_shells=25)
CELL = (40.0, 40.0, 30.0, 90.0, 90.0, 90.0)
IMAGES = si.ImageSimulationConfig(
    simulation=SimulationConfig(n_frames=60, geometry=GEOMETRY, cell=CELL, rotation_n=0, background_photons=0.0,
                                bragg_photons=40.0, seed=3),
    background_per_pixel=0.3, ring_q=0.15, ring_photons=3000.0, module_size=40, overwrite=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """CBF images, the same frames as a bitshuffle/LZ4 HDF5 stack (converted through the CBF reader), truth."""
    out = tmp_path_factory.mktemp("images")
    si.write(dataclasses.replace(IMAGES, out=out, format="cbf"))
    stack = images_lib.ImageStack([str(out / "images" / "*.cbf")])
    images_lib.write_h5_stack(out / "images.h5", (im for _, im in stack.frames()), stack.n_frames, stack.shape,
                              GEOMETRY, IMAGES.saturation)
    return out


def _reduce(rendered: pathlib.Path, kind: str, **kw) -> pathlib.Path:
    images = str(rendered / "images" / "*.cbf") if kind == "cbf" else str(rendered / "images.h5")
    out = rendered / f"reduced_{kind}_{len(kw)}.h5"
    config = reduce_lib.ReduceConfig(images=(images,), out=out, geometry=GEOMETRY, cell=CELL, truth=rendered / "truth.h5",
                                     mask=reduce_lib.MaskConfig(file=rendered / "shadow_mask.npy"), overwrite=True, **kw)
    reduce_lib.run(config, log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def reduced(rendered):
    return {kind: _reduce(rendered, kind) for kind in ("cbf", "h5")}


def test_hdf5_stack_is_compressed_and_reads_back(rendered):
    with h5py.File(rendered / "images.h5") as f:
        data = f[images_lib.H5_DATA_PATH]
        assert data.id.get_create_plist().get_filter(0)[0] == 32008  # the bitshuffle (+ LZ4) filter
        assert data.id.get_storage_size() < 0.5 * data.size * 4  # compressed
    cbf = images_lib.ImageStack([str(rendered / "images" / "*.cbf")])
    h5 = images_lib.ImageStack([rendered / "images.h5"])
    assert cbf.kind == "cbf" and h5.kind == "h5" and cbf.n_frames == h5.n_frames == 60
    for (i, a), (j, b) in zip(cbf.frames(5, 8), h5.frames(5, 8)):
        assert i == j and np.array_equal(a, b)
    for stack in (cbf, h5):  # header values as written
        header = stack.header()
        assert header.wavelength_A == pytest.approx(GEOMETRY.wavelength_A)
        assert header.beam_center_px == pytest.approx(GEOMETRY.beam_center_px, abs=1e-3)
        assert header.pixel_size_m == pytest.approx(GEOMETRY.pixel_size_m)


@pytest.mark.parametrize("kind", ["cbf", "h5"])
def test_reduction_recovers_photons_background_and_mask(rendered, reduced, kind):
    with data_io.SparseDataset(reduced[kind]) as ds:
        frames, mask = ds.read_all(), ds.mask
        truth_ds = ds.read_truth()
        geometry = DetectorGeometry(**ds.geometry)
    with data_io.SparseDataset(rendered / "truth.h5") as ds:
        sim = ds.read_all()
    lost = truth_ds["lost"].ravel()
    gaps_shadow_hot = lost & make_detector_valid(geometry)
    # the static mask holds every gap, shadow and hot pixel inside the detector's valid region
    assert np.all(mask.ravel()[gaps_shadow_hot])
    tables = bg_lib.radial_tables(geometry, mask)
    kept = total = in_ring = 0
    for d in range(frames.n_frames):
        pixels = frames.photon_pixels[frames.photon_offsets[d]:frames.photon_offsets[d + 1]]
        counts = frames.photon_counts[frames.photon_offsets[d]:frames.photon_offsets[d + 1]]
        dead = frames.dead_pixels[frames.dead_offsets[d]:frames.dead_offsets[d + 1]]
        # no photon from a masked, lost, dead or out-of-range pixel, nor from an excluded shell
        assert not mask.ravel()[pixels].any() and not lost[pixels].any() and not np.isin(pixels, dead).any()
        shell = tables.shell_full[pixels]
        assert np.all(shell >= 0) and np.all(frames.background[d, shell] >= 0)
        # the simulator's (Bragg) photons on usable pixels are all there
        a, b = sim.photon_offsets[d], sim.photon_offsets[d + 1]
        sp, sc = sim.photon_pixels[a:b], sim.photon_counts[a:b]
        usable = ~lost[sp] & (tables.shell_full[sp] >= 0)
        ring = usable & (frames.background[d, np.maximum(tables.shell_full[sp], 0)] < 0)
        in_ring += sc[ring].sum()
        sp, sc = sp[usable & ~ring], sc[usable & ~ring]
        pos = np.minimum(np.searchsorted(pixels, sp), max(pixels.size - 1, 0))
        found = pixels[pos] == sp
        kept += np.minimum(counts[pos][found], sc[found]).sum()
        total += sc.sum()
    assert kept / total > 0.99, (kept, total)
    # the ring's shells are excluded in (nearly) every frame, and few others
    ring_shell = int(0.15 / GEOMETRY.shell_width)
    excluded = frames.background < 0
    assert excluded[:, ring_shell].mean() > 0.9
    far = np.abs(np.arange(GEOMETRY.n_shells) - ring_shell) > 4
    assert excluded[:, far].mean() < 0.01
    # background per shell (aggregated over frames) within 5 % of the truth where the truth holds >= 4000
    # photons over the frames (Poisson noise <= 1.6 %; Bragg photons below the outlier threshold add ~1 %)
    ratio = background_ratio_per_shell(frames, truth_ds, tables)
    assert ratio.size >= 12
    assert np.all(np.abs(ratio - 1) < 0.05), ratio


def background_ratio_per_shell(frames, truth, tables) -> np.ndarray:
    """Estimated / true background photons per shell, summed over the frames (shells not excluded), for the
    shells where the truth holds >= 4000 photons."""
    det = tables.detector
    n_shells = det.geometry.n_shells
    excluded = frames.background < 0
    pattern = truth["background_pattern"].ravel()
    level = truth["background_level"][frames.frame_id]
    per_shell = np.bincount(det.shell, weights=pattern[det.pixel_id], minlength=n_shells)
    true_b = level[:, None] * np.divide(per_shell, tables.shell_pol, out=np.zeros_like(per_shell),
                                        where=tables.shell_pol > 0)[None, :]
    use = ~excluded & (tables.shell_pol > 0)[None, :]
    photons_true = (np.where(use, true_b, 0) * tables.shell_pol).sum(0)
    photons_est = (np.where(use, frames.background, 0) * tables.shell_pol).sum(0)
    checked = photons_true >= 4000
    return photons_est[checked] / photons_true[checked]


def test_background_stays_unbiased_under_many_weak_bragg_spots(tmp_path):
    """150 Bragg photons per frame, mostly in spots too weak to be outliers: the truncated-Poisson estimate
    stays within 5 % per shell; the plain mean of the non-outlier pixels (the reference) is biased high."""
    images = dataclasses.replace(IMAGES, out=tmp_path, format="h5",
                                 simulation=dataclasses.replace(IMAGES.simulation, bragg_photons=150.0))
    si.write(images)
    ratios = {}
    for clip in (0.97, None):
        out = tmp_path / f"reduced_{clip}.h5"
        reduce_lib.run(reduce_lib.ReduceConfig(
            images=(str(tmp_path / "images.h5"),), out=out, geometry=GEOMETRY, cell=CELL, clip_quantile=clip,
            truth=tmp_path / "truth.h5", mask=reduce_lib.MaskConfig(file=tmp_path / "shadow_mask.npy")),
            log=lambda s: None)
        with data_io.SparseDataset(out) as ds:
            frames, mask, truth = ds.read_all(), ds.mask, ds.read_truth()
        ratios[clip] = background_ratio_per_shell(frames, truth, bg_lib.radial_tables(GEOMETRY, mask))
    assert ratios[0.97].size >= 12
    assert np.all(np.abs(ratios[0.97] - 1) < 0.05), ratios[0.97]
    assert ratios[None].mean() - 1 > 0.025 and ratios[0.97].mean() - 1 < 0.02, ratios


def make_detector_valid(geometry: DetectorGeometry) -> np.ndarray:
    valid = np.zeros(geometry.num_pixels, bool)
    valid[make_detector(geometry).pixel_id] = True
    return valid


def test_cbf_and_hdf5_give_the_same_data_set(reduced):
    with data_io.SparseDataset(reduced["cbf"]) as a, data_io.SparseDataset(reduced["h5"]) as b:
        fa, fb = a.read_all(), b.read_all()
        assert np.array_equal(a.mask, b.mask)
    for name in ("photon_offsets", "photon_pixels", "photon_counts", "dead_pixels", "background"):
        assert np.array_equal(getattr(fa, name), getattr(fb, name)), name


def test_spots_and_initial_phi(reduced):
    with h5py.File(reduced["cbf"]) as f:
        offsets, q, phi = f["spots/offsets"][()], f["spots/q"][()], f["spots/initial_phi"][()]
        size = f["spots/size"][()]
    assert offsets.shape == (61,) and q.shape == (offsets[-1], 3) and np.all(size >= 2)
    assert phi.mean() == pytest.approx(1.0, rel=1e-5)
    assert np.all(np.linalg.norm(q, axis=1) <= 1 / GEOMETRY.resolution_max_A + 1e-6)


def test_poisson_threshold_matches_scipy():
    lam = np.concatenate([np.geomspace(0.01, 3e4, 3000), [0.0, 1e-5]])
    exact = stats.poisson.ppf(0.99999, np.maximum(lam, 0.01))
    got = bg_lib.poisson_threshold(lam)
    assert np.all(got >= exact) and np.all(got <= exact + 1)


def test_frame_background_recovers_a_known_level_and_rejects_spots():
    rng = np.random.default_rng(0)
    tables = bg_lib.radial_tables(GEOMETRY, None)
    det = tables.detector
    level = 5.0 + 0.2 * np.arange(GEOMETRY.n_shells)
    counts = rng.poisson(level[det.shell] * det.polarization)
    spots = rng.choice(det.n_pix, 30, replace=False)
    counts[spots] += 40
    background, outlier = bg_lib.frame_background(counts, np.zeros(det.n_pix, bool), tables)
    assert set(spots) <= set(np.flatnonzero(outlier)) and outlier.sum() < 40
    photons = level * tables.shell_pol
    good = photons > 300
    assert good.sum() >= 15
    assert np.all(np.abs(background[good] / level[good] - 1) < 4 / np.sqrt(photons[good]))  # 4 sigma
    # a ring of 3000 photons in shell 15 is found; the noise-only shells are not excluded
    ring_counts = counts.copy()
    ring_counts[det.shell == 15] += rng.poisson(3000 / (det.shell == 15).sum(), (det.shell == 15).sum())
    with_ring, _ = bg_lib.frame_background(ring_counts, np.zeros(det.n_pix, bool), tables)
    excluded = bg_lib.ring_shells(with_ring, tables.shell_pol)
    assert excluded[15] and excluded.sum() <= 4
    assert not bg_lib.ring_shells(background, tables.shell_pol).any()


@pytest.mark.parametrize("level, per_pixel", [(0.02, 1), (0.3, 2)])
def test_neighbour_test_keeps_weak_spread_spots_out_and_biases_no_pure_background(level, per_pixel):
    """Poisson background of ``level`` photons per pixel (pol = 1) plus weak spots: 2 x 2 pixels with
    ``per_pixel`` photons each (no outlier; at 0.02 a one-photon pixel passes any count test). With the
    neighbour test the background photons stay within 5 % of the truth (and within 4 sigma on pure
    background); without it they are high by a good part of the spots' photons."""
    rng = np.random.default_rng(1)
    tables = bg_lib.radial_tables(GEOMETRY, None)
    det = tables.detector
    g = GEOMETRY
    n_frames = 20
    true = level * det.polarization.sum()
    n_spots = int(0.3 * true / (4 * per_pixel))  # spots: 30 % of the background photons
    ratio = {None: [], 0.9: []}
    pure = {None: [], 0.9: []}
    for _ in range(n_frames):
        background = rng.poisson(level * det.polarization)
        image = np.zeros((g.num_rows, g.num_cols), np.int64)
        for r, c in zip(rng.integers(0, g.num_rows - 1, n_spots), rng.integers(0, g.num_cols - 1, n_spots)):
            image[r:r + 2, c:c + 2] = per_pixel
        spots = image.ravel()[det.pixel_id]
        for nq in (None, 0.9):
            for counts, out in ((background + spots, ratio), (background, pure)):
                b, _ = bg_lib.frame_background(counts, np.zeros(det.n_pix, bool), tables, neighbour_quantile=nq)
                out[nq].append((b[det.shell] * det.polarization).sum() / true)
    sigma = 1 / np.sqrt(true * n_frames)
    assert abs(np.mean(pure[0.9]) - 1) < 4 * sigma + 0.005, pure
    assert abs(np.mean(ratio[0.9]) - 1) < 0.05, np.mean(ratio[0.9])
    assert np.mean(ratio[None]) - 1 > 0.1, np.mean(ratio[None])


def test_find_spots_centroids_diffuse_patches_and_crowded_shells():
    tables = bg_lib.radial_tables(GEOMETRY, None)
    image = np.zeros((128, 128), np.int32)
    image[20, 30:32] = (3, 1)            # a 2-pixel spot
    image[90:95, 90:94] = 5              # a diffuse 20-pixel patch
    ids = np.flatnonzero(image.ravel())
    spots = find_spots(image, ids, tables, min_size=2, max_size=10)
    assert spots.q.shape == (1, 3) and spots.size[0] == 2 and spots.photons[0] == 4
    expected = (3 * tables.q_full[20 * 128 + 30] + tables.q_full[20 * 128 + 31]) / 4
    np.testing.assert_allclose(spots.q[0], expected, rtol=1e-12)
    assert spots.diffuse_pixels.size == 20
    # seven spots on one shell make it a ring: dropped and the shell excluded
    det = tables.detector
    ring = image * 0
    shell_pixels = det.pixel_id[det.shell == 20]
    for pid in shell_pixels[:: shell_pixels.size // 7][:7]:
        ring.ravel()[pid] = 5
    crowded = find_spots(ring, np.flatnonzero(ring.ravel()), tables, min_size=1, max_size=10, max_per_shell=5)
    assert crowded.q.shape[0] == 0 and crowded.ring_shells[20]


def test_header_disagreeing_with_the_geometry_is_refused(rendered, tmp_path):
    wrong = dataclasses.replace(GEOMETRY, distance_m=0.5)
    config = reduce_lib.ReduceConfig(images=(str(rendered / "images" / "*.cbf"),), out=tmp_path / "x.h5",
                                     geometry=wrong, header="check", cell=CELL)
    with pytest.raises(ConfigError, match="frame_00000.cbf: header distance_m = 0.45 disagrees"):
        reduce_lib.run(config, log=lambda s: None)
    assert not (tmp_path / "x.h5").exists()


def test_reduce_cli_resumes_after_interruption(rendered, reduced, tmp_path, monkeypatch):
    out = tmp_path / "resumed.h5"
    # the geometry, cell and mask from a TOML file (--config), the rest as flags
    geometry = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(GEOMETRY).items()}
    (tmp_path / "run.toml").write_text(toml_config.to_toml({"cell": list(CELL), "geometry": geometry,
                                                       "mask": {"file": str(rendered / "shadow_mask.npy")}}))
    argv = ["--config", str(tmp_path / "run.toml"), "--images", str(rendered / "images.h5"), "--out", str(out),
            "--block-frames", "16", "--truth", str(rendered / "truth.h5")]
    from emcjax.frontend import writer as writer_lib

    calls = {"n": 0}
    original = writer_lib.SparseWriter.append

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while reducing the third block
        return original(self, *args, **kwargs)

    monkeypatch.setattr(writer_lib.SparseWriter, "append", failing)
    with pytest.raises(KeyboardInterrupt):
        reduce_lib.main(argv)
    assert not out.exists() and out.with_name(f".{out.name}.partial").exists()
    monkeypatch.setattr(writer_lib.SparseWriter, "append", original)
    reduce_lib.main(argv + ["--resume"])
    with data_io.SparseDataset(out) as a, data_io.SparseDataset(reduced["h5"]) as b:
        fa, fb = a.read_all(), b.read_all()
    for name in ("frame_id", "photon_offsets", "photon_pixels", "photon_counts", "background"):
        assert np.array_equal(getattr(fa, name), getattr(fb, name)), name


def test_reduce_cli_bad_input_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        reduce_lib.main(["--images", str(tmp_path / "missing.cbf"), "--out", str(tmp_path / "r.h5")])
    assert "missing.cbf: no such file" in str(exc.value.code)
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("rotations", [(0.0, 0.0, 0.0), (0.06, -0.04, 0.3)])
def test_poni_geometry_matches_pyfai_q(tmp_path, rotations):
    """A PONI file, flat or rotated (rot1, rot2, rot3 in rad), gives pyFAI's q on every pixel."""
    pytest.importorskip("pyFAI")
    from pyFAI.detectors import Detector
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    det = Detector(pixel1=GEOMETRY.pixel_size_m, pixel2=GEOMETRY.pixel_size_m, max_shape=(128, 128))
    ai = AzimuthalIntegrator(
        dist=0.3, poni1=(40.2 + 0.5) * GEOMETRY.pixel_size_m, poni2=(70.7 + 0.5) * GEOMETRY.pixel_size_m,
        rot1=rotations[0], rot2=rotations[1], rot3=rotations[2], detector=det, wavelength=1.3e-10)
    ai.save(str(tmp_path / "g.poni"))
    geometry = images_lib.geometry_from_poni(tmp_path / "g.poni", GEOMETRY)
    assert geometry.wavelength_A == pytest.approx(1.3)
    if not any(rotations):
        assert geometry.beam_center_px == pytest.approx((40.2, 70.7)) and geometry.distance_m == pytest.approx(0.3)
    full = bg_lib.full_detector(geometry)
    ours = np.empty(geometry.num_pixels)
    ours[full.pixel_id] = full.q_norm
    theirs = ai.qArray((128, 128)).ravel() / 10 / (2 * np.pi)  # nm^-1 with 2 pi -> 1/Å without
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=1e-6)  # pyFAI computes in float32
