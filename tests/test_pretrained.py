"""ImageNet weights (torch hub cache, --weights, --no_pretrained, offline message) and checkpoints in the
paper's state_dict layout loaded with --test."""
import dataclasses
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import models

import retrieval
from data.transforms import image_transform
from fixture_files import small_list_folder
from utils.errors import UserError
from hashing.evaluation.metrics import map_at_k
from session.parts import backbone_of, make_network, resolve_backbone
from session.run import Run


def parse(argv):
    return retrieval.get_args_parser().parse_args(argv)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and no network: a download attempt fails as it does offline."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return home


def random_alexnet_state(seed):
    torch.manual_seed(seed)
    return models.alexnet().state_dict()


def planned(argv):
    """The Run of a training invocation with these flags, its backbone resolved."""
    args = resolve_backbone(parse(argv))
    return dataclasses.replace(Run.plan(args), backbone=backbone_of(args))


def test_official_file_in_the_torch_hub_cache_is_used(torch_home, capsys):
    fake = random_alexnet_state(1)
    official = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"  # torchvision's file name
    official.parent.mkdir(parents=True)
    torch.save(fake, official)
    network = make_network(planned(["--backbone", "alexnet", "--hash_bit", "16"]))
    assert torch.equal(network.features[0].weight, fake["features.0.weight"])
    assert torch.equal(network.hash_layer[4].weight, fake["classifier.4.weight"])
    assert f"alexnet: pretrained weights from {official}" in capsys.readouterr().out


def test_weights_flag_loads_a_local_file(torch_home, tmp_path):
    fake = random_alexnet_state(2)
    torch.save(fake, tmp_path / "mine.pth")
    network = make_network(planned(["--backbone", "alexnet", "--weights", str(tmp_path / "mine.pth")]))
    assert torch.equal(network.hash_layer[1].bias, fake["classifier.1.bias"])

    with pytest.raises(UserError, match=r"--weights .*absent\.pth does not exist: check --weights"):
        make_network(planned(["--backbone", "alexnet", "--weights", str(tmp_path / "absent.pth")]))
    torch.save(models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match=r"cannot use .*resnet18\.pth for --backbone alexnet: they are not AlexNet "
                                        r"ImageNet weights: .*parameters missing"):
        make_network(planned(["--backbone", "alexnet", "--weights", str(tmp_path / "resnet18.pth")]))


def test_no_pretrained_and_test_mode_need_no_weights(torch_home):
    for argv in (["--no_pretrained"], ["--test"]):
        network = make_network(planned(["--backbone", "resnet", *argv]))
        assert network.fc.out_features == 48
    assert not torch_home.exists()


def test_weights_and_no_pretrained_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse(["--weights", "x.pth", "--no_pretrained"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_offline_without_cached_weights_is_one_clear_line(torch_home, tmp_path, capsys):
    folder = small_list_folder(tmp_path / "mine")
    with pytest.raises(SystemExit) as exit_info:
        retrieval.cli(["--dataset", "list", "--data_root", str(folder), "--backbone", "googlenet", "--device", "cpu",
                       "--no_save"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    cache = torch_home / "hub" / "checkpoints"
    assert err.startswith("error: cannot download the ImageNet weights of --backbone googlenet from "
                          "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth")
    assert f"put inception_v3_google-0cc3c7bd.pth into {cache}" in err
    assert "--weights PATH" in err and "--no_pretrained" in err


@pytest.fixture(scope="module")
def paper_alexnet_checkpoint(tmp_path_factory):
    """A list folder and an AlexNet checkpoint written as the paper's code saves it (16 bits), with its
    tensors, built without this project's network code."""
    root = tmp_path_factory.mktemp("paper")
    folder = small_list_folder(root / "mine", count=12)
    torch.manual_seed(3)
    state = {f"features.{key}": value for key, value in models.alexnet().features.state_dict().items()}
    for index, (fan_in, fan_out) in {1: (9216, 4096), 4: (4096, 4096), 6: (4096, 16)}.items():
        state[f"hash_layer.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        state[f"hash_layer.{index}.bias"] = torch.randn(fan_out) * 0.01
    checkpoint = root / "list_alexnet_16.ckpt"
    torch.save(state, checkpoint)
    return folder, checkpoint, state


def reference_codes(state, paths):
    """The paper's AlexNet forward in eval mode, written with functional calls."""
    features = models.alexnet().features
    features.load_state_dict({key[len("features."):]: v for key, v in state.items() if key.startswith("features.")})
    transform = image_transform(224, train=False)
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])
    with torch.no_grad():
        x = torch.flatten(features.eval()(images), 1)
        x = F.relu(F.linear(x, state["hash_layer.1.weight"], state["hash_layer.1.bias"]))
        x = F.relu(F.linear(x, state["hash_layer.4.weight"], state["hash_layer.4.bias"]))
        return F.linear(x, state["hash_layer.6.weight"], state["hash_layer.6.bias"])


def test_paper_alexnet_checkpoint_loads_with_test(paper_alexnet_checkpoint, torch_home, tmp_path):
    folder, checkpoint, state = paper_alexnet_checkpoint
    result = retrieval.main(parse(["--dataset", "list", "--data_root", str(folder), "--backbone", "alexnet",
                                   "--hash_bit", "16", "--test", "--checkpoint", str(checkpoint), "--device", "cpu",
                                   "--workers", "0", "--output_dir", str(tmp_path / "out")]))
    query, database = ([line.split() for line in (folder / name).read_text().splitlines()]
                       for name in ("test.txt", "database.txt"))
    expected = map_at_k(reference_codes(state, [folder / row[0] for row in query]),
                        torch.tensor([[float(v) for v in row[1:]] for row in query]),
                        reference_codes(state, [folder / row[0] for row in database]),
                        torch.tensor([[float(v) for v in row[1:]] for row in database]), len(database))
    assert 0 < expected < 1  # the ranking matters, so other codes would give another figure
    assert result["map"] == pytest.approx(expected, abs=1e-6)


def test_checkpoint_of_other_bits_says_which(paper_alexnet_checkpoint, torch_home, capsys):
    folder, checkpoint, _ = paper_alexnet_checkpoint
    with pytest.raises(SystemExit):
        retrieval.cli(["--dataset", "list", "--data_root", str(folder), "--backbone", "alexnet", "--hash_bit", "48",
                       "--test", "--checkpoint", str(checkpoint), "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert "hash_layer.6.weight is (16, 4096) in the checkpoint but (48, 4096) in the model" in err
    assert "Pass the --backbone and --hash_bit it was trained with" in err
