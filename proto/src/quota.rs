//! Quotas shared by every shard of one relay: allocation counts and bandwidth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    /// Most allocations on this relay (relay-wide), or of one tenant (in a tenant's quotas);
    /// None means unlimited.
    pub total_allocations: Option<u32>,
    /// Most allocations one user may hold at once.
    pub user_allocations: Option<u32>,
    /// Bytes per second one allocation may relay, each direction counted.
    pub allocation_bandwidth: Option<u64>,
    /// Bytes per second all of one user's allocations may relay together.
    pub user_bandwidth: Option<u64>,
    /// Bytes per second all of one tenant's allocations may relay together.
    pub tenant_bandwidth: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaError {
    /// 486 Allocation Quota Reached: the user's.
    User,
    /// 486 Allocation Quota Reached: the tenant's.
    Tenant,
    /// 508 Insufficient Capacity.
    Total,
    /// The relay holds its redirect limit ([`QuotaState::set_redirect_at`]): a sibling takes
    /// the client (300), else 508.
    Busy,
}

/// One tenant's share: its allocation count and bandwidth bucket.
#[derive(Debug)]
pub struct TenantState {
    allocations: AtomicU32,
    bandwidth: Option<AtomicBucket>,
}

/// One user's share: its allocation count and bandwidth bucket, and its tenant's.
#[derive(Debug)]
pub struct UserState {
    allocations: AtomicU32,
    bandwidth: Option<AtomicBucket>,
    tenant: Arc<TenantState>,
}

impl UserState {
    /// Whether a bandwidth quota applies to this user or its tenant.
    #[inline]
    pub fn limited(&self) -> bool {
        self.bandwidth.is_some() || self.tenant.bandwidth.is_some()
    }

    /// Takes `bytes` from the user's and the tenant's bandwidth; false means drop the packet,
    /// which then costs neither anything.
    #[inline]
    pub fn allow(&self, now_ms: u64, bytes: usize) -> bool {
        let bytes = bytes as i64;
        if !self
            .bandwidth
            .as_ref()
            .is_none_or(|b| b.allow(now_ms, bytes))
        {
            return false;
        }
        if self
            .tenant
            .bandwidth
            .as_ref()
            .is_none_or(|b| b.allow(now_ms, bytes))
        {
            return true;
        }
        if let Some(b) = &self.bandwidth {
            b.tokens.fetch_add(bytes, Ordering::Relaxed);
        }
        false
    }

    /// The lowest bandwidth quota over this user (its own or its tenant's), bytes per second.
    pub fn min_rate(&self) -> Option<u64> {
        [&self.bandwidth, &self.tenant.bandwidth]
            .into_iter()
            .flatten()
            .map(|b| b.rate)
            .min()
    }
}

#[derive(Debug, Default)]
struct Holders {
    /// By (tenant id, user id): one user id in two tenants is two users.
    users: HashMap<(u32, String), Arc<UserState>>,
    tenants: HashMap<u32, Arc<TenantState>>,
}

/// Allocation accounting across shards. Touched under a lock only when allocations are created
/// or freed, never per packet.
#[derive(Debug, Default)]
pub struct QuotaState {
    total: Option<u32>,
    /// Beyond this many allocations (0: never), new ones are redirected: checked with the
    /// others, under the lock, so it holds at the allocation that reaches it.
    redirect_at: AtomicU32,
    active: AtomicU32,
    holders: Mutex<Holders>,
}

impl QuotaState {
    /// `total`: most allocations on this relay.
    pub fn new(total: Option<u32>) -> Self {
        QuotaState {
            total,
            ..Default::default()
        }
    }

    pub fn total(&self) -> Option<u32> {
        self.total
    }

    /// From now on, an allocation that would make more than `at` (0: no limit) gets
    /// [`QuotaError::Busy`].
    pub fn set_redirect_at(&self, at: u32) {
        self.redirect_at.store(at, Ordering::Relaxed);
    }

