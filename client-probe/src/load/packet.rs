//! What a load packet carries, how it is framed for the relay, and what the sender learns from
//! each echo. No IO here.

use std::net::SocketAddr;

use turnpike_proto::stun::{self, attr, method, Builder, Class, Message, TransactionId};

/// Bytes of the load header at the start of every payload.
pub const HEADER: usize = 24;
const MAGIC: [u8; 4] = *b"TPld";
/// A packet on its way out, to be echoed.
pub const PROBE: u8 = 0;
/// A packet on its way back to its sender.
pub const ECHO: u8 = 1;
/// Sequence numbers remembered for duplicate detection, per flow.
const WINDOW: u64 = 1 << 16;

/// `magic(4) kind(1) flow(3) seq(8) sent_ns(8)`, then zero padding up to the payload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    /// The sending allocation's index (24 bits).
    pub flow: u32,
    pub seq: u64,
    /// Send time in nanoseconds since the run's epoch.
    pub sent_ns: u64,
}

impl Header {
    /// Appends a payload of `size` (at least [`HEADER`]) bytes.
    pub fn write(&self, size: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.push(self.kind);
        out.extend_from_slice(&self.flow.to_be_bytes()[1..]);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.sent_ns.to_be_bytes());
        out.resize(out.len() + size.saturating_sub(HEADER), 0);
    }

    pub fn read(p: &[u8]) -> Option<Header> {
        if p.len() < HEADER || p[..4] != MAGIC {
            return None;
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(Header {
            kind: p[4],
            flow: u32::from_be_bytes([0, p[5], p[6], p[7]]),
            seq: u64_at(8),
            sent_ns: u64_at(16),
        })
    }
}

/// Marks a payload as an echo, in place.
pub fn set_echo(p: &mut [u8]) {
    if p.len() >= HEADER && p[..4] == MAGIC {
        p[4] = ECHO;
    }
}

/// How payloads travel to the relay.
#[derive(Debug, Clone)]
pub enum Framing {
    /// Bare datagrams (a forwarder without TURN, the benchmark's floor).
    Raw,
    /// ChannelData on `number`; `pad` to four bytes on streams (RFC 8656 §12.5).
    Channel { number: u16, pad: bool },
    /// Send indications to a peer: the message up to the DATA value, reused for every packet.
    Send { prefix: Vec<u8> },
}

/// What arrived from the relay.
pub enum Incoming<'a> {
    Payload(&'a [u8]),
    /// A STUN message other than a Data indication (a response to a refresh).
    Stun(Box<Message<'a>>),
    Other,
}

impl Framing {
    /// Send indications to `peer` carrying `size`-byte payloads.
    pub fn send_indication(peer: SocketAddr, size: usize) -> Framing {
        let mut buf = Vec::new();
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        tid[4..].copy_from_slice(&rand::random::<[u8; 12]>());
        Builder::new(
            &mut buf,
            Class::Indication,
            method::SEND,
            TransactionId(tid),
        )
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, &vec![0u8; size]);
        let padded = (size + 3) & !3;
        buf.truncate(buf.len() - padded);
        Framing::Send { prefix: buf }
    }

    /// Appends one framed packet whose payload `payload` writes (exactly `size` bytes).
    pub fn frame(&self, size: usize, out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
        let pad = match self {
            Framing::Raw => false,
            Framing::Channel { number, pad } => {
                out.extend_from_slice(&number.to_be_bytes());
                out.extend_from_slice(&(size as u16).to_be_bytes());
                *pad
            }
            Framing::Send { prefix } => {
                out.extend_from_slice(prefix);
                true
            }
        };
        let start = out.len();
        payload(out);
        debug_assert_eq!(out.len() - start, size);
        if pad {
            out.resize(out.len() + (4 - size % 4) % 4, 0);
        }
    }

    /// The payload of one datagram or stream frame from the relay.
    pub fn unwrap<'a>(&self, d: &'a [u8]) -> Incoming<'a> {
        if matches!(self, Framing::Raw) {
            return Incoming::Payload(d);
        }
        if stun::is_channel_data(d) {
            return match stun::channel_data_header(d) {
                Some((_, len)) => Incoming::Payload(&d[4..4 + len]),
                None => Incoming::Other,
            };
        }
        let Ok(msg) = Message::parse(d) else {
            return Incoming::Other;
        };
        if msg.class() == Class::Indication && msg.method() == method::DATA {
            return match msg.get(attr::DATA) {
                Some(data) => Incoming::Payload(data),
                None => Incoming::Other,
            };
        }
        Incoming::Stun(Box::new(msg))
    }
}

