#!/usr/bin/env python3
"""ward's end-to-end load harness; started by perf/run.sh (which installs the tools, builds ward
and writes the PKI). Standard library only.

Sets up on 127.0.0.1 the two-hop sidecar path for each setup:

    load generator -> outbound hop (plain) -> mutual TLS 1.3 -> inbound hop -> backend

for ward, haproxy, nginx, stunnel, and `direct` (the backend alone), all at once on their own
ports, then runs each workload round after round, setups interleaved (ward, haproxy, nginx,
stunnel, direct, ward, ...), and writes the medians to RESULTS.md.

Every process it starts is recorded (PID file for run.sh's EXIT trap) and stopped by PID at the
end; every loop is bounded; all traffic goes to 127.0.0.1.
"""

import asyncio
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

ENV = os.environ
ROUNDS = int(ENV.get("ROUNDS", "3"))
DURATION = int(ENV.get("DURATION", "6"))
KA_CONNS = int(ENV.get("KA_CONNS", "50"))
NEWCONN_CONNS = int(ENV.get("NEWCONN_CONNS", "20"))
HOLD_CONNS = int(ENV.get("HOLD_CONNS", "1000"))
DEFAULTS = ENV.get("DEFAULTS", "1") == "1"
DEFAULT_ROUNDS = int(ENV.get("DEFAULT_ROUNDS", "1"))
SETUPS = ENV.get("SETUPS", "ward,haproxy,nginx,stunnel,direct").split(",")
PORT_BASE = int(ENV.get("PORT_BASE", "24100"))
WORK = ENV.get("WORK", "/tmp")
PKI = ENV.get("PKI", "")
WARD_BIN = ENV.get("WARD_BIN", "ward")
OUT = ENV.get("OUT", "perf/RESULTS.md")
RAW = ENV.get("RAW", os.path.join(WORK, "raw.json"))
PIDFILE = os.path.join(WORK, "pids")
NGINX_MODULE = ENV.get("NGINX_STREAM_MODULE", "/usr/lib/nginx/modules/ngx_stream_module.so")
CLK = os.sysconf("SC_CLK_TCK")
PEERS = ["haproxy", "nginx", "stunnel"]

BACKEND = PORT_BASE  # the HTTP backend, then the iperf3 server, on the same port
PORTS = {  # (outbound hop listen, inbound hop listen, admin ports for ward)
    "ward": (PORT_BASE + 10, PORT_BASE + 11),
    "haproxy": (PORT_BASE + 20, PORT_BASE + 21),
    "nginx": (PORT_BASE + 30, PORT_BASE + 31),
    "stunnel": (PORT_BASE + 40, PORT_BASE + 41),
}
WARD_ADMIN = (PORT_BASE + 12, PORT_BASE + 13)
# [limits] of the `ward` setup, `key=value` separated by `;` (say
# "max_tunnel_buffer_bytes=419430400").
WARD_LIMITS = ENV.get("WARD_LIMITS", "")
# More ward setups in the same run, each a pair of its own, space-separated `name=binary` or
# `name=binary;limit=value;...`: setup `ward-<name>` (a build from before a change, another
# crypto provider, other limits), measured beside `ward` round after round.
WARD_ALT = {}
ALT_SPECS = ENV.get("WARD_ALT", "").split()
if len(ALT_SPECS) > 4:  # ports PORT_BASE+50..+89; +100 on are the HTTP harness's
    sys.exit("perf/harness.py: WARD_ALT takes at most 4 setups")
for i, spec in enumerate(ALT_SPECS):
    name, _, rest = spec.partition("=")
    binary, *limits = rest.split(";")
    if not name or not binary:
        sys.exit(f"perf/harness.py: WARD_ALT entry {spec!r} is not name=BINARY[;key=value...]")
    base = PORT_BASE + 50 + 10 * i
    WARD_ALT[f"ward-{name}"] = {"bin": binary, "limits": ";".join(limits),
                                "ports": (base, base + 1), "admin": (base + 2, base + 3)}
    PORTS[f"ward-{name}"] = (base, base + 1)
    if f"ward-{name}" not in SETUPS:
        SETUPS.insert(SETUPS.index("ward") + 1 + i if "ward" in SETUPS else 0, f"ward-{name}")
