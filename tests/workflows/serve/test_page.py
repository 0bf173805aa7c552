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


def test_edit_mode_tunes_and_plays_the_edit_beside_the_source(page, serve_app, tmp_path):
    import numpy as np

    from workflows.shapes import world
    from workflows.video import encode_mp4

    source = tmp_path / "circle.mp4"
    source.write_bytes(encode_mp4(world.moving_video(np.random.default_rng(1), 32, 12, "red", "circle"), 30))
    page.fill("#key", serve_app.key)
    page.click("#mode-edit")
    assert page.is_hidden("#form") and page.is_visible("#edit-form")
    page.set_input_files("#clip", str(source))
    page.fill("#caption", "a red circle on a white background")
    page.fill("#edit-prompt", "a blue square on a white background")
    page.fill("#edit-seed", "4")
    page.fill("#tune-steps", "1")
    with page.expect_response(lambda r: r.url.endswith("/v1/edits") and r.request.method == "POST") as answered:
        page.click("#edit")
    assert answered.value.status == 202
    edit_id = answered.value.json()["id"]
    page.wait_for_selector("#tuning:not([hidden])", timeout=60_000)
    page.wait_for_function("document.getElementById('edited').readyState >= 1", timeout=240_000)
    videos = page.evaluate("""() => ['source', 'edited'].map((id) => { const v = document.getElementById(id);
        return {duration: v.duration, width: v.videoWidth, error: v.error}; })""")
    assert videos == [{"duration": pytest.approx(0.4, abs=0.05), "width": 32, "error": None},
                      {"duration": pytest.approx(0.35, abs=0.05), "width": 32, "error": None}]
    assert page.is_visible("#pair") and page.is_hidden("#error")
    assert page.get_attribute("#tuning", "data-status") == "done"
    assert "step 1 of 1" in page.text_content("#tuning")
    stages = page.locator("#stages li")
    assert stages.count() == 6 and all(s.get_attribute("data-status") == "done" for s in stages.all())
    assert "seed 4" in page.text_content("#state") and "done" in page.text_content("#state")
    assert "a blue square" in page.text_content("#edited-caption")
    with serve_app.client() as c:  # what the page's form sent, as the server read it
        request = c.get(f"v1/edits/{edit_id}").json()["request"]
    assert (request["caption"], request["prompts"], request["seed"], request["tune_steps"]) == (
        "a red circle on a white background", ["a blue square on a white background"], 4, 1)
    assert (request["clip"]["name"], request["clip"]["frames"]) == ("circle.mp4", 12)
