//! The control plane's CSR verification (security rule 2, what a CSR may ask,
//! docs/security.md): arbitrary DER against a real CA.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;
use ward_config::TrustDomain;
use ward_control_plane::ca::{Ca, CaMaterial};

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let td = TrustDomain::dev();
        let day = Duration::from_secs(86_400);
        let material = CaMaterial::generate(&td, 365 * day, 30 * day).expect("generate a CA");
        Ca::load(&material, td, day, "fuzz").expect("load the CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let ca = ca();
    if let Ok(req) = ca.verify_csr(data) {
        // What passes is an ID of our trust domain over a key the CA can sign.
        assert_eq!(&req.spiffe_id.trust_domain, ca.trust_domain());
        ca.issue_leaf(&req.spiffe_id, &req.public_key)
            .expect("a verified CSR's key can be signed");
    }
});
