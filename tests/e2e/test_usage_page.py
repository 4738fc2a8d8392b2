"""The usage page in a real headless browser: Debian's Chromium driven through its ChromeDriver
(selenium), against ``meterflow serve`` as its own process on the real Postgres.

The page shows the customer's current period in the customer's timezone, each meter's total
(with its corrections) provisional or final, and per-day rows; it reads the API again by itself
and shows a window committed after it loaded; with a wrong key it says it could not read usage.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from meterflow.billing_cycle import BillingCycle
from meterflow.commands import cli
from meterflow.serve.usage_reader import apply_usage_schema, set_cycle
from sinks.postgres import connect
from sinks.postgres_schema import USAGE_WRITE_COLUMNS, usage_upsert_sql
from tests.e2e.helpers import private_job, serve_process, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ZONE = "America/Los_Angeles"


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # Headless, and nothing in the background: this machine's network is closed.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _window(cfg, meter: str, start: datetime, quantity: str, final: bool) -> None:
    row = dict(
        tenant_id="tenant-page",
        customer_id="acme",
        meter=meter,
        dimensions_key="{}",
        window_start=start,
        window_end=start + timedelta(minutes=1),
        quantity=Decimal(quantity),
        event_count=1,
        revision=1,
        is_final=final,
    )
    with connect(cfg.postgres) as conn:
        conn.execute(
            usage_upsert_sql(cfg.postgres.usage_table).replace("?", "%s"), [row[c] for c in USAGE_WRITE_COLUMNS]
        )


def _meters(driver) -> dict[str, tuple[str, str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#meters tbody tr")
    return {
        r.get_attribute("data-meter"): (
            r.find_element(By.CSS_SELECTOR, "td.quantity").text,
            r.find_element(By.CSS_SELECTOR, ".badge").text,
        )
        for r in rows
    }


def test_the_usage_page_shows_the_current_period_and_follows_new_windows(e2e_stack, tmp_path, browser):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "scripts/setup.sh installs chromium and chromium-driver"
    cfg, path = private_job(e2e_stack, "page", serve={"usage_page_refresh": "1s"})
    apply_usage_schema(cfg)
    now = datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)
    # A period that started at least three days ago, in the customer's timezone.
    anchor = min((datetime.now(UTC) - timedelta(days=3)).astimezone(ZoneInfo(ZONE)).day, 28)
    cycle = BillingCycle(anchor, ZONE)
    set_cycle(cfg, "tenant-page", "acme", cycle)
    period_start, _ = cycle.period_of(now)
    first = period_start + timedelta(hours=2)
    _window(cfg, "api_calls", first, "120", True)
    _window(cfg, "api_calls", first + timedelta(days=1), "30.5", True)
    _window(cfg, "storage_gb", now - timedelta(hours=1), "2.25", False)
    key = CliRunner().invoke(cli, ["--config", str(path), "api-keys", "create", "tenant-page"], catch_exceptions=False)
    key = key.stdout.strip().splitlines()[-1]

    with serve_process(path, tmp_path / "serve.log") as port:
        browser.get(f"http://127.0.0.1:{port}/usage/acme#key={key}")
        wait_for(lambda: len(_meters(browser)) == 2, 30, "the page to show both meters")
        # api_calls: its windows are final, but its period is open: provisional until the period ends.
        assert _meters(browser) == {"api_calls": ("150.5", "provisional"), "storage_gb": ("2.25", "provisional")}
        period = browser.find_element(By.ID, "period").text
        assert ZONE in period and f"anniversary, day {anchor}" in period
        days = browser.find_elements(By.CSS_SELECTOR, "#days tbody tr")
        assert len(days) == 3 and browser.find_element(By.ID, "error").text == ""
        # The first day ended and its window is final (the job closed up to a later final window's end).
        assert [d.find_element(By.CSS_SELECTOR, ".badge").text for d in days] == ["final", "provisional", "provisional"]

        shot = tmp_path / "usage-page.png"
        browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("USAGE_PAGE_SCREENSHOT"):
            shutil.copy(shot, os.environ["USAGE_PAGE_SCREENSHOT"])

        # A window committed after the page loaded: the page reads the API again by itself.
        _window(cfg, "storage_gb", now - timedelta(minutes=30), "1.75", False)
        wait_for(lambda: _meters(browser).get("storage_gb", ("",))[0] == "4", 30, "the page to show the new window")

        browser.get(f"http://127.0.0.1:{port}/usage/acme#key=mf_wrong")
        browser.refresh()
        wait_for(lambda: "Could not read usage" in browser.find_element(By.ID, "error").text, 30, "the page to refuse")
        assert _meters(browser) == {}
