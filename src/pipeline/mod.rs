//! The processing pipeline: the coordinator that turns rebalances into partition workers,
//! the workers' hot loop, the committer that makes their work durable, and restore.
//!
//! Record path (see `ARCHITECTURE.md`): `stream → decode → validate → twin.apply →
//! rules.evaluate → send outputs (changelog, alerts, dead letters) → stage store writes`;
//! every `processing.commit_interval` the committer stops the workers at a batch boundary,
//! makes the outputs durable (delivered, or a committed transaction with the input offsets),
//! and only then writes the staged twins and positions to RocksDB.

mod commands;
mod committer;
mod coordinator;
mod dead_letter;
mod input;
mod output;
mod processor;
mod restore;
mod slot;
mod worker;

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::ProcessingConfig;
use crate::error::Error;
use crate::kafka::{Clients, OutputProducer};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;
use crate::topology::Topology;

pub use commands::{WriteRecord, desired_write, encode_write};
pub use committer::Committer;
pub use coordinator::{Coordinator, Handler};
pub use dead_letter::{Stage, Why, dead_letter};
pub use input::{Input, RecordHeaders};
pub use output::{Output, OutputHeader, Outputs, Routed, Target};
#[cfg(feature = "fault-injection")]
pub use processor::PANICKING_ASSET;
pub use processor::{Batch, Processor, Work};

/// What every part of an instance shares.
pub struct Shared {
    /// Topics, model, rules and codec.
    pub topology: Arc<Topology>,
    /// The instance's store.
    pub store: Store,
    /// The instance's metrics.
    pub metrics: Metrics,
    /// Guarantee, commit, batching and caching settings.
    pub settings: ProcessingConfig,
    /// Processing time.
    pub clock: Arc<dyn Clock>,
    /// The instance's producer.
    pub producer: OutputProducer,
    /// Every Kafka client's settings.
    pub clients: Clients,
    /// The first fatal error; the instance stops when it is set.
    pub failure: Failure,
    /// The schema registry, when a topic uses the Confluent wire format.
    pub registry: Option<Arc<Registry>>,
    /// Whether the instance's fleet view runs: a restore then first promotes the view's
    /// copy of the partition's twins.
    pub view: bool,
}

/// The first fatal error of an instance, and a token cancelled when it happens.
#[derive(Default)]
pub struct Failure {
    error: Mutex<Option<Error>>,
    token: CancellationToken,
}

impl Failure {
    /// Records a fatal error (the first one wins) and tells the instance to stop.
    pub fn fail(&self, error: Error) {
        tracing::error!(%error, "Stopping after a fatal error.");
        self.error
            .lock()
            .expect("failure lock")
            .get_or_insert(error);
        self.token.cancel();
    }

    /// Cancelled once a fatal error happened.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The fatal error, if any.
    pub fn take(&self) -> Option<Error> {
        self.error.lock().expect("failure lock").take()
    }
}
