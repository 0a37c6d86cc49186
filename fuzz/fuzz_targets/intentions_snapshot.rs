//! An intentions snapshot from the control plane: protobuf bytes, decoded and converted for a
//! tcp inbound `web` in namespace `default`, and for an http one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use ward_config::intentions::{Action, Source};
use ward_config::proxy::Protocol;
use ward_config::{Name, SpiffeId, TrustDomain};
use ward_control_client::convert;
use ward_proto::v1;
use ward_proxy::intentions::Reason;

fuzz_target!(|data: &[u8]| {
    let Ok(snap) = v1::IntentionsSnapshot::decode(data) else {
        return;
    };
    let ns = Name::default_namespace();
    let web = Name::new("web").unwrap();
    let any = convert::intentions(&snap, Protocol::Tcp, &ns);
    let mine = convert::intentions_for(&snap, Some(&web), Protocol::Tcp, &ns);
    // An http inbound admits a caller at the handshake only under a plain L4 allow or under
    // L7 permissions, which then decide each request.
    if let Ok(h) = convert::intentions(&snap, Protocol::Http, &ns) {
        for (rule, written) in h.rules.iter().zip(&snap.intentions) {
            if rule.action == Action::Allow {
                let l4 =
                    written.action == v1::Action::Allow as i32 && written.permissions.is_empty();
                let l7 = rule.permissions.is_some() && !written.permissions.is_empty();
                assert!(l4 || l7, "{written:?}");
            }
        }
    }
    // Addressing only refuses more.
    assert!(any.is_ok() || mine.is_err());
    let Ok(s) = any else {
        return;
    };
    assert_eq!(s.rules.len(), snap.intentions.len());
    for (i, (rule, written)) in s.rules.iter().zip(&snap.intentions).enumerate() {
        // Fail closed: only a plain L4 allow allows.
        if rule.action == Action::Allow {
            assert_eq!(written.action, v1::Action::Allow as i32);
            assert!(written.permissions.is_empty());
        }
        // Every exact source is decided by its own rule: no two rules name one caller.
        if let Source::Service { namespace, name } = &rule.source {
            let peer = SpiffeId::new(
                TrustDomain::dev(),
                namespace.clone().unwrap_or_else(|| ns.clone()),
                name.clone(),
            );
            let d = s.decide(&peer);
            assert_eq!(
                d.reason,
                Reason::Rule(i),
                "{:?} for {peer}",
                snap.intentions
            );
            assert_eq!(d.action, rule.action);
        }
    }
});
