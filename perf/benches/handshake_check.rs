//! ns per inbound handshake check: chain verification (leaf + intermediate to the root), the
//! SVID/SPIFFE parse, and the intention decision, through
//! `InboundVerifier::verify_client_cert` exactly as rustls calls it. Run with 10 and with
//! 10,000 rules, the caller matched by an exact rule, to show the decision does not grow with
//! the rule count. `decide_only` isolates the snapshot lookup.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::hint::black_box;
use std::sync::Arc;
use ward_config::intentions::{Action, Rule, Source};
use ward_config::{Name, SpiffeId};
use ward_perf::{spiffe_id, Pki};
use ward_proxy::intentions::{IntentionSnapshot, IntentionStore};
use ward_proxy::tls::{CredentialStore, Credentials, InboundVerifier};

/// `n` rules: `n - 1` exact rules for other services, plus the one that allows `order`, placed
/// in the middle so no position is favoured.
fn rules(n: usize) -> Vec<Rule> {
    let mut v: Vec<Rule> = (0..n - 1)
        .map(|i| {
            let action = if i % 2 == 0 {
                Action::Allow
            } else {
                Action::Deny
            };
            Rule::l4(Source::parse(&format!("svc-{i}")).expect("source"), action)
        })
        .collect();
    v.insert(
        n / 2,
        Rule::l4(Source::parse("order").expect("source"), Action::Allow),
    );
    v
}

fn bench(c: &mut Criterion) {
    let pki = Pki::new().expect("pki");
    let server = pki.leaf("inventory", &[]).expect("server leaf");
    let client = pki.leaf("order", &[]).expect("client leaf");
    let ns = Name::default_namespace();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(client.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("client chain");
    let (leaf, intermediates) = chain.split_first().expect("leaf");
    let peer = SpiffeId::parse(&spiffe_id("order")).expect("spiffe id");

    let mut group = c.benchmark_group("handshake_check");
    for n in [10usize, 10_000] {
        let credentials = Arc::new(CredentialStore::default());
        credentials.store(
            Credentials::from_pem(
                server.chain_pem.as_bytes(),
                server.key_pem.as_bytes(),
                pki.root_pem.as_bytes(),
            )
            .expect("credentials"),
        );
        let intentions = Arc::new(IntentionStore::default());
        assert!(intentions.publish(IntentionSnapshot::new(1, Action::Deny, rules(n), &ns)));
        let verifier = InboundVerifier::new(
            credentials,
            intentions.clone(),
            Name::new("inventory").expect("name"),
        );
        let now = UnixTime::now();
        verifier
            .verify_client_cert(leaf, intermediates, now)
            .expect("order is allowed");

        group.bench_with_input(BenchmarkId::new("verify_client_cert", n), &n, |b, _| {
            b.iter(|| {
                verifier
                    .verify_client_cert(black_box(leaf), black_box(intermediates), now)
                    .is_ok()
            })
        });
        let local = Name::new("inventory").expect("name");
        group.bench_with_input(BenchmarkId::new("decide_only", n), &n, |b, _| {
            b.iter(|| intentions.decide(black_box(&peer), &local))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
