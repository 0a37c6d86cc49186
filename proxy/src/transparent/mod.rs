//! Transparent mode (`[transparent]`): connections the redirect rules of `ward redirect` send to
//! the proxy, with their original destinations.
//!
//! - [`index`]: which mesh service owns an IP address.

pub mod index;
