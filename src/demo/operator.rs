//! The rest of the story, once an order went through: the operator turns `order -> inventory`
//! to deny with `ward intention create` (this same binary, as an operator types it), which
//! refuses the next order and closes a connection already open; the caller's sidecar says why;
//! allowed again, orders go through; and a certificate renews under traffic.

use super::apps::http_get;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the operator and the demo look at.
pub struct Scene {
    /// WARD_ADDR, WARD_TOKEN and WARD_CACERT for the CLI.
    pub cli_env: Vec<(&'static str, String)>,
    pub order_app: SocketAddr,
    /// order's sidecar: its upstream listener for inventory, and its admin listener.
    pub upstream: SocketAddr,
    pub order_admin: SocketAddr,
    pub inventory_admin: SocketAddr,
    /// Connections the inventory app accepted.
    pub inventory_hits: Arc<AtomicUsize>,
    /// order's sidecar log.
    pub order_log: PathBuf,
}

/// Deny, what the caller sees and says, then allow again; true if each step went as it should.
pub async fn deny_then_allow(s: &Scene) -> anyhow::Result<bool> {
    println!("the operator turns order -> inventory to deny:");
    // A connection through the mesh whose request is not finished: the inventory app waits
    // for the rest, so only the mesh can close it.
    let before = s.inventory_hits.load(Ordering::SeqCst);
    let mut open = TcpStream::connect(s.upstream).await?;
    open.write_all(b"GET /stock/widget HTTP/1.1\r\n").await?;
    if !wait_for(Duration::from_secs(5), || {
        s.inventory_hits.load(Ordering::SeqCst) > before
    })
    .await
    {
        println!("  failed: the open connection did not reach the inventory app");
        return Ok(false);
    }
    println!("  (a connection from order to inventory is open)");
    let changed = Instant::now();
    if !intention(s, "deny").await? {
        return Ok(false);
    }
    let mut buf = [0u8; 512];
    let closed = match tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {
            println!(
                "  the open connection was closed {} ms after the command was given",
                changed.elapsed().as_millis()
            );
            true
        }
        Ok(Ok(_)) => {
            println!("  failed: the open connection got an answer instead of being closed");
            false
        }
        Err(_) => {
            println!("  failed: the open connection is still open after 5 s");
            false
        }
    };

    let refused = match order_until(s.order_app, false).await {
        Some((status, body)) => {
            println!("  the next order: {status}: {}", body.trim());
            true
        }
        None => {
            println!("  failed: orders still go through after the deny");
            false
        }
    };
    let why = caller_says_why(s).await;
    println!();

    println!("the operator allows it again:");
    if !intention(s, "allow").await? {
        return Ok(false);
    }
    let allowed = match order_until(s.order_app, true).await {
        Some((_, body)) => {
            print!("  {body}");
            true
        }
        None => {
            println!("  failed: orders are still refused after the allow");
            false
        }
    };
    println!();
    Ok(closed && refused && why && allowed)
}

/// `ward intention create --source order --destination inventory --action ACTION --replace`,
/// shown and run as the operator would; prints what it answered.
async fn intention(s: &Scene, action: &str) -> anyhow::Result<bool> {
    let args = [
        "intention",
        "create",
        "--source",
        "order",
        "--destination",
        "inventory",
        "--action",
        action,
        "--replace",
    ];
    println!("  $ ward {}", args.join(" "));
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args)
        .args(["--output", "table"])
        .env_remove("WARD_TOKEN")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in &s.cli_env {
        cmd.env(k, v);
    }
    let out = match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(out) => out?,
        Err(_) => {
            println!("  failed: the command did not finish within 10 s");
            return Ok(false);
        }
    };
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim()
    .to_owned();
    println!("  {text}");
    Ok(out.status.success())
}

/// order's sidecar on the refusal: its handshake counter and its log line.
async fn caller_says_why(s: &Scene) -> bool {
    println!("  order's sidecar says why:");
    let metric = match http_get(s.order_admin, "/metrics").await {
        Some((_, body)) => body
            .lines()
            .find(|l| {
                l.starts_with("ward_tls_handshakes_total{")
                    && l.contains("direction=\"outbound\"")
                    && l.contains("result=\"denied\"")
            })
            .map(str::to_owned),
        None => None,
    };
    // The log is copied to the file by another thread: give it a moment.
    let mut line = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while line.is_none() && Instant::now() < deadline {
        line = std::fs::read_to_string(&s.order_log).ok().and_then(|log| {
            log.lines()
                .rfind(|l| l.contains("refused our handshake"))
                .map(str::to_owned)
        });
        if line.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    match &metric {
        Some(m) => println!("    metric: {m}"),
        None => println!("    failed: no outbound `denied` handshake in its metrics"),
    }
    match &line {
        Some(l) => println!("    log:    {}", l.trim()),
        None => println!("    failed: no refusal in its log"),
    }
    metric.is_some() && line.is_some()
}

/// Places orders until one is confirmed (`confirmed`) or refused (not), for at most 10 s.
async fn order_until(order_app: SocketAddr, confirmed: bool) -> Option<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some((status, body)) = http_get(order_app, "/order?item=widget").await {
            if status.contains(" 200 ") == confirmed {
                return Some((status, body));
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// inventory's certificate serial, from its sidecar's /config.
async fn serial(admin: SocketAddr) -> Option<(String, String)> {
    let (_, body) = http_get(admin, "/config").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let cert = v.get("certificate")?;
    Some((
        cert.get("serial")?.as_str()?.to_owned(),
        cert.get("not_after")?.as_str()?.to_owned(),
    ))
}

/// Orders keep flowing while inventory's sidecar renews its certificate (the demo's leaves are
/// short-lived, so this comes within seconds); true if one renewed and no order failed.
pub async fn renewal_under_traffic(s: &Scene, leaf_ttl: &str) -> bool {
    println!("inventory's certificate renews under traffic (leaves live {leaf_ttl} in the demo):");
    let Some((first, _)) = serial(s.inventory_admin).await else {
        println!("  failed: inventory's sidecar shows no certificate");
        return false;
    };
    let (mut ok, mut failed) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(40);
    let renewed = loop {
        match http_get(s.order_app, "/order?item=widget").await {
            Some((status, _)) if status.contains(" 200 ") => ok += 1,
            _ => failed += 1,
        }
        match serial(s.inventory_admin).await {
            Some((now, not_after)) if now != first => break Some((now, not_after)),
            _ if Instant::now() > deadline => break None,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // A few more on the new certificate.
    for _ in 0..5 {
        match http_get(s.order_app, "/order?item=widget").await {
            Some((status, _)) if status.contains(" 200 ") => ok += 1,
            _ => failed += 1,
        }
    }
    match &renewed {
        Some((serial, not_after)) => {
            println!("  renewed: serial {first} -> {serial}, valid until {not_after}")
        }
        None => println!("  failed: no renewal within 40 s"),
    }
    println!("  meanwhile {ok} orders were confirmed and {failed} failed");
    println!();
    renewed.is_some() && failed == 0
}

async fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
