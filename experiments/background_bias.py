"""Bias of the reduced per-frame radial background against the simulator's truth, and where it comes from.

Renders the tutorial's image set (docs/TUTORIAL.md: 96 x 96 pixels, ~1000 Bragg photons per frame, a
2000-photon powder ring at 0.05 1/Å) at several dense-background levels, reduces every frame as
``python -m emcjax.reduce`` does (the tutorial's settings: 100 shells to 4 Å, single-pixel spots) and
compares, per frame, the background photons the reduction predicts on its used pixels (valid, live, shell
not excluded), sum B(s_t) pol_t, with the truth there: level_d x pattern_t plus the ring's photons (a ring
left in is radially symmetric background here). Of the excess, 'leaked Bragg' is the truth's Bragg photons
on the pixels the estimator keeps (not an outlier or an outlier's neighbour, count <= its clip level, and
the neighbour test if on), times used/kept polarization of their shell (the estimate is a rate over the
kept pixels, applied to all used ones).

``PYTHONPATH=$PWD python experiments/background_bias.py [--quick] [--neighbour-quantile 0.9]`` prints one
line per level and frame kind; numbers in docs/METHOD-NOTES.md (data reduction, background estimator).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import tempfile

import numpy as np

from emcjax.detector import DetectorGeometry
from emcjax.frontend import background as bg_lib
from emcjax.frontend import reduce as reduce_lib
from emcjax.frontend import simulate_images as si
from emcjax.frontend.mask import MaskConfig, static_mask
from emcjax.simulate import SimulationConfig

SIM_GEOMETRY = DetectorGeometry(num_rows=96, num_cols=96, pixel_size_m=1.8e-3, distance_m=0.3,
                                beam_center_px=(47.5, 47.5), resolution_max_A=4.5, n_shells=20)
REDUCE_GEOMETRY = dataclasses.replace(SIM_GEOMETRY, n_shells=100, resolution_max_A=4.0)  # reduce's defaults


def images_config(background: float, n_frames: int, seed: int) -> si.ImageSimulationConfig:
    """The tutorial's simulation with ``background`` photons per pixel at pol = 1 (before the radial profile)."""
    sim = SimulationConfig(n_frames=n_frames, orientations="uniform", cell=(36.0, 36.0, 30.0, 90.0, 90.0, 90.0),
                           vn=5, profile_width=0.8, wilson_b=40.0, bragg_photons=1000.0, blank_fraction=0.1,
                           multi_fraction=0.05, geometry=SIM_GEOMETRY, rotation_n=0, background_photons=0.0,
                           seed=seed)
    return si.ImageSimulationConfig(simulation=sim, background_per_pixel=background, module_size=48, ring_q=0.05)


def measure(background: float, n_frames: int, seed: int = 0, **reduce_settings) -> dict[str, np.ndarray]:
    """Per-frame photons on the used pixels: 'estimated', 'true', 'leaked', and 'kind' (0 one
    crystal, 1 blank, 2 two crystals); ``reduce_settings``: ReduceConfig fields."""
    config = images_config(background, n_frames, seed)
    frames, truth, images = si.render(config)
    images = list(images)
    _, shadow, _ = si.static_layout(config)
    with tempfile.TemporaryDirectory() as tmp:
        mask_file = pathlib.Path(tmp) / "shadow_mask.npy"
        np.save(mask_file, shadow)
        mask_config = MaskConfig(file=mask_file)
        mask, _ = static_mask(images[:mask_config.frames], REDUCE_GEOMETRY, mask_config, config.saturation)
    tables = bg_lib.radial_tables(REDUCE_GEOMETRY, mask)
    det = tables.detector
    n_shells = REDUCE_GEOMETRY.n_shells
    reduce_config = reduce_lib.ReduceConfig(geometry=REDUCE_GEOMETRY, min_spot_pixels=1, **reduce_settings)
    valid_index = np.full(REDUCE_GEOMETRY.num_pixels, -1)
    valid_index[det.pixel_id] = np.arange(det.n_pix)
    pattern = truth["background_pattern"].ravel()[det.pixel_id]
    ring_pattern = truth["ring_pattern"].ravel()[det.pixel_id]
    out = {key: np.zeros(n_frames) for key in ("estimated", "true", "leaked")}
    for d, image in enumerate(images):
        reduced = reduce_lib.reduce_frame(image, tables, reduce_config, config.saturation)
        k = image.ravel()[det.pixel_id].astype(np.float64)
        used = (reduced.background[det.shell] >= 0) & ~np.isin(det.pixel_id, reduced.dead) & (k >= 0)
        lam = np.maximum(reduced.background[det.shell], 0) * det.polarization
        outlier = k > bg_lib.poisson_threshold(lam, reduce_config.quantile)
        cap = np.maximum(bg_lib.poisson_threshold(lam, reduce_config.clip_quantile), 1)
        kept = used & ~bg_lib._dilate(outlier, tables) & (k <= cap)
        if reduce_config.neighbour_quantile is not None:
            neighbours = bg_lib._neighbour_sum(np.where(used, k, 0), tables)
            neighbour_mean = bg_lib._neighbour_sum(np.where(used, lam, 0), tables)
            kept &= neighbours <= bg_lib.poisson_threshold(neighbour_mean, reduce_config.neighbour_quantile)
        pol_used = np.bincount(det.shell, np.where(used, det.polarization, 0), n_shells)
        pol_kept = np.bincount(det.shell, np.where(kept, det.polarization, 0), n_shells)
        scale = np.divide(pol_used, pol_kept, out=np.zeros(n_shells), where=pol_kept > 0)[det.shell]
        a, b = frames.photon_offsets[d], frames.photon_offsets[d + 1]
        bragg = np.zeros(det.n_pix)
        where = valid_index[frames.photon_pixels[a:b]]
        np.add.at(bragg, where[where >= 0], frames.photon_counts[a:b][where >= 0])
        out["estimated"][d] = (reduced.background[det.shell] * det.polarization)[used].sum()
        out["true"][d] = (truth["background_level"][d] * pattern + truth["ring_level"][d] * ring_pattern)[used].sum()
        out["leaked"][d] = (bragg * scale)[kept].sum()
    out["kind"] = truth["frame_kind"]
    return out


def main(argv: list[str] | None = None) -> dict[float, dict[str, np.ndarray]]:
    """Prints the table; returns the measurements per level."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one level, 10 frames")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--neighbour-quantile", type=float, default=None,
                        help="reduce's --neighbour-quantile (default None: no neighbour test, as reduce)")
    args = parser.parse_args(argv)
    levels, n_frames = ((0.05,), 10) if args.quick else ((0.01, 0.05, 0.3), args.frames)
    print(f"level: background photons per pixel at pol = 1; photons per frame on the used pixels "
          f"(neighbour quantile {args.neighbour_quantile})")
    results = {}
    for level in levels:
        m = results[level] = measure(level, n_frames, neighbour_quantile=args.neighbour_quantile)
        for name, sel in (("one crystal", m["kind"] == 0), ("blank", m["kind"] == 1), ("all", m["kind"] >= 0)):
            if not sel.any():
                continue
            est, true = m["estimated"][sel].mean(), m["true"][sel].mean()
            print(f"level {level:5.2f} {name:11s} ({sel.sum():3d} frames): estimated {est:7.1f} true {true:7.1f} "
                  f"ratio {est / true:5.2f}; excess {est - true:6.1f} = leaked Bragg {m['leaked'][sel].mean():6.1f} "
                  f"+ rest {est - true - m['leaked'][sel].mean():6.1f}")
    return results


if __name__ == "__main__":
    main()
