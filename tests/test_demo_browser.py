"""The demo end to end in a real browser: ``difflineage demo`` serves tiny runs, Debian's chromium (driven by
Playwright's Python package, no browser of its own) opens the page, chooses a digit, clicks generate, and the page
must show the images asked for, their time and their counted FLOPs; a DyDiT must come beside its base DiT with its
pictures; bad requests must come back as messages while the page keeps serving; and nothing may be fetched from
anywhere but the demo's own server (it works offline).

The server is started once for the module. Each case saves a screenshot; with DIFFLINEAGE_DEMO_SCREENSHOTS=DIR the
two of docs/demo.md are written into DIR, of the runs named by DIFFLINEAGE_DEMO_DIT and DIFFLINEAGE_DEMO_DYDIT
(default: the tiny runs):

    DIFFLINEAGE_DEMO_DIT=runs/dit-nowarm DIFFLINEAGE_DEMO_DYDIT=runs/dydit-mnist/lambda-0.5 \\
        DIFFLINEAGE_DEMO_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_demo_browser.py
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_demo import tiny_runs

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = os.environ.get("DIFFLINEAGE_DEMO_SCREENSHOTS")


def _missing(reason: str) -> None:
    if os.environ.get("CI"):  # .ci/run installs both: there a missing one is a failure, not a skip
        pytest.fail(f"{reason} in CI")
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    _missing("Playwright's Python package is not installed (pip install -e '.[demo]')")
if not Path(CHROMIUM).exists():
    _missing(f"Debian's chromium is not at {CHROMIUM} (apt-get install chromium)")
expect.set_options(timeout=120_000)  # a sampling request on a loaded machine (the docs' runs) takes its time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    root = tiny_runs(tmp_path_factory)
    return {"dit": os.environ.get("DIFFLINEAGE_DEMO_DIT", str(root / "dit")),
            "dydit": os.environ.get("DIFFLINEAGE_DEMO_DYDIT", str(root / "dydit")),
            "dalle": os.environ.get("DIFFLINEAGE_DEMO_CAPTION", str(Path(__file__).parent / "fixtures" / "systems" /
                                                                    "dalle_prior"))}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """``difflineage demo DYDIT DIT`` in its own process, on a free port; its URL once it answers."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "difflineage", "demo", runs["dydit"], runs["dit"], runs["dalle"],
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=Path.cwd())
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"difflineage demo exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"difflineage demo did not answer on {url} within 180 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                                    "--disable-default-apps", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


class Page:
    """One tab on the demo, noting every request that goes anywhere but the demo's server."""

    def __init__(self, browser, url: str):
        self.url = url
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(120_000)
        self.elsewhere: list[str] = []
        self.page.on("request", self._note)
        self.page.goto(url)
        expect(self.page.locator("#about")).to_contain_text("parameters")

    def _note(self, request) -> None:
        if not request.url.startswith((self.url.rstrip("/"), "data:", "blob:")):
            self.elsewhere.append(request.url)

    def choose(self, box: str, value: str) -> None:
        self.page.click(f"#{box} input")
        self.page.get_by_role("option", name=value, exact=True).click()

    def type_into(self, box: str, value: str) -> None:
        field = self.page.locator(f"#{box} input")
        field.fill(value)
        field.press("Enter")

    def set_number(self, box: str, value: int) -> None:
        field = self.page.locator(f"#{box} input[type=number]")
        field.fill(str(value))
        field.press("Enter")

    def images(self, gallery: str):
        return self.page.locator(f"#{gallery} img")

    def shot(self, name: str, tmp_path: Path, docs: bool = True) -> Path:
        """A full-page screenshot: into DIFFLINEAGE_DEMO_SCREENSHOTS for the docs' pictures, else the test's folder."""
        path = Path(SCREENSHOTS) / f"{name}.png" if SCREENSHOTS and docs else tmp_path / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path


def wait_for_images(page: Page, gallery: str, n: int) -> None:
    page.page.wait_for_function(f"document.querySelectorAll('#{gallery} img').length >= {n} && "
                                f"[...document.querySelectorAll('#{gallery} img')].every(i => i.complete)")


TIME = re.compile(r"\d+\.\d+ s per image")
FLOPS = re.compile(r"\d[\d.]* [kMGT]?FLOPs per image")


def test_a_dit_draws_the_digit_asked_for_with_its_time_and_flops(browser, server, runs, tmp_path):
    page = Page(browser, server)
    page.choose("run", runs["dit"])
    expect(page.page.locator("#about")).to_contain_text("DiT (dit)")
    n = 16 if SCREENSHOTS else 6
    page.choose("class", "seven")
    page.set_number("n", n)
    page.page.click("#generate")
    wait_for_images(page, "gallery-0", n)
    expect(page.page.locator("#stats-0")).to_contain_text("FLOPs per image")
    assert page.images("gallery-0").count() == n
    page.images("gallery-0").first.click()  # a plain DiT has no heads, groups or tokens to inspect: no error
    page.page.wait_for_timeout(1000)
    assert "Error" not in page.page.inner_text("#status")
    page.page.keyboard.press("Escape")
    page.type_into("class", "elevn")
    page.page.click("#generate")
    expect(page.page.locator("#status")).to_contain_text("unknown class 'elevn'")
    assert page.images("gallery-0").count() == n  # a failed request keeps the last gallery
    page.choose("class", "seven")
    stats = page.page.inner_text("#stats-0")
    assert TIME.search(stats) and FLOPS.search(stats), stats
    assert "seven" in page.page.inner_text("#gallery-0")  # each image is captioned with its class
    expect(page.page.locator("#seed-used")).to_contain_text("seed 0")
    assert not page.page.locator("#gallery-1").is_visible()  # a DiT is drawn alone
    page.choose("preset", "few steps: DPM-Solver++, 10 steps")  # an example sets the controls it names
    expect(page.page.locator("#steps input[type=number]")).to_have_value("10")
    expect(page.page.locator("#sampler input[value=dpmpp_2m]")).to_be_checked()
    expect(page.page.locator("#files")).to_contain_text(".npz")
    page.shot("demo", tmp_path)
    assert page.elsewhere == [], f"the page fetched from elsewhere: {page.elsewhere}"


