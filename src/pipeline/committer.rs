//! The committer: makes the workers' progress durable, for all partitions of the instance at
//! once, every `processing.commit_interval` and whenever partitions are revoked.
//!
//! Workers process a batch only while holding the read side of the commit gate; a commit
//! takes the write side, so it always sees every worker at a batch boundary. There it takes
//! every partition's staged work and moves the *generation* on (each output record carries
//! the generation it was sent in). Then:
//! 1. at-least-once: it opens the gate again, and waits until every output of its
//!    generation is delivered while the workers go on with the next one;
//!    exactly-once: with the gate still shut, it stores the taken work aside (prepared),
//!    sends the input offsets to the open transaction and commits it (the transaction holds
//!    exactly the generation's outputs), then opens the gate;
//! 2. only then it writes each partition's taken twins, input offset and changelog offset
//!    to RocksDB, in one write batch per partition, while the workers go on.
//!
//! So the store never holds state that Kafka does not. Commits run one at a time. While one
//! is settling outside the gate, workers keep its twins cached (they evict nothing), so none
//! is read back from the store before it is written. When a commit cannot complete, every
//! staged change, its own and what workers staged since, is dropped (and the transaction
//! aborted), the epoch moves on, and each worker rewinds to its stored position before its
//! next batch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer as _, ConsumerGroupMetadata};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Mutex as AsyncMutex, RwLock, RwLockReadGuard, watch};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::input::InputKind;
use super::processor::Batch;
use super::slot::Slot;
use crate::error::{Disposition, Error, Result};
use crate::kafka::Consumer;

/// Failures in a row (batches or commits whose work was dropped, with no commit in
/// between) after which the instance stops.
const MAX_FAILURES: u32 = 10;
/// Bound on one flush or transaction commit.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Commits the progress of every partition of the instance.
pub struct Committer {
    shared: Arc<Shared>,
    gate: RwLock<()>,
    /// Held through a whole commit or abort: they run one at a time.
    serial: AsyncMutex<()>,
    /// The generation outputs are sent in; moves on under the gate.
    generation: AtomicU64,
    /// Set while a commit settles outside the gate: the store is behind the workers.
    settling: AtomicBool,
    slots: Mutex<BTreeMap<i32, Arc<Slot>>>,
    epoch: watch::Sender<u64>,
    poisoned: AtomicBool,
    /// Whether the failed batch behind `poisoned` counts as a failure.
    poison_counts: AtomicBool,
    /// Drops of staged work since the last commit that made progress: it survives the
    /// rewinds, so work that keeps failing backs off and, at [`MAX_FAILURES`], stops.
    failures: AtomicU32,
}

impl Committer {
    /// A committer; under exactly-once the producer's first transaction must be open.
    pub fn new(shared: Arc<Shared>) -> Self {
        Committer {
            shared,
            gate: RwLock::new(()),
            serial: AsyncMutex::new(()),
            generation: AtomicU64::new(0),
            settling: AtomicBool::new(false),
            slots: Mutex::new(BTreeMap::new()),
            epoch: watch::Sender::new(0),
            poisoned: AtomicBool::new(false),
            poison_counts: AtomicBool::new(false),
            failures: AtomicU32::new(0),
        }
    }

