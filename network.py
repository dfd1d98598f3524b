"""Hash networks: a backbone whose last layer outputs hash_bit real values (sign gives the code)."""
from dataclasses import dataclass
from typing import Callable

from torch import nn


class SmallHashNet(nn.Module):
    """Three conv blocks and a hash layer: trains on small images (the digits dataset) on a CPU."""

    def __init__(self, hash_bit, width=32):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hash_layer = nn.Linear(4 * width, hash_bit)

    def forward(self, images):
        return self.hash_layer(self.features(images))


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and the paper's per-backbone defaults."""
    build: Callable[..., nn.Module]  # build(hash_bit, pretrained) -> module returning (B, hash_bit)
    input_size: int                  # square input side the images are resized to
    default_lr: float                # network learning rate when --lr is 0
    pretrained_available: bool       # whether ImageNet weights exist for it


def _build_small(hash_bit, pretrained=False):
    if pretrained:
        raise ValueError("the small backbone has no pretrained weights")
    return SmallHashNet(hash_bit)


def _not_yet(name):
    def build(hash_bit, pretrained=True):
        raise NotImplementedError(
            f"backbone {name!r} is not available in this version yet; use --backbone small")
    return build


BACKBONES = {
    "small": BackboneSpec(_build_small, input_size=32, default_lr=0.05, pretrained_available=False),
    "alexnet": BackboneSpec(_not_yet("alexnet"), input_size=224, default_lr=0.01, pretrained_available=True),
    "googlenet": BackboneSpec(_not_yet("googlenet"), input_size=448, default_lr=0.02, pretrained_available=True),
    "resnet": BackboneSpec(_not_yet("resnet"), input_size=224, default_lr=0.01, pretrained_available=True),
}


def build_network(name, hash_bit, pretrained=None):
    """The hash network `name` with a hash_bit-wide output; pretrained=None means "if weights exist"."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if pretrained is None:
        pretrained = spec.pretrained_available
    return spec.build(hash_bit, pretrained=pretrained)
