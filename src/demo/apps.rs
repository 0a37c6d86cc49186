//! The demo's two sample services, tiny HTTP/1.1 apps that know nothing of TLS.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 8 * 1024;

/// Reads a request head; returns (method, target) or None for a bad or oversized request.
async fn read_request(s: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next()?.split_whitespace();
    Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
}

async fn respond(s: &mut TcpStream, status: &str, body: &str) {
    let msg = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(msg.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// `inventory`: `GET /stock/<item>` answers how many are in stock. Counts its connections, so
/// the demo can show that refused callers never reached it.
pub async fn inventory(listener: TcpListener, accepted: Arc<AtomicUsize>) {
    while let Ok((mut s, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let Some((method, target)) = read_request(&mut s).await else {
                return respond(&mut s, "400 Bad Request", "bad request\n").await;
            };
            match (method.as_str(), target.strip_prefix("/stock/")) {
                ("GET", Some(item)) if !item.is_empty() && item.len() < 64 => {
                    let body = format!(
                        "{{\"item\":\"{}\",\"in_stock\":42}}\n",
                        item.escape_default()
                    );
                    respond(&mut s, "200 OK", &body).await
                }
                _ => respond(&mut s, "404 Not Found", "try GET /stock/<item>\n").await,
            }
        });
    }
}

/// `order`: `GET /order?item=<item>` asks inventory, through the sidecar's upstream listener on
/// localhost, and confirms the order.
pub async fn order(listener: TcpListener, inventory_upstream: SocketAddr) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Some((method, target)) = read_request(&mut s).await else {
                return respond(&mut s, "400 Bad Request", "bad request\n").await;
            };
            let item = target.strip_prefix("/order?item=").unwrap_or("");
            if method != "GET"
                || item.is_empty()
                || item.len() > 63
                || !item.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return respond(&mut s, "404 Not Found", "try GET /order?item=<item>\n").await;
            }
            match ask_inventory(inventory_upstream, item).await {
                Some(stock) => {
                    let body = format!(
                        "order confirmed: 1 x {item} (inventory says {})\n",
                        stock.trim()
                    );
                    respond(&mut s, "200 OK", &body).await
                }
                None => respond(&mut s, "502 Bad Gateway", "inventory is unreachable\n").await,
            }
        });
    }
}

async fn ask_inventory(upstream: SocketAddr, item: &str) -> Option<String> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await.ok()?;
        let req =
            format!("GET /stock/{item} HTTP/1.1\r\nhost: inventory\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        let resp = String::from_utf8_lossy(&resp).into_owned();
        if !resp.starts_with("HTTP/1.1 200") {
            return None;
        }
        resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()?
}

/// A one-shot `GET` with `connection: close`; returns the status line and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(String, String)> {
    let work = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.ok()?;
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = resp.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_owned(), body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()?
}
