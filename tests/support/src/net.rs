//! Plain-TCP helpers: admin HTTP GET, Prometheus text parsing, a counting echo app, a
//! recording relay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // bounded by the body length: each round consumes at least the size line
    while let Some(pos) = body.windows(2).position(|w| w == b"\r\n") {
        let size_line = String::from_utf8_lossy(&body[..pos]);
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).unwrap_or(0);
        body = &body[pos + 2..];
        if size == 0 || size > body.len() {
            break;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size..];
        if body.starts_with(b"\r\n") {
            body = &body[2..];
        }
    }
    out
}

/// `GET path` over HTTP/1.1 with `Connection: close`; 5 s timeouts.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    http_request(addr, "GET", path, &[])
}

/// `METHOD path` with the extra `headers` and no body, as [`http_get`].
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<HttpResponse> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n");
    if method != "GET" {
        head.push_str("Content-Length: 0\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no end of HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body_raw = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body_raw)
    } else {
        body_raw.to_vec()
    };
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).to_string(),
    })
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

fn parse_labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    // s starts right after '{'; returns labels and the rest after '}'
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(r) = rest.strip_prefix('}') {
            return Some((labels, r));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].trim_start();
        rest = rest.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        rest = &rest[end? + 1..];
        labels.push((key, value));
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        v => v.parse().ok(),
    }
}

pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let (labels, rest) = if line[name_end..].starts_with('{') {
            match parse_labels(&line[name_end + 1..]) {
                Some(x) => x,
                None => continue,
            }
        } else {
            (Vec::new(), &line[name_end..])
        };
        let Some(value) = rest.split_whitespace().next().and_then(parse_value) else {
            continue;
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the samples of `name` whose labels include all of `labels` (order-independent);
/// 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_prometheus(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
        })
        .map(|s| s.value)
        .sum()
}

/// A port that was free a moment ago (bound on 127.0.0.1 and released), never handed out
/// twice by this process, and outside the kernel's ephemeral range: a port from that range can
/// be taken by any other test's `bind(0)` or, for a probe, be the probe's own source port
/// (a self-connection that looks like a listener). CI failed once on exactly this.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = free_port_range();
    let span = high - low;
    // a different start per process, so two test runs side by side rarely meet
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + n) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high}");
}

/// Ports `low..high` below the kernel's ephemeral range (from 10000), or above it when it
/// starts too low (`1024 65535` leaves none: then say so).
fn free_port_range() -> (u32, u32) {
    const LOW: u32 = 10_000;
    const ROOM: u32 = 1_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut ends = range
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter_map(|v| v.parse::<u32>().ok());
    let (first, last) = (ends.next().unwrap_or(32_768), ends.next().unwrap_or(60_999));
    if first >= LOW + ROOM {
        (LOW, first)
    } else if last + ROOM < 65_535 {
        (last + 1, 65_536)
    } else {
        panic!(
            "the ephemeral port range {first}-{last} (/proc/sys/net/ipv4/ip_local_port_range) \
             leaves the tests no ports outside it"
        )
    }
}

/// Whether something accepts TCP connections on `addr` now. A connection to itself (source
/// port = `addr`'s port, possible when nothing listens on an ephemeral port) is not a listener.
pub fn is_listening(addr: SocketAddr) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(s) => s.local_addr().ok() != Some(addr),
        Err(_) => false,
    }
}

const RECORD_CAP: usize = 4 << 20;

fn record(buf: &Mutex<Vec<u8>>, data: &[u8]) {
    let mut b = buf.lock().unwrap();
    let room = RECORD_CAP.saturating_sub(b.len());
    let n = room.min(data.len());
    b.extend_from_slice(&data[..n]);
}

/// Accept loop that stops when `stop` is set (the owner wakes it with a connection).
fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    mut handle: impl FnMut(TcpStream) + Send + 'static,
) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(c) = conn {
                handle(c);
            }
        }
    });
}

fn wake(addr: SocketAddr, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
}

/// The application behind an inbound: counts accepted connections, records (up to 4 MiB of)
/// what it receives, echoes every byte, and on read-EOF flushes and shuts down its write half.
pub struct EchoApp {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl EchoApp {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo app");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (acc, rec) = (accepted.clone(), received.clone());
        accept_loop(listener, stop.clone(), move |mut conn| {
            acc.fetch_add(1, Ordering::SeqCst);
            let rec = rec.clone();
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                let _ = conn.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => {
                            let _ = conn.flush();
                            let _ = conn.shutdown(Shutdown::Write);
                            break;
                        }
                        Ok(n) => {
                            record(&rec, &buf[..n]);
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        });
        EchoApp {
            addr,
            accepted,
            received,
            stop,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        wake(self.addr, &self.stop);
    }
}

/// A TCP relay to `target` that records (up to 4 MiB per direction) every byte it forwards,
/// and forwards half-closes. Once frozen it forwards nothing and closes nothing: the far side
/// looks like a host that vanished without a reset.
pub struct Relay {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    to_target: Arc<Mutex<Vec<u8>>>,
    from_target: Arc<Mutex<Vec<u8>>>,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, rec: Arc<Mutex<Vec<u8>>>, frozen: Arc<AtomicBool>) {
    let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = from.read(&mut buf);
        if frozen.load(Ordering::SeqCst) {
            // Swallow what arrives; the sockets stay open while the other direction's thread
            // holds them.
            if matches!(read, Ok(0) | Err(_)) {
                break;
            }
            continue;
        }
        match read {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                break;
            }
            Ok(n) => {
                record(&rec, &buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
            }
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
                break;
            }
        }
    }
}

impl Relay {
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let to_target = Arc::new(Mutex::new(Vec::new()));
        let from_target = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let frozen = Arc::new(AtomicBool::new(false));
        let (conns, tt, ft) = (connections.clone(), to_target.clone(), from_target.clone());
        let fz = frozen.clone();
        accept_loop(listener, stop.clone(), move |client| {
            conns.fetch_add(1, Ordering::SeqCst);
            let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                return;
            };
            let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                (Ok(c2), Ok(s2)) => (c2, s2),
                _ => return,
            };
            let (tt, ft, fz1, fz2) = (tt.clone(), ft.clone(), fz.clone(), fz.clone());
            thread::spawn(move || pump(client, server, tt, fz1));
            thread::spawn(move || pump(s2, c2, ft, fz2));
        });
        Relay {
            addr,
            connections,
            to_target,
            from_target,
            frozen,
            stop,
        }
    }

    /// From now on, forwards nothing in either direction and keeps every connection open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Bytes sent towards the target (client -> server).
    pub fn sent_to_target(&self) -> Vec<u8> {
        self.to_target.lock().unwrap().clone()
    }

    /// Bytes sent back from the target (server -> client).
    pub fn received_from_target(&self) -> Vec<u8> {
        self.from_target.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        wake(self.addr, &self.stop);
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}
