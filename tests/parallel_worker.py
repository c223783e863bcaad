"""Runs a few EMC iterations in a fresh process (for the multi-device and multi-process tests).

    python tests/parallel_worker.py DATA OUT --iters N [--devices D] [--block-frames B] [--stream] [--route-slack S]
        [--coordinator HOST:PORT --num-processes P --process-id I]

Sets XLA_FLAGS before JAX is imported, runs, and (process 0) saves intensity, phi and best_rotation to OUT.
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--block-frames", type=int, default=0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--rotation-n", type=int, default=2)
    parser.add_argument("--route-slack", type=float, help="emcjax.core.mstep.ROUTE_SLACK (0: always gather)")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import numpy as np

    from emcjax import emc, parallel
    from emcjax.core import mstep
    from emcjax.data import SparseDataset

    if args.route_slack is not None:
        mstep.ROUTE_SLACK = args.route_slack

    parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = emc.EMCConfig(rotation_n=args.rotation_n, block_frames=args.block_frames, stream=args.stream)
    with SparseDataset(args.data) as dataset:
        problem = emc.setup_problem(dataset, config)
        state = emc.initial_state(problem, config, seed=0)
        for _ in range(args.iters):
            state, metrics, per_frame = emc.iterate(problem, state, config)
    if args.process_id in (None, 0):
        np.savez(
            args.out,
            intensity=np.asarray(state.intensity),
            phi=np.asarray(state.phi),
            best_rotation=per_frame["best_rotation"],
            log_likelihood=metrics["log_likelihood"],
            n_devices=problem.mesh.size,
            n_blocks=len(problem.blocks),
        )


if __name__ == "__main__":
    main()
