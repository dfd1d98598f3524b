"""Hash networks: a backbone whose last layer outputs hash_bit real values (sign gives the code)."""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.inception import InceptionOutputs

from utils.checkpoint import describe_mismatch


class SmallHashNet(nn.Module):
    """Three conv blocks and a hash layer: trains on small images (the digits dataset) on a CPU."""

    def __init__(self, hash_bit, width=32):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            # Pooled ReLU features share one large positive mean, which would start every code at the
            # same sign pattern (pairwise cosine ~0.99); centring them lets all losses separate codes
            # from the first step.
            nn.BatchNorm1d(4 * width))
        self.hash_layer = nn.Linear(4 * width, hash_bit)

    def forward(self, images):
        return self.hash_layer(self.features(images))


class AlexNetHash(nn.Module):
    """The paper's AlexNet: torchvision AlexNet's conv features, then a hash_layer holding its fc6 and
    fc7 (with their dropouts) and a Linear(4096, hash_bit). Input 224x224 (6x6x256 features)."""

    def __init__(self, features, fc6, fc7, hash_bit):
        super().__init__()
        self.features = features
        self.hash_layer = nn.Sequential(nn.Dropout(), fc6, nn.ReLU(inplace=True), nn.Dropout(), fc7,
                                        nn.ReLU(inplace=True), nn.Linear(fc7.out_features, hash_bit))

    def forward(self, images):
        return self.hash_layer(torch.flatten(self.features(images), 1))


class InceptionV3Hash(models.Inception3):
    """torchvision's inception_v3 as the paper's "googlenet": fc -> Linear(2048, hash_bit), the auxiliary
    classifier kept (as in the pretrained model, so the state_dict names match the paper's checkpoints)
    and the codes returned in training mode too, where torchvision returns (logits, aux_logits)."""

    def __init__(self, hash_bit, imagenet_state=None):
        # transform_input=True as torchvision sets it for the ImageNet weights, which the paper used.
        super().__init__(aux_logits=True, transform_input=True, init_weights=imagenet_state is None)
        load_trunk(self, imagenet_state)
        self.fc = nn.Linear(self.fc.in_features, hash_bit)

    def forward(self, images):
        outputs = super().forward(images)
        return outputs.logits if isinstance(outputs, InceptionOutputs) else outputs


def load_trunk(module, imagenet_state):
    """Load a torchvision ImageNet state_dict into the unmodified torchvision model `module`."""
    if imagenet_state is None:
        return
    try:
        module.load_state_dict(imagenet_state)
    except RuntimeError as exc:
        mismatch = describe_mismatch(module.state_dict(), imagenet_state)
        raise ValueError(f"they are not {type(module).__name__} ImageNet weights: "
                         f"{mismatch or str(exc).splitlines()[0]}") from None


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone and the paper's per-backbone defaults."""
    build: Callable[..., nn.Module]  # build(hash_bit, imagenet_state=None) -> module returning (B, hash_bit)
    input_size: int                  # square input side the images are resized to
    default_lr: float                # network learning rate when --lr is 0
    imagenet_weights: object = None  # the torchvision weights enum member the paper's code used
    hash_layer: str = "fc"           # name of the last Linear (the hash layer), which --experts replicates

    @property
    def pretrained_available(self):
        return self.imagenet_weights is not None


def _build_small(hash_bit, imagenet_state=None):
    if imagenet_state is not None:
        raise ValueError("the small backbone has no pretrained weights")
    return SmallHashNet(hash_bit)


def _build_alexnet(hash_bit, imagenet_state=None):
    trunk = models.alexnet()
    load_trunk(trunk, imagenet_state)
    return AlexNetHash(trunk.features, trunk.classifier[1], trunk.classifier[4], hash_bit)


def _build_resnet(hash_bit, imagenet_state=None):
    network = models.resnet50()
    load_trunk(network, imagenet_state)
    network.fc = nn.Linear(network.fc.in_features, hash_bit)
    return network


BACKBONES = {
    "small": BackboneSpec(_build_small, input_size=32, default_lr=0.05, hash_layer="hash_layer"),
    "alexnet": BackboneSpec(_build_alexnet, input_size=224, default_lr=0.01,
                            imagenet_weights=models.AlexNet_Weights.IMAGENET1K_V1, hash_layer="hash_layer.6"),
    "googlenet": BackboneSpec(InceptionV3Hash, input_size=448, default_lr=0.02,
                              imagenet_weights=models.Inception_V3_Weights.IMAGENET1K_V1),
    # The paper's code has no learning rate for resnet (it crashes there); 0.01 as for AlexNet, the
    # other 224-input backbone trained with the same SGD recipe.
    "resnet": BackboneSpec(_build_resnet, input_size=224, default_lr=0.01,
                           imagenet_weights=models.ResNet50_Weights.IMAGENET1K_V1),
}


class HashExperts(nn.Module):
    """E hash heads on one shared trunk (--experts, docs/METHOD.md §8.2): the backbone with its hash layer
    replaced by Identity, and E Linear heads (head 0 is the backbone's own hash layer).

    In training mode the output is (B, E, n), one code per head, for the collaborative loss; in eval mode
    it is (B, n), the code used for retrieval: head `inference_head`, or with "mean" the mean of the
    heads' outputs (taken before the sign).
    """

    def __init__(self, network, hash_layer_name, experts, inference_head=0):
        super().__init__()
        if experts < 2:
            raise ValueError(f"a multi-head network needs at least 2 heads, got {experts}")
        if inference_head != "mean" and not 0 <= int(inference_head) < experts:
            raise ValueError(f"inference head {inference_head} does not exist: choose 0 to {experts - 1} or mean")
        hash_layer = network.get_submodule(hash_layer_name)
        parent_name, _, child = hash_layer_name.rpartition(".")
        setattr(network.get_submodule(parent_name), child, nn.Identity())
        self.trunk = network
        heads = [hash_layer] + [nn.Linear(hash_layer.in_features, hash_layer.out_features) for _ in range(experts - 1)]
        self.heads = nn.ModuleList(heads)
        self.inference_head = inference_head

    def forward(self, images):
        features = self.trunk(images)
        if self.training:
            return torch.stack([head(features) for head in self.heads], dim=1)
        if self.inference_head == "mean":
            return torch.stack([head(features) for head in self.heads]).mean(dim=0)
        return self.heads[int(self.inference_head)](features)


def build_network(name, hash_bit, pretrained=None, experts=1, inference_head=0):
    """The hash network `name` with a hash_bit-wide output.

    pretrained: a torchvision ImageNet state_dict of the backbone (see utils/checkpoint.imagenet_state_dict), loaded
    before the last layer is replaced by the hash layer; None or False for random initialisation.
    A state_dict that does not fit the backbone raises ValueError.
    experts E > 1: a HashExperts network with E heads, retrieving with `inference_head` (an index or "mean");
    E = 1 is the plain network, whose state_dict is the paper's checkpoint format.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    network = BACKBONES[name].build(hash_bit, imagenet_state=pretrained or None)
    if experts == 1:
        return network
    return HashExperts(network, BACKBONES[name].hash_layer, experts, inference_head)
