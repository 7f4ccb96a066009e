//! Quotas shared by every shard of one relay: allocation counts and bandwidth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Most allocations on this relay; None means unlimited.
    pub total_allocations: Option<u32>,
    /// Most allocations one user may hold at once.
    pub user_allocations: Option<u32>,
    /// Bytes per second one allocation may relay, each direction counted.
    pub allocation_bandwidth: Option<u64>,
    /// Bytes per second all of one user's allocations may relay together.
    pub user_bandwidth: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// 486 Allocation Quota Reached.
    User,
    /// 508 Insufficient Capacity.
    Total,
}

/// One user's share: its allocation count and bandwidth bucket.
#[derive(Debug)]
pub struct UserState {
    allocations: AtomicU32,
    bandwidth: Option<AtomicBucket>,
}

impl UserState {
    /// Whether a bandwidth quota applies to this user.
    #[inline]
    pub fn limited(&self) -> bool {
        self.bandwidth.is_some()
    }

    /// Takes `bytes` from the user's bandwidth; false means drop the packet.
    #[inline]
    pub fn allow(&self, now_ms: u64, bytes: usize) -> bool {
        match &self.bandwidth {
            None => true,
            Some(b) => b.allow(now_ms, bytes as i64),
        }
    }
}

/// Allocation accounting across shards. Touched under a lock only when allocations are created
/// or freed, never per packet.
#[derive(Debug, Default)]
pub struct QuotaState {
    quotas: Quotas,
    active: AtomicU32,
    users: Mutex<HashMap<String, Arc<UserState>>>,
}

impl QuotaState {
    pub fn new(quotas: Quotas) -> Self {
        QuotaState {
            quotas,
            ..Default::default()
        }
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a new allocation for `user_id`, or says which quota refuses it.
    pub fn acquire(&self, user_id: &str) -> Result<Arc<UserState>, QuotaError> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(max) = self.quotas.total_allocations {
            if self.active.load(Ordering::Relaxed) >= max {
                return Err(QuotaError::Total);
            }
        }
        let user = users
            .entry(user_id.to_owned())
            .or_insert_with(|| {
                Arc::new(UserState {
                    allocations: AtomicU32::new(0),
                    bandwidth: self.quotas.user_bandwidth.map(AtomicBucket::new),
                })
            })
            .clone();
        if let Some(max) = self.quotas.user_allocations {
            if user.allocations.load(Ordering::Relaxed) >= max {
                return Err(QuotaError::User);
            }
        }
        user.allocations.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(user)
    }

    /// Undoes one `acquire`.
    pub fn release(&self, user_id: &str, user: &Arc<UserState>) {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        self.active.fetch_sub(1, Ordering::Relaxed);
        if user.allocations.fetch_sub(1, Ordering::Relaxed) == 1 {
            users.remove(user_id);
        }
    }
}

/// A token bucket holding one second of traffic, for one shard's allocation.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: i64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            tokens: rate as i64,
            last_ms: 0,
        }
    }

    #[inline]
    pub fn allow(&mut self, now_ms: u64, bytes: usize) -> bool {
        if now_ms > self.last_ms {
            let add = (now_ms - self.last_ms).saturating_mul(self.rate) / 1000;
            self.tokens = (self.tokens + add as i64).min(self.rate as i64);
            self.last_ms = now_ms;
        }
        if self.tokens < bytes as i64 {
            return false;
        }
        self.tokens -= bytes as i64;
        true
    }
}

/// A token bucket shared between shards, kept with atomics so that packets take no lock.
#[derive(Debug)]
pub struct AtomicBucket {
    rate: u64,
    tokens: AtomicI64,
    last_ms: AtomicU64,
}

impl AtomicBucket {
    pub fn new(rate: u64) -> Self {
        AtomicBucket {
            rate,
            tokens: AtomicI64::new(rate as i64),
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn allow(&self, now_ms: u64, bytes: i64) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms > last
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let add = ((now_ms - last).saturating_mul(self.rate) / 1000) as i64;
            let cap = self.rate as i64;
            let _ = self
                .tokens
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some((t + add).min(cap))
                });
        }
        if self.tokens.fetch_sub(bytes, Ordering::Relaxed) < bytes {
            self.tokens.fetch_add(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_total_limits() {
        let q = QuotaState::new(Quotas {
            total_allocations: Some(3),
            user_allocations: Some(2),
            ..Default::default()
        });
        let a1 = q.acquire("alice").expect("first");
        let _a2 = q.acquire("alice").expect("second");
        assert_eq!(q.acquire("alice").err(), Some(QuotaError::User));
        let _b1 = q.acquire("bob").expect("bob");
        assert_eq!(q.acquire("carol").err(), Some(QuotaError::Total));
        q.release("alice", &a1);
        assert!(q.acquire("alice").is_ok());
        assert_eq!(q.active(), 3);
    }

    #[test]
    fn buckets_refill_at_rate() {
        let mut b = TokenBucket::new(1000);
        assert!(b.allow(0, 1000));
        assert!(!b.allow(0, 1));
        assert!(b.allow(500, 500));
        assert!(!b.allow(500, 1));
        let a = AtomicBucket::new(1000);
        assert!(a.allow(0, 1000));
        assert!(!a.allow(0, 1));
        assert!(a.allow(1000, 1000));
        assert!(!a.allow(1000, 1));
    }
}
