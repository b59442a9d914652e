"""Inference on image files: ``spcxr predict`` (probabilities, lung masks, explanation maps)."""

from spcxr.inference.predict import (
    IMAGE_SUFFIXES,
    BatchPredictor,
    Decoded,
    LoadedModel,
    PredictConfig,
    PredictStats,
    Preprocessing,
    decode,
    expand_inputs,
    load_model,
    model_folder,
    predict,
    run_predict,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "BatchPredictor",
    "Decoded",
    "LoadedModel",
    "PredictConfig",
    "PredictStats",
    "Preprocessing",
    "decode",
    "expand_inputs",
    "load_model",
    "model_folder",
    "predict",
    "run_predict",
]
