//! `recvmmsg` batches, read at an offset that leaves room for a ChannelData header.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::{RawAddr, BATCH, HEADROOM};

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
