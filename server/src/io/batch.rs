//! Batched UDP system calls for the shard loops.
//!
//! On loopback a relay's CPU goes almost all to the kernel, and per datagram rather than per
//! byte: profiling the shard threads under `turnpike-probe load` (20 allocations x 1000
//! packets/s) put 94% of their samples in the kernel (sendto/recvfrom, routing, socket
//! wake-ups) and 6% in the relay's own code. A bare forwarder with one recv and one send per
//! datagram spends 5.3-6.3 us per datagram here, as much as coturn; the same forwarder with
//! `recvmmsg` and one GSO send per batch spends 2.75-3.0 us. With this module the relay's CPU
//! per million relayed datagrams under `turnutils_uclient -y -m 20 -n 3000` fell from 4.92 s
//! to 2.5 s (coturn: 5.6-6.2 s); see BENCHMARKS.md. So:
//!
//! - [`RecvBatch`] reads up to [`BATCH`] datagrams per `recvmmsg`, each at an offset of
//!   [`HEADROOM`] bytes so a ChannelData header can be written in front without a copy.
//! - [`TxQueue`] collects what the shard sends during one event-loop turn and leaves with one
//!   `sendmmsg` per socket; datagrams of one size to one destination go as a single GSO send
//!   (`UDP_SEGMENT`), which the kernel splits after routing them once.
//!
//! Written here rather than taken from `quinn-udp`, the maintained crate for batched UDP,
//! because that crate sends one transmit (one destination) per `sendmsg`, while a relay
//! socket's datagrams of one event-loop turn go to many clients and peers: one `sendmmsg`
//! for all of them is what took the figures above from 4.92 s to 2.5 s.

use std::cell::Cell;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use tokio::io::unix::AsyncFd;

/// A non-blocking UDP socket registered with the shard's reactor, and where it sends without
/// GSO: to a destination whose route's device cannot segment (EIO), and not at all once
/// [`NO_GSO_DESTINATIONS`] destinations did so (the socket's own device, then).
pub struct UdpSock {
    fd: AsyncFd<std::net::UdpSocket>,
    gso: Cell<bool>,
    no_gso: std::cell::RefCell<Vec<SocketAddr>>,
}

/// Destinations one socket remembers sending to without GSO before it stops using GSO.
pub const NO_GSO_DESTINATIONS: usize = 64;

impl std::ops::Deref for UdpSock {
    type Target = AsyncFd<std::net::UdpSocket>;

    fn deref(&self) -> &Self::Target {
        &self.fd
    }
}

impl UdpSock {
    /// Whether sends on this socket may use GSO.
    pub fn gso(&self) -> bool {
        self.gso.get()
    }

    /// Whether sends to `to` may use GSO.
    fn gso_to(&self, to: SocketAddr) -> bool {
        if !self.gso.get() {
            return false;
        }
        let no = self.no_gso.borrow();
        no.is_empty() || !no.contains(&to)
    }

