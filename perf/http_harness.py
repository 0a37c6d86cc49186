#!/usr/bin/env python3
"""ward's HTTP load harness: `MODE=http bash perf/run.sh` (which installs the tools, builds ward
and writes the PKI). Standard library only; shares process handling with harness.py.

The same two-hop sidecar path as harness.py, speaking HTTP at both hops:

    load generator -> outbound hop (plain HTTP) -> mutual TLS 1.3 -> inbound hop -> backend

for ward (`protocol = "http"` on the upstream and the inbound), haproxy (mode http, ssl both
sides, HTTP/2 between the hops), nginx (http proxy, upstream over mutual TLS with keepalive;
nginx speaks only HTTP/1.1 to an upstream) and `direct` (the backend alone). One worker per hop.

Workloads, setups interleaved round after round:
- h1: wrk, HTTP/1.1 keep-alive, KA_CONNS connections (req/s, p99, CPU per request);
- seq: wrk -c1, sequential requests on one connection (p50; added p50 = minus direct's);
- h2: h2load, HTTP/2 with prior knowledge, H2_CONNS connections x H2_STREAMS streams;
- grpc: h2load sending gRPC unary calls (a 5-byte message, `content-type: application/grpc`,
  `te: trailers`) to a gRPC backend (ward-perf-grpc-backend) through a path of its own (the
  `catalog` service), H2_CONNS connections x H2_STREAMS streams;
- handshakes (ward only): 1000 sequential requests on one client connection, first thing after
  the readiness check, and the TLS handshakes the outbound hop made since it started
  (`ward_tls_handshakes_total`).

Writes its section of RESULTS.md between the `http` markers (harness.py keeps it when it
rewrites the file). Every process it starts is stopped by PID; all traffic goes to 127.0.0.1.
"""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import harness as h

ENV = os.environ
ROUNDS = int(ENV.get("ROUNDS", "3"))
DURATION = int(ENV.get("DURATION", "6"))
KA_CONNS = int(ENV.get("KA_CONNS", "50"))
H2_CONNS = int(ENV.get("H2_CONNS", "10"))
H2_STREAMS = int(ENV.get("H2_STREAMS", "10"))
SEQ_REQUESTS = 1000
SETUPS = ENV.get("HTTP_SETUPS", "ward,haproxy,nginx,direct").split(",")
PEERS = ["haproxy", "nginx"]
BASE = int(ENV.get("PORT_BASE", "24100")) + 100
BACKEND = BASE  # HTTP/1.1; BACKEND + 1 serves h2c for `direct` under h2load
GRPC_BACKEND = BASE + 2
GRPC_BIN = ENV.get("GRPC_BIN", "ward-perf-grpc-backend")
PORTS = {  # (outbound hop, outbound hop's h2c port, inbound hop)
    "ward": (BASE + 10, BASE + 10, BASE + 11),
    "haproxy": (BASE + 20, BASE + 21, BASE + 22),
    "nginx": (BASE + 30, BASE + 31, BASE + 32),
    "direct": (BACKEND, BACKEND + 1, None),
}
GRPC_PORTS = {  # (outbound hop, inbound hop) of the gRPC path
    "ward": (BASE + 14, BASE + 15),
    "haproxy": (BASE + 24, BASE + 25),
    "nginx": (BASE + 34, BASE + 35),
    "direct": (GRPC_BACKEND, None),
}
WARD_ADMIN = (BASE + 12, BASE + 13, BASE + 16)
PKI = h.PKI
WORK = h.WORK
BEGIN, END = "<!-- http begin -->", "<!-- http end -->"


# ---------------------------------------------------------------- configs

