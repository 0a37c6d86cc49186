//! ward's configuration: typed, parsed and validated whole before anything starts.
//!
//! Every error is one sentence naming the file, the key and what is wrong.

pub mod duration;
pub mod error;
pub mod identity;
pub mod intentions;
pub mod permission;
pub mod ports;
pub mod private_dir;
pub mod proxy;
pub mod server;
pub mod time;

pub use duration::Duration;
pub use error::ConfigError;
pub use identity::{IdentityError, Name, SpiffeId, TrustDomain};
