//! The coordinator: starts a worker per assigned partition and drains it on revoke.
//!
//! It is the consumer's [`RebalanceHandler`], so its methods run inside librdkafka's
//! rebalance callback on the consumer's polling thread and may block: `revoke` returns only
//! when the partitions' workers finished their batch and their work is committed, which is
//! what makes a hand-over lose nothing.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::committer::{Committer, Slot};
use super::worker::PartitionWorker;
use crate::config::Guarantee;
use crate::error::Error;
use crate::kafka::{Consumer, PartitionStream, RebalanceHandler, TopicPartition};

/// Bound on reading the group's committed offsets (or a partition's bounds) at an
/// assignment.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(60);

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
    slot: Arc<Slot>,
}

/// Owns the partition workers of one instance.
pub struct Coordinator {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
    runtime: Handle,
    workers: Mutex<BTreeMap<i32, Running>>,
    /// Partitions whose worker ended unexpectedly, with why. Kept through the stop that
    /// follows, so `/healthz` names them until the instance exits.
    failed: Arc<Mutex<BTreeMap<i32, String>>>,
}

impl Coordinator {
    /// A coordinator spawning workers on `runtime`.
    pub fn new(shared: Arc<Shared>, committer: Arc<Committer>, runtime: Handle) -> Self {
        Coordinator {
            shared,
            committer,
            runtime,
            workers: Mutex::new(BTreeMap::new()),
            failed: Arc::default(),
        }
    }

    /// Partitions whose worker ended unexpectedly (a fatal error, or a panic outside the
    /// record path), with why.
    pub fn failed(&self) -> Vec<(i32, String)> {
        let failed = self.failed.lock().expect("failed map lock");
        failed.iter().map(|(p, why)| (*p, why.clone())).collect()
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

    /// Whether every assigned partition is restored and processing.
    pub fn ready(&self) -> bool {
        let workers = self.workers.lock().expect("worker map lock");
        !workers.is_empty()
            && workers
                .values()
                .all(|w| w.slot.processing.load(Ordering::SeqCst))
    }

    /// Partitions with input waiting whose position has not moved for `stall_after`.
    pub fn stalled(&self) -> Vec<i32> {
        let after = self.shared.settings.stall_after;
        let workers = self.workers.lock().expect("worker map lock");
        workers
            .iter()
            .filter(|(_, w)| w.slot.stalled(after))
            .map(|(p, _)| *p)
            .collect()
    }

    /// The group's committed offsets of `partitions`, in order (`None`: nothing committed).
    fn committed(
        consumer: &Consumer,
        partitions: &[TopicPartition],
    ) -> Result<Vec<Option<i64>>, Error> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in partitions {
            tpl.add_partition(topic, *partition);
        }
        let committed = consumer.committed_offsets(tpl, COMMITTED_TIMEOUT)?;
        Ok(partitions
            .iter()
            .map(
                |(topic, partition)| match committed.find_partition(topic, *partition) {
                    Some(e) => match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                    None => None,
                },
            )
            .collect())
    }

    /// Where a partition nobody processed yet starts: its beginning, or its end if the
    /// consumer's `auto.offset.reset` says so.
    fn reset_position(
        &self,
        consumer: &Consumer,
        topic: &str,
        partition: i32,
    ) -> Result<i64, Error> {
        let (low, high) = consumer.fetch_watermarks(topic, partition, COMMITTED_TIMEOUT)?;
        let reset = self.shared.restore_client.get("auto.offset.reset");
        Ok(match reset {
            Some("latest" | "largest" | "end") => high,
            _ => low,
        })
    }

