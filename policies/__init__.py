"""Policies as code: what kfloop does when (the automation table), typed and validated."""

from kfloop.policies.spec import (
    DEFAULT_POLICY_PATH,
    AccuracyPolicy,
    ForestGrid,
    Policy,
    RetrainingPolicy,
    RolloutPolicy,
    ScalingPolicy,
    ScalingRule,
    TrainingPolicy,
    duration_seconds,
    load_policy,
)

__all__ = [
    "DEFAULT_POLICY_PATH",
    "AccuracyPolicy",
    "ForestGrid",
    "Policy",
    "RetrainingPolicy",
    "RolloutPolicy",
    "ScalingPolicy",
    "ScalingRule",
    "TrainingPolicy",
    "duration_seconds",
    "load_policy",
]
