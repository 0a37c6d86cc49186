//! TLS for mesh connections: credentials, verifiers and the rustls configs built from them.

pub mod config;
pub mod credentials;
pub mod large_reads;
pub mod provider;
pub mod signatures;
pub mod svid;
pub mod tickets;
pub mod verify;

pub use credentials::{CredentialError, CredentialStore, Credentials};
pub use provider::provider;
pub use svid::{check_leaf, path_validity, LeafInfo, PathValidity, SvidError};
pub use verify::{classify, InboundVerifier, OutboundVerifier};
