//! Transparent mode (`[transparent]`): connections the redirect rules of `ward redirect` send to
//! the proxy, with their original destinations.
//!
//! - [`index`]: which mesh service owns an IP address.
//! - [`socket`]: the original destination of a redirected connection; IPv6 twin listeners.
//! - [`outbound`]: the transparent outbound listener. The transparent inbound is
//!   [`crate::inbound::Inbound::transparent`].

pub mod index;
pub mod outbound;
pub mod socket;
