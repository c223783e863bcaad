"""Merging statistics and a resolution estimate from two half sets:
``python -m emcjax.resolution --half-a DIR_A --half-b DIR_B --out DIR``.

Reads two independent half-set runs (``python -m emcjax.lowres --half a|b``), puts half b on half a's scale,
merges them (mean), estimates sigma(I) from their scatter (emcjax.merge.sigma), and computes per
resolution shell CC1/2, CC*, Rsplit, completeness, multiplicity and <I/sigma(I)> (emcjax.merge.stats), with
the correlation to the truth when the data set carries one. Writes into ``--out``: ``merged.h5`` (the
merged intensities for ``python -m emcjax.export``), ``merging_stats.csv``, ``merging_table.txt`` and
``figures/merging.png``; prints the table and the suggested high-resolution limit.
"""

from __future__ import annotations

import dataclasses
import pathlib

import h5py
import numpy as np

from emcjax import atomic_files, cli
from emcjax.crystal import Crystal
from emcjax.errors import ConfigError, DataError
from emcjax.merge import observe
from emcjax.merge import sigma as sigma_lib
from emcjax.merge import stats as stats_lib
from emcjax.merge.rundata import RunData, load_run
from emcjax.scoring import values_by_hkl

MERGED_FILE = "merged.h5"


@dataclasses.dataclass(frozen=True)
class ResolutionConfig(stats_lib.MergingOptions):
    """Half-set merging statistics."""

    half_a: pathlib.Path
    """Run directory of half a."""
    half_b: pathlib.Path
    """Run directory of half b."""
    out: pathlib.Path = pathlib.Path("runs/merged")
    """Directory for merged.h5, merging_stats.csv, merging_table.txt and figures/merging.png."""


def _check_pair(a: RunData, b: RunData) -> None:
    if not np.allclose(a.crystal.cell, b.crystal.cell, rtol=1e-5):
        raise ConfigError(
            f"half sets have different cells: {a.path} {a.crystal.cell} vs {b.path} {b.crystal.cell}; "
            "both halves must come from one data set"
        )
    sg_a, sg_b = a.crystal.gemmi_space_group.hm, b.crystal.gemmi_space_group.hm
    if sg_a != sg_b:
        raise ConfigError(f"half sets have different space groups: {a.path} {sg_a} vs {b.path} {sg_b}")
    if not np.array_equal(a.result.hkl, b.result.hkl):
        raise ConfigError(
            f"half sets hold different reflections ({a.result.hkl.shape[0]} in {a.path}, {b.result.hkl.shape[0]} in "
            f"{b.path}): run both with the same resolution and --emc.vn/--emc.gw"
        )


def _observations(run: RunData) -> np.ndarray:
    used = (run.weights() > 0) & (run.iteration["phi"] > 0)
    return observe.observations(run.grid, run.detector, run.quaternions(run.iteration["best_rotation"]), used)


def _true_integrated(run: RunData) -> np.ndarray | None:
    """(n_unique,) the truth's integrated intensities of the run's reflections, NaN for those the truth lacks
    (e.g. simulated to a lower resolution); None without a truth."""
    truth = run.truth
    if truth is None or "intensity" not in truth or "hkl" not in truth:
        return None
    return values_by_hkl(run.result.hkl, truth["hkl"], np.asarray(truth["intensity"], np.float64).sum(axis=1))


