"""Set-up time of the exact grid reduction of emcjax.problem: k-d tree vs hashing, and their equality.

    python experiments/bench_grid_orbits.py [--n 4 10 20] [--space-group "P 43 21 2"]

For each 600-cell parameter n, times emcjax.rotation_symmetry.grid_symmetry_orbits (k-d tree, used by
emcjax.problem before) and emcjax.frontend.grid_orbits (hashing, used now) in the same process, prints the
process CPU and wall seconds of each and whether representatives and orbits are identical.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax

from emcjax.crystal import Crystal
from emcjax.frontend.grid_orbits import grid_orbits
from emcjax.rotation_symmetry import grid_symmetry_orbits
from emcjax.sampling_600cell import sample_600cell


def timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 10, 20])
    parser.add_argument("--space-group", default="P 43 21 2")
    parser.add_argument("--cell", type=float, nargs=6, default=[79.1, 79.1, 37.9, 90.0, 90.0, 90.0])
    args = parser.parse_args()
    crystal = Crystal(cell=tuple(args.cell), space_group=args.space_group)
    for n in args.n:
        sampling = sample_600cell(n)
        (rep_tree, orbit_tree), cpu_tree, wall_tree = timed(
            lambda: grid_symmetry_orbits(sampling, crystal.rotation_ops_cartesian))
        hashed, cpu_hash, wall_hash = timed(lambda: grid_orbits(sampling, crystal.rotation_ops_cartesian))
        same = np.array_equal(rep_tree, hashed.representative) and np.array_equal(orbit_tree, hashed.orbit())
        print(f"n = {n}, {sampling.n_rot} rotations, {rep_tree.size} orbits: k-d tree {cpu_tree:.2f} s CPU "
              f"({wall_tree:.1f} s wall), hashing {cpu_hash:.2f} s CPU ({wall_hash:.1f} s wall), identical: {same}, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
