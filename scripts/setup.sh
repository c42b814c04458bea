#!/usr/bin/env bash
# Creates .venv (if needed) and installs blip2 with its demo, serve and test extras.
# torch is installed first, pinned, so that no dependency can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[demo,serve,test]"
# the browser test drives Debian's Chromium (Playwright's own browser download does not work offline);
# it skips itself when Chromium is absent and this machine cannot install it
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will skip"
fi
