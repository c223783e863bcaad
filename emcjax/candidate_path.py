"""Candidate lists: the table path or the direct path (``EMCConfig.candidate_path``), by a cost estimate.

See docs/ARCHITECTURE.md "Candidate lists" and :func:`choose_path`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from emcjax import model as model_lib
from emcjax.blocks import FrameSource
from emcjax.config import EMCConfig
from emcjax.data import SparseDataset, SparseFrames
from emcjax.problem import common_candidates, geometry_setup
from emcjax.sampling_index import SampledRotations

BUILD_COST = 8.0  # building one in-peak entry (search, stencil) in units of reading one (a tomogram term)
AMORTISED_ITERATIONS = 10  # iterations the table path's set-up is spread over
TABLE_BYTES = 8 << 30  # the table path's entries beyond this do not fit: the direct path is taken


KEPT_PER_FRAME = 1.5  # kept rotations per frame and E-step (measured ~1.2 at the paper's geometry)


def choose_path(n_candidates: int, n_distinct: int, records_per_frame: float, entries_per_rotation: float,
                reflections_per_frame: float, signal: str, n_frames: int = 0) -> str:
    """``"direct"`` or ``"table"`` for candidate lists, by the work per iteration (set-up amortised).

    Work in units of one trilinear model read (a locate-and-gather costs about one):

    * table: the entries of every distinct candidate, built once (``BUILD_COST`` each, over
      ``AMORTISED_ITERATIONS``) and read twice per iteration (tomograms of two E-steps), plus the join
      (records x candidates, twice): ``n_distinct E (BUILD_COST / AMORTISED_ITERATIONS + 2) + 2 n_candidates R``;
      its entries take ``64 n_distinct E`` bytes.
    * direct: every (record, candidate) pair and every candidate's expected signal, twice per iteration:
      ``2 n_candidates (R + S)`` with S = 2E for the exact signal (the box tests around each reflection are
      about twice its in-peak pixels) or, for the tabulated one, the reflections near the sphere at the
      candidate (table interpolations, padded) plus a three-multiply-add test of the frame's preselected list
      (cut_signal.near_frame_signal): about twice the reflections near the sphere; plus, once per
      iteration, the box tests of every in-peak pixel of the kept rotations (the intensity M-step's
      exposure, emcjax.core.direct_mstep): ``KEPT_PER_FRAME n_frames 2E``.

    The direct path is taken when it does less work or when the table path's entries exceed ``TABLE_BYTES``.
    With the exact signal and candidates used by one frame each, the two do similar work; the direct path
    then wins on memory (O(block)); with the tabulated signal it wins whenever peaks span many pixels.

    Args:
      n_candidates: (frame, candidate) pairs over all frames; n_distinct: distinct candidate rotations;
      records_per_frame: photon and dead-pixel records per frame (R); entries_per_rotation: in-peak pixels
      of one rotation (E); reflections_per_frame: the tabulated signal's terms per candidate (see above);
      signal: "exact" or "tabulated"; n_frames: frames (for the kept rotations' exposure).
    """
    entries = n_distinct * entries_per_rotation
    table = entries * (BUILD_COST / AMORTISED_ITERATIONS + 2.0) + 2.0 * n_candidates * records_per_frame
    per_signal = 2.0 * entries_per_rotation if signal == "exact" else reflections_per_frame
    direct = 2.0 * n_candidates * (records_per_frame + per_signal) + KEPT_PER_FRAME * n_frames * 2.0 * entries_per_rotation
    return "direct" if direct < table or 64.0 * entries > TABLE_BYTES else "table"


def use_direct(dataset: SparseDataset, config: EMCConfig, frames: SparseFrames | None, mesh) -> bool:
    """Whether ``setup_problem`` takes the direct path: ``config.candidate_path`` "direct", or "auto" and
    :func:`choose_path` says so (frames with candidate lists that differ between frames, one device)."""
    source = FrameSource(dataset, frames)
    candidates = source.candidates()
    if candidates is None or common_candidates(*candidates) is not None:
        return False
    if config.candidate_path == "direct":
        return True
    if mesh.size != 1:
        return False
    offsets, rotation_ids = candidates
    sample = source.read(0, min(source.n_frames, 256))
    records = (sample.photon_offsets[-1] + sample.dead_offsets[-1]) / max(sample.n_frames, 1)
    _, _, detector, grid, _ = geometry_setup(dataset, config, frames)
    proj, _, n_box = model_lib.projection_setup(grid, detector)
    quats = SampledRotations(int(dataset.candidate_sampling_n)).quaternions[np.asarray(rotation_ids[:1])]
    near = float(np.asarray(model_lib.near_sphere_counts(jnp.asarray(quats, jnp.float32), proj))[0])
    path = choose_path(int(rotation_ids.shape[0]), int(np.unique(rotation_ids).shape[0]), float(records),
                       near * n_box**2 / 2.0, 2.0 * near, config.candidate_signal, source.n_frames)
    return path == "direct"
