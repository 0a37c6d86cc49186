//! CPU per full mutual TLS 1.3 handshake between two sidecars, both sides in one thread over
//! in-memory buffers: ward's own rustls configs (`tls::config`), verifiers (chain to the root,
//! SPIFFE ID, intention) and ECDSA P-256 leaves from root -> intermediate, no resumption. What
//! a new tunnel connection costs the two hops together, without the kernel.
//!
//! `kx/X25519MLKEM768` is what two ward sidecars agree on; `kx/X25519` the same handshake with
//! the client offering X25519 only (a classical peer), to show what the post-quantum key
//! exchange adds. Written against `tls::config` only, so it also builds at a commit with
//! another provider, for a before/after (perf/profile-notes.md).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rustls::crypto::CryptoProvider;
use rustls::ServerConnection;
use rustls::{ClientConfig, ClientConnection, Connection, NamedGroup, ServerConfig};
use std::sync::Arc;
use ward_config::intentions::{Action, Rule, Source};
use ward_config::Name;
use ward_perf::Pki;
use ward_proxy::intentions::{IntentionSnapshot, IntentionStore};
use ward_proxy::tls::config::{client_config, server_config, StoreResolver};
use ward_proxy::tls::{CredentialStore, Credentials, InboundVerifier, OutboundVerifier};

fn store(leaf: &ward_perf::Leaf, root_pem: &str) -> Arc<CredentialStore> {
    let s = Arc::new(CredentialStore::default());
    s.store(
        Credentials::from_pem(
            leaf.chain_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            root_pem.as_bytes(),
        )
        .expect("credentials"),
    );
    s
}

/// Moves every pending TLS byte from `from` to `to`.
fn transfer(from: &mut Connection, to: &mut Connection, buf: &mut Vec<u8>) {
    while from.wants_write() {
        buf.clear();
        from.write_tls(buf).expect("write_tls");
        let mut rd = &buf[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).expect("read_tls");
            to.process_new_packets().expect("handshake");
        }
    }
}

fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>, buf: &mut Vec<u8>) -> u16 {
    let name = rustls_pki_types::ServerName::try_from("inventory").expect("name");
    let mut c = Connection::from(ClientConnection::new(client.clone(), name).expect("client"));
    let mut s = Connection::from(ServerConnection::new(server.clone()).expect("server"));
    for _ in 0..8 {
        transfer(&mut c, &mut s, buf);
        transfer(&mut s, &mut c, buf);
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake done");
    let group = c.negotiated_key_exchange_group();
    u16::from(group.expect("a key exchange").name())
}

/// `cfg`'s provider with only the key-exchange group `only`.
fn offering(cfg: &ClientConfig, only: NamedGroup) -> Arc<CryptoProvider> {
    let p = cfg.crypto_provider();
    Arc::new(CryptoProvider {
        kx_groups: p
            .kx_groups
            .iter()
            .copied()
            .filter(|g| g.name() == only)
            .collect(),
        ..(**p).clone()
    })
}

fn bench(c: &mut Criterion) {
    let pki = Pki::new().expect("pki");
    let ns = Name::default_namespace();
    let inventory = store(&pki.leaf("inventory", &[]).expect("leaf"), &pki.root_pem);
    let order = store(&pki.leaf("order", &[]).expect("leaf"), &pki.root_pem);
    let intentions = Arc::new(IntentionStore::default());
    let allow = Rule::l4(Source::parse("order").expect("source"), Action::Allow);
    assert!(intentions.publish(IntentionSnapshot::new(1, Action::Deny, vec![allow], &ns)));
    let inventory_name = Name::new("inventory").expect("name");
    let server = server_config(
        inventory.clone(),
        InboundVerifier::new(inventory, intentions, inventory_name.clone()),
        None,
    );
    let verifier = Arc::new(OutboundVerifier::new(
        order.clone(),
        ns.clone(),
        inventory_name,
    ));
    let hybrid = client_config(order.clone(), verifier.clone(), b"ward-mux/1");
    let x25519 = Arc::new(
        ClientConfig::builder_with_provider(offering(&hybrid, NamedGroup::X25519))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(StoreResolver(order))),
    );

    let mut buf = Vec::with_capacity(16 * 1024);
    let mut group = c.benchmark_group("mtls_handshake");
    for (label, cfg) in [("X25519MLKEM768", &hybrid), ("X25519", &x25519)] {
        // Skip a group this build's provider does not have (the hybrid one under *ring*).
        let got = handshake(cfg, &server, &mut buf);
        if label == "X25519MLKEM768" && got != u16::from(NamedGroup::X25519MLKEM768) {
            eprintln!("kx/{label}: not offered by this build's provider; skipped");
            continue;
        }
        group.bench_with_input(BenchmarkId::new("kx", label), &label, |b, _| {
            b.iter(|| handshake(cfg, &server, &mut buf))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
