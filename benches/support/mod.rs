//! What every benchmark needs: sizes from the environment and medians of repeated runs.

/// `name` from the environment as a count, or `default`.
pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper one for an even count).
#[allow(dead_code)] // not every benchmark takes medians
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