IPERF_ARGS = ENV.get("IPERF_ARGS", "").split()
ALL_WORKLOADS = ("keepalive", "seq", "newconn", "hold", "iperf")
# A subset for a quick look at one column: `WORKLOADS=iperf`.
WORKLOADS = set(ENV.get("WORKLOADS", ",".join(ALL_WORKLOADS)).split(","))
if not WORKLOADS <= set(ALL_WORKLOADS):
    sys.exit(f"perf/harness.py: WORKLOADS {sorted(WORKLOADS - set(ALL_WORKLOADS))} unknown; "
             f"known: {','.join(ALL_WORKLOADS)}")

started = []  # Popen objects we own


def log(msg):
    print(f"[perf {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def record_pids():
    with open(PIDFILE, "w") as f:
        for p in started:
            if p.poll() is None:
                f.write(f"{p.pid}\n")


def spawn(name, argv, **kw):
    logf = open(os.path.join(WORK, f"{name}.log"), "ab")
    p = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         cwd=WORK, **kw)
    p.name = name
    started.append(p)
    record_pids()
    return p


def stop(p, grace=3.0):
    """Stops one process we started, by its PID: SIGTERM, then SIGKILL after `grace` s."""
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    if p in started:
        started.remove(p)
    record_pids()


def stop_all():
    for p in list(reversed(started)):
        stop(p)


# ---------------------------------------------------------------- /proc

