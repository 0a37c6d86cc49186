//! SPIFFE ID parsing (runs inside every handshake) and the escape of peer values for logs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ward_config::identity::escape_peer_value;
use ward_config::{Name, SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Whatever a peer wrote, the log line gets bounded, printable ASCII (plus the cut mark).
    let escaped = escape_peer_value(s);
    assert!(escaped.len() <= 256 + 10 + '…'.len_utf8(), "{escaped}");
    assert!(
        escaped
            .chars()
            .all(|c| c == '…' || (' '..='~').contains(&c)),
        "{escaped:?}"
    );

    if let Ok(id) = SpiffeId::parse(s) {
        // Exactly the grammar: an accepted ID prints back as written, and its parts are valid
        // on their own (no normalisation that two different IDs could collide in).
        assert_eq!(id.to_string(), s);
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
        assert_eq!(
            TrustDomain::new(id.trust_domain.as_str()).as_ref(),
            Ok(&id.trust_domain)
        );
        assert_eq!(Name::new(id.namespace.as_str()).as_ref(), Ok(&id.namespace));
        assert_eq!(Name::new(id.service.as_str()).as_ref(), Ok(&id.service));
    }
});
