//! `ward server`: the control plane. A built-in CA, join tokens, intentions, the catalog, and
//! the gRPC API of `ward-proto` (package `ward.v1`) over TLS 1.3.
//!
//! # Public API
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use ward_config::server::ServerConfig;
//! // `ward server --config server.toml`:
//! let cfg = ServerConfig::load(std::path::Path::new("server.toml"))?;
//! // or `ward server --dev [--data-dir DIR] [--listen ADDR] [--leaf-ttl D]`:
//! let cfg = ServerConfig::dev("/tmp/ward-dev".into(), None, None);
//!
//! let handle = ward_control_plane::build(cfg).await?; // binds everything, or fails naming it
//! let _grpc = handle.grpc_addr;   // bound gRPC TLS address (port 0 in the config resolved)
//! let _admin = handle.admin_addr; // bound admin HTTP address: /metrics /ready /live /config /drain
//! let _ca = &handle.ca_file;      // <data_dir>/ca.pem: roots that verify the server (WARD_CACERT)
//! let _addr = handle.address();   // "https://127.0.0.1:8502" (WARD_ADDR)
//! if let Some(lines) = handle.export_lines() {
//!     // --dev only: "export WARD_ADDR=...\nexport WARD_TOKEN=...\nexport WARD_CACERT=...\n"
//!     print!("{lines}");
//! }
//! if let Some(path) = &handle.admin_token_file {
//!     // first start outside --dev: the admin token was written there (0600); print the path only
//!     eprintln!("admin token written to {}", path.display());
//! }
//! handle.shutdown();        // graceful stop trigger (e.g. on SIGTERM); or:
//! handle.stop().await?;     // shutdown() + wait(): returns once the state file is closed
//! # Ok(()) }
//! ```
//!
//! - `data_dir` holds `state.redb` (0600: CA keys, intention, token hashes, catalog),
//!   `ca.pem` (rewritten on each start) and, outside `--dev`, `admin.token` (0600, written once
//!   on the first start). The dir itself is kept at 0700.
//! - With `--dev` every start makes a new admin token (the old one stops working), since only
//!   its hash is stored and it cannot be shown again.
//! - Errors are [`ServerError`], one sentence naming the file, key or address at fault.
//! - The server's certificate has URI SAN `spiffe://<td>/ward/server` and IP/DNS SANs for the
//!   listen address (`127.0.0.1`, `::1`, `localhost` for an unspecified or loopback one) and
//!   `[server] advertise`; its chain is `[server leaf, intermediate]`, verified by `ca.pem`.
//! - Wire contract for clients (see `proto/ward/v1/ward.proto`): tokens go in
//!   `authorization: Bearer <token>`; `Identity.Sign` takes a join token *or* a mesh client
//!   certificate, never both on one call; a `Mesh.*` stream is refused with RESOURCE_EXHAUSTED
//!   while the same instance (same leaf key) holds one of that kind, and ends with
//!   UNAUTHENTICATED when the caller's certificate expires, so a client reconnects with its
//!   renewed certificate after closing the old stream. A call made with a certificate past its
//!   notAfter (on a connection opened while it was valid) is refused with UNAUTHENTICATED too.
//!
//! # Modules
//! [`ca`] (root, intermediate, CSR checks, leaf template), [`storage`] (the `Storage` trait and
//! redb), [`tokens`] and [`admin_token`] (secrets), [`intentions`] (store and `check`),
//! [`catalog`] (registered instances), `grpc` (the tonic services and auth, a file each, and
//! the Sign rate limit and stream limits), [`peer`] (TLS and caller identity), [`server`]
//! (`build`).

mod admin_http;
pub mod admin_token;
pub mod ca;
pub mod ca_expiry;
pub mod catalog;
mod grpc;
pub mod intentions;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod storage;
pub mod tokens;

pub use server::{build, ServerError, ServerHandle, CA_FILE};

pub(crate) use ward_config::time::now_unix;
