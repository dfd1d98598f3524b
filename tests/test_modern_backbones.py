"""Today's backbones (torchvision by name, timm, CLIP and DINOv2) and their recipes: every named backbone
trains a step and rebuilds from its checkpoint alone; weights load from files in the libraries' own
formats, and the wrong file, a missing one or an offline hub is one line; the normalisation applied is
the model's own; the transformer recipe flags do what they say. No download: random weights only."""
import dataclasses
import math
import os

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import models

import network
import retrieval
from data import digits
from data.transforms import BatchTransform, image_transform
from engine import HashingObjective, train_one_epoch
from loss import HyP2Loss
from session.parts import backbone_of, build_splits, build_trainer, make_network, resolve_backbone
from session.run import Run
from tests.cli_runs import exit_status
from utils.checkpoint import load_network_weights, read_backbone_record, save_state_dict
from utils.errors import UserError
from utils.weights import pretrained_state_dict

NEW_BACKBONES = [name for name in network.backbone_names() if name not in network.PAPER_BACKBONES]
LABELS = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 0, 0]])
DIGITS = ["--dataset", "digits", "--hash_bit", "16", "--subset", "40", "--batch_size", "20", "--epochs", "1",
          "--device", "cpu", "--no_progress"]


def small_spec(name):
    """The backbone at a small input: two patches a side for transformers, 64 pixels for CNNs (at 32, the
    last 1 x 1 feature maps leave BatchNorm too little to normalise over)."""
    spec = network.get_backbone(name)
    return spec.at_input_size(2 * spec.patch_size if spec.patch_size else 64)


def test_the_catalogue_names_every_backbone_the_issue_asks_for():
    wanted = {"vgg16_bn", "resnet18", "resnet34", "resnet101", "resnet152", "vit_b_16", "vit_b_32", "vit_l_16",
              "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "convnext_tiny", "convnext_small",
              "convnext_base", "efficientnet_v2_s", "clip_vit_b16", "dinov2_vits14", "dinov2_vitb14"}
    assert wanted <= set(NEW_BACKBONES)


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_a_backbone_trains_a_step_and_its_checkpoint_rebuilds_it(name, tmp_path):
    torch.manual_seed(0)
    spec = small_spec(name)
    net = network.build_network(spec, 16)
    criterion = HyP2Loss(4, 16)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    optimizer = torch.optim.SGD([*net.parameters(), *criterion.parameters()], lr=0.01)
    net.train()
    images = torch.randn(4, 3, spec.input_size, spec.input_size)
    loss = criterion(net(images), LABELS)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before["hash_layer.weight"], net.state_dict()["hash_layer.weight"])

    save_state_dict(net, tmp_path / "model.ckpt")
    record = read_backbone_record(tmp_path / "model.ckpt")
    assert (record["name"], record["input_size"], record["hash_bit"]) == (name, spec.input_size, 16)
    rebuilt = network.build_network(network.get_backbone(record["name"], record["input_size"]), record["hash_bit"])
    load_network_weights(rebuilt, tmp_path / "model.ckpt")
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        outputs = net(images)
        assert torch.isfinite(outputs).all() and torch.equal(outputs, rebuilt(images))


def test_the_papers_backbones_keep_the_plain_state_dict(tmp_path):
    net = network.build_network("small", 16)
    save_state_dict(net, tmp_path / "small.ckpt")
    assert read_backbone_record(tmp_path / "small.ckpt") is None
    assert set(torch.load(tmp_path / "small.ckpt", weights_only=True)) == set(net.state_dict())


def test_an_unknown_name_is_one_line_with_the_closest_names(capsys):
    code, _, err = exit_status(retrieval.cli, DIGITS + ["--backbone", "vit_b16"], capsys)
    assert code == 1 and err.count("\n") == 1 and "unknown backbone 'vit_b16'; closest: vit_b_16" in err
    code, _, err = exit_status(retrieval.cli, DIGITS + ["--backbone", "timm:vit_base_patch16_clip"], capsys)
    assert code == 1 and "closest: vit_base_patch16_clip_224" in err and "Traceback" not in err


