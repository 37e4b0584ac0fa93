"""The training core: one loop, hard or soft targets, pluggable gradient step and
sampler, CPU or CUDA. See :class:`Trainer`; its loop body, :func:`train_steps`, also
trains stacked models (:mod:`labeldp.train.ensemble`)."""

from .config import SGDConfig, TrainConfig
from .core import Optimization, train_steps
from .device import autocast_for, device_description, resolve_device
from .ema import WeightAverage
from .loop import FitResult, Trainer, accuracy, predict_logits
from .sampling import BatchSampler, ShuffledBatches
from .schedule import learning_rate
from .steps import BackpropStep, GradientStep, StepOutput
from .targets import HardLabels, TargetFn, target_classes, target_loss

__all__ = [
    "BackpropStep",
    "BatchSampler",
    "FitResult",
    "GradientStep",
    "HardLabels",
    "Optimization",
    "SGDConfig",
    "ShuffledBatches",
    "StepOutput",
    "TargetFn",
    "TrainConfig",
    "Trainer",
    "WeightAverage",
    "accuracy",
    "autocast_for",
    "device_description",
    "learning_rate",
    "predict_logits",
    "resolve_device",
    "target_classes",
    "target_loss",
    "train_steps",
]
