import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _seeded():
    import torch
    torch.manual_seed(0)


CHECKOUT_OUTPUTS = ("result", "data")


def _listing():
    return {folder: sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
                           if "__pycache__" not in p.parts) for folder in CHECKOUT_OUTPUTS}


def pytest_sessionstart(session):
    session.config._checkout_listing = _listing()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under temporary folders: a file new in the checkout's result/ or data/ fails the run."""
    before, after = session.config._checkout_listing, _listing()
    added = sorted(set(sum(after.values(), [])) - set(sum(before.values(), [])))
    if added:
        print(f"\nthe tests wrote into the checkout: {', '.join(added)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SEARCH_RUN = ["--dataset", "digits", "--backbone", "small", "--hash_bit", "16", "--subset", "200", "--epochs", "2",
              "--batch_size", "50", "--device", "cpu", "--no_progress"]


@pytest.fixture(scope="session")
def search_service(tmp_path_factory):
    """(output folder, model, SearchService) of a tiny digits run, shared by the search API, page and browser
    tests (training once)."""
    import retrieval
    from hashing.search import server as serve
    from hashing.search.api import load_checkpoint

    out = tmp_path_factory.mktemp("search")
    retrieval.main(retrieval.parse_args(SEARCH_RUN + ["--output_dir", str(out)]))
    model = load_checkpoint(out / "digits_small_16.ckpt", device="cpu")
    return out, model, serve.SearchService.for_model(model)
