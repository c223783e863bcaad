"""Peak memory of ``python -m emcjax.reduce`` at two frame counts (it must not grow with the frame count).

    python experiments/reduce_memory.py [--frames 10000 100000] [--size 48]

Writes an HDF5 stack (bitshuffle + LZ4) of tiny --size x --size images, frame by frame (Poisson background
plus a few bright pixels), reduces each stack in a fresh process and prints that process's peak resident
memory (its own ru_maxrss) and the reduction rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax

from emcjax.detector import DetectorGeometry
from emcjax.frontend import images as images_lib


# the reduction runner, reporting its own peak resident set size (KiB) at the end
_CHILD = ("import resource, sys; from emcjax.frontend.reduce import main; main(sys.argv[1:]); "
          "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def geometry(size: int) -> DetectorGeometry:
    return DetectorGeometry(num_rows=size, num_cols=size, pixel_size_m=4.8e-3, distance_m=0.45,
                            beam_center_px=(size / 2 - 0.3, size / 2 + 0.4), beamstop_radius_px=2.0,
                            resolution_max_A=4.5, n_shells=10)


def frames(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        image = rng.poisson(0.5, size=(size, size))
        image.ravel()[rng.choice(size * size, 5, replace=False)] += 30
        yield image.astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--size", type=int, default=48)
    args = parser.parse_args()
    g = geometry(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            stack = pathlib.Path(tmp) / f"stack_{n}.h5"
            images_lib.write_h5_stack(stack, frames(n, args.size), n, (args.size, args.size), g)
            argv = [sys.executable, "-c", _CHILD, "--images", str(stack), "--out",
                    str(pathlib.Path(tmp) / f"reduced_{n}.h5"), "--block-frames", "1024"]
            for name, value in dataclasses.asdict(g).items():
                argv += [f"--geometry.{name.replace('_', '-')}", *map(str, np.atleast_1d(value))]
            start = time.perf_counter()
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            peak = int(done.stdout.split("MAXRSS")[-1])
            print(f"{n} frames of {args.size}x{args.size}: peak RSS {peak / 1024:.0f} MiB, "
                  f"{seconds:.0f} s ({n / seconds:.0f} frames/s incl. start-up)")


if __name__ == "__main__":
    main()
