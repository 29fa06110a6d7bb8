"""What the browser tests share: the system Chromium under Playwright (skipping, saying which is missing, when
either is absent; the `browser` fixture is in conftest.py), and a page that records console errors, uncaught
exceptions, dialogs and requests so a test can assert the site ran clean and offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("BENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]

sync_api = pytest.importorskip("playwright.sync_api", reason="the `playwright` Python package is not installed "
                               "(pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` (apt-get install chromium) to run the "
                f"browser tests", allow_module_level=True)


class Watched:
    """A page in its own context whose console errors, uncaught exceptions, dialogs and requests are recorded.
    `phone=True` (the default below 600 px) makes it a touch screen."""

    def __init__(self, browser, width: int = 1400, height: int = 1000, phone: bool | None = None, **kw):
        phone = width < 600 if phone is None else phone
        self.width = width
        self.context = browser.new_context(accept_downloads=True, viewport={"width": width, "height": height},
                                           **({"has_touch": True, "is_mobile": True} if phone else {}), **kw)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", lambda r: self.requests.append(r.url))

    def goto(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_load_state("load")

    def check_clean(self, loaded: bool = True) -> None:
        """No error, no dialog (a script from a result file ran), no request off the file system; `loaded`: and
        some request at all."""
        assert self.errors == [], self.errors
        assert self.dialogs == [], f"a script from a result file ran: {self.dialogs}"
        assert not loaded or self.requests, "the page requested nothing"
        assert all(u.startswith("file:") for u in self.requests), [u for u in self.requests if not u.startswith("file:")]

    def close(self) -> None:
        self.check_clean(loaded=False)
        self.context.close()