def test_a_dydit_comes_beside_its_base_with_its_pictures(browser, server, runs, tmp_path):
    page = Page(browser, server)  # the first run named is shown first: the DyDiT
    expect(page.page.locator("#about")).to_contain_text("DyDiT (dydit)")
    n = 8
    page.choose("class", "three")
    page.set_number("n", n)
    page.page.click("#generate")
    for gallery in ("gallery-0", "gallery-1"):
        wait_for_images(page, gallery, n)
        assert page.images(gallery).count() == n
    expect(page.page.locator("#stats-1")).to_contain_text("FLOPs per image")
    dydit, base = page.page.inner_text("#stats-0"), page.page.inner_text("#stats-1")
    for stats in (dydit, base):
        assert TIME.search(stats) and FLOPS.search(stats), stats
    assert "of the DiT's FLOPs" in dydit and "DiT (its base)" in base
    expect(page.page.locator("#token-picture img")).to_have_attribute("src", re.compile(r"tokens_0\.png"))
    expect(page.page.locator("#width-picture img")).to_have_attribute("src", re.compile(r"width_0\.png"))
    page.images("gallery-0").nth(2).click()  # choose sample 2: its pictures are drawn
    expect(page.page.locator("#token-picture img")).to_have_attribute("src", re.compile(r"tokens_2\.png"))
    page.page.keyboard.press("Escape")
    page.shot("demo_dydit", tmp_path)
    assert page.elsewhere == [], f"the page fetched from elsewhere: {page.elsewhere}"


def test_bad_requests_are_messages_and_the_page_keeps_serving(browser, server, runs, tmp_path):
    page = Page(browser, server)
    page.choose("run", runs["dit"])
    expect(page.page.locator("#about")).to_contain_text("DiT (dit)")
    page.type_into("class", "elevn")
    page.page.click("#generate")
    expect(page.page.locator("#status")).to_contain_text("unknown class 'elevn'")
    page.type_into("class", "a handwritten digit seven")
    page.page.click("#generate")
    expect(page.page.locator("#status")).to_contain_text("reads as a caption, but this run (dit) is class-conditional")
    page.type_into("run", str(Path(runs["dit"]) / "samples"))  # beneath a run it serves, but not a run
    expect(page.page.locator("#status")).to_contain_text("is not a checkpoint or run directory")
    page.type_into("run", str(tmp_path))  # a folder it was not started with
    expect(page.page.locator("#status")).to_contain_text("is not a run this demo serves")
    assert "Traceback" not in page.page.inner_text("body")
    page.choose("run", runs["dit"])  # and it still serves
    expect(page.page.locator("#status")).to_have_text("")
    page.choose("class", "two")
    page.set_number("n", 3)
    page.page.locator("#sampler label:has-text('dpmpp_2m')").click()
    page.set_number("steps", 5)
    page.page.click("#generate")
    wait_for_images(page, "gallery-0", 3)
    assert page.images("gallery-0").count() == 3
    expect(page.page.locator("#stats-0")).to_contain_text("sampler dpmpp_2m, steps 5")
    page.shot("demo_errors", tmp_path, docs=False)


def test_a_caption_run_suggests_captions_takes_free_text_and_reranks(browser, server, runs, tmp_path):
    page = Page(browser, server)
    page.choose("run", runs["dalle"])
    expect(page.page.locator("#about")).to_contain_text("condition: caption")
    expect(page.page.locator("#class")).to_be_hidden()
    expect(page.page.locator("#rerank")).to_be_visible()  # a DALL-E prior carrying a CLIP reranks
    page.page.click("#caption input")
    expect(page.page.get_by_role("option", name="a handwritten digit two", exact=True)).to_be_visible()  # suggested
    page.page.keyboard.press("Escape")
    page.type_into("caption", "a handwritten zebra")  # free text, with a word no caption holds
    page.set_number("n", 2)
    page.page.click("#generate")
    wait_for_images(page, "gallery-0", 2)
    expect(page.page.locator("#status")).to_contain_text("'zebra' never occurs in the captions this run was trained on")
    assert "a handwritten zebra" in page.page.inner_text("#gallery-0")  # each image is captioned with its caption
    assert "Traceback" not in page.page.inner_text("body")
    page.shot("demo_caption", tmp_path, docs=False)
    assert page.elsewhere == [], f"the page fetched from elsewhere: {page.elsewhere}"
