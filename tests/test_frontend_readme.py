"""The README's "From detector images" commands, run as written (in a temporary directory)."""

from __future__ import annotations

import importlib
import json
import pathlib
import shlex

import numpy as np

from emcjax import data as data_io

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    text = README.read_text().split("## From detector images", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in text.strip().splitlines()]


def test_readme_image_commands_run(tmp_path, monkeypatch):
    commands = readme_commands()
    assert [c[2] for c in commands] == ["emcjax.simulate_images", "emcjax.reduce", "emcjax.orient", "emcjax.lowres"]
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert argv[:2] == ["python", "-m"]
        importlib.import_module(argv[2]).main(argv[3:])
    with data_io.SparseDataset("oriented.h5") as ds:
        assert ds.has_candidates and ds.candidate_sampling_n == 8 and ds.n_frames >= 30
    records = [json.loads(line) for line in pathlib.Path("runs/images/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and np.isfinite(records[-1]["cc_true"])
