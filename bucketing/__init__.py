"""aspect-bucketing: one import root for the whole library.

The core (scan sources into an ``ImageIndex``, bucket ladders, assignment without
upscaling) loads eagerly and needs no torch. Everything else (the sampler, the transforms,
the dataset, builders, config files and the encoder cache) is exported here too and imported
on first use, so that ``import bucketing.assign`` never pulls in torch.
"""

import importlib
from typing import Any

from bucketing.siblings import check_siblings

check_siblings()

from bucketing.assign import Assignment, assign  # noqa: E402
from bucketing.index import ImageIndex, Rejection  # noqa: E402
from bucketing.ladder import BucketLadder, fitted_ladder  # noqa: E402
from bucketing.scan import scan  # noqa: E402
from bucketing.sources import resolve_source  # noqa: E402

# Public names of the upper floors: name -> module. Imported on first use.
_LAZY_MODULES = {
    "samplers": (
        "BatchingRule", "BucketBatchSampler", "SampleBatch", "SampleIndex", "bucket_batch_sampler",
        "load_loader_state",
    ),
    "transforms": (
        "BucketResizeCrop", "CaptionTransform", "DecodeSettings", "DecodedImageCache",
        "FitParams", "FluxEncoders",
        "FluxTokenizer", "decode_and_fit", "decode_image",
        "PromptTokenizer", "SD3Encoders", "SD3Tokenizer", "SD15Tokenizer", "SDXLEncoders",
        "SDXLTokenizer", "collate", "flux_image_ids", "flux_time_shift_mu", "load_image",
        "loss_weight_for", "pack_latents", "sdxl_add_time_ids", "shift_timesteps",
        "to_model_input", "tokenizer_for_model", "unpack_latents", "DiffusersCollate",
        "diffusers_batch",
    ),
    "bucketing.pipeline.dataset": ("TextToImageDataset",),
    "bucketing.pipeline.encoder_cache": ("EncoderCache", "build_cache"),
    "bucketing.pipeline.builders": ("MixedDataset", "text_to_image_dataset"),
    "bucketing.pipeline.config": ("from_config", "load_config"),
    "bucketing.pipeline.spec": ("ConfigError", "Spec"),
    "bucketing.pipeline.stream": ("StreamingBucketDataset", "in_lockstep"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}


__all__ = [
    "Assignment", "BatchingRule", "BucketBatchSampler", "BucketLadder", "BucketResizeCrop",
    "CaptionTransform", "ConfigError", "DecodeSettings", "DecodedImageCache", "EncoderCache",
    "FitParams", "FluxEncoders", "FluxTokenizer",
    "ImageIndex", "MixedDataset", "PromptTokenizer", "Rejection", "SD15Tokenizer",
    "SD3Encoders", "SD3Tokenizer", "SDXLEncoders", "SDXLTokenizer", "SampleBatch", "SampleIndex",
    "Spec", "StreamingBucketDataset", "TextToImageDataset", "assign", "bucket_batch_sampler",
    "build_cache", "collate",
    "decode_and_fit", "decode_image", "fitted_ladder",
    "flux_image_ids", "flux_time_shift_mu", "from_config", "in_lockstep", "load_config",
    "load_image", "load_loader_state", "loss_weight_for",
    "pack_latents", "resolve_source", "scan", "sdxl_add_time_ids", "shift_timesteps",
    "text_to_image_dataset", "to_model_input", "tokenizer_for_model", "unpack_latents",
    "DiffusersCollate", "diffusers_batch",
]


def __getattr__(name: str) -> Any:
    """Import a name of the sampler, transforms or composition floors on first use."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bucketing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
