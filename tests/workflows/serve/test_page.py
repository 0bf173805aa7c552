"""The page at ``/`` driven in headless Chromium (Debian's ``chromium`` package) with Playwright, against
the session's Serve application."""

import json
import os

import pytest

from .helpers import is_mp4

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, serve_app):
    page = browser.new_page()
    page.goto(serve_app.url)
    yield page
    page.close()


def test_generate_plays_the_video(page, serve_app):
    page.fill("#key", serve_app.key)
    page.fill("#prompt", "a red ball bouncing")
    page.fill("#seed", "5")
    page.fill("#dx", "0.25")  # dy left empty: 0
    with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "POST") as posted:
        page.click("#generate")
    assert json.loads(posted.value.post_data) == {"prompt": "a red ball bouncing", "seed": 5, "motion": [0, 0.25]}
    page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=180_000)
    video = page.evaluate("""() => { const v = document.getElementById('video');
        return {duration: v.duration, width: v.videoWidth, height: v.videoHeight, hidden: v.hidden, error: v.error}; }""")
    assert video == {"duration": pytest.approx(0.7, abs=0.05), "width": 32, "height": 32, "hidden": False,
                     "error": None}
    head = page.evaluate("""async () => { const src = document.getElementById('video').src;
        const bytes = new Uint8Array(await (await fetch(src)).arrayBuffer()); return Array.from(bytes.slice(0, 16)); }""")
    assert is_mp4(bytes(head))
    stages = page.locator("#stages li")
    assert stages.count() == 6
    assert all(s.get_attribute("data-status") == "done" for s in stages.all())
    assert "seed 5" in page.text_content("#state") and "done" in page.text_content("#state")
    assert page.is_hidden("#error")


def test_errors_are_shown(page, serve_app):
    page.fill("#key", "not-the-key")
    page.fill("#prompt", "a red ball bouncing")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "API key" in page.text_content("#error")
    assert page.is_hidden("#video")

    page.fill("#key", serve_app.key)
    page.fill("#prompt", "   ")  # passes the browser's `required`, refused by the server
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('prompt')", timeout=60_000)
    assert page.is_enabled("#generate")

    page.fill("#prompt", "a red ball bouncing")
    page.fill("#dy", "2")  # beyond the server's bound: its message, naming the field, is shown
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.startsWith('motion[0]')", timeout=60_000)
