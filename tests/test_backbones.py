"""The paper's backbones: parameter names and shapes of its checkpoints, ImageNet weights in the trunk,
and one training step on the CPU at the paper's input size (batch of 2)."""
import pytest
import torch
from torchvision import models

from network import PAPER_BACKBONES as BACKBONES
from network import build_network

ALEXNET_KEYS = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias")] + \
               [f"hash_layer.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")]


def torchvision_reference(name):
    """The torchvision model the paper's code starts from, with its default (ImageNet) head."""
    return {"alexnet": models.alexnet, "resnet": models.resnet50,
            "googlenet": lambda: models.inception_v3(aux_logits=True, init_weights=False)}[name]()


@pytest.fixture(scope="module")
def networks():
    """Each backbone built once with 12 bits (inception's initialisation alone takes seconds)."""
    torch.manual_seed(0)
    return {name: build_network(name, 12) for name in ("alexnet", "googlenet", "resnet")}


def test_alexnet_layout_is_the_papers():
    state = build_network("alexnet", 48).state_dict()
    assert sorted(state) == sorted(ALEXNET_KEYS)
    shapes = {"hash_layer.1.weight": (4096, 9216), "hash_layer.4.weight": (4096, 4096), "hash_layer.6.weight": (48, 4096),
              "features.0.weight": (64, 3, 11, 11), "features.10.weight": (256, 256, 3, 3)}
    assert all(tuple(state[name].shape) == shape for name, shape in shapes.items())


@pytest.mark.parametrize("name", ["googlenet", "resnet"])
def test_torchvision_layout_with_a_hash_fc(name, networks):
    state = networks[name].state_dict()
    reference = torchvision_reference(name).state_dict()
    assert list(state) == list(reference)  # aux classifier of inception_v3 included, as in the paper's model
    assert tuple(state["fc.weight"].shape) == (12, 2048) and tuple(state["fc.bias"].shape) == (12,)
    assert all(state[key].shape == reference[key].shape for key in reference if not key.startswith("fc."))


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "resnet"])
def test_imagenet_weights_fill_the_trunk(name):
    reference = torchvision_reference(name).state_dict()
    state = build_network(name, 16, pretrained=reference).state_dict()
    if name == "alexnet":
        pairs = [("features.3.weight", "features.3.weight"), ("hash_layer.1.weight", "classifier.1.weight"),
                 ("hash_layer.4.bias", "classifier.4.bias")]
    else:
        pairs = [(key, key) for key in reference if not key.startswith("fc.")]
    assert all(torch.equal(state[ours], reference[theirs]) for ours, theirs in pairs)


def test_weights_of_another_network_are_refused():
    with pytest.raises(ValueError, match="not AlexNet ImageNet weights"):
        build_network("alexnet", 16, pretrained=torchvision_reference("resnet").state_dict())


@pytest.mark.parametrize("name", ["alexnet", "googlenet", "resnet"])
def test_one_training_step_at_the_papers_input_size(name, networks):
    network = networks[name]
    size = BACKBONES[name].input_size
    images = torch.randn(2, 3, size, size)
    network.train()
    codes = network(images)
    assert isinstance(codes, torch.Tensor) and codes.shape == (2, 12)
    codes.square().mean().backward()
    head = network.hash_layer[6] if name == "alexnet" else network.fc
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    network.eval()
    eval_size = size if name == "alexnet" else 96  # only AlexNet's flatten fixes the size; keep this check cheap
    with torch.no_grad():
        assert network(torch.randn(1, 3, eval_size, eval_size)).shape == (1, 12)


def test_paper_defaults():
    assert [(BACKBONES[n].input_size, BACKBONES[n].default_lr) for n in ("googlenet", "alexnet", "resnet")] == [
        (448, 0.02), (224, 0.01), (224, 0.01)]
