"""The model experiments of docs/EXPERIMENTS.md (b-e) at their --quick sizes: each writes its table, JSON and PNG.

The documented commands are ``python experiments/NAME.py [--quick]``; the scripts run here in-process (one JAX
start-up) with ``--quick --out TMP``.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

EXPERIMENTS = ["annealing", "mstep_speed", "likelihood_choice", "photon_budget"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        for name in EXPERIMENTS:
            importlib.import_module(name).main(["--quick", "--out", str(out)])
    finally:
        sys.path.remove(str(REPO / "experiments"))
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_quick_experiment_writes_table_json_and_figure(results, name):
    record = json.loads((results / f"{name}.json").read_text())
    table = (results / f"{name}.md").read_text()
    assert (results / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert len(record["rows"]) >= 2 and table.count("\n|") == len(record["rows"]) + 1
    assert record["machine"]["cpus"] >= 1
    for history in record["runs"].values():
        assert all(0.0 < h["cc_true"] <= 1.0 for h in history)


def test_annealed_runs_follow_the_schedule(results):
    runs = json.loads((results / "annealing.json").read_text())["runs"]
    annealed = [h for key, h in runs.items() if "/annealed/" in key]
    plain = [h for key, h in runs.items() if "/none/" in key]
    assert annealed and plain
    for history in annealed:
        assert [h["inverse_temperature"] for h in history][:3] == pytest.approx([0.02, 0.02 ** 0.5, 1.0])
    assert all(h["inverse_temperature"] == 1.0 for history in plain for h in history)
