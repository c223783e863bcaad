"""Intensity M-step time on N (fake CPU) devices: the part of an iteration the devices split by entries.

    python experiments/bench_mstep_devices.py --data D.h5 --devices 8 [--rotation-n 4] [--repeat 5]

Sets the problem up with the full rotation grid (no symmetry reduction), runs one E-step, then times the
intensity M-step (``emc.update_intensity``, the configured rule; default the reference update) ``--repeat``
times after one warm-up call and prints the fastest and the median wall time and the median CPU time of
the process (all threads: the total work, less sensitive to a loaded machine than the wall time, on which
fake devices wait for each other at every collective). Run it for 1 and for N devices back to
back on the same machine: with fake devices they share the same cores, so equal times mean the work is
split, not replicated.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--rotation-n", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax

    from emcjax import emc
    from emcjax.data import SparseDataset

    config = emc.EMCConfig(rotation_n=args.rotation_n, reduce_by_symmetry=False)
    with SparseDataset(args.data) as dataset:
        problem = emc.setup_problem(dataset, config)
        state = emc.initial_state(problem, config, seed=0)
        state, _, _ = emc.iterate(problem, state, config)  # a model that has seen the data
        result = emc.estep(problem, state, config)
        jax.block_until_ready(emc.update_intensity(problem, state, result, config))
        times, cpu = [], []
        for _ in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(emc.update_intensity(problem, state, result, config))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    print(f"devices {problem.mesh.size}, frames {problem.n_frames}, intensity M-step: fastest {min(times):.3f} s, "
          f"median {statistics.median(times):.3f} s wall; CPU time (all threads) median {statistics.median(cpu):.3f} s; "
          f"{args.repeat} calls")


if __name__ == "__main__":
    main()
