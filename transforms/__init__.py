"""What the model receives: decode, fit to the bucket, caption, tokenize, collate."""

from transforms.caption import CaptionTransform
from transforms.collate import collate, to_model_input
from transforms.encoders import FluxEncoders, SD3Encoders, SDXLEncoders
from transforms.image import load_image
from transforms.resize_crop import BucketResizeCrop
from transforms.tokenize import FluxTokenizer, flux_image_ids

__all__ = [
    "BucketResizeCrop",
    "CaptionTransform",
    "FluxEncoders",
    "FluxTokenizer",
    "SD3Encoders",
    "SDXLEncoders",
    "collate",
    "flux_image_ids",
    "load_image",
    "to_model_input",
]
