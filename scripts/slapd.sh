#!/usr/bin/env bash
# slapd.sh -- a throwaway OpenLDAP slapd for tests and the demo, listening on 127.0.0.1 only.
#
#   slapd.sh init  DIR [SEED.ldif]   # TLS material + cn=config + base entries (and SEED) via slapadd
#   slapd.sh start DIR [SEED.ldif]   # init, start slapd in the background, seed SEED online; prints env vars
#   slapd.sh stop  DIR               # SIGTERM the slapd started by `start`, SIGKILL after 2 s
#
# `init` is what the Rust test harness (tests/support/slapd.rs) uses: it then runs
# `slapd -d 0 -F DIR/slapd.d -h ...` itself, so that the slapd process is its own child.
# `start` is for shell users (scripts/demo.sh).
#
# The directory: suffix dc=example,dc=org with ou=people and ou=groups;
# rootdn cn=admin,dc=example,dc=org / secret; a read-only service account
# cn=sync,dc=example,dc=org / syncpw (no size limit); `manage` over ldapi with SASL EXTERNAL for
# the user running the script (root in CI).
# Schemas core, cosine, nis, inetorgperson; mdb (4 GiB map, olcDbNoSync, indexes);
# overlays memberof (with refint) and syncprov.
#
# Seeding: with `init DIR SEED` the seed goes through `slapadd -q -w` (fast, for big directories),
# and because overlays do not run under slapadd the seed must carry its own memberOf values.
# With `start DIR SEED` the seed is added online with ldapadd over ldapi, so the memberof overlay
# fills memberOf and the seed must NOT contain memberOf (set SLAPD_SEED_MODE=slapadd to change that).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "slapd.sh: $*" >&2; exit 1; }

config_ldif() {
  local dir=$1
  cat <<EOF
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: $dir/slapd.pid
olcArgsFile: $dir/slapd.args
olcLogLevel: ${SLAPD_LOGLEVEL:-none}
olcTLSCACertificateFile: $dir/tls/ca.pem
olcTLSCertificateFile: $dir/tls/server.pem
olcTLSCertificateKeyFile: $dir/tls/server.key

dn: cn=module,cn=config
objectClass: olcModuleList
cn: module
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: memberof
olcModuleLoad: syncprov

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

EOF
  local s
  for s in core cosine nis inetorgperson; do
    cat "/etc/ldap/schema/$s.ldif"
    echo
  done
  cat <<EOF
dn: olcDatabase={-1}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {-1}frontend
olcSizeLimit: unlimited

dn: olcDatabase={0}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {0}config
olcAccess: {0}to * by dn.exact=gidNumber=$(id -g)+uidNumber=$(id -u),cn=peercred,cn=external,cn=auth manage by * none

dn: olcDatabase={1}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {1}mdb
olcSuffix: dc=example,dc=org
olcDbDirectory: $dir/data
olcRootDN: cn=admin,dc=example,dc=org
olcRootPW: secret
olcDbMaxSize: 4294967296
olcDbNoSync: TRUE
olcSizeLimit: unlimited
olcTimeLimit: unlimited
olcDbIndex: objectClass eq
olcDbIndex: entryUUID,entryCSN eq
olcDbIndex: uid,cn,mail eq,sub
olcDbIndex: member,memberUid,memberOf eq
olcAccess: {0}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {1}to * by dn.exact=gidNumber=$(id -g)+uidNumber=$(id -u),cn=peercred,cn=external,cn=auth manage by users read by * none

dn: olcOverlay={0}memberof,olcDatabase={1}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {0}memberof
olcMemberOfRefInt: TRUE
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf

dn: olcOverlay={1}syncprov,olcDatabase={1}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: {1}syncprov
olcSpCheckpoint: 100 10
olcSpSessionLog: 10000
EOF
}

base_ldif() {
  cat <<'EOF'
dn: dc=example,dc=org
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: cn=sync,dc=example,dc=org
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: sync
userPassword: syncpw

EOF
}

