//! The JSON shown by `GET /config`: what the proxy runs with, never a private key.

use crate::inputs::ProxyInputs;
use serde_json::{json, Value};
use x509_parser::prelude::{FromDer, X509Certificate};

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn dump(inputs: &ProxyInputs) -> Value {
    let certificate = inputs.credentials.load().map(|c| {
        let roots: Vec<Value> = c
            .root_ders
            .iter()
            .map(|der| match X509Certificate::from_der(der) {
                Ok((_, cert)) => json!({
                    "subject": cert.subject().to_string(),
                    "not_after": rfc3339(cert.validity().not_after.timestamp()),
                }),
                Err(_) => json!({ "subject": null }),
            })
            .collect();
        json!({
            "serial": c.leaf.serial,
            "spiffe_id": c.leaf.id.to_string(),
            "not_after": rfc3339(c.leaf.not_after),
            "not_after_unix": c.leaf.not_after,
            "roots": roots,
        })
    });
    let intentions = inputs.intentions.load().map(|s| {
        json!({
            "version": s.version,
            "default": s.default.as_str(),
            "rules": s.rules.iter().map(|r| match &r.permissions {
                None => json!({
                    "source": r.source.to_string(),
                    "action": r.action.as_str(),
                }),
                // An L7 rule: how many permissions decide its requests.
                Some(p) => json!({
                    "source": r.source.to_string(),
                    "permissions": p.len(),
                }),
            }).collect::<Vec<_>>(),
        })
    });
    let listeners: Vec<Value> = inputs
        .listeners
        .lock()
        .map(|l| {
            l.iter()
                .map(|(role, addr)| json!({ "role": role, "address": addr.to_string() }))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "service": {
            "name": inputs.service.name.as_str(),
            "namespace": inputs.service.namespace.as_str(),
            "trust_domain": inputs.credentials.load().map(|c| c.leaf.id.trust_domain.to_string()),
        },
        "listeners": listeners,
        "certificate": certificate,
        "intentions": intentions,
        "connections": { "inbound_registered": inputs.connections.len() },
        "draining": inputs.drain.is_draining(),
    })
}
