"""Start ``segflu app`` on a free local port and drive it with Playwright and Debian's Chromium.

Used by the browser test and by ``python -m tests.app.screenshot``. Nothing
here downloads a browser: Playwright launches the Chromium at
:data:`CHROMIUM`, and callers skip when it is absent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, *, timeout_s: float) -> None:
    """Poll Streamlit's health endpoint until it returns ``ok``.

    Raises
    ------
    RuntimeError
        When the server exits or does not respond within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"segflu app exited with code {process.returncode} before it served {url}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"segflu app did not respond at {url} within {timeout_s} s")


def stop(process: subprocess.Popen) -> None:
    """Stop the server started by :func:`running_app`, by its process id, and wait for it."""
    if process.poll() is not None:
        return
    # The server runs in its own process group, which contains only the
    # processes that this helper started.
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@contextlib.contextmanager
def running_app(project_dir: Path, log_path: Path) -> Iterator[str]:
    """Run ``segflu app PROJECT`` on 127.0.0.1 and a free port; yield its base URL.

    The server's output goes to ``log_path``.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "segflu_core", "app", str(project_dir),
        "--server.port", str(port), "--server.headless", "true", "--server.fileWatcherType", "none",
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_healthy(url, process, timeout_s=STARTUP_TIMEOUT_S)
            yield url
        finally:
            stop(process)


@contextlib.contextmanager
def chromium_page(profile_dir: Path, *, width: int = 1400, height: int = 1000) -> Iterator[object]:
    """Yield a Playwright page in a headless Chromium with a fresh profile in ``profile_dir``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
            accept_downloads=True,
        )
        try:
            yield context.new_page()
        finally:
            context.close()


# True while Streamlit runs a script or shows placeholders for elements not sent yet.
BUSY_SCRIPT = """() => Boolean(
    document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')
    || document.querySelector('[data-testid="stSkeleton"]')
    || document.querySelector('[data-stale="true"]')
)"""


def wait_until_idle(page, *, timeout_s: float = 60.0, quiet_s: float = 1.0) -> None:
    """Wait until the app has shown no running script for ``quiet_s`` seconds in a row.

    Raises
    ------
    TimeoutError
        When the app is still busy after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        if page.evaluate(BUSY_SCRIPT):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the app was still running a script after {timeout_s} s")


def choose_option(page, label: str, text: str) -> None:
    """Pick the option containing ``text`` in the selectbox labelled ``label``, by typing to filter it."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first
    box.locator("input").click()
    page.keyboard.type(text)
    page.locator('[role="option"]').filter(has_text=text).first.click()
