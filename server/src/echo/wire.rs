//! The echo wire format, sans IO: how a request becomes its reply.
//!
//! A reply is always exactly as long as its request. A request of at least 64 bytes that
//! starts with `TPEQ` is tagged: its reply starts with `TPER`, keeps bytes 4..16 (the client's
//! sequence number and timestamp), and carries from byte 16 the source address the echo saw,
//! as ASCII `ip:port` (`[ip]:port` for IPv6), zero-padded to the end. Anything else comes back
//! unchanged. On a stream the same holds for each 64-byte block at a 64-byte-aligned offset
//! from the start of the connection.

use std::io::Write;
use std::net::SocketAddr;

/// First four bytes of a tagged request.
pub const REQUEST_TAG: &[u8; 4] = b"TPEQ";
/// First four bytes of a tagged reply.
pub const REPLY_TAG: &[u8; 4] = b"TPER";
/// Shortest tagged request, and the block size on streams.
pub const BLOCK: usize = 64;
/// Where the address text starts in a tagged reply.
pub const ADDR_OFFSET: usize = 16;

/// Turns a request into its reply in place; true when it was a tagged request.
pub fn rewrite(buf: &mut [u8], from: SocketAddr) -> bool {
    if buf.len() < BLOCK || &buf[..4] != REQUEST_TAG {
        return false;
    }
    buf[..4].copy_from_slice(REPLY_TAG);
    let n = write_addr(&mut buf[ADDR_OFFSET..], from);
    buf[ADDR_OFFSET + n..].fill(0);
    true
}

/// Writes `ip:port` (`[ip]:port` for IPv6, without a scope id; an IPv4-mapped address as the
/// IPv4 address it carries) into `out`; returns the length. At most 47 bytes, so it always
/// fits in a 64-byte block after the 16-byte header.
pub fn write_addr(out: &mut [u8], from: SocketAddr) -> usize {
    let ip = from.ip().to_canonical();
    let total = out.len();
    let mut cursor = &mut out[..];
    let written = match ip {
        std::net::IpAddr::V4(v4) => write!(cursor, "{v4}:{}", from.port()),
        std::net::IpAddr::V6(v6) => write!(cursor, "[{v6}]:{}", from.port()),
    };
    debug_assert!(written.is_ok(), "an address fits in 48 bytes");
    total - cursor.len()
}