def ward_configs():
    out_p, _, in_p = PORTS["ward"]
    tls = (f'[tls]\ncert_file = "{PKI}/{{svc}}.chain.pem"\nkey_file = "{PKI}/{{svc}}.key.pem"\n'
           f'ca_file = "{PKI}/root.pem"\n')
    g_out, g_in = GRPC_PORTS["ward"]
    outbound = (f'[service]\nname = "order"\n\n[[upstreams]]\nservice = "inventory"\n'
                f'listen = "127.0.0.1:{out_p}"\nprotocol = "http"\n'
                f'endpoints = ["127.0.0.1:{in_p}"]\n\n'
                f'[[upstreams]]\nservice = "catalog"\nlisten = "127.0.0.1:{g_out}"\n'
                f'protocol = "http"\nendpoints = ["127.0.0.1:{g_in}"]\n\n'
                + tls.format(svc="order") + f'\n[admin]\nlisten = "127.0.0.1:{WARD_ADMIN[0]}"\n')
    inbound = (f'[service]\nname = "inventory"\n\n[inbound]\nlisten = "127.0.0.1:{in_p}"\n'
               f'local_app = "127.0.0.1:{BACKEND}"\nprotocol = "http"\n\n'
               + tls.format(svc="inventory")
               + '\n[intentions]\ndefault = "deny"\nrules = [{ source = "order", action = "allow" }]\n'
               + f'\n[admin]\nlisten = "127.0.0.1:{WARD_ADMIN[1]}"\n')
    # The gRPC path's inbound hop: the `catalog` service in front of the gRPC backend.
    grpc_in = (f'[service]\nname = "catalog"\n\n[inbound]\nlisten = "127.0.0.1:{g_in}"\n'
               f'local_app = "127.0.0.1:{GRPC_BACKEND}"\nprotocol = "http"\n\n'
               + tls.format(svc="catalog")
               + '\n[intentions]\ndefault = "deny"\nrules = [{ source = "order", action = "allow" }]\n'
               + f'\n[admin]\nlisten = "127.0.0.1:{WARD_ADMIN[2]}"\n')
    return outbound, inbound, grpc_in


def haproxy_configs():
    out_p, out_h2, in_p = PORTS["haproxy"]
    head = ("global\n  maxconn 8000\n  nbthread 1\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n"
            "  timeout server 1h\n  http-reuse always\n")
    g_out, g_in = GRPC_PORTS["haproxy"]
    outbound = head + (
        f"frontend out\n  bind 127.0.0.1:{out_p}\n  bind 127.0.0.1:{out_h2} proto h2\n"
        "  default_backend mesh\n"
        f"backend mesh\n  server inv 127.0.0.1:{in_p} ssl verify required "
        f"ca-file {PKI}/root.pem crt {PKI}/order.bundle.pem ssl-min-ver TLSv1.3 alpn h2\n"
        f"frontend grpcout\n  bind 127.0.0.1:{g_out} proto h2\n  default_backend grpcmesh\n"
        f"backend grpcmesh\n  server cat 127.0.0.1:{g_in} ssl verify required "
        f"ca-file {PKI}/root.pem crt {PKI}/order.bundle.pem ssl-min-ver TLSv1.3 alpn h2\n")
    # The caller's certificate hash for the app, as ward's x-forwarded-client-cert carries it.
    inbound = head + (
        f"frontend in\n  bind 127.0.0.1:{in_p} ssl crt {PKI}/inventory.bundle.pem "
        f"ca-file {PKI}/root.pem verify required ssl-min-ver TLSv1.3 alpn h2,http/1.1\n"
        "  http-request set-header x-forwarded-client-cert Hash=%[ssl_c_der,digest(sha256),hex]\n"
        "  default_backend app\n"
        f"backend app\n  server app 127.0.0.1:{BACKEND}\n"
        f"frontend grpcin\n  bind 127.0.0.1:{g_in} ssl crt {PKI}/catalog.bundle.pem "
        f"ca-file {PKI}/root.pem verify required ssl-min-ver TLSv1.3 alpn h2\n"
        "  default_backend grpcapp\n"
        f"backend grpcapp\n  server app 127.0.0.1:{GRPC_BACKEND} proto h2\n")
    return outbound, inbound


def nginx_head(name):
    return (f"worker_processes 1;\ndaemon off;\npid {WORK}/{name}.pid;\n"
            f"error_log {WORK}/{name}.err warn;\nworker_rlimit_nofile 16384;\n"
            "events { worker_connections 8192; }\n")