    /// The route to `to` cannot segment: send there without GSO from now on.
    fn without_gso_to(&self, to: SocketAddr) {
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
    // SAFETY: a std UdpSocket owns its descriptor: it stays open, and `as_raw_fd` returns the
    // same one, until the socket is dropped with the AsyncFd that owns it.
    let fd = unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    Ok(UdpSock {
        fd,
        gso: Cell::new(kernel_has_gso()),
        no_gso: std::cell::RefCell::new(Vec::new()),
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

/// What a failed send means for the message that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFault {
    /// The socket buffer is full: the rest of this flush is dropped, as a router would.
    Full,
    /// The route's device cannot segment (EIO): this socket sends to that destination without
    /// GSO from now on, and the message goes again as single datagrams.
    NoOffload,
    /// The segments do not suit this path (EINVAL: a segment above the path MTU, say): the
    /// message goes again as single datagrams, which the kernel may fragment.
    Unsegmentable,
    /// The destination refused (unreachable, not permitted, too large...): the message is
    /// dropped and the socket's other messages go on.
    Destination,
}

fn fault(e: &io::Error, gso: bool) -> SendFault {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => SendFault::Full,
        Some(libc::EIO) if gso => SendFault::NoOffload,
        Some(libc::EINVAL) if gso => SendFault::Unsegmentable,
        _ => SendFault::Destination,
    }
}

/// Datagrams per `recvmmsg` and messages per `sendmmsg`.
pub const BATCH: usize = 64;
/// Bytes kept free before each received datagram.
pub const HEADROOM: usize = 4;
/// Most datagrams one GSO send carries (the kernel's UDP_MAX_SEGMENTS).
const GSO_SEGMENTS: usize = 64;
/// Most bytes one GSO send carries (a UDP datagram's limit, less headers).
const GSO_BYTES: usize = 65_000;
/// Datagrams queued before the queue is flushed without waiting for the end of the turn.
pub const TX_MAX: usize = 1024;

/// A socket address in the C layout the batched calls take.
#[derive(Clone, Copy)]
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub fn empty() -> RawAddr {
        RawAddr {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid (AF_UNSPEC) value.
            storage: unsafe { zeroed() },
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    pub fn new(addr: SocketAddr) -> RawAddr {
        let mut raw = RawAddr::empty();
        let ptr = &mut raw.storage as *mut libc::sockaddr_storage;
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
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in.
                unsafe { std::ptr::write(ptr.cast(), sin) };
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
                // SAFETY: sockaddr_storage is larger than, and aligned for, sockaddr_in6.
                unsafe { std::ptr::write(ptr.cast(), sin6) };
                raw.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            }
        }
        raw
    }

    /// The pointer and length a `msghdr` takes as its `msg_name`.
    pub fn as_mut_parts(&mut self) -> (*mut libc::c_void, libc::socklen_t) {
        (
            (&mut self.storage as *mut libc::sockaddr_storage).cast(),
            self.len,
        )
    }

    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ptr = &self.storage as *const libc::sockaddr_storage;
        match i32::from(self.storage.ss_family) {
            libc::AF_INET if self.len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in for AF_INET.
                let sin: libc::sockaddr_in = unsafe { std::ptr::read(ptr.cast()) };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the kernel wrote a sockaddr_in6 for AF_INET6.
                let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read(ptr.cast()) };
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

/// Buffers for one `recvmmsg`: [`BATCH`] slots of `HEADROOM + max` bytes. The buffer is
/// zero-initialised lazily by the allocator, so only the pages datagrams touch become resident.
pub struct RecvBatch {
    buf: Vec<u8>,
    slot: usize,
    lens: [usize; BATCH],
    addrs: Box<[RawAddr; BATCH]>,
    n: usize,
}

impl RecvBatch {
    /// Slots for datagrams of up to `max` bytes (longer ones are truncated).
    pub fn new(max: usize) -> RecvBatch {
        let slot = HEADROOM + max;
        RecvBatch {
            buf: vec![0u8; slot * BATCH],
            slot,
            lens: [0; BATCH],
            addrs: Box::new([RawAddr::empty(); BATCH]),
            n: 0,
        }
    }

    /// Reads up to [`BATCH`] datagrams without blocking: `WouldBlock` when none waits. Fewer
    /// than [`BATCH`] means the socket's queue was empty when the call returned.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are plain data; every entry passed is filled in below.
        let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let base = self.buf.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * slot + HEADROOM lies inside `buf`, which holds BATCH slots.
            iov[i].iov_base = unsafe { base.add(i * self.slot + HEADROOM) }.cast();
            iov[i].iov_len = self.slot - HEADROOM;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name =
                (&mut self.addrs[i].storage as *mut libc::sockaddr_storage).cast();
            msgs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: each mmsghdr points at its own live iovec over a distinct region of `buf`
        // and at its own sockaddr_storage; all outlive the call.
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
            self.lens[i] = (m.msg_len as usize).min(self.slot - HEADROOM);
            self.addrs[i].len = m.msg_hdr.msg_namelen;
        }
        Ok(self.n)
    }

    /// How many datagrams the last call read.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Datagram `i` of the last call.
    pub fn payload(&self, i: usize) -> &[u8] {
        let start = i * self.slot + HEADROOM;
        &self.buf[start..start + self.lens[i]]
    }

    /// Datagram `i`, writable.
    pub fn payload_mut(&mut self, i: usize) -> &mut [u8] {
        let start = i * self.slot + HEADROOM;
        &mut self.buf[start..start + self.lens[i]]
    }

