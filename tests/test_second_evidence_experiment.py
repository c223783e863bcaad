"""experiments/second_evidence.py on one small simulated set (docs/BENCHMARKS.md shows its full commands): its
per-photon loop reproduces reject's stored second-crystal evidence, and the true orientation explains the good
frames' photons where the grid rotation leaves some for a second crystal."""

from __future__ import annotations

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_second_evidence_experiment_on_a_small_simulated_set(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import second_evidence
    finally:
        sys.path.remove(str(REPO / "experiments"))
    results = second_evidence.main(["--simulate", "4", "--frames", "30", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    (run_dir, (counts, difference)), = results.items()
    assert run_dir == tmp_path / "lowres-4-30" and "second evidence recomputed vs rejection.h5" in printed
    assert difference < 1e-3  # nats: the loop here against emcjax.merge.evidence as reject ran it
    assert sum(row["frames"] for row in counts.values()) == 30
    one, two = counts["one crystal"], counts["two crystals"]
    assert one["frames"] > 20 and two["frames"] > 0
    # at the truth no good frame shows a second crystal and every two-crystal frame does; the grid rotation
    # leaves photons off its peaks that a second crystal collects, refining it off the grid removes that
    assert one["truth"] == 0 and two["truth"] == two["frames"]
    assert one["A"] > 0 and one["refined"] <= one["A"] and one["reject"] <= one["A"]
