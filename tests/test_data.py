"""Tests of emcjax.data: the sparse HDF5 data set, block reading and padding."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from emcjax.data import (
    PaddedFrames,
    SparseDataset,
    SparseFrames,
    bucket_length,
    pad_frames,
    rotation_count,
    write_dataset,
)
from emcjax.errors import DataError

NUM_ROWS, NUM_COLS, N_SHELLS = 16, 20, 5
NUM_PIX = NUM_ROWS * NUM_COLS

GEOMETRY = dict(
    num_rows=NUM_ROWS, num_cols=NUM_COLS, pixel_size_m=75e-6, distance_m=0.1,
    beam_center_px=(7.5, 9.5), beam_direction=(0.0, 0.0, -1.0), wavelength_A=1.0332,
    beamstop_radius_px=2.0, resolution_max_A=2.1, n_shells=N_SHELLS,
)
CRYSTAL = dict(cell=(79.1, 79.1, 38.0, 90.0, 90.0, 90.0), space_group="P 43 21 2", vn=3, gw=1.25)


def make_frames(n: int = 12, seed: int = 0, candidates: bool = True, big: tuple = ()) -> SparseFrames:
    """Random frames; frames 0 and 3 have no photons; frames in ``big`` have many photons."""
    rng = np.random.default_rng(seed)
    pix, cnt, dead, cand = [], [], [], []
    for i in range(n):
        k = 0 if i in (0, 3) else (200 if i in big else int(rng.integers(1, 15)))
        p = np.sort(rng.choice(NUM_PIX, size=k, replace=False))
        pix.append(p)
        cnt.append(rng.integers(1, 4, size=k))
        dead.append(np.sort(rng.choice(NUM_PIX, size=int(rng.integers(0, 4)), replace=False)))
        cand.append(np.sort(rng.choice(rotation_count(2), size=int(rng.integers(0, 6)), replace=False)))

    def offs(lists):
        return np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)

    bg = rng.uniform(0.0, 0.5, size=(n, N_SHELLS)).astype(np.float32)
    bg[1, 2] = -1.0  # an excluded shell
    return SparseFrames(
        frame_id=np.arange(100, 100 + n, dtype=np.int64),
        photon_offsets=offs(pix), photon_pixels=np.concatenate(pix).astype(np.int64),
        photon_counts=np.concatenate(cnt).astype(np.int32),
        dead_offsets=offs(dead), dead_pixels=np.concatenate(dead).astype(np.int64),
        background=bg,
        candidate_offsets=offs(cand) if candidates else None,
        candidate_rotations=np.concatenate(cand).astype(np.int64) if candidates else None,
    )


def assert_frames_equal(a: SparseFrames, b: SparseFrames) -> None:
    for f in ("frame_id", "photon_offsets", "photon_pixels", "photon_counts", "dead_offsets",
              "dead_pixels", "background", "candidate_offsets", "candidate_rotations"):
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            assert x is None and y is None, f
            continue
        assert x.dtype == y.dtype, (f, x.dtype, y.dtype)
        np.testing.assert_array_equal(x, y, err_msg=f)


@pytest.fixture
def written(tmp_path):
    frames = make_frames()
    mask = np.zeros((NUM_ROWS, NUM_COLS), bool)
    mask[0, :] = True
    truth = dict(intensity=np.arange(24, dtype=np.float64).reshape(4, 6), phi=np.linspace(0.5, 1.5, 12),
                 rotation_index=np.arange(12, dtype=np.int64), seed=1234, note="sim",
                 quaternion=np.eye(4)[:3], sub=dict(weights=np.ones(3, np.float32), scale=2.5))
    path = tmp_path / "data.h5"
    write_dataset(path, frames, GEOMETRY, CRYSTAL, mask=mask, truth=truth, candidate_sampling_n=2)
    return path, frames, mask, truth


# --------------------------------------------------------------------------------------------------


def test_round_trip(written):
    path, frames, mask, truth = written
    with SparseDataset(path) as ds:
        assert ds.n_frames == 12 and ds.n_shells == N_SHELLS
        assert ds.geometry == GEOMETRY
        assert isinstance(ds.geometry["beam_center_px"], tuple)
        assert ds.crystal == CRYSTAL
        np.testing.assert_array_equal(ds.mask, mask)
        assert ds.mask.dtype == bool
        assert ds.has_candidates and ds.candidate_sampling_n == 2
        got = ds.read_block(0, ds.n_frames)
        assert_frames_equal(got, frames)
        assert got.photons_per_frame()[0] == 0 and got.photons_per_frame()[3] == 0
        np.testing.assert_array_equal(got.photons_per_frame(),
                                      [frames.photon_counts[a:b].sum() for a, b in
                                       zip(frames.photon_offsets[:-1], frames.photon_offsets[1:])])
        assert ds.has_truth
        t = ds.read_truth()
        assert set(t) == set(truth)
        for k in ("intensity", "phi", "rotation_index", "quaternion"):
            np.testing.assert_array_equal(t[k], truth[k])
            assert t[k].dtype == truth[k].dtype
        assert t["seed"] == 1234 and t["note"] == "sim"
        np.testing.assert_array_equal(t["sub"]["weights"], truth["sub"]["weights"])
        assert t["sub"]["scale"] == 2.5


def test_round_trip_minimal(tmp_path):
    """No mask, no truth, no candidates, a None geometry field."""
    frames = make_frames(5, candidates=False)
    geo = dict(GEOMETRY, resolution_max_A=None)
    path = tmp_path / "min.h5"
    write_dataset(path, frames, geo, dict(cell=CRYSTAL["cell"], space_group="P 1"))
    with SparseDataset(path) as ds:
        assert ds.mask is None and not ds.has_truth and not ds.has_candidates
        assert ds.geometry == geo
        assert ds.crystal == dict(cell=CRYSTAL["cell"], space_group="P 1")
        assert_frames_equal(ds.read_block(0, 5), frames)
        with pytest.raises(DataError, match="min.h5"):
            ds.read_truth()


def test_read_block_subranges(written):
    path, frames, _, _ = written
    with SparseDataset(path) as ds:
        for a, b in [(0, 1), (2, 5), (3, 4), (5, 12), (7, 7), (11, 12)]:
            assert_frames_equal(ds.read_block(a, b), frames.frame_slice(a, b))
            blk = ds.read_block(a, b)
            assert blk.photon_offsets[0] == 0 and blk.n_frames == b - a
        cuts = [0, 3, 4, 9, 12]
        blocks = [ds.read_block(a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        assert_frames_equal(SparseFrames.concatenate(blocks), frames)
        with pytest.raises(DataError, match="data.h5"):
            ds.read_block(5, 13)


def test_read_block_reads_only_slices(tmp_path, monkeypatch):
    frames = make_frames(10, big=(0, 1, 8, 9), candidates=False)
    path = tmp_path / "big.h5"
    write_dataset(path, frames, GEOMETRY, CRYSTAL)
    calls = []
    orig = h5py.Dataset.__getitem__

    def spy(self, args, *rest, **kw):
        out = orig(self, args, *rest, **kw)
        calls.append((self.name, np.shape(out)))
        return out

    with SparseDataset(path) as ds:
        monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
        blk = ds.read_block(4, 6)
        monkeypatch.undo()
    assert_frames_equal(blk, frames.frame_slice(4, 6))
    n_needed = int(frames.photon_offsets[6] - frames.photon_offsets[4])
    photon_reads = [c for c in calls if c[0] in ("/frames/photon_pixels", "/frames/photon_counts")]
    assert photon_reads and all(shape == (n_needed,) for _, shape in photon_reads)
    assert n_needed < 100 < frames.photon_pixels.shape[0]


def test_empty_dataset(tmp_path):
    frames = SparseFrames.concatenate([make_frames(3, candidates=False).frame_slice(0, 0)])
    path = tmp_path / "empty.h5"
    write_dataset(path, frames, GEOMETRY, CRYSTAL)
    with SparseDataset(path) as ds:
        assert ds.n_frames == 0
        assert ds.read_block(0, 0).n_frames == 0


# -- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.h5: no such file"):
        SparseDataset(tmp_path / "nothere.h5")


def test_truncated_file(written):
    path = written[0]
    raw = path.read_bytes()
    cut = path.with_name("cut.h5")
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.h5"):
        with SparseDataset(cut) as ds:
            ds.read_block(0, ds.n_frames)


def test_not_hdf5(tmp_path):
    p = tmp_path / "text.h5"
    p.write_text("this is not HDF5\n" * 100)
    with pytest.raises(DataError, match="text.h5"):
        SparseDataset(p)


def test_missing_dataset(written):
    path = written[0]
    with h5py.File(path, "a") as f:
        del f["frames/photon_counts"]
    with pytest.raises(DataError, match=r"data.h5: dataset /frames/photon_counts is missing"):
        SparseDataset(path)


def test_wrong_shape_background(written):
    path = written[0]
    with h5py.File(path, "a") as f:
        del f["frames/background"]
        f["frames/background"] = np.zeros((11, N_SHELLS), np.float32)
    with pytest.raises(DataError, match=r"data.h5.*/frames/background"):
        SparseDataset(path)


def test_wrong_dtype_counts(written):
    path = written[0]
    with h5py.File(path, "a") as f:
        n = f["frames/photon_counts"].shape[0]
        del f["frames/photon_counts"]
        f["frames/photon_counts"] = np.ones(n, np.float32)
    with pytest.raises(DataError, match=r"data.h5: dataset /frames/photon_counts has dtype float32"):
        SparseDataset(path)


def test_bad_values_in_block(written):
    path = written[0]
    with h5py.File(path, "a") as f:
        f["frames/photon_counts"][0] = 0
    with SparseDataset(path) as ds:
        with pytest.raises(DataError, match=r"data.h5.*photon_counts"):
            ds.read_block(0, ds.n_frames)


def test_refuses_overwrite_and_failed_write_keeps_file(written):
    path, frames, _, _ = written
    before = path.read_bytes()
    with pytest.raises(DataError, match="data.h5: file exists"):
        write_dataset(path, frames, GEOMETRY, CRYSTAL)
    bad = dataclass_replace(frames, photon_counts=np.where(np.arange(frames.photon_counts.size) == 2, 0,
                                                           frames.photon_counts).astype(np.int32))
    with pytest.raises(DataError, match="photon_counts"):
        write_dataset(path, bad, GEOMETRY, CRYSTAL, overwrite=True, candidate_sampling_n=2)
    # failure after the temporary file was created (unsupported truth value)
    with pytest.raises(DataError, match="truth"):
        write_dataset(path, frames, GEOMETRY, CRYSTAL, truth=dict(x=object()), overwrite=True,
                      candidate_sampling_n=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["data.h5"]  # no temporary left behind
    # a successful overwrite replaces it
    write_dataset(path, frames.frame_slice(0, 4), GEOMETRY, CRYSTAL, overwrite=True, candidate_sampling_n=2)
    with SparseDataset(path) as ds:
        assert ds.n_frames == 4


def dataclass_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


@pytest.mark.parametrize("field,value,msg", [
    ("photon_offsets", np.array([0, 3, 2, 5]), "photon_offsets"),
    ("photon_pixels", np.array([1, 2, NUM_PIX, 4, 5]), "photon_pixels"),
    ("photon_pixels", np.array([1, 1, 2, 4, 5]), "photon_pixels"),
    ("photon_counts", np.array([1, 1, 1, 1]), "photon_counts"),
    ("background", np.array([[0.1, np.nan], [0, 0], [0, 0]], np.float32), "background"),
    ("background", np.array([[0.1, -0.5], [0, 0], [0, 0]], np.float32), "background"),
    ("dead_pixels", np.array([-1]), "dead_pixels"),
])
def test_validate(field, value, msg):
    ok = dict(frame_id=np.arange(3), photon_offsets=np.array([0, 2, 2, 5]),
              photon_pixels=np.array([1, 2, 0, 4, 5]), photon_counts=np.array([1, 2, 1, 1, 3]),
              dead_offsets=np.array([0, 0, 1, 1]), dead_pixels=np.array([7]),
              background=np.zeros((3, 2), np.float32))
    SparseFrames(**ok).validate(num_pixels=NUM_PIX)
    with pytest.raises(DataError, match=msg):
        SparseFrames(**dict(ok, **{field: value})).validate(num_pixels=NUM_PIX)


# -- padding ---------------------------------------------------------------------------------------


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 8, 9, 12, 13, 16, 17, 24, 25, 33, 48, 49, 100)] == \
        [8, 8, 8, 12, 12, 16, 16, 24, 24, 32, 48, 48, 64, 128]
    assert bucket_length(1000) == 1024 and bucket_length(1025) == 1536
    with pytest.raises(ValueError):
        bucket_length(-1)


def test_pad_frames():
    frames = SparseFrames(
        frame_id=np.arange(3), photon_offsets=np.array([0, 3, 3, 13]),
        photon_pixels=np.array([1, 5, 9] + list(range(10, 20))[:10]),
        photon_counts=np.array([2, 1, 4] + [1] * 10),
        dead_offsets=np.array([0, 1, 3, 3]), dead_pixels=np.array([5, 2, 3]),
        background=np.full((3, 2), 0.25, np.float32))
    frames.validate(num_pixels=20)
    pixel_map = np.arange(20, dtype=np.int32)[::-1].copy()  # valid index = 19 - raw
    pixel_map[[5, 12, 2]] = -1                                # masked
    pf = pad_frames(frames, pixel_map)
    assert isinstance(pf, PaddedFrames) and pf.n_frames == 3
    assert pf.pixels.shape == (3, 12) and pf.pixels.dtype == np.int32   # 9 kept in frame 2 -> 12
    assert pf.counts.dtype == np.float32 and pf.dead.shape == (3, 8) and pf.dead_weight.dtype == np.float32
    np.testing.assert_array_equal(pf.pixels[0], [18, 10] + [0] * 10)  # raw 5 dropped, zero padding
    np.testing.assert_array_equal(pf.counts[0], [2, 4] + [0] * 10)
    assert np.all(pf.pixels[1] == 0) and np.all(pf.counts[1] == 0)
    kept = [r for r in range(10, 20) if r != 12]
    np.testing.assert_array_equal(pf.pixels[2, :9], [19 - r for r in kept])
    np.testing.assert_array_equal(pf.counts[2], [1] * 9 + [0] * 3)
    np.testing.assert_array_equal(pf.dead_weight, [[0] * 8, [1] + [0] * 7, [0] * 8])  # raw 5, 2 dropped
    np.testing.assert_array_equal(pf.dead, [[0] * 8, [19 - 3] + [0] * 7, [0] * 8])
    np.testing.assert_array_equal(pf.background, frames.background)
    # total counts preserved except those on masked pixels
    assert pf.counts.sum() == frames.photon_counts.sum() - 1 - 1
    # fixed lengths
    pf2 = pad_frames(frames, pixel_map, photon_length=16, dead_length=4)
    assert pf2.pixels.shape == (3, 16) and pf2.dead.shape == (3, 4)
    with pytest.raises(ValueError, match="photon_length"):
        pad_frames(frames, pixel_map, photon_length=4)
