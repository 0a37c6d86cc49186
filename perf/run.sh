#!/usr/bin/env bash
# ward's end-to-end load harness: `bash perf/run.sh` from the repo root. See perf/README.md.
#
# Installs the tools it lacks (Debian packages), builds ward in release, writes a PKI
# (root -> intermediate -> ECDSA P-256 SPIFFE leaves), then runs perf/harness.py, which sets up
# ward, haproxy, nginx, stunnel and the bare backend on 127.0.0.1 and writes perf/RESULTS.md.
#
# Environment (defaults in brackets):
#   ROUNDS [3]          rounds of every workload (medians are reported)
#   DURATION [6]        seconds per wrk / iperf3 run
#   KA_CONNS [50]       connections of the keep-alive workload
#   NEWCONN_CONNS [20]  concurrent clients of the new-connection-per-request workload
#   HOLD_CONNS [1000]   idle connections held for the RSS column
#   DEFAULTS [1]        also run the everyone's-defaults table (DEFAULT_ROUNDS [1] rounds)
#   SETUPS [ward,haproxy,nginx,stunnel,direct]
#   PORT_BASE [24100]   ports PORT_BASE..PORT_BASE+41 on 127.0.0.1 are used (+50..+89 with WARD_ALT)
#   MODE [l4]           http: the HTTP harness (perf/http_harness.py: wrk, h2load; ward,
#                       haproxy and nginx as HTTP proxies), which writes its own section of OUT
#   H2_CONNS [10], H2_STREAMS [10]  h2load's connections and concurrent streams (MODE=http)
#   WARD_BIN, PKI_BIN, GRPC_BIN  use these ward, ward-perf-pki and ward-perf-grpc-backend
#                       binaries instead of building them
#   WARD_LIMITS         `[limits]` of ward, `;`-separated `key=value` ("max_tunnel_buffer_bytes=419430400")
#   WARD_ALT            more ward setups in the same run, space-separated `name=BINARY[;key=value...]`:
#                       setup ward-<name> (a build from before a change, other limits) beside ward
#   WORKLOADS           a subset of keepalive,seq,newconn,hold,iperf (say `iperf` for the bulk column)
#   IPERF_ARGS          extra iperf3 client arguments (say `-Z`, `-R`, `-l 128K`)
#   CARGO_TARGET_DIR    where cargo builds (default: cargo's own)
#   OUT [perf/RESULTS.md]
#   WORK                scratch directory (default: a new mktemp -d; removed unless KEEP=1)
#   RAW [/tmp/ward-perf-last-run.json]  raw per-round figures (JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

log() { echo "[perf $(date +%H:%M:%S)] $*" >&2; }

# ---- build (in the background while the tools install: on a fresh machine both take minutes)
RUN_STARTED="$(date +%s)"
export RUN_STARTED
target="${CARGO_TARGET_DIR:-target}"
build=()
[ -n "${WARD_BIN:-}" ] || build+=(-p ward --bin ward)
[ -n "${PKI_BIN:-}" ] || build+=(-p ward-perf --bin ward-perf-pki)
[ -n "${GRPC_BIN:-}" ] || build+=(-p ward-perf --bin ward-perf-grpc-backend)
build_pid=""
stop_build() {
  # The build runs in its own process group (setsid): end cargo and its compilers, by group id.
  if [ -n "$build_pid" ]; then
    kill -TERM -- "-$build_pid" 2>/dev/null || true
    wait "$build_pid" 2>/dev/null || true
    build_pid=""
  fi
}
trap stop_build EXIT
trap 'exit 130' INT TERM
if [ ${#build[@]} -gt 0 ]; then
  log "cargo build --release ${build[*]} (log in $target/perf-build.log)"
  mkdir -p "$target"
  setsid cargo build --release "${build[@]}" >"$target/perf-build.log" 2>&1 &
  build_pid=$!
fi

# ---- tools
need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
command -v wrk >/dev/null || need+=(wrk)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v openssl >/dev/null || need+=(openssl)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  log "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's packages may start system services on install; this harness uses none of them and
# starts its own instances on its own ports.

if [ -n "$build_pid" ]; then
  if ! wait "$build_pid"; then
    tail -n 30 "$target/perf-build.log" >&2
    echo "perf/run.sh: cargo build --release failed (full log: $target/perf-build.log)" >&2
    exit 1
  fi
  log "build done"
  build_pid=""
fi
WARD_BIN="$(readlink -f "${WARD_BIN:-$target/release/ward}" || echo "${WARD_BIN:-$target/release/ward}")"
PKI_BIN="$(readlink -f "${PKI_BIN:-$target/release/ward-perf-pki}" || echo "${PKI_BIN:-$target/release/ward-perf-pki}")"
GRPC_BIN="$(readlink -f "${GRPC_BIN:-$target/release/ward-perf-grpc-backend}" || echo "${GRPC_BIN:-$target/release/ward-perf-grpc-backend}")"
for bin in "$WARD_BIN" "$PKI_BIN" "$GRPC_BIN"; do
  [ -x "$bin" ] || { echo "perf/run.sh: $bin is not an executable" >&2; exit 1; }
done
export WARD_BIN GRPC_BIN

# ---- scratch dir, PID list, cleanup
WORK="${WORK:-$(mktemp -d /tmp/ward-perf.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(readlink -f "$WORK")"
export WORK
: >"$WORK/pids"
harness_pid=""
cleanup() {
  stop_build
  # Only processes this run started: the harness, then any PID it recorded and left running.
  if [ -n "$harness_pid" ] && kill -0 "$harness_pid" 2>/dev/null; then
    kill -TERM "$harness_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$harness_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  if [ -s "$WORK/pids" ]; then
    while read -r pid; do
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    done <"$WORK/pids"
    sleep 1
    while read -r pid; do
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    done <"$WORK/pids"
  fi
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- PKI
log "PKI in $WORK/pki"
"$PKI_BIN" "$WORK/pki"
export PKI="$WORK/pki"
"$WARD_BIN" cert inspect "$PKI/inventory.chain.pem" >"$WORK/cert-inspect.txt" 2>&1 || true

# ---- limits: 1000 held connections x 2 hops x 2 sockets, plus wrk
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Raw per-round figures, kept after the scratch dir is gone.
export RAW="${RAW:-/tmp/ward-perf-last-run.json}"
log "running the harness (ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-6}s)"
harness=perf/harness.py
[ "${MODE:-l4}" = http ] && harness=perf/http_harness.py
PYTHONDONTWRITEBYTECODE=1 python3 "$harness" &
harness_pid=$!
wait "$harness_pid"
harness_pid=""
log "done: ${OUT:-perf/RESULTS.md}"
