"""docs/TUTORIAL.md runs as written (its code blocks, read from the file, in order, in one directory), and the
pipeline's acceptance on its simulated image set (continuous orientations, blank and two-crystal frames):
the MTZ's IMEAN correlates with the truth, the suggested resolution is where the truth says, and a pipeline
interrupted in two stages and run again ends with the same MTZ."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import io
import json
import pathlib
import re
import shlex
import sys

import numpy as np
import pytest

from emcjax import pipeline, scoring
from emcjax.data import SparseDataset
from emcjax.mtz import read_mtz

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "TUTORIAL.md"
sys.path.insert(0, str(ROOT / "experiments"))
from pipeline import Interrupt  # noqa: E402  (experiments/pipeline.py)

sys.path.pop(0)


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a markdown text: (language, body), in order."""
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def run_command(line: str) -> str:
    """Runs ``python -m emcjax.X ARGS`` through X's main in this process; returns what it printed."""
    argv = shlex.split(line.split("  #")[0])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("emcjax."), line
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        importlib.import_module(argv[2]).main(argv[3:])
    return out.getvalue()


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Runs the tutorial's blocks in order; returns the directory, each command's output and the MTZ after
    each pipeline command."""
    root = tmp_path_factory.mktemp("tutorial")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        outputs, mtzs = [], []
        for language, body in blocks(TUTORIAL.read_text()):
            if language == "toml":
                (root / "run.toml").write_text(body)
            elif language == "bash":
                for line in body.strip().splitlines():
                    outputs.append((line, run_command(line)))
                    print(outputs[-1][1])
                    if "emcjax.pipeline" in line:
                        mtzs.append(read_mtz(root / "runs" / "tutorial" / "merged.mtz"))
            elif language == "python":
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(body, str(TUTORIAL), "exec"), {})
                outputs.append(("python", out.getvalue()))
    return root, outputs, mtzs


def test_tutorial_blocks_are_the_pipeline_from_images(tutorial):
    root, outputs, mtzs = tutorial
    commands = [line.split()[2] for line, _ in outputs if line != "python"]
    assert commands == ["emcjax.simulate_images", "emcjax.pipeline", "emcjax.pipeline", "emcjax.pipeline"]
    first, again, reshelled = (out for line, out in outputs if "emcjax.pipeline" in line)
    stages = ["reduce", "orient", "lowres", "reject", "half_a", "half_b", "resolution", "export"]
    assert [m.group(1) for m in re.finditer(r"^\[\d+\] (\w+): running", first, flags=re.M)] == stages
    # run again: every stage skipped, same MTZ
    assert re.findall(r"^\[\d+\] (\w+): done earlier", again, flags=re.M) == stages
    np.testing.assert_array_equal(mtzs[1]["IMEAN"], mtzs[0]["IMEAN"])
    # another merging table: only resolution and export run again
    assert re.findall(r"^\[\d+\] (\w+): running", reshelled, flags=re.M) == ["resolution", "export"]
    assert "== summary" in first and "frames rejected:" in first and "MTZ:" in first and "wall time per stage" in first
    summary = (root / "runs" / "tutorial" / "summary.txt").read_text().strip()
    assert summary.startswith("== summary") and summary in reshelled  # summary.txt: the last summary printed
    python_out = [out for line, out in outputs if line == "python"][0]
    assert "P 43 21 2" in python_out and "reflections" in python_out


def _true_intensities(root: pathlib.Path, hkl: np.ndarray) -> np.ndarray:
    """The simulator's integrated intensities of ``hkl``; 0 for reflections beyond its pixels (4.5 Å), where
    it put no photons (the reduction's default geometry reaches 4 Å in the corners)."""
    with SparseDataset(root / "sim" / "truth.h5") as ds:
        truth = ds.read_truth()
    true_i = scoring.values_by_hkl(hkl, truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))
    return np.nan_to_num(true_i, nan=0.0)


