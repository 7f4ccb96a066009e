//! `sendmmsg` with GSO: [`TxQueue`] for the relay's shards, [`SendBatch`] for the load
//! generator.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use crate::{RawAddr, UdpSock, BATCH, TX_MAX};

/// Most datagrams one GSO send carries (the kernel's UDP_MAX_SEGMENTS).
const GSO_SEGMENTS: usize = 64;
/// Most bytes one GSO send carries (a UDP datagram's limit, less headers).
const GSO_BYTES: usize = 65_000;

/// What a failed send means for the message that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendFault {
    /// The socket buffer is full: the rest of this flush on the socket is dropped, as a
    /// router would (the flows took turns, so what is left is the biggest flows' tail).
    Full,
    /// The route refused the GSO send (EIO: its device cannot segment or checksum; a segment
    /// above the path MTU: EMSGSIZE, or EINVAL on older kernels): the destination gets single datagrams for a while
    /// ([`NO_GSO_FOR`](crate::NO_GSO_FOR)), and the message goes again as single datagrams
    /// (which the kernel may fragment).
    NoGso,
    /// The destination refused (unreachable, not permitted, too large...): the message is
    /// dropped and the socket's other messages go on.
    Destination,
}

fn fault(e: &io::Error, gso: bool) -> SendFault {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => SendFault::Full,
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE) if gso => SendFault::NoGso,
        _ => SendFault::Destination,
    }
}

struct Entry {
    sock: Rc<UdpSock>,
    to: SocketAddr,
    /// Whose datagram it is: flows of one socket take turns.
    flow: u64,
    start: usize,
    len: usize,
    /// Queue order, so sorting keeps each flow's order.
    seq: u32,
}

/// Datagrams waiting for the end of the event-loop turn.
pub struct TxQueue {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
    /// GSO sends made, and refused by the kernel, for tests and profiles.
    gso_sends: u64,
    gso_refused: u64,
    /// Datagrams dropped because a socket buffer was full, since the last [`TxQueue::take_dropped`].
    dropped: u64,
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
/// to one destination, as one GSO send when `count > 1`; `credit` is the bytes its flow has
/// queued on the socket up to and with it, which orders the messages of the socket's flows.
#[derive(Clone, Copy)]
struct Msg {
    first: usize,
    count: usize,
    credit: usize,
    flow: u64,
}

/// The datagrams of `msgs`.
fn count(msgs: &[Msg]) -> u64 {
    msgs.iter().map(|m| m.count as u64).sum()
}

#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

impl TxQueue {
    pub fn new() -> TxQueue {
        TxQueue {
            bytes: Vec::with_capacity(64 * 1024),
            entries: Vec::with_capacity(TX_MAX),
            gso_sends: 0,
            gso_refused: 0,
            dropped: 0,
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

    /// GSO sends the kernel refused (each then went as single datagrams).
    pub fn gso_refused(&self) -> u64 {
        self.gso_refused
    }

    /// Datagrams a full socket buffer dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Queues a copy of `data` for `to` on `sock`, as part of `flow` (an allocation, or a
    /// destination: see [`TxQueue::flush`]).
    pub fn push(&mut self, sock: &Rc<UdpSock>, to: SocketAddr, flow: u64, data: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let seq = self.entries.len() as u32;
        self.entries.push(Entry {
            sock: Rc::clone(sock),
            to,
            flow,
            start,
            len: data.len(),
            seq,
        });
    }

    /// Sends everything queued: one `sendmmsg` per socket (more past [`BATCH`] messages).
    /// Each flow's datagrams leave in order, and a socket's flows take turns by the bytes
    /// each queued (every flow's first message, then the smallest flows' next...): when the
    /// socket buffer fills, the rest of the socket's datagrams are dropped, as a router
    /// would, and those are the tails of the flows that queued the most.
    pub fn flush(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        self.entries
            .sort_unstable_by_key(|e| (Rc::as_ptr(&e.sock) as usize, e.flow, e.to, e.seq));
        let mut msgs = std::mem::take(&mut self.msgs);
        let mut i = 0;
        while i < self.entries.len() {
            let sock = Rc::as_ptr(&self.entries[i].sock);
            let mut j = i;
            msgs.clear();
            let (mut flow, mut credit) = (None, 0);
            while j < self.entries.len() && Rc::as_ptr(&self.entries[j].sock) == sock {
                let e = &self.entries[j];
                if flow != Some(e.flow) {
                    (flow, credit) = (Some(e.flow), 0);
                }
                let flow_id = e.flow;
                let count = self.run_len(j);
                credit += self.entries[j..j + count]
                    .iter()
                    .map(|e| e.len)
                    .sum::<usize>();
                msgs.push(Msg {
                    first: j,
                    count,
                    credit,
                    flow: flow_id,
                });
                j += count;
            }
            // By the bytes each flow will have queued once the message is out (so a small
            // flow's datagram goes before a big flow's first GSO send); stable within a
            // flow, whose credits only grow.
            msgs.sort_unstable_by_key(|m| (m.credit, m.flow, m.first));
            let sock = Rc::clone(&self.entries[i].sock);
            let _ = self.send_all(&sock, &msgs);
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

    /// Sends `msgs` in order; false when the socket buffer filled and the rest was dropped.
    fn send_all(&mut self, sock: &UdpSock, msgs: &[Msg]) -> bool {
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
                        SendFault::Full => {
                            self.dropped += count(&msgs[done..]);
                            return false;
                        }
                        SendFault::Destination => {}
                        SendFault::NoGso => {
                            self.gso_refused += 1;
                            sock.without_gso_to(self.entries[m.first].to);
                            let singles: Vec<Msg> = (m.first..m.first + m.count)
                                .map(|first| Msg {
                                    first,
                                    count: 1,
                                    ..m
                                })
                                .collect();
                            if !self.send_all(sock, &singles) {
                                self.dropped += count(&msgs[done + 1..]);
                                return false;
                            }
                        }
                    }
                    done += 1;
                }
            }
        }
        true
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
        self.addrs.push(to.map(RawAddr::new));
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
                    (msgs[i].msg_hdr.msg_name, msgs[i].msg_hdr.msg_namelen) = a.as_mut_parts();
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
