//! `x-forwarded-client-cert` in Envoy's format, as the app behind an http inbound reads it.

use http::HeaderValue;
use ward_config::SpiffeId;

pub(crate) const HEADER: &str = "x-forwarded-client-cert";

/// `By=<own SPIFFE ID>;Hash=<sha256 of the peer's leaf certificate DER, hex>;URI=<peer's
/// SPIFFE ID>`. SPIFFE IDs hold none of `,;="`, so no value needs quoting.
pub(crate) fn value(own: &SpiffeId, peer_leaf_der: &[u8], peer: &SpiffeId) -> HeaderValue {
    let digest = crate::tls::provider::sha256(peer_leaf_der);
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    HeaderValue::from_str(&format!("By={own};Hash={hash};URI={peer}"))
        .expect("SPIFFE IDs and hex are visible ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_format() {
        let own = SpiffeId::parse("spiffe://ward.local/ns/default/svc/inventory").unwrap();
        let peer = SpiffeId::parse("spiffe://ward.local/ns/default/svc/order").unwrap();
        assert_eq!(
            value(&own, b"abc", &peer),
            "By=spiffe://ward.local/ns/default/svc/inventory;\
             Hash=ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad;\
             URI=spiffe://ward.local/ns/default/svc/order"
        );
    }
}
