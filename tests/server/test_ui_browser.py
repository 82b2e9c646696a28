"""The auditors' web page in headless Chromium, against a live server on the tiny model.

One browser serves the whole module; each test gets a fresh context (its own
sessionStorage). The server stores a few judgments with different constraints
failing, a scored response, a withheld, an erased and a tampered one. The
expected rows always come from the JSON API with the same filters.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text

from models.decode import ConstraintModel
from server.app import create_app
from server.settings import Settings
from tests.conftest import build_tiny_heads
from tests.environment import find_tool, skip_or_fail
from tests.server.helpers import MAX_TOKENS_LIMIT

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Thresholds between the tiny model's scores, so that each constraint fails for some judgments and not others.
THRESHOLDS = {"testifiability": 0.555, "decidability": 0.467, "reciprocity": 0.5, "causality": 0.61}
ROOT_PATH = "/tracehead"
# matplotlib's viridis at 0, 0.1, ..., 1, as the page interpolates it.
VIRIDIS = ["440154", "482475", "414487", "355f8d", "2a788e", "21918c", "22a884", "44bf70", "7ad151", "bddf26",
           "fde725"]
WAIT_MS = 10_000


# The server

@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yield its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it started serving"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class Judgments:
    url: str
    http: httpx.Client
    scored: str
    withheld: str
    erased: str
    tampered: str

    def ids(self, **params) -> list[str]:
        """The ids that GET /v1/judgments returns for ``params``, all pages."""
        ids, paging = [], {"limit": 100}
        while True:
            response = self.http.get("/v1/judgments", params=params | paging)
            assert response.status_code == 200, response.text
            ids += [item["id"] for item in response.json()["data"]]
            if not response.json()["next_cursor"]:
                return ids
            paging["cursor"] = response.json()["next_cursor"]

    def record(self, judgment_id: str) -> dict:
        return self.http.get(f"/v1/judgments/{judgment_id}").json()


def post(http: httpx.Client, path: str, body: dict) -> str:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def judgments(tmp_path_factory, tiny_base) -> Iterator[Judgments]:
    heads = build_tiny_heads(tiny_base)
    heads.config.thresholds = dict(THRESHOLDS)
    model = ConstraintModel(tiny_base, heads, top_k_attention=3)
    settings = Settings(data_dir=tmp_path_factory.mktemp("ui-browser"), max_tokens_limit=MAX_TOKENS_LIMIT,
                        root_path=ROOT_PATH)
    app = create_app(settings, model)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        for seed in range(5):
            post(http, "/v1/generate", {"prompt": "The capital of France is", "max_tokens": 4, "seed": seed,
                                        "metadata": {"team": "docs" if seed % 2 else "ops"}})
        post(http, "/v1/generate", {"prompt": "The road is wet because", "max_tokens": 4, "seed": 5})
        scored = post(http, "/v1/score", {"messages": [{"role": "user", "content": "What is the capital of Spain?"}],
                                          "response": "Madrid."})
        withheld = post(http, "/v1/generate", {"prompt": "Cats are mammals and", "max_tokens": 4, "seed": 6,
                                               "policy": {"reciprocity": {"min_score": 0.99, "action": "withhold"}}})
        erased = post(http, "/v1/generate", {"prompt": "Water boils at", "max_tokens": 4, "seed": 7})
        http.post(f"/v1/admin/judgments/{erased}/erase", json={"reason": "privacy request", "erased_by": "dpo"})
        tampered = post(http, "/v1/score", {"prompt": "The capital of France is", "response": " Lyon."})
        with app.state.runtime.engine.begin() as connection:
            connection.execute(text("UPDATE judgments SET output = ' Nice.' WHERE id = :id"), {"id": tampered})
        yield Judgments(url, http, scored, withheld, erased, tampered)


# The browser

@pytest.fixture(scope="module")
def browser():
    chromium = find_tool("chromium", "install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed; run `pip install -e '.[dev]'` (it uses the system Chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # A refused API call also logs "Failed to load resource"; the page shows those itself.
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    yield page
    context.close()
    assert errors == [], f"the page logged errors: {errors}"


def open_page(page, url: str) -> None:
    page.goto(url)
    settle(page)


def settle(page) -> None:
    """Wait until the page has finished rendering the current view."""
    page.wait_for_selector('#main[aria-busy="false"]', state="attached")


def row_ids(page) -> list[str]:
    return page.locator("#results tbody tr").evaluate_all("rows => rows.map(row => row.dataset.id)")


def apply(page, **fields) -> None:
    """Fill the filter form (input id suffix to value) and apply it."""
    for name, value in fields.items():
        element = page.locator(f"#f-{name}")
        kind = element.evaluate("element => element.type")
        if kind == "checkbox":
            element.set_checked(bool(value))
        elif kind.startswith("select"):
            element.select_option(value)
        else:
            element.fill(value)
    page.click("#filters button[type=submit]")
    settle(page)


def failing_constraint(judgments: Judgments) -> str:
    """A constraint that fails for some judgments but not all."""
    everything = len(judgments.ids())
    for name in THRESHOLDS:
        failed = len(judgments.ids(constraint=name, passed="false"))
        if 0 < failed < everything:
            return name
    raise AssertionError(f"with thresholds {THRESHOLDS} no constraint fails for only some judgments")


# The list

def test_list_filters_narrow_rows(page, judgments):
    open_page(page, f"{judgments.url}/ui/")
    assert row_ids(page) == judgments.ids()

    constraint = failing_constraint(judgments)
    apply(page, constraint=constraint, failed=True)
    assert row_ids(page) == judgments.ids(constraint=constraint, passed="false")
    assert f"constraint={constraint}" in page.url
    assert "passed=false" in page.url

    page.reload()
    settle(page)
    assert row_ids(page) == judgments.ids(constraint=constraint, passed="false")
    assert page.locator("#f-failed").is_checked()

    page.click("#reset")
    settle(page)
    apply(page, flagged="false")
    not_flagged = judgments.ids(flagged="false")
    assert 0 < len(not_flagged) < len(judgments.ids()), "the fixture needs flagged and unflagged judgments"
    assert row_ids(page) == not_flagged

    apply(page, flagged="", q="spain")
    assert row_ids(page) == judgments.ids(q="spain") == [judgments.scored]

    apply(page, q="", constraint=constraint, min="0.5", max="0.6", failed=False)
    assert row_ids(page) == judgments.ids(constraint=constraint, min_score=0.5, max_score=0.6)


def test_score_bounds_need_a_constraint(page, judgments):
    open_page(page, f"{judgments.url}/ui/")

    assert page.locator("#f-min").is_disabled()
    assert page.locator("#f-failed").is_disabled()
    page.select_option("#f-constraint", "causality")
    assert page.locator("#f-min").is_enabled()


def test_paging_forward_and_back(page, judgments):
    everything = judgments.ids()
    open_page(page, f"{judgments.url}/ui/?limit=3")
    pages = [row_ids(page)]
    while page.locator("#next").is_enabled():
        page.click("#next")
        settle(page)
        pages.append(row_ids(page))

    assert [len(ids) for ids in pages[:-1]] == [3] * (len(pages) - 1)
    assert sum(pages, []) == everything
    assert page.locator("#page-label").inner_text().startswith(f"Page {len(pages)}")

    page.click("#prev")
    settle(page)
    assert row_ids(page) == pages[-2]
    page.go_back()
    settle(page)
    assert row_ids(page) == pages[-1]


def test_list_error_shows_the_api_message(page, judgments):
    open_page(page, f"{judgments.url}/ui/?since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z")

    assert "is not before until" in page.locator("#notice").inner_text()


def test_page_works_under_a_path_prefix(page, judgments):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    open_page(page, f"{judgments.url}{ROOT_PATH}/ui")

    assert page.url == f"{judgments.url}{ROOT_PATH}/ui/"
    assert row_ids(page) == judgments.ids()
    api_calls = [url for url in requests if "/v1/" in url]
    assert api_calls and all(url.startswith(f"{judgments.url}{ROOT_PATH}/v1/") for url in api_calls)


# Export

def test_export_downloads_the_filtered_records(page, judgments):
    constraint = failing_constraint(judgments)
    open_page(page, f"{judgments.url}/ui/?constraint={constraint}&passed=false&limit=10")
    expected = judgments.ids(constraint=constraint, passed="false")

    with page.expect_download() as jsonl:
        page.click("#export-jsonl")
    with page.expect_download() as table:
        page.click("#export-csv")

    assert jsonl.value.suggested_filename.endswith(".jsonl")
    lines = Path(jsonl.value.path()).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == expected
    rows = list(csv.DictReader(Path(table.value.path()).read_text().splitlines()))
    assert [row["id"] for row in rows] == expected
    assert all(row[f"{constraint}_passed"] == "false" for row in rows)
    assert "Saved judgments-" in page.locator(".export-status").inner_text()


# A judgment

def open_judgment(page, judgments: Judgments, judgment_id: str, query: str = "") -> dict:
    open_page(page, f"{judgments.url}/ui/?judgment={judgment_id}{query}")
    page.wait_for_selector("#badge:not([data-status=checking])")
    return judgments.record(judgment_id)


def viridis(score: float) -> str:
    stops = [[int(stop[i:i + 2], 16) for i in (0, 2, 4)] for stop in VIRIDIS]
    at = min(1.0, max(0.0, score)) * (len(stops) - 1)
    low = min(int(at), len(stops) - 2)
    rgb = [round(a + (b - a) * (at - low)) for a, b in zip(stops[low], stops[low + 1])]
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def contrast(first: str, second: str) -> float:
    def luminance(color: str) -> float:
        channels = [int(value) / 255 for value in re.findall(r"\d+", color)[:3]]
        r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    light, dark = sorted([luminance(first), luminance(second)], reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_heatmap_has_one_coloured_span_per_token(page, judgments):
    record = open_judgment(page, judgments, judgments.scored, "&heat=causality")
    trace = record["trace"]

    for part in ("prompt", "output"):
        spans = page.locator(f"#tokens .token[data-part={part}]").evaluate_all("""spans => spans.map(span => ({
            position: Number(span.dataset.position), score: Number(span.dataset.score), text: span.textContent,
            background: getComputedStyle(span).backgroundColor, color: getComputedStyle(span).color,
            label: span.getAttribute('aria-label')}))""")
        tokens = trace[f"{part}_tokens"]
        assert [span["position"] for span in spans] == [token["position"] for token in tokens]
        for span, token in zip(spans, tokens):
            assert span["score"] == token["scores"]["causality"]
            assert span["background"] == viridis(token["scores"]["causality"])
            assert contrast(span["background"], span["color"]) >= 4.5
            assert f"causality {token['scores']['causality']:.3f}" in span["label"]
    assert page.locator("#tokens .token").count() == len(trace["prompt_tokens"]) + len(trace["output_tokens"])
    threshold = f"{record['judgment']['constraints']['causality']['threshold']:.3f}"
    assert f"threshold {threshold}" in page.locator(".legend").inner_text()

    page.select_option("#heat", "reciprocity")
    first = trace["prompt_tokens"][0]["scores"]["reciprocity"]
    assert page.locator("#token-0").evaluate("span => getComputedStyle(span).backgroundColor") == viridis(first)
    assert "heat=reciprocity" in page.url
    assert page.locator(".chart-plot polyline").count() == len(trace["constraints"])


def test_token_shows_its_attention_per_constraint(page, judgments):
    record = open_judgment(page, judgments, judgments.scored)
    token = record["trace"]["output_tokens"][2]

    page.click(f"#token-{token['position']}")

    assert page.locator(f"#token-{token['position']}").get_attribute("aria-selected") == "true"
    assert f"Token {token['position']} " in page.locator(".why-token").inner_text()
    for constraint, pairs in token["attention"].items():
        shown = page.locator(f'#why [data-constraint="{constraint}"] li').evaluate_all(
            "items => items.map(item => [Number(item.dataset.position), Number(item.dataset.weight)])")
        assert shown == [list(pair) for pair in pairs]
    heat = page.locator("#heat").input_value()
    attended = page.locator("#tokens .attended").evaluate_all("spans => spans.map(s => Number(s.dataset.position))")
    assert sorted(attended) == sorted(position for position, _ in token["attention"][heat])
    assert f"token={token['position']}" in page.url

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "ui-judgment-tiny.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot of the judgment view: {screenshot}")

    chip = page.locator(f'#why [data-constraint="{heat}"] li .chip').first
    target = token["attention"][heat][0][0]
    chip.click()
    assert page.locator(f"#token-{target}").get_attribute("aria-selected") == "true"


def test_lowest_token_button_selects_it(page, judgments):
    record = open_judgment(page, judgments, judgments.scored)
    failed = {name: verdict for name, verdict in record["judgment"]["constraints"].items() if not verdict["passed"]}
    assert failed, "the scored judgment fails no constraint"

    for name, verdict in failed.items():
        page.click(f'#verdicts tr[data-constraint="{name}"] button.lowest')
        selected = page.locator('#tokens .token[aria-selected="true"]')
        assert selected.get_attribute("data-position") == str(verdict["min_position"])
        assert page.evaluate("document.activeElement.dataset.position") == str(verdict["min_position"])
        assert page.locator("#heat").input_value() == name
        assert float(selected.get_attribute("data-score")) == verdict["min_score"]


def test_keyboard_moves_between_tokens(page, judgments):
    record = open_judgment(page, judgments, judgments.scored)
    last = record["trace"]["output_tokens"][-1]["position"]
    focused = "document.activeElement.dataset.position"

    page.focus("#heat")
    page.keyboard.press("Tab")
    assert page.evaluate(focused) == "0"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == "2"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    assert not page.locator("#tooltip").is_hidden()
    assert "causality" in page.locator("#tooltip").inner_text()
    page.keyboard.press("End")
    assert page.evaluate(focused) == str(last)
    page.keyboard.press("ArrowRight")
    assert page.evaluate(focused) == str(last)
    page.keyboard.press("Home")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate(focused) == "0"

    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    assert page.locator("#token-1").get_attribute("aria-selected") == "true"
    page.keyboard.press("ArrowRight")
    page.keyboard.press(" ")
    assert page.locator("#token-2").get_attribute("aria-selected") == "true"
    assert page.locator("#token-1").get_attribute("aria-selected") == "false"
    # Tab leaves the tokens in one step, and Shift+Tab returns to the selected token.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('token')") is False
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(focused) == "2"


def test_keyboard_opens_a_judgment_from_the_list(page, judgments):
    open_page(page, f"{judgments.url}/ui/")
    first = judgments.ids()[0]

    page.focus(f'#results tr[data-id="{first}"] a')
    page.keyboard.press("Enter")
    settle(page)

    assert page.evaluate("document.activeElement.tagName") == "H1"
    assert first in page.locator("#view h1").inner_text()
    page.go_back()
    settle(page)
    assert row_ids(page) == judgments.ids()


def test_integrity_badge_is_verified(page, judgments):
    open_judgment(page, judgments, judgments.scored)

    assert page.locator("#badge").get_attribute("data-status") == "verified"
    checks = page.locator("#integrity-detail .checks li").evaluate_all(
        "items => items.map(item => [item.dataset.by, item.dataset.ok])")
    assert checks == [["server", "true"]] * 3 + [["browser", "true"]] * 3


def test_integrity_badge_fails_for_a_changed_record(page, judgments):
    open_judgment(page, judgments, judgments.tampered)

    assert page.locator("#badge").get_attribute("data-status") == "failed"
    assert "differs from what was logged" in page.locator("#integrity-detail").inner_text()


def test_erased_judgment_renders_without_tokens(page, judgments):
    open_judgment(page, judgments, judgments.erased)

    assert "erased at" in page.locator("#notes").inner_text()
    assert "privacy request" in page.locator("#notes").inner_text()
    assert page.locator("#tokens").count() == 0
    assert page.locator("#no-trace").is_visible()
    assert page.locator("#verdicts tbody tr").count() == len(THRESHOLDS)
    assert page.locator("#badge").get_attribute("data-status") == "verified"


def test_withheld_judgment_says_so(page, judgments):
    record = open_judgment(page, judgments, judgments.withheld)

    assert "withhold rule" in page.locator("#notes").inner_text()
    output = record["trace"]["output_tokens"]
    assert page.locator("#tokens .token[data-part=output]").count() == len(output)


@pytest.mark.parametrize("width", [640, 320])
def test_narrow_viewport_needs_no_sideways_scrolling(page, judgments, width):
    # 640 CSS pixels is a 1280-pixel window at 200% zoom.
    page.set_viewport_size({"width": width, "height": 900})
    overflow = "document.documentElement.scrollWidth - document.documentElement.clientWidth"

    open_page(page, f"{judgments.url}/ui/")
    assert page.evaluate(overflow) == 0
    open_judgment(page, judgments, judgments.scored, "&token=30")
    assert page.evaluate(overflow) == 0
    assert page.locator("#verdicts").is_visible()


# Keys

@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_model) -> Iterator[tuple[str, dict[str, str]]]:
    """A server with TRACEHEAD_AUTH=keys, one judgment, and the secrets of a generate and an audit:read key."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("ui-keys"), max_tokens_limit=MAX_TOKENS_LIMIT, auth="keys")
    app = create_app(settings, tiny_model)
    with serving(app) as url:
        keys = app.state.runtime.keys
        secrets = {scope: keys.create(f"ui-{scope}", "acme", [scope])[1] for scope in ("generate", "audit:read")}
        response = httpx.post(f"{url}/v1/generate", headers={"Authorization": f"Bearer {secrets['generate']}"},
                              json={"prompt": "The capital of France is", "max_tokens": 2})
        assert response.status_code == 200, response.text
        yield url, secrets | {"judgment": response.json()["id"]}


def test_keys_are_asked_for_and_scopes_enforced(page, keyed):
    url, secrets = keyed
    open_page(page, f"{url}/ui/")
    assert page.locator("#key-form").is_visible()
    assert "no API key was sent" in page.locator("#key-reason").inner_text()
    assert page.evaluate("document.activeElement.id") == "key-input"

    page.fill("#key-input", secrets["generate"])
    page.keyboard.press("Enter")
    settle(page)
    assert "lacks the scope 'audit:read'" in page.locator("#notice").inner_text()
    assert page.locator("#key-form").is_visible()

    page.fill("#key-input", secrets["audit:read"])
    page.click("#key-form button[type=submit]")
    settle(page)
    assert row_ids(page) == [secrets["judgment"]]
    assert page.evaluate("sessionStorage.getItem('tracehead.apiKey')") == secrets["audit:read"]
    assert secrets["audit:read"] not in page.url

    page.click("#forget-key")
    settle(page)
    assert page.evaluate("sessionStorage.getItem('tracehead.apiKey')") is None
    assert page.locator("#key-form").is_visible()
