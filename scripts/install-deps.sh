#!/usr/bin/env bash
# Installs everything the tests and the demo need on a fresh Debian machine (run as root):
#   apt: slapd, ldap-utils, openssl, samba (AD DC), 389-ds-base, tinyproxy-bin, prometheus (promtool), postgresql (no service is started and no cluster created: policy-rc.d / no_configuration / create_main_cluster = false)
#   .deps/venv-scim2: scim2-server from PyPI
#   .deps/betterauth: Better Auth and its SCIM plugin from npm (SQLite storage)
# Idempotent: a second run only checks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=${LDAP2SCIM_DEPS:-$root/.deps}
mkdir -p "$deps"

need_apt=()
# make and a C compiler build jemalloc (ldap2scim's allocator, tikv-jemalloc-sys).
for bin in slapd:slapd ldapsearch:ldap-utils openssl:openssl ss:iproute2 curl:curl systemd-analyze:systemd gzip:gzip make:make cc:gcc; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${bin%%:*}" ] || need_apt+=("${bin#*:}")
done
# Samba AD DC for the Active Directory tests (tests/ad.rs, scripts/samba.sh); unshare and flock
# come from util-linux.
# 389 Directory Server for the change feed's second RFC 4533 server (tests/ds389.rs).
# tinyproxy (the executable only, no service) for targets behind an egress proxy (tests/targets.rs).
# promtool (Debian's prometheus package; its service is not started) tests contrib/prometheus.
for bin in samba:samba samba-tool:samba-ad-provision unshare:util-linux flock:util-linux dscreate:389-ds-base tinyproxy:tinyproxy-bin promtool:prometheus; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${bin%%:*}" ] || need_apt+=("${bin#*:}")
done
[ -n "$(find /usr/lib -path '*/samba/ldb/samba_dsdb.so' -print -quit 2>/dev/null)" ] || need_apt+=(samba-dsdb-modules)
# PostgreSQL server binaries (any major) for tests/support/postgres.rs, which runs initdb and
# postgres from /usr/lib/postgresql/<major>/bin itself; `postgresql` pulls the current major.
[ -n "$(find /usr/lib/postgresql -maxdepth 3 -path '/usr/lib/postgresql/*/bin/postgres' -print -quit 2>/dev/null)" ] || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  case " ${need_apt[*]} " in
  *" samba "* | *" samba-ad-provision "* | *" samba-dsdb-modules "*)
    need_apt+=(samba samba-ad-provision samba-dsdb-modules samba-vfs-modules winbind krb5-user) ;;
  esac
  export DEBIAN_FRONTEND=noninteractive
  echo "slapd slapd/no_configuration boolean true" | debconf-set-selections
  # No package may start a service (slapd, smbd, samba-ad-dc …) on this host: the tests start
  # their own, on loopback only.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # Installing postgresql must not create (nor start) the `main` cluster: the tests make their
  # own. ucf keeps this file when postgresql-common installs its version.
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.conf
  fi
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
