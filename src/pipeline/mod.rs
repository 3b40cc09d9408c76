//! The processing pipeline: a coordinator that turns rebalances into partition workers, and
//! the workers' hot loop.
//!
//! Record path, per partition and batch (see `ARCHITECTURE.md`):
//! `stream → decode → validate → twin.apply → rules.evaluate → emit (changelog, alerts,
//! dead letters) → await deliveries → store commit (twins + next offset, one WriteBatch) →
//! consumer.store_offset (advisory) → metrics`.

mod coordinator;
pub mod processor;
mod worker;

use std::sync::Arc;

use rdkafka::producer::FutureProducer;

use crate::clock::Clock;
use crate::config::PipelineConfig;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::topology::Topology;

pub use coordinator::{Coordinator, Handler};

/// What every worker of an instance shares.
pub struct Shared {
    /// Topics, model, rules and codec.
    pub topology: Arc<Topology>,
    /// The instance's store.
    pub store: Store,
    /// The instance's metrics.
    pub metrics: Metrics,
    /// Batching and caching settings.
    pub settings: PipelineConfig,
    /// Processing time.
    pub clock: Arc<dyn Clock>,
    /// The instance's producer.
    pub producer: FutureProducer,
}
