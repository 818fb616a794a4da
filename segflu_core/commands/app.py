"""``segflu app [PROJECT] [STREAMLIT OPTIONS]``: open the web app on a project.

Without PROJECT the app opens the demo project, ``projects/btc-demo`` in the
repository, and builds it first when it is missing (see
:mod:`segflu_core.demo`). Options after PROJECT go to ``streamlit run``
unchanged, for example ``--server.port 8502``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from segflu_core.errors import ProjectError

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO_ROOT / "app.py"

# The app reads the project folder to open from this environment variable.
PROJECT_ENV = "SEGFLU_PROJECT"

# Options that segflu sets unless the user passes the same option. The server
# listens on the loopback interface only, because the app can read and write
# files on this machine. Uploads are limited to 50 MB, since a training file
# is parsed in memory. Error boxes show no links to Google or ChatGPT search,
# which would send the error text to those sites. The repository's
# .streamlit/config.toml sets the same for `streamlit run app.py`.
DEFAULT_STREAMLIT_OPTIONS = {
    "--server.address": "127.0.0.1",
    "--server.maxUploadSize": "50",
    "--browser.gatherUsageStats": "false",
    "--client.showErrorLinks": "false",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the project folder and the pass-through Streamlit options to ``parser``."""
    parser.add_argument("project", nargs="?", default=None, help="project folder to open (default: the demo project)")
    parser.add_argument("streamlit_args", nargs=argparse.REMAINDER, help="options passed to streamlit run")


def streamlit_command(streamlit_args: list[str]) -> list[str]:
    """Return the ``streamlit run`` command line for ``app.py`` with segflu's default options.

    Parameters
    ----------
    streamlit_args : list of str
        Options from the user, as ``--name value`` or ``--name=value``; they
        override the defaults of the same name.
    """
    user_options = {argument.split("=", 1)[0] for argument in streamlit_args if argument.startswith("--")}
    command = [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT)]
    for option, value in DEFAULT_STREAMLIT_OPTIONS.items():
        if option not in user_options:
            command += [option, value]
    return command + list(streamlit_args)


def resolve_project(project: str | None) -> Path:
    """Return the project folder to open, building the demo project when none is given.

    Raises
    ------
    ProjectError
        When ``project`` is not an existing folder.
    """
    if project is None:
        from segflu_core.demo import ensure_demo_project

        print("No project given; opening the demo project (it is built on the first start).", file=sys.stderr)
        return ensure_demo_project(progress=True)
    path = Path(project).expanduser().resolve()
    if not path.is_dir():
        raise ProjectError(f"{project}: project folder not found; pass a folder made by 'segflu train', or no folder to open the demo project")
    return path


def run(args: argparse.Namespace) -> int:
    """Start Streamlit on the app and return its exit code."""
    project_dir = resolve_project(args.project)
    command = streamlit_command(list(args.streamlit_args or []))
    environment = {**os.environ, PROJECT_ENV: str(project_dir)}
    print(f"Opening {project_dir}", file=sys.stderr)
    try:
        return subprocess.call(command, env=environment)
    except KeyboardInterrupt:
        return 130
