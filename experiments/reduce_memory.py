"""Peak memory of ``python -m emcjax.reduce`` at two frame counts (it must not grow with the frame count).

    python experiments/reduce_memory.py [--frames 10000 100000] [--size 48] [--trace-every 8192]

Writes an HDF5 stack (bitshuffle + LZ4) of tiny --size x --size images, frame by frame (Poisson background
plus a few bright pixels), reduces each stack in a fresh process and prints that process's peak resident
memory (its own ru_maxrss), its resident memory after every --trace-every frames (RSS vs frames: flat
when memory is bounded by a block of frames) and the reduction rate with the process CPU time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
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
_CHILD = """
import os, resource, sys, time
from emcjax.frontend import reduce, writer
every, append = int(os.environ["TRACE_EVERY"]), writer.SparseWriter.append

def traced(self, *args, **kwargs):  # the resident set after each committed block (statm: pages)
    before = self.frames_done
    append(self, *args, **kwargs)
    if self.frames_done // every > before // every:
        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        print("RSS", self.frames_done, rss // 1024, flush=True)

writer.SparseWriter.append = traced
reduce.main(sys.argv[1:])
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print("CPU", time.process_time())
"""


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
    parser.add_argument("--trace-every", type=int, default=8192,
                        help="frames between RSS samples (taken after blocks of 1024 frames)")
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
            child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "TRACE_EVERY": str(args.trace_every)})
            values = {}
            for line in child.stdout:  # streamed, so that a long run shows its trace as it goes
                words = line.split()
                if words and words[0] == "RSS":
                    print(f"  {int(words[1])} frames: RSS {int(words[2]) / 1024:.1f} MiB "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
                elif words and words[0] in ("MAXRSS", "CPU"):
                    values[words[0]] = float(words[1])
            if child.wait() != 0:
                sys.exit(f"the reduction of {n} frames failed (exit {child.returncode})")
            seconds = time.perf_counter() - start
            print(f"{n} frames of {args.size}x{args.size}: peak RSS {values['MAXRSS'] / 1024:.1f} MiB, "
                  f"{seconds:.0f} s wall ({n / seconds:.0f} frames/s incl. start-up), {values['CPU']:.0f} s CPU, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)

if __name__ == "__main__":
    main()
