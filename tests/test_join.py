"""emcjax.join.build_join against a direct loop over (record, candidate slot, entry), by both of its ways of
pairing (every entry at a record's pixel, filtered by the frame's candidates; or a lookup of each record's
(candidate rotation, pixel)), with duplicate and missing candidate slots."""

import numpy as np
import pytest

from emcjax import join
from emcjax.data import SparseFrames
from emcjax.detector import DetectorGeometry, make_detector


def _case(seed: int, n_rot: int, n_slots: int):
    rng = np.random.default_rng(seed)
    detector = make_detector(DetectorGeometry(num_rows=12, num_cols=12, pixel_size_m=3.6e-3,
                                              beam_center_px=(5.5, 5.5), resolution_max_A=8.0, n_shells=4))
    n_entries = 40 * n_rot
    entry_pixel = rng.integers(0, detector.n_pix, n_entries)
    entry_rotation = rng.integers(0, n_rot, n_entries)
    entries = join.EntryIndex.build(entry_pixel, entry_rotation, detector.n_pix, n_rot)
    n_frames = 7
    photons = [np.sort(rng.choice(detector.pixel_id, rng.integers(5, 30), replace=False)) for _ in range(n_frames)]
    dead = [np.setdiff1d(rng.choice(detector.pixel_id, 3, replace=False), p) for p in photons]
    offsets = lambda parts: np.concatenate([[0], np.cumsum([len(p) for p in parts])])  # noqa: E731
    background = rng.uniform(0.01, 0.2, (n_frames, 4))
    background[2, 1] = -1.0  # a masked shell
    frames = SparseFrames(frame_id=np.arange(n_frames), photon_offsets=offsets(photons),
                          photon_pixels=np.concatenate(photons),
                          photon_counts=rng.integers(1, 4, sum(len(p) for p in photons)),
                          dead_offsets=offsets(dead), dead_pixels=np.concatenate(dead), background=background)
    candidates = rng.integers(0, n_rot, (n_frames + 1, n_slots))  # one padding row
    candidates[0, 3] = candidates[0, 1]  # a rotation listed twice
    mask = rng.random(candidates.shape) < 0.8
    mask[-1] = False
    return frames, detector, entries, candidates, mask, background


def _reference(frames, detector, entries, candidates, mask, background):
    """Sorted (cell, entry, record) triples by plain loops."""
    rec = join.pixel_records(frames, detector, background)
    n_slots = candidates.shape[1]
    triples = []
    for r in range(rec.pixel.shape[0]):
        f = rec.frame[r]
        seen = set()
        for s in range(n_slots):
            rot = int(candidates[f, s])
            if not mask[f, s] or rot in seen:
                continue
            seen.add(rot)
            for e in np.flatnonzero((entries.pixel == rec.pixel[r]) & (entries.rotation == rot)):
                triples.append((f * n_slots + s, e, r))
    return sorted(triples)


@pytest.mark.parametrize("n_rot, n_slots", [(60, 5), (6, 6)])  # lookup / filtering by pixel
def test_join_equals_direct_loop(n_rot, n_slots):
    args = _case(0, n_rot, n_slots)
    frames, detector, entries, candidates, mask, background = args
    joined, cell_offsets, record = join.build_join(*args, with_records=True)
    assert np.all(np.diff(joined.cell) >= 0)
    assert cell_offsets.shape == (candidates.size + 1,)
    assert np.array_equal(np.diff(cell_offsets), np.bincount(joined.cell, minlength=candidates.size))
    found = sorted(zip(joined.cell.tolist(), joined.entry.tolist(), record.tolist()))
    assert found == _reference(*args)
    rec = join.pixel_records(frames, detector, background)
    assert np.array_equal(joined.count, rec.count[record].astype(np.float32))
    # both ways of pairing give the same pairs in the same record order
    first = join._first_slots(candidates, mask)
    start = entries.pixel_start[rec.pixel]
    by_lookup = join._pairs_by_lookup(rec, entries, candidates, first)
    by_pixel = join._pairs_by_pixel(rec, entries, candidates, first, start,
                                    entries.pixel_start[rec.pixel + 1] - start)
    for a, b in zip(by_lookup, by_pixel):
        assert np.array_equal(a[np.argsort(by_lookup[0], kind="stable")], b[np.argsort(by_pixel[0], kind="stable")])