def test_test_rebuilds_the_network_from_the_checkpoint_alone(tmp_path, capsys):
    out = str(tmp_path / "out")
    trained = retrieval.main(retrieval.get_args_parser().parse_args(
        DIGITS + ["--backbone", "vit_b_32", "--input_size", "32", "--no_pretrained", "--experts", "2",
                  "--output_dir", out]))
    checkpoint = tmp_path / "out" / "digits_vit_b_32_16_hyp2_ecl2.ckpt"
    code, printed, err = exit_status(retrieval.cli, ["--dataset", "digits", "--hash_bit", "16", "--subset", "40",
                                                     "--test", "--checkpoint", str(checkpoint), "--output_dir", out,
                                                     "--device", "cpu"], capsys)
    assert code == 0 and f"mAP@40: {trained['map']:.4f}  (digits, vit_b_32, 16 bits" in printed
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--test", "--checkpoint", str(checkpoint),
                                               "--backbone", "resnet18", "--output_dir", out], capsys)
    assert code == 1 and err.count("\n") == 1 and "--backbone resnet18 contradicts --checkpoint" in err
    code, _, err = exit_status(retrieval.cli, ["--dataset", "digits", "--test", "--checkpoint", str(checkpoint),
                                               "--input_size", "64", "--output_dir", out], capsys)
    assert code == 1 and "--input_size 64 contradicts" in err


# ---- pretrained weights from files in the libraries' own formats ----

@pytest.fixture
def offline_hubs(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches, and no network: any download fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads its environment once, at import: its constants are what it consults later
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def train_argv(tmp_path, backbone, *extra):
    return DIGITS + ["--backbone", backbone, "--output_dir", str(tmp_path / "out"), "--input_size",
                     "28" if "dinov2" in backbone else "32", *extra]


def test_torchvision_weights_come_from_the_torch_hub_cache(offline_hubs, capsys):
    torch.manual_seed(1)
    cache = offline_hubs / "torch" / "hub" / "checkpoints" / os.path.basename(models.ResNet18_Weights.DEFAULT.url)
    cache.parent.mkdir(parents=True)
    reference = models.resnet18().state_dict()
    torch.save(reference, cache)
    args = retrieval.get_args_parser().parse_args(train_argv(offline_hubs, "resnet18"))
    net = make_network(dataclasses.replace(Run.plan(args), backbone=small_spec("resnet18")))
    assert torch.equal(net.trunk.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])
    assert f"resnet18: pretrained weights from {cache}" in capsys.readouterr().out


