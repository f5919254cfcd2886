#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian machine (run as root):
#   apt: slapd, ldap-utils, openssl (no service is started: policy-rc.d / no_configuration)
#   .deps/venv-scim2: scim2-server from PyPI
#   .deps/betterauth: Better Auth and its SCIM plugin from npm (SQLite storage)
# Idempotent: a second run only checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${LDAP2SCIM_DEPS:-$root/.deps}
mkdir -p "$deps"

need_apt=()
for bin in slapd:slapd ldapsearch:ldap-utils openssl:openssl ss:iproute2 curl:curl; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${bin%%:*}" ] || need_apt+=("${bin#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$deps/venv-scim2/bin/scim2-server" ]; then
  python3 -m venv "$deps/venv-scim2"
  "$deps/venv-scim2/bin/pip" install -q scim2-server==0.8.3
fi

ba="$deps/betterauth"
if [ ! -f "$ba/node_modules/@better-auth/scim/package.json" ] || [ ! -d "$ba/node_modules/better-sqlite3/build" ]; then
  mkdir -p "$ba"
  cp "$root/tests/support/betterauth/package.json" "$ba/package.json"
  (cd "$ba" && npm install --no-audit --no-fund --loglevel=error)
fi
cp "$root/tests/support/betterauth/server.mjs" "$ba/server.mjs"
echo "dependencies ready in $deps"