    fn start(
        &self,
        consumer: &Arc<Consumer>,
        topic: &str,
        partition: i32,
        committed: Option<i64>,
    ) -> Result<Vec<(TopicPartition, Offset)>, Error> {
        let store = self.shared.store.partition(partition);
        // A prepared commit left by a crash: under exactly-once the group offset, committed
        // in the same transaction, says whether it counts.
        let arbiter = match self.shared.settings.guarantee {
            Guarantee::ExactlyOnce => committed,
            Guarantee::AtLeastOnce => None,
        };
        if store.resolve_prepared(arbiter)? {
            tracing::info!(
                topic,
                partition,
                "Applied the commit prepared before a crash; its transaction had committed."
            );
        }
        // Where to start: after everything that is both processed and durable. The store's
        // position is never ahead of Kafka's outputs; the group offset is ahead of it when
        // another instance processed the partition since (its changelog is restored first),
        // or after a crash under exactly-once.
        let stored = store.next_offset(topic)?;
        let start = match stored.max(committed) {
            Some(start) => start,
            None => self.reset_position(consumer, topic, partition)?,
        };
        let split = |topic: &str| {
            PartitionStream::split(consumer, topic, partition).ok_or_else(|| {
                Error::Config(format!("cannot split {topic}/{partition} off the consumer"))
            })
        };
        let stream = split(topic)?;
        // The partition's acknowledgements: from the store's position, else the group's,
        // else the beginning (applying an acknowledgement twice changes nothing).
        let acks = &self.shared.topology.topics.acks.name;
        let ack_committed = Self::committed(consumer, &[(acks.clone(), partition)])?[0];
        let ack_start = match store.next_offset(acks)?.max(ack_committed) {
            Some(start) => start,
            None => {
                consumer
                    .fetch_watermarks(acks, partition, COMMITTED_TIMEOUT)?
                    .0
            }
        };
        let ack_stream = split(acks)?;
        let slot = self.committer.register(partition, topic, start);
        let worker = PartitionWorker::new(
            self.shared.clone(),
            self.committer.clone(),
            consumer.clone(),
            slot.clone(),
            start,
            ack_start,
        );
        let stop = CancellationToken::new();
        let shared = self.shared.clone();
        let token = stop.clone();
        let failed = self.failed.clone();
        let task = self.runtime.spawn(async move {
            // A worker ends on its own only on a fatal error or a panic outside the record
            // path (where a panic is set aside with its record): the partition is dead, so
            // the instance says so and stops non-zero.
            let ended = AssertUnwindSafe(worker.run(stream, ack_stream, token))
                .catch_unwind()
                .await;
            let error = match ended {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(panic) => Error::Fatal(format!(
                    "partition {partition}: its worker panicked: {}",
                    super::worker::panic_message(&*panic)
                )),
            };
            let mut failed = failed.lock().expect("failed map lock");
            failed.insert(partition, error.to_string());
            shared.metrics.failed_partitions.set(failed.len() as i64);
            drop(failed);
            shared.failure.fail(error);
        });
        let old = self
            .workers
            .lock()
            .expect("worker map lock")
            .insert(partition, Running { stop, task, slot });
        debug_assert!(old.is_none(), "a partition is assigned once at a time");
        let offset = Offset::Offset(start);
        tracing::info!(
            topic,
            partition,
            ?offset,
            acks_offset = ack_start,
            "Partition worker started."
        );
        Ok(vec![
            ((topic.to_owned(), partition), offset),
            ((acks.clone(), partition), Offset::Offset(ack_start)),
        ])
    }

    /// Stops the workers of `partitions`, waits until they finished their batch, and commits.
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
        let stopped: Vec<i32> = running.iter().map(|(p, _)| *p).collect();
        self.runtime.block_on(async {
            for (partition, r) in running {
                if let Err(e) = r.task.await {
                    tracing::error!(partition, error = %e, "Partition worker panicked.");
                }
            }
            if let Err(e) = self.committer.commit().await {
                // The partitions' uncommitted work is replayed by their next owner.
                tracing::warn!(error = %e, "Commit before hand-over failed.");
            }
        });
        for p in stopped {
            self.committer.unregister(p);
            tracing::info!(partition = p, "Partition worker stopped.");
        }
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

/// The rebalance handler wraps an `Arc<Coordinator>`.
pub struct Handler(pub Arc<Coordinator>);

impl RebalanceHandler for Handler {
    fn assign(
        &self,
        consumer: &Arc<Consumer>,
        partitions: &[TopicPartition],
    ) -> Vec<(TopicPartition, Offset)> {
        let committed = match Coordinator::committed(consumer, partitions) {
            Ok(c) => c,
            Err(e) => {
                self.0.shared.failure.fail(Error::Fatal(format!(
                    "cannot read the group's committed offsets of the assigned partitions: {e}"
                )));
                return Vec::new();
            }
        };
        let mut assignment = Vec::new();
        for ((topic, partition), committed) in partitions.iter().zip(committed) {
            match self.0.start(consumer, topic, *partition, committed) {
                Ok(mut parts) => assignment.append(&mut parts),
                Err(e) => self.0.shared.failure.fail(e),
            }
        }
        self.0.update_gauge();
        assignment
    }

    fn revoke(&self, partitions: &[TopicPartition]) -> Vec<TopicPartition> {
        let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
        self.0.stop(&numbers);
        let acks = &self.0.shared.topology.topics.acks.name;
        numbers.into_iter().map(|p| (acks.clone(), p)).collect()
    }
}
