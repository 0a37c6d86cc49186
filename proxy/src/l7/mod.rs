//! L7 (HTTP) intentions: the pure decision logic the inbound's HTTP server calls per request.
//!
//! - [`path`]: the request path normalized once, matched, and forwarded as matched.
//! - [`authorize`]: an intention's ordered permissions, compiled once per snapshot, against
//!   one request.

pub mod authorize;
pub mod path;
