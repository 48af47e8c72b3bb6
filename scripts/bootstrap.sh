#!/usr/bin/env bash
# Creates the virtual environment and installs every pinned dependency, Debian packages included.
# Usage: scripts/bootstrap.sh PYTHON VENV_DIR
set -euo pipefail
python=${1:-python3}
venv=${2:-.venv}

need_apt=()
# open3d's wheel links libusb-1.0 at import time.
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || need_apt+=(libusb-1.0-0)
if ((${#need_apt[@]})); then
  echo "== installing Debian packages: ${need_apt[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  "$python" -m venv "$venv"
fi
pip_args=(--disable-pip-version-check --progress-bar off)
# The CPU build of torch lies on this machine's disk; on other machines pip finds it on PyPI's CPU index.
[ -d /opt/wheels ] && pip_args+=(--find-links /opt/wheels)
echo "== installing Python dependencies into $venv (first run takes a minute or two)"
quiet_pip() {
  # This machine's pip configuration names optional local indexes; their absence is not an error.
  "$venv/bin/pip" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
quiet_pip install "${pip_args[@]}" --quiet --upgrade pip setuptools==80.9.0 wheel
quiet_pip install "${pip_args[@]}" --quiet -r requirements/base.txt -r requirements/ros.txt -r requirements/dev.txt
echo "== environment ready"
