#!/usr/bin/env bash
# Runs every fuzz target (or the ones named after SECONDS) for SECONDS each, one after the
# other, default 600, and prints per target the executions, libFuzzer's final coverage and the
# corpus size. Exits non-zero if any target crashed; the input is then in
# fuzz/artifacts/<target>/ and the log in fuzz/logs/<target>.log (or $FUZZ_LOG_DIR).
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(spiffe_id csr proxy_config server_config intentions_snapshot tunnel_connect l7_path)
fi

# One build for all targets; `fuzz run` below then finds them built.
cargo +nightly fuzz build

logs=${FUZZ_LOG_DIR:-fuzz/logs}
mkdir -p "$logs"
crashed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  dirs=("fuzz/corpus/$t")
  [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
  log="$logs/$t.log"
  # New inputs go to the first directory (the generated corpus); the seeds are only read.
  # -timeout: an input that takes 10 s counts as a crash (a hang).
  start=$SECONDS
  if cargo +nightly fuzz run "$t" "${dirs[@]}" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=CRASHED
    crashed+=("$t")
  fi
  took=$((SECONDS - start))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  final=$(grep -E '^#[0-9]+[[:space:]]+(DONE|NEW|REDUCE|pulse|INITED)' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$final")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$final")
  corpus=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$final")
  echo "fuzz $t: $result, ${took}s, executions ${execs:-?}, cov ${cov:-?}, ft ${ft:-?}, corpus ${corpus:-?}"
  if [ "$result" != ok ]; then
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/  /'
  fi
done

if [ ${#crashed[@]} -gt 0 ]; then
  echo "fuzz: crashed: ${crashed[*]} (inputs in fuzz/artifacts/, logs in $logs/)" >&2
  exit 1
fi
