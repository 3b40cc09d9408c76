//! The coordinator: starts a worker per assigned partition and drains it on revoke.
//!
//! It is the consumer's [`RebalanceHandler`], so its methods run inside librdkafka's
//! rebalance callback on the consumer's polling thread and may block: `revoke` returns only
//! when the partitions' workers finished their batch and their work is committed, which is
//! what makes a hand-over lose nothing.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::committer::Committer;
use super::input::{InputKind, PerInput};
use super::slot::Slot;
use super::worker::{Inputs, PartitionWorker};
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
        !workers.is_empty() && workers.values().all(|w| w.slot.is_processing())
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

    /// Where an input partition nobody processed yet starts: its beginning, or for the
    /// group's input its end if the consumer's `auto.offset.reset` says so.
    fn reset_position(
        &self,
        consumer: &Consumer,
        input: InputKind,
        partition: i32,
    ) -> Result<i64, Error> {
        let topic = input.topic(&self.shared.topology.topics);
        let (low, high) = consumer.fetch_watermarks(topic, partition, COMMITTED_TIMEOUT)?;
        let at_end = input.is_group() && self.shared.clients.starts_at_end();
        Ok(if at_end { high } else { low })
    }

    /// Starts the worker of `partition`, whose telemetry has the group offset `committed`;
    /// returns every input partition to assign, with where it starts.
    fn start(
        &self,
        consumer: &Arc<Consumer>,
        partition: i32,
        committed: Option<i64>,
    ) -> Result<Vec<(TopicPartition, Offset)>, Error> {
        let topics = &self.shared.topology.topics;
        let store = self.shared.store.partition(partition);
        // A prepared commit left by a crash: under exactly-once the group offset, committed
        // in the same transaction, says whether it counts.
        let arbiter = committed.filter(|_| self.shared.clients.exactly_once());
        if store.resolve_prepared(arbiter)? {
            tracing::info!(
                partition,
                "Applied the commit prepared before a crash; its transaction had committed."
            );
        }
        // Where each input starts: after everything that is both processed and durable. The
        // store's position is never ahead of Kafka's outputs; the group offset is ahead of it
        // when another instance processed the partition since (its changelog is restored
        // first), or after a crash under exactly-once. A partition nobody processed starts
        // at its reset position.
        let mut starts = PerInput::all(0);
        for input in InputKind::ALL {
            let topic = input.topic(topics);
            let committed = if input.is_group() {
                committed
            } else {
                Self::committed(consumer, &[(topic.to_owned(), partition)])?[0]
            };
            let start = match store.next_offset(topic)?.max(committed) {
                Some(start) => start,
                None => self.reset_position(consumer, input, partition)?,
            };
            starts.set(input, start);
        }
        let inputs = Inputs::split(|input, ready| {
            PartitionStream::split(consumer, input.topic(topics), partition, ready)
        })?;
        let start = starts.get(InputKind::Readings);
        let slot = self.committer.register(partition, start, consumer);
        let worker = PartitionWorker::new(
            self.shared.clone(),
            self.committer.clone(),
            slot.clone(),
            starts,
        );
        let stop = CancellationToken::new();
        let shared = self.shared.clone();
        let token = stop.clone();
        let failed = self.failed.clone();
        let task = self.runtime.spawn(async move {
            // A worker ends on its own only on a fatal error or a panic outside the record
            // path (where a panic is set aside with its record): the partition is dead, so
            // the instance says so and stops non-zero.
            let ended = AssertUnwindSafe(worker.run(inputs, token))
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
        tracing::info!(partition, starts = ?starts, "Partition worker started.");
        Ok(starts
            .iter()
            .map(|(input, at)| {
                let topic = input.topic(topics).to_owned();
                ((topic, partition), Offset::Offset(at))
            })
            .collect())
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

impl crate::api::Health for Coordinator {
    fn failed(&self) -> Vec<(i32, String)> {
        Coordinator::failed(self)
    }

    fn stalled(&self) -> Vec<i32> {
        Coordinator::stalled(self)
    }

    fn assigned(&self) -> Vec<i32> {
        Coordinator::assigned(self)
    }

    fn ready(&self) -> bool {
        Coordinator::ready(self)
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
        for ((_, partition), committed) in partitions.iter().zip(committed) {
            match self.0.start(consumer, *partition, committed) {
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
        let topics = &self.0.shared.topology.topics;
        let companions = InputKind::ALL.into_iter().filter(|i| !i.is_group());
        companions
            .flat_map(|input| {
                numbers
                    .iter()
                    .map(move |p| (input.topic(topics).to_owned(), *p))
            })
            .collect()
    }
}
