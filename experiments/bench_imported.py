"""An imported full-search reference directory: time per EMC iteration with and without candidate lists.

    python experiments/bench_imported.py [--frames 2000] [--rotation-n 4] [--d-min 4] [--iters 3] [--workdir DIR]

1. Simulates FRAMES frames (the reference experiment scaled down, 600-cell n, d_min Å) on a detector whose
   limits are whole pixel units (so the reference's make-detector keeps the same pixels).
2. Writes them as a reference working directory with emcjax's own ``python -m emcjax.legacy export`` (the
   data set has no lists, so aux/prob-orien.bin lists every rotation for every frame: a full search).
3. Imports that directory with ``python -m emcjax.legacy import`` (issue 8: all-rotations path).
4. Sets up and runs ITERS iterations of each case, printing set-up seconds and seconds per iteration (the
   mean of the iterations after the first, which includes compilation):

   * before: the frames with every prob-orien.bin list stored (what the importer wrote before issue 8), with
     the settings it wrote (no reduction, max_kept = every rotation), and with max_kept = 32;
   * after: the imported data set with the settings the importer writes now (all rotations of n, exact
     point-group reduction, max_kept = 32), and without the reduction (= the same search without lists,
     ``experiments/bench.py --no-reduce``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import pathlib
import subprocess
import sys
import tempfile
import time


def simulate_reference_geometry(path: pathlib.Path, frames: int, rotation_n: int, d_min: float) -> None:
    """A simulated data set whose detector limits are whole pixel units (exportable)."""
    from emcjax import simulate
    from emcjax.detector import DetectorGeometry
    from emcjax.legacy.geometry import beamstop_for_px, beamstop_qmin_px, resolution_for_px

    base = DetectorGeometry(resolution_max_A=d_min)
    dist = base.distance_px
    lam_d = base.wavelength_A * dist
    geometry = dataclasses.replace(
        base, resolution_max_A=resolution_for_px(lam_d, int(math.ceil(lam_d / d_min))),
        beamstop_radius_px=beamstop_for_px(dist, beamstop_qmin_px(dist, base.beamstop_radius_px)))
    simulate.write(simulate.SimulationConfig(out=path, n_frames=frames, geometry=geometry, rotation_n=rotation_n))


def start_run(run: pathlib.Path, data: pathlib.Path, rotation_n: int) -> None:
    """A run directory holding a random model and phi = 1 for ``export`` (the model is not benchmarked)."""
    import numpy as np

    from emcjax import atomic_files, legacy, runio, toml_config
    from emcjax.crystal import Crystal
    from emcjax.data import SparseDataset

    with SparseDataset(data) as ds:
        crystal = Crystal(cell=tuple(ds.crystal["cell"]), space_group=str(ds.crystal["space_group"]))
        grid = legacy.emc_grid(ds.geometry, ds.mask, crystal, None, 10, 2.0)
        n_frames = ds.n_frames
    model = np.random.default_rng(0).uniform(size=grid.model_shape).astype(np.float32)
    runio.write_intensities(run, model, grid.asu.hkl, model.sum(axis=1), np.ones(n_frames, np.float32))
    atomic_files.write_text_atomic(run / runio.CONFIG_FILE, toml_config.to_toml(
        {"data": str(data.resolve()), "emc": {"vn": 10, "gw": 2.0, "rotation_n": rotation_n}}))


def with_every_list(imported: pathlib.Path, out: pathlib.Path, n_rot: int, sampling_n: int) -> None:
    """The imported frames with every rotation listed for every frame (the importer's output before)."""
    import numpy as np

    from emcjax import data as data_io

    with data_io.SparseDataset(imported) as ds:
        frames, geometry, crystal, mask = ds.read_all(), ds.geometry, ds.crystal, ds.mask
    n = frames.n_frames
    frames = dataclasses.replace(frames, candidate_offsets=np.arange(n + 1) * n_rot,
                                 candidate_rotations=np.tile(np.arange(n_rot), n))
    data_io.write_dataset(out, frames, geometry=geometry, crystal=crystal, mask=mask, candidate_sampling_n=sampling_n)


def time_case(label: str, data: pathlib.Path, fields: dict, iters: int) -> None:
    import jax

    import emcjax
    from emcjax.data import SparseDataset

    config = emcjax.EMCConfig(**fields)
    with SparseDataset(data) as ds:
        start = time.perf_counter()
        problem = emcjax.setup_problem(ds, config)
        setup = time.perf_counter() - start
        state = emcjax.initial_state(problem, config, seed=0)
        seconds = []
        for _ in range(iters):
            start = time.perf_counter()
            state, metrics, _ = emcjax.iterate(problem, state, config)
            jax.block_until_ready(state.intensity)
            seconds.append(time.perf_counter() - start)
    later = seconds[1:] or seconds
    print(f"{label}: set-up {setup:.1f} s, first iteration {seconds[0]:.2f} s, then {sum(later) / len(later):.2f} s "
          f"per iteration ({', '.join(f'{s:.2f}' for s in later)}); kept/frame {metrics.get('kept_mean', float('nan')):.2f}",
          flush=True)
    del problem, state
    gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rotation-n", type=int, default=4)
    parser.add_argument("--d-min", type=float, default=4.0)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--workdir", type=pathlib.Path)
    args = parser.parse_args()
    from emcjax import toml_config
    from emcjax.data import rotation_count

    tmp = tempfile.TemporaryDirectory()
    work = args.workdir or pathlib.Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    sim, refdir, imported = work / "sim.h5", work / "refdir", work / "imported.h5"
    start = time.perf_counter()
    simulate_reference_geometry(sim, args.frames, args.rotation_n, args.d_min)
    start_run(work / "start", sim, args.rotation_n)
    print(f"simulated {args.frames} frames in {time.perf_counter() - start:.1f} s", flush=True)
    for cmd in (["export", "--run", str(work / "start"), "--to", str(refdir)],
                ["import", str(refdir), "--out", str(imported), "--space-group", "P 43 21 2"]):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "emcjax.legacy", *cmd], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        print(f"python -m emcjax.legacy {cmd[0]} ({time.perf_counter() - start:.1f} s): {done.stdout.strip()}", flush=True)
    n_rot = rotation_count(args.rotation_n)
    lists = work / "lists.h5"
    with_every_list(imported, lists, n_rot, args.rotation_n)
    after = toml_config.parse_toml(imported.with_suffix(".toml"))["emc"]
    before = dict(after, reduce_by_symmetry=False, max_kept=n_rot)
    time_case(f"before: {n_rot} rotations listed per frame, max_kept {n_rot} (old import settings)", lists, before,
              args.iters)
    time_case(f"before: {n_rot} rotations listed per frame, max_kept 32", lists, dict(before, max_kept=32), args.iters)
    time_case("after: no lists, all rotations, exact reduction (import settings)", imported, after, args.iters)
    time_case("after: no lists, all rotations, no reduction (= bench.py --no-reduce)", imported,
              dict(after, reduce_by_symmetry=False), args.iters)


if __name__ == "__main__":
    main()
