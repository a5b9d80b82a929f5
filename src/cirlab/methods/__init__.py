"""Methods and baselines, registered by name; all answer the `CIRModel` interface."""
from cirlab.methods import baselines, caption_compose, csmcir, mapcompose, tmcir  # noqa: F401  (registers the built-in methods)
from cirlab.methods.base import (REGISTRY, CIRModel, TrainingKind, build_model, checkpoint_identity, load_model,
                                 method_class, register)

__all__ = ["REGISTRY", "CIRModel", "TrainingKind", "build_model", "checkpoint_identity", "load_model", "method_class",
           "register"]