/// What one flow (allocation) learns from its echoes.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    pub sent: u64,
    pub received: u64,
    /// Echoes older than one already received.
    pub reordered: u64,
    pub duplicates: u64,
    /// Smoothed interarrival jitter (RFC 3550 §6.4.1), nanoseconds.
    pub jitter_ns: f64,
    /// Round-trip times not yet merged into the run's histogram, microseconds.
    pub rtts_us: Vec<u64>,
    max_seq: Option<u64>,
    /// Bit `seq % WINDOW` is set once `seq` (within WINDOW of the highest) has arrived.
    seen: Vec<u64>,
    last_transit: Option<i64>,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            seen: vec![0; (WINDOW / 64) as usize],
            ..Tracker::default()
        }
    }

    fn bit(&mut self, seq: u64) -> (&mut u64, u64) {
        let i = seq % WINDOW;
        (&mut self.seen[(i / 64) as usize], 1 << (i % 64))
    }

    /// An echo of this flow's packet `seq`, sent at `sent_ns`, back at `now_ns`.
    pub fn on_echo(&mut self, seq: u64, sent_ns: u64, now_ns: u64) {
        match self.max_seq {
            Some(max) if seq <= max => {
                if max - seq >= WINDOW {
                    // Too old to tell a duplicate from a late arrival: count it as late.
                    self.reordered += 1;
                } else {
                    let (word, mask) = self.bit(seq);
                    if *word & mask != 0 {
                        self.duplicates += 1;
                        return;
                    }
                    *word |= mask;
                    self.reordered += 1;
                }
            }
            _ => {
                // Forget what the window held for the sequence numbers skipped over.
                let from = self.max_seq.map_or(0, |m| m + 1);
                for s in from..seq.min(from + WINDOW) {
                    let (word, mask) = self.bit(s);
                    *word &= !mask;
                }
                let (word, mask) = self.bit(seq);
                *word |= mask;
                self.max_seq = Some(seq);
            }
        }
        self.received += 1;
        let rtt_ns = now_ns.saturating_sub(sent_ns);
        self.rtts_us.push((rtt_ns / 1000).max(1));
        let transit = now_ns as i64 - sent_ns as i64;
        if let Some(last) = self.last_transit {
            let d = (transit - last).unsigned_abs() as f64;
            self.jitter_ns += (d - self.jitter_ns) / 16.0;
        }
        self.last_transit = Some(transit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_every_size() {
        for size in [HEADER, 100, 1200] {
            let h = Header {
                kind: PROBE,
                flow: 0x00AB_CDEF,
                seq: 1 << 40,
                sent_ns: 123_456_789,
            };
            let mut out = Vec::new();
            h.write(size, &mut out);
            assert_eq!(out.len(), size);
            assert_eq!(Header::read(&out), Some(h));
            set_echo(&mut out);
            assert_eq!(Header::read(&out).map(|h| h.kind), Some(ECHO));
        }
        assert_eq!(Header::read(&[0u8; 40]), None);
    }

    #[test]
    fn frames_unwrap_to_their_payload() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        for framing in [
            Framing::Raw,
            Framing::Channel {
                number: 0x4001,
                pad: true,
            },
            Framing::Channel {
                number: 0x4001,
                pad: false,
            },
        ] {
            let mut out = Vec::new();
            framing.frame(30, &mut out, |o| o.extend_from_slice(&[7u8; 30]));
            let Incoming::Payload(p) = framing.unwrap(&out) else {
                panic!("{framing:?}: no payload");
            };
            assert_eq!(p, &[7u8; 30]);
        }
        // A Send indication parses as STUN with the payload in DATA.
        let framing = Framing::send_indication(peer, 30);
        let mut out = Vec::new();
        framing.frame(30, &mut out, |o| o.extend_from_slice(&[9u8; 30]));
        let msg = Message::parse(&out).expect("Send indication parses");
        assert_eq!(msg.method(), method::SEND);
        assert_eq!(msg.get(attr::DATA), Some(&[9u8; 30][..]));
        assert_eq!(
            msg.get(attr::XOR_PEER_ADDRESS)
                .and_then(|v| msg.xor_address(v)),
            Some(peer)
        );
    }

    #[test]
    fn tracker_counts_reordering_duplicates_and_jitter() {
        let mut t = Tracker::new();
        // Sequence 0, 2, 1, 1 (a duplicate), 3; transit alternates 1 ms and 3 ms.
        t.on_echo(0, 0, 1_000_000);
        t.on_echo(2, 10_000_000, 13_000_000);
        t.on_echo(1, 5_000_000, 6_000_000);
        t.on_echo(1, 5_000_000, 7_000_000);
        t.on_echo(3, 20_000_000, 23_000_000);
        assert_eq!(t.received, 4);
        assert_eq!(t.reordered, 1);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.rtts_us, vec![1000, 3000, 1000, 3000]);
        // |D| = 2 ms three times: J = 2 ms * (1 - (15/16)^3).
        let want = 2e6 * (1.0 - (15.0f64 / 16.0).powi(3));
        assert!((t.jitter_ns - want).abs() < 1.0, "{}", t.jitter_ns);
    }

    #[test]
    fn the_window_forgets_old_sequence_numbers() {
        let mut t = Tracker::new();
        t.on_echo(5, 0, 1);
        t.on_echo(5 + WINDOW, 0, 1);
        // 5 + WINDOW reused 5's bit; a fresh arrival one window later is not a duplicate.
        t.on_echo(5 + 2 * WINDOW, 0, 1);
        t.on_echo(6 + WINDOW, 0, 1);
        assert_eq!((t.received, t.duplicates, t.reordered), (4, 0, 1));
    }
}
