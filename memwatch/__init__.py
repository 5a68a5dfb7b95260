"""memwatch: detect memorization in diffusion models while they train.

A memorized sample sits on an isolated sharp peak of the learned density (Jeon, Kim & No,
ICML 2025): every eigenvalue of the Hessian of log p_t there is ≈ -1/σ_t². memwatch measures that
spectrum on probes drawn from the model under training and raises the alarm at onset.
"""

from memwatch.callback import CheckResult, MemorizationMonitor
from memwatch.conditional import ConditionalResult, conditional_metrics
from memwatch.groundtruth import MEMORIZED_RATIO, median_nn_distance, nearest_neighbours, nn_ratio
from memwatch.sampling import Trajectory, sample, sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import SharpnessResult, measure_sharpness

__all__ = [
    "MEMORIZED_RATIO",
    "CheckResult",
    "ConditionalResult",
    "DiffusionScore",
    "MemorizationMonitor",
    "NoiseSchedule",
    "SharpnessResult",
    "Trajectory",
    "conditional_metrics",
    "measure_sharpness",
    "median_nn_distance",
    "nearest_neighbours",
    "nn_ratio",
    "sample",
    "sample_trajectory",
]
__version__ = "0.1.0"
