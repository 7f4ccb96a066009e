//! `measure --capture FILE.pcapng`: every packet the probe sent and received, for IT to open
//! in Wireshark.
//!
//! Each probed path is one interface of the file, named after the region and path. UDP paths
//! are recorded as the datagrams that went out and came in; TCP and TLS paths as the bytes
//! each write and read carried on the TCP connection (for TLS, the TLS records, as on the
//! wire), each as one segment with the connection's real addresses, ports and sequence
//! numbers. The kernel's own packets (handshakes, acknowledgements, retransmissions) are not
//! there: the probe sees what its sockets carry, not the wire, so a capture file needs no
//! privileges. Addresses and timestamps are the real ones, packets in time order across paths.
//! Every path's verdict is in the file: the section's comment lists them all, each path's
//! interface carries its own (a path that sent nothing too), and so does the first packet of
//! each path. The file format and the headers are written by the `pcap-file` and `etherparse`
//! crates.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes one recorded segment carries: an IP packet's limit, less the headers.
const MAX_SEGMENT: usize = 65_000;
/// Packets kept per path (a bandwidth test sends many): at most about 20 MB of each path's
/// payloads in memory; the rest are counted and named in the path's comment.
pub const MAX_PER_PATH: usize = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Udp,
    Tcp,
}

#[derive(Debug)]
struct Packet {
    time: Duration,
    src: SocketAddr,
    dst: SocketAddr,
    proto: Proto,
    /// TCP: sequence and acknowledgement numbers.
    seq: u32,
    ack: u32,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Trace {
    region: String,
    path: String,
    packets: Vec<Packet>,
    /// Packets beyond [`MAX_PER_PATH`], not kept.
    left_out: u64,
}

/// What a measurement run captured, path by path.
#[derive(Debug, Default)]
pub struct Capture {
    traces: Mutex<Vec<Trace>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Capture {
    pub fn new() -> Arc<Self> {
        Arc::new(Capture::default())
    }

    /// A trace for one path of one region: where its connections record.
    pub fn path(self: &Arc<Self>, region: &str, path: &str) -> PathCapture {
        let mut traces = lock(&self.traces);
        traces.push(Trace {
            region: region.to_owned(),
            path: path.to_owned(),
            packets: Vec::new(),
            left_out: 0,
        });
        PathCapture {
            capture: Arc::clone(self),
            index: traces.len() - 1,
        }
    }

    fn push(&self, index: usize, packet: Packet) {
        if let Some(t) = lock(&self.traces).get_mut(index) {
            if t.packets.len() < MAX_PER_PATH {
                t.packets.push(packet);
            } else {
                t.left_out += 1;
            }
        }
    }

    /// Packets captured so far.
    pub fn count(&self) -> usize {
        lock(&self.traces).iter().map(|t| t.packets.len()).sum()
    }

    /// Writes the pcapng file: an interface per path probed, each with `verdict`'s text for
    /// the path as its comment (paths that sent nothing too: a refused connection, a proxy
    /// that could not be reached), every verdict in the section's comment as well (Wireshark:
    /// Statistics, Capture File Properties), and on the first packet of each path. Packets
    /// are in time order across paths. Returns the packets written.
    pub fn write(
        &self,
        out: impl std::io::Write,
        verdict: impl Fn(&str, &str) -> String,
    ) -> Result<usize, String> {
        let traces = lock(&self.traces);
        let verdicts: Vec<String> = traces
            .iter()
            .map(|t| format!("{} {}: {}", t.region, t.path, verdict(&t.region, &t.path)))
            .collect();
        let section = SectionHeaderBlock {
            options: vec![
                SectionHeaderOption::Comment(Cow::Owned(format!(
                    "turnpike-probe: what each path's sockets sent and received, and what was \
                     found on each path:\n{}",
                    verdicts.join("\n")
                ))),
                SectionHeaderOption::UserApplication(Cow::Owned(format!(
                    "turnpike-probe {}",
                    env!("CARGO_PKG_VERSION")
                ))),
            ],
            ..Default::default()
        };
        let mut w = PcapNgWriter::with_section_header(out, section).map_err(|e| e.to_string())?;
        for (t, said) in traces.iter().zip(&verdicts) {
            let more = if t.left_out > 0 {
                format!(
                    " ({} more packets of this path not kept: the capture keeps {MAX_PER_PATH})",
                    t.left_out
                )
            } else if t.packets.is_empty() {
                " (no packet: nothing of this path crossed its sockets)".to_owned()
            } else {
                String::new()
            };
            w.write_pcapng_block(InterfaceDescriptionBlock {
                linktype: DataLink::RAW,
                snaplen: 0,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Owned(format!(
                        "{} {}",
                        t.region, t.path
                    ))),
                    InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                        "turnpike-probe: what this path's sockets sent and received",
                    )),
                    InterfaceDescriptionOption::Comment(Cow::Owned(format!("{said}{more}"))),
                    // The timestamps are written in nanoseconds.
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            })
            .map_err(|e| e.to_string())?;
        }
        // Every path's packets in one time order (stable: a path's own order is kept).
        let mut all: Vec<(usize, usize, &Packet)> = traces
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.packets.iter().enumerate().map(move |(n, p)| (i, n, p)))
            .collect();
        all.sort_by_key(|(_, _, p)| p.time);
        let mut written = 0;
        for (interface, n, p) in all {
            let data = ip_packet(p)?;
            let options = if n == 0 {
                vec![EnhancedPacketOption::Comment(Cow::Owned(
                    verdicts[interface].clone(),
                ))]
            } else {
                Vec::new()
            };
            w.write_pcapng_block(EnhancedPacketBlock {
                interface_id: interface as u32,
                timestamp: p.time,
                original_len: data.len() as u32,
                data: Cow::Owned(data),
                options,
            })
            .map_err(|e| e.to_string())?;
            written += 1;
        }
        Ok(written)
    }
}

