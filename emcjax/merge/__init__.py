"""After a reconstruction: frame rejection (reject), half sets (halves), sigma(I) (sigma), merging
statistics and the resolution estimate (stats), per-frame predictions (observe) and run-directory reading
(rundata)."""
