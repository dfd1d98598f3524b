"""Hash networks: a backbone whose last layer outputs hash_bit real values (sign gives the code).

Three kinds of backbone, each described by a BackboneSpec (input size, normalisation, learning rate,
recipe file), all built by build_network:
- the paper's: alexnet, googlenet (torchvision's inception_v3), resnet (ResNet-50), in the paper code's
  module layout, so its checkpoints load; and `small`, a tiny CNN for the embedded digits dataset;
- torchvision classification models by name (resnet18 ... efficientnet_v2_s, TORCHVISION_BACKBONES):
  the model with its classifier replaced by Identity as the `trunk`, and a `hash_layer` on its features;
- any timm model, `timm:NAME` (and the shortcuts of TIMM_SHORTCUTS: CLIP, DINOv2): timm's model with
  num_classes=0 (its pooled features) as the trunk, and the hash layer.
Weights arrive as a state dict (read by utils/weights.py); nothing here reads a file.
"""
import contextlib
import difflib
import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from torchvision import models
from torchvision.models.inception import InceptionOutputs

from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
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


def replace_submodule(module, path, new):
    """Put `new` where the submodule at dotted `path` is; returns the old submodule."""
    parent_name, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_name)
    old = parent.get_submodule(child)
    setattr(parent, child, new)
    return old


class TrunkHashNet(nn.Module):
    """A trunk that returns pooled features (B, F) (a classification model without its classifier)
    and a hash layer Linear(F, hash_bit)."""

    def __init__(self, trunk, feature_dim, hash_bit):
        super().__init__()
        self.trunk = trunk
        self.hash_layer = nn.Linear(feature_dim, hash_bit)

    def forward(self, images):
        return self.hash_layer(self.trunk(images))


@dataclass(frozen=True)
class BackboneSpec:
    """How to build a backbone, the images it takes, and its defaults."""
    name: str
    build: Callable[..., nn.Module]  # build(hash_bit, pretrained=None, input_size=None) -> module giving (B, hash_bit)
    preprocessing: Preprocessing     # the side, mean, std and interpolation its pretrained weights expect
    default_lr: float                # network learning rate when --lr is 0
    source: str = "paper"            # paper (the paper code's layout), torchvision or timm
    imagenet_weights: object = None  # torchvision: the weights enum member
    hub_id: str = None               # timm: the Hugging Face hub repository of the pretrained weights
    hash_layer: str = "hash_layer"   # the last Linear, which --experts replicates
    family: str = "cnn"              # cnn, vit, swin, convnext, clip, dinov2: chooses the recipe file
    fixed_input: bool = False        # the layout needs exactly preprocessing.size (AlexNet's flattened 6x6 map)
    patch_size: int = 0              # vision transformers: the input side must be a multiple of it
    architecture: str = ""           # torchvision or timm model name
    recipe_file: str = None          # the recipe in configs/, when not its family's
    options: dict = field(default_factory=dict, compare=False)

    @property
    def input_size(self):
        return self.preprocessing.size

    @property
    def pretrained_available(self):
        return self.imagenet_weights is not None or self.hub_id is not None

    @property
    def recipe(self):
        """The recipe file for this backbone (configs/): its own, else its family's."""
        return self.recipe_file or RECIPES.get(self.family)

    @property
    def self_describing(self):
        """Its checkpoints record the spec (the paper's backbones keep the paper's plain state_dict)."""
        return self.source != "paper"

    def at_input_size(self, size):
        """The spec for inputs of side `size` (--input_size); ValueError where the layout cannot take it."""
        if size is None or size == self.input_size:
            return self
        if self.fixed_input:
            raise ValueError(f"the {self.name} backbone takes {self.input_size}-pixel inputs only")
        if self.patch_size and size % self.patch_size:
            raise ValueError(f"{self.name} cuts its input into {self.patch_size}-pixel patches, so the input size must "
                             f"be a multiple of {self.patch_size}, got {size}")
        return replace(self, preprocessing=replace(self.preprocessing, size=size))

    def record(self, hash_bit, experts=1):
        """What a self-describing checkpoint stores to rebuild this network."""
        pre = self.preprocessing
        return {"name": self.name, "source": self.source, "architecture": self.architecture,
                "input_size": pre.size, "mean": list(pre.mean), "std": list(pre.std),
                "interpolation": pre.interpolation, "hash_bit": hash_bit, "experts": experts}


