"""Model zoo (design.md, section 5): a registry of classifier specs and a loader that resolves their weights."""

from elgs.models.registry import (
    MODELS,
    LoadedModel,
    ModelSpec,
    WeightsUnavailableError,
    default_device,
    get_model_spec,
    imagenet_labels,
    load_model,
    model_names,
    resolve_weights_file,
)

__all__ = [
    "MODELS", "LoadedModel", "ModelSpec", "WeightsUnavailableError", "default_device", "get_model_spec",
    "imagenet_labels", "load_model", "model_names", "resolve_weights_file",
]
