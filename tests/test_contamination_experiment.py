"""experiments/contamination.py at its --quick size (docs/BENCHMARKS.md shows its full commands): every arm's
run, the rejection rates, the pipeline-order arms started from the all-frames run, summary.json and the PNG."""

from __future__ import annotations

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quick_contamination_experiment(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import contamination
    finally:
        sys.path.remove(str(REPO / "experiments"))
    contamination.main(["--quick", "--out", str(tmp_path)])
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
