//! Expiry, driven by [`Core::poll_timeout`] and [`Core::handle_timeout`]: a heap of deadlines
//! (allocations, RFC 6062 connections waiting for ConnectionBind) and the retransmission
//! cache's oldest answer, instead of a scan of every allocation. A deadline that moved (a
//! Refresh) is found on its turn and set again; permissions and channels are pruned then too,
//! and an allocation is looked at again when its next permission ends.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::{AllocId, Core, PERMISSION_LIFETIME};

/// What a deadline is for.
#[derive(Debug, Clone, Copy)]
enum Key {
    Allocation(AllocId),
    Connection(u32),
}

#[derive(Debug)]
struct Entry {
    at: Instant,
    /// Insertion order, so equal deadlines compare without looking at the key.
    seq: u64,
    key: Key,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The deadlines of one core, earliest first.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

impl Timers {
    fn push(&mut self, at: Instant, key: Key) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            key,
        }));
    }

    /// Looks at allocation `id` at `at`.
    pub(super) fn allocation(&mut self, id: AllocId, at: Instant) {
        self.push(at, Key::Allocation(id));
    }

    /// Looks at RFC 6062 connection `id` at `at`.
    pub(super) fn connection(&mut self, id: u32, at: Instant) {
        self.push(at, Key::Connection(id));
    }

    fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    fn pop_due(&mut self, now: Instant) -> Option<Key> {
        if self.next()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| e.key)
    }
}

impl Core {
    /// When [`Core::handle_timeout`] next has work. Call it after handling input, and sleep
    /// until then (or until more input).
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.timers.next(), self.responses.next_expiry()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Ends expired allocations and connections, forgets old cached answers and EVEN-PORT
    /// reservations, and applies a reload's revocations. Call it when
    /// [`Core::poll_timeout`] says, and after a reload; calling it earlier is harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = Some(now);
        self.apply_reload();
        self.shared.expire_reservations(now);
        self.responses.expire(now);
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                Key::Allocation(id) => self.allocation_due(id, now),
                Key::Connection(c) => self.connection_due(c, now),
            }
        }
    }

    fn allocation_due(&mut self, id: AllocId, now: Instant) {
        let Some(a) = self.slot_mut(id) else {
            return;
        };
        if a.expires <= now {
            self.free(id);
            return;
        }
        // Channels stay reserved for 5 minutes after they expire (RFC 8656 §12), so a late
        // packet cannot reach a new peer bound to the old number.
        a.channels.retain(|c| c.expires + PERMISSION_LIFETIME > now);
        self.prune_permissions(id, now);
        // Looked at again when its next permission ends (so that on shared ports its
        // endpoints go with it, on time), and at least every permission lifetime. A
        // permission installed later ends after this, since it lasts a whole lifetime.
        let Some(a) = self.slot_mut(id) else {
            return;
        };
        let next = a
            .permissions
            .iter()
            .map(|(_, exp)| *exp)
            .fold(a.expires.min(now + PERMISSION_LIFETIME), Instant::min);
        self.timers.allocation(id, next);
    }

    /// After a reload: ends the allocations of revoked users and removed tenants.
    fn apply_reload(&mut self) {
        let generation = self.shared.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let config = self.shared.config();
        let ended: Vec<AllocId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let a = slot.allocation.as_ref()?;
                let keep = config
                    .tenants
                    .get(a.tenant)
                    .is_some_and(|t| !t.is_revoked(&a.user_id, &a.username));
                (!keep).then_some(AllocId {
                    index: i as u32,
                    generation: slot.generation,
                })
            })
            .collect();
        drop(config);
        for id in ended {
            self.free_for(id, super::EndReason::Revoked);
        }
    }
}
