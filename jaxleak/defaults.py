"""The defaults of every budget that decides a measure's numbers: one source for the library, the CLI and
the studies (docs/method.md section 9).

The library functions (:func:`jaxleak.vinfo.v_information`, :func:`jaxleak.subspace.subspace_distance`,
:func:`jaxleak.sensitivity.sensitivity`), the measure registry, :class:`jaxleak.monitor.LeakageMonitor`,
``jaxleak run`` and ``jaxleak study`` read them from here.
"""

from __future__ import annotations

# Hutchinson probes of the sensitivity estimator.
PROBES = 16
# Shuffles of z for the subspace distance's permutation null (max-T over layers: enough for any depth).
PERMUTATIONS = 100
# V-information reads at most this many features per layer: a wider layer is reduced to its top principal
# components over the victims' and the attacker's rows (the studies count-sketch their updates to it).
SKETCH_DIM = 1024
# Host memory (float32 values) for the per-example gradients V-information reads, all layers and rows: layers
# that fit come back whole, wider ones count-sketched to the width that fills it (vinfo.feature_width).
FEATURE_FLOATS = 2 ** 26
# V-information ensemble: full-batch Adam steps of the MLP members, early-stopping patience, folds of the attacker's
# cross-validation (or of cross-fitting without auxiliary data), bootstrap resamples (at least).
VINFO_STEPS = 150
VINFO_PATIENCE = 50
VINFO_FOLDS = 3
VINFO_BOOT = 1000
# Permutations of the victims' targets for V-information's detection test (max-T over layers).
VINFO_PERMUTATIONS = 1000
# L2 penalties of the attack members (mean loss + lambda/2 ||W||^2 on standardised features). The grid reaches
# lambda = 1: on weak signals in a few hundred auxiliary rows the selected penalty sits near 0.3 (benchmarks/calibration.py).
VINFO_WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
# White-box inversion member: victims (and auxiliary comparison rows) inverted, Adam steps.
INVERSION_N = 32
INVERSION_STEPS = 200