RECIPES = {"cnn": "configs/cnn.yaml", "vit": "configs/vit.yaml", "swin": "configs/swin.yaml",
           "convnext": "configs/convnext.yaml", "clip": "configs/clip.yaml", "dinov2": "configs/dinov2.yaml"}

IMAGENET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _build_small(hash_bit, pretrained=None, input_size=None):
    if pretrained is not None:
        raise ValueError("the small backbone has no pretrained weights")
    return SmallHashNet(hash_bit)


def _build_alexnet(hash_bit, pretrained=None, input_size=None):
    trunk = models.alexnet()
    load_trunk(trunk, pretrained)
    return AlexNetHash(trunk.features, trunk.classifier[1], trunk.classifier[4], hash_bit)


def _build_inception(hash_bit, pretrained=None, input_size=None):
    return InceptionV3Hash(hash_bit, pretrained)


def _build_resnet(hash_bit, pretrained=None, input_size=None):
    network = models.resnet50()
    load_trunk(network, pretrained)
    network.fc = nn.Linear(network.fc.in_features, hash_bit)
    return network


# The paper's backbones (and `small`): the paper code's layout, its input sizes and learning rates.
PAPER_BACKBONES = {
    "small": BackboneSpec("small", _build_small, Preprocessing(32, **IMAGENET), default_lr=0.05, family="small"),
    "alexnet": BackboneSpec("alexnet", _build_alexnet, Preprocessing(224, **IMAGENET), default_lr=0.01,
                            imagenet_weights=models.AlexNet_Weights.IMAGENET1K_V1, hash_layer="hash_layer.6",
                            fixed_input=True, architecture="alexnet", recipe_file="configs/paper/flickr_nus.yaml"),
    "googlenet": BackboneSpec("googlenet", _build_inception, Preprocessing(448, **IMAGENET), default_lr=0.02,
                              imagenet_weights=models.Inception_V3_Weights.IMAGENET1K_V1, hash_layer="fc",
                              architecture="inception_v3", recipe_file="configs/paper/voc.yaml"),
    # The paper's code has no learning rate for resnet (it crashes there); 0.01 as for AlexNet, the
    # other 224-input backbone trained with the same SGD recipe.
    "resnet": BackboneSpec("resnet", _build_resnet, Preprocessing(224, **IMAGENET), default_lr=0.01,
                           imagenet_weights=models.ResNet50_Weights.IMAGENET1K_V1, hash_layer="fc",
                           architecture="resnet50"),
}

# torchvision models by name: (the path of the classifier's last Linear, family, default learning rate).
TORCHVISION_BACKBONES = {
    "vgg16_bn": ("classifier.6", "cnn", 0.01),
    **{name: ("fc", "cnn", 0.01) for name in ("resnet18", "resnet34", "resnet101", "resnet152")},
    **{name: ("heads.head", "vit", 0.001) for name in ("vit_b_16", "vit_b_32", "vit_l_16")},
    **{name: ("head", "swin", 0.001) for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s",
                                                  "swin_v2_b")},
    **{name: ("classifier.2", "convnext", 0.001) for name in ("convnext_tiny", "convnext_small", "convnext_base")},
    "efficientnet_v2_s": ("classifier.1", "cnn", 0.01),
}

# Named timm models, the strongest retrieval backbones: (timm model, family, input side). DINOv2 was
# trained up to 518-pixel inputs (37 x 37 patches of 14); at 224 (16 x 16 patches) a step costs ~6x
# less and its features stay strong (DINOv2's own linear probes run at 224), so 224 is the default here;
# --input_size 518 trains at its full resolution.
TIMM_SHORTCUTS = {
    "clip_vit_b16": ("vit_base_patch16_clip_224.openai", "clip", 224),
    "dinov2_vits14": ("vit_small_patch14_dinov2.lvd142m", "dinov2", 224),
    "dinov2_vitb14": ("vit_base_patch14_dinov2.lvd142m", "dinov2", 224),
}
TIMM_PREFIX = "timm:"
DEFAULT_BACKBONE = "googlenet"  # the paper's


def file_label(name):
    """The backbone as file names carry it: timm:MODEL becomes timm-MODEL (no ':' or '/' in file names)."""
    return name.replace(":", "-").replace("/", "-")