/// The address text as a string, as [`write_addr`] writes it.
pub fn addr_text(from: SocketAddr) -> String {
    let mut buf = [0u8; 64];
    let n = write_addr(&mut buf, from);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A datagram that must not be answered: one that is itself an echo reply (answering it could
/// ping-pong between two echo services forever), or one from a privileged source port (real
/// clients send from ephemeral ports; a spoofed source of port 7, 19, 53, 123… would make the
/// echo bounce traffic into another service).
pub fn refused(datagram: &[u8], from: SocketAddr) -> bool {
    from.port() < 1024 || datagram.starts_with(REPLY_TAG)
}

/// The echo of one stream: bytes come back as they arrived, except that each 64-byte block
/// starting with `TPEQ` at a 64-byte-aligned offset is rewritten as a tagged request is.
///
/// Bytes are held back only while they may still become a tagged block (they are a prefix of
/// `TPEQ`, or start with it and the block is not yet complete); [`StreamEcho::flush`] gives
/// them back unchanged when the client goes quiet, and the rest of that block then passes
/// through unchanged too. Output length always equals input length.
#[derive(Debug)]
pub struct StreamEcho {
    block: [u8; BLOCK],
    /// Offset within the current block.
    pos: usize,
    /// The current block is passed through untouched (not a tagged block, or flushed early).
    passing: bool,
}

impl Default for StreamEcho {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamEcho {
    pub fn new() -> Self {
        StreamEcho {
            block: [0; BLOCK],
            pos: 0,
            passing: false,
        }
    }

    /// Bytes held back, waiting to see whether they form a tagged block.
    pub fn held(&self) -> usize {
        if self.passing {
            0
        } else {
            self.pos
        }
    }

    /// Appends the echo of `input` to `out`.
    pub fn feed(&mut self, mut input: &[u8], from: SocketAddr, out: &mut Vec<u8>) {
        while !input.is_empty() {
            let n = (BLOCK - self.pos).min(input.len());
            let (now, rest) = input.split_at(n);
            input = rest;
            if self.passing {
                out.extend_from_slice(now);
                self.advance(n);
                continue;
            }
            self.block[self.pos..self.pos + n].copy_from_slice(now);
            self.pos += n;
            let k = self.pos.min(4);
            if self.block[..k] != REQUEST_TAG[..k] {
                out.extend_from_slice(&self.block[..self.pos]);
                self.passing = true;
                self.advance(0);
            } else if self.pos == BLOCK {
                rewrite(&mut self.block, from);
                out.extend_from_slice(&self.block);
                self.pos = 0;
            }
        }
    }

    /// Gives back the held bytes unchanged (the client went quiet or closed); the rest of the
    /// current block will pass through unchanged.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.passing && self.pos > 0 {
            out.extend_from_slice(&self.block[..self.pos]);
            self.passing = true;
        }
    }

    fn advance(&mut self, n: usize) {
        self.pos += n;
        if self.pos == BLOCK {
            self.pos = 0;
            self.passing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> SocketAddr {
        "203.0.113.7:40000".parse().expect("addr")
    }

    fn tagged(len: usize, seq: u8) -> Vec<u8> {
        let mut b = vec![0xAA; len];
        b[..4].copy_from_slice(REQUEST_TAG);
        b[4..16].fill(seq);
        b
    }

    #[test]
    fn tagged_request_carries_the_source_address() {
        let mut b = tagged(64, 9);
        assert!(rewrite(&mut b, v4()));
        assert_eq!(b.len(), 64);
        assert_eq!(&b[..4], REPLY_TAG);
        assert_eq!(&b[4..16], &[9; 12]);
        let text = b"203.0.113.7:40000";
        assert_eq!(&b[16..16 + text.len()], text);
        assert!(b[16 + text.len()..].iter().all(|&x| x == 0));
    }

    #[test]
    fn replies_are_never_larger_than_requests() {
        let from: SocketAddr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .expect("addr");
        for len in 0..200 {
            let mut plain = vec![0u8; len];
            assert!(!rewrite(&mut plain, from));
            assert_eq!(
                plain,
                vec![0u8; len],
                "untagged datagrams come back unchanged"
            );
            let mut t = vec![0u8; len];
            let k = len.min(4);
            t[..k].copy_from_slice(&REQUEST_TAG[..k]);
            let before = t.clone();
            let was = rewrite(&mut t, from);
            assert_eq!(t.len(), len);
            assert_eq!(was, len >= BLOCK);
            if !was {
                assert_eq!(t, before);
            }
        }
    }

    #[test]
    fn short_or_untagged_requests_are_unchanged() {
        let mut short = tagged(63, 1);
        let before = short.clone();
        assert!(!rewrite(&mut short, v4()));
        assert_eq!(short, before);
        let mut other = vec![b'x'; 100];
        assert!(!rewrite(&mut other, v4()));
        assert_eq!(other, vec![b'x'; 100]);
    }

    #[test]
    fn ipv6_is_bracketed_and_mapped_ipv4_is_plain() {
        let longest: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
            .parse()
            .expect("addr");
        assert_eq!(
            addr_text(longest),
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
        );
        assert!(ADDR_OFFSET + addr_text(longest).len() < BLOCK);
        assert_eq!(
            addr_text("[2001:db8::1]:5055".parse().expect("addr")),
            "[2001:db8::1]:5055"
        );
        assert_eq!(
            addr_text("[::ffff:198.51.100.2]:1234".parse().expect("addr")),
            "198.51.100.2:1234"
        );
        let mut b = tagged(80, 3);
        assert!(rewrite(&mut b, "[::1]:9".parse().expect("addr")));
        assert_eq!(&b[16..24], b"[::1]:9\0");
        assert!(b[23..].iter().all(|&x| x == 0));
    }

    #[test]
    fn replies_and_privileged_ports_are_refused() {
        assert!(refused(b"TPER....", v4()));
        assert!(refused(b"hello", "198.51.100.1:53".parse().expect("addr")));
        assert!(!refused(b"hello", v4()));
        assert!(!refused(&tagged(64, 0), v4()));
    }

    fn stream_echo(chunks: &[&[u8]]) -> Vec<u8> {
        let mut e = StreamEcho::new();
        let mut out = Vec::new();
        for c in chunks {
            e.feed(c, v4(), &mut out);
        }
        e.flush(&mut out);
        out
    }

    #[test]
    fn stream_rewrites_aligned_blocks_whatever_the_chunking() {
        let mut input = tagged(64, 1);
        input.extend_from_slice(&[b'z'; 64]);
        input.extend(tagged(64, 2));
        input.extend_from_slice(b"tail");
        let mut expected = input.clone();
        rewrite(&mut expected[..64], v4());
        rewrite(&mut expected[128..192], v4());
        for split in [1, 3, 5, 63, 64, 65, 100, 1000] {
            let chunks: Vec<&[u8]> = input.chunks(split).collect();
            assert_eq!(stream_echo(&chunks), expected, "chunks of {split}");
        }
    }

    #[test]
    fn stream_leaves_misaligned_tags_and_passes_other_bytes_at_once() {
        let mut e = StreamEcho::new();
        let mut out = Vec::new();
        e.feed(b"hello", v4(), &mut out);
        assert_eq!(out, b"hello", "untagged bytes are not held back");
        assert_eq!(e.held(), 0);
        let mut rest = tagged(64, 4);
        rest.truncate(59);
        e.feed(&rest, v4(), &mut out);
        assert_eq!(out.len(), 64, "a tag at offset 5 is not a block");
        let mut next = tagged(64, 5);
        e.feed(&next[..10], v4(), &mut out);
        assert_eq!(e.held(), 10, "a possible tagged block is held");
        e.feed(&next[10..], v4(), &mut out);
        assert_eq!(out.len(), 128);
        rewrite(&mut next, v4());
        assert_eq!(&out[64..], &next[..]);
    }

    #[test]
    fn stream_flush_gives_held_bytes_back_unchanged() {
        let mut e = StreamEcho::new();
        let mut out = Vec::new();
        let block = tagged(64, 6);
        e.feed(&block[..20], v4(), &mut out);
        assert!(out.is_empty());
        e.flush(&mut out);
        assert_eq!(out, &block[..20]);
        e.feed(&block[20..], v4(), &mut out);
        assert_eq!(out, block, "the rest of a flushed block passes unchanged");
        e.feed(&block, v4(), &mut out);
        assert_eq!(&out[64..68], REPLY_TAG, "the next block is aligned again");
    }
}
