"""The web page end to end in headless Chromium (Debian's ``chromium``, driven by Playwright):
upload a slide through the page, watch it finish, look at its nuclei over the slide."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.deps import key_digest
from tests.service._server import CMU1, Server, service_env

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
KEY = "web-test-key"
ROI = (1300, 700, 700, 700)
DRAWN = "() => Number(document.getElementById('overlay').dataset.drawn) > 0"
FITS = """() => [document.documentElement, document.querySelector('.side')]
    .every(e => e.scrollWidth <= e.clientWidth)"""
"""Neither the page nor the side panel scrolls sideways (no layout break)."""
"""The overlay drew nuclei (a function: the page's CSP forbids evaluating strings)."""
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-default-apps", "--disable-domain-reliability"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("web")
    with Server(service_env(home, api_keys=key_digest(KEY)), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file() or shutil.which("chromium"), "apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _own(url: str, server: Server) -> bool:
    return url.startswith(server.url + "/") or url.startswith(("blob:", "data:"))


def test_upload_run_and_view_a_slide_in_the_browser(server: Server, browser, tmp_path: Path) -> None:
    width, height = 1280, 800
    context = browser.new_context(viewport={"width": width, "height": height})
    requests: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    page = context.new_page()
    try:
        page.goto(f"{server.url}/")
        page.get_by_label("API key").fill(KEY)
        page.keyboard.press("Tab")  # the key is taken on change, as a user leaving the field
        page.wait_for_function("() => document.querySelectorAll('#model option[value=oracle]').length == 1")
        page.get_by_label("Model").select_option("oracle")
        # A part of the slide with many nuclei: a whole-slide run takes minutes on a busy machine.
        for label, value in zip(("x", "y", "width", "height"), ROI, strict=True):
            page.get_by_label(label, exact=True).fill(str(value))
        page.get_by_label("Slide file").set_input_files(str(CMU1))
        page.get_by_role("button", name="Upload and run").click()
        page.wait_for_function("() => document.getElementById('upload-progress').value === 1")
        row = page.locator("#jobs tbody tr").first
        row.and_(page.locator(":is([data-state=succeeded], [data-state=failed], [data-state=cancelled])")
                 ).wait_for(timeout=240_000)
        assert row.get_attribute("data-state") == "succeeded", row.inner_text()
        assert row.locator("td.model").inner_text() == "oracle"
        assert row.locator("progress").evaluate("p => p.value") == 1
        job_id = row.get_attribute("data-job")
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # no layout break

        row.locator("a.open").click()
        page.wait_for_url(f"{server.url}/jobs/{job_id}")
        page.wait_for_selector("body[data-ready=true]")
        page.wait_for_function(DRAWN)
        page.wait_for_function("""() => { const c = document.getElementById('tiles');
            return Number(c.dataset.tilesDrawn) > 0 && c.dataset.tilesDrawn === c.dataset.tilesWanted; }""")
        assert page.locator("#overlay").get_attribute("data-mode") == "outlines"
        # Nucleus outlines are on the overlay canvas, over slide pixels on the tile canvas.
        painted = page.evaluate("""() => {
            const o = document.getElementById('overlay'), t = document.getElementById('tiles');
            const a = o.getContext('2d').getImageData(0, 0, o.width, o.height).data;
            const b = t.getContext('2d').getImageData(0, 0, t.width, t.height).data;
            let outline = 0, tissue = 0;
            for (let i = 3; i < a.length; i += 4) if (a[i] > 0) outline++;
            for (let i = 0; i < b.length; i += 4) if (b[i] < 200 && b[i + 2] < 230) tissue++;
            return [outline, tissue];
        }""")
        assert painted[0] > 500 and painted[1] > 10_000, painted

        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as api:
            counts = api.get(f"/v1/jobs/{job_id}/results/counts.json").json()
        legend = {row.get_attribute("data-class"): int(row.locator("td.count").get_attribute("data-value"))
                  for row in page.locator("#legend tbody tr").all()}
        assert legend == {**counts["classes"], "Unclassified": counts["unclassified"]}
        assert int(page.locator("#total-count").get_attribute("data-value")) == counts["total"]

        page.locator("#viewer").focus()
        page.keyboard.press("+")
        page.keyboard.press("ArrowLeft")
        page.wait_for_function(DRAWN)
        assert page.get_by_role("button", name="Download counts.json").is_visible()

        # A click inside an outline shows that nucleus' measurements.
        inside = page.evaluate("""() => {
            const o = document.getElementById('overlay'), ratio = window.devicePixelRatio || 1;
            const a = o.getContext('2d').getImageData(0, 0, o.width, o.height).data;
            for (let i = 3; i < a.length; i += 4 * 7) if (a[i] > 20 && a[i] < 80) {
                const p = (i - 3) / 4; return [(p % o.width) / ratio, Math.floor(p / o.width) / ratio];
            }
            return null; }""")
        assert inside is not None
        box = page.locator("#viewer").bounding_box()
        page.mouse.click(box["x"] + inside[0], box["y"] + inside[1])
        page.locator("#details dl").wait_for()
        assert "Class" in page.locator("#details").inner_text()

        assert page.evaluate(FITS)
        screenshot = tmp_path / "viewer.png"
        page.screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 10_000
        page.set_viewport_size({"width": 1920, "height": 1080})
        page.wait_for_function(DRAWN)
        assert page.evaluate(FITS)
        page.screenshot(path=str(tmp_path / "viewer-1920.png"))
        assert (tmp_path / "viewer-1920.png").stat().st_size > 10_000
        for _ in range(6):  # zoomed out: the density of the count grid instead of outlines
            page.keyboard.press("-")
        page.wait_for_function("() => document.getElementById('overlay').dataset.mode === 'density'")
        page.wait_for_function(DRAWN)

        page.get_by_role("link", name="HoVerServe").click()  # back home: the key is still there
        page.get_by_role("button", name="Delete job CMU-1-Small-Region.svs and its results").click()
        page.locator(f"#jobs tbody tr[data-job='{job_id}']").wait_for(state="detached")
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as api:
            assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    finally:
        context.close()
    outside = [url for url in requests if not _own(url, server)]
    assert not outside, json.dumps(outside)
    assert any("/slide_files/" in url for url in requests)
    assert any("/nuclei?bbox=" in url for url in requests)


def test_the_pages_and_assets_keep_every_request_on_this_server(server: Server) -> None:
    for path in ("/", "/jobs/0123456789abcdef0123456789abcdef", "/web/viewer.js", "/web/style.css"):
        response = httpx.get(server.url + path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert httpx.get(f"{server.url}/web/viewer.js").headers["content-type"].startswith("text/javascript")
    page = httpx.get(f"{server.url}/").text
    assert "http://" not in page and "https://" not in page  # no CDN, no external resource


@pytest.mark.parametrize("path", ["/web/../api.js", "/web/nothing.js", "/jobs/not-a-job", "/web/__init__.py"])
def test_unknown_pages_and_assets_are_json_404s(server: Server, path: str) -> None:
    response = httpx.get(server.url + path)
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message"}
