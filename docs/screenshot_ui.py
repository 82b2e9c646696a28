"""Take docs/ui-judgment.png: the web page's judgment view of a real judgment of the default model.

Starts `tracehead serve` on the default model with a temporary data dir on a
free port of 127.0.0.1, sends a chat question at temperature 0 (trying the
next question until a constraint fails), opens the judgment's page in headless
Chromium (the system package, driven by Playwright, which downloads nothing),
selects the lowest-scoring token of the first failed constraint and saves the
view from the top to the end of the token section.

    .venv/bin/python docs/screenshot_ui.py [--output docs/ui-judgment.png]

Needs the default model (`tracehead models fetch`), `chromium` and the dev extra.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "Is it fair to split a bill equally?"]
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1200, "height": 900}
READY_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(data_dir: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"TRACEHEAD_DATA_DIR": str(data_dir), "TRACEHEAD_PORT": str(port),
                        "TRACEHEAD_HOST": "127.0.0.1", "TRACEHEAD_AUTH": "none"}
    log = (data_dir / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}:\n{(data_dir / 'server.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    sys.exit(f"the server was not ready within {READY_TIMEOUT_S} s")


def flagged_judgment(url: str) -> dict:
    """Ask each question in turn; return the first judgment in which a constraint failed."""
    for question in QUESTIONS:
        response = httpx.post(f"{url}/v1/generate", timeout=120, json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0})
        response.raise_for_status()
        body = response.json()
        failed = [name for name, verdict in body["judgment"]["constraints"].items() if not verdict["passed"]]
        print(f"{question!r}: {body['text']!r}; failed: {', '.join(failed) or 'none'}")
        if failed:
            return body | {"failed": failed}
    sys.exit(f"no constraint failed for any of {QUESTIONS}; add a question")


def screenshot(url: str, judgment: dict, output: Path) -> None:
    chromium = shutil.which("chromium") or sys.exit("chromium not found; apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{url}/ui/?judgment={judgment['id']}")
        page.wait_for_selector("#badge:not([data-status=checking])")
        page.click(f'#verdicts tr[data-constraint="{judgment["failed"][0]}"] button.lowest')
        # The tooltip of the focused token would cover the output; Escape hides it.
        page.keyboard.press("Escape")
        page.mouse.move(0, 0)
        bottom = page.locator("#tokens-title").evaluate("title => title.closest('section').getBoundingClientRect()"
                                                        ".bottom + window.scrollY")
        page.screenshot(path=str(output), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom + 16},
                        full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "ui-judgment.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tracehead-ui-") as data_dir:
        port = free_port()
        process = start_server(Path(data_dir), port)
        try:
            url = f"http://127.0.0.1:{port}"
            screenshot(url, flagged_judgment(url), args.output)
        finally:
            process.terminate()
            process.wait(30)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
