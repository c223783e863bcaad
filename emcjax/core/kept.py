"""The E -> M handoff on the device: responsibilities -> kept pairs, selected and gathered with static budgets.

A kept join pair is a join pair whose (frame, slot) cell kept a non-zero responsibility. The join is sorted by
cell with CSR offsets, so the kept pairs are the concatenated ranges of the kept cells, written into a static
number of slots (a cumulative sum of the range lengths and a binary search per slot): the work is
proportional to the kept pairs, not to the join, and there is no host round trip. The number
of live pairs is returned with the kept pairs so that the caller can detect an overflowing budget (the pairs
beyond it would be dropped) and rerun with a larger bucket.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emcjax.core.arrays import BlockArrays, Kept
from emcjax.core.estep import Responsibilities


def kept_pairs(resp: Responsibilities, local: BlockArrays, budget: int | None, with_background: bool):
    """Kept pairs of one device's block, weighted by the frame weights.

    Args:
      resp: the block's responsibilities (n_local, k).
      local: the block's frames on this device.
      budget: static number of kept join pairs (None: every join pair, no compaction).
      with_background: also carry each pair's per-shell background (non-linear zero terms need it).

    Returns:
      ``(kept, n_live)``: the kept pairs (``budget`` join pairs, ``n_local * k`` frame-rotation pairs) and
      the () int32 number of live join pairs (> budget: pairs were dropped).
    """
    n_local, n_slots = local.candidates.shape
    join = local.join
    k = resp.slot.shape[1]
    prob = resp.prob * local.weight[:, None]
    rows = jnp.broadcast_to(jnp.arange(n_local)[:, None], resp.slot.shape)
    # the join ranges of the kept cells (CSR offsets), concatenated: touches only kept pairs, not the join
    cell = (rows * n_slots + resp.slot).ravel()
    cell_prob = prob.ravel()
    first = local.cell_offsets[cell]
    count = jnp.where(cell_prob > 0, local.cell_offsets[cell + 1] - first, 0)
    ends = jnp.cumsum(count)
    n_live = ends[-1].astype(jnp.int32)
    length = join.cell.shape[0] if budget is None else budget
    position = jnp.arange(length)
    owner = jnp.minimum(jnp.searchsorted(ends, position, side="right"), cell.shape[0] - 1)
    real = position < n_live
    index = jnp.where(real, first[owner] + position - (ends[owner] - count[owner]), 0)
    term = jnp.where(real, cell_prob[owner], 0.0)
    pair_rows = rows.ravel()
    kept = Kept(
        entry=join.entry[index],
        prob=term,
        count=join.count[index],
        dead=jnp.where(real, join.dead[index], 0.0),
        background=join.background[index],
        polarization=join.polarization[index],
        frame=local.frame_start + join.cell[index] // n_slots,
        pair_frame=local.frame_start + pair_rows,
        pair_rotation=local.candidates[pair_rows, resp.slot.ravel()],
        pair_prob=prob.ravel(),
        pair_masked=local.masked_shells[pair_rows],
        pair_background=local.background[pair_rows] if with_background else jnp.zeros((n_local * k, 0)),
    )
    return kept, n_live


def flatten_blocks(kept: Kept) -> Kept:
    """Kept pairs stacked over blocks, (n_blocks, n, ...) -> (n_blocks * n, ...)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), kept)
