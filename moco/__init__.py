"""MoCo v1/v2 pretraining, frozen encoder export, and feature evaluation (kNN, linear probe)."""

from moco.augment import TwoCropsTransform, eval_transform, moco_transform
from moco.data import IMAGE_EXTENSIONS, ImageError, ImageFiles, list_images, load_image
from moco.encoders import ENCODERS, build_encoder, feature_dim
from moco.export import (
    CheckpointError,
    EncoderConfig,
    export_encoder,
    load_encoder,
    read_encoder_config,
    save_encoder,
)
from moco.loss import info_nce, moco_logits, topk_accuracy
from moco.model import MoCo, ModelConfig

__all__ = [
    "ENCODERS",
    "IMAGE_EXTENSIONS",
    "CheckpointError",
    "EncoderConfig",
    "ImageError",
    "ImageFiles",
    "MoCo",
    "ModelConfig",
    "TwoCropsTransform",
    "build_encoder",
    "eval_transform",
    "export_encoder",
    "feature_dim",
    "info_nce",
    "list_images",
    "load_encoder",
    "load_image",
    "moco_logits",
    "moco_transform",
    "read_encoder_config",
    "save_encoder",
    "topk_accuracy",
]
