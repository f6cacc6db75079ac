#!/usr/bin/env bash
# System packages the tests drive as real parts: Debian's Chromium for the browser tests (Playwright drives it; its
# own browser download is not used) and nginx for the TLS proxy test (deploy/proxy/nginx.conf).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} for the tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "note: ${missing[*]} missing and cannot be installed here (not root / no apt-get): their tests skip"
fi
