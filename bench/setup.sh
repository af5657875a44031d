#!/usr/bin/env bash
# What `make bench` needs and the product does not: wrk and nginx (Debian packages, installed
# when missing), py-spy and httpx-aiohttp (pinned in bench/requirements.txt, into the venv only).
set -euo pipefail
BIN=${1:-.venv/bin}
here=$(cd "$(dirname "$0")" && pwd)

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  # The package must not start a system nginx on port 80: policy-rc.d 101 forbids service starts
  # while it installs (unless the machine already has a policy of its own).
  policy=/usr/sbin/policy-rc.d
  ours=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    ours=1
  fi
  trap '[ -n "$ours" ] && $sudo rm -f "$policy"' EXIT
  echo "bench: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null; then
    # nginx-light is not in every Debian release; the full package serves as well
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]/nginx-light/nginx}" >/dev/null
  fi
fi
"$BIN/pip" install -q -r "$here/requirements.txt" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$BIN/py-spy" --version >/dev/null
"$BIN/python" -c "import httpx_aiohttp"