def test_timm_weights_load_from_safetensors_and_state_dict_files(offline_hubs):
    """DINOv2's own checkpoint is for 518-pixel inputs: loaded at 28 pixels, timm resamples its position
    embeddings, and every other tensor arrives unchanged."""
    torch.manual_seed(2)
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict()
    safetensors.torch.save_file(source, offline_hubs / "dinov2.safetensors")
    torch.save(source, offline_hubs / "dinov2.pth")
    spec = small_spec("dinov2_vits14")
    for file in ("dinov2.safetensors", "dinov2.pth"):
        state, _ = pretrained_state_dict(spec, offline_hubs / file)
        net = network.build_network(spec, 16, pretrained=state)
        loaded = net.trunk.state_dict()
        assert torch.equal(loaded["blocks.3.attn.qkv.weight"], source["blocks.3.attn.qkv.weight"])
        assert loaded["pos_embed"].shape == (1, 1 + 2 * 2, 384)  # the class token and a 2 x 2 grid
        grid = source["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
        assert torch.allclose(loaded["pos_embed"][:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 4, 384), atol=1e-5)


def planned_network(tmp_path, backbone, *extra):
    """make_network of a training invocation (no data is built), its UserError's message if it fails."""
    args = resolve_backbone(retrieval.get_args_parser().parse_args(train_argv(tmp_path, backbone, *extra)))
    try:
        make_network(dataclasses.replace(Run.plan(args), backbone=backbone_of(args)))
    except UserError as exc:
        return str(exc)
    return None


def test_the_wrong_weights_a_missing_file_and_an_offline_hub_are_one_line(offline_hubs, capsys):
    torch.save(models.resnet18().state_dict(), offline_hubs / "resnet18.pth")
    cases = [
        (("dinov2_vits14", "--weights", str(offline_hubs / "resnet18.pth")),
         ["resnet18.pth for --backbone dinov2_vits14", "not vit_small_patch14_dinov2.lvd142m weights"]),
        (("vit_b_16", "--weights", str(offline_hubs / "resnet18.pth")),
         ["resnet18.pth for --backbone vit_b_16", "not VisionTransformer ImageNet weights"]),
        (("convnext_tiny", "--weights", str(offline_hubs / "absent.pth")), ["--weights", "absent.pth does not exist"]),
        (("dinov2_vits14",), ["cannot download the pretrained weights of --backbone dinov2_vits14", "--weights FILE"]),
        (("swin_t",), ["cannot download the ImageNet weights of --backbone swin_t", "swin_t-704ceda3.pth"]),
    ]
    for arguments, expected in cases:
        message = planned_network(offline_hubs, *arguments)
        assert message is not None and "\n" not in message and all(part in message for part in expected), message
    code, _, err = exit_status(retrieval.cli, train_argv(offline_hubs, "dinov2_vits14"), capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err and "--no_pretrained" in err


def test_a_fifo_as_weights_is_refused_without_blocking(offline_hubs, capsys):
    fifo = offline_hubs / "weights.pth"
    os.mkfifo(fifo)
    code, _, err = exit_status(retrieval.cli, train_argv(offline_hubs, "resnet18", "--weights", str(fifo)), capsys)
    assert code == 1 and f"--weights {fifo} is a FIFO" in err


# ---- the normalisation a backbone's inputs get ----

@pytest.mark.parametrize("name, architecture", [("clip_vit_b16", "vit_base_patch16_clip_224.openai"),
                                                ("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m")])
def test_inputs_are_normalised_as_the_models_pretrained_configuration_says(name, architecture):
    config = timm.data.resolve_data_config(model=timm.create_model(architecture, pretrained=False))
    spec = small_spec(name)
    side = spec.input_size
    pixels = torch.randint(0, 256, (1, 3, side, side), dtype=torch.uint8)
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    expected = (pixels[0].float() / 255 - mean) / std
    assert torch.allclose(BatchTransform(spec.preprocessing, train=False)(pixels.clone())[0], expected, atol=1e-5)
    image = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    assert torch.allclose(image_transform(spec.preprocessing, train=False)(image), expected, atol=1e-5)
    assert spec.preprocessing.interpolation == config["interpolation"] == "bicubic"
    args = retrieval.get_args_parser().parse_args(["--dataset", "digits", "--subset", "4"])
    query = build_splits(digits.SPEC, args, spec.preprocessing).query
    assert query.dataset.transform.preprocessing == spec.preprocessing


# ---- the recipe flags ----

def trainer_for(argv, net=None):
    args = retrieval.get_args_parser().parse_args(["--dataset", "digits", "--backbone", "resnet18", *argv])
    spec = network.get_backbone("resnet18")
    objective = HashingObjective(net or network.build_network(small_spec("resnet18"), 16), HyP2Loss(4, 16))
    return args, build_trainer(args, objective, 0.1, torch.device("cpu"), spec)


def test_cosine_schedule_with_warm_up_follows_its_formula():
    args, trainer = trainer_for(["--scheduler", "cosine", "--warmup_epochs", "2", "--epochs", "6"])
    rates = []
    for _ in range(6):
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    warm = [0.1 * (1 / 3 + (1 - 1 / 3) * epoch / 2) for epoch in range(2)]
    cosine = [0.1 * (1 + math.cos(math.pi * epoch / 4)) / 2 for epoch in range(4)]
    assert rates == pytest.approx(warm + cosine)


def test_backbone_lr_mult_and_freeze_backbone_split_the_network():
    _, trainer = trainer_for(["--backbone_lr_mult", "0.1", "--optimizer", "adamw"])
    head, trunk, proxies = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert (head["lr"], trunk["lr"], proxies["lr"]) == pytest.approx((0.1, 0.01, 0.02))
    network_parameters = list(trainer.objective.network.parameters())
    assert len(head["params"]) + len(trunk["params"]) == len(network_parameters)
    assert {id(p) for p in head["params"]} == {id(p) for p in trainer.objective.network.hash_layer.parameters()}

    torch.manual_seed(0)
    _, trainer = trainer_for(["--freeze_backbone"])
    net = trainer.objective.network
    before = {key: value.clone() for key, value in net.state_dict().items()}
    loader = [(torch.randn(4, 3, 64, 64), LABELS)]
    train_one_epoch(trainer, loader, torch.device("cpu"), 1)
    after = net.state_dict()
    changed = {key for key in after if not torch.equal(before[key], after[key])}
    assert changed == {"hash_layer.weight", "hash_layer.bias"}  # BatchNorm statistics included


def test_clip_grad_bounds_the_update():
    torch.manual_seed(0)
    _, trainer = trainer_for(["--clip_grad", "0.01", "--momentum", "0", "--weight_decay", "0"])
    parameters = list(trainer.objective.parameters())
    before = [p.detach().clone() for p in parameters]
    loader = [(torch.randn(4, 3, 64, 64) * 100, LABELS)]
    train_one_epoch(trainer, loader, torch.device("cpu"), 1)
    steps = torch.cat([(p.detach() - b).flatten() / group_lr(trainer, p) for p, b in zip(parameters, before)])
    assert steps.norm() <= 0.01 * 1.0001


def group_lr(trainer, parameter):
    return next(group["lr"] for group in trainer.optimizer.param_groups if any(p is parameter for p in group["params"]))
