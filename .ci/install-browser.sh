#!/usr/bin/env bash
# What tests/test_browser.py needs: Debian's chromium (at /usr/bin/chromium) and the Python playwright
# package, pinned. Playwright's own browser download is never used (the test launches /usr/bin/chromium).
# Idempotent and non-interactive. Usage: install-browser.sh [python]: playwright goes into that Python
# (default $PYTHON, else the python on PATH), the one that runs the tests. Without root and without
# sudo it leaves chromium out and the browser tests skip.
set -euo pipefail

PLAYWRIGHT_VERSION=1.65.2
PYTHON="${1:-${PYTHON:-python}}"
export DEBIAN_FRONTEND=noninteractive

if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    apt-get install -y -qq chromium </dev/null
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo -n apt-get update -qq
    sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium </dev/null
  else
    echo "install-browser: not root and no sudo: chromium not installed, the browser tests will skip" >&2
  fi
fi

if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('playwright') != '$PLAYWRIGHT_VERSION')" \
    2>/dev/null; then
  "$PYTHON" -m pip install -q "playwright==$PLAYWRIGHT_VERSION" </dev/null
fi

if [ -x /usr/bin/chromium ]; then
  echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null | head -n 1), playwright $PLAYWRIGHT_VERSION"
fi