def _build_torchvision(name, head, hash_bit, pretrained=None, input_size=None):
    vision_transformer = name.startswith("vit_")
    model = models.get_model(name, **({"image_size": input_size} if vision_transformer and input_size else {}))
    if pretrained is not None and vision_transformer and model.image_size != 224 \
            and "encoder.pos_embedding" in pretrained:
        # The pretrained position embeddings are for 224-pixel inputs: interpolated to this grid.
        pretrained = models.vision_transformer.interpolate_embeddings(model.image_size, model.patch_size, pretrained)
    load_trunk(model, pretrained)
    classifier = replace_submodule(model, head, nn.Identity())
    return TrunkHashNet(model, classifier.in_features, hash_bit)


def torchvision_spec(name):
    head, family, lr = TORCHVISION_BACKBONES[name]
    weights = models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    size = transform.crop_size[0]
    preprocessing = Preprocessing(size, tuple(transform.mean), tuple(transform.std), transform.interpolation.value)
    patch_size = {"vit_b_16": 16, "vit_b_32": 32, "vit_l_16": 16}.get(name, 0)
    return BackboneSpec(name, lambda hash_bit, pretrained=None, input_size=None: _build_torchvision(
        name, head, hash_bit, pretrained, input_size), preprocessing, lr, source="torchvision",
        imagenet_weights=weights, family=family, patch_size=patch_size, architecture=name)


class _KeysReport(logging.Handler):
    """Collects what timm's loader logs about missing or unexpected keys (it loads non-strictly)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.problems = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(("Missing keys", "Unexpected keys")):
            self.problems.append(message.split(" discovered")[0].split(" found")[0])


def _create_timm(architecture, pretrained, input_size):
    import timm
    kwargs = {"num_classes": 0}
    if pretrained is not None:
        # timm adapts the state dict to the model (drops the classifier, resamples position embeddings).
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"state_dict": pretrained})
    try:
        return timm.create_model(architecture, img_size=input_size, **kwargs) if input_size else \
            timm.create_model(architecture, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(architecture, **kwargs)  # a convolutional network takes any size


def _build_timm(architecture, hash_bit, pretrained=None, input_size=None):
    report, logger = _KeysReport(), logging.getLogger("timm.models._builder")
    level = logger.level
    logger.addHandler(report)
    logger.setLevel(logging.INFO)
    try:
        trunk = _create_timm(architecture, pretrained, input_size)
    except RuntimeError as exc:
        raise ValueError(f"they are not {architecture} weights: {str(exc).splitlines()[-1].strip()}") from None
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
    if report.problems:
        raise ValueError(f"they are not {architecture} weights: {'; '.join(report.problems)[:300]}")
    return TrunkHashNet(trunk, trunk.num_features, hash_bit)


def timm_spec(name):
    """The spec of `timm:MODEL` or of a TIMM_SHORTCUTS name, from timm's pretrained configuration (no download)."""
    import timm
    architecture, family, size = TIMM_SHORTCUTS.get(name, (name[len(TIMM_PREFIX):], None, None))
    if not timm.is_model(architecture):
        raise ValueError(f"unknown timm model {architecture!r}{closest(architecture, timm.list_models(pretrained=True))}")
    config = timm.models.get_pretrained_cfg(architecture)
    config = config.to_dict() if config is not None else {}
    side = size or config.get("input_size", (3, 224, 224))[-1]
    preprocessing = Preprocessing(side, tuple(config.get("mean", IMAGENET_MEAN)), tuple(config.get("std", IMAGENET_STD)),
                                  config.get("interpolation", "bicubic"))
    patch = 14 if "patch14" in architecture else 16 if "patch16" in architecture else 32 if "patch32" in architecture \
        else 0
    family = family or ("vit" if architecture.startswith(("vit_", "deit", "eva")) else
                        "swin" if architecture.startswith("swin") else
                        "convnext" if architecture.startswith("convnext") else "cnn")
    return BackboneSpec(name, lambda hash_bit, pretrained=None, input_size=None: _build_timm(
        architecture, hash_bit, pretrained, input_size or side), preprocessing, 0.001 if family != "cnn" else 0.01,
        source="timm", hub_id=config.get("hf_hub_id") or None, family=family, patch_size=patch,
        architecture=architecture)


def closest(name, names):
    """'; closest: a, b, c' (or '') for an unknown name."""
    matches = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; closest: {', '.join(matches)}" if matches else ""


