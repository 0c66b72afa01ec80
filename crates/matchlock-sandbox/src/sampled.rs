//! Logging what a guest can make happen at will, without letting it fill the log.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts occurrences of one guest-triggerable event and says which to log: the 1st, 2nd,
/// 4th, 8th … (each logged line carries the count so far).
#[derive(Debug, Default)]
pub(crate) struct Sampled(AtomicU64);

impl Sampled {
    /// Records one occurrence; `Some(count)` when this one should be logged.
    pub(crate) fn record(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_power_of_two().then_some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two_only() {
        let sampled = Sampled::default();
        let logged: Vec<u64> = (0..1000).filter_map(|_| sampled.record()).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]);
    }
}
