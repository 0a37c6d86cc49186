//! `ward demo`: the PRODUCT.md scenario on one machine. Two sample services, each behind a real
//! `ward proxy` process, an intention order -> inventory, and a rogue client that tries the
//! attacks; then an order placed through the mesh.

mod apps;
mod pki;
mod proxies;
mod rogue;

use anyhow::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

pub fn run(once: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(play(once))
}

async fn play(once: bool) -> anyhow::Result<()> {
    let dir = proxies::DemoDir::new()?;
    println!("ward demo: working directory {}", dir.path().display());

    // The mesh CA, and the rogue's own CA for the spoofing attempt.
    let (root, intermediate) = pki::Ca::new("ward demo")?;
    std::fs::write(dir.path().join("roots.pem"), &root.cert_pem)?;
    let inventory_leaf = intermediate.leaf(dir.path(), "inventory", "inventory")?;
    let order_leaf = intermediate.leaf(dir.path(), "order", "order")?;
    let rogue_leaf = intermediate.leaf(dir.path(), "rogue", "rogue")?;
    let (_, evil_intermediate) = pki::Ca::new("rogue")?;
    let spoofed = evil_intermediate.leaf(dir.path(), "order", "spoofed-order")?;
    let self_signed = pki::self_signed(dir.path(), "order", "self-signed-order")?;
    println!(
        "  mesh CA: root -> intermediate -> leaves for inventory and order (ECDSA P-256, 24 h)"
    );

    // The apps, on loopback, knowing nothing of TLS.
    let inventory_listener = TcpListener::bind("127.0.0.1:0").await?;
    let inventory_app = inventory_listener.local_addr()?;
    let inventory_hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(apps::inventory(inventory_listener, inventory_hits.clone()));
    let order_listener = TcpListener::bind("127.0.0.1:0").await?;
    let order_app = order_listener.local_addr()?;

    let mut children = proxies::Children::default();
    let inventory = children
        .start(
            &dir,
            "inventory",
            &proxies::inventory_config(&dir, &inventory_leaf, inventory_app),
            &["admin", "inbound"],
        )
        .await?;
    let inventory_inbound = inventory.addr("inbound");
    let order = children
        .start(
            &dir,
            "order",
            &proxies::order_config(&dir, &order_leaf, inventory_inbound),
            &["admin", "upstream.inventory"],
        )
        .await?;
    let upstream = order.addr("upstream.inventory");
    tokio::spawn(apps::order(order_listener, upstream));
    println!("  inventory app {inventory_app} <- ward proxy inbound {inventory_inbound} (mTLS)");
    println!("  order app {order_app} -> ward proxy upstream {upstream} -> inventory's sidecar");
    println!("  intention: order -> inventory allow; default deny");
    println!();

    println!("a rogue client attacks inventory's sidecar directly:");
    let attempts = [
        ("no client certificate", None),
        ("self-signed certificate claiming order", Some(&self_signed)),
        (
            "order's name on a certificate from the rogue's own CA",
            Some(&spoofed),
        ),
        (
            "genuine mesh identity \"rogue\", which no intention allows",
            Some(&rogue_leaf),
        ),
    ];
    let before = inventory_hits.load(Ordering::SeqCst);
    let mut refused = 0;
    for (n, (what, leaf)) in attempts.iter().enumerate() {
        let outcome = rogue::attempt(inventory_inbound, *leaf).await;
        if outcome.refused() {
            refused += 1;
        }
        println!("  {}. {what}: {outcome}", n + 1);
    }
    let reached = inventory_hits.load(Ordering::SeqCst) - before;
    println!("  {refused} of {} attacks refused in the TLS handshake; the inventory app saw {reached} connections from them", attempts.len());
    println!();

    println!("order places an order through the mesh:");
    let confirmed = match apps::http_get(order_app, "/order?item=widget").await {
        Some((status, body)) if status.contains(" 200 ") => {
            print!("  {body}");
            true
        }
        Some((status, body)) => {
            println!("  failed: {status}: {}", body.trim());
            false
        }
        None => {
            println!("  failed: the order app did not answer");
            false
        }
    };
    println!();
    let ok = refused == attempts.len() && reached == 0 && confirmed;
    println!("demo {}", if ok { "succeeded" } else { "FAILED" });

    if !once && ok {
        println!();
        println!("try it:   curl 'http://{order_app}/order?item=widget'");
        println!(
            "metrics:  curl http://{}/metrics   (inventory's sidecar)",
            inventory.addr("admin")
        );
        println!(
            "          curl http://{}/metrics   (order's sidecar)",
            order.addr("admin")
        );
        println!("config:   curl http://{}/config", inventory.addr("admin"));
        println!("logs:     {}", dir.path().display());
        println!("Ctrl-C to stop.");
        tokio::signal::ctrl_c()
            .await
            .context("cannot wait for Ctrl-C")?;
        println!();
    }
    println!("stopping the sidecars");
    children.stop().await;
    if ok {
        Ok(())
    } else {
        anyhow::bail!(
            "the demo did not go as expected; the sidecar logs are in {}",
            dir.keep().display()
        )
    }
}
