//! ward's gRPC API, package `ward.v1` (see `proto/ward/v1/ward.proto` for the contract).
//!
//! Generated at build time by `build.rs` with protox, a pure-Rust protobuf compiler, so building
//! needs no system `protoc`. Clients and servers for `Identity`, `Mesh` and `Admin` live in
//! [`v1`]: e.g. `v1::identity_client::IdentityClient`, `v1::mesh_server::MeshServer`.

/// Messages and services of `ward.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("ward.v1");
}

pub mod permission;

/// Largest message the server accepts or a client should send (security rule 15, bounds,
/// docs/security.md).
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// gRPC metadata key for join and admin tokens: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

#[cfg(test)]
mod tests {
    use super::v1;
    use prost::Message;

    #[test]
    fn snapshot_round_trips() {
        let snap = v1::IntentionsSnapshot {
            version: 7,
            destination: Some(v1::ServiceRef {
                name: "inventory".into(),
                namespace: "default".into(),
            }),
            default_action: v1::Action::Deny as i32,
            intentions: vec![v1::Intention {
                source: "order".into(),
                destination: "inventory".into(),
                action: v1::Action::Allow as i32,
                permissions: vec![v1::Permission {
                    action: v1::Action::Allow as i32,
                    path: Some(v1::permission::Path::PathPrefix("/stock/".into())),
                    methods: vec!["GET".into()],
                    headers: vec![v1::HeaderMatch {
                        name: "x-env".into(),
                        r#match: Some(v1::header_match::Match::Exact("prod".into())),
                    }],
                }],
                version: 7,
                created_at: 0,
            }],
        };
        let bytes = snap.encode_to_vec();
        assert_eq!(v1::IntentionsSnapshot::decode(&bytes[..]).unwrap(), snap);
    }
}