/// An IPv4 or IPv6 packet with its UDP or TCP header around the payload.
fn ip_packet(p: &Packet) -> Result<Vec<u8>, String> {
    use etherparse::PacketBuilder;
    let ip = match (p.src, p.dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            PacketBuilder::ipv4(s.ip().octets(), d.ip().octets(), 64)
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            PacketBuilder::ipv6(s.ip().octets(), d.ip().octets(), 64)
        }
        _ => return Err("a packet between address families".into()),
    };
    let mut out = Vec::new();
    let written = match p.proto {
        Proto::Udp => ip
            .udp(p.src.port(), p.dst.port())
            .write(&mut out, &p.payload)
            .map_err(|e| e.to_string()),
        Proto::Tcp => ip
            .tcp(p.src.port(), p.dst.port(), p.seq, 65_535)
            .ack(p.ack)
            .psh()
            .write(&mut out, &p.payload)
            .map_err(|e| e.to_string()),
    };
    written.map(|()| out)
}

/// Where one path records.
#[derive(Debug, Clone)]
pub struct PathCapture {
    capture: Arc<Capture>,
    index: usize,
}

impl PathCapture {
    /// A UDP socket's datagrams between `local` and `remote`.
    pub fn udp(&self, local: SocketAddr, remote: SocketAddr) -> UdpTap {
        UdpTap {
            path: self.clone(),
            local,
            remote,
        }
    }

    fn record(&self, packet: Packet) {
        self.capture.push(self.index, packet);
    }
}

/// Records a UDP socket's datagrams.
#[derive(Debug, Clone)]
pub struct UdpTap {
    path: PathCapture,
    local: SocketAddr,
    remote: SocketAddr,
}

impl UdpTap {
    pub fn sent(&self, payload: &[u8]) {
        self.datagram(self.local, self.remote, payload);
    }

    /// A datagram received from `from` (the relay, or a peer through it).
    pub fn received(&self, from: SocketAddr, payload: &[u8]) {
        self.datagram(from, self.local, payload);
    }

    fn datagram(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        self.path.record(Packet {
            time: now(),
            src,
            dst,
            proto: Proto::Udp,
            seq: 0,
            ack: 0,
            payload: payload.to_vec(),
        });
    }
}

/// A TCP stream that records what each write and read carried, as segments of the
/// connection between `local` and `remote`.
pub struct TapStream<S> {
    inner: S,
    path: Option<PathCapture>,
    local: SocketAddr,
    remote: SocketAddr,
    /// Next sequence numbers of each direction (relative, from 1, as Wireshark shows them).
    out_seq: u32,
    in_seq: u32,
}

