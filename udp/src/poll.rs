//! One readiness source for all the relay sockets of a shard: an epoll set of its own (mio's
//! `Poll`), whose descriptor alone is registered with tokio's reactor. A shard's one relay task
//! waits on it and reads, in one turn of the event loop, every socket that became readable,
//! instead of one task per socket each woken, polled and scheduled by the reactor on its own.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use tokio::io::unix::AsyncFd;

use crate::socket::Fd;
use crate::UdpSock;

/// Readiness events taken from the set per call.
const EVENTS: usize = 1024;

/// Waits for any of the sockets added through its [`PollRegistry`]; reports their tokens.
pub struct Poller {
    /// Declared before `poll`, so it is deregistered before the set's descriptor closes.
    reactor: AsyncFd<Fd>,
    poll: Poll,
    events: Events,
}

/// Adds and removes sockets of a [`Poller`] (a handle on the same epoll set).
pub struct PollRegistry(Registry);

impl Poller {
    pub fn new() -> io::Result<(Poller, PollRegistry)> {
        let poll = Poll::new()?;
        let registry = PollRegistry(poll.registry().try_clone()?);
        // SAFETY: the set's descriptor stays open while `reactor` lives: `poll` owns it and
        // is dropped after `reactor` (field order).
        let reactor = unsafe {
            AsyncFd::register_with_interest(Fd(poll.as_raw_fd()), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok((
            Poller {
                reactor,
                poll,
                events: Events::with_capacity(EVENTS),
            },
            registry,
        ))
    }

    /// Waits until a socket is readable, then appends the tokens of all that are.
    pub async fn wait(&mut self, ready: &mut Vec<usize>) -> io::Result<()> {
        loop {
            let mut guard = self.reactor.readable().await?;
            let n = take(&mut self.poll, &mut self.events, ready)?;
            // Fewer than a full set of events: the set is drained, and a socket made readable
            // later raises the set's readiness again (a new edge for the reactor).
            if n < EVENTS {
                guard.clear_ready();
            }
            if n > 0 {
                return Ok(());
            }
        }
    }

    /// Appends the tokens of the sockets readable now, without waiting; returns their count.
    pub fn take(&mut self, ready: &mut Vec<usize>) -> io::Result<usize> {
        take(&mut self.poll, &mut self.events, ready)
    }
}

fn take(poll: &mut Poll, events: &mut Events, ready: &mut Vec<usize>) -> io::Result<usize> {
    match poll.poll(events, Some(Duration::ZERO)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
        Err(e) => return Err(e),
    }
    let before = ready.len();
    ready.extend(events.iter().map(|e| e.token().0));
    Ok(ready.len() - before)
}

impl PollRegistry {
    /// Watches `sock` for readability (edge-triggered: a reader drains it, or remembers that
    /// it did not), reported as `token`.
    pub fn add(&self, sock: &UdpSock, token: usize) -> io::Result<()> {
        self.0.register(
            &mut SourceFd(&sock.as_raw_fd()),
            Token(token),
            Interest::READABLE,
        )
    }

    /// Stops watching `sock` (closing it would too, once nothing else holds it open).
    pub fn remove(&self, sock: &UdpSock) {
        let _ = self.0.deregister(&mut SourceFd(&sock.as_raw_fd()));
    }
}
