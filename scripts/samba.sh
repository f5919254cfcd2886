#!/usr/bin/env bash
# samba.sh -- a throwaway Samba Active Directory DC (Debian 12, samba 4.17) for tests.
#
#   samba.sh template CACHE_DIR   # provision a template DC once (6-10 s) under CACHE_DIR, reuse it
#                                 # afterwards; prints the template's path
#   samba.sh init DIR TEMPLATE    # copy the template to DIR and write its smb.conf / krb5.conf
#   samba.sh start DIR TEMPLATE   # init, then run samba in a new network namespace (shell use; the
#                                 # Rust harness starts samba itself); prints env vars
#   samba.sh stop DIR             # stop what `start` started, delete its namespace
#
# The DC: realm EXAMPLE.ORG, NetBIOS domain EXAMPLE, base DC=example,DC=org, Administrator /
# Passw0rd!Passw0rd, password complexity off. Only the `ldap` service runs, on 127.0.0.1 only
# (389 plain, 636 LDAPS: Samba has no port option, so one DC per network namespace), with
# ldb:nosync, simple binds allowed on plain LDAP, and its own CA + leaf certificate.
#
# Nothing here may talk to anything but 127.0.0.1: provisioning runs under `unshare -n` (an empty
# network namespace), the DC binds 127.0.0.1 only and runs no DNS/NBT/winbind/KDC services, and
# its krb5.conf never looks anything up in DNS.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
ADMINPW='Passw0rd!Passw0rd'
script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

die() { echo "samba.sh: $*" >&2; exit 1; }

provision() { # $1 = empty target dir
  local d=$1
  unshare -n samba-tool domain provision --targetdir="$d" \
    --realm=EXAMPLE.ORG --domain=EXAMPLE --server-role=dc --dns-backend=NONE \
    --use-rfc2307 --adminpass="$ADMINPW" --host-name=dc1 --host-ip=127.0.0.1 \
    >"$d/provision.log" 2>&1 || { tail -30 "$d/provision.log" >&2; return 1; }
  # Test users may have any password (offline, straight on sam.ldb).
  unshare -n samba-tool domain passwordsettings set -s "$d/etc/smb.conf" \
    --complexity=off --min-pwd-length=1 --history-length=0 --min-pwd-age=0 --max-pwd-age=0 \
    >>"$d/provision.log" 2>&1 || { tail -30 "$d/provision.log" >&2; return 1; }
  rm -rf "$d/private/tls" # Samba's own certificate is for dc1.example.org; we bring ours
  "$(dirname "$script")/gen-tls.sh" "$d/tls"
}

# template CACHE_DIR: one template per samba version and version of this script, provisioned
# by whoever comes first; flock makes parallel test processes wait for it instead of racing.
template() {
  local cache=$1 key dir
  command -v samba-tool >/dev/null 2>&1 || die "samba-tool not found (apt-get install samba samba-ad-provision)"
  key=$({ samba -V 2>/dev/null; cat "$script"; } | sha256sum | cut -c1-16)
  mkdir -p "$cache"
  dir="$cache/samba-template-$key"
  exec 9>"$cache/samba-template-$key.lock"
  flock 9
  if [ ! -f "$dir/.ready" ]; then
    # Templates of other samba or script versions are stale now (33 MB each).
    find "$cache" -maxdepth 1 -name 'samba-template-*' ! -name "samba-template-$key*" \
      -exec rm -rf {} + 2>/dev/null || true
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp"
    provision "$dir.tmp"
    touch "$dir.tmp/.ready"
    mv "$dir.tmp" "$dir"
  fi
  flock -u 9
  echo "$dir"
}

