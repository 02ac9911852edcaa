"""The live web page in a real headless browser (Debian's chromium, driven by Selenium
through chromium-driver): it loads from ``--web 127.0.0.1:0``, shows the running
guest's devices with their modes, a counter visibly increases, the register trace of
a chosen device appears, and a screenshot is kept (``$PYVMM_ARTIFACTS`` or the test's
temporary folder; docs/img/api-web.png is one such screenshot)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import kvm_usable, pyvmm_cmd, wait_for_path

pytestmark = pytest.mark.kvm
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                    reason="Debian's chromium and chromium-driver are not installed "
                    "(scripts/setup.sh installs them)")
@pytest.mark.skipif(kvm_usable() is not None, reason=str(kvm_usable()))
def test_page_shows_devices_and_a_counter_increases(guests: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sock = tmp_path / "api.sock"
    err = tmp_path / "stderr.txt"
    with err.open("w") as ef:
        p = subprocess.Popen(pyvmm_cmd("run", "--kernel", str(guests / "pio_loop.elf"),
                                       "--cmdline", "iters=1000000000000", "--serial",
                                       "none", "--rng", "rate=4096", "--api-socket",
                                       str(sock), "--web", "127.0.0.1:0", "--timeout",
                                       "900"), stdout=subprocess.DEVNULL, stderr=ef)
    driver = None
    try:
        assert wait_for_path(sock, 120), err.read_text()
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            m = re.search(r"web view on (http://127\.0\.0\.1:\d+/)", err.read_text())
            url = m.group(1) if m else None
            time.sleep(0.05)
        assert url, err.read_text()
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM  # type: ignore[assignment]
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu",
                  "--disable-dev-shm-usage", "--window-size=1100,1400"):
            opts.add_argument(a)
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
        driver.set_page_load_timeout(120)
        driver.get(url)
        wait = WebDriverWait(driver, 120, poll_frequency=0.1)
        wait.until(lambda d: d.find_elements(By.ID, "exits-serial0")
                   and d.find_element(By.ID, "exits-serial0").text.isdigit())
        row = driver.find_element(By.ID, "row-virtio-rng0").text.split()
        assert row[:3] == ["virtio-rng0", "virtio-rng", "paravirtual"]
        assert driver.find_element(By.ID, "row-serial0").text.split()[1:3] == [
            "board", "emulated"]
        first = int(driver.find_element(By.ID, "exits-serial0").text)
        wait.until(lambda d: int(d.find_element(By.ID, "exits-serial0").text) > first)
        wait.until(lambda d: d.find_element(By.ID, "state").text == "running")
        # The stream's rate column shows the loop (exits per second > 0).
        wait.until(lambda d: int(d.find_element(By.ID, "rate-serial0").text or 0) > 0)
        assert "pci 00:00.0" in driver.find_element(By.ID, "pci").text
        Select(driver.find_element(By.ID, "trace-device")).select_by_visible_text("serial0")
        driver.find_element(By.ID, "trace-on").click()
        wait.until(lambda d: "SCR write" in d.find_element(By.ID, "trace").text)
        time.sleep(1.5)  # one more tick of the charts for the screenshot (not asserted)
        out = Path(os.environ.get("PYVMM_ARTIFACTS") or tmp_path)
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "api-web.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        if driver is not None:
            driver.quit()
        if p.poll() is None:
            p.terminate()
        p.wait(60)
    assert not sock.exists()
