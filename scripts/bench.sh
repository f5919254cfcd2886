#!/usr/bin/env bash
# The scale benchmark of issue 5 (results and analysis in BENCHMARKS.md):
#
#   scripts/bench.sh            # 100,000 users + 10,000 groups; push of a 10,000-user subset (~10 min)
#   scripts/bench.sh --small    # 300 users: proves it works in seconds
#   scripts/bench.sh --users 20000 --push-users 2000 --concurrency 4,8 --wrk-seconds 10 --reps 3
#
# Installs what it needs (the test dependencies via scripts/install-deps.sh, plus wrk and
# ldap-utils), builds in release mode and runs benches/scale.rs. Every server runs on 127.0.0.1
# and is stopped by PID at the end. The Markdown report goes to stdout and to
# target/bench-scale.md; progress goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

command -v cargo >/dev/null 2>&1 || {
  echo "bench.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
}

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v ldapsearch >/dev/null 2>&1 || missing+=(ldap-utils)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# slapd and scim2-server, as for the tests.
scripts/install-deps.sh

cargo build --release --bench scale --bin ldap2scim
target_dir=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$target_dir"
cargo bench --bench scale -- "$@" | tee "$target_dir/bench-scale.md"
