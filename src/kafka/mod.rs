//! Kafka plumbing: the consumer whose rebalances become calls into the pipeline, async
//! per-partition message streams, the output producer that tracks deliveries, and topic admin.
//!
//! No business logic lives here: what to do on assign or revoke is the pipeline's
//! [`RebalanceHandler`].

mod admin;
mod consumer;
mod headers;
mod producer;

pub use admin::{TopicReport, apply_topology};
pub use consumer::{
    Consumer, PartitionStream, RebalanceContext, RebalanceHandler, TopicPartition,
    cached_watermarks,
};
pub use headers::MessageHeaders;
pub use producer::{DEFAULT_MAX_RECORD_BYTES, Deliveries, OutputProducer};