    /// Registers the slot of `partition`, whose readings start at `start`, assigned to
    /// `consumer`.
    pub fn register(&self, partition: i32, start: i64, consumer: &Arc<Consumer>) -> Arc<Slot> {
        let metrics = self
            .shared
            .metrics
            .partition(partition, &self.shared.topology.rules);
        let slot = Arc::new(Slot::new(partition, start, metrics, consumer));
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

    /// The generation a worker's outputs belong to; read it while holding the gate.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Whether the store holds everything committed so far, so a worker with nothing staged
    /// may evict cached twins; read it while holding the gate.
    pub fn settled(&self) -> bool {
        !self.settling.load(Ordering::SeqCst)
    }

    /// Changes whenever staged work was dropped; workers then rewind.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Failures in a row: drops of staged work since the last commit that made progress.
    pub fn failures(&self) -> u32 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Wakes a waiting worker when the epoch moves, so an idle partition replays too.
    pub fn epochs(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    /// Commits every partition's staged work.
    ///
    /// # Errors
    /// `Retry` when the outputs could not be made durable (everything staged was dropped
    /// and workers will replay); `Fatal` when the producer is fenced or broken, or the store
    /// cannot be written after Kafka committed.
    pub async fn commit(&self) -> Result<()> {
        let _serial = self.serial.lock().await;
        let mut exclusive = Some(self.gate.write().await);
        if self.poisoned.swap(false, Ordering::SeqCst) {
            // A batch failed since the last commit: nothing staged may become durable.
            return self.drop_staged("a batch failed", false).await;
        }
        let mut staged: Vec<(Arc<Slot>, Batch)> = {
            let slots = self.slots.lock().expect("slots lock");
            slots
                .values()
                .filter_map(|s| {
                    let batch = s.take_staged()?;
                    let positioned = batch.next.get(InputKind::Readings).is_some();
                    positioned.then(|| (s.clone(), batch))
                })
                .collect()
        };
        if staged.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let exactly_once = self.shared.clients.exactly_once();
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        if !exactly_once {
            // Every output of the taken work is sent: workers may go on while it is delivered.
            self.settling.store(true, Ordering::SeqCst);
            exclusive = None;
        }
        let phase = |name: &str, since: Instant| {
            self.shared
                .metrics
                .commit_phase_seconds
                .with_label_values(&[name])
                .observe(since.elapsed().as_secs_f64());
        };
        let result = async {
            let deliveries = self.deliveries(generation).await?;
            phase("deliveries", started);
            let topics = &self.shared.topology.topics;
            let mut offsets = TopicPartitionList::new();
            for (slot, batch) in &mut staged {
                for (input, next) in batch.next.iter() {
                    if let Some(next) = next {
                        let topic = input.topic(topics);
                        offsets.add_partition_offset(
                            topic,
                            slot.partition,
                            Offset::Offset(next),
                        )?;
                        batch.store.set_next_offset(topic, next);
                    }
                }
                if let Some(c) = deliveries.get(&slot.partition) {
                    batch.store.set_changelog_next(*c);
                }
            }
            if exactly_once {
                let group = staged
                    .iter()
                    .find_map(|(slot, _)| slot.consumer()?.group_metadata())
                    .ok_or_else(|| {
                        Error::Config("exactly-once needs the consumer's group metadata".into())
                    })?;
                let prepared = Instant::now();
                self.prepare(&mut staged).await?;
                phase("prepare", prepared);
                let transaction = Instant::now();
                self.commit_transaction(offsets, group).await?;
                phase("transaction", transaction);
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            let _shut = match exclusive.take() {
                Some(shut) => shut,
                None => self.gate.write().await,
            };
            self.settling.store(false, Ordering::SeqCst);
            self.drop_staged(&format!("commit failed: {e}"), true)
                .await?;
            return Err(e);
        }
        // Kafka holds the work (under exactly-once the transaction committed, and the
        // prepared copies cover a crash from here on): workers go on while the store
        // catches up.
        self.settling.store(true, Ordering::SeqCst);
        drop(exclusive);
        // One blocking task for all partitions: on a busy machine every hand-over to the
        // blocking pool can cost a scheduler slice.
        let stored = Instant::now();
        let writes: Vec<_> = staged
            .iter_mut()
            .map(|(slot, batch)| {
                let store = self.shared.store.partition(slot.partition);
                let writes = std::mem::replace(&mut batch.store, store.batch());
                (store, writes)
            })
            .collect();
        let written = tokio::task::spawn_blocking(move || {
            writes
                .into_iter()
                .try_for_each(|(store, writes)| store.commit(writes))
        })
        .await?;
        // Kafka holds work the store could not take: stop, and let the restart restore it.
        written
            .map_err(|e| Error::Fatal(format!("cannot write committed work to the store: {e}")))?;
        phase("store", stored);
        let topics = &self.shared.topology.topics;
        for (slot, batch) in staged {
            slot.metrics
                .publish(&batch.counts, self.shared.clock.now_ms());
            // The store owns the position; at-least-once, the group offset follows it.
            slot.progressed(&batch.next, topics, !exactly_once);
        }
        self.settling.store(false, Ordering::SeqCst);
        self.failures.store(0, Ordering::SeqCst);
        self.shared.metrics.commits(true).inc();
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Waits until every output of `generation` is delivered; returns the changelog offsets
    /// reached per partition. Under at-least-once a failed delivery fails the commit; under
    /// exactly-once the transaction's commit is the verdict.
    async fn deliveries(&self, generation: u64) -> Result<BTreeMap<i32, i64>> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            // Under exactly-once the gate is shut, so these are the transaction's records.
            // (No producer flush: rdkafka's waits in whole 100 ms polls; the reports come
            // in through the producer's own polling thread within `linger.ms` and a round
            // trip.)
            let d = shared
                .producer
                .take_deliveries(generation, COMMIT_TIMEOUT)?;
            match d.failure {
                Some(e) if !shared.clients.exactly_once() => Err(Error::Kafka(e)),
                _ => Ok(d.changelog_next),
            }
        })
        .await?
    }

    /// Stores each partition's batch aside as a prepared commit (exactly-once), so a crash
    /// after the transaction commits cannot leave the store behind it.
    async fn prepare(&self, staged: &mut [(Arc<Slot>, Batch)]) -> Result<()> {
        let mut work: Vec<_> = staged
            .iter_mut()
            .map(|(slot, batch)| {
                let store = self.shared.store.partition(slot.partition);
                let next = batch
                    .next
                    .get(InputKind::Readings)
                    .expect("staged batches have a position");
                let writes = std::mem::replace(&mut batch.store, store.batch());
                (store, next, writes)
            })
            .collect();
        let (work, result) = tokio::task::spawn_blocking(move || {
            let result = work
                .iter_mut()
                .try_for_each(|(store, next, writes)| store.prepare(*next, writes));
            (work, result)
        })
        .await?;
        for ((_, batch), (_, _, writes)) in staged.iter_mut().zip(work) {
            batch.store = writes;
        }
        result
    }

    /// Sends the input offsets to the open transaction, commits it and begins the next.
    async fn commit_transaction(
        &self,
        offsets: TopicPartitionList,
        group: ConsumerGroupMetadata,
    ) -> Result<()> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            shared
                .producer
                .commit_transaction(&offsets, &group, COMMIT_TIMEOUT)
        })
        .await?
    }

    /// Drops all staged work (aborting the transaction) and moves the epoch on, so every
    /// worker rewinds to its stored position, unless a commit did so since the batch failed.
    /// Called by a worker whose batch failed (after [`Committer::poison`]), with its gate
    /// released.
    ///
    /// # Errors
    /// `Fatal` when the transaction cannot be aborted, or after [`MAX_FAILURES`] in a row.
    pub async fn abort(&self, reason: &str) -> Result<()> {
        let _serial = self.serial.lock().await;
        let _exclusive = self.gate.write().await;
        if self.poisoned.swap(false, Ordering::SeqCst) {
            self.drop_staged(reason, false).await
        } else {
            Ok(()) // a commit in between dropped it already
        }
    }

    /// Marks the staged work as unfit to commit. Called by a worker whose batch failed,
    /// while it still holds its gate; the next commit or abort drops everything staged. A
    /// failure that `counts` adds to the failures in a row; a panic does not, since the
    /// replay sets the panicking record aside and so makes progress.
    pub fn poison(&self, counts: bool) {
        if counts {
            self.poison_counts.store(true, Ordering::SeqCst);
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }

    /// Called with the gate shut.
    async fn drop_staged(&self, reason: &str, counts: bool) -> Result<()> {
        for slot in self.slots.lock().expect("slots lock").values() {
            slot.take_staged();
            // Best effort: a prepared commit left behind is dropped at the next start, as
            // the group offset shows its transaction did not commit.
            let _ = self
                .shared
                .store
                .partition(slot.partition)
                .discard_prepared();
        }
        self.poisoned.store(false, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.metrics.commits(false).inc();
        let counts = counts | self.poison_counts.swap(false, Ordering::SeqCst);
        let failures = self.failures.load(Ordering::SeqCst) + u32::from(counts);
        self.failures.store(failures, Ordering::SeqCst);
        tracing::warn!(
            reason,
            failures,
            "Dropping uncommitted work; partitions replay from their stored positions."
        );
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let abandoned = shared.producer.abandon(COMMIT_TIMEOUT);
            // Whatever happens to them, the dropped generations' records are replayed.
            shared.producer.discard(generation);
            abandoned
        })
        .await?
        .map_err(|e| match e {
            Error::Kafka(k) => Error::Fatal(format!("cannot abort the transaction: {k}")),
            other => other,
        })?;
        if failures >= MAX_FAILURES {
            return Err(Error::Fatal(format!(
                "{failures} failures in a row without a commit; the last: {reason}"
            )));
        }
        Ok(())
    }

    /// Commits every interval until `stop` is cancelled. A commit that keeps failing, or a
    /// fatal one, stops the instance.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.shared.settings.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.commit().await {
                Ok(()) => {}
                // Counted in `failures` as the staged work was dropped.
                Err(e) if e.disposition() == Disposition::Retry => {
                    tracing::warn!(error = %e, "Commit failed; replaying.");
                }
                Err(e) => {
                    self.shared.failure.fail(e);
                    return;
                }
            }
        }
    }
}
