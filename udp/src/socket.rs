//! Relay and listener sockets: binding with their options, registering with the reactor, and
//! where GSO works.

use std::cell::Cell;
use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// A non-blocking UDP socket, and where it sends without GSO: to a destination whose route's
/// device cannot segment (EIO), and not at all once [`NO_GSO_DESTINATIONS`] destinations did
/// so (the socket's own device, then).
///
/// A socket read by a task of its own is registered with tokio's reactor ([`register`]); the
/// relay sockets of a shard's allocations are not ([`UdpSock::unregistered`]): one
/// [`Poller`](crate::Poller) per shard watches them all.
pub struct UdpSock {
    /// Declared before `sock`, so it is deregistered before the descriptor closes.
    reactor: Option<AsyncFd<Fd>>,
    sock: std::net::UdpSocket,
    gso: Cell<bool>,
    no_gso: std::cell::RefCell<Vec<SocketAddr>>,
}

/// A descriptor owned elsewhere (by the [`UdpSock`] beside it), as tokio's reactor sees it.
pub struct Fd(pub(crate) RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Destinations one socket remembers sending to without GSO before it stops using GSO.
pub const NO_GSO_DESTINATIONS: usize = 64;

impl AsRawFd for UdpSock {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl UdpSock {
    /// A socket no tokio task waits on: a [`Poller`](crate::Poller) reports when it is
    /// readable.
    pub fn unregistered(sock: std::net::UdpSocket) -> UdpSock {
        UdpSock {
            reactor: None,
            sock,
            gso: Cell::new(kernel_has_gso()),
            no_gso: std::cell::RefCell::new(Vec::new()),
        }
    }

    pub fn get_ref(&self) -> &std::net::UdpSocket {
        &self.sock
    }

    /// Waits until a registered socket is readable; an error for one that is not registered.
    pub async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, Fd>> {
        match &self.reactor {
            Some(r) => r.readable().await,
            None => Err(io::Error::other("socket not registered with the reactor")),
        }
    }

    /// Whether sends on this socket may use GSO.
    pub fn gso(&self) -> bool {
        self.gso.get()
    }

    /// Whether sends to `to` may use GSO.
    pub(crate) fn gso_to(&self, to: SocketAddr) -> bool {
        if !self.gso.get() {
            return false;
        }
        let no = self.no_gso.borrow();
        no.is_empty() || !no.contains(&to)
    }

    /// The route to `to` cannot segment: send there without GSO from now on.
    pub(crate) fn without_gso_to(&self, to: SocketAddr) {
        let mut no = self.no_gso.borrow_mut();
        if !no.contains(&to) {
            no.push(to);
        }
        if no.len() >= NO_GSO_DESTINATIONS {
            self.gso.set(false);
            no.clear();
        }
    }
}

/// Registers a non-blocking socket for readability only: sends are non-blocking system calls
/// that drop on a full buffer, so write readiness would only cost wake-ups.
pub fn register(sock: std::net::UdpSocket) -> io::Result<UdpSock> {
    // SAFETY: the descriptor stays open while the registration lives: the `UdpSock` owns both
    // and drops `reactor` before `sock` (field order).
    let reactor = unsafe {
        AsyncFd::register_with_interest(Fd(sock.as_raw_fd()), tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    Ok(UdpSock {
        reactor: Some(reactor),
        ..UdpSock::unregistered(sock)
    })
}

/// Whether this kernel knows UDP GSO (Linux 4.18 and later): asked once, of a scratch socket.
pub fn kernel_has_gso() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let Ok(s) = std::net::UdpSocket::bind("127.0.0.1:0") else {
            return false;
        };
        let v: libc::c_int = 0;
        // SAFETY: a valid socket; the option value is a c_int the call only reads.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    })
}

/// Sets the receive and send buffers to `bytes` (0: the system's default). SO_RCVBUFFORCE
/// passes `net.core.rmem_max` when the process has CAP_NET_ADMIN; without it the kernel caps
/// the size there.
pub fn set_buffers(sock: &Socket, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
    let v = bytes as libc::c_int;
    for (opt, fallback) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a valid socket for the lifetime of `sock`; the option value is a c_int.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    fallback,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// A bound, non-blocking UDP socket on `addr` (IPv6 only for an IPv6 address), with
/// SO_REUSEPORT when `reuse_port` (listener shards share an address; relay sockets never) and
/// buffers of `buffer` bytes.
pub fn bind_udp(
    addr: SocketAddr,
    reuse_port: bool,
    buffer: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    set_buffers(&sock, buffer);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Sets the DF bit on what the socket sends (RFC 8656 §14/§15): IP_PMTUDISC_DO for IPv4,
/// IPV6_DONTFRAG for IPv6.
pub fn set_dont_fragment(s: &std::net::UdpSocket) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(s);
    let is_v4 = s.local_addr().is_ok_and(|a| a.is_ipv4());
    let (level, opt, val) = if is_v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    };
    // SAFETY: fd is a valid socket owned by `s`; the option value is a c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
