"""The signals a check is made of, one module each (see :mod:`memwatch.signals.base` for the hooks).

==================  =====================================================================
signal              what it logs under ``memwatch/``
==================  =====================================================================
``calibration``     nothing: fixes the noise levels of ``sigmas="auto"`` at the first check
``copies``          ``nn_memorized_fraction``, ``auroc``, ``flagged_fraction`` (via the
                    sharpness summary) and the copied-items table (with ``reference_data``)
``sharpness``       ``sharp_fraction_mean``, ``lid_mean``, ``lambda_min``,
                    ``normalized_eig_mean``, ``memorized_fraction``, ``nonfinite_count``,
                    the same per timestep as ``t{t}/…``, ``hessian_score_norm_mean``,
                    ``out_of_range_count``
``lid``             ``lid_memorized_fraction``, ``lid/data_lid``, ``lid/flipd``,
                    ``lid/denoising_lid``, ``lid/clamped_count`` and the medians of the
                    per-probe statistics ``lid/relative`` … (always)
``conditional``     ``cond/{c}/…`` and ``most_memorized_condition`` (with ``probes.conditions``)
``loss_gap``        ``loss_train``, ``loss_heldout``, ``loss_gap`` (with ``loss_gap.heldout_data``)
``consistency``     nothing: at the first check, whether the prediction type and schedule fit
                    the network; when they do not, every value is NaN from then on
==================  =====================================================================

A new signal is a subclass of :class:`Signal` in a module of its own with a
``build(context: SignalContext)`` factory, and one line in :mod:`memwatch.signals.registry`.
"""

from memwatch.signals.base import Draft, Run, Signal
from memwatch.signals.calibration import CalibrationSignal
from memwatch.signals.conditional import ConditionalSignal
from memwatch.signals.consistency import ConsistencySignal
from memwatch.signals.context import SignalContext
from memwatch.signals.copies import CopyOptions, CopySignal
from memwatch.signals.lid import LidOptions, LidSignal
from memwatch.signals.lossgap import LossGapOptions, LossGapSignal
from memwatch.signals.sharpness import SharpnessCheckOptions, SharpnessSignal

__all__ = [
    "CalibrationSignal",
    "ConditionalSignal",
    "ConsistencySignal",
    "CopyOptions",
    "CopySignal",
    "Draft",
    "LidOptions",
    "LidSignal",
    "LossGapOptions",
    "LossGapSignal",
    "Run",
    "SharpnessCheckOptions",
    "SharpnessSignal",
    "Signal",
    "SignalContext",
]
