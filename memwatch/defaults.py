"""The monitor's default settings, named once.

:class:`memwatch.MemorizationMonitor`, the demo, ``memwatch scan`` and the validation study read
these names instead of repeating the numbers. The detection defaults (noise levels relative to
the training data's own scale, thresholds) are the validation study's choice on its selection
seed (``docs/validation.md``); they hold for data at any scale.
"""

from __future__ import annotations

from memwatch.sharpness import SharpnessOptions

__all__ = [
    "ABSOLUTE_ONSET_THRESHOLD",
    "ABSOLUTE_SIGMAS",
    "ALARM_FALLBACK_PATIENCE",
    "ALARM_PATIENCE",
    "ALARM_THRESHOLD",
    "BUDGET",
    "CALIBRATION_CAPACITY",
    "CONFIRM_RATIO",
    "SIGMA_FACTORS",
    "SPECTRUM_EVERY_N_CHECKS",
    "SPECTRUM_PROBES",
    "EVERY_N_TRAIN_STEPS",
    "FIRST_CHECK",
    "LID_COUNT_THRESHOLD",
    "LID_RATIO_THRESHOLD",
    "LID_STATISTIC",
    "LOSS_GAP_SIGMAS",
    "LOSS_GAP_SIZE",
    "MIN_CHECK_STEPS",
    "MIN_VALID_FRACTION",
    "NUM_PROBES",
    "ONSET_ON",
    "ONSET_THRESHOLD",
    "PATIENCE",
    "REFERENCE_DATA",
    "SAMPLER_STEPS",
    "SCORE_THRESHOLD",
    "SHARPNESS",
    "SIGMAS",
    "STEPS_PER_SAMPLE",
]

EVERY_N_TRAIN_STEPS = "auto"  #: check cadence: "auto" = within BUDGET (memwatch.cadence), or optimizer steps
BUDGET = 0.03  #: the checks' share of training wall time with every_n_train_steps="auto"
STEPS_PER_SAMPLE = 15.0  #: the cadence's ceiling: steps per effective training sample between checks
FIRST_CHECK = 500  #: the first check's step with every_n_train_steps="auto" (the former fixed cadence)
MIN_CHECK_STEPS = 50  #: the cadence's floor: steps between checks
NUM_PROBES = 32  #: probes per check
SAMPLER_STEPS = 50  #: sampler steps per probe
SIGMAS = "auto"  #: evaluation noise levels: "auto" = SIGMA_FACTORS × the training data's median NN distance
ABSOLUTE_SIGMAS = (0.3,)  #: the former default σ_t (data units, for data in about [-1, 1]); the demo's levels
ABSOLUTE_ONSET_THRESHOLD = 0.2  #: the former default onset threshold, chosen with ABSOLUTE_SIGMAS; the demo's
SCORE_THRESHOLD = 0.9  #: a probe is memorized when its sharp fraction exceeds this
ONSET_THRESHOLD = 0.3  #: the other rules' onset: more than this share of the probes memorized ...
ONSET_ON = "auto"  #: the share the onset rule watches: the alarm (memwatch.signals.alarm; OnsetOptions.on)
ALARM_THRESHOLD = 0.05  #: the alarm's onset: more than this share of the probes flagged (study v4, selection seeds) ...
ALARM_PATIENCE = 1  #: ... at one check with training samples compared ...
ALARM_FALLBACK_PATIENCE = 2  #: ... at two in a row without (the trace tier's LID spikes at single checks: study v4)
CONFIRM_RATIO = 0.6  #: the alarm: an isolated peak counts when its d1/d2 to the training samples is below this
REFERENCE_DATA = "batches"  #: the probes are compared with the distinct training samples seen (in memory only)
PATIENCE = 2  #: ... at this many checks in a row
MIN_VALID_FRACTION = 0.5  #: a check with fewer finite probes than this share is a failed check
SIGMA_FACTORS = (0.1,)  #: with sigmas="auto": levels = these × the training set's median NN distance (study v2)
CALIBRATION_CAPACITY = 4096  #: with sigmas="auto": training samples kept in memory to measure that distance
LOSS_GAP_SIGMAS = (
    0.079,
    0.173,
    0.324,
    0.586,
    0.898,
)  #: with heldout_data: σ_t of the study's t = 20…400 (linear, T = 1000)
LID_STATISTIC = "relative"  #: the LID signal's per-probe ratio (memwatch.signals.options.STATISTICS)
LID_RATIO_THRESHOLD = 0.5  #: a probe is memorized when that ratio is below this
LID_COUNT_THRESHOLD = 3.0  #: with lid.statistic="count": ... when its LID is below this many dimensions (study v3)
LOSS_GAP_SIZE = 256  #: with heldout_data: samples per side of the loss gap
SPECTRUM_EVERY_N_CHECKS = 10  #: image scale (d > 384, method "auto"): a Lanczos spectrum every n-th check
SPECTRUM_PROBES = 2  #: probes (per process) the periodic Lanczos spectrum of the trace tier is measured on
SHARPNESS = SharpnessOptions()  #: spectrum settings (k, threshold τ, method, Lanczos sizes)