# init DIR TEMPLATE: the instance's smb.conf holds every path, so a copy can live anywhere.
init() {
  local d=$1 tmpl=$2
  [ -f "$tmpl/.ready" ] || die "$tmpl is not a provisioned template"
  rm -rf "$d"
  mkdir -p "$(dirname "$d")"
  cp -a "$tmpl" "$d"
  d=$(cd "$d" && pwd)
  mkdir -p "$d/run" "$d/log" "$d/state" "$d/cache"
  cat > "$d/etc/smb.conf" <<EOF
[global]
	netbios name = DC1
	realm = EXAMPLE.ORG
	workgroup = EXAMPLE
	server role = active directory domain controller
	idmap_ldb:use rfc2307 = yes
	# loopback only, and only the LDAP service: nothing that resolves names or talks outward
	interfaces = 127.0.0.1
	bind interfaces only = yes
	server services = ldap
	dns forwarder =
	# everything inside this directory
	private dir = $d/private
	lock directory = $d
	state directory = $d/state
	cache directory = $d/cache
	binddns dir = $d/bind-dns
	pid directory = $d/run
	ncalrpc dir = $d/run/ncalrpc
	winbindd socket directory = $d/run/winbindd
	ntp signd socket directory = $d/run/ntp_signd
	log file = $d/log/log.%m
	logging = file
	log level = ${SAMBA_LOGLEVEL:-1}
	# no fsync in ldb/tdb: much faster writes, not crash-safe (fine for a test DC)
	ldb:nosync = true
	tls enabled = yes
	tls keyfile = $d/tls/server.key
	tls certfile = $d/tls/server.pem
	tls cafile = $d/tls/ca.pem
	ldap server require strong auth = no

[sysvol]
	path = $d/state/sysvol
	read only = No
[netlogon]
	path = $d/state/sysvol/example.org/scripts
	read only = No
EOF
  cat > "$d/krb5.conf" <<EOF
[libdefaults]
	default_realm = EXAMPLE.ORG
	dns_lookup_realm = false
	dns_lookup_kdc = false
[realms]
	EXAMPLE.ORG = {
		kdc = 127.0.0.1
	}
EOF
}

alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st#Z}" = "$st" ]; }

start() {
  local d=$1 tmpl=$2 ns pid i ok=
  init "$d" "$tmpl"
  d=$(cd "$d" && pwd)
  ns="l2s-samba-$$"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  echo "$ns" > "$d/netns"
  # -i: foreground; -M single: one process; --no-process-group: signals reach only samba.
  KRB5_CONFIG=$d/krb5.conf ip netns exec "$ns" samba -i -M single --no-process-group \
    -s "$d/etc/smb.conf" --maximum-runtime=3600 >"$d/log/samba.out" 2>&1 &
  pid=$!
  echo "$pid" > "$d/samba.pid"
  for i in $(seq 1 600); do
    ip netns exec "$ns" ldapsearch -x -LLL -H ldap://127.0.0.1 -s base -b "" dnsHostName >/dev/null 2>&1 && { ok=1; break; }
    alive "$pid" || break
    sleep 0.05
  done
  [ -n "$ok" ] || { tail -30 "$d/log/samba.out" >&2; stop "$d"; die "samba did not start"; }
  cat <<EOF
SAMBA_NETNS=$ns
LDAP_URL=ldap://127.0.0.1
LDAPS_URL=ldaps://127.0.0.1
LDAP_BASE=DC=example,DC=org
LDAP_BIND_DN=Administrator@example.org
LDAP_BIND_PW=$ADMINPW
LDAPTLS_CACERT=$d/tls/ca.pem
KRB5_CONFIG=$d/krb5.conf
SAMBA_PID=$pid
EOF
}

stop() {
  local d=$1 pid i
  if pid=$(cat "$d/samba.pid" 2>/dev/null); then
    if kill -TERM "$pid" 2>/dev/null; then
      for i in $(seq 1 300); do alive "$pid" || break; sleep 0.01; done
      ! alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$d/samba.pid"
  fi
  if [ -f "$d/netns" ]; then
    ip netns del "$(cat "$d/netns")" 2>/dev/null || true
    rm -f "$d/netns"
  fi
}

cmd=${1:-}
case $cmd in
template) template "${2:?usage: samba.sh template CACHE_DIR}" ;;
init) init "${2:?usage: samba.sh init DIR TEMPLATE}" "${3:?usage: samba.sh init DIR TEMPLATE}" ;;
start) start "${2:?usage: samba.sh start DIR TEMPLATE}" "${3:?usage: samba.sh start DIR TEMPLATE}" ;;
stop) stop "${2:?usage: samba.sh stop DIR}" ;;
*) die "usage: samba.sh template CACHE_DIR | init DIR TEMPLATE | start DIR TEMPLATE | stop DIR" ;;
esac
