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
    return _gather_kept(resp, local, prob, index, real, term, with_background), n_live


def kept_pairs_by_mask(resp: Responsibilities, local: BlockArrays, budget: int | None, with_background: bool,
                       n_pairs: jax.Array):
    """:func:`kept_pairs` for a join in any order (emcjax.core.stream's, built on the device; ``local.cell_offsets``
    is not read): every join pair looks its cell's probability up and the live ones are compacted in join
    order, O(join) work. ``n_pairs``: the join's real pairs (the first ones). Same results as
    :func:`kept_pairs`; the kept join pairs come in join order instead of cell order."""
    n_local, n_slots = local.candidates.shape
    join = local.join
    prob = resp.prob * local.weight[:, None]
    rows = jnp.arange(n_local)[:, None]
    cell_prob = jnp.zeros(n_local * n_slots, prob.dtype).at[(rows * n_slots + resp.slot).ravel()].set(prob.ravel())
    pair_prob = jnp.where(jnp.arange(join.cell.shape[0]) < n_pairs, cell_prob[join.cell], 0.0)
    live = pair_prob > 0
    n_live = jnp.sum(live, dtype=jnp.int32)
    length = join.cell.shape[0] if budget is None else budget
    (index,) = jnp.nonzero(live, size=length, fill_value=0)
    real = jnp.arange(length) < n_live
    return _gather_kept(resp, local, prob, index, real, jnp.where(real, pair_prob[index], 0.0), with_background), n_live


def _gather_kept(resp: Responsibilities, local: BlockArrays, prob, index, real, term, with_background: bool) -> Kept:
    """The kept pairs: join pairs ``index`` (``real`` ones, weighted ``term``) and the kept (frame, rotation) pairs."""
    n_local, n_slots = local.candidates.shape
    join = local.join
    k = resp.slot.shape[1]
    pair_rows = jnp.broadcast_to(jnp.arange(n_local)[:, None], resp.slot.shape).ravel()
    return Kept(
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


def flatten_blocks(kept: Kept) -> Kept:
    """Kept pairs stacked over blocks, (n_blocks, n, ...) -> (n_blocks * n, ...)."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), kept)
