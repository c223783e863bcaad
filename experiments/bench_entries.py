"""In-peak entries: build_entries (every pixel x every rotation) against build_entries_by_reflection.

    python experiments/bench_entries.py [--rotations 2000] [--chunk 64] [--large-rotations 2000] [--skip-large]

Two geometries at 4 Å with the simulator's default crystal (P 43 21 2, 79.1 x 79.1 x 37.9 Å, vn 10, gw 2):
the simulator's default detector (256 x 256 pixels of 0.9 mm at 0.45 m) and a larger one (1024 x 1024 pixels
of 0.225 mm, the same area). Each builder is run once to compile (build_entries on a prefix of the rotations)
and then timed; the outputs are checked to be identical. Prints seconds and rotations per second of both, and
the speed-up.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from emcjax import model
from emcjax.model import projection as model_projection
from emcjax.crystal import Crystal
from emcjax.detector import DetectorGeometry, make_detector


def random_quaternions(n: int, seed: int) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(fn, repeats: int = 1, warm=None):
    jax.block_until_ready((warm or fn)())  # compile
    best, out = np.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(label: str, geometry: DetectorGeometry, n_rot: int, chunk: int) -> None:
    det = make_detector(geometry)
    crystal = Crystal(cell=(79.1, 79.1, 37.9, 90.0, 90.0, 90.0), space_group="P 43 21 2")
    grid = model.make_grid(crystal, d_min=geometry.resolution_max_A, d_max=1.0 / float(det.q_norm.min()))
    quats = random_quaternions(n_rot, seed=0)
    _, _, half_width = model_projection.projection_bounds(grid, det)
    print(
        f"{label}: {geometry.num_rows}x{geometry.num_cols} pixels ({det.n_pix} valid), {grid.n_refl} reflections, "
        f"radius {grid.radius:.4g} 1/Å, box {int(2 * half_width) + 1}^2 pixels, {n_rot} rotations, "
        f"device {jax.devices()[0].platform}"
    )
    t_new, new = timed(lambda: model.build_entries_by_reflection(grid, det, quats, chunk=chunk), repeats=2)
    # Compile build_entries on enough rotations to reach the padded stencil shape of the full run (1 << 18).
    per_rot = max(new.n_entries / n_rot, 1.0)
    n_warm = min(n_rot, chunk * int(np.ceil((1 << 18) * 1.1 / per_rot / chunk)))
    t_ref, ref = timed(
        lambda: model.build_entries(grid, det.q, quats, chunk=chunk),
        warm=lambda: model.build_entries(grid, det.q, quats[:n_warm], chunk=chunk),
    )
    same = ref.n_entries == new.n_entries and all(
        np.array_equal(np.asarray(getattr(ref, f)), np.asarray(getattr(new, f)))
        for f in ("rotation", "pixel", "voxels", "weights")
    )
    print(f"  entries: {ref.n_entries} ({ref.n_entries / n_rot:.0f} per rotation), identical: {same}")
    print(f"  build_entries:               {t_ref:8.3f} s  {n_rot / t_ref:9.1f} rotations/s")
    print(f"  build_entries_by_reflection: {t_new:8.3f} s  {n_rot / t_new:9.1f} rotations/s")
    print(f"  speed-up: {t_ref / t_new:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=2000)
    parser.add_argument("--large-rotations", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    bench("default detector", DetectorGeometry(), args.rotations, args.chunk)
    if not args.skip_large:
        large = DetectorGeometry(num_rows=1024, num_cols=1024, pixel_size_m=0.225e-3, beam_center_px=(511.5, 511.5))
        bench("large detector", large, args.large_rotations, args.chunk)


if __name__ == "__main__":
    main()