def children(pid):
    """Direct children of `pid` (nginx workers)."""
    out = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            out = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree(procs):
    pids = []
    for p in procs:
        pids.append(p.pid)
        pids.extend(children(p.pid))
    return pids


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_s(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK


# ---------------------------------------------------------------- configs

def ward_setup(name):
    """(binary, [limits] lines, (outbound, inbound) ports, admin ports) of a ward setup."""
    if name in WARD_ALT:
        a = WARD_ALT[name]
        return a["bin"], a["limits"], a["ports"], a["admin"]
    return WARD_BIN, WARD_LIMITS, PORTS["ward"], WARD_ADMIN


def ward_configs(default, name="ward"):
    _, limits, (out_p, in_p), admin = ward_setup(name)
    limits = "".join(f"{k.strip()} = {v.strip()}\n"
                     for k, _, v in (x.partition("=") for x in limits.split(";")) if k.strip())
    limits = f"\n[limits]\n{limits}" if limits else ""
    tls = (f'[tls]\ncert_file = "{PKI}/{{svc}}.chain.pem"\nkey_file = "{PKI}/{{svc}}.key.pem"\n'
           f'ca_file = "{PKI}/root.pem"\n')
    outbound = (f'[service]\nname = "order"\n\n[[upstreams]]\nservice = "inventory"\n'
                f'listen = "127.0.0.1:{out_p}"\nprotocol = "tcp"\nendpoints = ["127.0.0.1:{in_p}"]\n\n'
                + tls.format(svc="order") + f'\n[admin]\nlisten = "127.0.0.1:{admin[0]}"\n' + limits)
    inbound = (f'[service]\nname = "inventory"\n\n[inbound]\nlisten = "127.0.0.1:{in_p}"\n'
               f'local_app = "127.0.0.1:{BACKEND}"\nprotocol = "tcp"\n\n'
               + tls.format(svc="inventory")
               + '\n[intentions]\ndefault = "deny"\nrules = [{ source = "order", action = "allow" }]\n'
               + f'\n[admin]\nlisten = "127.0.0.1:{admin[1]}"\n' + limits)
    return outbound, inbound


def haproxy_configs(default):
    out_p, in_p = PORTS["haproxy"]
    glob = "global\n  maxconn 8000\n" + ("" if default else "  nbthread 1\n")
    defaults = ("defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n"
                "  timeout server 1h\n")
    reuse = "" if default else " no-ssl-reuse"
    tickets = "" if default else " no-tls-tickets"
    outbound = (glob + defaults + f"frontend out\n  bind 127.0.0.1:{out_p}\n  default_backend mesh\n"
                f"backend mesh\n  server inv 127.0.0.1:{in_p} ssl verify required "
                f"ca-file {PKI}/root.pem crt {PKI}/order.bundle.pem ssl-min-ver TLSv1.3{reuse}\n")
    inbound = (glob + defaults + f"frontend in\n  bind 127.0.0.1:{in_p} ssl crt "
               f"{PKI}/inventory.bundle.pem ca-file {PKI}/root.pem verify required "
               f"ssl-min-ver TLSv1.3{tickets}\n  default_backend app\n"
               f"backend app\n  server app 127.0.0.1:{BACKEND}\n")
    return outbound, inbound


def nginx_head(name, default):
    workers = "auto" if default else "1"
    return (f"load_module {NGINX_MODULE};\nworker_processes {workers};\ndaemon off;\n"
            f"pid {WORK}/{name}.pid;\nerror_log {WORK}/{name}.err warn;\n"
            "worker_rlimit_nofile 16384;\nevents { worker_connections 8192; }\n")


def nginx_configs(default):
    out_p, in_p = PORTS["nginx"]
    reuse = "" if default else "    proxy_ssl_session_reuse off;\n"
    tickets = "" if default else "    ssl_session_tickets off;\n    ssl_session_cache off;\n"
    outbound = nginx_head("nginx-out", default) + (
        "stream {\n  server {\n"
        f"    listen 127.0.0.1:{out_p};\n    proxy_pass 127.0.0.1:{in_p};\n"
        "    proxy_ssl on;\n    proxy_ssl_protocols TLSv1.3;\n"
        f"    proxy_ssl_certificate {PKI}/order.chain.pem;\n"
        f"    proxy_ssl_certificate_key {PKI}/order.key.pem;\n"
        f"    proxy_ssl_trusted_certificate {PKI}/root.pem;\n"
        "    proxy_ssl_verify on;\n    proxy_ssl_verify_depth 3;\n"
        "    proxy_ssl_name inventory.ward.local;\n" + reuse + "  }\n}\n")
    inbound = nginx_head("nginx-in", default) + (
        "stream {\n  server {\n"
        f"    listen 127.0.0.1:{in_p} ssl;\n    ssl_protocols TLSv1.3;\n"
        f"    ssl_certificate {PKI}/inventory.chain.pem;\n"
        f"    ssl_certificate_key {PKI}/inventory.key.pem;\n"
        f"    ssl_client_certificate {PKI}/root.pem;\n"
        "    ssl_verify_client on;\n    ssl_verify_depth 3;\n" + tickets
        + f"    proxy_pass 127.0.0.1:{BACKEND};\n  }}\n}}\n")
    return outbound, inbound


def stunnel_configs(default):
    out_p, in_p = PORTS["stunnel"]
    head = "foreground = yes\npid =\nsyslog = no\ndebug = warning\n"
    extra = "" if default else "sessionCacheSize = 1\noptions = NO_TICKET\n"
    outbound = head + (
        f"[out]\nclient = yes\naccept = 127.0.0.1:{out_p}\nconnect = 127.0.0.1:{in_p}\n"
        f"cert = {PKI}/order.chain.pem\nkey = {PKI}/order.key.pem\nCAfile = {PKI}/root.pem\n"
        "verifyChain = yes\nsslVersionMin = TLSv1.3\n" + ("" if default else "sessionResume = no\n")
        + extra)
    inbound = head + (
        f"[in]\naccept = 127.0.0.1:{in_p}\nconnect = 127.0.0.1:{BACKEND}\n"
        f"cert = {PKI}/inventory.chain.pem\nkey = {PKI}/inventory.key.pem\nCAfile = {PKI}/root.pem\n"
        "verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\n" + extra)
    return outbound, inbound


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def start_setup(name, default):
    """Starts the two hops of `name`; returns the list of Popen (outbound, inbound)."""
    tag = "default" if default else "pinned"
    if name == "ward" or name in WARD_ALT:
        o, i = ward_configs(default, name)
        binary = ward_setup(name)[0]
        procs = []
        for hop, text in (("out", o), ("in", i)):
            cfg = write(f"{name}-{hop}.toml", text)
            argv = [binary, "proxy", "--config", cfg] + ([] if default else ["--workers", "1"])
            procs.append(spawn(f"{name}-{hop}-{tag}", argv, env=dict(ENV, WARD_LOG="warn")))
        return procs
    if name == "haproxy":
        o, i = haproxy_configs(default)
        return [spawn(f"haproxy-{hop}-{tag}", ["haproxy", "-db", "-f", write(f"haproxy-{hop}.cfg", t)])
                for hop, t in (("out", o), ("in", i))]
    if name == "nginx":
        o, i = nginx_configs(default)
        return [spawn(f"nginx-{hop}-{tag}", ["nginx", "-p", WORK, "-e", f"{WORK}/nginx-{hop}.err",
                                             "-c", write(f"nginx-{hop}.conf", t)])
                for hop, t in (("out", o), ("in", i))]
    if name == "stunnel":
        o, i = stunnel_configs(default)
        return [spawn(f"stunnel-{hop}-{tag}", ["stunnel", write(f"stunnel-{hop}.conf", t)])
                for hop, t in (("out", o), ("in", i))]
    return []


def entry(name):
    return BACKEND if name == "direct" else PORTS[name][0]


def http_get(port, timeout=2.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: perf\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data.startswith(b"HTTP/1.1 200")


def wait_ready(name, procs, tries=100):
    for _ in range(tries):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.returncode}; see {WORK}/{p.name}.log")
        try:
            if http_get(entry(name)):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name}: no HTTP answer through the path on port {entry(name)}")


