"""The sparse join: photons (and dead pixels) of frames x in-peak entries of their candidate rotations.

Only photons that fall inside a peak at rotation r change the likelihood of (frame, r) (DESIGN.md
"Computational notes"). For a block of frames the join lists every (record, entry) pair where the record's
pixel is the entry's pixel and the entry's rotation is one of the frame's candidates; it depends on the
data and the geometry only, so it is built once per block (host-side numpy index work) and the E-step is
then a gather, a log1p and a segment sum over it.

A *cell* is a (frame, candidate slot) pair of the block, flat index ``local_frame * n_slots + slot``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from emcjax.data import SparseFrames
from emcjax.detector import Detector

BACKGROUND_FLOOR = 1e-6  # photons per pixel: keeps log1p(phi W / B) finite


class PixelRecords(NamedTuple):
    """Photons and dead pixels of a block of frames inside the valid pixels and the frames' unmasked shells.

    Attributes:
      frame: (n,) int64 frame of the record (position in the block).
      pixel: (n,) int64 valid-pixel index.
      count: (n,) float64 photons (0 for a dead pixel).
      dead: (n,) float64 1 for a dead pixel, else 0.
      background: (n,) float64 B_d(s_t) at the pixel (photons per pixel per unit pol, >= 0).
    """

    frame: np.ndarray
    pixel: np.ndarray
    count: np.ndarray
    dead: np.ndarray
    background: np.ndarray


def pixel_records(frames: SparseFrames, detector: Detector, background: np.ndarray) -> PixelRecords:
    """The photons (then the dead pixels) of ``frames`` that the likelihood sees.

    Args:
      frames: sparse frames (raw pixel ids).
      detector: valid pixels.
      background: (n_frames, n_shells) background with masked shells < 0.
    """
    pixel_map = detector.pixel_map()
    parts = []
    for offsets, pixels, counts, dead in (
        (frames.photon_offsets, frames.photon_pixels, frames.photon_counts, 0.0),
        (frames.dead_offsets, frames.dead_pixels, None, 1.0),
    ):
        frame = np.repeat(np.arange(frames.n_frames), np.diff(offsets))
        pix = pixel_map[pixels]
        cnt = np.zeros(pix.shape, np.float64) if counts is None else counts.astype(np.float64)
        keep = pix >= 0
        frame, pix, cnt = frame[keep], pix[keep], cnt[keep]
        bg = background[frame, detector.shell[pix]]
        keep = bg >= 0  # photons in shells excluded for this frame do not count
        parts.append((frame[keep], pix[keep], cnt[keep], np.full(keep.sum(), dead), bg[keep]))
    return PixelRecords(*(np.concatenate(x) for x in zip(*parts)))


def ragged_ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of ranges [starts[i], starts[i] + lengths[i]): (values, owner index i of each value)."""
    lengths = np.asarray(lengths, np.int64)
    owner = np.repeat(np.arange(lengths.shape[0]), lengths)
    first = np.cumsum(lengths) - lengths
    values = np.repeat(np.asarray(starts, np.int64), lengths) + np.arange(owner.shape[0]) - np.repeat(first, lengths)
    return values, owner


@dataclasses.dataclass(frozen=True, eq=False)
class EntryIndex:
    """Host copy of the in-peak entries, indexed by pixel (built once per run).

    Attributes:
      rotation: (n_entries,) int64 local rotation of each entry.
      pixel: (n_entries,) int64 valid pixel of each entry.
      by_pixel: (n_entries,) int64 entry ids sorted by pixel.
      pixel_start: (n_pix + 1,) int64 CSR offsets of ``by_pixel``.
      n_rot: number of rotations.
    """

    rotation: np.ndarray
    pixel: np.ndarray
    by_pixel: np.ndarray
    pixel_start: np.ndarray
    n_rot: int

    @functools.cached_property
    def by_key(self) -> tuple[np.ndarray, np.ndarray]:
        """(entry ids sorted by rotation * n_pix + pixel, those keys sorted): the index by (rotation, pixel) that
        :func:`build_join` looks frames' candidates up in (built on first use)."""
        key = self.rotation * (self.pixel_start.shape[0] - 1) + self.pixel
        order = np.argsort(key, kind="stable")
        return order, key[order]

    @staticmethod
    def build(entry_pixel: np.ndarray, entry_rotation: np.ndarray, n_pix: int, n_rot: int) -> "EntryIndex":
        order = np.argsort(entry_pixel, kind="stable")
        start = np.searchsorted(entry_pixel[order], np.arange(n_pix + 1))
        return EntryIndex(
            rotation=np.asarray(entry_rotation, np.int64),
            pixel=np.asarray(entry_pixel, np.int64),
            by_pixel=order,
            pixel_start=start,
            n_rot=n_rot,
        )


