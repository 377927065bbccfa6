//! The retry policy, in one place: exponential backoff with jitter for transient failures.
//!
//! apalis-sqlite retries a failed task immediately; we instead reschedule the row with a run
//! time computed here.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total (the first run counts); after the last one the job is `failed`.
    pub max_attempts: u32,
    /// Delay before the second attempt (before jitter).
    pub base_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The un-jittered delay after attempt `attempt` (1-based) failed:
    /// `base_delay * 2^(attempt-1)`, capped at `max_delay`.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        let factor = 1u64 << exp;
        let nanos = (self.base_delay.as_nanos() as u64).saturating_mul(factor);
        Duration::from_nanos(nanos).min(self.max_delay)
    }

    /// The range the jittered delay is drawn from: `[nominal/2, nominal]` ("equal jitter"),
    /// so retries of many jobs failing together spread out while delays still grow.
    pub fn delay_bounds(&self, attempt: u32) -> (Duration, Duration) {
        let nominal = self.nominal_delay(attempt);
        (nominal / 2, nominal)
    }

    /// The delay before the next attempt after attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }

    pub fn delay_with(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let (lo, hi) = self.delay_bounds(attempt);
        if hi <= lo {
            return hi;
        }
        let span = (hi - lo).as_nanos() as u64;
        lo + Duration::from_nanos(rng.random_range(0..=span))
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.max_attempts == 0 {
            return Err("retry.max_attempts must be at least 1".into());
        }
        if self.base_delay > self.max_delay {
            return Err("retry.base_delay must not exceed retry.max_delay".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }

    #[test]
    fn nominal_delays_double_then_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=7).map(|a| p.nominal_delay(a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(p.nominal_delay(1000), Duration::from_secs(2));
        assert_eq!(p.nominal_delay(0), Duration::from_millis(100));
    }

    #[test]
    fn jittered_delays_stay_within_half_to_full_nominal() {
        let p = policy();
        let mut rng = rand::rng();
        for attempt in 1..=8 {
            let (lo, hi) = p.delay_bounds(attempt);
            assert_eq!(lo * 2, hi);
            for _ in 0..200 {
                let d = p.delay_with(attempt, &mut rng);
                assert!(
                    d >= lo && d <= hi,
                    "attempt {attempt}: {d:?} not in {lo:?}..={hi:?}"
                );
            }
        }
    }

    #[test]
    fn jitter_spreads_delays() {
        let p = policy();
        let mut rng = rand::rng();
        let mut seen: Vec<_> = (0..50).map(|_| p.delay_with(3, &mut rng)).collect();
        seen.sort();
        seen.dedup();
        assert!(seen.len() > 10);
    }

    #[test]
    fn invalid_policies_are_rejected() {
        let mut p = policy();
        p.max_attempts = 0;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.base_delay = Duration::from_secs(5);
        assert!(p.validate().is_err());
        assert!(policy().validate().is_ok());
    }
}