def start_backend_http():
    conf = ("worker_processes 1;\ndaemon off;\n"
            f"pid {WORK}/backend.pid;\nerror_log {WORK}/backend.err warn;\n"
            "worker_rlimit_nofile 16384;\nevents { worker_connections 8192; }\n"
            "http {\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n"
            f"  server {{\n    listen 127.0.0.1:{BACKEND} backlog=4096;\n"
            "    location / { default_type text/plain; return 200 \"hello from the backend\\n\"; }\n"
            "  }\n}\n")
    p = spawn("backend-nginx", ["nginx", "-p", WORK, "-e", f"{WORK}/backend.err",
                                "-c", write("backend.conf", conf)])
    for _ in range(100):
        try:
            if http_get(BACKEND):
                return p
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("backend nginx did not answer")


def start_backend_iperf():
    p = spawn("backend-iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(BACKEND)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", BACKEND), timeout=1).close()
            time.sleep(0.2)
            return p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("iperf3 server did not listen")


# ---------------------------------------------------------------- workloads

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def parse_latency(s):
    m = re.match(r"([\d.]+)(us|ms|s)$", s)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def wrk(port, conns, extra=()):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{DURATION}s", "--timeout", "5s", "--latency", *extra,
            f"http://127.0.0.1:{port}/"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 30)
    out = r.stdout
    res = {"rps": None, "p50_ms": None, "p99_ms": None, "errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[key] = parse_latency(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    if res["rps"] is None:
        log(f"wrk output unparsed: {out[-400:]} {r.stderr[-400:]}")
    return res


def iperf(port):
    r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(DURATION), "-J",
                        *IPERF_ARGS],
                       capture_output=True, text=True, timeout=DURATION + 30)
    try:
        j = json.loads(r.stdout)
        return {"gbps": j["end"]["sum_received"]["bits_per_second"] / 1e9}
    except (ValueError, KeyError) as e:
        log(f"iperf3 failed on port {port}: {e} {r.stdout[-300:]}")
        return {"gbps": None}


async def hold(port, n, pids):
    """Opens `n` connections through the path, one request each (so both hops and the backend
    hold the connection), measures RSS while all are idle, then closes them."""
    sem = asyncio.Semaphore(50)
    conns = []

    async def one():
        async with sem:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(b"GET / HTTP/1.1\r\nHost: perf\r\n\r\n")
            await w.drain()
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            m = re.search(rb"Content-Length: (\d+)", head, re.I)
            if m:
                await asyncio.wait_for(r.readexactly(int(m.group(1))), 10)
            conns.append(w)

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    failed = sum(1 for x in results if isinstance(x, BaseException))
    await asyncio.sleep(1.0)
    rss = rss_kib(pids)
    for w in conns:
        w.close()
    await asyncio.sleep(0.5)
    return {"rss_hold_mib": rss / 1024 if pids else None, "held": len(conns), "hold_failed": failed}


def per_unit(cpu, rate):
    """µs of proxy CPU per request (or connection) over a DURATION-long run at `rate`/s."""
    if cpu is None or not rate:
        return None
    return cpu / (rate * DURATION) * 1e6


def measured(procs, fn):
    pids = tree(procs)
    before = cpu_s(pids)
    res = fn()
    res["cpu_s"] = cpu_s(pids) - before if procs else None
    return res


# ---------------------------------------------------------------- driver

