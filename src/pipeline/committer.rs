//! The committer: makes the workers' progress durable, for all partitions of the instance at
//! once, every `processing.commit_interval` and whenever partitions are revoked.
//!
//! Workers process a batch only while holding the read side of the commit gate; a commit
//! takes the write side, so it always sees every worker at a batch boundary. A commit:
//! 1. at-least-once: waits until every output sent so far is delivered;
//!    exactly-once: sends the input offsets to the open transaction and commits it;
//! 2. only then writes each partition's staged twins, input offset and changelog offset to
//!    RocksDB, in one write batch per partition.
//!
//! So the store never holds state that Kafka does not. When a commit cannot complete, every
//! staged change is dropped (and the transaction aborted), the epoch moves on, and each
//! worker rewinds to its stored position before its next batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::producer::Producer as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::processor::Batch;
use crate::config::Guarantee;
use crate::error::{Error, Result};
use crate::kafka::Consumer;
use crate::metrics::PartitionMetrics;

/// Consecutive failed commits after which the instance stops.
const MAX_FAILED_COMMITS: u32 = 10;
/// Bound on one flush or transaction commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// One partition's work since the last commit.
pub struct Slot {
    /// The partition.
    pub partition: i32,
    /// Input topic.
    pub topic: String,
    /// Staged store writes, counts and position; `None` when nothing is staged.
    pub staged: Mutex<Option<Batch>>,
    /// Where the committed counts go.
    pub metrics: PartitionMetrics,
}

/// Commits the progress of every partition of the instance.
pub struct Committer {
    shared: Arc<Shared>,
    gate: RwLock<()>,
    slots: Mutex<BTreeMap<i32, Arc<Slot>>>,
    epoch: AtomicU64,
    consumer: OnceLock<Weak<Consumer>>,
}

impl Committer {
    /// A committer; under exactly-once the producer's first transaction must be open.
    pub fn new(shared: Arc<Shared>) -> Self {
        Committer {
            shared,
            gate: RwLock::new(()),
            slots: Mutex::new(BTreeMap::new()),
            epoch: AtomicU64::new(0),
            consumer: OnceLock::new(),
        }
    }