class JoinArrays(NamedTuple):
    """The join of one block of frames on one device (numpy or device arrays), sorted by cell.

    Attributes:
      cell: (n,) int32 cell of the pair.
      entry: (n,) int32 in-peak entry (its rotation is the cell's candidate).
      count: (n,) float32 photons K at the pixel (0 for a dead pixel or padding).
      dead: (n,) float32 1 for a dead pixel, else 0.
      background: (n,) float32 B_d(s_t), photons per pixel per unit pol (floored).
      polarization: (n,) float32 pol_t.
    """

    cell: np.ndarray
    entry: np.ndarray
    count: np.ndarray
    dead: np.ndarray
    background: np.ndarray
    polarization: np.ndarray


def build_join(
    frames: SparseFrames,
    detector: Detector,
    entries: EntryIndex,
    candidates: np.ndarray,
    candidate_mask: np.ndarray,
    background: np.ndarray,
    with_records: bool = False,
):
    """Joins every photon and dead pixel with the in-peak entries of its frame's candidate rotations.

    Args:
      frames: sparse frames (raw pixel ids); may hold fewer frames than ``candidates`` has rows (padding).
      detector: valid pixels.
      entries: in-peak entries of the rotations, indexed by pixel.
      candidates: (n_frames, n_slots) local rotation index of each slot.
      candidate_mask: (n_frames, n_slots) which slots are real.
      background: (frames.n_frames, n_shells) float64 background with masked shells < 0.
      with_records: also return each pair's record (its position in :func:`pixel_records`' order).

    Returns:
      ``(join, cell_offsets)``: the join sorted by cell (numpy) and its CSR offsets (n_frames*n_slots + 1,);
      ``(join, cell_offsets, record)`` with ``with_records``.
    """
    n_frames, n_slots = candidates.shape
    rec = pixel_records(frames, detector, background)
    start = entries.pixel_start[rec.pixel]
    at_pixel = entries.pixel_start[rec.pixel + 1] - start
    first = _first_slots(candidates, candidate_mask)
    if rec.pixel.shape[0] * n_slots < int(at_pixel.sum()):  # few candidates per frame, many rotations per block
        cell, entry, owner = _pairs_by_lookup(rec, entries, candidates, first)
    else:
        cell, entry, owner = _pairs_by_pixel(rec, entries, candidates, first, start, at_pixel)
    order = np.argsort(cell, kind="stable")
    cell, entry, owner = cell[order], entry[order], owner[order]
    cell_offsets = np.searchsorted(cell, np.arange(n_frames * n_slots + 1)).astype(np.int64)
    join = JoinArrays(
        cell=cell.astype(np.int32),
        entry=entry.astype(np.int32),
        count=rec.count[owner].astype(np.float32),
        dead=rec.dead[owner].astype(np.float32),
        background=np.maximum(rec.background[owner], BACKGROUND_FLOOR).astype(np.float32),
        polarization=detector.polarization[rec.pixel[owner]].astype(np.float32),
    )
    return (join, cell_offsets, owner) if with_records else (join, cell_offsets)


