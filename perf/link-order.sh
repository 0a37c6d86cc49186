#!/usr/bin/env bash
# Regenerates perf/ward.order, the link order of ward's steady-state code (see build.rs and
# perf/link_order.py): `bash perf/link-order.sh` from the repo root, then commit the file.
# Needs valgrind and, for the native pass, perf (installed from Debian's packages if missing:
# valgrind, linux-perf); takes about a minute after the build.
#
# Environment: WARD_BIN, PKI_BIN (use these binaries instead of building them),
# CARGO_TARGET_DIR, WORK (scratch directory; default a new mktemp -d, removed unless KEEP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
log() { echo "[link-order $(date +%H:%M:%S)] $*" >&2; }

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v perf >/dev/null || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  apt-get update -qq && apt-get install -y -q "${need[@]}" >/dev/null
fi
target="${CARGO_TARGET_DIR:-target}"
if [ -z "${WARD_BIN:-}" ] || [ -z "${PKI_BIN:-}" ]; then
  log "cargo build --release"
  cargo build --release -q -p ward --bin ward -p ward-perf --bin ward-perf-pki
fi
WARD_BIN="$(readlink -f "${WARD_BIN:-$target/release/ward}")"
PKI_BIN="$(readlink -f "${PKI_BIN:-$target/release/ward-perf-pki}")"
if [ -z "${WORK:-}" ]; then
  WORK="$(mktemp -d /tmp/ward-link-order.XXXXXX)"
  [ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT  # only a directory we created
fi
mkdir -p "$WORK/pki"
"$PKI_BIN" "$WORK/pki"
log "profiling both hops under callgrind (work dir $WORK)"
WORK="$WORK" PKI="$WORK/pki" WARD_BIN="$WARD_BIN" python3 perf/link_order.py
