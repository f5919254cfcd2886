#!/usr/bin/env bash
# The one command that runs the whole test suite on a fresh Debian machine (as root):
# installs what the tests need (scripts/install-deps.sh), builds everything, runs every test.
#
#   scripts/test.sh [extra cargo test args…]      e.g. scripts/test.sh --test harness
#
# Every integration test starts its own servers (slapd, scim2-server, Better Auth) on random
# loopback ports, so tests run in parallel; RUST_TEST_THREADS (default 4) caps how many at once.
# Exit code: non-zero if installing, building or any test failed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

command -v cargo >/dev/null 2>&1 || {
  echo "test.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
}

# Tools install-deps.sh relies on but does not install itself (present on most CI images).
missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v make >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || missing+=(make g++) # better-sqlite3
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

scripts/install-deps.sh

# tests/packaging.rs builds the .deb with cargo-deb (about a minute to install).
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked --quiet

cargo build --all-targets
# Test binaries run one after the other; inside one, up to RUST_TEST_THREADS tests at a time
# (an environment variable rather than `-- --test-threads`, which custom harnesses may reject).
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: one failing test binary does not hide the results of the others.
cargo test --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
