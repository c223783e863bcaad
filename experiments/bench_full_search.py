"""Dense search at the paper's geometry: E-step throughput of every frame against the n = 70 grid by
photon-peak tests (emcjax.core.full_search), projected to the point-group-reduced grid and 80,000 frames.

    python experiments/bench_full_search.py --data paper1000.h5 [--frames 1000] [--chunks 64 256 1024]
        [--seconds 8] [--pool 8192] [--row-records 64]

The frames (the first ``--frames`` of a data set written by experiments/bench_paper_scale.py --data) are
searched against chunks of ``--pool`` rotations of the n = 70 sampling drawn at random by index
(emcjax.sampling_index: no 17 M table; the cost of a rotation does not depend on which it is, so the
throughput holds for the fundamental zone of the point group, 1/|G| of the sampling). One jitted step per
chunk: the chunk's expected signal S(r, shell) from the tabulated cut integrals (emcjax.core.cut_signal), the
(frame, rotation) log-likelihoods, and a running log-evidence and best rotation per frame (what a pruned
E-step keeps). For each chunk size it prints the first call (compilation) and the steady rate over at least
``--seconds``, timed over whole passes over the pool; then the signal alone, and the projection.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from emcjax import data as data_io
from emcjax import direct, emc
from emcjax import model as model_lib
from emcjax.core import cut_signal, full_search
from emcjax.rotations import crystal_from_lab
from emcjax.sampling_600cell import n_rotations_600cell
from emcjax.sampling_index import SampledRotations

PAPER_FRAMES = 79_992  # the reference program's published run


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_shells", "max_hits"))
def search_step(carry, offset, quats, intensity, table, phi_local, likelihood, geometry, records, row_frame,
                frames, masked, proj, cut, shape, h_max, n_shells, max_hits):
    """One rotation chunk: S of its rotations (tabulated), L_dr of every frame, and the running (log-evidence,
    best L, best rotation) per frame (uniform prior over the chunk's rotations), and whether every two-pass
    step was complete."""
    signal, _ = cut_signal.tabulated_signal(table, quats, proj, cut, shape, h_max, n_shells)
    logl, complete = full_search.shared_log_likelihood(intensity, phi_local, likelihood, geometry, records, frames,
                                                       masked, crystal_from_lab(quats), signal, row_frame, max_hits)
    log_sum, best, best_index, all_complete = carry
    top = jnp.max(logl, axis=1)
    index = jnp.argmax(logl, axis=1).astype(jnp.int32) + offset
    return (jnp.logaddexp(log_sum, jax.nn.logsumexp(logl, axis=1)), jnp.maximum(best, top),
            jnp.where(top > best, index, best_index), all_complete & complete)


@jax.jit
def peak_test_step(total, quats, q_lab, tables, records):
    """Diagnostic: only the arithmetic in-peak test of every (record, rotation) pair (no table read, no model
    value, no signal): the floor of a one-pass kernel. Accumulates the photons inside a peak."""
    q_crystal = full_search.chunk_points(q_lab[records.pixel], crystal_from_lab(quats))
    near = full_search.peak_test(q_crystal, tables)[2] & (records.count[:, None, :] > 0)
    return total + jnp.sum(near, axis=(1, 2), dtype=jnp.int32)


def _steady(call, n_pieces: int, seconds: float) -> tuple[int, float]:
    """Calls ``call(i)`` for i over the pieces, whole passes, until ``seconds`` have passed: (calls, seconds)."""
    n_calls, t0 = 0, time.perf_counter()
    while True:
        for i in range(n_pieces):
            out = call(i)
        n_calls += n_pieces
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return n_calls, elapsed


@functools.partial(jax.jit, static_argnames=("shape", "h_max", "n_shells"))
def signal_step(quats, table, proj, cut, shape, h_max, n_shells):
    return cut_signal.tabulated_signal(table, quats, proj, cut, shape, h_max, n_shells)[0].sum()


def _lap(label: str, start: float) -> float:
    now = time.perf_counter()
    print(f"  {label}: {now - start:.1f} s", flush=True)
    return now


def _kernel_counts(compiled_text: str) -> str:
    """How XLA compiled the step: fusions, dots and library calls (a dot or a custom call inside the photon
    loop would mean per-pair arrays in memory)."""
    return (f"{compiled_text.count(' fusion(')} fusions, {compiled_text.count(' dot(')} dots, "
            f"{compiled_text.count('custom-call(')} custom calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="data set of experiments/bench_paper_scale.py --data")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024], help="rotations per step")
    parser.add_argument("--seconds", type=float, default=8.0, help="steady timing per chunk size (at least)")
    parser.add_argument("--pool", type=int, default=8192, help="distinct rotations drawn from the grid")
    parser.add_argument("--grid-n", type=int, default=70)
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                        help="one fused pass, or two (arithmetic test, then table reads of the pairs that pass)")
    parser.add_argument("--hit-fraction", type=float, default=0.04,
                        help="two passes: room for this fraction of the (record, rotation) tests to pass")
    parser.add_argument("--row-records", type=int, default=64,
                        help="records per row (full_search.record_rows); then the best chunk once with every "
                             "frame padded to the longest (0: only that)")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device {device.platform}: {device.device_kind} (of {jax.device_count()}); "
          f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs", flush=True)

    clock = start = time.perf_counter()
    config = emc.EMCConfig(block_frames=args.frames, max_kept=32)
    sampling = SampledRotations(args.grid_n)
    clock = _lap(f"SampledRotations({args.grid_n}) ({sampling.n_rot} rotations, by index)", clock)
    with data_io.SparseDataset(args.data) as dataset:
        subset = dataset.read_block(0, min(args.frames, dataset.n_frames))
        problem = direct.setup_direct(dataset, config, subset, sampling=sampling, signal="exact")
    clock = _lap(f"set-up of {subset.n_frames} frames (records, geometry)", clock)
    state = emc.initial_state(problem, config, seed=0)
    clock = _lap("initial model", clock)
    plan, block = problem.direct_plan, problem.direct_blocks[0]
    cut = cut_signal.cut_geometry(problem.grid, problem.detector)
    table = jax.block_until_ready(cut_signal.cut_table(state.intensity, cut, problem.grid.tables))
    clock = _lap("cut geometry and cut table (first call)", clock)
    table = jax.block_until_ready(cut_signal.cut_table(state.intensity, cut, problem.grid.tables))
    clock = _lap("cut table again (fixed cost per E-step)", clock)
    n_proper = len(problem.grid.crystal.laue_ops) // 2
    rng = np.random.default_rng(0)
    index = rng.choice(sampling.n_rot, args.pool, replace=False)
    quats = jnp.asarray(sampling.quaternions[index], jnp.float32)
    clock = _lap(f"{args.pool} rotations by index", clock)
    proj, shape, _ = plan.projection
    h_max = model_lib.bucket_count(int(np.max(np.asarray(model_lib.near_sphere_counts(quats, proj)))))
    records, local = block.with_device_records().records, block.arrays.local
    n_local = local.candidates.shape[0]
    phi_local = jnp.pad(state.phi, (0, problem.n_padded - problem.n_frames))[:n_local]
    frames = jnp.arange(n_local, dtype=jnp.int32)
    used = block.records["valid"].sum(axis=1)
    print(f"{problem.n_frames} frames ({n_local} in the block), records (photons and dead pixels) per frame: mean "
          f"{used.mean():.0f}, max {used.max()}, padded to {records.pixel.shape[1]}; {problem.detector.n_pix} valid pixels, {problem.grid.n_refl} reflections, "
          f"h_max {h_max}, {problem.n_shells} shells", flush=True)

    fixed = (state.intensity, table, phi_local, state.likelihood, plan.geometry)
    rest = (frames, local.masked_shells, proj, cut)
    static = dict(shape=shape, h_max=h_max, n_shells=problem.n_shells)
    layouts = {0: (records, None)}
    if args.row_records:
        layouts[args.row_records] = full_search.record_rows(block.records, args.row_records)
    for row_length, (recs, _) in layouts.items():
        print(f"layout {'per frame' if row_length == 0 else f'rows of {row_length}'}: {recs.pixel.shape[0]} rows x "
              f"{recs.pixel.shape[1]} records = {recs.pixel.size / max(used.sum(), 1):.2f} x the used records", flush=True)
    results = {}
    reduced = n_rotations_600cell(args.grid_n) / n_proper

    def _projection(rate: float) -> str:
        per_1000 = 1000 * reduced / rate
        return (f"reduced n = {args.grid_n} grid ({reduced:,.0f} rotations): {per_1000:.1f} s per 1000 frames, "
                f"{per_1000 * PAPER_FRAMES / 1000 / 60:.1f} min for {PAPER_FRAMES} frames")

    def run(chunk: int, row_length: int, passes: int):
        if args.pool % chunk:
            print(f"chunk {chunk}: skipped (the pool of {args.pool} is not a multiple)", flush=True)
            return
        recs, row_frame = layouts[row_length]
        pieces = quats.reshape(-1, chunk, 4)
        carry = (jnp.full(n_local, -jnp.inf), jnp.full(n_local, -jnp.inf), jnp.zeros(n_local, jnp.int32), jnp.bool_(True))
        max_hits = 0 if passes == 1 else int(np.ceil(args.hit_fraction * recs.pixel.size * chunk / 1024)) * 1024
        label = f"chunk {chunk} rotations, {'per frame' if row_length == 0 else f'rows of {row_length}'}, " + (
            "one pass" if passes == 1 else f"two passes (room for {max_hits} hits)")
        try:
            t0 = time.perf_counter()
            compiled = search_step.lower(carry, jnp.int32(0), pieces[0], *fixed, recs, row_frame, *rest, **static,
                                         max_hits=max_hits).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            carry = jax.block_until_ready(compiled(carry, jnp.int32(0), pieces[0], *fixed, recs, row_frame, *rest))
            first_s = time.perf_counter() - t0
            state_box = [carry]

            def call(i):
                state_box[0] = compiled(state_box[0], jnp.int32(i * chunk), pieces[i], *fixed, recs, row_frame, *rest)
                return state_box[0]

            n_calls, elapsed = _steady(call, pieces.shape[0], args.seconds)
        except Exception as err:  # noqa: BLE001 - a chunk size that does not fit is reported, the others run
            print(f"{label}: failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
            return
        rate = n_local * chunk * n_calls / elapsed
        complete = bool(state_box[0][3])
        if complete:
            results[chunk, row_length, passes] = rate
        print(f"{label}: {'' if complete else 'INCOMPLETE (more hits than room; rate not counted) '}compile "
              f"{compile_s:.1f} s ({_kernel_counts(compiled.as_text())}), first call {first_s:.3f} s; steady "
              f"{n_calls} calls in {elapsed:.2f} s: {rate:.3e} (frame, rotation) pairs/s, "
              f"{elapsed / n_calls * 1e3:.2f} ms per call; {_projection(rate)}", flush=True)

    for chunk in args.chunks:
        for passes in args.passes:
            run(chunk, args.row_records, passes)
    if args.row_records and results:
        chunk, _, passes = max(results, key=results.get)
        run(chunk, 0, passes)
    if not results:
        raise SystemExit("no chunk size ran")
    (best, best_rows, best_passes) = max(results, key=results.get)
    rate = results[best, best_rows, best_passes]
    pieces = quats.reshape(-1, best, 4)
    recs = layouts[best_rows][0]
    total = jnp.zeros(recs.pixel.shape[0], jnp.int32)
    t0 = time.perf_counter()
    total = peak_test_step(total, pieces[0], plan.geometry.q_lab, plan.geometry.tables, recs).block_until_ready()
    first_s = time.perf_counter() - t0
    box = [total]

    def test_call(i):
        box[0] = peak_test_step(box[0], pieces[i], plan.geometry.q_lab, plan.geometry.tables, recs)
        return box[0]

    n_calls, elapsed = _steady(test_call, pieces.shape[0], args.seconds)
    hits = int(np.asarray(box[0], np.int64).sum()) / (n_calls + 1) / best / max(int(used.sum()), 1)
    print(f"peak test alone (arithmetic, no table reads, no model value, no signal), chunk {best}: first call "
          f"{first_s:.1f} s, {n_local * best * n_calls / elapsed:.3e} pairs/s; a photon lies inside a peak at "
          f"{hits:.2%} of the rotations (~ records incl. dead pixels)", flush=True)
    signal_step(pieces[0], table, proj, cut, **static).block_until_ready()
    n_calls, elapsed = _steady(lambda i: signal_step(pieces[i], table, proj, cut, **static),
                               pieces.shape[0], min(args.seconds, 2.0))
    signal_s = elapsed / (n_calls * best)
    print(f"signal alone: {signal_s * 1e6:.1f} µs per rotation ({signal_s * rate / n_local * 100:.1f}% of a step "
          f"at chunk {best})", flush=True)
    print(f"best: chunk {best}, rows {best_rows or 'per frame'}, {best_passes} pass(es), {rate:.3e} (frame, "
          f"rotation) pairs/s on {device.device_kind}; one E-step over the {args.grid_n} grid reduced by the "
          f"{n_proper} rotations of the point group: {_projection(rate)} (+ the cut table per E-step); target 1e9 "
          f"pairs/s: {'met' if rate >= 1e9 else 'not met'}", flush=True)
    print(f"total {time.perf_counter() - start:.1f} s wall, process CPU {time.process_time():.1f} s, peak resident "
          f"memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
