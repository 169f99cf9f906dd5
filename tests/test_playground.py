"""The web playground at GET /, driven in a real headless Chromium against a real server.

Uses Debian's chromium through Playwright (`playwright install` cannot download a browser here, so
Playwright launches /usr/bin/chromium); without it these tests skip. The page's static checks that
need no browser are in tests/test_playground_page.py.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.server_utils import ServerProcess, metric_value, running_server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium) for the browser tests",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) is not installed")
expect = sync_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Long enough that a random tiny model is still writing when the test looks (tens of seconds on a CPU).
LONG_GENERATION = 5000
API_KEY = "playground-test-key"
TIMEOUT_MS = 20_000  # generous: CI machines are small and busy
expect.set_options(timeout=TIMEOUT_MS)

GENERATED = "#output .generated"

OpenPage = Callable[..., sync_api.Page]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    """One server for the module (starting one costs seconds): it needs an API key, and has one row
    and no queue, so that a second request at once is refused as busy. Tests leave the row free."""
    with running_server(tiny_checkpoint, "--max-new-tokens", str(LONG_GENERATION), "--api-keys", API_KEY,
                        "--max-batch-size", "1", "--max-queue", "0") as process:
        yield process


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: sync_api.Browser) -> Iterator[OpenPage]:
    """Opens the playground in a fresh browser context, with the API key typed in unless told
    otherwise; fails the test on an uncaught error in the page."""
    contexts: list[sync_api.BrowserContext] = []
    page_errors: list[str] = []

    def open_(server: ServerProcess, viewport: dict[str, int] | None = None,
              api_key: str | None = API_KEY) -> sync_api.Page:
        wait_for_running_rows(server, 0)  # a test that failed midway may have left its row running
        context = browser.new_context(viewport=viewport or {"width": 1280, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        page.goto(server.base_url + "/")
        # The model card arrives from /info; after that the page knows the server's limits.
        expect(page.locator("#model-card-fields")).to_contain_text("Parameters")
        if api_key:
            page.get_by_label("API key").fill(api_key)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert page_errors == []


def running_rows(server: ServerProcess) -> float:
    response = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    response.raise_for_status()
    return metric_value(response.text, "caesar_running_rows")


def wait_for_running_rows(server: ServerProcess, expected: float, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (rows := running_rows(server)) != expected:
        assert time.monotonic() < deadline, f"caesar_running_rows stayed {rows}, expected {expected}"
        time.sleep(0.05)


def generated_length(page: sync_api.Page) -> int:
    return page.evaluate(f"document.querySelector('{GENERATED}').textContent.length")


def wait_for_characters_while_running(page: sync_api.Page, at_least: int) -> int:
    """Waits until `at_least` characters are on the page while the Stop button is live (the
    request is still open), and returns how many there are."""
    page.wait_for_function(
        """([selector, atLeast]) => document.querySelector(selector).textContent.length >= atLeast
                                    && !document.querySelector("#stop").disabled""",
        arg=[GENERATED, at_least], polling=20)
    return generated_length(page)


def start_generation(page: sync_api.Page, prompt: str, max_new_characters: int) -> None:
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Max new characters").fill(str(max_new_characters))
    page.get_by_role("button", name="Generate").click()


def test_characters_appear_before_the_request_ends(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server)
    start_generation(page, "BRUTUS:\nRomans, countrymen, and lovers!", LONG_GENERATION)

    first_seen = wait_for_characters_while_running(page, at_least=10)
    # The server is still generating for this page, and more text keeps arriving.
    assert running_rows(server) == 1
    later_seen = wait_for_characters_while_running(page, at_least=first_seen + 50)
    assert first_seen < later_seen < LONG_GENERATION
    expect(page.get_by_role("status")).to_have_text("Generating…")
    expect(page.locator("#stat-ttfc")).to_have_text(re.compile(r"^\d+(\.\d+)? m?s$"))
    expect(page.locator("#stat-rate")).to_contain_text("chars/s")
    expect(page.locator("#output .prompt")).to_have_text("BRUTUS:\nRomans, countrymen, and lovers!")

    page.get_by_role("button", name="Stop").click()
    wait_for_running_rows(server, 0)


def test_stop_aborts_the_request_and_frees_the_row(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server)
    start_generation(page, "CASSIUS:\n", LONG_GENERATION)
    wait_for_characters_while_running(page, at_least=20)
    assert running_rows(server) == 1

    page.get_by_role("button", name="Stop").click()
    expect(page.get_by_role("status")).to_have_text(re.compile(r"^Stopped after \d+ characters?\.$"))
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    wait_for_running_rows(server, 0)
    # Nothing more arrives once stopped.
    stopped_at = generated_length(page)
    page.wait_for_timeout(300)
    assert generated_length(page) == stopped_at < LONG_GENERATION
    expect(page.get_by_role("alert")).to_be_hidden()


def test_unknown_characters_are_named_in_plain_words(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server)
    start_generation(page, "Et tu, Brutè? That costs 5 €.", 50)

    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The model cannot read some characters of the prompt")
    expect(alert).to_contain_text("'è'")
    expect(alert).to_contain_text("'€'")
    expect(alert).to_contain_text("65 characters")
    expect(page.get_by_role("status")).to_have_text("Refused.")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert generated_length(page) == 0


def test_model_card_shows_the_servers_info(server: ServerProcess, open_page: OpenPage) -> None:
    info = httpx.get(server.base_url + "/info").json()
    page = open_page(server)
    card = page.locator("#model-card")
    card.locator("summary").click()
    expect(card).to_contain_text(f"Parameters{info['model']['parameters']:,}")
    expect(card).to_contain_text(f"Context{info['model']['context']} characters")
    expect(card).to_contain_text(f"Layers{info['model']['layers']}")
    # The page takes the server's limit for the number of new characters.
    max_new_tokens = str(info["limits"]["max_new_tokens"])
    expect(page.get_by_label("Max new characters")).to_have_attribute("max", max_new_tokens)


def test_a_generation_runs_to_its_end_on_a_phone_screen(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server, viewport={"width": 390, "height": 844})
    # The largest seed: more digits than a JavaScript number holds exactly.
    page.get_by_label("Seed").fill("9223372036854775807")
    start_generation(page, "ANTONY:\n", 120)

    expect(page.get_by_role("status")).to_have_text("Done: reached the character limit.")
    assert generated_length(page) == 120
    expect(page.locator("#stat-count")).to_have_text("120")
    expect(page.locator("#stat-seed")).to_have_text("9223372036854775807")
    # Readable without sideways scrolling, and the output was brought into view.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    expect(page.locator("#output")).to_be_in_viewport()


def test_api_key_field_appears_when_the_server_needs_one(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server, api_key=None)
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()

    start_generation(page, "CAESAR:\n", 30)
    expect(page.get_by_role("alert")).to_have_text(
        "This server needs an API key. Enter it above and press Generate again.")
    key_field.fill("wrong-key")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert")).to_contain_text("did not accept this API key")

    key_field.fill(API_KEY)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("status")).to_have_text("Done: reached the character limit.")
    expect(page.get_by_role("alert")).to_be_hidden()
    assert generated_length(page) == 30


def test_a_busy_server_says_when_to_try_again(server: ServerProcess, open_page: OpenPage) -> None:
    page = open_page(server)
    body = {"inputs": "BRUTUS:", "parameters": {"max_new_tokens": LONG_GENERATION}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # Another client holds the server's only row (and there is no queue).
    with httpx.stream("POST", server.base_url + "/generate_stream", json=body, headers=headers,
                      timeout=30) as other_client:
        assert other_client.status_code == 200
        wait_for_running_rows(server, 1)
        start_generation(page, "CASCA:\n", 30)
        expect(page.get_by_role("alert")).to_have_text(
            "The server is busy: every batch row and queue place is taken. Try again in 1 second.")
    wait_for_running_rows(server, 0)


def test_scoring_a_pasted_text_shades_each_character(server: ServerProcess, open_page: OpenPage) -> None:
    """Score: the prompt box's text scored through POST /generate (max_new_tokens 0,
    decoder_input_details): bits per character, each character shaded by its probability."""
    text = "Friends, Romans,\ncountrymen"
    page = open_page(server)
    page.get_by_label("Prompt").fill(text)
    page.get_by_role("button", name="Score").click()
    expect(page.get_by_role("status")).to_have_text(
        re.compile(rf"^Scored {len(text) - 1} characters: \d+\.\d{{3}} bits per character\.$"))
    spans = page.locator("#output .scored span")
    expect(spans).to_have_count(len(text))
    assert page.locator("#output .scored").text_content() == text
    # The same figures as the API gives.
    prefill = httpx.post(server.base_url + "/generate", headers={"Authorization": f"Bearer {API_KEY}"}, json={
        "inputs": text, "parameters": {"max_new_tokens": 0, "details": True, "decoder_input_details": True}},
        timeout=30).json()["details"]["prefill"]
    bits = [-p["logprob"] / math.log(2) for p in prefill[1:]]
    expect(page.locator("#stat-bpc")).to_have_text(f"{sum(bits) / len(bits):.3f}")
    expect(page.locator("#stat-count")).to_have_text(str(len(text) - 1))
    shades = spans.evaluate_all("spans => spans.map(s => s.style.getPropertyValue('--shade'))")
    assert shades[0] == "" and spans.first.get_attribute("class") == "unscored"
    assert [float(s) for s in shades[1:]] == pytest.approx([1 - math.exp(p["logprob"]) for p in prefill[1:]],
                                                           abs=1e-3)
    assert spans.nth(16).get_attribute("title").startswith("newline: p = ")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    # Generating afterwards clears the scores.
    start_generation(page, "CASCA:", 10)
    expect(page.get_by_role("status")).to_have_text("Done: reached the character limit.")
    expect(spans).to_have_count(0)
    expect(page.locator("#stat-bpc")).to_have_text("–")
