"""What the model receives: decode, fit to the bucket, caption, tokenize, collate."""

from transforms.caption import CaptionTransform
from transforms.collate import collate, to_model_input
from transforms.decoded_cache import DecodedImageCache
from transforms.diffusers_scripts import DiffusersCollate, diffusers_batch
from transforms.encoders import FluxEncoders, SD3Encoders, SDXLEncoders
from transforms.image import DecodeSettings, decode_image, load_image
from transforms.paired import loss_weight_for
from transforms.resize_crop import BucketResizeCrop, FitParams, decode_and_fit
from transforms.tokenize import (
    FluxTokenizer,
    PromptTokenizer,
    SD3Tokenizer,
    SD15Tokenizer,
    SDXLTokenizer,
    flux_image_ids,
    flux_time_shift_mu,
    pack_latents,
    sdxl_add_time_ids,
    shift_timesteps,
    tokenizer_for_model,
    unpack_latents,
)

__all__ = [
    "BucketResizeCrop",
    "CaptionTransform",
    "DecodeSettings",
    "DecodedImageCache",
    "DiffusersCollate",
    "FitParams",
    "FluxEncoders",
    "FluxTokenizer",
    "SD3Encoders",
    "SDXLEncoders",
    "PromptTokenizer",
    "SD3Tokenizer",
    "SD15Tokenizer",
    "SDXLTokenizer",
    "collate",
    "decode_and_fit",
    "decode_image",
    "diffusers_batch",
    "flux_image_ids",
    "flux_time_shift_mu",
    "load_image",
    "loss_weight_for",
    "pack_latents",
    "sdxl_add_time_ids",
    "shift_timesteps",
    "to_model_input",
    "tokenizer_for_model",
    "unpack_latents",
]
