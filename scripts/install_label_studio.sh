#!/usr/bin/env bash
# Install Label Studio into its own virtualenv for the end-to-end tests.
#
# Label Studio pins its own (older) versions of many of our dependencies, so it
# never goes into the serving venv (.venv). The tests only talk to it over HTTP.
#
#   LS_VENV     where the virtualenv lives (default: <repo>/.venv-ls; relative
#               paths are taken relative to the repository root)
#   LS_VERSION  the Label Studio version (default: 1.23.2, the version the
#               protocol notes in shared/label-studio-protocol.md were taken on)
#   LS_PYTHON   the interpreter used to create the venv (default: python3.11,
#               else python3)
#
# Idempotent: when the venv already has the wanted version it exits at once.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ls_version="${LS_VERSION:-1.23.2}"
ls_venv="${LS_VENV:-.venv-ls}"
case "$ls_venv" in
  /*) ;;
  *) ls_venv="$repo_root/$ls_venv" ;;
esac

installed_version() {
  # Reads the installed distribution's metadata; does not import Label Studio
  # (importing it loads Django and takes seconds).
  "$ls_venv/bin/python" - <<'PY' 2>/dev/null || true
from importlib.metadata import version, PackageNotFoundError
try:
    print(version("label-studio"))
except PackageNotFoundError:
    pass
PY
}

if [[ -x "$ls_venv/bin/python" && -x "$ls_venv/bin/label-studio" ]] \
   && [[ "$(installed_version)" == "$ls_version" ]]; then
  echo "label-studio $ls_version already installed in $ls_venv"
  exit 0
fi

python_bin="${LS_PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then
    python_bin=python3.11
  else
    python_bin=python3
  fi
fi

if [[ ! -x "$ls_venv/bin/python" ]]; then
  echo "creating virtualenv $ls_venv with $python_bin"
  "$python_bin" -m venv "$ls_venv"
fi

echo "installing label-studio==$ls_version into $ls_venv"
"$ls_venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# its dependencies at the versions the tests passed with (see the file's header): an unpinned one that
# changes upstream (sentry-sdk 3.0) otherwise breaks Label Studio on a fresh machine
constraints="$repo_root/scripts/label-studio-constraints.txt"
if [[ "$ls_version" == "1.23.2" ]]; then
  "$ls_venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" "label-studio==$ls_version"
else
  "$ls_venv/bin/python" -m pip install --quiet --disable-pip-version-check "label-studio==$ls_version" "sentry-sdk<3"
fi

got="$(installed_version)"
if [[ "$got" != "$ls_version" ]]; then
  echo "label-studio install failed: found version '${got:-none}' in $ls_venv" >&2
  exit 1
fi
echo "label-studio $ls_version installed in $ls_venv"
