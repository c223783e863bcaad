"""Errors common to both half sets: present when the true orientations come from a coarse sampling?

    python experiments/common_error.py --out /tmp/common-error

For the true orientations of the n = 4 sampling (810 rotations, the simulator's default) and of the n = 8
sampling (~25 000), simulates 2000 frames whose candidate list is the true orientation alone (orientations
known, so orientation errors play no part), reconstructs the two halves and merges them, then prints per
shell the spread of (I - k I_true)/sigma(I) (sigma from the half-set scatter) and of (I_a - I_b)/(2 sigma):
the first above the second means errors common to both halves.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's emcjax
from merging import sh  # noqa: E402


def spreads(merged_dir: pathlib.Path, data: pathlib.Path) -> dict:
    from emcjax.data import SparseDataset
    from emcjax.merge.stats import shell_of
    from emcjax.resolution import read_merged
    from emcjax.scoring import values_by_hkl

    m = read_merged(merged_dir)
    with SparseDataset(data) as ds:
        truth = ds.read_truth()
        from emcjax.crystal import Crystal

        crystal = Crystal(tuple(ds.crystal["cell"]), str(ds.crystal["space_group"]))
    true_i = values_by_hkl(m["hkl"], truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))
    w = m["sigma"] ** -2.0
    k = np.sum(w * m["intensity"] * true_i) / np.sum(w * true_i**2)
    z = (m["intensity"] - k * true_i) / m["sigma"]
    z_diff = (m["half_a"] - m["half_b"]) / (2 * m["sigma"])
    shell = shell_of(np.linalg.norm(m["hkl"] @ crystal.reciprocal_basis.T, axis=1), m["shell_edges_q"])
    n = int(shell.max()) + 1
    return {
        "sd_z_true_per_shell": [round(float(np.std(z[shell == s])), 3) for s in range(n)],
        "sd_z_halves_per_shell": [round(float(np.std(z_diff[shell == s])), 3) for s in range(n)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/emcjax-common-error"))
    p.add_argument("--n-frames", type=int, default=2000)
    args = p.parse_args()
    summary = {}
    for n in (4, 8):
        out = args.out / f"n{n}"
        out.mkdir(parents=True, exist_ok=True)
        data = out / "data.h5"
        if not data.exists():
            sh(["emcjax.simulate", "--out", str(data), "--n-frames", str(args.n_frames), "--wilson-b", "40",
                "--seed", "0", "--candidates", "1", "--rotation-n", str(n)])
        for h in "ab":
            if not (out / h / "intensities.h5").exists():
                sh(["emcjax.lowres", "--data", str(data), "--out", str(out / h), "--half", h, "--iters", "4",
                    "--keep-checkpoints", "1"])
        sh(["emcjax.resolution", "--half-a", str(out / "a"), "--half-b", str(out / "b"), "--out", str(out / "merged")])
        summary[f"rotation_n_{n}"] = spreads(out / "merged", data)
        print(n, json.dumps(summary[f"rotation_n_{n}"]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
