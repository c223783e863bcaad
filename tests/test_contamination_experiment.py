"""experiments/contamination.py at its --quick size (docs/BENCHMARKS.md shows its full commands): every arm's
run, the rejection rates, the pipeline-order arms started from the all-frames run, summary.json and the PNG;
``--quick small``: the small crystal's scenarios (continuous orientations, candidate lists, vn = 5)."""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _contamination():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import contamination
    finally:
        sys.path.remove(str(REPO / "experiments"))
    return contamination


def test_quick_contamination_experiment(tmp_path):
    _contamination().main(["--quick", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    row = summary["scenarios"]["quick"]["runs"][0]
    assert set(row["rejected_fraction"]) == {"one_crystal", "blank", "two_crystals"}
    assert set(row["reasons"]) >= {"no_crystal", "second_crystal"}
    for arm in ("all", "rejected", "next_all", "next_rejected"):
        assert 0.0 < row[arm]["overall"]["cc"] <= 1.0
    assert len(row["all"]["cc_true_per_iteration"]) == 2 and len(row["next_rejected"]["cc_true_per_iteration"]) == 1
    paired = summary["scenarios"]["quick"]["paired"]
    assert paired["next_rejected"]["cc_overall"]["mean"] == row["next_rejected"]["overall"]["cc"] - row["next_all"]["overall"]["cc"]
    config = (tmp_path / "quick" / "seed0" / "next_rejected" / "config.toml").read_text()
    assert "init_from" in config and "rejection.h5" in config
    assert (tmp_path / "contamination.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_small_crystal_scenario(tmp_path):
    import numpy as np

    from emcjax.data import SparseDataset
    from emcjax.runio import read_run

    _contamination().main(["--quick", "small", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scenarios"]["quick"]["small_crystal"] == "uniform"
    seed = tmp_path / "quick" / "seed0"
    with SparseDataset(seed / "data.h5") as ds:
        truth = ds.read_truth()
        assert tuple(ds.crystal["cell"]) == (36.0, 36.0, 30.0, 90.0, 90.0, 90.0)
        assert ds.candidate_sampling_n == 16
    kinds = np.bincount(np.asarray(truth["frame_kind"]), minlength=3)
    assert kinds.tolist() == [48, 6, 6]  # 60 frames, 10 % blank, 10 % two-crystal
    assert 'vn = 5' in (seed / "all" / "config.toml").read_text()
    row = summary["scenarios"]["quick"]["runs"][0]
    assert row["rejected_fraction"]["blank"] == 1.0
    assert row["all"]["overall"]["cc"] > 0.9  # broad peaks, 60 frames: the model is already good
    assert read_run(seed / "rejected").hkl.shape == read_run(seed / "all").hkl.shape
