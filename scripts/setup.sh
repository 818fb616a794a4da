#!/usr/bin/env bash
# Create .venv with the pinned requirements and segflu installed in editable
# mode. Safe to run again: it reinstalls only when requirements.txt changed.
# As root on Debian it also installs Chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x /usr/bin/chromium && "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
  echo "setup: installing Chromium and ChromeDriver from Debian for the browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi

python3 -m venv .venv
stamp=.venv/.segflu-requirements.sha256
wanted=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  echo "setup: installing the pinned requirements into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$wanted" > "$stamp"
fi
