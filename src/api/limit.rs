//! Per-asset rate limits of the API's writes: a token bucket per asset, refilled evenly, so
//! one asset (a script gone wrong, a flooding device) cannot crowd out the rest.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buckets kept before full ones are dropped: a bound on the limiter's memory.
const MAX_BUCKETS: usize = 100_000;

/// `per_minute` tokens per asset, refilled evenly: a burst of as many, or spread out.
pub struct RateLimit {
    per_minute: u32,
    /// Per asset: tokens left and when they were counted (epoch ms).
    buckets: Mutex<HashMap<String, (f64, i64)>>,
}

impl RateLimit {
    /// A limit of `per_minute` per asset.
    pub fn new(per_minute: u32) -> RateLimit {
        RateLimit {
            per_minute,
            buckets: Mutex::default(),
        }
    }

    /// The limit per asset and minute.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Takes `n` tokens of each asset at `now` (epoch ms), all or none, or says in how many
    /// seconds they would all be there (at least 1; 60 when one asset wants more than a
    /// minute's worth).
    pub fn take(&self, wants: &[(&str, u32)], now: i64) -> Result<(), u64> {
        let capacity = f64::from(self.per_minute);
        let per_ms = capacity / 60_000.0;
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() + wants.len() > MAX_BUCKETS {
            buckets.retain(|_, (tokens, at)| *tokens + (now - *at) as f64 * per_ms < capacity);
        }
        let mut wait: f64 = 0.0;
        for (asset, n) in wants {
            let n = f64::from(*n);
            if n > capacity {
                return Err(60);
            }
            let (tokens, at) = buckets
                .entry((*asset).to_owned())
                .or_insert((capacity, now));
            *tokens = (*tokens + (now - *at).max(0) as f64 * per_ms).min(capacity);
            *at = now.max(*at);
            if *tokens < n {
                wait = wait.max((n - *tokens) / per_ms / 1000.0);
            }
        }
        if wait > 0.0 {
            return Err(wait.ceil().max(1.0) as u64);
        }
        for (asset, n) in wants {
            if let Some((tokens, _)) = buckets.get_mut(*asset) {
                *tokens -= f64::from(*n);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill_per_asset_all_or_none() {
        let limit = RateLimit::new(2);
        assert_eq!(limit.take(&[("a", 1)], 0), Ok(()));
        assert_eq!(limit.take(&[("a", 1)], 0), Ok(()));
        // Two a minute: the next token is 30 s away.
        assert_eq!(limit.take(&[("a", 1)], 0), Err(30));
        assert_eq!(limit.take(&[("b", 1)], 0), Ok(()), "per asset");
        assert_eq!(limit.take(&[("a", 1)], 29_000), Err(1));
        assert_eq!(limit.take(&[("a", 1)], 30_000), Ok(()));
        assert_eq!(limit.take(&[("a", 1)], 30_000), Err(30));
        // All or none: c could, a cannot, so c keeps its tokens.
        assert_eq!(limit.take(&[("c", 2), ("a", 1)], 30_000), Err(30));
        assert_eq!(limit.take(&[("c", 2)], 30_000), Ok(()));
        assert_eq!(
            limit.take(&[("d", 3)], 30_000),
            Err(60),
            "more than a minute's worth"
        );
    }
}
