"""End to end: `conceptrol ui --demo` served on localhost and driven in headless Chromium, as a user clicks it."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conceptrol.app.offline_demo import reference_picture

# Chromium as this machine allows it: no sandbox as root, and no background connections to a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    found = os.environ.get("CONCEPTROL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "no Chromium found: install Debian's chromium (apt-get install chromium) or set CONCEPTROL_CHROMIUM"
    if os.environ.get("CONCEPTROL_REQUIRE_BROWSER"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ui_url(tmp_path):
    """`conceptrol ui --demo` in a subprocess, as a user starts it; yields its URL."""
    chromium_path()  # no browser: skip before starting a server
    env = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "ui.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "conceptrol.cli", "ui", "--demo", "--port", str(free_port())],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, text=True)
    try:
        yield _wait_for_url(process, tmp_path / "ui.log")
    finally:
        process.terminate()
        process.wait(timeout=30)
        output = (tmp_path / "ui.log").read_text()
        assert "Traceback" not in output, output


def _wait_for_url(process: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("Conceptrol UI: "):
                return line.split()[2]
        if process.poll() is not None:
            pytest.fail(f"conceptrol ui exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.5)
    pytest.fail(f"conceptrol ui did not start within {timeout} s:\n{log.read_text()}")


def test_upload_pick_a_concept_generate_and_see_three_images(ui_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    reference, named = tmp_path / "reference.png", tmp_path / "dog.png"
    reference_picture(128).save(reference)
    reference_picture(128).save(named)
    screenshot = Path(os.environ.get("CONCEPTROL_SCREENSHOT_DIR", tmp_path)) / "conceptrol-ui.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(ui_url)
        expect(page.locator("#generate")).to_be_visible(timeout=60_000)

        page.locator("#generate").click()  # nothing uploaded yet: the page says what to do
        expect(page.get_by_text("upload a reference image first")).to_be_visible(timeout=30_000)

        page.locator("#reference-0 input[type=file]").set_input_files(str(reference))
        expect(page.locator("#reference-0 img")).to_be_visible(timeout=30_000)
        concept = page.locator("#concept-0")
        expect(concept.get_by_label("dog", exact=True)).not_to_be_checked()  # 'reference.png' names no word
        concept.get_by_label("dog", exact=True).check()
        page.locator("#steps input[type=number]").fill("4")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()

        expect(page.locator("#conceptrol [role=progressbar]")).to_be_attached(timeout=60_000)
        for output in ("#vanilla img", "#conceptrol img", "#masks img"):
            expect(page.locator(output).first).to_be_visible(timeout=180_000)
        expect(page.locator("#status")).to_contain_text("Done in", timeout=30_000)
        expect(page.locator("#masks")).to_contain_text("mask of 'dog'")
        sizes = [page.locator(f"{output} img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
                 for output in ("#vanilla", "#conceptrol")]
        assert sizes == [[128, 96], [128, 96]]
        pictures = [page.request.get(page.locator(f"{output} img").first.get_attribute("src")).body()
                    for output in ("#vanilla", "#conceptrol")]
        assert pictures[0] != pictures[1]  # the mask changed the picture
        page.screenshot(path=str(screenshot), full_page=True)

        page.locator("#prompt textarea").fill("a cute dog surfing a wave")  # the clicked word follows the edit
        expect(concept.get_by_label("cute", exact=True)).not_to_be_checked(timeout=30_000)
        expect(concept.get_by_label("dog", exact=True)).to_be_checked()

        page.locator("#model input").click()  # another model: its own default settings
        page.get_by_role("option", name="tiny random FLUX + OminiControl LoRA (offline demo)").click()
        expect(page.locator("#steps input[type=number]")).to_have_value("8", timeout=30_000)

        page.locator("#more-subjects").get_by_text("More subjects").click()
        page.locator("#reference-1 input[type=file]").set_input_files(str(named))
        expect(page.locator("#concept-1").get_by_label("dog", exact=True)).to_be_checked(timeout=30_000)
        browser.close()
    assert screenshot.stat().st_size > 20_000
