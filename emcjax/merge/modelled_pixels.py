"""The pixels where every Bragg photon falls in a peak the model holds (frame rejection's photon and evidence tests).

The model grid keeps a reflection only if its whole peak sphere (radius rho = ``grid.radius``) lies in
[q_min, q_max] (the reference's non-partial rule, emcjax.model.grid), while the run's valid pixels reach
q_max. A reflection left out at the edge has its centre within rho of q_min or q_max, so its photons land on
pixels with |q| in [q_min, q_min + 2 rho) or (q_max - 2 rho, q_max], outside every predicted peak, at any
orientation. Bright frames put tens of photons there (the tutorial, Wilson B 40 Å² to d_min 6 Å: 16 % of a
good frame's Bragg photons on the valid pixels, none elsewhere, even at the true orientation); where the
background is ~0.01 photons per pixel another orientation's peaks collect them and win the second-crystal
test (docs/BENCHMARKS.md). The tests therefore look only at the pixels with |q| in
[q_min + 2 rho, q_max - 2 rho], where a photon is either background or in a peak of a reflection the model holds.
"""

from __future__ import annotations

from emcjax.detector import Detector


def modelled_detector(grid, detector: Detector) -> Detector:
    """The valid pixels of ``detector`` with ``grid.q_min + 2 rho <= |q| <= grid.q_max - 2 rho`` (rho =
    ``grid.radius``, 1/Å): no reflection the grid leaves out at its resolution limits has a peak there.
    Order, shells, polarization and geometry are kept (a subset of the pixel list)."""
    reach = 2.0 * float(grid.radius)
    keep = (detector.q_norm >= grid.q_min + reach) & (detector.q_norm <= grid.q_max - reach)
    return Detector(q=detector.q[keep], polarization=detector.polarization[keep], shell=detector.shell[keep],
                    pixel_id=detector.pixel_id[keep], geometry=detector.geometry)