def run_suite(default, rounds, workloads):
    """Returns {setup: {metric: [values per round]}}."""
    tag = "defaults" if default else "pinned"
    data = {s: {} for s in SETUPS}

    def put(setup, key, val):
        data[setup].setdefault(key, []).append(val)

    backend = start_backend_http()
    procs = {}
    for s in SETUPS:
        procs[s] = start_setup(s, default)
    for s in SETUPS:
        wait_ready(s, procs[s])
    time.sleep(1.0)
    for s in SETUPS:
        put(s, "rss_idle_mib", rss_kib(tree(procs[s])) / 1024 if procs[s] else None)
    log(f"{tag}: all setups up; idle RSS measured")

    for r in range(rounds):
        for s in SETUPS:
            port = entry(s)
            if "keepalive" in workloads:
                res = measured(procs[s], lambda: wrk(port, KA_CONNS))
                put(s, "ka_rps", res["rps"])
                put(s, "ka_p99_ms", res["p99_ms"])
                put(s, "ka_cpu_s", res["cpu_s"])
                put(s, "ka_cpu_us_req", per_unit(res["cpu_s"], res["rps"]))
                put(s, "ka_errors", res["errors"] + res["non2xx"])
            if "seq" in workloads:
                res = measured(procs[s], lambda: wrk(port, 1))
                put(s, "seq_p50_us", res["p50_ms"] * 1000 if res["p50_ms"] else None)
                put(s, "seq_p99_us", res["p99_ms"] * 1000 if res["p99_ms"] else None)
                put(s, "seq_cpu_s", res["cpu_s"])
            if "newconn" in workloads:
                res = measured(procs[s], lambda: wrk(port, NEWCONN_CONNS,
                                                     ("-H", "Connection: close")))
                put(s, "new_cps", res["rps"])
                put(s, "new_cpu_s", res["cpu_s"])
                put(s, "new_cpu_us_conn", per_unit(res["cpu_s"], res["rps"]))
                put(s, "new_errors", res["errors"] + res["non2xx"])
            if "hold" in workloads:
                res = asyncio.run(hold(port, HOLD_CONNS, tree(procs[s])))
                put(s, "rss_hold_mib", res["rss_hold_mib"])
                put(s, "hold_failed", res["hold_failed"])
            log(f"{tag} round {r + 1}/{rounds} {s}: "
                + ", ".join(f"{k}={v[-1]:.4g}" for k, v in data[s].items()
                            if v and isinstance(v[-1], (int, float))))

    if "iperf" in workloads:
        stop(backend)
        backend = start_backend_iperf()
        for r in range(rounds):
            for s in SETUPS:
                res = measured(procs[s], lambda: iperf(entry(s)))
                put(s, "iperf_gbps", res["gbps"])
                put(s, "iperf_cpu_s", res["cpu_s"])
                log(f"{tag} iperf round {r + 1}/{rounds} {s}: {res}")
                time.sleep(0.3)

    for s in SETUPS:
        for p in procs[s]:
            if p.poll() is not None:
                log(f"WARNING: {p.name} exited during the run ({p.returncode})")
            stop(p)
    stop(backend)
    return data


def median(vals):
    v = [x for x in vals if x is not None]
    return statistics.median(v) if v else None


# column: (title, key, higher is better, format)
COLUMNS = [
    ("keep-alive req/s", "ka_rps", True, "{:,.0f}"),
    ("keep-alive p99 ms", "ka_p99_ms", False, "{:.2f}"),
    ("1-conn p50 µs", "seq_p50_us", False, "{:.0f}"),
    ("1-conn p99 µs", "seq_p99_us", False, "{:.0f}"),
    ("added p50 µs", "added_p50_us", False, "{:.0f}"),
    ("new conn/s", "new_cps", True, "{:,.0f}"),
    ("iperf3 Gbit/s", "iperf_gbps", True, "{:.2f}"),
    ("RSS idle MiB", "rss_idle_mib", False, "{:.1f}"),
    ("RSS 1000 conns MiB", "rss_hold_mib", False, "{:.1f}"),
    ("CPU s keep-alive", "ka_cpu_s", False, "{:.2f}"),
    ("CPU µs/req keep-alive", "ka_cpu_us_req", False, "{:.1f}"),
    ("CPU s 1-conn", "seq_cpu_s", False, "{:.2f}"),
    ("CPU s new-conn", "new_cpu_s", False, "{:.2f}"),
    ("CPU µs/conn new-conn", "new_cpu_us_conn", False, "{:.0f}"),
    ("CPU s iperf3", "iperf_cpu_s", False, "{:.2f}"),
]


def medians(data):
    med = {s: {k: median(v) for k, v in d.items()} for s, d in data.items()}
    direct = med.get("direct", {}).get("seq_p50_us")
    for s, m in med.items():
        if s != "direct" and direct is not None and m.get("seq_p50_us") is not None:
            m["added_p50_us"] = m["seq_p50_us"] - direct
    return med


