"""docs/TUTORIAL.md runs as written (its code blocks, read from the file, in order, in one directory), and the
pipeline's acceptance on its simulated image set (continuous orientations, blank and two-crystal frames):
the MTZ's IMEAN correlates with the truth, the suggested resolution is where the truth says, the high-resolution
stages keep the rejection's and the half sets' frame weights, and a pipeline interrupted in a low-res half set,
its high-resolution run and the merging statistics, then run again, ends with the same MTZ.

All of it is one test on one set-up: pytest-xdist would set up a module fixture once in every worker that
runs one of its tests."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import pathlib
import re
import shlex
import shutil
import sys

import h5py

import numpy as np
import pytest

from emcjax import pipeline, scoring
from emcjax.data import SparseDataset
from emcjax.mtz import read_mtz
from emcjax.pipeline_state import PipelineState

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


def run_tutorial(root: pathlib.Path) -> tuple[list[tuple[str, str]], list[dict]]:
    """Runs the tutorial's blocks in order in ``root``; returns each command's output and the MTZ after each
    pipeline command."""
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
    return outputs, mtzs


STAGES = ["reduce", "orient", "lowres", "reject", "highres", "half_a", "half_a_highres", "half_b", "half_b_highres",
          "resolution", "export"]


def test_tutorial_from_images_to_mtz(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs, mtzs = run_tutorial(tmp_path)
    check_blocks(tmp_path, outputs, mtzs)
    check_acceptance(tmp_path, mtzs[-1])
    check_frame_weights(tmp_path / "runs" / "tutorial")
    check_interrupted_run_ends_with_the_same_mtz(tmp_path, outputs, mtzs[-1])


def check_blocks(root, outputs, mtzs):
    commands = [line.split()[2] for line, _ in outputs if line != "python"]
    assert commands == ["emcjax.simulate_images", "emcjax.pipeline", "emcjax.pipeline", "emcjax.pipeline"]
    first, again, reshelled = (out for line, out in outputs if "emcjax.pipeline" in line)
    assert [m.group(1) for m in re.finditer(r"^\[\d+\] (\w+): running", first, flags=re.M)] == STAGES
    # run again: every stage skipped, same MTZ
    assert re.findall(r"^\[\d+\] (\w+): done earlier", again, flags=re.M) == STAGES
    np.testing.assert_array_equal(mtzs[1]["IMEAN"], mtzs[0]["IMEAN"])
    # another merging table: only resolution and export run again
    assert re.findall(r"^\[\d+\] (\w+): running", reshelled, flags=re.M) == ["resolution", "export"]
    assert "== summary" in first and "frames rejected:" in first and "MTZ:" in first and "wall time per stage" in first
    assert "high resolution: local update to 4.00 Å" in first
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


def check_acceptance(root: pathlib.Path, mtz: dict) -> None:
    """The MTZ correlates with the truth, the suggested limit is within one shell of where the truth says,
    the frames the simulator spoiled are rejected and the good ones kept."""
    cc, suggested_shell, truth_shell = _acceptance(root, mtz)
    print(f"CC(IMEAN, truth) = {cc:.4f}, suggested shell {suggested_shell}, truth shell {truth_shell}")
    assert cc >= 0.95
    assert abs(suggested_shell - truth_shell) <= 1
    with SparseDataset(root / "runs" / "tutorial" / "oriented.h5") as ds:
        kind = ds.read_truth()["frame_kind"]
    with h5py.File(root / "runs" / "tutorial" / "lowres" / "rejection.h5") as f:
        rejected = f["flags"][()] != 0
    assert rejected[kind == 1].all() and rejected[kind == 2].all()  # blank, two crystals
    assert np.mean(rejected[kind == 0]) < 0.02  # one crystal (issue 11: < 2 %)


def _weights(path: pathlib.Path) -> np.ndarray:
    with h5py.File(path) as f:
        return f["weights"][()]


def check_frame_weights(out: pathlib.Path) -> None:
    """highres uses the rejection's weights, each half's high-resolution run its low-res run's (disjoint halves
    of the kept frames); the merging statistics come from the high-resolution halves, past the low-res cutoff."""
    kept = _weights(out / "lowres" / "rejection.h5")
    assert 0 < np.sum(kept == 0) < kept.size
    np.testing.assert_array_equal(_weights(out / "highres" / "frame_weights.h5"), kept)
    halves = []
    for half in "ab":
        low = _weights(out / f"half_{half}" / "frame_weights.h5")
        np.testing.assert_array_equal(_weights(out / f"half_{half}_highres" / "frame_weights.h5"), low)
        halves.append(low > 0)
    assert not (halves[0] & halves[1]).any() and np.array_equal(halves[0] | halves[1], kept > 0)
    with h5py.File(out / "merged" / "merged.h5") as f:
        assert pathlib.Path(f.attrs["half_a_run"]).name == "half_a_highres"
        hkl, cell = f["hkl"][()], f.attrs["cell"]
    d = 1 / np.linalg.norm(hkl / np.asarray(cell[:3]), axis=1)  # orthogonal cell
    low_cutoff = json.loads((out / "highres" / "source.json").read_text())["lowres_resolution_A"]
    assert d.min() < low_cutoff - 1  # reflections the low-res runs did not have


def check_interrupted_run_ends_with_the_same_mtz(root: pathlib.Path, outputs, mtz: dict) -> None:
    """The tutorial's last pipeline command again, as if the pipeline had been killed before half set b (its
    records from half_b on and its outputs removed), interrupted (as Ctrl-C) in half_b, in half_b_highres and
    in the merging statistics, each time run again: each EMC run resumes from its checkpoint, the stages
    before are skipped, and the MTZ equals the uninterrupted run's."""
    out = root / "runs" / "tutorial"
    last = [line for line, _ in outputs if "emcjax.pipeline" in line][-1]
    config = pipeline.parse_args(shlex.split(last)[3:])
    state = PipelineState(out)
    for name in STAGES[STAGES.index("half_b"):]:
        state.stages.pop(name)
    state.save()
    for name in ("half_b", "half_b_highres", "merged"):
        shutil.rmtree(out / name)
    (out / "merged.mtz").unlink()
    interrupted = []
    for stage, trigger in (("half_b", "iter 1/"), ("half_b_highres", "iter 1/"), ("resolution", "half a:")):
        hook = Interrupt(stage, trigger, log=interrupted.append)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(config, log=hook)
        assert hook.fired
    text = "\n".join(interrupted)
    print(text)
    assert re.findall(r"^\[\d+\] (\w+): resuming", text, flags=re.M) == ["half_b", "half_b_highres"]
    assert "resumed" in text and "removing" not in text  # from their checkpoints, not started over
    log = []
    pipeline.run(config, log=log.append)
    text = "\n".join(log)
    assert re.findall(r"^\[\d+\] (\w+): done earlier", text, flags=re.M) == STAGES[:STAGES.index("resolution")]
    assert re.findall(r"^\[\d+\] (\w+): (?:running|resuming)", text, flags=re.M) == ["resolution", "export"]
    killed = read_mtz(out / "merged.mtz")
    for column in ("H", "K", "L", "IMEAN", "SIGIMEAN", "I_half1", "I_half2"):
        np.testing.assert_array_equal(killed[column], mtz[column])


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