def merge_halves(config: ResolutionConfig, log=print) -> dict:
    """Computes and writes everything; returns a summary (suggested d_min, criterion, overall statistics)."""
    a, b = load_run(config.half_a), load_run(config.half_b)
    _check_pair(a, b)
    crystal: Crystal = a.crystal
    hkl = a.result.hkl
    q = np.linalg.norm(hkl @ crystal.reciprocal_basis.T, axis=1)
    log(f"half a: {config.half_a} ({int(np.sum(a.weights() > 0))} frames), half b: {config.half_b} "
        f"({int(np.sum(b.weights() > 0))} frames)")
    n_obs_a, n_obs_b = _observations(a), _observations(b)
    both = (n_obs_a > 0) & (n_obs_b > 0)
    if both.sum() < 3:
        raise DataError(f"only {int(both.sum())} reflections are observed in both halves; nothing to compare")
    i_a = a.result.integrated.astype(np.float64)
    scale_b = sigma_lib.common_scale(i_a[both], b.result.integrated[both])
    i_b = b.result.integrated.astype(np.float64) * scale_b

    # completeness relative to every allowed unique reflection whose whole peak sphere lies inside the
    # detector's resolution range (the reflections the model holds)
    possible_q = q
    edges = stats_lib.equal_volume_edges(float(possible_q.min()), float(possible_q.max()), config.n_shells)
    shell = np.where(both, stats_lib.shell_of(q, edges), -1)
    classes = sigma_lib.reflection_classes(sigma_lib.stabilizer_order(crystal.laue_ops, hkl[both]))
    sigma, params = sigma_lib.half_set_sigma(i_a[both], i_b[both], shell[both], classes=classes)
    sigma_all = np.full(q.shape, np.nan)
    sigma_all[both] = sigma
    i_true = _true_integrated(a)
    truth_note = ""
    if i_true is not None and not np.isfinite(i_true[both]).all():
        missing = int(np.sum(~np.isfinite(i_true[both])))
        truth_note = (f"the truth lacks {missing} of the {int(both.sum())} merged reflections: "
                      "cc_true, sd(z) and mad(z) are over the others")
        if missing == both.sum():
            i_true = None
    n_obs = np.where(both, n_obs_a + n_obs_b, 0)
    pick = lambda x: None if x is None else x[both]  # noqa: E731
    stats = stats_lib.merging_statistics(
        q[both], i_a[both], i_b[both], sigma, n_obs[both], possible_q, edges=edges, i_true=pick(i_true)
    )
    d_suggested, criterion = stats_lib.suggest_resolution(stats, config.cc_half_limit, config.significance)

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    merged = 0.5 * (i_a + i_b)
    with atomic_files.atomic_path(out / MERGED_FILE) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "emcjax-merged"
            f.attrs["cell"] = np.asarray(crystal.cell)
            f.attrs["space_group"] = crystal.space_group
            f.attrs["wavelength_A"] = float(a.detector.geometry.wavelength_A)
            f.attrs["half_a_run"] = str(config.half_a)
            f.attrs["half_b_run"] = str(config.half_b)
            f.attrs["scale_b"] = scale_b
            f.attrs["d_suggested"] = np.nan if d_suggested is None else d_suggested
            f.attrs["criterion"] = criterion
            f.attrs["sigma_model"] = (
                "r_class * (a_shell + b_shell * max(I, 0)) fitted to (I_a - I_b)^2 / 4, classes by stabilizer order "
                "(emcjax.merge.sigma)"
            )
            for name, value in (
                ("hkl", hkl[both].astype(np.int32)),
                ("intensity", merged[both]),
                ("sigma", sigma),
                ("half_a", i_a[both]),
                ("half_b", i_b[both]),
                ("n_obs", n_obs[both]),
                ("sigma_model_params", params),
                ("shell_edges_q", edges),
            ):
                f.create_dataset(name, data=value)
    table = stats_lib.format_table(stats, significance=config.significance)
    atomic_files.write_text_atomic(out / "merging_stats.csv", stats_lib.to_csv(stats))
    suggestion = (
        f"suggested high-resolution limit: {d_suggested:.2f} Å ({criterion})"
        if d_suggested is not None
        else f"no shell passes ({criterion})"
    )
    if truth_note:
        table += "\n" + truth_note
    atomic_files.write_text_atomic(out / "merging_table.txt", table + "\n" + suggestion + "\n")
    stats_lib.plot(stats, out / "figures" / "merging.png", d_suggested)
    log(table)
    log(suggestion)
    log(f"wrote {out / MERGED_FILE} ({int(both.sum())} unique reflections), merging_stats.csv, merging_table.txt, "
        "figures/merging.png")
    return {"d_suggested": d_suggested, "criterion": criterion, "stats": stats, "scale_b": scale_b}


def read_merged(directory: pathlib.Path) -> dict:
    """The arrays and attributes of ``directory/merged.h5``; DataError when missing."""
    path = pathlib.Path(directory) / MERGED_FILE
    if not pathlib.Path(directory).is_dir():
        raise DataError(f"{directory} does not exist")
    if not path.exists():
        raise DataError(
            f"{directory} holds no {MERGED_FILE} (merged intensities with sigma(I)); make it with "
            f"python -m emcjax.resolution --half-a RUN_A --half-b RUN_B --out {directory}"
        )
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "emcjax-merged":
                raise DataError(f"{path}: attribute format is {f.attrs.get('format')!r}, expected 'emcjax-merged'")
            out = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            out.update({name: f[name][()] for name in f})
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file: {err}") from None
    return out


def run(config: ResolutionConfig, log=print):
    """The stage as a function (for emcjax.pipeline and scripts): the same as :func:`merge_halves`."""
    return merge_halves(config, log=log)


main = cli.stage_main(ResolutionConfig, merge_halves, "emcjax.resolution", __doc__)


if __name__ == "__main__":
    main()