    /// Tells the committer which consumer's group the offsets belong to.
    pub fn attach(&self, consumer: &Arc<Consumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    /// Registers a partition's slot.
    pub fn register(&self, partition: i32, topic: &str) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            partition,
            topic: topic.to_owned(),
            staged: Mutex::new(None),
            metrics: self
                .shared
                .metrics
                .partition(partition, &self.shared.topology.rules),
        });
        self.slots
            .lock()
            .expect("slots lock")
            .insert(partition, slot.clone());
        slot
    }

    /// Forgets a partition's slot (after its last commit).
    pub fn unregister(&self, partition: i32) {
        self.slots.lock().expect("slots lock").remove(&partition);
    }

    /// Held by a worker while it processes a batch.
    pub async fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// Changes whenever staged work was dropped; workers then rewind.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Commits every partition's staged work.
    ///
    /// # Errors
    /// `Retry` when the outputs could not be made durable (everything staged was dropped
    /// and workers will replay); `Fatal` when the producer is fenced or broken, or the store
    /// cannot be written after Kafka committed.
    pub async fn commit(&self) -> Result<()> {
        let _exclusive = self.gate.write().await;
        let staged: Vec<(Arc<Slot>, Batch)> = {
            let slots = self.slots.lock().expect("slots lock");
            slots
                .values()
                .filter_map(|s| {
                    s.staged
                        .lock()
                        .expect("slot lock")
                        .take()
                        .map(|b| (s.clone(), b))
                })
                .collect()
        };
        if staged.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut offsets = TopicPartitionList::new();
        for (slot, batch) in &staged {
            if let Some(next) = batch.next_offset {
                offsets.add_partition_offset(&slot.topic, slot.partition, Offset::Offset(next))?;
            }
        }
        let deliveries = match self.make_durable(offsets).await {
            Ok(d) => d,
            Err(e) => {
                self.drop_staged("commit failed").await?;
                return Err(e);
            }
        };
        for (slot, mut batch) in staged {
            let Some(next) = batch.next_offset else {
                continue;
            };
            batch.store.set_next_offset(&slot.topic, next);
            if let Some(c) = deliveries.get(&slot.partition) {
                batch.store.set_changelog_next(*c);
            }
            let store = self.shared.store.partition(slot.partition);
            let writes = batch.store;
            tokio::task::spawn_blocking(move || store.commit(writes))
                .await
                .map_err(|e| Error::CorruptStore(format!("store commit task: {e}")))?
                .map_err(|e| Error::CorruptStore(format!("writing committed state: {e}")))?;
            slot.metrics.publish(&batch.counts);
            slot.metrics.next_offset.set(next);
            if self.shared.settings.guarantee == Guarantee::AtLeastOnce {
                // Advisory: the store owns the position; the group offset shows lag to tools.
                // (librdkafka stores the given offset + 1.)
                if let Some(c) = self.consumer.get().and_then(Weak::upgrade) {
                    let _ = c.store_offset(&slot.topic, slot.partition, next - 1);
                }
            }
        }
        self.shared.metrics.commits(true).inc();
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Delivers (at-least-once) or commits the transaction of (exactly-once) everything sent
    /// since the last commit; returns the changelog offsets reached per partition.
    async fn make_durable(&self, offsets: TopicPartitionList) -> Result<BTreeMap<i32, i64>> {
        let shared = self.shared.clone();
        let guarantee = shared.settings.guarantee;
        let group = match guarantee {
            Guarantee::ExactlyOnce => {
                let consumer = self.consumer.get().and_then(Weak::upgrade);
                Some(consumer.and_then(|c| c.group_metadata()).ok_or_else(|| {
                    Error::Config("exactly-once needs the consumer's group metadata".into())
                })?)
            }
            Guarantee::AtLeastOnce => None,
        };
        tokio::task::spawn_blocking(move || {
            let producer = shared.producer.inner();
            match &group {
                None => producer.flush(COMMIT_TIMEOUT)?,
                Some(group) => {
                    producer.send_offsets_to_transaction(&offsets, group, COMMIT_TIMEOUT)?;
                    producer.commit_transaction(COMMIT_TIMEOUT)?;
                }
            }
            let d = shared.producer.take_deliveries();
            // Under exactly-once the committed transaction is the verdict; under
            // at-least-once a failed delivery means the outputs are not all there.
            if let (Some(e), None) = (d.failure, &group) {
                return Err(Error::Kafka(e));
            }
            if group.is_some() {
                producer.begin_transaction()?;
            }
            Ok(d.changelog_next)
        })
        .await
        .map_err(|e| Error::Store(format!("commit task: {e}")))?
    }

    /// Drops all staged work (aborting the transaction) and moves the epoch on, so every
    /// worker rewinds to its stored position. Called by a worker whose batch failed, with
    /// its gate released.
    ///
    /// # Errors
    /// `Fatal` when the transaction cannot be aborted.
    pub async fn abort(&self, reason: &str) -> Result<()> {
        let _exclusive = self.gate.write().await;
        self.drop_staged(reason).await
    }

    async fn drop_staged(&self, reason: &str) -> Result<()> {
        for slot in self.slots.lock().expect("slots lock").values() {
            slot.staged.lock().expect("slot lock").take();
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.metrics.commits(false).inc();
        tracing::warn!(
            reason,
            "Dropping uncommitted work; partitions replay from their stored positions."
        );
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let producer = shared.producer.inner();
            if shared.settings.guarantee == Guarantee::ExactlyOnce {
                producer.abort_transaction(COMMIT_TIMEOUT)?;
                producer.begin_transaction()?;
            } else {
                // Let in-flight records settle so their failures are not blamed on the
                // replay.
                let _ = producer.flush(COMMIT_TIMEOUT);
            }
            shared.producer.take_deliveries();
            Ok::<_, Error>(())
        })
        .await
        .map_err(|e| Error::Store(format!("abort task: {e}")))?
        .map_err(|e| match e {
            Error::Kafka(k) => Error::Fatal(format!("cannot abort the transaction: {k}")),
            other => other,
        })
    }

    /// Commits every interval until `stop` is cancelled. A commit that keeps failing, or a
    /// fatal one, stops the instance.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.shared.settings.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.commit().await {
                Ok(()) => failures = 0,
                Err(e)
                    if e.disposition() == crate::error::Disposition::Retry
                        && failures < MAX_FAILED_COMMITS =>
                {
                    failures += 1;
                    tracing::warn!(error = %e, attempt = failures, "Commit failed; replaying.");
                }
                Err(e) => {
                    self.shared.failure.fail(e);
                    return;
                }
            }
        }
    }
}
