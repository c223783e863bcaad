"""From detector images (or a sparse data set) to an MTZ in one command: ``python -m emcjax.pipeline --config run.toml``.

Runs, in order, each stage through its Python entry point (not as a subprocess):

1. ``reduce`` (``emcjax.reduce``, only with ``--images``): detector images -> ``OUT/reduced.h5``;
2. ``orient`` (``emcjax.orient``, when the data set has spots but no candidate orientations) -> ``OUT/oriented.h5``;
3. ``lowres`` (``emcjax.lowres``): all frames -> ``OUT/lowres/``;
4. ``reject`` (``emcjax.reject``): flags frames -> ``OUT/lowres/rejection.h5``;
5. ``highres`` (``emcjax.highres --frame-weights``, only with ``--highres.enabled``): the kept frames, local
   update from the all-frames run to ``--highres.resolution`` -> ``OUT/highres/``;
6. ``half_a``, ``half_b`` (``emcjax.lowres --half a|b --frame-weights``): the kept frames split in two, each
   from its own random start -> ``OUT/half_a/``, ``OUT/half_b/``; with ``--highres.enabled`` each half goes on
   to the high resolution from its own low-res run (``half_a_highres``, ``half_b_highres`` ->
   ``OUT/half_a_highres/``, ``OUT/half_b_highres/``), so the two halves stay independent in every stage;
7. ``resolution`` (``emcjax.resolution``): merging table, suggested limit, sigma(I) of the (last) half-set
   runs -> ``OUT/merged/``;
8. ``export`` (``emcjax.export``): ``OUT/merged.mtz`` (cut at the suggested limit unless ``--keep-all``).

A stage whose outputs are complete and unchanged for the same inputs and settings is skipped (checksums in
``OUT/pipeline.json``, emcjax.pipeline_state); an interrupted stage is resumed (reduce and orient from their
partial files, the EMC runs from their checkpoints); a stage whose inputs or settings changed is run again,
and every stage after it. At the end: frames used and rejected by reason, the merging table, the suggested
resolution with its criterion, the MTZ and the wall time per stage (also in ``OUT/summary.txt``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time

import h5py
import numpy as np

from emcjax import atomic_files, cli, rundir, runio, toml_config
from emcjax import emc as emc_lib
from emcjax.errors import ConfigError, DataError
from emcjax.frontend.orient import OrientConfig
from emcjax.frontend.reduce import ReduceConfig
from emcjax.merge import reject as reject_lib
from emcjax.merge import stats as stats_lib
from emcjax.pipeline_state import PipelineState, summary_text

SUMMARY_FILE = "summary.txt"


@dataclasses.dataclass(frozen=True)
class LowresStage:
    """Settings of the EMC runs (all frames, then each half set)."""

    iters: int = 30
    """EMC iterations of each run."""
    seed: int = 0
    """Seed of the random initial model (each half draws its own from it)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept per run."""
    emc: emc_lib.EMCConfig = dataclasses.field(default_factory=emc_lib.EMCConfig)
    """EMC algorithm settings (python -m emcjax.lowres --help)."""


@dataclasses.dataclass(frozen=True)
class RejectStage:
    """Frame rejection after the all-frames run."""

    criteria: reject_lib.RejectionCriteria = dataclasses.field(default_factory=reject_lib.RejectionCriteria)
    """Thresholds of the tests."""
    photon_test: bool = True
    """Test the photons outside the predicted peaks."""


@dataclasses.dataclass(frozen=True)
class HighresStage:
    """The local update to a higher resolution (python -m emcjax.highres) after the low-resolution runs."""

    enabled: bool = False
    """Run it: on the kept frames after reject, and on each half set after its low-res run (the merging table
    and the MTZ then come from the high-resolution half sets). Needs lowres.emc.d_min, the low-res cutoff."""
    resolution: float | None = None
    """High-resolution limit d_min in Å (None: the data set's resolution_max_A, the detector's edge)."""
    iters: int = 5
    """EMC iterations of each high-resolution run."""
    fine_n: int = 0
    """600-cell parameter of the fine sampling (0: ceil(n_c x res_coarse / res_fine), the reference's)."""
    min_probability: float = 0.01
    """Coarse rotations a frame kept with at least this probability contribute their fine neighbours."""
    max_kept: int = 32
    """At most this many fine rotations are kept per frame and E-step."""
    refine_phi: bool = False
    """Refine phi (False: the low-res run's, as in the reference)."""


@dataclasses.dataclass(frozen=True)
class HalvesStage:
    """The two half sets."""

    split: str = "parity"
    """'parity' (frame index) or 'random' (seeded by --halves.split-seed)."""
    split_seed: int = 0
    """Seed of the random split."""


@dataclasses.dataclass(frozen=True)
class ResolutionStage(stats_lib.MergingOptions):
    """Merging statistics."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Images (or a sparse data set) to merged intensities in an MTZ."""

    images: tuple[str, ...] = ()
    """Detector images: CBF files, quoted glob patterns or HDF5 stacks (reduced first). Or give --data."""
    data: pathlib.Path | None = None
    """A sparse data set (docs/FORMATS.md) instead of images: reduce is skipped (orient too, when it carries
    candidate orientations or no spots)."""
    out: pathlib.Path = pathlib.Path("runs/pipeline")
    """Directory of every stage's output, pipeline.json (the stages done) and summary.txt."""
    config: pathlib.Path | None = None
    """TOML file whose values become the defaults of all other fields (flags override)."""
    reduce: ReduceConfig = dataclasses.field(default_factory=ReduceConfig)
    """Data reduction (its images, out, resume and overwrite are the pipeline's)."""
    orient: OrientConfig = dataclasses.field(default_factory=OrientConfig)
    """Candidate orientations (its data, out, resume and overwrite are the pipeline's)."""
    lowres: LowresStage = dataclasses.field(default_factory=LowresStage)
    """The EMC runs."""
    reject: RejectStage = dataclasses.field(default_factory=RejectStage)
    """Frame rejection."""
    highres: HighresStage = dataclasses.field(default_factory=HighresStage)
    """The local update to a higher resolution (off unless highres.enabled)."""
    halves: HalvesStage = dataclasses.field(default_factory=HalvesStage)
    """Half sets."""
    resolution: ResolutionStage = dataclasses.field(default_factory=ResolutionStage)
    """Merging statistics and the suggested resolution limit."""
    keep_all: bool = False
    """Export every reflection (default: only those to the suggested resolution limit)."""


def check(config: PipelineConfig) -> None:
    """Raises ConfigError for settings that cannot run (before anything is written)."""
    if bool(config.images) == (config.data is not None):
        raise ConfigError("give the detector images (--images 'run1/*.cbf') or a sparse data set (--data FILE.h5), "
                          "not both")
    if config.halves.split not in ("parity", "random"):
        raise ConfigError(f"halves.split must be 'parity' or 'random', got {config.halves.split!r}")
    for name, value in (("lowres.iters", config.lowres.iters), ("highres.iters", config.highres.iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    h, d_low = config.highres, config.lowres.emc.d_min
    if h.enabled and d_low is None:
        raise ConfigError("highres.enabled needs lowres.emc.d_min: the low-resolution cutoff in Å (e.g. 6.0) of the "
                          "runs the local update starts from")
    if h.enabled and h.resolution is not None and not 0 < h.resolution < d_low:
        raise ConfigError(f"highres.resolution must be > 0 and below lowres.emc.d_min = {d_low} Å, got {h.resolution!r}")


@dataclasses.dataclass
class Stage:
    """One step: its name, the files it reads, its settings, its products and the call that makes them."""

    name: str
    what: str
    inputs: list[pathlib.Path]
    settings: dict
    products: list[pathlib.Path]
    call: object  # (resume: bool, log) -> summary dict
    run_dir: pathlib.Path | None = None  # an EMC run directory (resumed from its checkpoints)


def _settings(config) -> dict:
    values = toml_config.config_to_dict(config)
    for key in ("resume", "overwrite", "config"):
        values.pop(key, None)
    return values


def _has_group(path: pathlib.Path, name: str) -> bool:
    with h5py.File(path, "r") as f:
        return name in f


# ----------------------------------------------------------------------------------------------------
# The stages


def _reduce_stage(config: PipelineConfig, out: pathlib.Path) -> Stage:
    from emcjax.frontend import reduce as reduce_lib

    path = out / "reduced.h5"
    stage_config = dataclasses.replace(config.reduce, images=tuple(config.images), out=path)

    def call(resume, log):
        reduce_lib.run(dataclasses.replace(stage_config, resume=resume, overwrite=True), log=log)
        with h5py.File(path, "r") as f:
            return {"frames": int(f["frames/photon_offsets"].shape[0] - 1)}

    inputs = [pathlib.Path(p) for p in _image_files(config.images)]
    for extra in (config.reduce.mask.file, config.reduce.poni, config.reduce.truth):
        if extra is not None:
            inputs.append(pathlib.Path(extra))
    return Stage("reduce", f"images -> {path}", inputs, _settings(stage_config), [path], call)


def _image_files(patterns) -> list[str]:
    from emcjax.frontend.images import ImageStack

    files = ImageStack(tuple(patterns), ReduceConfig().h5_path).files
    return [str(f) for f in files]


def _orient_stage(config: PipelineConfig, data: pathlib.Path, out: pathlib.Path) -> Stage:
    from emcjax.frontend import orient as orient_lib

    path = out / "oriented.h5"
    stage_config = dataclasses.replace(config.orient, data=data, out=path)

    def call(resume, log):
        stats = orient_lib.run(dataclasses.replace(stage_config, resume=resume, overwrite=True), log=log)
        return {**{k: stats[k] for k in ("frames", "with_spots", "kept", "median_candidates")},
                "keep_empty": stage_config.keep_empty}

    return Stage("orient", f"{data} -> {path}", [data], _settings(stage_config), [path], call)


def _lowres_config(config: PipelineConfig, data: pathlib.Path, run_dir: pathlib.Path, **extra):
    from emcjax.lowres import LowresConfig

    s = config.lowres
    return LowresConfig(data=data.absolute(), out=run_dir.absolute(), iters=s.iters, seed=s.seed, emc=s.emc,
                        keep_checkpoints=s.keep_checkpoints, **extra)


def _emc_stage(name: str, what: str, config, inputs: list[pathlib.Path], with_weights: bool = False) -> Stage:
    from emcjax import lowres

    products = [config.out / "intensities.h5", runio.iteration_path(config.out, config.iters)]
    if with_weights:
        products.append(config.out / "frame_weights.h5")

    def call(resume, log):
        final = lowres.run(dataclasses.replace(config, resume=resume), log=log)
        summary = {k: final[k] for k in ("iteration", "log_likelihood", "cc_true") if k in final}
        if with_weights:
            with h5py.File(config.out / "frame_weights.h5", "r") as f:
                summary["frames_used"] = int(np.sum(f["weights"][()] > 0))
        return summary

    return Stage(name, what, inputs, _settings(config), products, call, run_dir=config.out)


def _highres_stage(name: str, config: PipelineConfig, data: pathlib.Path, from_run: pathlib.Path,
                   run_dir: pathlib.Path, inputs: list[pathlib.Path], frame_weights: pathlib.Path | None = None) -> Stage:
    from emcjax import highres

    h = config.highres
    resolution = h.resolution
    if resolution is None:
        with h5py.File(data, "r") as f:
            resolution = float(f["geometry"].attrs["resolution_max_A"])
    stage_config = highres.HighresConfig(
        from_run=from_run.absolute(), resolution=resolution, iters=h.iters, out=run_dir.absolute(), fine_n=h.fine_n,
        min_probability=h.min_probability, max_kept=h.max_kept, refine_phi=h.refine_phi,
        frame_weights=None if frame_weights is None else frame_weights.absolute(),
        keep_checkpoints=config.lowres.keep_checkpoints,
    )
    products = [run_dir / "intensities.h5", runio.iteration_path(run_dir, h.iters), run_dir / "frame_weights.h5"]

    def call(resume, log):
        final = highres.run(dataclasses.replace(stage_config, resume=resume), log=log)
        summary = {k: final[k] for k in ("iteration", "log_likelihood", "cc_true") if k in final}
        with h5py.File(run_dir / "frame_weights.h5", "r") as f:
            summary["frames_used"] = int(np.sum(f["weights"][()] > 0))
        return {**summary, "resolution": resolution}

    return Stage(name, f"{from_run.name} at {config.lowres.emc.d_min} Å -> {resolution} Å in {run_dir}", inputs,
                 _settings(stage_config), products, call, run_dir=run_dir)


def _reject_stage(config: PipelineConfig, run_dir: pathlib.Path, inputs: list[pathlib.Path]) -> Stage:
    from emcjax import reject

    stage_config = reject.RejectConfig(run=run_dir.absolute(), criteria=config.reject.criteria,
                                       photon_test=config.reject.photon_test)
    path = run_dir / reject.REJECTION_FILE
    return Stage("reject", f"{run_dir} -> {path}", inputs, _settings(stage_config), [path],
                 lambda resume, log: reject.reject(stage_config, log=log))


def _resolution_stage(config: PipelineConfig, half_a: pathlib.Path, half_b: pathlib.Path, out: pathlib.Path,
                      inputs: list[pathlib.Path]) -> Stage:
    from emcjax import resolution

    s = config.resolution
    stage_config = resolution.ResolutionConfig(half_a=half_a.absolute(), half_b=half_b.absolute(), out=out.absolute(),
                                               **{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})

    def call(resume, log):
        result = resolution.merge_halves(stage_config, log=log)
        return {"d_suggested": result["d_suggested"], "criterion": result["criterion"]}

    return Stage("resolution", f"{half_a} + {half_b} -> {out}", inputs, _settings(stage_config),
                 [out / resolution.MERGED_FILE, out / "merging_table.txt"], call)


def _export_stage(config: PipelineConfig, merged: pathlib.Path, mtz: pathlib.Path, data: pathlib.Path,
                  state: PipelineState) -> Stage:
    from emcjax import export

    d_min = None
    if not config.keep_all:
        d_min = (state.stages.get("resolution", {}).get("summary") or {}).get("d_suggested")
    stage_config = export.ExportConfig(run=merged.absolute(), mtz=mtz.absolute(), d_min=d_min)

    def call(resume, log):
        mtz_path, hkl_path = export.export(stage_config, log=log)
        return {"mtz": str(mtz_path), "hkl": str(hkl_path), "d_min": d_min, **mtz_truth_cc(mtz_path, data)}

    return Stage("export", f"{merged} -> {mtz}", [merged / "merged.h5"], _settings(stage_config),
                 [mtz, mtz.with_suffix(".hkl")], call)


def mtz_truth_cc(mtz_path: pathlib.Path, data: pathlib.Path) -> dict:
    """``{"cc_true_imean", "reflections"}``: Pearson CC of the MTZ's IMEAN with the true integrated intensities
    (0 for reflections the truth lacks: beyond the simulated pixels) when the data set carries its truth
    (simulated data), else {}."""
    from emcjax import scoring
    from emcjax.data import SparseDataset
    from emcjax.mtz import read_mtz

    with SparseDataset(data) as ds:
        truth = ds.read_truth() if ds.has_truth else {}
    if "hkl" not in truth or "intensity" not in truth:
        return {}
    mtz = read_mtz(mtz_path)
    hkl = np.stack([mtz["H"], mtz["K"], mtz["L"]], axis=1).astype(np.int64)
    true_i = scoring.values_by_hkl(hkl, truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))
    true_i = np.nan_to_num(true_i, nan=0.0)  # reflections the simulation did not reach hold no intensity
    return {"cc_true_imean": float(np.corrcoef(mtz["IMEAN"], true_i)[0, 1]), "reflections": int(hkl.shape[0])}


# ----------------------------------------------------------------------------------------------------
# The run


def stages(config: PipelineConfig, out: pathlib.Path):
    """The stages in order, each built (by the generator) once those before it are done: a stage's settings
    may depend on their results (orient runs only on data with spots, export cuts at the suggested limit)."""
    state = yield
    data = config.data
    if config.images:
        stage = _reduce_stage(config, out)
        state = yield stage
        data = stage.products[0]
    data = pathlib.Path(data).absolute()
    if not data.is_file():
        raise DataError(f"data: data set {data} does not exist")
    if _has_group(data, "spots") and not _has_candidates(data):
        stage = _orient_stage(config, data, out)
        state = yield stage
        data = stage.products[0]
    lowres_dir = out / "lowres"
    stage = _emc_stage("lowres", f"all frames of {data.name} -> {lowres_dir}", _lowres_config(config, data, lowres_dir),
                       [data])
    state = yield stage
    lowres_products = stage.products
    stage = _reject_stage(config, lowres_dir, [data, *lowres_products])
    state = yield stage
    rejection = stage.products[0]
    if config.highres.enabled:
        state = yield _highres_stage("highres", config, data, lowres_dir, out / "highres",
                                     [data, rejection, *lowres_products], frame_weights=rejection)
    halves = []
    for half in "ab":
        run_dir = out / f"half_{half}"
        stage = _emc_stage(
            f"half_{half}", f"half {half} of the kept frames -> {run_dir}",
            _lowres_config(config, data, run_dir, half=half, frame_weights=rejection.absolute(),
                           split=config.halves.split, split_seed=config.halves.split_seed),
            [data, rejection], with_weights=True)
        state = yield stage
        if config.highres.enabled:
            stage = _highres_stage(f"half_{half}_highres", config, data, run_dir, out / f"half_{half}_highres",
                                   [data, *stage.products])
            state = yield stage
        halves.append(stage)
    merged = out / "merged"
    state = yield _resolution_stage(config, halves[0].run_dir, halves[1].run_dir, merged,
                                    [p for h in halves for p in h.products])
    state = yield _export_stage(config, merged, out / "merged.mtz", data, state)


def _has_candidates(path: pathlib.Path) -> bool:
    from emcjax.data import SparseDataset

    with SparseDataset(path) as ds:
        return bool(ds.has_candidates)


def _prepare_run_dir(stage: Stage, fresh: bool, log) -> bool:
    """Whether an EMC stage resumes; a fresh start (new key) or a directory that holds no resumable run
    starts over (the directory is the pipeline's own)."""
    status = rundir.status(stage.run_dir)
    if not fresh and status == "started":
        return True
    if status in ("started", "foreign") or (status == "failed-start" and stage.name.endswith("highres")):
        # (a highres start that stopped before its first checkpoint cannot be resumed; lowres clears its own)
        why = ("made with other inputs or settings" if fresh else
               "holds files no run writes" if status == "foreign" else "no checkpoint to resume from")
        log(f"  removing {stage.run_dir} ({why})")
        shutil.rmtree(stage.run_dir)
    return False


def _run_stage(stage: Stage, state: PipelineState, number: str, log) -> None:
    key = state.key(stage.settings, stage.inputs)
    if state.is_done(stage.name, key):
        log(f"[{number}] {stage.name}: done earlier, outputs unchanged; skipped ({stage.what})")
        return
    fresh = not state.was_started(stage.name, key)
    if stage.run_dir is not None:
        resume = _prepare_run_dir(stage, fresh, log)
    else:
        resume = not fresh
    log(f"[{number}] {stage.name}: {'resuming' if resume else 'running'} ({stage.what})")
    state.start(stage.name, key)
    start = time.perf_counter()
    summary = stage.call(resume, lambda line: log("  " + str(line).replace("\n", "\n  ")))
    state.finish(stage.name, stage.products, time.perf_counter() - start, summary or {})


def run(config: PipelineConfig, log=print) -> dict:
    """Runs every stage not done yet (module docstring); returns the pipeline record (``OUT/pipeline.json``).

    Raises:
      ConfigError: neither --images nor --data, or both; another pipeline holds ``out``.
      DataError: a missing or unreadable input; what a stage raises.
    """
    check(config)
    out = config.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock(out)
    lock.acquire(log)
    try:
        state = PipelineState(out)
        toml_config.save_config(out / runio.CONFIG_FILE, dataclasses.replace(config, config=None),
                          header="emcjax.pipeline resolved config; reuse with --config")
        start = time.perf_counter()
        plan = stages(config, out)
        next(plan)
        done = []
        stage = plan.send(state)
        while True:
            _run_stage(stage, state, str(len(done) + 1), log)
            done.append(stage.name)
            try:
                stage = plan.send(state)
            except StopIteration:
                break
        text = summary_text(state, done, time.perf_counter() - start)
        atomic_files.write_text_atomic(out / SUMMARY_FILE, text + "\n")
        log(text)
    finally:
        lock.release()
    return state.record


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> PipelineConfig:
    """``--config FILE.toml`` (if given) supplies the defaults, flags override."""
    import sys

    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = PipelineConfig()
    config_file = toml_config.config_argument(argv)
    if config_file is not None:
        default = toml_config.config_from_toml(PipelineConfig, config_file)
    return tyro.cli(PipelineConfig, prog="python -m emcjax.pipeline", args=argv, default=default,
                    description=__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> None:
    """``python -m emcjax.pipeline``: errors become one line and exit status 2 (``emcjax.cli``)."""
    cli.run_cli(lambda args: run(parse_args(args)), argv, "emcjax.pipeline")


if __name__ == "__main__":
    main()
