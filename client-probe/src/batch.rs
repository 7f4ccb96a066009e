//! Batched UDP system calls for the load generator: `recvmmsg` and `sendmmsg` move up to
//! [`BATCH`] datagrams per call, so the generator spends its CPU on the relay's traffic rather
//! than on one system call per packet.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per system call.
pub const BATCH: usize = 64;

/// A socket address in the C layout `sendmmsg` and `recvmmsg` take.
#[derive(Clone, Copy)]
struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    fn empty() -> RawAddr {
        RawAddr {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (AF_UNSPEC) value.
            storage: unsafe { zeroed() },
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    fn from_socket(addr: SocketAddr) -> RawAddr {
        let mut raw = RawAddr::empty();
        match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe {
                    std::ptr::write(
                        (&mut raw.storage as *mut libc::sockaddr_storage).cast(),
                        sin,
                    )
                };
                raw.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe {
                    std::ptr::write(
                        (&mut raw.storage as *mut libc::sockaddr_storage).cast(),
                        sin6,
                    )
                };
                raw.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }

    fn socket_addr(&self) -> Option<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
                let sin: libc::sockaddr_in = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
                let sin6: libc::sockaddr_in6 = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Receive buffers for one `recvmmsg` call: [`BATCH`] slots of `slot` bytes each.
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    lens: [usize; BATCH],
    addrs: [RawAddr; BATCH],
    n: usize,
}

impl RecvBatch {
    pub fn new(slot: usize) -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; slot * BATCH],
            slot,
            lens: [0; BATCH],
            addrs: [RawAddr::empty(); BATCH],
            n: 0,
        }
    }

    /// Reads up to [`BATCH`] datagrams from a non-blocking socket: `WouldBlock` when none is
    /// waiting. Datagrams longer than a slot are truncated.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut iov: [libc::iovec; BATCH] =
            // SAFETY: iovec is plain data; every entry used is filled in below.
            unsafe { zeroed() };
        // SAFETY: as above for mmsghdr.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..BATCH {
            self.addrs[i] = RawAddr::empty();
            iov[i].iov_base = self.buf[i * self.slot..].as_mut_ptr().cast();
            iov[i].iov_len = self.slot;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name =
                (&mut self.addrs[i].storage as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = self.addrs[i].len;
        }
        // SAFETY: every mmsghdr points at a live iovec over a distinct `slot`-byte region of
        // `self.buf` and at a distinct sockaddr_storage, all outliving the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            self.n = 0;
            return Err(io::Error::last_os_error());
        }
        self.n = n as usize;
        for (i, m) in msgs.iter().enumerate().take(self.n) {
            self.lens[i] = (m.msg_len as usize).min(self.slot);
            self.addrs[i].len = m.msg_hdr.msg_namelen;
        }
        Ok(self.n)
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i` of the last call, writable (an echo rewrites it in place).
    pub fn datagram_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * self.slot;
        &mut self.buf[start..start + self.lens[i]]
    }

    /// The sender of datagram `i` (None on a connected socket that reports none).
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.addrs[i].socket_addr()
    }
}

/// Datagrams queued for one `sendmmsg` call, each with an optional destination.
pub struct SendBatch {
    buf: Vec<u8>,
    ranges: Vec<(usize, usize)>,
    addrs: Vec<Option<RawAddr>>,
}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch::new()
    }
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch {
            buf: Vec::with_capacity(BATCH * 256),
            ranges: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
        }
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.ranges.len() >= BATCH
    }

    /// Appends one datagram, built by `write` into the batch's own buffer (no copy).
    pub fn push_with(&mut self, to: Option<SocketAddr>, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        write(&mut self.buf);
        self.ranges.push((start, self.buf.len()));
        self.addrs.push(to.map(RawAddr::from_socket));
    }

    /// Sends every queued datagram. Returns how many the kernel took; the rest are dropped
    /// when the socket buffer is full (`WouldBlock`), as a router would. The batch is
    /// emptied either way.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<usize> {
        let total = self.ranges.len();
        let mut done = 0;
        let mut result = Ok(());
        while done < total {
            let n = (total - done).min(BATCH);
            let mut iov: [libc::iovec; BATCH] =
                // SAFETY: iovec is plain data; the entries used are filled in below.
                unsafe { zeroed() };
            // SAFETY: as above for mmsghdr.
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
            for i in 0..n {
                let (s, e) = self.ranges[done + i];
                iov[i].iov_base = self.buf[s..].as_mut_ptr().cast();
                iov[i].iov_len = e - s;
                msgs[i].msg_hdr.msg_iov = &mut iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
                if let Some(a) = &mut self.addrs[done + i] {
                    msgs[i].msg_hdr.msg_name =
                        (&mut a.storage as *mut libc::sockaddr_storage).cast();
                    msgs[i].msg_hdr.msg_namelen = a.len;
                }
            }
            // SAFETY: each mmsghdr points at a live iovec over a range of `self.buf` and, when
            // set, at a live sockaddr; none is freed or moved before the call returns.
            let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
            if sent < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    result = Err(e);
                }
                break;
            }
            done += sent as usize;
            if (sent as usize) < n {
                // The socket buffer filled up part-way through: drop the rest.
                break;
            }
        }
        self.buf.clear();
        self.ranges.clear();
        self.addrs.clear();
        result.map(|()| done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_crosses_loopback_with_its_sources() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        b.set_nonblocking(true).expect("nonblocking");
        let to = b.local_addr().expect("addr");
        let mut out = SendBatch::new();
        for i in 0..10u8 {
            out.push_with(Some(to), |buf| buf.extend_from_slice(&[i; 5]));
        }
        assert_eq!(out.flush(a.as_raw_fd()).expect("send"), 10);
        assert!(out.is_empty());
        let mut got = Vec::new();
        let mut batch = RecvBatch::new(64);
        for _ in 0..100 {
            match batch.recv(b.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        assert_eq!(batch.source(i), a.local_addr().ok());
                        got.push(batch.datagram_mut(i).to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got.len() == 10 => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let want: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 5]).collect();
        assert_eq!(got, want);
    }
}
