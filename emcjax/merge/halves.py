"""Independent half sets: a deterministic split of the frames and an independent random start for each half.

A half is a run over all frames whose frame weights are 0 outside the half, so every stage (lowres,
rejection, ...) works on halves unchanged. The split is by frame index parity (the reference's even / odd
positions) or a seeded random permutation (first ceil(n/2) frames of the permutation go to half a); the
method and seed are recorded in the run directory (``frame_weights.h5``). Each half starts from its own
random model: its seed is drawn from (seed, half) by numpy's SeedSequence (the reference seeded both
halves identically, METHOD.md §14).
"""

from __future__ import annotations

import pathlib
from typing import Literal

import numpy as np

from emcjax.errors import ConfigError
from emcjax.merge.rundata import FRAME_WEIGHTS_FILE, read_frame_weights, write_frame_weights

HALVES = ("a", "b")


def split_frames(n_frames: int, method: Literal["parity", "random"] = "parity", seed: int = 0) -> np.ndarray:
    """(n_frames,) int8 half of each frame: 0 (half a) or 1 (half b); half a gets ceil(n/2) frames."""
    if method == "parity":
        return (np.arange(n_frames) % 2).astype(np.int8)
    if method == "random":
        order = np.random.default_rng([seed, 0x5A17]).permutation(n_frames)
        half = np.ones(n_frames, np.int8)
        half[order[: (n_frames + 1) // 2]] = 0
        return half
    raise ConfigError(f"split must be 'parity' or 'random', got {method!r}")


def half_seed(seed: int, half: str) -> int:
    """The seed of a half's random start: independent for a and b, a deterministic function of ``seed``."""
    if half not in HALVES:
        raise ConfigError(f"half must be 'a' or 'b', got {half!r}")
    return int(np.random.SeedSequence([seed, HALVES.index(half)]).generate_state(1)[0])


def run_frame_weights(
    n_frames: int,
    *,
    weights_file: pathlib.Path | None,
    half: str | None,
    split: str = "parity",
    split_seed: int = 0,
) -> tuple[np.ndarray | None, dict]:
    """The frame weights of a run: a weights file's, times the half's 0/1 mask; None when neither is given.

    Returns:
      ``(weights, attrs)``: (n_frames,) float64 or None, and what to record with them.
    """
    weights, attrs = None, {}
    if weights_file is not None:
        weights, _ = read_frame_weights(weights_file, n_frames)
        attrs["source"] = str(weights_file)
    if half is not None:
        if half not in HALVES:
            raise ConfigError(f"half must be 'a' or 'b', got {half!r}")
        mask = split_frames(n_frames, split, split_seed) == HALVES.index(half)
        weights = mask.astype(np.float64) if weights is None else weights * mask
        attrs.update(half=half, split=split, split_seed=int(split_seed))
    return weights, attrs


def record(run_dir: pathlib.Path, weights: np.ndarray, attrs: dict) -> pathlib.Path:
    """Writes the weights a run uses to ``run_dir/frame_weights.h5``."""
    return write_frame_weights(pathlib.Path(run_dir) / FRAME_WEIGHTS_FILE, weights, attrs)
