//! The socket calls transparent mode needs: the destination a redirected connection was
//! addressed to, and listeners for both address families.

use socket2::{Domain, SockRef, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use tokio::net::{TcpListener, TcpStream};

/// The address the client connected to before the nat rules redirected it here
/// (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` on an IPv6 socket). For a connection that was
/// not redirected, the kernel answers with the connection's own local address.
/// An IPv4 connection accepted on a dual-stack IPv6 socket is asked as IPv4 (its conntrack
/// entry is IPv4's). The address comes back with an IPv4-mapped IP made plain IPv4.
pub fn original_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(tcp);
    let local = tcp.local_addr()?;
    let addr = if local.ip().to_canonical().is_ipv6() {
        sock.original_dst_v6()?
    } else {
        sock.original_dst_v4()?
    };
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))?;
    Ok(canonical(addr))
}

/// `addr` with an IPv4-mapped IPv6 address made plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The IPv6 twin of a configured IPv4 wildcard or loopback listener: the redirect rules send
/// IPv6 connections to `[::]` or `[::1]` at the same port.
pub fn ipv6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => Some((Ipv6Addr::UNSPECIFIED, addr.port()).into()),
        IpAddr::V4(v4) if v4.is_loopback() => Some((Ipv6Addr::LOCALHOST, addr.port()).into()),
        _ => None,
    }
}

/// A listener on an IPv6 address that takes IPv6 only, so that it can share its port with the
/// IPv4 listener (whatever the host's `bindv6only`).
pub fn bind_ipv6_only(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Whether `e` says the host has no IPv6 (then the twin is left out, with a log line).
pub fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_ipv6_twin_shares_the_port_of_the_ipv4_wildcard() {
        let v4 = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let addr = v4.local_addr().unwrap();
        let twin = ipv6_twin(addr).unwrap();
        assert_eq!(twin, SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())));
        match bind_ipv6_only(twin) {
            Ok(l) => assert_eq!(l.local_addr().unwrap().port(), addr.port()),
            Err(e) => assert!(no_ipv6(&e), "{e}"),
        }
        assert_eq!(
            ipv6_twin("127.0.0.1:15001".parse().unwrap()),
            Some("[::1]:15001".parse().unwrap())
        );
        assert_eq!(ipv6_twin("10.0.0.1:15001".parse().unwrap()), None);
        assert_eq!(ipv6_twin("[::]:15001".parse().unwrap()), None);
    }
}
