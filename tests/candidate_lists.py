"""Frames with random candidate lists that hold each frame's true rotation (test data for candidate mode)."""

from __future__ import annotations

import dataclasses

import numpy as np


def with_random_lists(frames, true_rotation, n_rot: int, n_random: int, seed: int):
    """``frames`` with, per frame, ``n_random`` distinct random rotations of the ``n_rot``-rotation sampling
    plus its true one (``true_rotation``: index per frame) as candidates, sorted and unique."""
    rng = np.random.default_rng(seed)
    lists = [np.unique(np.append(rng.choice(n_rot, n_random, replace=False), t)) for t in true_rotation]
    return dataclasses.replace(
        frames,
        candidate_offsets=np.concatenate([[0], np.cumsum([len(c) for c in lists])]).astype(np.int64),
        candidate_rotations=np.concatenate(lists).astype(np.int64),
    )