impl TapStream<tokio::net::TcpStream> {
    /// `tcp`, recording into `path` when there is one.
    pub fn tcp(tcp: tokio::net::TcpStream, path: Option<&PathCapture>) -> Self {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        TapStream {
            local: tcp.local_addr().unwrap_or(unspecified),
            remote: tcp.peer_addr().unwrap_or(unspecified),
            inner: tcp,
            path: path.cloned(),
            out_seq: 1,
            in_seq: 1,
        }
    }
}

impl<S> TapStream<S> {
    fn segment(&mut self, outgoing: bool, bytes: &[u8]) {
        let Some(path) = self.path.clone() else {
            return;
        };
        for chunk in bytes.chunks(MAX_SEGMENT) {
            let (src, dst, seq, ack) = if outgoing {
                (self.local, self.remote, self.out_seq, self.in_seq)
            } else {
                (self.remote, self.local, self.in_seq, self.out_seq)
            };
            path.record(Packet {
                time: now(),
                src,
                dst,
                proto: Proto::Tcp,
                seq,
                ack,
                payload: chunk.to_vec(),
            });
            let n = chunk.len() as u32;
            if outgoing {
                self.out_seq = self.out_seq.wrapping_add(n);
            } else {
                self.in_seq = self.in_seq.wrapping_add(n);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TapStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let got = buf.filled()[before..].to_vec();
            if !got.is_empty() {
                self.segment(false, &got);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TapStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            let n = *n;
            self.segment(true, &data[..n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_keeps_at_most_its_share_and_says_how_many_it_left_out() {
        let c = Capture::new();
        let p = c.path("r", "turn-udp");
        let a: SocketAddr = "127.0.0.1:4000".parse().expect("a");
        let b: SocketAddr = "127.0.0.1:3478".parse().expect("a");
        let tap = p.udp(a, b);
        for _ in 0..MAX_PER_PATH + 5 {
            tap.sent(b"x");
        }
        let mut out = Vec::new();
        let n = c.write(&mut out, |_, _| "open".into()).expect("writes");
        assert_eq!(n, MAX_PER_PATH);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("5 more packets of this path not kept"),
            "no note"
        );
    }

    #[test]
    fn every_path_is_an_interface_with_its_verdict_and_packets_are_in_time_order() {
        let c = Capture::new();
        let (udp, tcp, quiet) = (
            c.path("r", "turn-udp"),
            c.path("r", "turn-tcp"),
            c.path("r", "turn-tls"),
        );
        let a: SocketAddr = "127.0.0.1:4000".parse().expect("a");
        let b: SocketAddr = "127.0.0.1:3478".parse().expect("b");
        let (u, t) = (udp.udp(a, b), tcp.udp(a, b));
        u.sent(b"1");
        t.sent(b"2");
        u.sent(b"3");
        drop(quiet);
        let mut out = Vec::new();
        let n = c
            .write(&mut out, |_, path| format!("verdict of {path}"))
            .expect("writes");
        assert_eq!(n, 3);
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&out[..]).expect("reads");
        let (mut interfaces, mut order) = (Vec::new(), Vec::new());
        while let Some(block) = reader.next_block() {
            match block.expect("a block") {
                pcap_file::pcapng::Block::InterfaceDescription(i) => interfaces.push(
                    i.options
                        .iter()
                        .find_map(|o| match o {
                            InterfaceDescriptionOption::Comment(c) => Some(c.to_string()),
                            _ => None,
                        })
                        .expect("a comment"),
                ),
                pcap_file::pcapng::Block::EnhancedPacket(p) => {
                    order.push((p.interface_id, p.data[p.data.len() - 1]))
                }
                _ => {}
            }
        }
        assert_eq!(interfaces.len(), 3, "{interfaces:?}");
        assert!(
            interfaces[2].starts_with("r turn-tls: verdict of turn-tls (no packet"),
            "{interfaces:?}"
        );
        assert_eq!(order, [(0, b'1'), (1, b'2'), (0, b'3')]);
        let section = String::from_utf8_lossy(&out);
        assert!(
            section.contains("r turn-tls: verdict of turn-tls"),
            "the section lists it"
        );
    }
}