    /// Slot `i` with its headroom (the datagram starts at [`HEADROOM`]), and the datagram's
    /// length.
    pub fn slot_mut(&mut self, i: usize) -> (&mut [u8], usize) {
        let start = i * self.slot;
        (&mut self.buf[start..start + self.slot], self.lens[i])
    }

    /// The sender of datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        self.addrs[i].socket_addr()
    }
}

struct Entry {
    sock: Rc<UdpSock>,
    to: SocketAddr,
    start: usize,
    len: usize,
    /// Queue order, so sorting by socket and destination keeps each flow's order.
    seq: u32,
}

/// Datagrams waiting for the end of the event-loop turn.
pub struct TxQueue {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    /// GSO sends made, for tests and profiles.
    gso_sends: u64,
    /// Scratch space for the system calls, kept so a flush allocates nothing once warm.
    msgs: Vec<Msg>,
    iov: Vec<libc::iovec>,
    addrs: Vec<RawAddr>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Default for TxQueue {
    fn default() -> Self {
        TxQueue::new()
    }
}

/// One message of a `sendmmsg` call: `count` datagrams from `first` (in the sorted entries)
/// to one destination, as one GSO send when `count > 1`.
#[derive(Clone, Copy)]
struct Msg {
    first: usize,
    count: usize,
}

#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

impl TxQueue {
    pub fn new() -> TxQueue {
        TxQueue {
            bytes: Vec::with_capacity(64 * 1024),
            entries: Vec::with_capacity(TX_MAX),
            gso_sends: 0,
            msgs: Vec::with_capacity(BATCH),
            iov: Vec::with_capacity(BATCH * GSO_SEGMENTS),
            addrs: Vec::with_capacity(BATCH),
            cmsgs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// GSO sends made so far.
    pub fn gso_sends(&self) -> u64 {
        self.gso_sends
    }

    /// Queues a copy of `data` for `to` on `sock`.
    pub fn push(&mut self, sock: &Rc<UdpSock>, to: SocketAddr, data: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let seq = self.entries.len() as u32;
        self.entries.push(Entry {
            sock: Rc::clone(sock),
            to,
            start,
            len: data.len(),
            seq,
        });
    }

    /// Sends everything queued: one `sendmmsg` per socket (more past [`BATCH`] messages).
    /// Datagrams a full socket buffer refuses are dropped, as a router would.
    pub fn flush(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        self.entries
            .sort_unstable_by_key(|e| (Rc::as_ptr(&e.sock) as usize, e.to, e.seq));
        let mut msgs = std::mem::take(&mut self.msgs);
        let mut i = 0;
        while i < self.entries.len() {
            let sock = Rc::as_ptr(&self.entries[i].sock);
            let mut j = i;
            msgs.clear();
            while j < self.entries.len() && Rc::as_ptr(&self.entries[j].sock) == sock {
                let count = self.run_len(j);
                msgs.push(Msg { first: j, count });
                j += count;
            }
            let sock = Rc::clone(&self.entries[i].sock);
            self.send_all(&sock, &msgs);
            i = j;
        }
        self.msgs = msgs;
        self.entries.clear();
        self.bytes.clear();
    }

    /// How many datagrams from `at` can leave as one GSO send: same socket, destination and
    /// size.
    fn run_len(&self, at: usize) -> usize {
        let first = &self.entries[at];
        if !first.sock.gso_to(first.to) {
            return 1;
        }
        let limit = GSO_SEGMENTS.min(GSO_BYTES / first.len.max(1));
        let mut n = 1;
        while n < limit {
            let Some(e) = self.entries.get(at + n) else {
                break;
            };
            if !Rc::ptr_eq(&e.sock, &first.sock) || e.to != first.to || e.len != first.len {
                break;
            }
            n += 1;
        }
        n
    }

    fn send_all(&mut self, sock: &UdpSock, msgs: &[Msg]) {
        let fd = sock.get_ref().as_raw_fd();
        let mut done = 0;
        while done < msgs.len() {
            let chunk = &msgs[done..msgs.len().min(done + BATCH)];
            let result = self.sendmmsg(fd, chunk);
            if let Ok(sent) = result {
                self.gso_sends += chunk[..sent].iter().filter(|m| m.count > 1).count() as u64;
            }
            match result {
                Ok(sent) if sent > 0 => done += sent,
                // The first message failed: the fault decides for it alone.
                Ok(_) => done += 1,
                Err(e) => {
                    let m = chunk[0];
                    match fault(&e, m.count > 1) {
                        SendFault::Full => return,
                        SendFault::Destination => {}
                        SendFault::NoOffload | SendFault::Unsegmentable => {
                            if fault(&e, true) == SendFault::NoOffload {
                                sock.without_gso_to(self.entries[m.first].to);
                            }
                            let singles: Vec<Msg> = (m.first..m.first + m.count)
                                .map(|first| Msg { first, count: 1 })
                                .collect();
                            self.send_all(sock, &singles);
                        }
                    }
                    done += 1;
                }
            }
        }
    }

    fn sendmmsg(&mut self, fd: RawFd, chunk: &[Msg]) -> io::Result<usize> {
        let (iov, addrs, cmsgs, hdrs) = (
            &mut self.iov,
            &mut self.addrs,
            &mut self.cmsgs,
            &mut self.hdrs,
        );
        iov.clear();
        addrs.clear();
        cmsgs.clear();
        for m in chunk {
            for e in &self.entries[m.first..m.first + m.count] {
                iov.push(libc::iovec {
                    iov_base: self.bytes[e.start..].as_ptr() as *mut libc::c_void,
                    iov_len: e.len,
                });
            }
            addrs.push(RawAddr::new(self.entries[m.first].to));
            cmsgs.push(CmsgBuf([0; 32]));
        }
        hdrs.clear();
        // SAFETY: mmsghdr is plain data; every field used is set below.
        hdrs.resize(chunk.len(), unsafe { zeroed() });
        let mut next_iov = 0;
        for (k, m) in chunk.iter().enumerate() {
            let h = &mut hdrs[k].msg_hdr;
            h.msg_iov = iov[next_iov..].as_mut_ptr();
            h.msg_iovlen = m.count as _;
            next_iov += m.count;
            (h.msg_name, h.msg_namelen) = addrs[k].as_mut_parts();
            if m.count > 1 {
                let seg = self.entries[m.first].len as u16;
                // SAFETY: CMSG_SPACE of a u16 (24 bytes) fits the 32-byte, 8-aligned buffer;
                // CMSG_FIRSTHDR of a msghdr whose control buffer is that size is non-null.
                unsafe {
                    h.msg_control = cmsgs[k].0.as_mut_ptr().cast();
                    h.msg_controllen = libc::CMSG_SPACE(size_of::<u16>() as u32) as _;
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
                }
            }
        }
        // SAFETY: every header points at iovecs over `self.bytes`, an address and a control
        // buffer, all alive and unmoved until the call returns; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registered socket; needs the runtime of a `#[tokio::test]`.
    fn sock() -> Rc<UdpSock> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_nonblocking(true).expect("nonblocking");
        Rc::new(register(s).expect("register"))
    }

    /// Receives until `want` datagrams arrived (bounded).
    fn receive(to: &std::net::UdpSocket, want: usize) -> Vec<(Vec<u8>, SocketAddr)> {
        to.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < want {
            let Ok((n, from)) = to.recv_from(&mut buf) else {
                break;
            };
            got.push((buf[..n].to_vec(), from));
        }
        got
    }

    #[tokio::test(flavor = "current_thread")]
    async fn gso_runs_and_single_datagrams_arrive_whole_and_in_order() {
        let a = sock();
        let b = sock();
        let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let y = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (xa, ya) = (x.local_addr().expect("addr"), y.local_addr().expect("addr"));
        let mut q = TxQueue::new();
        // Interleaved: a run of equal sizes to x from a (one GSO send), a shorter one, and
        // datagrams to y from a and b.
        for i in 0..10u8 {
            q.push(&a, xa, &[i; 100]);
            q.push(&b, ya, &[100 + i; 7]);
        }
        q.push(&a, xa, &[42; 30]);
        q.push(&a, ya, &[43; 100]);
        q.flush();
        assert!(q.is_empty());
        let at_x = receive(&x, 11);
        let want_x: Vec<Vec<u8>> = (0..10u8)
            .map(|i| vec![i; 100])
            .chain([vec![42; 30]])
            .collect();
        assert_eq!(
            at_x.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
            want_x
        );
        let from_a = a.get_ref().local_addr().expect("addr");
        assert!(at_x.iter().all(|(_, from)| *from == from_a));
        let at_y = receive(&y, 11);
        assert_eq!(at_y.len(), 11);
        let from_b: Vec<Vec<u8>> = at_y
            .iter()
            .filter(|(_, f)| *f == b.get_ref().local_addr().expect("addr"))
            .map(|(d, _)| d.clone())
            .collect();
        assert_eq!(
            from_b,
            (0..10u8).map(|i| vec![100 + i; 7]).collect::<Vec<_>>()
        );
        assert!(a.gso() && q.gso_sends() > 0, "loopback takes GSO sends");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_route_that_cannot_segment_loses_gso_for_itself_alone() {
        let a = sock();
        let bad: SocketAddr = "127.0.0.2:9".parse().expect("addr");
        let good: SocketAddr = "127.0.0.3:9".parse().expect("addr");
        a.without_gso_to(bad);
        assert!(!a.gso_to(bad) && a.gso_to(good) && a.gso());
        // Many such destinations: the socket's own device cannot segment, then.
        for i in 0..NO_GSO_DESTINATIONS as u16 {
            a.without_gso_to(SocketAddr::from(([127, 0, 1, 1], 1000 + i)));
        }
        assert!(!a.gso() && !a.gso_to(good));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_destination_that_refuses_leaves_gso_and_the_other_datagrams_alone() {
        let a = sock();
        let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = x.local_addr().expect("addr");
        // Loopback's broadcast address refuses a socket without SO_BROADCAST (EACCES), and
        // port 0 is no destination (EINVAL): nothing leaves for either.
        let refused: [SocketAddr; 2] = [
            "127.255.255.255:9".parse().expect("addr"),
            "127.0.0.1:0".parse().expect("addr"),
        ];
        let mut q = TxQueue::new();
        for round in 0..2u8 {
            for bad in refused {
                for _ in 0..5 {
                    q.push(&a, bad, &[0xEE; 100]);
                }
            }
            for i in 0..10u8 {
                q.push(&a, to, &[round * 10 + i; 100]);
            }
            q.flush();
        }
        let got: Vec<Vec<u8>> = receive(&x, 20).into_iter().map(|(d, _)| d).collect();
        assert_eq!(got, (0..20u8).map(|i| vec![i; 100]).collect::<Vec<_>>());
        assert!(
            a.gso(),
            "a refused destination turned GSO off for the socket"
        );
        assert!(q.gso_sends() >= 2, "the good runs did not go as GSO sends");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn equal_datagrams_from_two_sockets_keep_their_source() {
        let (a, b) = (sock(), sock());
        let x = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = x.local_addr().expect("addr");
        let mut q = TxQueue::new();
        for i in 0..8u8 {
            q.push(&a, to, &[i; 50]);
            q.push(&b, to, &[i; 50]);
        }
        q.flush();
        let got = receive(&x, 16);
        for s in [&a, &b] {
            let from = s.get_ref().local_addr().expect("addr");
            let data: Vec<Vec<u8>> = got
                .iter()
                .filter(|(_, f)| *f == from)
                .map(|(d, _)| d.clone())
                .collect();
            assert_eq!(data, (0..8u8).map(|i| vec![i; 50]).collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_is_read_with_headroom_and_sources() {
        let rx = sock();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.get_ref().local_addr().expect("addr");
        for i in 0..5u8 {
            tx.send_to(&[i; 9], to).expect("send");
        }
        let mut batch = RecvBatch::new(2048);
        let mut got = Vec::new();
        for _ in 0..200 {
            match batch.recv(rx.get_ref().as_raw_fd()) {
                Ok(n) => (0..n).for_each(|i| {
                    assert_eq!(batch.source(i), tx.local_addr().ok());
                    let payload = batch.payload(i).to_vec();
                    let (slot, len) = batch.slot_mut(i);
                    assert_eq!(slot[HEADROOM..HEADROOM + len], payload[..]);
                    got.push(payload);
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got.len() < 5 => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => break,
            }
            if got.len() == 5 {
                break;
            }
        }
        assert_eq!(got, (0..5u8).map(|i| vec![i; 9]).collect::<Vec<_>>());
    }
}
