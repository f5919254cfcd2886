#!/usr/bin/env bash
# A first look at ldap2scim, end to end on this machine, in about a minute:
#
#   scripts/demo.sh
#
# Installs the test servers (scripts/install-deps.sh), builds ldap2scim, starts a throwaway
# OpenLDAP (10 people, 3 groups, one of them nested) and a scim2-server on random loopback ports,
# writes a configuration, then shows `plan` (the dry run), `sync`, what arrived on the SCIM
# server, and a second `plan` with nothing left to do. Everything it started is stopped by PID,
# and its temporary directory removed, when it exits (also on Ctrl-C or failure).
# KEEP=1 keeps the temporary directory; LDAP2SCIM_BIN=path uses that binary instead of building.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
deps=${LDAP2SCIM_DEPS:-$root/.deps}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Installing the test servers (once)"
scripts/install-deps.sh
command -v jq >/dev/null 2>&1 || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends jq >/dev/null
}

if [ -n "${LDAP2SCIM_BIN:-}" ]; then
  bin=$LDAP2SCIM_BIN # a binary built elsewhere
else
  say "Building ldap2scim"
  cargo build --bin ldap2scim
  bin=${CARGO_TARGET_DIR:-$root/target}/debug/ldap2scim
fi

tmp=$(mktemp -d /tmp/ldap2scim-demo.XXXXXX)
scim_pid=
cleanup() {
  set +e
  if [ -n "$scim_pid" ]; then
    kill -TERM "$scim_pid" 2>/dev/null && wait "$scim_pid" 2>/dev/null
  fi
  "$root/scripts/slapd.sh" stop "$tmp/slapd"
  if [ -n "${KEEP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Starting OpenLDAP with 10 people and 3 groups"
people=(
  "ada:Ada:Lovelace:Engineer"
  "alan:Alan:Turing:Engineer"
  "grace:Grace:Hopper:Engineer"
  "linus:Linus:Torvalds:Engineer"
  "margaret:Margaret:Hamilton:Director"
  "ken:Ken:Thompson:Sales Engineer"
  "dennis:Dennis:Ritchie:Sales Engineer"
  "barbara:Barbara:Liskov:Account Manager"
  "edsger:Edsger:Dijkstra:Advisor"
  "frances:Frances:Allen:Advisor"
)
base=dc=example,dc=org
{
  for p in "${people[@]}"; do
    IFS=: read -r uid given sn title <<<"$p"
    printf 'dn: uid=%s,ou=people,%s\nobjectClass: inetOrgPerson\nuid: %s\ncn: %s %s\nsn: %s\n' \
      "$uid" "$base" "$uid" "$given" "$sn" "$sn"
    printf 'givenName: %s\nmail: %s@example.org\ntitle: %s\n\n' "$given" "$uid" "$title"
  done
  printf 'dn: cn=engineering,ou=groups,%s\nobjectClass: groupOfNames\ncn: engineering\n' "$base"
  for uid in ada alan grace linus; do printf 'member: uid=%s,ou=people,%s\n' "$uid" "$base"; done
  printf '\ndn: cn=sales,ou=groups,%s\nobjectClass: groupOfNames\ncn: sales\n' "$base"
  for uid in ken dennis barbara; do printf 'member: uid=%s,ou=people,%s\n' "$uid" "$base"; done
  # Nested: staff = engineering + sales + margaret.
  printf '\ndn: cn=staff,ou=groups,%s\nobjectClass: groupOfNames\ncn: staff\n' "$base"
  printf 'member: cn=engineering,ou=groups,%s\nmember: cn=sales,ou=groups,%s\n' "$base" "$base"
  printf 'member: uid=margaret,ou=people,%s\n\n' "$base"
} >"$tmp/seed.ldif"
scripts/slapd.sh start "$tmp/slapd" "$tmp/seed.ldif" >"$tmp/slapd.env"
# shellcheck disable=SC1091
. "$tmp/slapd.env"
echo "slapd (PID $SLAPD_PID) on $LDAP_URL and $LDAPS_URL"

say "Starting scim2-server"
token=$(openssl rand -hex 16)
for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 12000))
  [ -z "$(ss -Htln "sport = :$port")" ] || continue
  "$deps/venv-scim2/bin/python" -m scim2_server.testserver.cli --hostname 127.0.0.1 \
    --port "$port" --bearer-token "$token" >"$tmp/scim2-server.log" 2>&1 &
  scim_pid=$!
  scim_url=http://127.0.0.1:$port/v2
  for i in $(seq 1 200); do
    kill -0 "$scim_pid" 2>/dev/null || break
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$scim_url/Users")" = 200 ] && break 2
    sleep 0.05
  done
  kill -KILL "$scim_pid" 2>/dev/null; wait "$scim_pid" 2>/dev/null || true
  scim_pid=
done
[ -n "$scim_pid" ] || { cat "$tmp/scim2-server.log" >&2; echo "scim2-server did not start" >&2; exit 1; }
echo "scim2-server (PID $scim_pid) at $scim_url"

say "Writing the configuration"
mkdir -p "$tmp/targets.d"
printf '%s' "$LDAP_BIND_PW" >"$tmp/ldap.pw"
printf '%s' "$token" >"$tmp/demo-app.token"
chmod 600 "$tmp/ldap.pw" "$tmp/demo-app.token"
cat >"$tmp/config.toml" <<EOF
[daemon]
state_dir = "$tmp/state"
targets_dir = "targets.d"

[ldap]
url = "$LDAP_URL"
starttls = true
ca_file = "$LDAPTLS_CACERT"
bind_dn = "$LDAP_BIND_DN"
bind_password = { file = "$tmp/ldap.pw" }
page_size = 100

[ldap.users]
base = "ou=people,$base"
filter = "(objectClass=inetOrgPerson)"
disabled_filter = "(employeeType=disabled)"

[ldap.groups]
base = "ou=groups,$base"
filter = "(objectClass=groupOfNames)"
nested = true
EOF
cat >"$tmp/targets.d/demo-app.toml" <<EOF
url = "$scim_url"
auth = { bearer = { file = "$tmp/demo-app.token" } }
max_deprovisions = "100%"
match_existing = ["externalId", "userName"]
EOF
echo "--- $tmp/config.toml"; cat "$tmp/config.toml"
echo "--- $tmp/targets.d/demo-app.toml"; cat "$tmp/targets.d/demo-app.toml"

# plan exits 2 when changes are pending: that is the expected answer here, not a failure.
run() {
  local rc=0
  echo "\$ ldap2scim --config $tmp/config.toml $*"
  "$bin" --config "$tmp/config.toml" "$@" || rc=$?
  echo "(exit code $rc)"
  return 0
}

say "Dry run: what would change"
run plan

say "Sync"
run sync

say "What the SCIM server holds now"
curl -s -H "Authorization: Bearer $token" "$scim_url/Users?count=1000" |
  jq -r '.Resources | sort_by(.userName)[] | "user   \(.userName)\tactive=\(.active)"'
curl -s -H "Authorization: Bearer $token" "$scim_url/Groups?count=1000" |
  jq -r '.Resources | sort_by(.displayName)[] | "group  \(.displayName)\t\((.members // []) | length) members"'

say "A second dry run: nothing left to do"
run plan
