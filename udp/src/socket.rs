//! Relay and listener sockets: binding with their options, registering with the reactor, and
//! where GSO works.

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

/// A non-blocking UDP socket, and the destinations it sends to without GSO for a while: those
/// whose route refused a GSO send (EIO: the device cannot segment or checksum; EMSGSIZE or
/// EINVAL: a segment above the path MTU), each for [`NO_GSO_FOR`], at most [`NO_GSO_DESTINATIONS`] of
/// them. Only those: a shared relay socket's other destinations keep GSO.
///
/// A socket read by a task of its own is registered with tokio's reactor ([`register`]); the
/// relay sockets of a shard's allocations are not ([`UdpSock::unregistered`]): one
/// [`Poller`](crate::Poller) per shard watches them all.
pub struct UdpSock {
    /// Declared before `sock`, so it is deregistered before the descriptor closes.
    reactor: Option<AsyncFd<Fd>>,
    sock: std::net::UdpSocket,
    gso: Cell<bool>,
    /// Destinations sent to without GSO, with when their route last refused it.
    no_gso: RefCell<FxHashMap<SocketAddr, Instant>>,
}

/// A descriptor owned elsewhere (by the [`UdpSock`] beside it), as tokio's reactor sees it.
pub struct Fd(pub(crate) RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// How long a destination whose route refused a GSO send gets single datagrams: routes and
/// path MTUs change (the kernel forgets a learned path MTU after 10 minutes too).
pub const NO_GSO_FOR: Duration = Duration::from_secs(600);
/// Destinations one socket remembers sending to without GSO; beyond, the one remembered
/// longest is forgotten (its next GSO send fails once more, and it is remembered again).
pub const NO_GSO_DESTINATIONS: usize = 4096;

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
            no_gso: RefCell::new(FxHashMap::default()),
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

    /// Whether this kernel takes GSO sends.
    pub fn gso(&self) -> bool {
        self.gso.get()
    }

    /// Whether sends to `to` may use GSO now.
    #[inline]
    pub(crate) fn gso_to(&self, to: SocketAddr) -> bool {
        if !self.gso.get() {
            return false;
        }
        let no = self.no_gso.borrow();
        if no.is_empty() {
            return true;
        }
        no.get(&to)
            .is_none_or(|since| since.elapsed() >= NO_GSO_FOR)
    }

    /// The route to `to` refused a GSO send: single datagrams there for [`NO_GSO_FOR`].
    pub(crate) fn without_gso_to(&self, to: SocketAddr) {
        let mut no = self.no_gso.borrow_mut();
        let now = Instant::now();
        if no.len() >= NO_GSO_DESTINATIONS && !no.contains_key(&to) {
            no.retain(|_, since| now.duration_since(*since) < NO_GSO_FOR);
            if no.len() >= NO_GSO_DESTINATIONS {
                if let Some(oldest) = no.iter().min_by_key(|(_, since)| **since).map(|(a, _)| *a) {
                    no.remove(&oldest);
                }
            }
        }
        no.insert(to, now);
    }

    /// Makes every remembered refusal `by` older (for tests of the expiry).
    #[cfg(test)]
    pub(crate) fn age_without_gso(&self, by: Duration) {
        for since in self.no_gso.borrow_mut().values_mut() {
            *since = since.checked_sub(by).unwrap_or(*since);
        }
    }

    /// Destinations sent to without GSO now (for tests).
    pub fn without_gso(&self) -> usize {
        self.no_gso
            .borrow()
            .values()
            .filter(|since| since.elapsed() < NO_GSO_FOR)
            .count()
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
