//! `ward demo`: the README's scenario on one machine. A dev `ward server`, two sample services
//! each behind a real `ward proxy` process that got its identity from a join token, an intention
//! order -> inventory, and a rogue client that tries the attacks; then an order placed through
//! the mesh, the intention turned to deny and back, and a certificate renewal under traffic.

mod apps;
mod mesh;
mod operator;
mod pki;
mod proxies;
mod rogue;

use anyhow::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// The leaf lifetime of the demo's server: short, so that a renewal comes within the story.
const LEAF_TTL: &str = "20s";

pub fn run(once: bool, log_format: crate::LogFormat) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(play(once, log_format))
}

async fn play(once: bool, log_format: crate::LogFormat) -> anyhow::Result<()> {
    let dir = proxies::DemoDir::new()?;
    println!("ward demo: working directory {}", dir.path().display());

    // Ctrl-C at any point stops the processes the demo started, not just the demo.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?;
    let mut children = proxies::Children::new(log_format);
    let outcome = tokio::select! {
        outcome = story(&dir, &mut children, once) => outcome,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted before the demo finished")),
    };
    if !once && matches!(outcome, Ok(true)) {
        interrupt.recv().await;
        println!();
    }
    println!("stopping the sidecars and the server");
    children.stop().await;
    match outcome {
        Ok(true) => Ok(()),
        Ok(false) => anyhow::bail!(
            "the demo did not go as expected; the logs are in {}",
            dir.keep().display()
        ),
        Err(e) => Err(e.context(format!("the logs are in {}", dir.keep().display()))),
    }
}

async fn story(
    dir: &proxies::DemoDir,
    children: &mut proxies::Children,
    once: bool,
) -> anyhow::Result<bool> {
    let server = children.start_server(dir)?;
    let mut mesh = mesh::Mesh::connect(&server.stdout).await?;
    println!(
        "  dev control plane {} (CA: root -> intermediate; leaves ECDSA P-256, {LEAF_TTL})",
        mesh.cp.address
    );
    let inventory_token = mesh.token_file(dir.path(), "inventory").await?;
    let order_token = mesh.token_file(dir.path(), "order").await?;
    let rogue_token = mesh.token_file(dir.path(), "rogue").await?;
    mesh.allow("order", "inventory").await?;
    println!("  join tokens created for inventory, order (and the rogue); intention order -> inventory allow, default deny");

    // The apps, on loopback, knowing nothing of TLS.
    let inventory_listener = TcpListener::bind("127.0.0.1:0").await?;
    let inventory_app = inventory_listener.local_addr()?;
    let inventory_hits = Arc::new(AtomicUsize::new(0));
    tokio::spawn(apps::inventory(inventory_listener, inventory_hits.clone()));
    let order_listener = TcpListener::bind("127.0.0.1:0").await?;
    let order_app = order_listener.local_addr()?;

    let inventory = children
        .start_proxy(
            dir,
            "inventory",
            &proxies::inventory_config(&mesh.cp, &inventory_token, inventory_app),
            &["admin", "inbound"],
        )
        .await?;
    let inventory_inbound = inventory.addr("inbound");
    let order = children
        .start_proxy(
            dir,
            "order",
            &proxies::order_config(&mesh.cp, &order_token),
            &["admin", "upstream.inventory"],
        )
        .await?;
    let upstream = order.addr("upstream.inventory");
    tokio::spawn(apps::order(order_listener, upstream));
    println!("  inventory app {inventory_app} <- ward proxy inbound {inventory_inbound} (mTLS, certificate from its join token)");
    println!("  order app {order_app} -> ward proxy upstream {upstream} -> inventory's sidecar (found in the catalog)");
    println!();

    // The attacker's certificates: forged ones, and a genuine mesh identity of its own.
    let self_signed = pki::self_signed(dir.path(), "order", "self-signed-order")?;
    let (_, evil_intermediate) = pki::Ca::new("rogue")?;
    let spoofed = evil_intermediate.leaf(dir.path(), "order", "spoofed-order")?;
    let rogue_leaf = mesh.identity(dir.path(), "rogue", &rogue_token).await?;

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
    // The order sidecar learns inventory's address from the catalog: retry briefly until it has.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut answer = apps::http_get(order_app, "/order?item=widget").await;
    while !answer.as_ref().is_some_and(|(s, _)| s.contains(" 200 "))
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        answer = apps::http_get(order_app, "/order?item=widget").await;
    }
    let confirmed = match answer {
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

    let scene = operator::Scene {
        cli_env: vec![
            ("WARD_ADDR", mesh.cp.address.clone()),
            ("WARD_TOKEN", mesh.admin_token.clone()),
            ("WARD_CACERT", mesh.cp.ca_file.display().to_string()),
        ],
        order_app,
        upstream,
        order_admin: order.addr("admin"),
        inventory_admin: inventory.addr("admin"),
        inventory_hits: inventory_hits.clone(),
        order_log: dir.path().join("order.log"),
    };
    let flipped = confirmed && operator::deny_then_allow(&scene).await?;
    let renewed = flipped && operator::renewal_under_traffic(&scene, LEAF_TTL).await;
    let ok = refused == attempts.len() && reached == 0 && confirmed && flipped && renewed;
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
    }
    Ok(ok)
}
