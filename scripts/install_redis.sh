#!/usr/bin/env bash
# Install redis-server for the tests that share state through a real Redis (tests/service/test_state_store.py)
# and for `make bench`: Debian's package.
#
#   REDIS_SERVER   the executable to look for (default: redis-server on PATH, or /usr/bin/redis-server)
#
# Idempotent: when one runs, it exits at once. Otherwise `apt-get install -y redis-server` as root or through
# `sudo -n`; without either, `apt-get download` of Debian's redis-server and redis-tools packages unpacked into
# .redis/ (tools/harness/redis_server.py finds .redis/usr/bin/redis-server). No service is started.
set -euo pipefail
cd "$(dirname "$0")/.."

found="${REDIS_SERVER:-$(command -v redis-server || echo /usr/bin/redis-server)}"
for candidate in "$found" .redis/usr/bin/redis-server; do
  if [[ -x "$candidate" ]] && "$candidate" --version >/dev/null 2>&1; then
    echo "redis-server already installed: $("$candidate" --version)"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "no apt-get on this machine: install redis-server yourself (or set REDIS_SERVER to one that runs)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [[ "$(id -u)" == 0 ]] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
  as_root=()
  [[ "$(id -u)" == 0 ]] || as_root=(sudo -n)
  echo "installing Debian's redis-server with apt-get"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" apt-get install -y -qq --no-install-recommends redis-server
  # the package starts a system service; the tests run their own servers
  "${as_root[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
else
  echo "no root: unpacking Debian's redis-server into .redis/"
  work="$(mktemp -d)"
  (cd "$work" && apt-get download redis-server redis-tools liblzf1 libjemalloc2 >/dev/null)
  mkdir -p .redis
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" .redis; done
  rm -rf "$work"
fi

for candidate in "$(command -v redis-server || true)" /usr/bin/redis-server .redis/usr/bin/redis-server; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then
    if [[ "$candidate" == .redis/* ]]; then
      export LD_LIBRARY_PATH=".redis/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
    fi
    if "$candidate" --version >/dev/null 2>&1; then
      echo "redis-server installed: $("$candidate" --version)"
      exit 0
    fi
  fi
done
echo "redis-server was installed but does not run" >&2
exit 1
