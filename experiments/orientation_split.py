"""Does sigma(I) from half sets see the orientation-sampling error when the halves share no orientation?

    python experiments/orientation_split.py --run /tmp/merging/full --out /tmp/orientation-split

On data whose true orientations come from a coarse sampling (the simulator's default, 810 rotations), both
halves of a parity split sample each reflection's 3D profile in the same few ways, so the error this
sampling leaves in the voxel-sum intensity is common to them and sigma(I) from their scatter misses it
(docs/METHOD-NOTES.md). Here the frames are split by their orientation instead: the most likely rotation
of each frame in a finished run (``--run``, e.g. experiments/merging.py's ``full``), reduced modulo the
Laue group to an orientation class; the classes (not the frames) are split at random between half a and b.
Each half is reconstructed from its own random start (``lowres --frame-weights``: the run's rejection.h5
times the half's mask), ``resolution`` merges them, and the spread of (I - k I_true)/sigma(I) per shell is
printed next to that of a parity split of the same frames (``lowres --half a|b``). Writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax
from common_error import spreads  # noqa: E402


def orientation_classes(run) -> np.ndarray:
    """(n_frames,) int class of each frame's most likely rotation modulo the Laue group's rotations."""
    from emcjax.rotations import quaternion_to_matrix

    r = np.asarray(quaternion_to_matrix(run.quaternions(run.iteration["best_rotation"])), np.float64)
    mates = np.einsum("fij,gjk->fgik", r, np.asarray(run.crystal.rotation_ops_cartesian, np.float64))
    keys = np.round(mates.reshape(*mates.shape[:2], 9), 4) + 0.0  # +0.0: no -0.0
    canonical = [max(map(tuple, k)) for k in keys]  # the same for every symmetry mate of a rotation
    _, cls = np.unique(np.asarray(canonical), axis=0, return_inverse=True)
    return cls.ravel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=pathlib.Path, required=True, help="finished run on all frames, with rejection.h5")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-orientation-split"))
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from emcjax import lowres, resolution, runio, toml_config
    from emcjax.merge.rundata import load_run, read_frame_weights, write_frame_weights

    quiet = lambda *a, **k: None  # noqa: E731
    run = load_run(args.run)
    used = read_frame_weights(args.run / "rejection.h5", run.n_frames)[0]
    cls = orientation_classes(run)
    n_cls = int(cls.max()) + 1
    side = np.random.default_rng([args.seed, 7]).permutation(n_cls) % 2  # half of each class
    half = side[cls]
    counts = [int(((used > 0) & (half == h)).sum()) for h in (0, 1)]
    print(f"{n_cls} orientation classes; frames used: {int((used > 0).sum())}, half a {counts[0]}, half b {counts[1]}",
          flush=True)
    base = toml_config.config_from_toml(lowres.LowresConfig, args.run / runio.CONFIG_FILE)
    base = dataclasses.replace(base, iters=args.iters, resume=False, half=None, keep_checkpoints=1, iterations_every=0)
    summary = {"n_classes": n_cls}
    for split in ("orientation", "parity"):
        dirs = {}
        for h, name in enumerate("ab"):
            d = dirs[name] = args.out / split / name
            if (d / "intensities.h5").exists():
                continue
            if split == "orientation":
                weights = args.out / split / f"{name}.h5"
                weights.parent.mkdir(parents=True, exist_ok=True)
                write_frame_weights(weights, used * (half == h), {"source": "orientation classes", "half": name})
                config = dataclasses.replace(base, out=d, frame_weights=weights, seed=args.seed + 1 + h)
            else:
                config = dataclasses.replace(base, out=d, frame_weights=args.run / "rejection.h5", half=name)
            print(f"{split} half {name}: lowres -> {d}", flush=True)
            lowres.run(config, log=quiet)
        merged = args.out / split / "merged"
        resolution.merge_halves(resolution.ResolutionConfig(half_a=dirs["a"], half_b=dirs["b"], out=merged), log=quiet)
        summary[split] = spreads(merged, base.data)
        print(split, json.dumps(summary[split]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
