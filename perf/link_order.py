#!/usr/bin/env python3
"""Writes perf/ward.order, the link order of ward's steady-state code (started by
perf/link-order.sh, which builds ward and the PKI first). Standard library and valgrind only.

Why: once ready, `ward proxy` drops its startup pages (proxy/src/startup_memory.rs), but the first
connection faults the data path back in, and the kernel maps 64 KiB around every fault; with the
linker's default order the data path's functions sit among cold code (CLI, config, gRPC, the
server), so one request leaves most of the binary resident. lld's `--symbol-ordering-file`
(passed by build.rs) places the functions listed here first and together.

How: both hops of the harness's ward path run under callgrind, which zeroes its counts when the
proxy releases its startup memory (`--zero-before`); once both are ready, the workload below runs
what a sidecar does after startup: tunnel handshakes on both sides, streams opened and closed, request/response round
trips, a bulk transfer both ways, held connections, a plain mutual-TLS client that is not ward,
and the admin endpoints a kubelet and Prometheus poll. Twice: with `--workers 1` (tokio's
current-thread runtime) and with the default runtime (one worker per core). Every function of
the binary that ran is listed, hottest first, after a `# rustc ...` line (lld skips it; build.rs
warns when it differs from the compiler in use).

Symbol names depend on the rustc version, the dependency versions and the release profile
(fat LTO, so no `.llvm.<hash>` names and nothing that depends on the build's paths); a name the
binary does not have is skipped, so a stale list costs memory, never correctness. Regenerate
after a toolchain or dependency update, a profile change or a large change to the data path. A native pass with `perf` (page faults of the same workload) appends some of what runs
only natively (e.g. the variants of the crypto library's assembly this CPU selects, AVX-512, VAES); it sees one
fault per 64 KiB window, so it finds some, not all.
"""

import glob
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

WORK = os.environ.setdefault("WORK", "/tmp/ward-link-order")
os.environ.setdefault("PORT_BASE", "24600")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (reads WORK, PKI, PORT_BASE, WARD_BIN from the environment)

OUT = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ward.order"))
OUT_P, IN_P = harness.PORTS["ward"]
BACKEND = harness.BACKEND
DEADLINE = time.monotonic() + 600  # every wait below is bounded by this


def echo_backend():
    """A threaded echo server on BACKEND: the L4 path does not look at the bytes."""
    srv = socket.create_server(("127.0.0.1", BACKEND), backlog=512)

    def serve(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)

    def accept():
        while True:
            c, _ = srv.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def wait(what, fn, timeout=180):
    end = min(time.monotonic() + timeout, DEADLINE)
    while time.monotonic() < end:
        try:
            if fn():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")


def admin_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out.startswith(b"HTTP/1.1 200 ")


def round_trip(s, payload):
    # Send from a thread: a large payload cannot wait in socket buffers until we read. Not on
    # a TLS socket: one OpenSSL connection must not be read and written by two threads at once
    # (that made this script fail now and then at the plain mutual-TLS client).
    if isinstance(s, ssl.SSLSocket):
        s.sendall(payload)
        sender = None
    else:
        sender = threading.Thread(target=s.sendall, args=(payload,), daemon=True)
        sender.start()
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-echo")
        got += chunk
    if sender:
        sender.join(timeout=60)
    if got != payload:
        raise RuntimeError("echo differs")


def workload():
    for _ in range(20):  # a new connection per request: one stream each on the tunnel
        with socket.create_connection(("127.0.0.1", OUT_P), timeout=60) as s:
            round_trip(s, b"GET / HTTP/1.1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", OUT_P), timeout=60) as s:
        for _ in range(200):  # sequential round trips on one connection
            round_trip(s, b"x" * 100)
        blob = os.urandom(1 << 20)
        for _ in range(8):  # bulk, both ways (echo)
            round_trip(s, blob)
    held = [socket.create_connection(("127.0.0.1", OUT_P), timeout=60) for _ in range(100)]
    for s in held:
        round_trip(s, b"hold")
    for s in held:
        s.close()
    # A client that is not ward: plain mutual TLS on the inbound port.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(f"{harness.PKI}/root.pem")
    ctx.load_cert_chain(f"{harness.PKI}/order.chain.pem", f"{harness.PKI}/order.key.pem")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", IN_P), timeout=60) as raw:
            with ctx.wrap_socket(raw, server_hostname="inventory.ward.local") as s:
                round_trip(s, b"plain mtls")
    for port in harness.WARD_ADMIN:
        for path in ("/metrics", "/ready", "/live"):
            admin_get(port, path)


def functions(outfile, exe):
    """{symbol: instructions} for the functions of `exe` in a callgrind dump (names kept
    mangled, as the linker sees them)."""
    costs = {}
    obj = fn = None
    # Compressed names: "(id) name" where a name first appears (on fn=, cfn=, ob= or cob=
    # lines: cfn shares fn's ids, cob shares ob's), "(id)" alone after.
    names = {"ob": {}, "fn": {}}
    ref = re.compile(r"^c?(ob|fn)=\((\d+)\)(?: (.*))?$")
    with open(outfile, errors="replace") as f:
        for line in f:
            m = ref.match(line)
            if m:
                kind, num, name = m.groups()
                if name is not None:
                    names[kind][num] = name.strip()
                if name is not None and kind == "fn":
                    # --separate-recs: recursion levels are named "sym'2", "sym'3".
                    names["fn"][num] = re.sub(r"'\d+$", "", names["fn"][num])
                if line.startswith("ob="):
                    obj = os.path.realpath(names["ob"].get(num, ""))
                elif line.startswith("fn="):
                    fn = names["fn"].get(num)
                continue
            if line.startswith("calls="):
                next(f, None)  # the cost line of a call is the callee's inclusive cost
                continue
            if fn and obj == exe and line[:1].isdigit():
                parts = line.split()
                if len(parts) >= 2 and int(parts[1]) > 0:
                    costs[fn] = costs.get(fn, 0) + int(parts[1])
    return costs