    /// The redirect limit, 0 for none.
    pub fn redirect_at(&self) -> u32 {
        self.redirect_at.load(Ordering::Relaxed)
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Allocations held per tenant id (tenants holding none are left out).
    pub fn active_by_tenant(&self) -> Vec<(u32, u32)> {
        let h = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        h.tenants
            .iter()
            .map(|(id, t)| (*id, t.allocations.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts a new allocation for `user_id` of tenant `tenant` under the tenant's current
    /// quotas `q`, or says which quota refuses it.
    pub fn acquire(
        &self,
        tenant: u32,
        q: &Quotas,
        user_id: &str,
    ) -> Result<Arc<UserState>, QuotaError> {
        let mut h = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        let active = self.active.load(Ordering::Relaxed);
        if self.total.is_some_and(|max| active >= max) {
            return Err(QuotaError::Total);
        }
        let busy_at = self.redirect_at.load(Ordering::Relaxed);
        if busy_at > 0 && active >= busy_at {
            return Err(QuotaError::Busy);
        }
        let t = h
            .tenants
            .entry(tenant)
            .or_insert_with(|| {
                Arc::new(TenantState {
                    allocations: AtomicU32::new(0),
                    bandwidth: q.tenant_bandwidth.map(AtomicBucket::new),
                })
            })
            .clone();
        if let Some(max) = q.total_allocations {
            if t.allocations.load(Ordering::Relaxed) >= max {
                self.forget_idle(&mut h, tenant, None);
                return Err(QuotaError::Tenant);
            }
        }
        let key = (tenant, user_id.to_owned());
        let user = h
            .users
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(UserState {
                    allocations: AtomicU32::new(0),
                    bandwidth: q.user_bandwidth.map(AtomicBucket::new),
                    tenant: Arc::clone(&t),
                })
            })
            .clone();
        if let Some(max) = q.user_allocations {
            if user.allocations.load(Ordering::Relaxed) >= max {
                self.forget_idle(&mut h, tenant, Some(&key));
                return Err(QuotaError::User);
            }
        }
        user.allocations.fetch_add(1, Ordering::Relaxed);
        t.allocations.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(user)
    }

    /// Drops the entries a refused `acquire` created, so refusals hold no memory.
    fn forget_idle(&self, h: &mut Holders, tenant: u32, user: Option<&(u32, String)>) {
        if let Some(k) = user {
            if h.users
                .get(k)
                .is_some_and(|u| u.allocations.load(Ordering::Relaxed) == 0)
            {
                h.users.remove(k);
            }
        }
        if h.tenants
            .get(&tenant)
            .is_some_and(|t| t.allocations.load(Ordering::Relaxed) == 0)
        {
            h.tenants.remove(&tenant);
        }
    }

    /// Undoes one `acquire`.
    pub fn release(&self, tenant: u32, user_id: &str, user: &Arc<UserState>) {
        let mut h = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        self.active.fetch_sub(1, Ordering::Relaxed);
        if user.allocations.fetch_sub(1, Ordering::Relaxed) == 1 {
            h.users.remove(&(tenant, user_id.to_owned()));
        }
        if user.tenant.allocations.fetch_sub(1, Ordering::Relaxed) == 1 {
            h.tenants.remove(&tenant);
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

    /// Gives back what `allow` took for a packet dropped after all.
    #[inline]
    pub fn refund(&mut self, bytes: usize) {
        self.tokens = (self.tokens + bytes as i64).min(self.rate as i64);
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

    /// Gives back what `allow` took for bytes not sent after all.
    pub fn refund(&self, bytes: i64) {
        let cap = self.rate as i64;
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + bytes).min(cap))
            });
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_total_limits() {
        let q = QuotaState::new(Some(3));
        let per = Quotas {
            user_allocations: Some(2),
            ..Default::default()
        };
        let a1 = q.acquire(1, &per, "alice").expect("first");
        let _a2 = q.acquire(1, &per, "alice").expect("second");
        assert_eq!(q.acquire(1, &per, "alice").err(), Some(QuotaError::User));
        let _b1 = q.acquire(1, &per, "bob").expect("bob");
        assert_eq!(q.acquire(1, &per, "carol").err(), Some(QuotaError::Total));
        q.release(1, "alice", &a1);
        assert!(q.acquire(1, &per, "alice").is_ok());
        assert_eq!(q.active(), 3);
    }

    #[test]
    fn tenants_count_apart() {
        let q = QuotaState::new(None);
        let small = Quotas {
            total_allocations: Some(1),
            user_allocations: Some(5),
            ..Default::default()
        };
        let a = q.acquire(1, &small, "alice").expect("tenant 1");
        assert_eq!(q.acquire(1, &small, "bob").err(), Some(QuotaError::Tenant));
        // The same user id in another tenant is another user, under that tenant's quota.
        let b = q.acquire(2, &small, "alice").expect("tenant 2");
        let mut by = q.active_by_tenant();
        by.sort();
        assert_eq!(by, vec![(1, 1), (2, 1)]);
        q.release(1, "alice", &a);
        q.release(2, "alice", &b);
        assert!(q.active_by_tenant().is_empty());
        assert_eq!(q.active(), 0);
    }

    #[test]
    fn a_tenants_bandwidth_is_shared_by_its_users() {
        let q = QuotaState::new(None);
        let limited = Quotas {
            tenant_bandwidth: Some(1000),
            ..Default::default()
        };
        let a = q.acquire(7, &limited, "alice").expect("alice");
        let b = q.acquire(7, &limited, "bob").expect("bob");
        assert!(a.limited() && b.limited());
        assert!(a.allow(0, 600));
        assert!(!b.allow(0, 600));
        assert!(b.allow(0, 400));
        // A user's own bucket is not charged for a packet the tenant's refuses.
        let per_user = Quotas {
            user_bandwidth: Some(1000),
            tenant_bandwidth: Some(1000),
            ..Default::default()
        };
        let c = q.acquire(8, &per_user, "carol").expect("carol");
        let d = q.acquire(8, &per_user, "dave").expect("dave");
        assert!(d.allow(0, 900));
        assert!(!c.allow(0, 900), "tenant bucket empty");
        assert!(c.allow(1000, 1000), "carol's own bucket still full");
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