def backbone_names():
    """Every name --backbone takes besides timm:MODEL."""
    return [*PAPER_BACKBONES, *TORCHVISION_BACKBONES, *TIMM_SHORTCUTS]


def get_backbone(name, input_size=None):
    """The BackboneSpec of `name` (a paper, torchvision or shortcut name, or timm:MODEL), at --input_size
    `input_size` when given; ValueError for an unknown name (with the closest names) or a size it cannot take."""
    if name in PAPER_BACKBONES:
        spec = PAPER_BACKBONES[name]
    elif name in TORCHVISION_BACKBONES:
        spec = torchvision_spec(name)
    elif name in TIMM_SHORTCUTS or name.startswith(TIMM_PREFIX):
        spec = timm_spec(name)
    else:
        raise ValueError(f"unknown backbone {name!r}{closest(name, backbone_names())} (or timm:MODEL for any timm "
                         "model)")
    return spec.at_input_size(input_size)


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
        hash_layer = replace_submodule(network, hash_layer_name, nn.Identity())
        self.trunk = network
        heads = [hash_layer] + [nn.Linear(hash_layer.in_features, hash_layer.out_features) for _ in range(experts - 1)]
        self.heads = nn.ModuleList(heads)
        self.inference_head = inference_head

    def forward(self, images):
        return self.from_features(self.trunk(images))

    def from_features(self, features):
        """The output for the trunk's features (B, F): what forward gives for the images behind them. The heads'
        mode decides (--freeze_backbone trains them with the trunk in evaluation mode)."""
        if self.heads.training:
            return torch.stack([head(features) for head in self.heads], dim=1)
        if self.inference_head == "mean":
            return torch.stack([head(features) for head in self.heads]).mean(dim=0)
        return self.heads[int(self.inference_head)](features)


def hash_head(network, hash_layer):
    """The part that turns the trunk's features into codes: the hash layer `hash_layer`, or with
    --experts the heads."""
    return network.heads if isinstance(network, HashExperts) else network.get_submodule(hash_layer)


@contextlib.contextmanager
def trunk_only(network, hash_layer):
    """The part of a hash network before its hash layer `hash_layer` (or, with --experts, its heads), for
    the duration of the block: a module whose outputs are the pooled features (B, F) the head reads. The
    network's own hash layer gives way to Identity meanwhile, so its state_dict holds the trunk's alone."""
    if isinstance(network, HashExperts):
        yield network.trunk
        return
    layer = replace_submodule(network, hash_layer, nn.Identity())
    try:
        yield network
    finally:
        replace_submodule(network, hash_layer, layer)


def head_outputs(network, hash_layer, features):
    """What `network` outputs for images whose trunk features (trunk_only) are `features`: its head alone."""
    if isinstance(network, HashExperts):
        return network.from_features(features)
    return network.get_submodule(hash_layer)(features)


def trunk_and_head_parameters(network, hash_layer):
    """(the trunk's parameters, the hash head's parameters) of a hash network."""
    head = list(hash_head(network, hash_layer).parameters())
    in_head = {id(parameter) for parameter in head}
    return [parameter for parameter in network.parameters() if id(parameter) not in in_head], head


def build_network(spec, hash_bit, pretrained=None, experts=1, inference_head=0):
    """The hash network of `spec` (a BackboneSpec, or a backbone name for get_backbone) with a hash_bit-wide
    output.

    pretrained: the backbone's pretrained state_dict (utils/weights.py reads it), loaded before the
    classifier gives way to the hash layer; None for random initialisation. A state_dict that does not
    fit the backbone raises ValueError. experts E > 1: a HashExperts network with E heads, retrieving with
    `inference_head` (an index or "mean"); E = 1 is the plain network, whose state_dict is the paper's
    checkpoint format for the paper's backbones. The network of a self-describing backbone carries
    `backbone_record`, which its checkpoints store so that they rebuild it alone.
    """
    spec = get_backbone(spec) if isinstance(spec, str) else spec
    network = spec.build(hash_bit, pretrained=pretrained,
                         input_size=None if spec.source == "paper" else spec.input_size)
    if experts > 1:
        network = HashExperts(network, spec.hash_layer, experts, inference_head)
    if spec.self_describing:
        network.backbone_record = spec.record(hash_bit, experts)
    return network
