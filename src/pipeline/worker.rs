//! The partition worker: the async shell around a [`Processor`] for one input partition.
//!
//! It restores the partition's twins from the changelog, then loops: wait for records, take
//! the read side of the commit gate, process a batch into the partition's staged state, send
//! the batch's outputs, release the gate. The [`Committer`] makes staged state durable.
//!
//! Invariants:
//! - nothing reaches the store that Kafka has not made durable (see the committer);
//! - when staged work was dropped (the committer's epoch moved), the worker forgets its cache
//!   and seeks back to the stored position before processing anything else, so every input
//!   record is applied exactly once to the committed state.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::{Message, Offset};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::committer::{Committer, Slot};
use super::processor::{
    Batch, Input, Outputs, Processor, RecordHeaders, SOURCE_OFFSET_HEADER, Target, Work,
};
use super::restore::restore;
use crate::error::{Disposition, Error, Result};
use crate::kafka::{Consumer, MessageHeaders, PartitionStream, cached_watermarks};

/// What woke the worker.
enum Next<'a> {
    /// A telemetry record.
    Reading(rdkafka::error::KafkaResult<BorrowedMessage<'a>>),
    /// An acknowledgement record.
    Ack(rdkafka::error::KafkaResult<BorrowedMessage<'a>>),
    /// Time to look for due timers.
    Tick,
    /// The commit epoch moved: staged work was dropped.
    Epoch,
}

/// The two inputs of a partition.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Telemetry readings.
    Readings,
    /// Alert acknowledgements.
    Acks,
}

/// Consecutive failures of a restore or a rewind after which the worker gives up.
const MAX_REPLAYS: u32 = 10;

impl RecordHeaders for MessageHeaders<'_> {
    fn each(&self, f: &mut dyn FnMut(&[u8], Option<&[u8]>)) {
        self.visit(f);
    }
}

/// The message of a caught panic.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// One partition's worker.
pub struct PartitionWorker {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
    consumer: Arc<Consumer>,
    slot: Arc<Slot>,
    partition: i32,
    processor: Processor,
    /// Where processing starts. Rewinds never go below it, and a restore applies only
    /// changelog records of input before it.
    start: i64,
    /// Records below this offset are from before a rewind and are ignored.
    floor: i64,
    /// The next input offset to process: timer output goes with this position.
    position: i64,
    /// Acknowledgements below this offset are from before a rewind and are ignored.
    ack_floor: i64,
    epoch: u64,
    epochs: watch::Receiver<u64>,
    /// A record that was not processed because its writer schema (this registry id) must
    /// be fetched first, and its offset, where processing goes on.
    needs_schema: Option<(u32, i64)>,
}

impl PartitionWorker {
    /// A worker for the partition of `slot`.
    pub fn new(
        shared: Arc<Shared>,
        committer: Arc<Committer>,
        consumer: Arc<Consumer>,
        slot: Arc<Slot>,
        start: i64,
        ack_start: i64,
    ) -> Self {
        let store = shared.store.partition(slot.partition);
        PartitionWorker {
            processor: Processor::new(
                shared.topology.clone(),
                store,
                shared.settings.twin_cache_per_partition,
            )
            .with_max_record_bytes(shared.producer.max_record_bytes()),
            partition: slot.partition,
            epoch: committer.epoch(),
            epochs: committer.epochs(),
            start,
            floor: start,
            position: start,
            ack_floor: ack_start,
            needs_schema: None,
            shared,
            committer,
            consumer,
            slot,
        }
    }