def best_peer(med, key, higher):
    vals = [(med[p][key], p) for p in PEERS if p in med and med[p].get(key) is not None]
    if not vals:
        return None, None
    return max(vals) if higher else min(vals)


def table(med, cols):
    present = [c for c in cols if any(med[s].get(c[1]) is not None for s in med)]
    lines = ["| setup | " + " | ".join(c[0] for c in present) + " |",
             "|---|" + "---:|" * len(present)]
    for s in SETUPS:
        cells = []
        for _, key, _, fmt in present:
            v = med[s].get(key)
            cells.append(fmt.format(v) if v is not None else "—")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    for s in [s for s in SETUPS if s == "ward" or s in WARD_ALT]:
        cells = []
        for _, key, higher, _ in present:
            b, who = best_peer(med, key, higher)
            w = med[s].get(key)
            if b is None or w is None or b == 0:
                cells.append("—")
            else:
                cells.append(f"{w / b:.2f}x ({who})")
        lines.append(f"| **{s} / best peer** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def near(r, goal):
    """`r` with 2 decimals, or 3 when 2 would round it onto the goal (1.497 is not 1.50)."""
    two = f"{r:.2f}"
    return f"{r:.3f}" if float(two) == goal and r != goal else two


def targets(med):
    rows = []

    def ratio(key, higher):
        b, who = best_peer(med, key, higher)
        w = med.get("ward", {}).get(key)
        if b in (None, 0) or w is None:
            return None, who
        return w / b, who

    for title, key, goal in (("keep-alive req/s ≥ 1.5x best peer", "ka_rps", 1.5),
                             ("new connections/s ≥ 4x best peer", "new_cps", 4.0),
                             ("bulk Gbit/s ≥ 1.5x best peer", "iperf_gbps", 1.5)):
        r, who = ratio(key, True)
        rows.append((title, "—" if r is None else f"{near(r, goal)}x ({who})",
                     "—" if r is None else ("met" if r >= goal else "**not met**")))
    r, who = ratio("added_p50_us", False)
    rows.append(("added p50 ≤ 0.6x best peer's", "—" if r is None else
                 f"{near(r, 0.6)}x ({med['ward']['added_p50_us']:.0f} µs vs {who} "
                 f"{med[who]['added_p50_us']:.0f} µs)",
                 "—" if r is None else ("met" if r <= 0.6 else "**not met**")))
    w = med.get("ward", {}).get("rss_idle_mib")
    rows.append(("idle RSS of both ward processes ≤ 12 MiB", "—" if w is None else f"{w:.1f} MiB",
                 "—" if w is None else ("met" if w <= 12 else "**not met**")))
    r, who = ratio("rss_hold_mib", False)
    rows.append(("RSS with 1000 held connections ≤ 0.25x best peer's",
                 "—" if r is None else f"{near(r, 0.25)}x ({who})",
                 "—" if r is None else ("met" if r <= 0.25 else "**not met**")))
    lines = ["| target | ward, this run | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def version(argv, pattern=r"\d+\.\d+"):
    """The first output line of `argv` that matches `pattern`."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        for line in (r.stdout + r.stderr).splitlines():
            if re.search(pattern, line):
                return line.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "?"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main():
    t0 = time.time()
    raw = {"pinned": run_suite(False, ROUNDS, WORKLOADS & set(ALL_WORKLOADS))}
    if DEFAULTS:
        raw["defaults"] = run_suite(True, DEFAULT_ROUNDS, {"keepalive", "seq", "newconn"})
    raw["meta"] = {
        "elapsed_s": time.time() - t0,
        # From the start of perf/run.sh: tools, build, PKI and measurement.
        "run_s": time.time() - float(ENV["RUN_STARTED"]) if ENV.get("RUN_STARTED") else None,
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "settings": {"ROUNDS": ROUNDS, "DURATION": DURATION, "KA_CONNS": KA_CONNS,
                     "NEWCONN_CONNS": NEWCONN_CONNS, "HOLD_CONNS": HOLD_CONNS,
                     "DEFAULT_ROUNDS": DEFAULT_ROUNDS},
        "machine": f"{os.cpu_count()} cores, {cpu_model()}, Linux {platform.release()}",
        "versions": {
            "ward": version([WARD_BIN, "--version"]),
            "haproxy": version(["haproxy", "-v"]),
            "nginx": version(["nginx", "-v"]),
            "stunnel": version(["stunnel", "-version"], r"^stunnel \d"),
            "openssl": version(["openssl", "version"]),
            "wrk": version(["wrk", "-v"]),
            "iperf3": version(["iperf3", "--version"]),
            **{s: version([a["bin"], "--version"]) for s, a in WARD_ALT.items()},
        },
        "ward_limits": {"ward": WARD_LIMITS, **{s: a["limits"] for s, a in WARD_ALT.items()}},
        # The rows to lay out again when `--render` rewrites RESULTS.md from this file.
        "setups": SETUPS,
        "ward_alt": WARD_ALT,
        "iperf_args": IPERF_ARGS,
        "link_order": link_order_coverage(),
    }
    with open(RAW, "w") as f:
        json.dump(raw, f, indent=1)
    render(raw)


def link_order_coverage():
    """How much of perf/ward.order the ward binary has (a list made for other code or other
    dependency versions places fewer functions; see perf/README.md)."""
    order = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ward.order")
    try:
        with open(order) as f:
            listed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
        out = subprocess.run(["nm", WARD_BIN], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    have = {line.split()[-1] for line in out.splitlines() if line.strip()}
    return {"listed": len(listed), "present": len(listed & have)}


def limits_note(meta, setup):
    limits = meta.get("ward_limits", {}).get(setup)
    return f"; `[limits]` {limits}" if limits else ""


def render(raw):
    """Writes OUT (RESULTS.md) from the raw figures; `harness.py --render RAW` redoes it."""
    meta = raw["meta"]
    # The run's own setups (a raw file from before they were recorded: the environment's).
    global SETUPS, WARD_ALT
    SETUPS = meta.get("setups", SETUPS)
    WARD_ALT = meta.get("ward_alt", WARD_ALT)
    st = meta["settings"]
    rounds, duration, dround = st["ROUNDS"], st["DURATION"], st["DEFAULT_ROUNDS"]
    versions = meta["versions"]
    elapsed = meta["elapsed_s"]
    med = medians(raw["pinned"])
    fails = []
    for s, d in raw["pinned"].items():
        for k in ("ka_errors", "new_errors", "hold_failed"):
            if any(v for v in d.get(k, []) if v):
                fails.append(f"{s}: {k} = {d[k]}")
    md = []
    md.append("# ward perf results\n")
    md.append(f"Run: {meta['date']}, "
              f"{elapsed / 60:.1f} min of measurement, `bash perf/run.sh` with ROUNDS={rounds} "
              f"DURATION={duration}s KA_CONNS={st['KA_CONNS']} "
              f"NEWCONN_CONNS={st['NEWCONN_CONNS']} HOLD_CONNS={st['HOLD_CONNS']}"
              + (f"; the whole `perf/run.sh` (tools, release build unless WARD_BIN and PKI_BIN named binaries, PKI, measurement) took "
                 f"{meta['run_s'] / 60:.1f} min" if meta.get("run_s") else "") + ".\n")
    md.append(f"Machine: {meta['machine']}. "
              "**Shared machine**: other workloads share its host, so absolute figures vary "
              "between runs (by up to 3x); compare ratios within one run only.\n")
    md.append("Path: load generator -> outbound hop (plain, 127.0.0.1) -> mutual TLS 1.3, "
              "ECDSA P-256 leaves from root -> intermediate, client certificate required and "
              "verified -> inbound hop -> backend (nginx, 1 worker, a 23-byte response; "
              "iperf3 -s for the bulk column). Everything on loopback; the load generator, "
              "both hops and the backend share the 2 cores.\n")
    md.append("## Versions and settings (pinned table)\n")
    md.append("| setup | version | per hop |\n|---|---|---|")
    md.append(f"| ward | {versions['ward']} | `ward proxy --workers 1` (one thread: tokio current-thread runtime); "
              "ward's own TLS settings" + limits_note(meta, "ward") + " |")
    for s in sorted(k for k in versions if k.startswith("ward-")):
        md.append(f"| {s} | {versions[s]} | as ward" + limits_note(meta, s) + " |")
    peers = set(raw["pinned"])
    if "haproxy" in peers:
        md.append(f"| haproxy | {versions['haproxy']} | `nbthread 1`, mode tcp; `no-ssl-reuse` on "
                  "the server line, `no-tls-tickets` on the bind |")
    if "nginx" in peers:
        md.append(f"| nginx | {versions['nginx']} | `worker_processes 1` (+ master), stream "
                  "module; `proxy_ssl_session_reuse off`, `ssl_session_tickets off`, "
                  "`ssl_session_cache off` |")
    if "stunnel" in peers:
        md.append(f"| stunnel | {versions['stunnel']} | one process per hop (stunnel has no "
                  "worker setting: a thread per connection); `sessionResume = no`, `NO_TICKET` |")
    md.append(f"| direct | backend alone | — |\n")
    lo = meta.get("link_order")
    if lo:
        md.append(f"ward's binary has {lo['present']} of the {lo['listed']} functions of its link "
                  "order (`perf/ward.order`, see perf/README.md).\n")
    md.append(f"TLS library of the peers: {versions['openssl']}; load: {versions['wrk']}, "
              f"{versions['iperf3']}"
              + (f" (`{' '.join(meta['iperf_args'])}`)" if meta.get("iperf_args") else "")
              + ". Resumption is off for every peer in this table so that "
              "every peer connection pays a full mutual handshake.\n")
    md.append(f"## Medians of {rounds} round{'s' if rounds != 1 else ''}, one worker per hop\n")
    speed = ("ka_rps", "ka_p99_ms", "seq_p50_us", "seq_p99_us", "added_p50_us", "new_cps",
             "iperf_gbps")
    md.append(table(med, [c for c in COLUMNS if c[1] in speed]) + "\n")
    md.append(table(med, [c for c in COLUMNS if c[1] not in speed]) + "\n")
    md.append("Columns: keep-alive = wrk, 1 thread, "
              f"{st['KA_CONNS']} connections; 1-conn = wrk -c1 sequential requests; added p50 = "
              "setup's 1-conn p50 minus direct's; new conn/s = wrk with `Connection: close`, "
              f"{st['NEWCONN_CONNS']} connections (every request a new TCP connection and a new "
              "mutual TLS handshake between the hops); iperf3 = one stream, "
              f"{duration} s; RSS = VmRSS summed over both hops' processes (nginx: master + "
              f"worker), idle after start, and with {st['HOLD_CONNS']} idle connections held through "
              "the path; CPU s = utime + stime of both hops during that workload (CPU µs/req and "
              "µs/conn divide it by the requests or connections served). Ratio row: "
              "ward divided by the best of haproxy, nginx, stunnel in that column (best = highest "
              "for rates, lowest for latency, memory and CPU).\n")
    if fails:
        md.append("Errors seen (wrk socket errors / non-2xx, failed held connections): "
                  + "; ".join(fails) + "\n")
    md.append("## Targets (issue 7)\n")
    md.append(targets(med) + "\n")
    if "defaults" in raw:
        dmed = medians(raw["defaults"])
        md.append(f"## Everyone's defaults ({dround} round{'s' if dround != 1 else ''})\n")
        md.append("ward without `--workers` (one worker thread per core); haproxy without "
                  "`nbthread` (one thread per core) and with its default TLS session reuse; "
                  "nginx `worker_processes auto` (Debian's shipped setting) with its default "
                  "`proxy_ssl_session_reuse on`; stunnel with its default session cache and "
                  "tickets.\n")
        md.append(table(dmed, [c for c in COLUMNS if c[1] in
                               ("ka_rps", "ka_p99_ms", "seq_p50_us", "seq_p99_us",
                                "added_p50_us", "new_cps", "rss_idle_mib", "ka_cpu_s",
                                "ka_cpu_us_req", "new_cpu_s", "new_cpu_us_conn")]) + "\n")
    md.append(f"Raw per-round figures of this run: `{RAW}` (not kept in the repo).\n")
    if meta.get("note"):
        md.append(meta["note"] + "\n")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile-notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            md.append(f.read())
    md.append(http_section())
    with open(OUT, "w") as f:
        f.write("\n".join(md).rstrip("\n") + "\n")
    log(f"wrote {OUT}; measurement took {elapsed / 60:.1f} min"
        + (f", the whole run {meta['run_s'] / 60:.1f} min" if meta.get("run_s") else ""))


def http_section():
    """The HTTP mode's section of OUT (http_harness.py writes it), kept as it is."""
    try:
        with open(OUT) as f:
            text = f.read()
    except OSError:
        return ""
    begin, end = "<!-- http begin -->", "<!-- http end -->"
    if begin not in text or end not in text:
        return ""
    return text[text.index(begin):text.index(end) + len(end)] + "\n"


if __name__ == "__main__":
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        with open(sys.argv[2]) as f:
            render(json.load(f))
        sys.exit(0)
    try:
        main()
    finally:
        stop_all()
