"""Benchmark of one EMC iteration: where the time goes, throughput, compile time and peak memory.

    python experiments/bench.py --frames 2000 --rotation-n 4 [--no-reduce] [--block-frames 0] [--stream]
        [--devices 1] [--bragg 150] [--background 30] [--d-min 4] [--iters 3] [--data FILE.h5]

Simulates a data set like the reference experiment scaled down (or reads --data), sets the problem up,
runs --iters iterations and prints: set-up seconds, the first iteration (incl. compilation), then per
iteration the E-step (both E-steps), intensity M-step and phi M-step seconds, (frame, rotation) pairs per
second of the E-step; then the time of whole iterations through ``emc.iterate`` (one fused jitted step when
every block is in memory and shares the rotation set), and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rotation-n", type=int, default=4)
    parser.add_argument("--no-reduce", action="store_true", help="evaluate the full grid (no symmetry reduction)")
    parser.add_argument("--block-frames", type=int, default=0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--devices", type=int, default=0, help="fake CPU devices (0: what JAX finds)")
    parser.add_argument("--bragg", type=float, default=150.0)
    parser.add_argument("--background", type=float, default=30.0)
    parser.add_argument("--d-min", type=float, default=4.0)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--update", choices=["reference", "mlem"], default="reference")
    parser.add_argument("--data", type=pathlib.Path)
    args = parser.parse_args()
    if args.devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax

    from emcjax import emc, simulate, streaming
    from emcjax.data import SparseDataset
    from emcjax.detector import DetectorGeometry

    tmp = tempfile.TemporaryDirectory()
    path = args.data
    if path is None:
        path = pathlib.Path(tmp.name) / "bench.h5"
        geometry = DetectorGeometry(resolution_max_A=args.d_min)
        start = time.perf_counter()
        simulate.write(
            simulate.SimulationConfig(
                out=path, n_frames=args.frames, geometry=geometry, rotation_n=args.rotation_n,
                bragg_photons=args.bragg, background_photons=args.background,
            )
        )
        print(f"simulated {args.frames} frames in {time.perf_counter() - start:.1f} s ({path.stat().st_size / 1e6:.1f} MB)")
    config = emc.EMCConfig(
        rotation_n=args.rotation_n, reduce_by_symmetry=not args.no_reduce, intensity_update=args.update,
        block_frames=args.block_frames, stream=args.stream,
    )
    with SparseDataset(path) as dataset:
        start, cpu = time.perf_counter(), time.process_time()
        problem = emc.setup_problem(dataset, config)
        setup = time.perf_counter() - start
        setup_cpu = time.process_time() - cpu
        n_rot = problem.rotations.shape[0]
        n_join = problem.lengths[0] * len(problem.blocks) * problem.mesh.size
        print(
            f"devices {problem.mesh.size} ({jax.devices()[0].platform}), frames {problem.n_frames}, rotations {n_rot}, "
            f"pixels {problem.detector.n_pix}, reflections {problem.grid.n_refl} ({problem.grid.n_asu} unique), "
            f"in-peak entries {problem.shared.entries.n_entries}, join pairs {n_join} (padded), "
            f"blocks {len(problem.blocks)}{' streamed' if args.stream else ''}"
        )
        print(f"set-up {setup:.2f} s (CPU {setup_cpu:.1f} s, load {os.getloadavg()[0]:.1f})")
        state = emc.initial_state(problem, config, seed=0)
        streamed = streaming.applies(problem, problem.spec(config), state.likelihood)
        for it in range(0 if streamed else args.iters):
            times = {}
            t0 = time.perf_counter()
            result = emc.estep(problem, state, config)
            jax.block_until_ready(result.kept)
            t1 = time.perf_counter()
            intensity = jax.block_until_ready(emc.update_intensity(problem, state, result, config))
            t2 = time.perf_counter()
            mid = state._replace(intensity=intensity)
            result = emc.estep(problem, mid, config)
            jax.block_until_ready(result.kept)
            t3 = time.perf_counter()
            intensity, phi = jax.block_until_ready(emc.update_phi(problem, mid, result, config))
            t4 = time.perf_counter()
            state = state._replace(iteration=state.iteration + 1, intensity=intensity, phi=phi)
            times = {"estep": (t1 - t0 + t3 - t2) / 2, "intensity": t2 - t1, "phi": t4 - t3, "total": t4 - t0}
            pairs = problem.n_frames * n_rot / times["estep"]
            cc = problem.cc_true(state.intensity)
            label = "first (incl. compilation)" if it == 0 else f"iteration {it + 1}"
            print(
                f"{label}: total {times['total']:.2f} s = 2 x E-step {times['estep']:.3f} s + intensity "
                f"{times['intensity']:.3f} s + phi {times['phi']:.3f} s; {pairs:.3g} pairs/s; cc_true {cc:.4f}"
            )
        for it in range(args.iters):  # the same iteration as one call: fused on the device where it applies
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics, _ = emc.iterate(problem, state, config)
            jax.block_until_ready(state.intensity)
            label = "first (incl. compilation)" if it == 0 else f"iteration {it + 1}"
            path_name = "fused step" if problem.batch is not None else "block by block"
            path_name = "streamed at O(block)" if streamed else path_name
            print(f"emc.iterate ({path_name}), {label}: {time.perf_counter() - t0:.2f} s (CPU "
                  f"{time.process_time() - c0:.1f} s, load {os.getloadavg()[0]:.1f}); cc_true {metrics['cc_true']:.4f}")
            if streamed:
                phases = ", ".join(f"{k} {v:.2f} s" for k, v in streaming.phase_seconds(problem).items())
                print(f"  phases: {phases}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak:.0f} MB; process CPU {time.process_time():.1f} s")


if __name__ == "__main__":
    main()