    /// Restores, then processes until `stop` is cancelled (after finishing the batch in
    /// flight) or a fatal error.
    ///
    /// # Errors
    /// A fatal error, or a transient one that kept failing `MAX_REPLAYS` times in a row.
    pub async fn run(
        mut self,
        stream: PartitionStream,
        acks: PartitionStream,
        stop: CancellationToken,
    ) -> Result<()> {
        let mut failures = 0u32;
        loop {
            let shared = self.shared.clone();
            let partition = self.partition;
            let start = self.start;
            let restored = tokio::task::spawn_blocking(move || restore(&shared, partition, start))
                .await
                .map_err(|e| Error::Store(format!("restore task: {e}")))?;
            match restored {
                Ok(_) => break,
                Err(e) => failures = self.retry(e, failures, &stop).await?,
            }
            if stop.is_cancelled() {
                return Ok(());
            }
        }
        self.slot.metrics.next_offset.set(self.start);
        self.slot
            .processing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let time = self.shared.topology.model.time;
        let timers = time.offline_after.is_some() || time.idle_after.is_some();
        let mut ticks = tokio::time::interval(self.shared.settings.timer_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A dropped commit wakes an idle worker too: its staged work must be replayed
            // even if no more input comes. So does a timer tick: timers fire on a quiet
            // partition.
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = self.epochs.changed() => Next::Epoch,
                _ = ticks.tick(), if timers => Next::Tick,
                m = stream.next() => Next::Reading(m),
                m = acks.next() => Next::Ack(m),
            };
            let committer = self.committer.clone();
            let gate = committer.gate().await;
            if self.committer.epoch() != self.epoch {
                // Staged work was dropped: this record may be ahead of the stored position.
                drop(next);
                drop(gate);
                self.back_off(&stop).await;
                failures = match self.rewind().await {
                    Ok(()) => 0,
                    Err(e) => self.retry(e, failures, &stop).await?,
                };
                continue;
            }
            let started = Instant::now();
            let outcome = match next {
                Next::Reading(first) => self.run_records(Source::Readings, first, &stream).await,
                Next::Ack(first) => self.run_records(Source::Acks, first, &acks).await,
                Next::Tick => self.run_timers().await,
                Next::Epoch => continue,
            };
            if let Err(e) = &outcome {
                // Before the gate opens: no commit may take this partition's staged work,
                // whose outputs were not all sent.
                self.committer.poison(!matches!(e, Error::Panicked { .. }));
            }
            drop(gate);
            if let Some((id, offset)) = self.needs_schema.take() {
                // Outside the gate: a slow registry must not hold up other partitions' commits.
                self.fetch_schema(id, offset, &stop).await?;
            }
            match outcome {
                Ok(()) => self
                    .slot
                    .metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64()),
                Err(e) if e.disposition() == Disposition::Retry => {
                    // Everything uncommitted goes, for all partitions: under exactly-once this
                    // partition's outputs share the transaction with the others'. The epoch
                    // moves on, so the next turn backs off and rewinds.
                    tracing::warn!(error = %e, partition = self.partition, "Batch failed; replaying from the stored position.");
                    self.committer.abort(&e.to_string()).await?;
                }
                Err(e) => return Err(e),
            }
            // With input always waiting, nothing above needs to wait: let the committer,
            // the other partitions and the API run before the next batch.
            tokio::task::yield_now().await;
        }
    }

    /// Before a rewind: waits the retry back-off for the failures in a row (doubling from
    /// `processing.retry_backoff` up to 30 s), so work that keeps failing does not spin.
    async fn back_off(&self, stop: &CancellationToken) {
        let failures = self.committer.failures();
        if failures == 0 {
            return;
        }
        let backoff = self.shared.settings.retry_backoff * 2u32.pow((failures - 1).min(6));
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(backoff.min(Duration::from_secs(30))) => {}
        }
    }

    /// Pins a caught panic on the work it happened in: sets that aside for the replay and
    /// says so at ERROR with the record's coordinates.
    ///
    /// # Errors
    /// `Panicked` (retry: the partition replays past the work), or `Fatal` when the same
    /// work panicked again while being set aside.
    fn panicked(&mut self, panic: &(dyn std::any::Any + Send)) -> Error {
        let message = panic_message(panic);
        let Some(work) = self.processor.quarantine(message.clone()) else {
            return Error::Fatal(format!(
                "partition {}: a panic outside any record, or again while setting aside a record that panicked: {message}",
                self.partition
            ));
        };
        self.shared.metrics.panics(work.kind()).inc();
        let (topic, what) = match &work {
            Work::Reading(offset) => (self.slot.topic.as_str(), format!("offset {offset}")),
            Work::Ack(offset) => (
                self.shared.topology.topics.acks.name.as_str(),
                format!("offset {offset}"),
            ),
            Work::Timer(deadline, id) => ("timer", format!("asset {id} due at {deadline}")),
        };
        tracing::error!(
            topic,
            partition = self.partition,
            work = %what,
            panic = %message,
            "Processing panicked; setting the record aside (a bug: please report it)."
        );
        Error::Panicked {
            work: format!("{} {what} of {topic}/{}", work.kind(), self.partition),
            message,
        }
    }

    /// Backs off after a transient failure, or gives up after `MAX_REPLAYS` in a row.
    async fn retry(&self, e: Error, failures: u32, stop: &CancellationToken) -> Result<u32> {
        if e.disposition() != Disposition::Retry || failures >= MAX_REPLAYS {
            return Err(e);
        }
        tracing::warn!(error = %e, partition = self.partition, attempt = failures + 1, "Partition failed; retrying from the stored position.");
        let backoff = self.shared.settings.retry_backoff * 2u32.pow(failures.min(6));
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(backoff.min(Duration::from_secs(30))) => {}
        }
        Ok(failures + 1)
    }

    /// Processes the waiting records of one input (`first` and what else is fetched, up to a
    /// batch) into the staged batch and sends their outputs.
    async fn run_records(
        &mut self,
        source: Source,
        first: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
        stream: &PartitionStream,
    ) -> Result<()> {
        let mut batch = self.staged();
        let now = self.shared.clock.now_ms();
        let floor = match source {
            Source::Readings => self.floor,
            Source::Acks => self.ack_floor,
        };
        let mut next = Some(first);
        let mut taken = 0;
        let mut result = Ok(());
        // The messages borrow the stream; they are all processed before the first await.
        // A panic is caught here, pinned on its record, and fails the batch.
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            while let Some(m) = next.take() {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                };
                if m.offset() >= floor {
                    let headers = MessageHeaders::of(&m);
                    let record = Input {
                        key: m.key(),
                        payload: m.payload(),
                        topic: m.topic(),
                        offset: m.offset(),
                        headers: Some(&headers),
                    };
                    let processed = match source {
                        Source::Readings => self.processor.process(&record, &mut batch, now),
                        Source::Acks => {
                            self.processor
                                .process_ack(&record, &mut batch, now, self.position - 1)
                        }
                    };
                    match processed {
                        Ok(()) => {}
                        Err(Error::SchemaNeeded(id)) => {
                            // The batch ends before this record; it is read again once the
                            // schema is known.
                            self.needs_schema = Some((id, m.offset()));
                            break;
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                taken += 1;
                next = if taken < self.shared.settings.batch_max_records {
                    stream.try_next()
                } else {
                    None
                };
            }
        }));
        if let Err(panic) = caught {
            result = Err(self.panicked(&*panic));
        }
        drop(next);
        if let Some(next) = batch.next_offset.filter(|_| source == Source::Readings) {
            self.position = next;
            // Input not yet committed: the end as of the last fetch (cached by the client,
            // no request) minus the committed position.
            if let Some((_, high)) =
                cached_watermarks(&*self.consumer, &self.slot.topic, self.partition)
            {
                let lag = high - self.slot.committed();
                self.slot.metrics.lag.set(lag.max(0));
            }
        }
        self.send_and_stage(batch, result).await
    }

    /// Fires the due timers into the staged batch and sends their outputs.
    async fn run_timers(&mut self) -> Result<()> {
        let fresh = self.slot.staged.lock().expect("slot lock").is_none();
        let mut batch = self.staged();
        let now = self.shared.clock.now_ms();
        let limit = self.shared.settings.batch_max_records;
        let position = self.position;
        let fired = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.processor
                .fire_timers(&mut batch, now, position - 1, limit)
                .map(|_| ())
        }));
        let result = fired.unwrap_or_else(|panic| Err(self.panicked(&*panic)));
        if result.is_ok() && fresh && batch.store.is_empty() {
            return Ok(()); // nothing due: nothing to commit
        }
        self.send_and_stage(batch, result).await
    }

    /// The partition's staged batch, or a new one. Nothing staged and no commit settling
    /// means the store holds everything, so the cache may shed twins.
    fn staged(&mut self) -> Batch {
        let staged = self.slot.staged.lock().expect("slot lock").take();
        staged.unwrap_or_else(|| self.processor.batch(self.committer.settled()))
    }

    /// Sends the batch's outputs (unless processing failed) and stages it for the committer.
    /// Work without input of its own (acknowledgements, timers) commits with the current
    /// input position.
    async fn send_and_stage(&mut self, mut batch: Batch, mut result: Result<()>) -> Result<()> {
        batch.next_offset.get_or_insert(self.position);
        if result.is_ok() {
            result = self.send(&batch.outputs).await;
        }
        batch.outputs.clear();
        *self.slot.staged.lock().expect("slot lock") = Some(batch);
        result
    }

    /// Sends a batch's outputs (the committer makes them durable).
    async fn send(&self, outputs: &Outputs) -> Result<()> {
        let topics = &self.shared.topology.topics;
        let generation = self.committer.generation();
        for o in &outputs.records {
            let (key, payload) = outputs.bytes(o);
            let (topic, partition, headers) = match o.target {
                Target::Changelog => {
                    let source = o.source.to_string();
                    let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: SOURCE_OFFSET_HEADER,
                        value: Some(&source),
                    });
                    (&topics.changelog.name, Some(self.partition), Some(headers))
                }
                Target::Alerts => (&topics.alerts.name, None, None),
                Target::DeadLetter => {
                    let headers = o
                        .headers
                        .iter()
                        .fold(OwnedHeaders::new(), |h, (key, value)| {
                            h.insert(Header {
                                key,
                                value: value.as_deref(),
                            })
                        });
                    (&topics.dead_letter.name, None, Some(headers))
                }
            };
            self.shared
                .producer
                .send(generation, topic, partition, key, payload, headers)
                .await?;
        }
        Ok(())
    }

    /// Fetches writer schema `id` from the registry, retrying while it cannot be reached, and
    /// seeks back to `offset`, the record that needs it.
    async fn fetch_schema(&mut self, id: u32, offset: i64, stop: &CancellationToken) -> Result<()> {
        let registry = self.shared.registry.clone().ok_or_else(|| {
            Error::Config("a Confluent-framed input needs [schema_registry]".into())
        })?;
        let mut failures = 0u32;
        while let Err(e) = registry.fetch(id, &self.shared.topology.codec).await {
            if e.disposition() != Disposition::Retry {
                return Err(e);
            }
            let backoff = self.shared.settings.retry_backoff * 2u32.pow(failures.min(6));
            tracing::warn!(error = %e, partition = self.partition, "Schema registry unavailable; retrying.");
            failures += 1;
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.min(Duration::from_secs(30))) => {}
            }
        }
        let (consumer, topic, partition) = (
            self.consumer.clone(),
            self.slot.topic.clone(),
            self.partition,
        );
        tokio::task::spawn_blocking(move || {
            consumer.seek(
                &topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(10),
            )
        })
        .await
        .map_err(|e| Error::Store(format!("seek task: {e}")))??;
        Ok(())
    }

    /// Forgets in-memory state and seeks back to the stored position.
    async fn rewind(&mut self) -> Result<()> {
        self.epoch = *self.epochs.borrow_and_update();
        self.slot.metrics.replays.inc();
        self.processor.reset();
        self.slot.staged.lock().expect("slot lock").take();
        let stored = self
            .shared
            .store
            .partition(self.partition)
            .next_offset(&self.slot.topic)?;
        self.floor = stored.unwrap_or(self.start).max(self.start);
        self.position = self.floor;
        let acks = &self.shared.topology.topics.acks.name;
        let ack_stored = self
            .shared
            .store
            .partition(self.partition)
            .next_offset(acks)?;
        // Without a stored position the acknowledgements were read from ack_floor on.
        self.ack_floor = ack_stored.unwrap_or(self.ack_floor);
        self.processor.forget_before(self.floor, self.ack_floor);
        let seeks = [
            (self.slot.topic.clone(), self.floor),
            (acks.clone(), self.ack_floor),
        ];
        let consumer = self.consumer.clone();
        let partition = self.partition;
        tokio::task::spawn_blocking(move || {
            seeks.iter().try_for_each(|(topic, offset)| {
                consumer.seek(
                    topic,
                    partition,
                    Offset::Offset(*offset),
                    Duration::from_secs(10),
                )
            })
        })
        .await
        .map_err(|e| Error::Store(format!("seek task: {e}")))??;
        Ok(())
    }
}
