//! A sandbox's network budgets and rate limits ([`NetworkLimits`]), kept by the host: bytes
//! each way, HTTP requests, TCP connections, and per-host request rates (token buckets). The
//! limits can change while the sandbox runs ([`Budget::set`]); what was spent stays spent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Instant;

use matchlock_api::config::NetworkLimits;

use crate::policy::glob_matches;

/// Why the host refuses more traffic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    /// The guest sent all it may.
    #[error("the egress budget of {0} bytes is spent")]
    Egress(u64),
    /// The guest received all it may.
    #[error("the ingress budget of {0} bytes is spent")]
    Ingress(u64),
    /// No more HTTP requests.
    #[error("the budget of {0} requests is spent")]
    Requests(u64),
    /// No more TCP connections.
    #[error("the budget of {0} connections is spent")]
    Connections(u64),
    /// Too many requests to this host just now.
    #[error("the rate limit of {requests} requests per {seconds} s for {host} is reached")]
    Rate {
        /// The rule's host glob.
        host: String,
        /// Its requests per period.
        requests: u32,
        /// Its period.
        seconds: u32,
        /// Seconds until a request would pass.
        retry_after: u64,
    },
}

pub use matchlock_api::stats::Usage;

/// The budgets of one sandbox, shared by all its flows.
#[derive(Debug, Default)]
pub struct Budget {
    limits: RwLock<NetworkLimits>,
    sent: AtomicU64,
    received: AtomicU64,
    requests: AtomicU64,
    connections: AtomicU64,
    /// Tokens and their last refill, by rate-limit rule (host glob).
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Budget {
    /// A budget with `limits`.
    pub fn new(limits: NetworkLimits) -> Self {
        Self { limits: RwLock::new(limits), ..Self::default() }
    }

    /// The limits now.
    pub fn limits(&self) -> NetworkLimits {
        self.limits.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the limits (what was spent stays spent; rate buckets start full).
    pub fn set(&self, limits: NetworkLimits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits;
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// What was spent so far.
    pub fn usage(&self) -> Usage {
        Usage {
            egress_bytes: self.sent.load(Ordering::Relaxed),
            ingress_bytes: self.received.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }

    /// Whether a byte budget is spent (new flows are refused then).
    pub fn bytes_left(&self) -> Result<(), Exceeded> {
        let limits = self.limits.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(max) = limits.egress_bytes.filter(|max| self.sent.load(Ordering::Relaxed) >= *max) {
            return Err(Exceeded::Egress(max));
        }
        if let Some(max) = limits.ingress_bytes.filter(|max| self.received.load(Ordering::Relaxed) >= *max) {
            return Err(Exceeded::Ingress(max));
        }
        Ok(())
    }

    /// Lets one HTTP request to `host` through, or says which budget or rate refuses it.
    pub fn take_request(&self, host: &str) -> Result<(), Exceeded> {
        self.bytes_left()?;
        let limits = self.limits.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(rule) = limits.rate_limits.iter().find(|r| glob_matches(&r.host, host)) {
            let rate = f64::from(rule.requests) / f64::from(rule.seconds);
            let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let (tokens, at) = buckets.entry(rule.host.clone()).or_insert((f64::from(rule.requests), now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(f64::from(rule.requests));
            *at = now;
            if *tokens < 1.0 {
                let retry_after = ((1.0 - *tokens) / rate).ceil().max(1.0) as u64;
                return Err(Exceeded::Rate {
                    host: rule.host.clone(),
                    requests: rule.requests,
                    seconds: rule.seconds,
                    retry_after,
                });
            }
            *tokens -= 1.0;
        }
        take(&self.requests, limits.max_requests).map_err(Exceeded::Requests)
    }

    /// Lets one TCP connection through, or says which budget refuses it; with `bytes`, also
    /// refused once a byte budget is spent (an intercepted connection is not: its requests
    /// get the 429 that says why).
    pub fn take_connection(&self, bytes: bool) -> Result<(), Exceeded> {
        if bytes {
            self.bytes_left()?;
        }
        let max = self.limits.read().unwrap_or_else(PoisonError::into_inner).max_connections;
        take(&self.connections, max).map_err(Exceeded::Connections)
    }

    /// Spends `n` bytes the guest sends; `Err` when they do not fit (they are counted all the
    /// same, so the budget reads as spent, and must not be sent).
    pub fn send(&self, n: u64) -> Result<(), Exceeded> {
        let max = self.limits.read().unwrap_or_else(PoisonError::into_inner).egress_bytes;
        spend(&self.sent, n, max).map_err(Exceeded::Egress)
    }

    /// Spends `n` bytes the guest receives, as [`Budget::send`].
    pub fn receive(&self, n: u64) -> Result<(), Exceeded> {
        let max = self.limits.read().unwrap_or_else(PoisonError::into_inner).ingress_bytes;
        spend(&self.received, n, max).map_err(Exceeded::Ingress)
    }
}

/// Counts one more in `counter` unless that passes `max`.
fn take(counter: &AtomicU64, max: Option<u64>) -> Result<(), u64> {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match max {
            Some(max) if n >= max => None,
            _ => Some(n + 1),
        })
        .map(|_| ())
        .map_err(|_| max.unwrap_or(0))
}

/// Adds `n` to `counter`; `Err(max)` when the total passes `max`.
fn spend(counter: &AtomicU64, n: u64, max: Option<u64>) -> Result<(), u64> {
    let total = counter.fetch_add(n, Ordering::Relaxed).saturating_add(n);
    match max {
        Some(max) if total > max => Err(max),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_api::config::RateLimit;

    #[test]
    fn budgets_refuse_past_their_limit_and_can_be_raised() {
        let budget = Budget::new(NetworkLimits {
            egress_bytes: Some(100),
            max_requests: Some(2),
            max_connections: Some(1),
            ..NetworkLimits::default()
        });
        assert_eq!(budget.take_request("a.test"), Ok(()));
        assert_eq!(budget.take_request("a.test"), Ok(()));
        assert_eq!(budget.take_request("a.test"), Err(Exceeded::Requests(2)));
        assert_eq!(budget.take_connection(true), Ok(()));
        assert_eq!(budget.take_connection(false), Err(Exceeded::Connections(1)));
        assert_eq!(budget.send(60), Ok(()));
        assert_eq!(budget.send(60), Err(Exceeded::Egress(100)), "the chunk that does not fit");
        assert_eq!(budget.bytes_left(), Err(Exceeded::Egress(100)));
        assert_eq!(budget.receive(1 << 30), Ok(()), "no ingress budget");
        let mut raised = budget.limits();
        raised.egress_bytes = Some(1000);
        raised.max_requests = None;
        budget.set(raised);
        assert_eq!(budget.bytes_left(), Ok(()));
        assert_eq!(budget.take_request("a.test"), Ok(()));
        assert_eq!(budget.usage().requests, 3);
        assert_eq!(budget.usage().egress_bytes, 120);
    }

    #[test]
    fn rates_allow_a_burst_then_tell_when_to_retry() {
        let budget = Budget::new(NetworkLimits {
            rate_limits: vec![RateLimit { host: "*.rated.test".into(), requests: 2, seconds: 60 }],
            ..NetworkLimits::default()
        });
        assert_eq!(budget.take_request("api.rated.test"), Ok(()));
        assert_eq!(budget.take_request("api.rated.test"), Ok(()));
        match budget.take_request("api.rated.test") {
            Err(Exceeded::Rate { retry_after, .. }) => assert!((29..=30).contains(&retry_after), "{retry_after}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(budget.take_request("other.test"), Ok(()), "other hosts are not limited");
    }
}
