#!/usr/bin/env bash
# Install the browser the editor tests (tests/test_browser.py) drive: Debian's Chromium.
#
# Playwright (the Python package, requirements-dev.txt) carries its own driver but no browser here: we never
# run `playwright install` (it downloads a browser build from outside the package registries). The tests launch
# this Chromium with `executable_path`.
#
#   CHROMIUM   the executable to look for (default: /usr/bin/chromium)
#
# Idempotent: when the executable is there and runs, it exits at once. Otherwise it runs
# `apt-get update && apt-get install -y --no-install-recommends chromium` (as root, or through `sudo -n`).
set -euo pipefail

chromium="${CHROMIUM:-/usr/bin/chromium}"

works() {
  # Debian's wrapper script prints a harmless shell warning on some machines; only the exit code counts.
  [[ -x "$chromium" ]] && "$chromium" --version >/dev/null 2>&1
}

if works; then
  echo "chromium already installed: $("$chromium" --version 2>/dev/null)"
  exit 0
fi

if [[ "$chromium" != /usr/bin/chromium ]]; then
  echo "CHROMIUM=$chromium does not run, and only /usr/bin/chromium can be installed by this script" >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get on this machine: install Chromium yourself (or set CHROMIUM to one that runs)" >&2
  exit 1
fi

as_root=()
if [[ "$(id -u)" != 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "installing chromium needs root (or password-less sudo); neither is available" >&2
    exit 1
  fi
fi

echo "installing Debian's chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends chromium

if ! works; then
  echo "apt-get installed chromium but $chromium --version fails" >&2
  exit 1
fi
echo "chromium installed: $("$chromium" --version 2>/dev/null)"
