//! Kafka plumbing: every client's settings ([`Clients`]), the consumer whose rebalances
//! become calls into the pipeline, async per-partition message streams, the output producer
//! that tracks deliveries and runs the transactions, the API's writer of input records, the reader of output topics (restore,
//! fleet view), and topic admin.
//!
//! No business logic lives here: what to do on assign or revoke is the pipeline's
//! [`RebalanceHandler`].

mod admin;
mod clients;
mod consumer;
mod headers;
mod producer;
mod reader;
mod writer;

pub use admin::{TopicReport, apply_topology};
pub use clients::Clients;
pub use consumer::{
    Consumer, PartitionStream, RebalanceContext, RebalanceHandler, TopicPartition,
    cached_watermarks, seek, serve, subscribe,
};
pub use headers::MessageHeaders;
pub use producer::{DEFAULT_MAX_RECORD_BYTES, Deliveries, OutputProducer};
pub use reader::{OutputReader, OutputRecord, Polled, window_reader};
pub use writer::RecordWriter;
