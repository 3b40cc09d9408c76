//! The coordinator: starts a worker per assigned partition and drains it on revoke.
//!
//! It is the consumer's [`RebalanceHandler`], so its methods run inside librdkafka's
//! rebalance callback on the consumer's polling thread and may block: `revoke` returns only
//! when the partitions' workers finished their batch, committed and stopped, which is what
//! makes a hand-over lose nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use rdkafka::Offset;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::worker::PartitionWorker;
use crate::error::Error;
use crate::kafka::{Consumer, PartitionStream, RebalanceHandler, TopicPartition};

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Owns the partition workers of one instance.
pub struct Coordinator {
    shared: Arc<Shared>,
    runtime: Handle,
    workers: Mutex<BTreeMap<i32, Running>>,
    /// Cancelled when a worker fails fatally; the instance then stops.
    failed: CancellationToken,
    failure: Mutex<Option<Error>>,
}

impl Coordinator {
    /// A coordinator spawning workers on `runtime`.
    pub fn new(shared: Arc<Shared>, runtime: Handle) -> Self {
        Coordinator {
            shared,
            runtime,
            workers: Mutex::new(BTreeMap::new()),
            failed: CancellationToken::new(),
            failure: Mutex::new(None),
        }
    }

    /// Partitions with a running worker.
    pub fn assigned(&self) -> Vec<i32> {
        self.workers
            .lock()
            .expect("worker map lock")
            .keys()
            .copied()
            .collect()
    }

    /// Cancelled once a worker has failed fatally.
    pub fn failed(&self) -> CancellationToken {
        self.failed.clone()
    }

    /// The fatal error that stopped a worker, if any.
    pub fn take_failure(&self) -> Option<Error> {
        self.failure.lock().expect("failure lock").take()
    }

    fn fail(&self, error: Error) {
        tracing::error!(%error, "Stopping: a partition worker failed.");
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(error);
        self.failed.cancel();
    }

    fn start(
        self: &Arc<Self>,
        consumer: &Arc<Consumer>,
        topic: &str,
        partition: i32,
    ) -> Result<Offset, Error> {
        let next = self.shared.store.partition(partition).next_offset(topic)?;
        let stream = PartitionStream::split(consumer, topic, partition).ok_or_else(|| {
            Error::Config(format!("cannot split {topic}/{partition} off the consumer"))
        })?;
        let worker = PartitionWorker::new(
            self.shared.clone(),
            consumer.clone(),
            topic.to_owned(),
            partition,
            next,
        );
        let stop = CancellationToken::new();
        let this = self.clone();
        let token = stop.clone();
        let task = self.runtime.spawn(async move {
            if let Err(e) = worker.run(stream, token).await {
                this.fail(e);
            }
        });
        let old = self
            .workers
            .lock()
            .expect("worker map lock")
            .insert(partition, Running { stop, task });
        debug_assert!(old.is_none(), "a partition is assigned once at a time");
        tracing::info!(topic, partition, next_offset = ?next, "Partition worker started.");
        Ok(next.map_or(Offset::Beginning, Offset::Offset))
    }

    /// Stops the workers of `partitions` and waits until they have committed and exited.
    pub fn stop(&self, partitions: &[i32]) {
        let running: Vec<(i32, Running)> = {
            let mut workers = self.workers.lock().expect("worker map lock");
            partitions
                .iter()
                .filter_map(|p| workers.remove(p).map(|r| (*p, r)))
                .collect()
        };
        for (_, r) in &running {
            r.stop.cancel();
        }
        self.runtime.block_on(async {
            for (partition, r) in running {
                if let Err(e) = r.task.await {
                    tracing::error!(partition, error = %e, "Partition worker panicked.");
                }
                tracing::info!(partition, "Partition worker stopped.");
            }
        });
        self.update_gauge();
    }

    /// Stops every worker; see [`Coordinator::stop`].
    pub fn stop_all(&self) {
        let all = self.assigned();
        self.stop(&all);
    }

    fn update_gauge(&self) {
        let n = self.workers.lock().expect("worker map lock").len();
        self.shared.metrics.assigned_partitions.set(n as i64);
    }
}

/// The rebalance handler wraps an `Arc<Coordinator>` so workers can reach it.
pub struct Handler(pub Arc<Coordinator>);

impl RebalanceHandler for Handler {
    fn assign(&self, consumer: &Arc<Consumer>, partitions: &[TopicPartition]) -> Vec<Offset> {
        let offsets = partitions
            .iter()
            .map(
                |(topic, partition)| match self.0.start(consumer, topic, *partition) {
                    Ok(offset) => offset,
                    Err(e) => {
                        self.0.fail(e);
                        Offset::Invalid
                    }
                },
            )
            .collect();
        self.0.update_gauge();
        offsets
    }

    fn revoke(&self, partitions: &[TopicPartition]) {
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        self.0.stop(&numbers);
    }
}
