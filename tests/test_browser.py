"""`matching serve` as a real process, and its search page in a real headless Chromium (Debian's chromium and
chromium-driver, installed by scripts/test; nothing downloads a browser)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from matching import Matcher
from tests.conftest import make_catalogue

pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, data: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, body, {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Any) -> Iterator[str]:
    root = tmp_path_factory.mktemp("serve")
    Matcher.build(make_catalogue(), root / "products", encoder=tiny_encoder, show_progress=False).close()
    (root / "token").write_text("browser-test-token\n", encoding="utf-8")
    (root / "token").chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "matching",
            "serve",
            str(root / "products"),
            "--port",
            str(port),
            "--token-file",
            str(root / "token"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"matching serve exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                if get(url + "/ready")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError("matching serve did not become ready in 60 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_served_over_http(server: str) -> None:
    assert get(server + "/health") == (200, {"status": "ok"})
    status, body = get(server + "/search?q=acme+green+coffee+maker&k=1")
    assert status == 200
    assert body["hits"][0]["title"] == "Acme green coffee maker"
    status, body = get(server + "/add", {"rows": [{"id": 1, "title": "x"}]})
    assert status == 401
    status, body = get(server + "/remove", {"ids": [1000]}, {"Authorization": "Bearer browser-test-token"})
    assert status == 200
    assert body["removed"] == 1
    assert get(server + "/ready")[1]["count"] == 39


def chrome() -> Any:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium and chromedriver are missing: scripts/test installs Debian's chromium chromium-driver"
            )
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_search_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = chrome()
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server + "/")
        wait.until(lambda d: "titles" in d.find_element(By.ID, "bundle").text)
        assert driver.find_element(By.ID, "bundle").text.startswith("39 titles")  # after the remove above
        keys = [e.get_attribute("data-key") for e in driver.find_elements(By.CSS_SELECTOR, ".filter")]
        assert keys == ["brand", "price"]

        def shown(d: Any) -> list[dict[str, Any]]:
            # read the results in one script call: the page replaces the list nodes on every search
            return list(
                d.execute_script(
                    "return [...document.querySelectorAll('#results li')].map(li => ({"
                    "title: li.querySelector('.title').textContent,"
                    "marks: [...li.querySelectorAll('mark')].map(m => m.textContent),"
                    "meta: li.querySelector('.meta') ? li.querySelector('.meta').textContent : ''}))"
                )
            )

        driver.find_element(By.ID, "q").send_keys("acme green coffee maker", Keys.ENTER)
        results = wait.until(shown)
        assert results[0]["title"] == "Acme green coffee maker"
        assert results[0]["marks"] == ["Acme", "green", "coffee", "maker"]
        assert "ms in the server" in driver.find_element(By.ID, "status").text
        assert "price: " in results[0]["meta"]

        # a filter on price: every result obeys it
        price = driver.find_element(By.CSS_SELECTOR, '.filter[data-key="price"]')
        Select(price.find_element(By.TAG_NAME, "select")).select_by_visible_text(">=")
        price.find_element(By.TAG_NAME, "input").send_keys("100")
        driver.find_element(By.ID, "go").click()
        results = wait.until(lambda d: (r := shown(d)) and "Acme" not in r[0]["title"] and r)
        prices = [json.loads(r["meta"].split("price: ")[1].split()[0]) for r in results]
        assert len(prices) == 10
        assert min(prices) >= 100
        driver.save_screenshot(str(os.environ.get("MATCHING_SCREENSHOT") or tmp_path / "page.png"))
    finally:
        driver.quit()
