"""The Python example of docs/SEARCH.md runs as printed. The checkpoint loader it starts from
(hashing.api.load_checkpoint) is stood in for by a tiny network here, so that what the example does with the
index is run for real."""
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from hashing.codes import pack_signs

DOC = Path(__file__).resolve().parents[1] / "docs" / "SEARCH.md"


class StandInModel:
    """What the example needs of a loaded checkpoint: encode(images) -> packed codes of 48 bits."""

    def __init__(self, path):
        torch.manual_seed(0)
        self.network = torch.nn.Sequential(v2.Resize(8), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 48))
        self.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def encode(self, images):
        with torch.no_grad():
            return pack_signs(self.network(torch.stack([self.transform(image) for image in images])))


def test_the_search_example_runs(tmp_path, monkeypatch):
    example = re.search(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL).group(1)
    assert len(example.strip().splitlines()) <= 13  # the imports and about 10 lines
    api = types.ModuleType("hashing.api")
    api.load_checkpoint = StandInModel
    monkeypatch.setitem(sys.modules, "hashing.api", api)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, str(DOC), "exec"), namespace)
    distances, ids = namespace["distances"], namespace["ids"]
    assert ids.shape == (1, 5)
    assert list(distances[0, :2]) == [0, 0] and list(ids[0, :2]) == [0, 100]  # the query's image and its copy
    assert np.all(np.diff(distances[0]) >= 0)
    within_distances, within_ids = namespace["within"]
    assert np.all(within_distances <= 2) and {0, 100} <= set(within_ids)
    assert (tmp_path / "images.index").is_file()
