"""memwatch: detect memorization in diffusion models while they train.

A memorized sample sits on an isolated sharp peak of the learned density (Jeon, Kim & No,
ICML 2025): every eigenvalue of the Hessian of log p_t there is ≈ -1/σ_t². memwatch measures that
spectrum on probes drawn from the model under training and raises the alarm at onset.
"""

from memwatch.attribution import CopiedItem, copied_items
from memwatch.cadence import CadenceOptions
from memwatch.callback import CheckResult, MemorizationMonitor
from memwatch.collective import Collective
from memwatch.conditional import ConditionalResult, conditional_metrics
from memwatch.discovery import diffusers_score
from memwatch.errors import MemwatchError
from memwatch.groundtruth import MEMORIZED_RATIO, median_nn_distance, nearest_neighbours, nn_ratio
from memwatch.index import IndexOptions
from memwatch.keepers import FileKeeper, Keeper
from memwatch.lid import LidReading
from memwatch.loggers import MonitorLogger
from memwatch.monitor import Monitor
from memwatch.options import (
    CheckpointOptions,
    DataOptions,
    MemwatchDeprecationWarning,
    OnsetOptions,
    ProbeOptions,
    ReportOptions,
)
from memwatch.probes import ProbeMeasurement, ProbeSet, evaluation_timesteps, isolated
from memwatch.sampling import ProbeSampler, Trajectory, sample, sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import SharpnessOptions, SharpnessResult, hessian_score_norm, measure_sharpness
from memwatch.signals import CopyOptions, LidOptions, LossGapOptions, SharpnessCheckOptions
from memwatch.transformer_score import TransformerScore, joint_condition

__all__ = [
    "MEMORIZED_RATIO",
    "CadenceOptions",
    "CheckResult",
    "CheckpointOptions",
    "Collective",
    "ConditionalResult",
    "CopiedItem",
    "CopyOptions",
    "DataOptions",
    "DiffusionScore",
    "FileKeeper",
    "IndexOptions",
    "Keeper",
    "LidOptions",
    "LidReading",
    "LossGapOptions",
    "MemorizationMonitor",
    "MemwatchDeprecationWarning",
    "MemwatchError",
    "Monitor",
    "MonitorLogger",
    "NoiseSchedule",
    "OnsetOptions",
    "ProbeMeasurement",
    "ProbeSampler",
    "ProbeOptions",
    "ProbeSet",
    "ReportOptions",
    "SharpnessCheckOptions",
    "SharpnessOptions",
    "SharpnessResult",
    "Trajectory",
    "TransformerScore",
    "conditional_metrics",
    "copied_items",
    "diffusers_score",
    "evaluation_timesteps",
    "hessian_score_norm",
    "joint_condition",
    "isolated",
    "measure_sharpness",
    "median_nn_distance",
    "nearest_neighbours",
    "nn_ratio",
    "sample",
    "sample_trajectory",
]
__version__ = "0.2.0"
