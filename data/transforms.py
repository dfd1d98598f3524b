"""Image transforms: resize to a square, random horizontal flip when training, normalisation with the
backbone's mean and std (ImageNet's for the paper's backbones, CLIP's own for CLIP; Preprocessing)."""
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's images are prepared (its pretrained weights' own configuration): resized to a
    size x size square with `interpolation`, scaled to [0, 1], normalised with `mean` and `std`."""
    size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"


def as_preprocessing(value):
    """A Preprocessing, from itself or from an input side alone (ImageNet normalisation, bilinear)."""
    return value if isinstance(value, Preprocessing) else Preprocessing(int(value))


def resize_steps(preprocessing):
    """PIL image -> uint8 (3, S, S) tensor; the image cache stores exactly this."""
    preprocessing = as_preprocessing(preprocessing)
    size = preprocessing.size
    return [v2.ToImage(), v2.Resize((size, size), interpolation=INTERPOLATIONS[preprocessing.interpolation],
                                    antialias=True)]


def image_transform(preprocessing, train, hflip=True):
    """Per-image transform for datasets read from files (PIL images)."""
    preprocessing = as_preprocessing(preprocessing)
    steps = resize_steps(preprocessing)
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocessing.mean, preprocessing.std)]
    return v2.Compose(steps)


class BatchTransform:
    """The same recipe applied to a uint8 (B, 3, H, W) batch, with an independent flip per image."""

    def __init__(self, preprocessing, train, hflip=True):
        self.preprocessing = as_preprocessing(preprocessing)
        self.flip = train and hflip

    def __call__(self, images):
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchTransform takes uint8 images, got {images.dtype}")
        # Batches are large (100 x 3 x 448 x 448) and each pass over them is memory-bound: flip while
        # the pixels are 1-byte, and normalise the float copy in place.
        if self.flip:
            flipped = torch.rand(len(images)) < 0.5
            images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
        images = TF.to_dtype(images, torch.float32, scale=True)
        pre = self.preprocessing
        if images.shape[-2:] != (pre.size, pre.size):
            images = TF.resize(images, [pre.size, pre.size], interpolation=INTERPOLATIONS[pre.interpolation],
                               antialias=True)
        return TF.normalize(images, pre.mean, pre.std, inplace=True)
