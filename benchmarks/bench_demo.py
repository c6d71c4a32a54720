"""How long the demo takes from a click on Generate to 16 digits on screen, for the quickstart DiT: in a real browser
(Debian's chromium driven by Playwright, as tests/test_demo_browser.py drives it) against ``difflineage demo`` in its
own process, on each sampling path the page offers.

    make quickstart                                   # the flagship DiT, in runs/quickstart-dit
    python benchmarks/bench_demo.py --run runs/quickstart-dit --threads 2

The paths, in this order (the fast path compiles the DiT's blocks in place, so it comes last):

- the recipe's sampler (DDIM 50 steps, guidance 3), the page's default;
- DPM-Solver++(2M) at 20 steps, no step cache;
- the fast path (``eval.sampling.fast_sampling``, what ``sample --fast`` uses: DPM-Solver++ 20 steps, a step cache
  calibrated on the model, the blocks compiled, bf16 autocast where native), its first click (which calibrates the
  cache and compiles the blocks for 16 images) and the clicks after it.

Each click asks for 16 sevens with a new seed; the time runs from the click to the moment the gallery holds the 16
new images, all decoded by the browser. The page's own figure for the sampling alone (the server's wall clock, shown
under the gallery) is recorded beside it, and so is the arithmetic it counted per image. The browser and the server
share the machine's cores (and here also with whatever else runs on it: the notes say so).
"""

import argparse
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from harness import record

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, threads: int, log: Path, compile_cache: Path) -> tuple[subprocess.Popen, str]:
    """``difflineage demo RUN`` in its own process, with an empty compile cache (so that the fast path's first click
    compiles from nothing, as on a fresh machine); its URL once it answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(compile_cache)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "difflineage", "demo", run, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"difflineage demo exited with status {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"difflineage demo did not answer on {url}:\n{log.read_text()}")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


class Clicker:
    """The page, and one timed click: set the seed, click Generate, wait for 16 new images, read the page's figures."""

    def __init__(self, page, n: int):
        self.page, self.n, self.seed = page, n, 100

    def sources(self) -> list[str]:
        return self.page.eval_on_selector_all("#gallery-0 img", "els => els.map(e => e.src)")

    def click(self) -> dict:
        self.seed += 1
        field = self.page.locator("#seed input")
        field.fill(str(self.seed))
        field.press("Tab")
        before = self.sources()
        start = time.perf_counter()
        self.page.click("#generate")
        self.page.wait_for_function(
            """([n, seed, before]) => {
                const imgs = [...document.querySelectorAll('#gallery-0 img')];
                const said = document.querySelector('#seed-used').innerText;
                return said.includes('seed ' + seed) && imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth)
                    && imgs.some(i => !before.includes(i.src));
            }""", arg=[self.n, self.seed, before], timeout=600_000, polling="raf")
        seconds = time.perf_counter() - start
        self.page.wait_for_selector("#stats-0 >> text=/FLOPs per image/", timeout=600_000)  # counting is done
        stats = self.page.inner_text("#stats-0")
        sampling = float(re.search(r"\(([\d.]+) s for", stats).group(1))
        flops = re.search(r"([\d.]+ [kMGT]?FLOPs) per image", stats).group(1)
        said = stats.split("sampling: ", 1)[1].strip()
        return {"seconds": seconds, "sampling": sampling, "flops": flops, "said": said}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/quickstart-dit", help="the quickstart DiT run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the demo's server (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="clicks per path (the fast path's first click apart)")
    ap.add_argument("--n", type=int, default=16, help="images per click")
    ap.add_argument("--shared", default="", help="what else ran on the machine meanwhile, for the notes")
    ap.add_argument("--no-record", action="store_true", help="print the rows, write nothing (a trial)")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    scratch = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    log = scratch / "server.log"
    proc, url = start_server(args.run, args.threads, log, scratch / "inductor-cache")
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("#about >> text=/parameters/")
            page.click("#class input")
            page.get_by_role("option", name="seven", exact=True).click()
            n = page.locator("#n input[type=number]")
            n.fill(str(args.n))
            n.press("Enter")
            clicker = Clicker(page, args.n)

            def choose(sampler: str, steps: int) -> None:
                page.locator(f"#sampler label:has-text('{sampler}')").click()
                field = page.locator("#steps input[type=number]")
                field.fill(str(steps))
                field.press("Enter")

            paths = {"recipe: DDIM 50 steps": ("ddim", 50), "DPM-Solver++ 20 steps": ("dpmpp_2m", 20)}
            clicks: dict[str, list[dict]] = {k: [] for k in paths}
            clicker.click()  # a first click, untimed: the server's and the browser's first-use costs
            for _ in range(args.repeats):  # the two plain paths interleaved
                for name, (sampler, steps) in paths.items():
                    choose(sampler, steps)
                    clicks[name].append(clicker.click())
            page.click("#fast input")  # the fast path: picks DPM-Solver++ 20 steps
            page.wait_for_function("document.querySelector('#steps input[type=number]').value == '20'")
            clicks["fast path, first click (calibrates the step cache, compiles the blocks)"] = [clicker.click()]
            clicks["fast path, later clicks"] = [clicker.click() for _ in range(args.repeats)]
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(scratch, ignore_errors=True)
    for name, got in clicks.items():
        times = [c["seconds"] for c in got]
        rows.append({"path": name, "click to 16 digits on screen (s)": round(statistics.median(times), 2),
                     "sampling in the server (s)": round(statistics.median(c["sampling"] for c in got), 2),
                     "clicks": len(got), "each click (s)": ", ".join(f"{t:.2f}" for t in times),
                     "counted per image": got[-1]["flops"], "as the page says": got[-1]["said"]})
    shared = f" The cores were shared with other work: {args.shared}." if args.shared else ""
    notes = (f"CPU: {cpu_model()} (lscpu); the demo's server ran with {args.threads} torch thread(s), the browser "
             f"(headless chromium) on the same machine.{shared} {args.n} sevens per click (the sampling settings as "
             "the page says them), a new seed each click; medians over the clicks (the fast path's first click "
             "apart, which compiles with an empty compile cache). 'Sampling in the server' is the page's own "
             "wall-clock figure for drawing the images; the rest of a click is the request, writing the PNGs, "
             "sending and decoding them. FLOPs are counted after the images are shown, so they are not in the "
             "click's time.")
    if args.no_record:
        print(json.dumps(rows, indent=2), notes, sep="\n")
        return
    cmd = "python benchmarks/bench_demo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    record("demo", "The demo: click to 16 digits on screen, quickstart DiT", rows, notes, command=cmd.strip())


if __name__ == "__main__":
    main()