def _first_slots(candidates: np.ndarray, candidate_mask: np.ndarray) -> np.ndarray:
    """(n_frames, n_slots) bool: the real slots whose rotation no earlier slot of the frame holds (a rotation
    listed twice gets its pairs once, in its first slot)."""
    prefix = np.all(candidate_mask[:, 1:] <= candidate_mask[:, :-1])
    if prefix and np.all(~candidate_mask[:, 1:] | (np.diff(candidates, axis=1) > 0)):
        return candidate_mask  # increasing lists (e.g. a full search's): no rotation twice
    listed = np.where(candidate_mask, candidates, -1)
    order = np.argsort(listed, axis=1, kind="stable")
    ranked = np.take_along_axis(listed, order, axis=1)
    repeat = np.zeros(candidates.shape, bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    first = np.empty(candidates.shape, bool)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first & candidate_mask


def _pairs_by_pixel(rec: PixelRecords, entries: EntryIndex, candidates, first, start, at_pixel):
    """(cell, entry, record) of the join, in record order: every entry at each record's pixel, kept when its
    rotation is one of the frame's candidates (cheap when the block's rotations are the frames' candidates)."""
    n_slots = candidates.shape[1]
    pos, owner = ragged_ranges(start, at_pixel)
    entry = entries.by_pixel[pos]
    frame = rec.frame[owner]
    # Keys are frame * (n_rot + 1) + rotation; other slots get rotation n_rot (sorted last, never matched).
    stride = entries.n_rot + 1
    cand_key = np.arange(candidates.shape[0])[:, None] * stride + np.where(first, candidates, entries.n_rot)
    slot_order = np.argsort(cand_key, axis=1, kind="stable")
    sorted_keys = np.take_along_axis(cand_key, slot_order, axis=1).ravel()
    key = frame * stride + entries.rotation[entry]
    at = np.minimum(np.searchsorted(sorted_keys, key), sorted_keys.shape[0] - 1)
    hit = sorted_keys[at] == key
    return frame[hit] * n_slots + slot_order.ravel()[at[hit]], entry[hit], owner[hit]


def _pairs_by_lookup(rec: PixelRecords, entries: EntryIndex, candidates, first):
    """:func:`_pairs_by_pixel`'s pairs, in record order, by looking each (record, candidate slot) up in the
    entries by (rotation, pixel): cheap when a block holds many more rotations than a frame's candidates
    (candidate lists that differ from frame to frame)."""
    n_pix = entries.pixel_start.shape[0] - 1
    n_slots = candidates.shape[1]
    record = np.repeat(np.arange(rec.pixel.shape[0]), n_slots)
    slot = np.tile(np.arange(n_slots), rec.pixel.shape[0])
    keep = first[rec.frame[record], slot]
    record, slot = record[keep], slot[keep]
    frame = rec.frame[record]
    by_key, sorted_key = entries.by_key
    key = candidates[frame, slot] * n_pix + rec.pixel[record]
    low = np.searchsorted(sorted_key, key, "left")
    pos, query = ragged_ranges(low, np.searchsorted(sorted_key, key, "right") - low)
    return frame[query] * n_slots + slot[query], by_key[pos], record[query]


def all_rotations_join(records: PixelRecords, entries: EntryIndex, n_cells: int):
    """The join of a full search (every frame's candidates are all ``entries.n_rot`` rotations in order, so
    a pair's slot is its entry's rotation): :func:`build_join`'s pairs, order and cell offsets with
    ``candidates = arange(n_rot)``, without its slot search (``with_records`` columns only).

    Args:
      records: the block's :func:`pixel_records`.
      entries: in-peak entries of the rotations, indexed by pixel.
      n_cells: frames of the block (padding included) x ``entries.n_rot``.

    Returns:
      ``(cell, entry, record, cell_offsets)``: int32 cell, entry and record of each pair sorted by cell (pairs
      of one cell in record order, as build_join's stable sort), int64 CSR offsets (n_cells + 1,).
    """
    start = entries.pixel_start[records.pixel]
    position, record = ragged_ranges(start, entries.pixel_start[records.pixel + 1] - start)
    entry = entries.by_pixel[position]
    cell = records.frame[record] * entries.n_rot + entries.rotation[entry]
    # stable sort by cell as one unstable sort of unique keys (cell, position): a few times cheaper
    bits = max(int(cell.shape[0]).bit_length(), 1)
    order = np.sort((cell << bits) | np.arange(cell.shape[0])) & ((1 << bits) - 1)
    cell = cell[order]
    offsets = np.zeros(n_cells + 1, np.int64)
    np.cumsum(np.bincount(cell, minlength=n_cells), out=offsets[1:])
    return cell.astype(np.int32), entry[order].astype(np.int32), record[order].astype(np.int32), offsets


def pad_join(join: JoinArrays, length: int, n_cells: int) -> JoinArrays:
    """Pads a join to ``length`` pairs that contribute nothing (count 0, not dead, last cell, B = 1, pol = 1:
    finite terms and gradients)."""
    pad = length - join.cell.shape[0]
    if pad < 0:
        raise ValueError(f"pad_join: join of {join.cell.shape[0]} pairs does not fit length {length}")
    fill = {"cell": max(n_cells - 1, 0), "entry": 0, "count": 0.0, "dead": 0.0, "background": 1.0, "polarization": 1.0}
    return JoinArrays(**{k: np.concatenate([v, np.full(pad, fill[k], v.dtype)]) for k, v in join._asdict().items()})
