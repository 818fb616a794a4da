"""Save a screenshot of the Explain page to ``docs/explain.png``.

Run ``python -m tests.app.screenshot [PROJECT] [--out FILE]`` from the
repository root. Without PROJECT it uses the demo project when it is built
(``projects/btc-demo``), and otherwise builds the tiny test project in a
temporary folder. Chromium must be installed at ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from segflu_core import demo
from tests.app import browser

DEFAULT_OUT = browser.REPO_ROOT / "docs" / "explain.png"


def pick_error(project_dir: Path) -> dict:
    """Return the dev error to show: a mention starting with ``@`` where there is one, else the first error."""
    from segflu_core.project import Project

    errors = Project.load(project_dir).errors("dev")
    if errors.empty:
        raise SystemExit(f"{project_dir}: the tagger makes no errors on dev, so there is nothing to explain")
    mentions = errors[errors["text"].str.startswith("@")]
    return (mentions if not mentions.empty else errors).iloc[0].to_dict()


def capture(project_dir: Path, out: Path, work_dir: Path) -> None:
    """Open the error in the Explain page of a running app and save the screenshot to ``out``."""
    error = pick_error(project_dir)
    option = f"sentence {error['sentence']}, tokens {error['start']}-{error['end']}:"
    with browser.running_app(project_dir, work_dir / "server.log") as url:
        with browser.chromium_page(work_dir / "profile", width=1400, height=1500) as page:
            page.goto(url)
            page.get_by_role("link", name="Errors").wait_for(timeout=120000)
            page.get_by_role("link", name="Errors").click()
            page.get_by_role("button", name="Explain this error").wait_for(timeout=120000)
            browser.wait_until_idle(page, timeout_s=120)
            browser.choose_option(page, "Error to explain", option)
            browser.wait_until_idle(page, timeout_s=120)
            page.get_by_role("button", name="Explain this error").click()
            page.get_by_text("Relabel a training item").wait_for(timeout=180000)
            browser.wait_until_idle(page, timeout_s=180)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a screenshot of the segflu Explain page.")
    parser.add_argument("project", nargs="?", default=None, help="project folder (default: the demo project, else a tiny test project)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"PNG file to write (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not browser.CHROMIUM.exists():
        print(f"Chromium not found at {browser.CHROMIUM}; install the Debian chromium package", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="segflu-screenshot-") as folder:
        work_dir = Path(folder)
        if args.project is not None:
            project_dir = Path(args.project).resolve()
        elif demo.is_indexed(demo.DEMO_PROJECT_DIR):
            project_dir = demo.DEMO_PROJECT_DIR
        else:
            from tests.app.conftest import build_tiny_project
            from tests.synthetic import make_tiny_encoder

            project_dir = build_tiny_project(work_dir, make_tiny_encoder(work_dir / "encoder"))
        capture(project_dir, Path(args.out), work_dir)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
