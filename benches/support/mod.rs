//! What every benchmark needs: sizes from the environment, medians of repeated runs, and the
//! shipped vehicle topology.

use std::sync::Arc;

use twinflow::config::TopologyConfig;
use twinflow::topology::Topology;

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

/// The topology the project ships: `topology/topics.toml` and the vehicle model.
#[allow(dead_code)] // the pipeline benchmark loads it through the tests' helpers
pub fn vehicle_topology() -> Arc<Topology> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    Arc::new(
        Topology::load(&TopologyConfig::shipped(root, "vehicle"))
            .expect("the shipped topology loads"),
    )
}
