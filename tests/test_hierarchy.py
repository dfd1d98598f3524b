"""Hierarchical proxies (HPL) on top of the proxy losses."""
import numpy as np
import pytest
import torch

from loss import PROXY_LOSSES, HierarchicalProxyLoss, build_loss
from test_baselines import batch, reference_hhf, reference_proxy_anchor
from test_loss import reference_hyp2
from hashing import codetable
from session.parts import given_hierarchy


def clustered_proxies(groups, bits=8, noise=0.05, seed=0):
    """Proxies in tight groups around random directions: groups=[3, 2] gives classes 0-2 and 3-4."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(groups), bits, generator=generator)
    rows = [centres[g] + noise * torch.randn(bits, generator=generator) for g, size in enumerate(groups)
            for _ in range(size)]
    return torch.stack(rows)


def hierarchy(name="hyp2", groups=(3, 2), num_coarse=2, **options):
    base = build_loss(name, sum(groups), 8)
    with torch.no_grad():
        base.proxies.copy_(clustered_proxies(list(groups)))
    return HierarchicalProxyLoss(base, num_coarse, **options)


def same_partition(assignment, groups):
    """Whether the cluster assignment puts exactly the classes of each group together."""
    blocks = np.split(np.asarray(assignment), np.cumsum(groups)[:-1])
    return all(len(set(block)) == 1 for block in blocks) and len({block[0] for block in blocks}) == len(blocks)


def test_clusters_follow_the_proxies():
    criterion = hierarchy(groups=(3, 2, 4), num_coarse=3)
    assert same_partition(criterion.assignment.tolist(), [3, 2, 4])


def test_coarse_proxies_are_the_means_of_their_clusters():
    criterion = hierarchy(groups=(3, 2, 4), num_coarse=3)
    coarse = criterion.coarse_proxies()
    proxies, assignment = criterion.base.proxies.detach(), criterion.assignment.tolist()
    for cluster in range(3):
        members = [proxies[c] for c in range(9) if assignment[c] == cluster]
        assert torch.allclose(coarse[cluster], sum(members) / len(members), atol=1e-6)


def test_coarse_labels_are_the_clusters_of_the_labels():
    criterion = hierarchy(groups=(3, 2), num_coarse=2)
    first, second = criterion.assignment[0].item(), criterion.assignment[3].item()
    labels = torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    expected = torch.zeros(4, 2)
    expected[0, first] = expected[1, second] = expected[2, first] = expected[2, second] = 1
    assert torch.equal(criterion.coarse_labels(labels), expected)


@pytest.mark.parametrize("name", PROXY_LOSSES)
def test_value_is_fine_plus_weighted_coarse_level(name):
    groups = (3, 2, 1)
    criterion = hierarchy(name, groups=groups, num_coarse=3, coarse_weight=0.7).eval()
    codes, labels = batch(2, size=8, classes=6, bits=8)
    fine_proxies = criterion.base.proxies.detach()
    assignment = criterion.assignment.tolist()
    coarse_proxies = [sum(fine_proxies[c] for c in range(6) if assignment[c] == k).tolist() for k in range(3)]
    coarse_labels = [[float(any(y[c] > 0 and assignment[c] == k for c in range(6))) for k in range(3)]
                     for y in labels.tolist()]
    settings = criterion.base.hyperparameters()
    coarse_zeta = codetable.zeta(8, 3)

    def level(level_codes, level_labels, proxies, zeta, quantization):
        if name == "hyp2":
            return reference_hyp2(torch.tensor(level_codes), torch.tensor(level_labels), torch.tensor(proxies),
                                  settings["beta"], zeta)
        if name == "proxy_anchor":
            return reference_proxy_anchor(level_codes, level_labels, proxies, settings["alpha"], settings["delta"])
        return reference_hhf(level_codes, level_labels, proxies, settings["alpha"], settings["delta"],
                             quantization, zeta)

    # Cosines ignore the proxies' norms, so the sums above stand for the means.
    # HHF's quantisation depends on the codes alone: it counts once, with the fine level.
    expected = (level(codes.tolist(), labels.tolist(), fine_proxies.tolist(), settings.get("zeta"),
                      settings.get("quantization"))
                + 0.7 * level(codes.tolist(), coarse_labels, coarse_proxies, coarse_zeta, 0.0))
    assert criterion(codes, labels).item() == pytest.approx(expected, rel=1e-4)
    if name != "proxy_anchor":
        assert criterion.coarse_zeta == coarse_zeta != settings["zeta"]


def test_coarse_level_trains_the_fine_proxies():
    criterion = hierarchy(groups=(3, 2), num_coarse=2)
    codes, labels = batch(3, size=6, classes=5, bits=8)
    coarse_only = criterion.base.loss_given_proxies(codes, criterion.coarse_labels(labels),
                                                    criterion.coarse_proxies(), criterion.coarse_zeta)
    coarse_only.backward()
    assert (criterion.base.proxies.grad.abs().sum(dim=1) > 0).all()


def test_refresh_happens_every_t_training_iterations(monkeypatch):
    criterion = hierarchy(refresh_every=3)
    refreshed_at = []
    original = criterion.refresh
    monkeypatch.setattr(criterion, "refresh", lambda: (refreshed_at.append(int(criterion.iteration)), original()))
    codes, labels = batch(0, size=4, classes=5, bits=8)
    for _ in range(7):
        criterion(codes, labels)
    assert refreshed_at == [0, 3, 6] and int(criterion.iteration) == 7
    criterion.eval()
    criterion(codes, labels)
    assert refreshed_at == [0, 3, 6] and int(criterion.iteration) == 7  # evaluation neither counts nor refreshes


def test_refresh_regroups_moved_proxies():
    criterion = hierarchy(groups=(3, 2), num_coarse=2, refresh_every=2)
    codes, labels = batch(0, size=4, classes=5, bits=8)
    criterion(codes, labels)  # iteration 0: clusters {0, 1, 2}, {3, 4}
    assert same_partition(criterion.assignment.tolist(), [3, 2])
    with torch.no_grad():
        criterion.base.proxies.copy_(clustered_proxies([2, 3], seed=5))
    criterion(codes, labels)  # iteration 1: not yet
    assert same_partition(criterion.assignment.tolist(), [3, 2])
    criterion(codes, labels)  # iteration 2: refreshed
    assert same_partition(criterion.assignment.tolist(), [2, 3])


def test_clustering_is_deterministic():
    first, second = hierarchy(groups=(2, 2, 2, 2), num_coarse=3), hierarchy(groups=(2, 2, 2, 2), num_coarse=3)
    assert torch.equal(first.assignment, second.assignment)


def test_state_round_trips_through_a_checkpoint(tmp_path):
    criterion = hierarchy(groups=(3, 2), num_coarse=2, refresh_every=4)
    codes, labels = batch(1, size=4, classes=5, bits=8)
    for _ in range(5):
        criterion(codes, labels)
    torch.save(criterion.state_dict(), tmp_path / "loss.ckpt")
    assert set(criterion.state_dict()) == {"base.proxies", "assignment", "iteration"}

    torch.manual_seed(9)
    restored = HierarchicalProxyLoss(build_loss("hyp2", 5, 8), 2, refresh_every=4)
    restored.load_state_dict(torch.load(tmp_path / "loss.ckpt", weights_only=True))
    assert int(restored.iteration) == 5
    assert torch.equal(restored.assignment, criterion.assignment)
    assert restored.eval()(codes, labels).item() == criterion.eval()(codes, labels).item()


def test_rejects_what_cannot_be_a_hierarchy():
    with pytest.raises(ValueError, match="need a proxy loss"):
        HierarchicalProxyLoss(build_loss("dpsh", 5, 8), 2)
    for clusters in (1, 5):
        with pytest.raises(ValueError, match="needs 2 to 4 clusters for 5 classes"):
            HierarchicalProxyLoss(build_loss("hyp2", 5, 8), clusters)


def test_reports_its_settings():
    settings = hierarchy(groups=(3, 2), num_coarse=2, refresh_every=7, coarse_weight=0.25).hyperparameters()
    assert settings["hierarchy"] == 2 and settings["hierarchy_every"] == 7 and settings["hierarchy_weight"] == 0.25
    assert settings["beta"] == 0.5 and settings["coarse_zeta"] == codetable.zeta(8, 2)
    assert "coarse_zeta" not in hierarchy("proxy_anchor").hyperparameters()


# ============ given hierarchies (--hierarchy_file) and the warm-up (--hierarchy_warmup) ============

def test_given_levels_add_each_coarse_level_with_its_weight():
    torch.manual_seed(0)
    levels = [[0, 0, 1, 1, 1, 2], [0, 0, 0, 1, 1, 1]]  # two coarse levels over 6 classes
    criterion = HierarchicalProxyLoss(build_loss("hyp2", 6, 8), levels=levels, coarse_weight=0.3).eval()
    codes, labels = batch(4, size=8, classes=6, bits=8)
    fine = criterion.base.proxies.detach()
    expected = reference_hyp2(codes, labels, fine, 0.5, criterion.base.zeta)
    for level in levels:
        groups = max(level) + 1
        proxies = torch.stack([sum(fine[c] for c in range(6) if level[c] == g) for g in range(groups)])
        coarse_labels = torch.tensor([[float(any(y[c] > 0 and level[c] == g for c in range(6))) for g in range(groups)]
                                      for y in labels.tolist()])
        expected += 0.3 * reference_hyp2(codes, coarse_labels, proxies, 0.5, codetable.zeta(8, groups))
    assert criterion(codes, labels).item() == pytest.approx(expected, rel=1e-5)
    assert criterion.hyperparameters()["hierarchy_levels"] == [3, 2]


def test_warm_up_trains_the_fine_level_alone_and_clusters_afterwards(monkeypatch):
    criterion = hierarchy(warmup_epochs=2, refresh_every=100)
    refreshed_at = []
    original = criterion.refresh
    monkeypatch.setattr(criterion, "refresh", lambda: (refreshed_at.append(criterion.epoch), original()))
    codes, labels = batch(0, size=4, classes=5, bits=8)
    fine_only = criterion.base(codes, labels).item()
    for epoch in (1, 2):
        criterion.set_epoch(epoch)
        assert criterion(codes, labels).item() == pytest.approx(fine_only)
    assert refreshed_at == [] and int(criterion.iteration) == 0
    criterion.set_epoch(3)
    assert criterion(codes, labels).item() > fine_only  # the coarse level counts from now on
    assert refreshed_at == [3] and int(criterion.iteration) == 1


def test_shipped_hierarchies_read_as_documented():
    from data.digits import SPEC as DIGITS
    from data.hierarchy_files import read_hierarchy
    from data.voc import CLASSES as VOC_CLASSES
    voc = read_hierarchy("voc", 20, VOC_CLASSES)
    assert voc.level_names == [["vehicle", "animal", "indoor", "person"]]
    assert [VOC_CLASSES[c] for c in range(20) if voc.levels[0][c] == 3] == ["person"]
    coco = read_hierarchy("coco", 80)
    animal = coco.level_names[0].index("animal")
    assert len(coco.level_names[0]) == 12 and sum(group == animal for group in coco.levels[0]) == 10
    parity = read_hierarchy("digits", 10, DIGITS.class_names)
    assert parity.levels == [[digit % 2 for digit in range(10)]] and parity.name == "digits"


@pytest.mark.parametrize("text, message", [
    ("label,group\n0,a\n1,b\n2,a\n", "first line must be the header"),
    ("class,group\n0,a\n1,b\n", "2 classes, but the dataset has 3"),
    ("class,group\n0,a\n2,b\n1,a\n", "line 3: class '2', but class 1 of the dataset is '1'"),
    ("class,group\n0,a\n1,\n2,a\n", "line 3: expected 2 non-empty fields"),
    ("class,group\n0,a\n1,a\n2,a\n", "level 1 has 1 groups"),
])
def test_bad_hierarchy_files_name_the_file_and_line(tmp_path, text, message):
    from data.hierarchy_files import read_hierarchy
    path = tmp_path / "h.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_hierarchy(str(path), 3, ("0", "1", "2"))
    assert str(path) in str(error.value)


def test_cli_refuses_two_hierarchies_and_names_a_bad_file(tmp_path):
    import retrieval
    from utils.errors import UserError
    parse = retrieval.get_args_parser().parse_args
    with pytest.raises(UserError, match="--hierarchy K clusters .* --hierarchy_file gives the groups"):
        retrieval.check_flags(parse(["--hierarchy", "2", "--hierarchy_file", "digits"]))
    from data.digits import SPEC as DIGITS
    with pytest.raises(UserError, match="--hierarchy_file: .*voc.csv: 20 classes, but the dataset has 10"):
        given_hierarchy(parse(["--hierarchy_file", "voc"]), DIGITS)
