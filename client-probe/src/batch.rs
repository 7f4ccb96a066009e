//! Batched UDP system calls for the load generator: `recvmmsg` (the relay's own
//! [`RecvBatch`]) and `sendmmsg` move up to [`BATCH`] datagrams per call, so the generator
//! spends its CPU on the relay's traffic rather than on one system call per packet.

use std::io;
use std::mem::zeroed;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use turnpike::io::batch::RawAddr;
pub use turnpike::io::batch::{RecvBatch, BATCH};

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
                        got.push(batch.payload(i).to_vec());
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
