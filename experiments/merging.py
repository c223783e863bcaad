"""Frame rejection, half sets, merging statistics, sigma(I) and the MTZ on simulated data with known truth.

    python experiments/merging.py --out /tmp/merging8 --n-frames 2000 --iters 8
    python experiments/merging.py --out /tmp/merging --n-frames 2000 --iters 30 --rotation-n 4 --candidates 0

By default the true orientations are continuous-like, as a real crystal's are: drawn from the n = 8
sampling (25,680 rotations, 6420 modulo the grid's symmetry, so few frames of a half share one), with the 20 nearest rotations of each
frame as its candidates (what spot-based preselection gives). With ``--rotation-n 4 --candidates 0`` (the
simulator's default: 3240 rotations, 810 modulo the grid's symmetry, and a full search) every frame of
both halves samples each reflection's 3D profile in the same few ways, an error common to both halves that
sigma(I) from their scatter cannot see (docs/METHOD-NOTES.md; experiments/common_error.py and
experiments/orientation_split.py measure it).

Runs the documented commands one after the other (each printed):

1. ``emcjax.simulate`` with 5 % blank and 5 % two-crystal frames (and a steeper Wilson fall-off, so that
   the signal falls with resolution);
2. ``emcjax.lowres`` on all frames, ``emcjax.reject`` on that run, ``emcjax.lowres --frame-weights`` again:
   rejection per true frame kind, cc_true before and after;
3. ``emcjax.halves --run --frame-weights`` (lowres --half a and b, then resolution): the merging table with CC* against
   the true correlation and the spread of (I - k I_true) / sigma(I) per shell;
4. ``emcjax.export``: the MTZ read back, its correlation with the truth against the full run's.

Prints the acceptance numbers of issue 11 and writes them to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax


def sh(args: list[str]) -> str:
    cmd = [sys.executable, "-m", *args]
    print("$ python -m " + " ".join(args), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout


def last_cc_true(run: pathlib.Path) -> float:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["cc_true"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-merging"))
    p.add_argument("--n-frames", type=int, default=2000)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--wilson-b", type=float, default=40.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotation-n", type=int, default=8, help="600-cell parameter of the true orientations")
    p.add_argument("--skip-kept", action="store_true", help="no reconstruction from the accepted frames alone")
    p.add_argument("--candidates", type=int, default=20, help="candidate rotations per frame (0: a full search)")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data.h5"
    summary: dict = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}", "args": vars(args)}
    summary["args"]["out"] = str(out)
    if not data.exists():
        sh(["emcjax.simulate", "--out", str(data), "--n-frames", str(args.n_frames), "--blank-fraction", "0.05",
            "--multi-fraction", "0.05", "--wilson-b", str(args.wilson_b), "--seed", str(args.seed),
            "--rotation-n", str(args.rotation_n), "--candidates", str(args.candidates)])
    common = ["--data", str(data), "--iters", str(args.iters), "--keep-checkpoints", "1", "--iterations-every", "0"]

    # 1. all frames, rejection, again with the weights
    full, kept = out / "full", out / "full_rejected"
    if not (full / "intensities.h5").exists():
        sh(["emcjax.lowres", *common, "--out", str(full)])
    print(sh(["emcjax.reject", "--run", str(full)]))
    rejection = full / "rejection.h5"
    if not args.skip_kept and not (kept / "intensities.h5").exists():
        sh(["emcjax.lowres", *common, "--out", str(kept), "--frame-weights", str(rejection)])
    import h5py

    from emcjax.data import SparseDataset

    with SparseDataset(data) as ds:
        truth = ds.read_truth()
    with h5py.File(rejection) as f:
        flags = f["flags"][()]
    kind = truth["frame_kind"]
    summary["rejected_fraction"] = {
        name: float(np.mean(flags[kind == k] != 0)) for name, k in (("one_crystal", 0), ("blank", 1), ("two_crystals", 2))
    }
    summary["cc_true_before_rejection"] = last_cc_true(full)
    summary["cc_true_after_rejection"] = None if args.skip_kept else last_cc_true(kept)

    # 2. half sets of the accepted frames, merging statistics
    merged = out / "halves" / "merged"
    if not (merged / "merged.h5").exists():
        print(sh(["emcjax.halves", "--run", str(full), "--frame-weights", str(rejection), "--iters", str(args.iters),
                  "--out", str(out / "halves")]))
    import csv

    rows = list(csv.DictReader((merged / "merging_stats.csv").open()))
    shells = [r for r in rows if r["shell"] != "overall"]
    cc_half = np.array([float(r["cc_half"]) for r in shells])
    cc_star = np.array([float(r["cc_star"]) for r in shells])
    cc_true = np.array([float(r["cc_true"]) for r in shells])
    good = cc_half > 0.3
    summary["cc_half_per_shell"] = cc_half.round(4).tolist()
    summary["max_abs_cc_star_minus_cc_true_where_cc_half_gt_0.3"] = float(np.max(np.abs(cc_star - cc_true)[good]))
    summary["true_z_sd_per_shell"] = [round(float(r["true_z_sd"]), 3) for r in shells]
    summary["true_z_mad_per_shell"] = [round(float(r["true_z_mad"]), 3) for r in shells]

    # 3. export and read back
    sh(["emcjax.export", "--run", str(merged), "--mtz", str(out / "merged.mtz")])
    from emcjax.mtz import read_mtz

    mtz = read_mtz(out / "merged.mtz")
    key = {tuple(h): i for i, h in enumerate(np.asarray(truth["hkl"]).tolist())}
    true_i = np.asarray(truth["intensity"], np.float64).sum(axis=1)
    hkl = np.stack([mtz["H"], mtz["K"], mtz["L"]], axis=1).astype(int)
    t = true_i[[key[tuple(h)] for h in hkl.tolist()]]
    summary["mtz"] = {"space_group": mtz["space_group"], "cell": list(mtz["cell"]), "n": int(hkl.shape[0]),
                      "cc_imean_truth": float(np.corrcoef(mtz["IMEAN"], t)[0, 1])}
    # the spread of (I - k I_true) / sigma for reflections on symmetry elements and for the others
    from emcjax.crystal import Crystal
    from emcjax.merge.stats import shell_of
    from emcjax.resolution import read_merged

    m = read_merged(merged)
    crystal = Crystal(tuple(m["cell"]), str(m["space_group"]))
    t = true_i[[key[tuple(h)] for h in m["hkl"].tolist()]]
    w = m["sigma"] ** -2.0
    scale = np.sum(w * m["intensity"] * t) / np.sum(w * t * t)
    z = (m["intensity"] - scale * t) / m["sigma"]
    images = np.einsum("gij,nj->ngi", crystal.laue_ops, m["hkl"])
    special = (np.all(images == m["hkl"][:, None, :], axis=2).sum(axis=1) > 1)  # a non-trivial stabilizer
    shell = shell_of(np.linalg.norm(m["hkl"] @ crystal.reciprocal_basis.T, axis=1), m["shell_edges_q"])
    summary["special_reflections"] = int(special.sum())
    summary["true_z_sd_general_per_shell"] = [round(float(np.std(z[(shell == s) & ~special])), 3) for s in range(len(shells))]
    summary["true_z_sd_special_per_shell"] = [round(float(np.std(z[(shell == s) & special])), 3) for s in range(len(shells))]
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