def nginx_configs():
    out_p, out_h2, in_p = PORTS["nginx"]
    g_out, g_in = GRPC_PORTS["nginx"]
    keep = "  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n"
    outbound = nginx_head("nginx-http-out") + (
        "http {\n  access_log off;\n" + keep
        + f"  upstream inv {{\n    server 127.0.0.1:{in_p};\n    keepalive 256;\n"
        "    keepalive_requests 100000000;\n  }\n"
        f"  server {{\n    listen 127.0.0.1:{out_p};\n    listen 127.0.0.1:{out_h2} http2;\n"
        "    location / {\n      proxy_pass https://inv;\n      proxy_http_version 1.1;\n"
        "      proxy_set_header Connection \"\";\n      proxy_ssl_protocols TLSv1.3;\n"
        f"      proxy_ssl_certificate {PKI}/order.chain.pem;\n"
        f"      proxy_ssl_certificate_key {PKI}/order.key.pem;\n"
        f"      proxy_ssl_trusted_certificate {PKI}/root.pem;\n"
        "      proxy_ssl_verify on;\n      proxy_ssl_verify_depth 3;\n"
        "      proxy_ssl_name inventory.ward.local;\n    }\n  }\n"
        # The gRPC path: grpc_pass over mutual TLS (HTTP/2), the upstream kept alive.
        + f"  upstream cat {{\n    server 127.0.0.1:{g_in};\n    keepalive 256;\n  }}\n"
        f"  server {{\n    listen 127.0.0.1:{g_out} http2;\n"
        "    location / {\n      grpc_pass grpcs://cat;\n      grpc_ssl_protocols TLSv1.3;\n"
        f"      grpc_ssl_certificate {PKI}/order.chain.pem;\n"
        f"      grpc_ssl_certificate_key {PKI}/order.key.pem;\n"
        f"      grpc_ssl_trusted_certificate {PKI}/root.pem;\n"
        "      grpc_ssl_verify on;\n      grpc_ssl_verify_depth 3;\n"
        "      grpc_ssl_name catalog.ward.local;\n    }\n  }\n}\n")
    inbound = nginx_head("nginx-http-in") + (
        "http {\n  access_log off;\n" + keep
        + f"  upstream app {{\n    server 127.0.0.1:{BACKEND};\n    keepalive 256;\n"
        "    keepalive_requests 100000000;\n  }\n"
        f"  server {{\n    listen 127.0.0.1:{in_p} ssl http2;\n    ssl_protocols TLSv1.3;\n"
        f"    ssl_certificate {PKI}/inventory.chain.pem;\n"
        f"    ssl_certificate_key {PKI}/inventory.key.pem;\n"
        f"    ssl_client_certificate {PKI}/root.pem;\n"
        "    ssl_verify_client on;\n    ssl_verify_depth 3;\n"
        "    location / {\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n"
        "      proxy_set_header Connection \"\";\n"
        "      proxy_set_header x-forwarded-client-cert \"Hash=$ssl_client_fingerprint\";\n"
        "    }\n  }\n"
        + f"  upstream grpcapp {{\n    server 127.0.0.1:{GRPC_BACKEND};\n    keepalive 256;\n  }}\n"
        f"  server {{\n    listen 127.0.0.1:{g_in} ssl http2;\n    ssl_protocols TLSv1.3;\n"
        f"    ssl_certificate {PKI}/catalog.chain.pem;\n"
        f"    ssl_certificate_key {PKI}/catalog.key.pem;\n"
        f"    ssl_client_certificate {PKI}/root.pem;\n"
        "    ssl_verify_client on;\n    ssl_verify_depth 3;\n"
        "    location / {\n      grpc_pass grpc://grpcapp;\n"
        "      grpc_set_header x-forwarded-client-cert \"Hash=$ssl_client_fingerprint\";\n"
        "    }\n  }\n}\n")
    return outbound, inbound


def start_setup(name):
    if name == "ward":
        o, i, g = ward_configs()
        return [h.spawn(f"ward-http-{hop}", [h.WARD_BIN, "proxy", "--config",
                                             h.write(f"ward-http-{hop}.toml", t), "--workers", "1"],
                        env=dict(ENV, WARD_LOG="warn"))
                for hop, t in (("out", o), ("in", i), ("grpc-in", g))]
    if name == "haproxy":
        o, i = haproxy_configs()
        return [h.spawn(f"haproxy-http-{hop}", ["haproxy", "-db", "-f",
                                                h.write(f"haproxy-http-{hop}.cfg", t)])
                for hop, t in (("out", o), ("in", i))]
    if name == "nginx":
        o, i = nginx_configs()
        return [h.spawn(f"nginx-http-{hop}", ["nginx", "-p", WORK, "-e",
                                              f"{WORK}/nginx-http-{hop}.err", "-c",
                                              h.write(f"nginx-http-{hop}.conf", t)])
                for hop, t in (("out", o), ("in", i))]
    return []