def start_hops(mode, argv):
    """Starts both hops of the harness's ward path with `argv(hop, config)`; waits until both
    are ready. Returns the processes (harness.spawn records them; harness.stop ends them)."""
    o, i = harness.ward_configs(False)
    procs = [harness.spawn(f"ward-{mode}-{hop}", argv(hop, harness.write(f"ward-{hop}.toml", t)),
                           env=dict(os.environ, WARD_LOG="warn"))
             for hop, t in (("out", o), ("in", i))]
    try:
        for port in harness.WARD_ADMIN:
            wait(f"ward ready on admin {port}", lambda port=port: admin_get(port, "/ready"))
    except BaseException:
        for p in procs:
            harness.stop(p)
        raise
    return procs


def profile(exe, mode, runtime_args):
    """Runs both hops under callgrind with `runtime_args`, the workload once they are ready;
    returns {symbol: instructions} over both."""
    # Counting starts where the proxy releases its startup memory (startup_memory.rs), so what runs
    # from there on is listed, and startup is not.
    procs = start_hops(mode, lambda hop, cfg: [
        "valgrind", "--tool=callgrind", "--zero-before=*release_startup_memory*",
        "--demangle=no", "--compress-pos=no",
        f"--callgrind-out-file={WORK}/callgrind.out.{mode}.{hop}",
        exe, "proxy", "--config", cfg, *runtime_args])
    try:
        time.sleep(2)  # startup_memory's release runs right after ready
        workload()
        time.sleep(1)
        for p in procs:  # not the drain that SIGTERM starts
            subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL, timeout=60)
    finally:
        for p in procs:  # SIGTERM: the proxy drains and exits; callgrind writes its dump
            harness.stop(p, grace=120)
    total = {}
    for hop in ("out", "in"):
        for name, cost in functions(f"{WORK}/callgrind.out.{mode}.{hop}", exe).items():
            total[name] = total.get(name, 0) + cost
    return total


def native_faults(exe, listed):
    """Functions the native run executes that callgrind did not list (among them the variants of
    the crypto library's assembly that this CPU selects): both hops run without valgrind (`--workers 1`), and
    the page faults of the workload are recorded with `perf`. Only the first fault of each
    64 KiB window is seen, in the binary as it is linked now, so this finds some of what is
    missing, not all; run the script twice to find more. Needs `perf`; returns [] without it."""
    if shutil.which("perf") is None:
        print("perf not found: the native pass is skipped (CPU-specific crypto code unlisted)")
        return []
    procs = start_hops("native", lambda hop, cfg: [exe, "proxy", "--config", cfg,
                                                   "--workers", "1"])
    data = f"{WORK}/faults.data"
    if os.path.exists(data):
        os.remove(data)
    perf = None
    try:
        time.sleep(1)
        perf = harness.spawn("perf-faults", ["perf", "record", "-q", "-e", "page-faults", "-c",
                                             "1", "-d", "-o", data,
                                             "-p", ",".join(str(p.pid) for p in procs)])
        time.sleep(1)
        workload()
    finally:
        if perf is not None and perf.poll() is None:
            os.kill(perf.pid, signal.SIGINT)  # perf record writes its data on SIGINT
            try:
                perf.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for p in ([perf] if perf else []) + procs:
            harness.stop(p, grace=60)
    if perf is None or perf.returncode not in (0, -signal.SIGINT) or not os.path.exists(data):
        print("perf record failed: the native pass adds nothing")
        return []
    out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,addr", "--no-demangle"],
                         capture_output=True, text=True, timeout=120).stdout
    nm = subprocess.run(["nm", "--defined-only", exe], capture_output=True, text=True,
                        timeout=120).stdout
    ours = {line.split()[-1] for line in nm.splitlines() if line.strip()}
    found = []
    for line in out.splitlines():
        parts = line.split()
        # addr == ip: the fault fetched the instruction itself (code, not data).
        if len(parts) == 4 and parts[0] == parts[2] and parts[3] not in listed:
            if parts[3] in ours and parts[3] not in found:  # not libc's, not the PLT
                found.append(parts[3])
    return found


def main():
    exe = os.path.realpath(harness.WARD_BIN)
    os.makedirs(WORK, exist_ok=True)
    for old in glob.glob(f"{WORK}/callgrind.out.*"):
        os.remove(old)
    echo_backend()
    total = {}
    # Both runtimes: `--workers 1` (current-thread) and the default (one worker per core).
    for mode, args in (("single", ["--workers", "1"]), ("multi", [])):
        for name, cost in profile(exe, mode, args).items():
            total[name] = total.get(name, 0) + cost
    if len(total) < 300:
        raise RuntimeError(f"only {len(total)} functions profiled: the workload or the "
                           "callgrind output is not what this script expects")
    order = sorted(total, key=lambda n: (-total[n], n))
    order += native_faults(exe, set(order))
    rustc = subprocess.run([os.environ.get("RUSTC", "rustc"), "-V"], capture_output=True,
                           text=True, timeout=60).stdout.strip()
    with open(OUT, "w") as f:
        # lld skips lines that start with '#'; build.rs compares this with its rustc.
        f.write(f"# {rustc}\n" + "".join(n + "\n" for n in order))
    print(f"{len(order)} functions written to {OUT}")


if __name__ == "__main__":
    main()
