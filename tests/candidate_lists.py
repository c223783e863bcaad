"""Frames with random candidate lists that hold each frame's true rotation (test data for candidate mode), and
the simulated data sets the candidate-mode tests write."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from emcjax import data as data_io
from emcjax.sampling_600cell import sample_600cell
from emcjax.simulate import simulate


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


def write_simulated(path: pathlib.Path, frames, truth: dict, sim) -> pathlib.Path:
    """Writes ``frames`` and ``truth`` simulated with ``sim`` (a SimulationConfig: geometry, cell, space group)
    to ``path``; candidate lists refer to the ``sim.rotation_n`` 600-cell sampling. Returns ``path``."""
    data_io.write_dataset(
        path, frames, geometry=dataclasses.asdict(sim.geometry),
        crystal={"cell": np.asarray(sim.cell), "space_group": sim.space_group}, truth=truth,
        candidate_sampling_n=sim.rotation_n if frames.candidate_offsets is not None else None,
    )
    return path


def write_listed_simulation(path: pathlib.Path, sim, n_random: int, seed: int) -> dict:
    """Simulates ``sim``, gives every frame ``n_random`` random candidates of the ``sim.rotation_n`` sampling plus
    its true rotation (:func:`with_random_lists`), writes the data set to ``path`` and returns the truth."""
    frames, truth = simulate(sim)
    frames = with_random_lists(frames, truth["rotation_index"], sample_600cell(sim.rotation_n).n_rot, n_random, seed)
    write_simulated(path, frames, truth, sim)
    return truth