# init DIR [SEED]: everything up to (not including) starting slapd. Port-independent, so a
# caller can retry the start on other ports without redoing it.
init() {
  local dir=$1 seed=${2:-}
  [ -z "$seed" ] || [ -r "$seed" ] || die "cannot read seed $seed"
  rm -rf "$dir/slapd.d" "$dir/data"
  mkdir -p "$dir/slapd.d" "$dir/data"
  [ -f "$dir/tls/server.pem" ] || "$here/gen-tls.sh" "$dir/tls"
  config_ldif "$dir" > "$dir/config.ldif"
  slapadd -n0 -F "$dir/slapd.d" -l "$dir/config.ldif" >/dev/null
  # -q skips consistency checks (fast); -w writes the contextCSN so syncprov can hand out cookies.
  { base_ldif; [ -z "$seed" ] || { cat "$seed"; echo; }; } | slapadd -q -w -n1 -F "$dir/slapd.d" >/dev/null
}

# A random port below the kernel's ephemeral range (32768-60999) that nobody listens on.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [ -z "$(ss -Htln "sport = :$p")" ] && [ "$p" != "${1:-}" ] && { echo "$p"; return; }
  done
}

ldapi_url() { printf 'ldapi://%s' "$(printf %s "$1/ldapi" | sed 's,/,%2F,g')"; }

start() {
  local dir=$1 seed=${2:-} mode=${SLAPD_SEED_MODE:-ldapadd}
  [ -z "$seed" ] || seed=$(cd "$(dirname "$seed")" && pwd)/$(basename "$seed")
  if [ "$mode" = slapadd ]; then init "$dir" "$seed"; else init "$dir"; fi
  local sock port sport pid attempt i ok
  sock=$(ldapi_url "$dir")
  for attempt in 1 2 3 4 5; do
    port=$(free_port)
    sport=$(free_port "$port")
    # -d 0 keeps slapd in the foreground (no fork), so $! is the real slapd PID.
    slapd -d 0 -F "$dir/slapd.d" -h "ldap://127.0.0.1:$port/ ldaps://127.0.0.1:$sport/ $sock" \
      >"$dir/slapd.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/slapd.pidfg"
    ok=
    for i in $(seq 1 500); do # ~10 s
      # The ldapi socket is ours alone; slapd binds every listener before it serves any.
      if ldapsearch -Q -Y EXTERNAL -LLL -H "$sock" -s base -b "" namingContexts >/dev/null 2>&1 &&
        ldapsearch -x -LLL -H "ldap://127.0.0.1:$port" -s base -b "" namingContexts >/dev/null 2>&1; then
        ok=1
        break
      fi
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.02
    done
    [ -n "$ok" ] && break
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$dir/slapd.pidfg"
    # With -d 0 slapd exits silently when a port is taken, so any early exit is retried on
    # other ports; a real configuration error fails every attempt and is reported below.
  done
  [ -n "$ok" ] || { cat "$dir/slapd.log" >&2; die "slapd did not start (see its log above; slapd -d 0 logs little)"; }
  if [ -n "$seed" ] && [ "$mode" != slapadd ]; then
    ldapadd -Q -Y EXTERNAL -H "$sock" -f "$seed" >/dev/null
  fi
  cat <<EOF
LDAP_URL=ldap://127.0.0.1:$port
LDAPS_URL=ldaps://127.0.0.1:$sport
LDAPI_URL=$sock
LDAP_BASE=dc=example,dc=org
LDAP_ADMIN_DN=cn=admin,dc=example,dc=org
LDAP_ADMIN_PW=secret
LDAP_BIND_DN=cn=sync,dc=example,dc=org
LDAP_BIND_PW=syncpw
LDAPTLS_CACERT=$dir/tls/ca.pem
SLAPD_PID=$pid
EOF
}

stop() {
  local dir=$1 pid i
  pid=$(cat "$dir/slapd.pidfg" 2>/dev/null) || return 0
  # A zombie (state Z) counts as gone: it is no longer serving, only waiting to be reaped.
  alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st#Z}" = "$st" ]; }
  if kill -TERM "$pid" 2>/dev/null; then
    for i in $(seq 1 200); do
      alive "$pid" || break
      sleep 0.01
    done
    ! alive "$pid" || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/slapd.pidfg"
}

cmd=${1:-}
dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: slapd.sh init|start|stop DIR [SEED.ldif]"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
case $cmd in
init) init "$dir" "${3:-}" ;;
start) start "$dir" "${3:-}" ;;
stop) stop "$dir" ;;
*) die "unknown command $cmd" ;;
esac