def start_backend():
    conf = ("worker_processes 1;\ndaemon off;\n"
            f"pid {WORK}/backend-http.pid;\nerror_log {WORK}/backend-http.err warn;\n"
            "worker_rlimit_nofile 16384;\nevents { worker_connections 8192; }\n"
            "http {\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n"
            f"  server {{\n    listen 127.0.0.1:{BACKEND} backlog=4096;\n"
            f"    listen 127.0.0.1:{BACKEND + 1} http2;\n"
            "    location / { default_type text/plain; return 200 \"hello from the backend\\n\"; }\n"
            "  }\n}\n")
    p = h.spawn("backend-http", ["nginx", "-p", WORK, "-e", f"{WORK}/backend-http.err",
                                 "-c", h.write("backend-http.conf", conf)])
    wait_ready("backend", [p], BACKEND)
    return p


def start_grpc_backend():
    p = h.spawn("backend-grpc", [GRPC_BIN, f"127.0.0.1:{GRPC_BACKEND}"])
    for _ in range(100):
        if grpc_call(GRPC_BACKEND):
            return p
        time.sleep(0.1)
    raise RuntimeError(f"the gRPC backend did not answer; see {WORK}/backend-grpc.log")


GRPC_REQUEST = b"\x00\x00\x00\x00\x05hello"  # one uncompressed gRPC message of 5 bytes
GRPC_ARGS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]


def grpc_call(port):
    """One gRPC unary call (h2load, one request): whether it was answered 200."""
    request = f"{WORK}/grpc-request.bin"
    with open(request, "wb") as f:
        f.write(GRPC_REQUEST)
    r = subprocess.run(["h2load", "-n1", "-c1", "-d", request]
                       + GRPC_ARGS + [f"http://127.0.0.1:{port}/bench.Echo/Unary"],
                       capture_output=True, text=True, timeout=30)
    return "1 succeeded" in r.stdout and "status codes: 1 2xx" in r.stdout


def wait_ready(name, procs, port, tries=100):
    for _ in range(tries):
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.returncode}; see {WORK}/{p.name}.log")
        try:
            if h.http_get(port):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name}: no HTTP answer through the path on port {port}")


# ---------------------------------------------------------------- workloads

def h2load(port, grpc=False):
    target = f"http://127.0.0.1:{port}/"
    if grpc:
        extra = ["-d", f"{WORK}/grpc-request.bin"] + GRPC_ARGS
        target += "bench.Echo/Unary"
    else:
        extra = []
    argv = (["h2load", "-t1", f"-c{H2_CONNS}", f"-m{H2_STREAMS}", f"-D{DURATION}"] + extra
            + [target])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 30)
    out = r.stdout
    res = {"rps": None, "failed": None, "mean_ms": None}
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, "
                  r"(\d+) errored", out)
    if m:
        res["failed"] = int(m.group(1)) + int(m.group(2))
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if m:
        res["mean_ms"] = h.parse_latency(m.group(1))
    if res["rps"] is None:
        h.log(f"h2load output unparsed: {out[-400:]} {r.stderr[-400:]}")
    return res