def _acceptance(root: pathlib.Path, mtz: dict) -> tuple[float, int, int]:
    """(CC of the MTZ's IMEAN with the truth, the suggested limit's shell, the last shell before the merged
    data's correlation with the truth drops below 0.5), from the MTZ, the truth and the last merging table."""
    import h5py

    hkl = np.stack([mtz["H"], mtz["K"], mtz["L"]], axis=1).astype(np.int64)
    cc = float(np.corrcoef(mtz["IMEAN"], _true_intensities(root, hkl))[0, 1])
    out = root / "runs" / "tutorial"
    rows = list(csv.DictReader((out / "merged" / "merging_stats.csv").open()))[:-1]
    d_max = np.array([float(r["d_max"]) for r in rows])
    d_min = np.array([float(r["d_min"]) for r in rows])
    with h5py.File(out / "merged" / "merged.h5") as f:
        merged_hkl, merged = f["hkl"][()].astype(np.int64), f["intensity"][()]
        cell = f.attrs["cell"]
    d = 1 / np.linalg.norm(merged_hkl / np.asarray(cell[:3]), axis=1)  # orthogonal cell
    true_merged = _true_intensities(root, merged_hkl)
    cc_true = []
    for hi, lo in zip(d_max, d_min):
        sel = (d <= hi + 1e-6) & (d > lo - 1e-6)
        ok = sel.sum() >= 3 and np.std(true_merged[sel]) > 0
        cc_true.append(np.corrcoef(merged[sel], true_merged[sel])[0, 1] if ok else np.nan)
    below = np.flatnonzero(~(np.asarray(cc_true) >= 0.5))
    truth_shell = int(below[0]) - 1 if below.size else len(rows) - 1
    d_suggested = json.loads((out / "pipeline.json").read_text())["stages"]["resolution"]["summary"]["d_suggested"]
    suggested_shell = int(np.argmin(np.abs(d_min - d_suggested))) if d_suggested is not None else -1
    print("truth CC per shell:", np.round(cc_true, 3), "shells to", d_min)
    return cc, suggested_shell, truth_shell


def test_mtz_correlates_with_the_truth_and_the_resolution_is_where_the_truth_says(tutorial):
    root, outputs, mtzs = tutorial
    cc, suggested_shell, truth_shell = _acceptance(root, mtzs[-1])
    print(f"CC(IMEAN, truth) = {cc:.4f}, suggested shell {suggested_shell}, truth shell {truth_shell}")
    assert cc >= 0.95
    assert abs(suggested_shell - truth_shell) <= 1
    # the frames the simulator spoiled are rejected, the good ones kept
    with SparseDataset(root / "runs" / "tutorial" / "oriented.h5") as ds:
        kind = ds.read_truth()["frame_kind"]
    import h5py

    with h5py.File(root / "runs" / "tutorial" / "lowres" / "rejection.h5") as f:
        rejected = f["flags"][()] != 0
    assert rejected[kind == 1].all()  # blank
    assert np.mean(rejected[kind == 0]) < 0.05  # one crystal


def test_interrupted_pipeline_finishes_with_the_same_mtz(tutorial, capsys):
    """The tutorial's oriented data set through the pipeline again into another directory, interrupted (as
    Ctrl-C) in the all-frames run and then in half set a, each time run again: the MTZ equals the
    uninterrupted run's."""
    root, outputs, mtzs = tutorial
    config = pipeline.parse_args(["--config", str(root / "run.toml")])
    config = dataclasses.replace(config, images=(), data=root / "runs" / "tutorial" / "oriented.h5",
                                 out=root / "runs" / "killed")
    for stage in ("lowres", "half_a"):
        hook = Interrupt(stage, "iter 2/")
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(config, log=hook)
        assert hook.fired
    log = []
    pipeline.run(config, log=log.append)
    text = "\n".join(log)
    assert re.findall(r"^\[\d+\] (\w+): done earlier", text, flags=re.M) == ["lowres", "reject"]
    assert re.findall(r"^\[\d+\] (\w+): resuming", text, flags=re.M) == ["half_a"]
    assert "resumed" in text
    killed = read_mtz(root / "runs" / "killed" / "merged.mtz")
    for column in ("H", "K", "L", "IMEAN", "SIGIMEAN", "I_half1", "I_half2"):
        np.testing.assert_array_equal(killed[column], mtzs[0][column])


def test_readme_keeps_its_two_commands_and_links():
    text = (ROOT / "README.md").read_text()
    first = blocks(text)[0][1].strip().splitlines()
    assert first == [
        'pip install -e . && python -m emcjax.lowres --iters 100',
        'pip install -e ".[test]" && python -m pytest -q',
    ]
    for target in re.findall(r"\]\(([^)#]+)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for target in re.findall(r"\]\(([^)#]+)", TUTORIAL.read_text()):
        if not target.startswith("http"):
            assert (TUTORIAL.parent / target).exists(), target
    for png in [*(ROOT / "docs" / "tutorial").glob("*.png"), ROOT / "docs" / "figures" / "reconstruction.png"]:
        assert png.stat().st_size < 100_000, png
