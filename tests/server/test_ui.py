"""The web page at /ui in a real headless browser (Debian's chromium driven by Playwright) on a
real `monet serve`: the shell without a key, the key, a prompt continued with and without the
fixture mask (streamed, token for token what /generate answers), routing -> expert -> draft ->
saved profile -> profile list, a stale If-Match save shown as a conflict, a build with
progress and its report, keyboard use, and a phone width without horizontal scrolling.

Screenshots of each view (1280x800) go to $MONET_UI_SCREENSHOTS (docs/ui to refresh the
README's), else to a temporary folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from server_support import (
    ADMIN_KEY,
    GEN_KEY,
    KEYS_ENV,
    ServerProcess,
    client,
    finished,
    unique,
)

CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "The cat sat on the"
WORDS = {"code": "def f(x):\n    return x + 1\nimport os\nclass A:\n    pass\n",
         "prose": "The cat sat on the mat and the dog lay by the door all day long.\n"}
ATLAS = [{"text": text * 2, "label": label} for label, text in WORDS.items() for _ in range(3)]
TIMEOUT_MS = 30_000

@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, tiny, fixture_mask):
    """A server of its own (local store) with the fixture mask stored and an atlas built."""
    proc = ServerProcess(tmp_path_factory.mktemp("ui"), args=["--model", str(tiny / "model")],
                         env={**KEYS_ENV, "MONET_MAX_TOKENS": "128"})
    proc.start()
    with client(proc, ADMIN_KEY) as admin:
        r = admin.put("/masks/fixture", json={"layers": fixture_mask["layers"],
                                              "description": "the fixture mask"})
        assert r.status_code == 201, r.text
        job = admin.post("/experts/build", json={"records": ATLAS, "top_n": 4,
                                                  "top_tokens": 4, "window": 6}).json()
        job = finished(admin, job, 60)
        assert job["status"] == "succeeded", job
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright  # the dev extra: a missing one fails

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("MONET_UI_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("ui-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """A fresh browser context on the server, recording requests to any other origin and any
    script error."""

    def __init__(self, browser, server, *, width=1280, height=800):
        self.server = server
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.elsewhere: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", self._request)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _request(self, request):
        url = request.url
        if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(
                self.server.url + "/"):
            self.elsewhere.append(url)

    def open(self, route: str = "", key: str | None = ADMIN_KEY):
        self.page.goto(f"{self.server.url}/ui{route}")
        if key:
            self.page.fill("#api-key", key)
            self.page.press("#api-key", "Enter")
            self.page.wait_for_selector("#key-state:has-text('key set')")
        return self.page

    def close(self):
        assert self.elsewhere == [], f"requests to other origins: {self.elsewhere}"
        assert self.errors == [], f"script errors: {self.errors}"
        self.context.close()


@pytest.fixture
def ui(browser, ui_server):
    pages = []

    def make(**kwargs) -> Page:
        pages.append(Page(browser, ui_server, **kwargs))
        return pages[-1]

    yield make
    for p in pages:
        p.close()


def api(server, key=ADMIN_KEY) -> httpx.Client:
    return client(server, key)


def test_shell_without_a_key_and_data_only_with_one(ui, ui_server):
    r = httpx.get(f"{ui_server.url}/ui")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(f"{ui_server.url}/ui/assets/app.js").status_code == 200
    assert httpx.get(f"{ui_server.url}/masks").status_code == 401  # the data needs the key
    page = ui().open(key=None)
    banner = page.locator("#banner")
    banner.wait_for(state="visible")
    assert "API key" in banner.inner_text()
    assert page.evaluate("document.activeElement.id") == "api-key"  # 401 asks for the key
    page.keyboard.type(GEN_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("input[name=profile][value=fixture]")
    assert banner.is_hidden()
    assert page.evaluate("sessionStorage.getItem('monet.key')") == GEN_KEY
    # keyboard: Tab reaches the views' links with a visible focus ring, Enter follows them
    page.focus("a[data-view=playground]")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.view") == "editor"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    page.wait_for_selector("main[data-view=editor] h2:has-text('Mask editor')")
    # a generate key cannot write: the API's message is shown
    page.fill("input[name=name]", unique("nope"))
    page.click("#save")
    error = page.locator("#editor-message .error")
    error.wait_for()
    assert "admin" in error.inner_text() and "403" in error.inner_text()


def test_playground_streams_both_continuations(ui, ui_server, shots):
    page = ui().open("#/playground")
    page.fill("textarea[name=prompt]", PROMPT)
    page.check("input[name=profile][value=fixture]")
    page.click("button:has-text('Generate')")
    page.wait_for_selector(".compare[data-differ]")
    assert page.get_attribute(".compare", "data-differ") == "true"
    assert page.inner_text("#masked-applied") == "Applied: fixture@1"
    assert page.inner_text("#unmasked-applied") == "Applied: no profile"
    shown = {side: json.loads(page.get_attribute(f"#{side}-text", "data-tokens"))
             for side in ("unmasked", "masked")}
    with api(ui_server, GEN_KEY) as c:  # streamed, parsed and shown: what /generate answers
        for side, profile in (("unmasked", None), ("masked", "fixture")):
            body = {"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                    **({"mask_profile": profile} if profile else {})}
            assert shown[side] == c.post("/generate", json=body).json()["token_ids"]
    assert shown["masked"] != shown["unmasked"]
    page.screenshot(path=str(shots / "playground.png"))


def _expert_from_routing(page):
    page.fill("textarea[name=text]", PROMPT)
    page.click("button:has-text('Show routing')")
    page.wait_for_selector(".tokens[data-state=ready]")
    page.locator(".token[data-position='2']").focus()  # the keyboard shows a token's experts
    page.wait_for_selector(".detail h3:has-text('Token 2')")
    token = page.locator(".token[data-position='1']")
    token.hover()
    page.wait_for_selector(".detail h3:has-text('Token 1')")
    assert page.locator(".detail .expert-link").count() == 5  # top_k per routing layer
    token.click()
    assert token.get_attribute("aria-pressed") == "true"
    return page.locator(".detail .expert-link").first


def test_routing_expert_draft_save_and_profile_list(ui, ui_server, shots):
    page = ui().open("#/routing")
    link = _expert_from_routing(page)
    page.screenshot(path=str(shots / "routing.png"))
    href = link.get_attribute("href")  # #/expert/L/i/j
    layer, i, j = (int(x) for x in href.split("/")[-3:])
    link.click()
    page.wait_for_selector(f"h2:has-text('Expert ({i}, {j}) of layer {layer}')")
    page.wait_for_selector("#draft-toggle")  # the entry has come
    assert page.locator(".contexts li mark").count() >= 1  # the token highlighted
    assert page.locator(".bars tr").count() == 2  # the labels code and prose
    page.click("#draft-toggle")
    page.wait_for_selector("#draft-toggle:has-text('Remove from mask')")
    page.screenshot(path=str(shots / "expert.png"))
    page.click("a:has-text('Open the mask editor')")
    name = unique("ui")
    page.fill("input[name=name]", name)
    chips = page.locator(f"#draft-experts [data-layer='{layer}'] li")
    assert chips.count() == 1 and chips.inner_text().startswith(f"({i}, {j})")
    page.click("#save")
    page.wait_for_selector("#saved")
    assert f"{name}@1" in page.inner_text("#saved")
    page.screenshot(path=str(shots / "editor.png"))
    with api(ui_server) as c:
        stored = c.get(f"/masks/{name}", params={"compact": "false"}).json()
    assert stored["experts"]["layers"] == [{"layer": layer, "experts": [[i, j]]}]
    page.click("a[data-view=profiles]")
    row = page.locator(f"tr[data-name='{name}']")
    row.wait_for()
    assert row.locator(".version").inner_text() == "1" and row.locator(".size").inner_text() == "1"
    row.locator("button:has-text('Evaluation card')").click()
    page.wait_for_selector(f"#card h3:has-text('{name}@1')")
    assert "Not evaluated" in page.inner_text("#card")
    # saving again from the same draft is a new version (the draft follows what it saved)
    page.click("a[data-view=editor]")
    page.click("#save")
    page.wait_for_selector(f"#saved:has-text('{name}@2')")


def test_stale_if_match_save_is_shown_not_overwritten(ui, ui_server, shots):
    name = unique("stale")
    with api(ui_server) as c:
        assert c.put(f"/masks/{name}", json={"layers": [{"layer": 0, "experts": [[1, 1]]}]}
                     ).status_code == 201
    page = ui().open("#/profiles")
    page.locator(f"tr[data-name='{name}'] button:has-text('Edit in draft')").click()
    page.wait_for_selector(f"#draft-base:has-text('{name}@1')")
    with api(ui_server) as c:  # someone else saves meanwhile: version 2
        theirs = [{"layer": 2, "experts": [[3, 4]]}]
        assert c.put(f"/masks/{name}", json={"layers": theirs},
                     headers={"If-Match": "1"}).json()["version"] == 2
    page.fill("input[name=i]", "5")
    page.fill("input[name=layer]", "1")
    page.fill("input[name=j]", "6")
    page.click("button:has-text('Add expert')")
    page.click("#save")
    conflict = page.locator(".conflict[role=alert]")
    conflict.wait_for()
    assert "Conflict: not saved" in conflict.inner_text()
    assert "version 1" in conflict.inner_text()
    page.screenshot(path=str(shots / "conflict.png"))
    with api(ui_server) as c:
        stored = c.get(f"/masks/{name}", params={"compact": "false"}).json()
    assert stored["version"] == 2 and stored["experts"]["layers"] == theirs
    # the draft is kept until the user loads the stored version
    assert page.locator("#draft-experts [data-layer='1'] li").count() == 1
    conflict.locator("button").click()
    page.wait_for_selector(f"#draft-base:has-text('{name}@2')")
    assert page.locator("#draft-experts [data-layer='1']").count() == 0
    assert page.locator("#draft-experts [data-layer='2'] li").count() == 1


def test_build_from_typed_examples_with_progress_and_report(ui, ui_server, shots):
    page = ui().open("#/editor")
    page.click("button:has-text('New draft')")
    name = unique("built")
    page.fill("input[name=name]", name)
    lines = [f"code: {WORDS['code'].replace(chr(10), ' ')}",
             f"prose: {WORDS['prose'].strip()}"] * 6
    page.fill("textarea[name=examples]", "\n".join(lines))
    page.fill("input[name=target]", "code")
    page.click("form[aria-label='Build from labelled examples'] button[type=submit]")
    page.wait_for_selector("#job[data-done]", timeout=90_000)
    assert f"Built {name}@1" in page.inner_text("#job")
    page.wait_for_selector("#report .losses")
    rows = page.locator("#report .losses tbody tr")
    assert rows.count() == 2 and "code" in rows.first.inner_text()
    assert page.locator("#draft-experts .layer").count() >= 1  # the built experts in the draft
    page.locator("#job").scroll_into_view_if_needed()
    page.evaluate("document.getElementById('job').scrollIntoView()")
    page.screenshot(path=str(shots / "build-report.png"))
    with api(ui_server) as c:
        report = c.get(f"/masks/{name}/report").json()
    assert report["kind"] == "domain" and report["provenance"]["target"] == "code"
    page.click("a[data-view=profiles]")
    page.locator(f"tr[data-name='{name}'] button:has-text('Evaluation card')").click()
    page.wait_for_selector("#card .losses")
    page.screenshot(path=str(shots / "profiles.png"))
    # bad examples: the message names the line, nothing is sent
    page.click("a[data-view=editor]")
    page.fill("textarea[name=examples]", "code: fine\nno label here")
    page.click("form[aria-label='Build from labelled examples'] button[type=submit]")
    assert "line 2" in page.locator("#editor-message .error").inner_text()


def test_generation_table_in_the_evaluation_card(ui, ui_server):
    name = unique("gen")
    evaluation = {"model_id": "x", "corpus_fingerprint": "sha256:0", "target": "code",
                  "labels": [{"label": "code", "tokens": 10, "loss": 2.0, "masked_loss": 3.5}],
                  "removed_share": [0.1, 0.0, 0.0, 0.0],
                  "generation": {"samples": 2, "max_new_tokens": 8, "temperature": 1.0,
                                 "top_p": 1.0, "seed": 0, "judge": "classifier",
                                 "labels": [{"label": "code", "prompts": 3, "samples": 2,
                                             "base": {"code": 0.75}, "masked": {"code": 0.25}}]}}
    with api(ui_server) as c:
        r = c.put(f"/masks/{name}", json={"layers": [{"layer": 0, "experts": [[0, 0]]}],
                                         "evaluation": evaluation})
        assert r.status_code == 201, r.text
    page = ui().open("#/profiles")
    page.locator(f"tr[data-name='{name}'] button:has-text('Evaluation card')").click()
    table = page.locator("#card table.generation")
    table.wait_for()
    cells = table.locator("tbody td").all_inner_texts()
    assert cells == ["3 \u00d7 2", "0.75", "0.25", "0.33"]  # own share, masked, kept
    assert "1.500" in page.inner_text("#card .losses")  # the loss delta


@pytest.mark.parametrize("route", ["#/playground", "#/routing", "#/expert/0/2/5", "#/experts",
                                   "#/editor", "#/profiles"])
def test_phone_width_has_no_horizontal_scroll(ui, ui_server, route, shots):
    page = ui(width=375, height=740).open(route)
    page.wait_for_load_state("networkidle")
    if route == "#/routing":
        page.wait_for_selector(".tokens[data-state=ready] .token")
    width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1] == 375, f"{route}: {width[0]} px wide"
    # nothing sticks out of the viewport or needs a scroll box of its own (a wide table)
    wide = page.evaluate("""[...document.querySelectorAll('main *, header *')]
        .filter((e) => e.getBoundingClientRect().right > innerWidth + 0.5
                    || e.scrollWidth > e.clientWidth + 1
                       && getComputedStyle(e).overflowX != 'visible')
        .map((e) => e.tagName + '.' + e.className)""")
    assert wide == [], f"{route}: {wide[:5]}"
    if route == "#/playground":  # the two continuations stack
        base, masked = (page.locator(f"#{s}").bounding_box() for s in ("unmasked", "masked"))
        assert masked["y"] >= base["y"] + base["height"] and base["width"] > 300
        page.screenshot(path=str(shots / "phone-playground.png"))
