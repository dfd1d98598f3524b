"""Image transforms of the paper's recipe: resize to a square, random horizontal flip when training,
ImageNet mean/std normalisation."""
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's images are prepared (its pretrained weights' own configuration): resized to a
    size x size square with `interpolation`, scaled to [0, 1], normalised with `mean` and `std`."""
    size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"


def resize_steps(input_size):
    """PIL image -> uint8 (3, input_size, input_size) tensor; the image cache stores exactly this."""
    return [v2.ToImage(), v2.Resize((input_size, input_size), antialias=True)]


def image_transform(input_size, train, hflip=True):
    """Per-image transform for datasets read from files (PIL images)."""
    steps = resize_steps(input_size)
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class BatchTransform:
    """The same recipe applied to a uint8 (B, 3, H, W) batch, with an independent flip per image."""

    def __init__(self, input_size, train, hflip=True):
        self.input_size = input_size
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
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = TF.resize(images, [self.input_size, self.input_size], antialias=True)
        return TF.normalize(images, IMAGENET_MEAN, IMAGENET_STD, inplace=True)
