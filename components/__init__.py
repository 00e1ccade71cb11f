"""KFP v2 lightweight components: thin wrappers over kfloop's step functions."""

from kfloop.components.training import DEFAULT_IMAGE, TrainingComponents, build_training_components

__all__ = ["DEFAULT_IMAGE", "TrainingComponents", "build_training_components"]
