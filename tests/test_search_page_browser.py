"""The search page as a person uses it, in a real headless Chromium (Debian's chromium, driven by Playwright):
open the page, pick a query, check the grid against the Python API, upload an image, take a screenshot.
Skipped, with the reason, where no browser is installed (.ci/run installs it)."""
import shutil
import threading
import time

import pytest
import uvicorn

from data.query_images import raw_image
from hashing.search import server as serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine: apt-get install -y chromium "
                                                          "(.ci/run does)")
# As the machine's own browser check runs it: no background traffic on a machine without a network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_url(search_service):
    service = search_service[2]
    sock = serve.bound_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(serve.create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/", service
    server.should_exit = True
    thread.join(timeout=10)


def test_the_page_shows_the_apis_results_and_takes_an_upload(page_url, tmp_path):
    url, service = page_url
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        # Locator waits: the page's Content-Security-Policy forbids the eval a wait_for_function string needs.
        page.locator("#run", has_text="bits").wait_for()
        assert "digits" in page.inner_text("#run") and "small" in page.inner_text("#run")

        page.fill("#k", "9")
        page.fill("#query-index", "4")
        page.click("#search-index")
        page.locator("#status", has_text="precision@9").wait_for()
        shown = page.eval_on_selector_all("#grid .result",
                                          "cards => cards.map(c => [+c.dataset.id, +c.dataset.distance])")
        expected = service.search_query(4, 9)["results"]
        assert shown == [[result["id"], result["distance"]] for result in expected]
        assert page.inner_text("#status").endswith(f"precision@9 {service.search_query(4, 9)['precision_at_k']:.3f}")
        marked = page.eval_on_selector_all("#grid .result", "cards => cards.map(c => c.classList.contains('relevant'))")
        assert marked == [result["relevant"] for result in expected]
        page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)

        upload = tmp_path / "query.png"
        raw_image(service.splits.query, 4).save(upload)
        page.set_input_files("#upload", str(upload))
        page.click("#search-upload")
        page.locator("#query", has_text="uploaded image").wait_for()
        uploaded = page.eval_on_selector_all("#grid .result", "cards => cards.map(c => +c.dataset.distance)")
        assert len(uploaded) == 9 and uploaded == sorted(uploaded)
        page.screenshot(path=str(tmp_path / "search_page_upload.png"), full_page=True)
        browser.close()
    assert (tmp_path / "search_page.png").stat().st_size > 10_000


def grid_of(page):
    return page.eval_on_selector_all("#grid .result", "cards => cards.map(c => [+c.dataset.id, +c.dataset.distance])")


def test_the_address_reproduces_what_the_page_shows(page_url, tmp_path):
    """A deep link shows its search on load; the page shows the first query when opened bare, puts each search
    into the address, shows an uploaded image back, and clears the results under an upload error."""
    url, service = page_url

    def expected(index, k):
        return [[result["id"], result["distance"]] for result in service.search_query(index, k)["results"]]

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url + "?query_index=3&k=7")
        page.locator("#status", has_text="precision@7").wait_for()
        assert grid_of(page) == expected(3, 7) and page.input_value("#query-index") == "3"
        assert page.inner_text("#query").startswith("query #3")

        page.goto(url)
        page.locator("#status", has_text="precision@10").wait_for()
        assert grid_of(page) == expected(0, 10)

        page.fill("#k", "5")
        page.fill("#query-index", "11")
        page.click("#search-index")
        page.locator("#status", has_text="precision@5").wait_for()
        assert page.url == url + "?query_index=11&k=5" and grid_of(page) == expected(11, 5)
        page.reload()
        page.locator("#status", has_text="precision@5").wait_for()
        assert grid_of(page) == expected(11, 5)

        upload = tmp_path / "query.png"
        raw_image(service.splits.query, 4).save(upload)
        page.set_input_files("#upload", str(upload))
        page.click("#search-upload")
        page.locator("#query", has_text="uploaded image").wait_for()
        shown = page.locator("#query img")
        assert shown.get_attribute("src").startswith("blob:")
        assert shown.evaluate("image => image.complete && image.naturalWidth") > 0

        (tmp_path / "notes.txt").write_text("not an image")
        page.set_input_files("#upload", str(tmp_path / "notes.txt"))
        page.click("#search-upload")
        page.locator("#status.error", has_text="not an image").wait_for()
        assert grid_of(page) == [] and page.inner_text("#query") == ""
        browser.close()
