"""Caption data: dataset loaders (Karpathy splits, COCO captions, Flickr8k's own text files), the vocabulary, and the
synthetic shapes-scene generator the default model is trained on. No torch here."""

from .coco import load_coco_captions
from .errors import DatasetError
from .flickr8k import find_flickr8k, load_flickr8k
from .karpathy import CaptionDataset, Example, check_images, load_karpathy, tokenize
from .scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    attribute_accuracy,
    caption_objects,
    generate_scenes,
    render_scene,
    scene_captions,
)
from .vocab import SPECIAL_TOKENS, Vocabulary

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "SPECIAL_TOKENS",
    "CaptionDataset",
    "DatasetError",
    "Example",
    "Vocabulary",
    "attribute_accuracy",
    "caption_objects",
    "check_images",
    "find_flickr8k",
    "generate_scenes",
    "load_coco_captions",
    "load_flickr8k",
    "load_karpathy",
    "render_scene",
    "scene_captions",
    "tokenize",
]
