//! The relay sockets of an allocation: bound where the core says ([`RelayBind`]), reported
//! back with [`Core::relay_bound`] (a port another process holds sends the core drawing
//! again), read by the shard's relay loop (UDP) or a task of their own (an RFC 6062 listening
//! socket), and closed when the core frees the allocation.
//!
//! [`Core::relay_bound`]: turnpike_proto::Core::relay_bound

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use turnpike_proto::{AllocId, BindFailure, BindOutcome, RelayBind};
use turnpike_udp::socket::{bind_udp, set_dont_fragment};
use turnpike_udp::{PollRegistry, UdpSock};

use super::state::{relay_token, RelaySlot, Shard};
use super::{sockets, tcp_relay, Ended};

pub(super) const RELAY_SOCKET_BUFFER: usize = 1 << 20;

/// What binding produced, before the allocation is live.
enum Bound {
    Udp(Option<Rc<UdpSock>>, Option<Rc<UdpSock>>),
    Tcp(tokio::net::TcpListener, SocketAddr),
}

impl Shard {
    /// Binds what the core asked for an Allocate, reports back (drawing again while ports are
    /// taken), and on success starts reading the sockets. The answer is left in `out`.
    pub(super) fn allocate(self: &Rc<Self>, mut bind: RelayBind) {
        loop {
            let bound = if bind.shared {
                Ok(Bound::Udp(
                    bind.v4.and_then(|a| self.shared_socket(a)),
                    bind.v6.and_then(|a| self.shared_socket(a)),
                ))
            } else {
                bind_sockets(&bind, &self.registry)
            };
            let report = bound.as_ref().map(|_| ()).map_err(|e| *e);
            let outcome = self.core.borrow_mut().relay_bound(
                bind.alloc,
                report,
                Instant::now(),
                &mut self.out.borrow_mut(),
            );
            match outcome {
                BindOutcome::Retry(next) => bind = next,
                BindOutcome::Answer => {
                    if let (Ok(bound), true) =
                        (bound, self.core.borrow().relayed(bind.alloc).is_some())
                    {
                        self.install(bind.alloc, bound, bind.shared);
                    }
                    return;
                }
            }
        }
    }

    fn install(self: &Rc<Self>, id: AllocId, bound: Bound, shared: bool) {
        let mut slot = RelaySlot {
            id,
            v4: None,
            v6: None,
            shared,
            tcp: None,
            tcp_listener: None,
            tasks: Vec::new(),
            ended: Arc::new(Ended::default()),
        };
        match bound {
            Bound::Udp(v4, v6) => {
                slot.v4 = v4;
                slot.v6 = v6;
            }
            Bound::Tcp(listener, addr) => {
                let listener = Rc::new(listener);
                slot.tcp = Some(addr);
                slot.tcp_listener = Some(Rc::clone(&listener));
                slot.tasks
                    .push(tokio::task::spawn_local(tcp_relay::accept_peers(
                        Rc::clone(self),
                        id,
                        listener,
                    )));
            }
        }
        let mut relays = self.relays.borrow_mut();
        if relays.len() <= id.index() {
            relays.resize_with(id.index() + 1, || None);
        }
        relays[id.index()] = Some(slot);
        if let Some(s) = &relays[id.index()] {
            let addr = |s: &Option<Rc<UdpSock>>| s.as_ref()?.get_ref().local_addr().ok();
            tracing::debug!(
                alloc = id.index(),
                v4 = ?addr(&s.v4),
                v6 = ?addr(&s.v6),
                tcp = ?s.tcp,
                "allocation created"
            );
        }
    }
}

/// Binds the sockets of `bind`: UDP relay sockets (with DONT-FRAGMENT where asked), or an RFC
/// 6062 listening socket.
fn bind_sockets(bind: &RelayBind, registry: &PollRegistry) -> Result<Bound, BindFailure> {
    let failure = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            BindFailure::InUse
        } else {
            tracing::warn!(error = %e, "cannot bind a relay socket");
            BindFailure::Other
        }
    };
    if bind.tcp {
        let addr = bind.v4.or(bind.v6).ok_or(BindFailure::Other)?;
        let listener = sockets::tcp_relay_listener(addr)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(failure)?;
        return Ok(Bound::Tcp(listener, addr));
    }
    // Added to the shard's poller here, before the answer goes out: a failure refuses the
    // allocation rather than advertising a port nothing reads. (A socket the core then turns
    // down leaves the poller when it closes.)
    let one = |addr: Option<SocketAddr>| -> Result<Option<Rc<UdpSock>>, BindFailure> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let sock = bind_udp(addr, false, RELAY_SOCKET_BUFFER).map_err(failure)?;
        // RFC 8656 §7.2: DONT-FRAGMENT the relay cannot honour is refused.
        if bind.dont_fragment {
            set_dont_fragment(&sock).map_err(|e| {
                tracing::warn!(error = %e, "DONT-FRAGMENT cannot be set: 420");
                BindFailure::DontFragment
            })?;
        }
        let sock = UdpSock::unregistered(sock);
        registry
            .add(&sock, relay_token(bind.alloc, addr.is_ipv6()))
            .map_err(|e| {
                tracing::warn!(error = %e, "relay socket not registered");
                BindFailure::Other
            })?;
        Ok(Some(Rc::new(sock)))
    };
    Ok(Bound::Udp(one(bind.v4)?, one(bind.v6)?))
}
