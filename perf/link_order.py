#!/usr/bin/env python3
"""Writes perf/ward.order, the link order of ward's steady-state code (started by
perf/link-order.sh, which builds ward and the PKI first). Standard library and valgrind only.

Why: once ready, `ward proxy` drops its startup pages (proxy/src/footprint.rs), but the first
connection faults the data path back in, and the kernel maps 64 KiB around every fault; with the
linker's default order the data path's functions sit among cold code (CLI, config, gRPC, the
server), so one request leaves most of the binary resident. lld's `--symbol-ordering-file`
(passed by build.rs) places the functions listed here first and together.

How: both hops of the harness's ward path run under callgrind with instrumentation off; once both are
ready, instrumentation is switched on, and the workload below runs what a sidecar does after startup:
tunnel handshakes on both sides, streams opened and closed, request/response round trips, a bulk
transfer both ways, held connections, a plain mutual-TLS client that is not ward, and the admin
endpoints a kubelet and Prometheus poll. Every function that ran is listed, hottest first.
Symbol names are stable across builds of the same dependency versions; a function missing from
the list (new code) is only placed after the listed ones, so a stale list costs memory, never
correctness. Regenerate after dependency updates.
"""

import glob
import os
import re
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
        return out.split(b" ", 2)[1] == b"200"


def round_trip(s, payload):
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed mid-echo")
        got += chunk
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
                if len(parts) >= 2:
                    costs[fn] = costs.get(fn, 0) + int(parts[1])
    return costs


def main():
    exe = os.path.realpath(harness.WARD_BIN)
    os.makedirs(WORK, exist_ok=True)
    for old in glob.glob(f"{WORK}/callgrind.out.*"):
        os.remove(old)
    echo_backend()
    o, i = harness.ward_configs(False)
    procs = []
    for hop, text in (("out", o), ("in", i)):
        cfg = harness.write(f"ward-{hop}.toml", text)
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--demangle=no",
                "--compress-pos=no",
                f"--callgrind-out-file={WORK}/callgrind.out.{hop}",
                exe, "proxy", "--config", cfg, "--workers", "1"]
        log = open(f"{WORK}/ward-{hop}.log", "w")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, WARD_LOG="warn")))
    try:
        for port in harness.WARD_ADMIN:
            wait(f"ward ready on admin {port}", lambda port=port: admin_get(port, "/ready"))
        time.sleep(2)  # footprint's release runs right after ready
        for p in procs:
            subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL, timeout=60)
        workload()
        time.sleep(1)
        for p in procs:  # not the drain that SIGTERM starts
            subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], check=True,
                           stdout=subprocess.DEVNULL, timeout=60)
    finally:
        for p in procs:
            p.terminate()  # SIGTERM: the proxy drains and exits; callgrind writes its dump
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    total = {}
    for hop in ("out", "in"):
        for name, cost in functions(f"{WORK}/callgrind.out.{hop}", exe).items():
            total[name] = total.get(name, 0) + cost
    order = sorted(total, key=lambda n: (-total[n], n))
    with open(OUT, "w") as f:
        f.write("".join(n + "\n" for n in order))
    print(f"{len(order)} functions written to {OUT}")


if __name__ == "__main__":
    main()
