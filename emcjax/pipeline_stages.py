"""The stages of ``python -m emcjax.pipeline``: :class:`Stage` (inputs, settings, products and the call that makes
them) and one builder per stage (reduce, orient, the EMC runs, reject, highres, resolution, export);
:func:`stages` yields them in order, each built once those before it are done."""

from __future__ import annotations

import dataclasses
import pathlib

import h5py
import numpy as np

from emcjax import runio, toml_config
from emcjax.errors import DataError
from emcjax.frontend.reduce import ReduceConfig
from emcjax.pipeline_config import PipelineConfig
from emcjax.pipeline_state import PipelineState


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
                                       photon_test=config.reject.photon_test,
                                       evidence_test=config.reject.evidence_test, drop=config.reject.drop)
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
# The stages in order


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
