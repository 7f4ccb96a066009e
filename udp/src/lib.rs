//! Batched UDP IO for the Turnpike relay and its probe: `recvmmsg` and `sendmmsg` batches,
//! UDP GSO, and the socket options a relay needs.
//!
//! On loopback a relay's CPU goes almost all to the kernel, and per datagram rather than per
//! byte: profiling the shard threads under `turnpike-probe load` (20 allocations x 1000
//! packets/s) put 94% of their samples in the kernel (sendto/recvfrom, routing, socket
//! wake-ups) and 6% in the relay's own code. A bare forwarder with one recv and one send per
//! datagram spends 5.3-6.3 us per datagram here, as much as coturn; the same forwarder with
//! `recvmmsg` and one GSO send per batch spends 2.75-3.0 us. With these batches the relay's
//! CPU per million relayed datagrams under `turnutils_uclient -y -m 20 -n 3000` fell from
//! 4.92 s to 2.5 s (coturn: 5.6-6.2 s); see BENCHMARKS.md. So:
//!
//! - [`RecvBatch`] reads up to [`BATCH`] datagrams per `recvmmsg`, each at an offset of
//!   [`HEADROOM`] bytes so a ChannelData header can be written in front without a copy.
//! - [`TxQueue`] collects what a shard sends during one event-loop turn and leaves with one
//!   `sendmmsg` per socket; datagrams of one size to one destination go as a single GSO send
//!   (`UDP_SEGMENT`), which the kernel splits after routing them once. A failed send affects
//!   its own message only, and the flows of one socket (an allocation's datagrams, or one
//!   destination's) take turns by bytes, so a full socket buffer drops the biggest flow's
//!   tail, not its neighbours'.
//! - [`SendBatch`] is the load generator's simpler `sendmmsg` batch, one socket at a time.
//! - [`UdpSock`] is a socket, registered with tokio's reactor for readability or not, which
//!   remembers for a while the destinations whose route refused GSO; [`socket`] binds relay and listener sockets with their
//!   options.
//! - [`Poller`] watches many unregistered sockets through one epoll set, so one task reads
//!   every ready relay socket of a shard in one turn of the event loop.
//!
//! Written here rather than taken from `quinn-udp`, the maintained crate for batched UDP,
//! because that crate sends one transmit (one destination) per `sendmsg`, while a relay
//! socket's datagrams of one event-loop turn go to many clients and peers: one `sendmmsg`
//! for all of them is what took the figures above from 4.92 s to 2.5 s.

mod addr;
mod poll;
mod recv;
mod send;
pub mod socket;

pub use addr::RawAddr;
pub use poll::{PollRegistry, Poller};
pub use recv::RecvBatch;
pub use send::{SendBatch, TxQueue};
pub use socket::{kernel_has_gso, register, UdpSock, NO_GSO_DESTINATIONS, NO_GSO_FOR};

/// Datagrams per `recvmmsg` and messages per `sendmmsg`.
pub const BATCH: usize = 64;
/// Bytes kept free before each received datagram.
pub const HEADROOM: usize = 4;
/// Datagrams queued before the queue is flushed without waiting for the end of the turn.
pub const TX_MAX: usize = 1024;

#[cfg(test)]
mod tests;
