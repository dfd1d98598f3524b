"""The figures name what they show: the t-SNE legend uses the dataset's class names."""
import numpy as np

from data import get_dataset_spec
from hashing.evaluation import plots


def legend_of_tsne(monkeypatch, tmp_path, class_names):
    saved = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: saved.append(figure))
    rng = np.random.default_rng(0)
    labels = np.eye(3)[rng.integers(0, 3, size=30)]
    codes = np.where(labels @ rng.standard_normal((3, 16)) + 0.1 * rng.standard_normal((30, 16)) >= 0, 1, -1)
    plots.plot_tsne(codes, labels, tmp_path / "x.tsne.png", "test", class_names=class_names)
    (figure,) = saved
    return sorted(text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts())


def test_tsne_legend_names_the_classes(monkeypatch, tmp_path):
    assert legend_of_tsne(monkeypatch, tmp_path, ("cat", "dog", "person")) == ["cat", "dog", "person"]
    assert legend_of_tsne(monkeypatch, tmp_path, ()) == ["class 0", "class 1", "class 2"]


def test_datasets_with_named_classes():
    assert get_dataset_spec("voc2007").class_names[14] == "person"
    assert get_dataset_spec("digits").class_names == tuple("0123456789")
    flickr = get_dataset_spec("flickr").class_names
    assert len(flickr) == 38 and flickr[0] == "animals" and "sky" in flickr