def handshakes_total():
    """The TLS handshakes the outbound hop made to the inbound hop, whatever their result (the
    inbound hop counts the same handshakes from its side)."""
    total = 0.0
    url = f"http://127.0.0.1:{WARD_ADMIN[0]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("ward_tls_handshakes_total{") and 'direction="outbound"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def sequential_handshakes(port):
    """1000 sequential requests on one client connection, on sidecars that have served only the
    readiness check's request; the handshakes the outbound hop made since it started (so the pooled
    connection's own handshake is in)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ok = 0
    for _ in range(SEQ_REQUESTS):
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        ok += r.status == 200
    conn.close()
    return {"handshakes": handshakes_total(), "ok": ok}


def run(rounds):
    data = {s: {} for s in SETUPS}

    def put(setup, key, val):
        data[setup].setdefault(key, []).append(val)

    backend = start_backend()
    grpc_backend = start_grpc_backend()
    procs = {s: start_setup(s) for s in SETUPS}
    for s in SETUPS:
        wait_ready(s, procs[s], PORTS[s][0])
    time.sleep(1.0)
    if "ward" in SETUPS:
        # Before any load: the sidecars' own connection, as the app's first 1000 requests see it
        # (and before the gRPC path's first call, whose handshake would count too).
        res = sequential_handshakes(PORTS["ward"][0])
        put("ward", "seq_handshakes", res["handshakes"])
        put("ward", "seq_ok", res["ok"])
    for s in SETUPS:
        for _ in range(100):
            if grpc_call(GRPC_PORTS[s][0]):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{s}: no gRPC answer through the path; see {WORK}")
    for r in range(rounds):
        for s in SETUPS:
            port, h2port, _ = PORTS[s]
            res = h.measured(procs[s], lambda: h.wrk(port, KA_CONNS))
            put(s, "h1_rps", res["rps"])
            put(s, "h1_p99_ms", res["p99_ms"])
            put(s, "h1_cpu_us_req", per_request(res["cpu_s"], res["rps"]))
            put(s, "h1_errors", res["errors"] + res["non2xx"])
            res = h.measured(procs[s], lambda: h.wrk(port, 1))
            put(s, "seq_p50_us", res["p50_ms"] * 1000 if res["p50_ms"] else None)
            res = h.measured(procs[s], lambda: h2load(h2port))
            put(s, "h2_rps", res["rps"])
            put(s, "h2_cpu_us_req", per_request(res["cpu_s"], res["rps"]))
            put(s, "h2_failed", res["failed"])
            res = h.measured(procs[s], lambda: h2load(GRPC_PORTS[s][0], grpc=True))
            put(s, "grpc_rps", res["rps"])
            put(s, "grpc_cpu_us_req", per_request(res["cpu_s"], res["rps"]))
            put(s, "grpc_failed", res["failed"])
            h.log(f"http round {r + 1}/{rounds} {s}: "
                  + ", ".join(f"{k}={v[-1]:.4g}" for k, v in data[s].items()
                              if v and isinstance(v[-1], (int, float))))
    for s in SETUPS:
        for p in procs[s]:
            if p.poll() is not None:
                h.log(f"WARNING: {p.name} exited during the run ({p.returncode})")
            h.stop(p)
    h.stop(backend)
    h.stop(grpc_backend)
    return data


def per_request(cpu, rate):
    if cpu is None or not rate:
        return None
    return cpu / (rate * DURATION) * 1e6


# ---------------------------------------------------------------- report

COLUMNS = [  # (title, key, higher is better, format)
    ("HTTP/1.1 keep-alive req/s", "h1_rps", True, "{:,.0f}"),
    ("keep-alive p99 ms", "h1_p99_ms", False, "{:.2f}"),
    ("CPU µs/req keep-alive", "h1_cpu_us_req", False, "{:.1f}"),
    ("1-conn p50 µs", "seq_p50_us", False, "{:.0f}"),
    ("added p50 µs", "added_p50_us", False, "{:.0f}"),
    ("HTTP/2 req/s", "h2_rps", True, "{:,.0f}"),
    ("CPU µs/req HTTP/2", "h2_cpu_us_req", False, "{:.1f}"),
    ("gRPC unary req/s", "grpc_rps", True, "{:,.0f}"),
    ("CPU µs/req gRPC", "grpc_cpu_us_req", False, "{:.1f}"),
]


def medians(data):
    med = {s: {k: h.median(v) for k, v in d.items()} for s, d in data.items()}
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


def table(med):
    lines = ["| setup | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for s in SETUPS:
        cells = [fmt.format(med[s][k]) if med[s].get(k) is not None else "—"
                 for _, k, _, fmt in COLUMNS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if "ward" in med:
        cells = []
        for _, key, higher, _ in COLUMNS:
            b, who = best_peer(med, key, higher)
            w = med["ward"].get(key)
            cells.append("—" if b in (None, 0) or w is None else f"{w / b:.2f}x ({who})")
        lines.append("| **ward / best peer** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(med):
    def ratio(key, higher):
        b, who = best_peer(med, key, higher)
        w = med.get("ward", {}).get(key)
        return (None, who) if b in (None, 0) or w is None else (w / b, who)

    rows = []
    for title, key, higher, goal in (
            ("HTTP/1.1 keep-alive req/s ≥ 1.5x best peer", "h1_rps", True, 1.5),
            ("CPU per request ≤ 0.7x best peer's", "h1_cpu_us_req", False, 0.7),
            ("added p50 ≤ best peer's", "added_p50_us", False, 1.0)):
        r, who = ratio(key, higher)
        met = r is not None and (r >= goal if higher else r <= goal)
        rows.append((title, "—" if r is None else f"{h.near(r, goal)}x ({who})",
                     "—" if r is None else ("met" if met else "**not met**")))
    hs = med.get("ward", {}).get("seq_handshakes")
    rows.append((f"{SEQ_REQUESTS} sequential requests cost ≤ 2 handshakes between the sidecars",
                 "—" if hs is None else f"{hs:.0f}",
                 "—" if hs is None else ("met" if hs <= 2 else "**not met**")))
    lines = ["| target | ward, this run | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def render(raw):
    meta = raw["meta"]
    med = medians(raw["http"])
    fails = [f"{s}: {k} = {d[k]}" for s, d in raw["http"].items()
             for k in ("h1_errors", "h2_failed", "grpc_failed") if any(v for v in d.get(k, []) if v)]
    md = [BEGIN, "## HTTP mode (`MODE=http bash perf/run.sh`)\n",
          f"Run: {meta['date']}, {meta['elapsed_s'] / 60:.1f} min, ROUNDS={meta['rounds']} "
          f"DURATION={meta['duration']}s KA_CONNS={KA_CONNS} H2_CONNS={H2_CONNS} "
          f"H2_STREAMS={H2_STREAMS}; {meta['machine']}. Shared machine: compare ratios within "
          "this run only.\n",
          "Path: load generator -> outbound hop (plain HTTP) -> mutual TLS 1.3 -> inbound hop "
          "-> backend (nginx, 1 worker, a 23-byte response). One worker per hop: ward "
          "`--workers 1` with `protocol = \"http\"` on the upstream and the inbound (HTTP/2 "
          "between the hops); haproxy `nbthread 1`, mode http, `alpn h2` to the inbound hop, "
          "`http-reuse always`; nginx `worker_processes 1`, http proxy with an upstream "
          "`keepalive 256` over mutual TLS (HTTP/1.1: nginx has no HTTP/2 to upstreams). "
          f"Versions: {meta['versions']}.\n",
          table(med) + "\n",
          "Columns: keep-alive = wrk, 1 thread, KA_CONNS connections; CPU µs/req = utime + "
          "stime of both hops during the workload divided by the requests served; 1-conn = wrk "
          "-c1; added p50 = minus direct's; HTTP/2 = h2load with prior knowledge, H2_CONNS "
          "connections x H2_STREAMS concurrent streams (peers take HTTP/2 on a port of their "
          "own, ward on the same listener); gRPC unary = h2load sending gRPC calls (a 5-byte "
          "message; the answer is 16 bytes and `grpc-status: 0` in trailers) through a path of "
          "its own (service `catalog`) to a gRPC backend on hyper (ward-perf-grpc-backend), "
          "same connections x streams; nginx with `grpc_pass grpcs://` to the inbound hop and "
          "`grpc_pass grpc://` to the backend, haproxy with `proto h2` to the backend.\n"]
    if fails:
        md.append("Errors seen: " + "; ".join(fails) + "\n")
    md += ["### Targets\n", targets(med) + "\n", END]
    section = "\n".join(md) + "\n"
    try:
        with open(h.OUT) as f:
            text = f.read()
    except OSError:
        text = "# ward perf results\n"
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        text = text[:a] + section.rstrip("\n") + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(h.OUT, "w") as f:
        f.write(text)
    h.log(f"wrote the HTTP section of {h.OUT}")


def main():
    t0 = time.time()
    raw = {"http": run(ROUNDS)}
    raw["meta"] = {
        "elapsed_s": time.time() - t0, "rounds": ROUNDS, "duration": DURATION,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {h.cpu_model()}",
        "versions": ", ".join([h.version([h.WARD_BIN, "--version"]),
                               h.version(["haproxy", "-v"]), h.version(["nginx", "-v"]),
                               h.version(["wrk", "-v"]), h.version(["h2load", "--version"])]),
    }
    raw_path = h.RAW.replace(".json", "-http.json")
    with open(raw_path, "w") as f:
        json.dump(raw, f, indent=1)
    render(raw)


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
        h.stop_all()
