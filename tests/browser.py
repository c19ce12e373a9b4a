"""Headless Chromium for the page tests (the data report, the evaluation page), driven by Debian's
chromedriver through selenium. Everything is observed from outside the page: chromedriver's performance
log (the DevTools Network and Page events of each tab), its browser log (console calls, uncaught
exceptions, failed loads) and V8's precise coverage (every script that ran)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SELENIUM = importlib.util.find_spec("selenium") is not None


def require_chromium():
    """Skip without Chromium, its driver or selenium, except in CI (env CI set), where any of them missing
    is a failure."""
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)) if not found]
    if missing:
        why = (f"Debian's {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
               "(apt-get install chromium chromium-driver); the browser tests need them")
    elif not SELENIUM:
        why = "selenium is not installed (the test extra of pyproject.toml); the browser tests need it"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}. CI must install it: refusing to skip the browser tests in CI", pytrace=False)
    pytest.skip(why)


@dataclass
class Visit:
    """What one page did while it loaded and settled."""

    events: list[dict]  # the tab's DevTools Network and Page events, as {"method", "params"}
    console: list[dict]  # browser log entries: {"level", "source", "message", "timestamp"}
    scripts: list[dict]  # the page's scripts that ran: inline scripts and fired event-handler attributes alike

    @property
    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    @property
    def errors(self) -> list[dict]:
        """Every console call (whatever its level), uncaught exception and error the browser logged."""
        return [e for e in self.console if e["source"] == "console-api" or e["level"] == "SEVERE"]


class Chromium:
    """One headless Chromium under chromedriver; each visit opens a fresh tab."""

    def __init__(self, timeout=90.0):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-extensions"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        options.set_capability("unhandledPromptBehavior", "ignore")  # a dialog stays open: visit() reports it
        self.driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # a given driver path:
        self.driver.set_page_load_timeout(timeout)  # selenium-manager (which downloads) is never asked
        self.driver.set_script_timeout(timeout)
        self.last_dialog = None

    def _tab_events(self):
        tab = self.driver.current_window_handle
        entries = [json.loads(e["message"]) for e in self.driver.get_log("performance")]
        return [e["message"] for e in entries if e["webview"] == tab]

    def console(self) -> list[dict]:
        """The browser log entries since the last read."""
        return self.driver.get_log("browser")

    def visit(self, url, width=1280, height=1600) -> Visit:
        """Open ``url`` in a fresh tab and let it settle; a dialog (alert() & co.) fails at once."""
        from selenium.common.exceptions import UnexpectedAlertPresentException

        driver = self.driver
        driver.switch_to.new_window("tab")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        driver.execute_cdp_cmd("Profiler.enable", {})
        driver.execute_cdp_cmd("Profiler.startPreciseCoverage", {"callCount": True, "detailed": False})
        self._tab_events()  # drop what earlier tabs left in the logs
        self.console()
        try:
            driver.get(url)
        except UnexpectedAlertPresentException:
            pass  # the dialog is in the tab's events: reported below
        time.sleep(0.5)  # late handlers (an element's onload) would show here
        events = self._tab_events()
        dialogs = [e for e in events if e["method"] == "Page.javascriptDialogOpening"]
        if dialogs:
            self.last_dialog = dialogs[0]
            raise AssertionError(f"a script ran in the report and opened a dialog: {dialogs[0]['params']}")
        console = self.console()
        # read before any evaluate (those run scripts of their own); chromedriver's own scripts have no URL
        coverage = driver.execute_cdp_cmd("Profiler.takePreciseCoverage", {})["result"]
        return Visit(events, console, [script for script in coverage if script["url"]])

    def evaluate(self, expression):
        """The value of a JavaScript expression in the current tab (a promise is awaited)."""
        return self.driver.execute_script(f"return ({expression});")

    def screenshot(self) -> bytes:
        return self.driver.get_screenshot_as_png()

    def close(self):
        self.driver.quit()
