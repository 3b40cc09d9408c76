//! The partition worker: the async shell around a [`Processor`] for one partition and its
//! inputs ([`InputKind`]: telemetry and acknowledgements).
//!
//! It restores the partition's twins from the changelog, then loops: wait for records of
//! any input (or a timer tick), take the read side of the commit gate, process a batch of
//! one input into the partition's staged state, send the batch's outputs, release the gate.
//! The [`Committer`] makes staged state durable.
//!
//! Invariants:
//! - nothing reaches the store that Kafka has not made durable (see the committer);
//! - when staged work was dropped (the committer's epoch moved), the worker forgets its cache
//!   and seeks every input back to its stored position before processing anything else, so
//!   every input record is applied exactly once to the committed state.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::committer::Committer;
use super::input::{Input, InputKind, PerInput, RecordHeaders};
use super::output::{Outputs, Routed, Target};
use super::processor::{Batch, Processor, Work};
use super::restore::restore;
use super::slot::Slot;
use crate::error::{Disposition, Error, Result};
use crate::kafka::{MessageHeaders, PartitionStream};

/// What woke the worker.
enum Next<'a> {
    /// A record of an input (the index in the worker's inputs).
    Record(usize, KafkaResult<BorrowedMessage<'a>>),
    /// Time to look for due timers.
    Tick,
    /// The commit epoch moved: staged work was dropped.
    Epoch,
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

/// The input streams of a partition, read in turn.
pub struct Inputs {
    streams: Vec<(InputKind, PartitionStream)>,
    /// Notified when records arrive in any of the streams' empty queues.
    ready: Arc<Notify>,
    /// The input looked at first next time, so that a busy input does not starve another.
    turn: AtomicUsize,
}

impl Inputs {
    /// The inputs of a partition: `split` splits each input's partition off the consumer
    /// with the notifier they share.
    ///
    /// # Errors
    /// What `split` returns.
    pub fn split(
        mut split: impl FnMut(InputKind, &Arc<Notify>) -> Result<PartitionStream>,
    ) -> Result<Inputs> {
        let ready = Arc::new(Notify::new());
        let streams = InputKind::ALL
            .into_iter()
            .map(|kind| Ok((kind, split(kind, &ready)?)))
            .collect::<Result<_>>()?;
        Ok(Inputs {
            streams,
            ready,
            turn: AtomicUsize::new(0),
        })
    }

    /// The next record of any input, waiting for one. Cancel-safe.
    ///
    /// librdkafka signals only the empty → non-empty transition of a queue, and not on
    /// every path that fills one; like rdkafka's own stream consumer, each wait is therefore
    /// bounded, so a missed signal costs at most `RECHECK`, never a wedged partition.
    async fn next(&self) -> (usize, KafkaResult<BorrowedMessage<'_>>) {
        const RECHECK: Duration = Duration::from_millis(100);
        let n = self.streams.len();
        loop {
            let first = self.turn.fetch_add(1, Ordering::Relaxed) % n;
            for i in (0..n).map(|i| (first + i) % n) {
                if let Some(m) = self.streams[i].1.try_next() {
                    return (i, m);
                }
            }
            let _ = tokio::time::timeout(RECHECK, self.ready.notified()).await;
        }
    }
}

/// One partition's worker.
pub struct PartitionWorker {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
    slot: Arc<Slot>,
    partition: i32,
    processor: Processor,
    /// Where each input starts. Rewinds never go below it, and a restore applies only
    /// changelog records of readings before it.
    start: PerInput<i64>,
    /// Per input, records below this offset are from before a rewind and are ignored.
    floor: PerInput<i64>,
    /// The next reading offset to process: output of other inputs and of timers goes with
    /// this position.
    position: i64,
    epoch: u64,
    epochs: watch::Receiver<u64>,
    /// A record that was not processed because its writer schema (this registry id) must
    /// be fetched first: its input and offset, where processing goes on.
    needs_schema: Option<(u32, usize, i64)>,
}

impl PartitionWorker {
    /// A worker for the partition of `slot`, whose inputs start at `start`.
    pub fn new(
        shared: Arc<Shared>,
        committer: Arc<Committer>,
        slot: Arc<Slot>,
        start: PerInput<i64>,
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
            position: start.get(InputKind::Readings),
            needs_schema: None,
            shared,
            committer,
            slot,
        }
    }

    /// Restores, then processes `inputs` until `stop` is cancelled (after finishing the
    /// batch in flight) or a fatal error.
    ///
    /// # Errors
    /// A fatal error, or a transient one that kept failing `MAX_REPLAYS` times in a row.
    pub async fn run(mut self, inputs: Inputs, stop: CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        loop {
            let shared = self.shared.clone();
            let partition = self.partition;
            let start = self.position;
            let restored =
                tokio::task::spawn_blocking(move || restore(&shared, partition, start)).await?;
            match restored {
                Ok(_) => break,
                Err(e) => failures = self.retry(e, failures, &stop).await?,
            }
            if stop.is_cancelled() {
                return Ok(());
            }
        }
        self.slot.metrics.next_offset.set(self.position);
        self.slot.start_processing();
        let timers = self.shared.topology.model.has_timers();
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
                (i, m) = inputs.next() => Next::Record(i, m),
            };
            let committer = self.committer.clone();
            let gate = committer.gate().await;
            if self.committer.epoch() != self.epoch {
                // Staged work was dropped: this record may be ahead of the stored position.
                drop(next);
                drop(gate);
                self.back_off(&stop).await;
                failures = match self.rewind(&inputs).await {
                    Ok(()) => 0,
                    Err(e) => self.retry(e, failures, &stop).await?,
                };
                continue;
            }
            let started = Instant::now();
            let outcome = match next {
                Next::Record(i, first) => {
                    let (kind, stream) = &inputs.streams[i];
                    self.run_records(*kind, i, first, stream).await
                }
                Next::Tick => self.run_timers().await,
                Next::Epoch => continue,
            };
            if let Err(e) = &outcome {
                // Before the gate opens: no commit may take this partition's staged work,
                // whose outputs were not all sent.
                self.committer.poison(!matches!(e, Error::Panicked { .. }));
            }
            drop(gate);
            if let Some((id, input, offset)) = self.needs_schema.take() {
                // Outside the gate: a slow registry must not hold up other partitions' commits.
                self.fetch_schema(id, &stop).await?;
                inputs.streams[input].1.seek(offset).await?;
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

    /// Waits `pause`, or until `stop`.
    async fn pause(pause: Duration, stop: &CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }

    /// Before a rewind: waits the retry back-off for the failures in a row, so work that
    /// keeps failing does not spin.
    async fn back_off(&self, stop: &CancellationToken) {
        let failures = self.committer.failures();
        if failures > 0 {
            Self::pause(self.shared.settings.backoff(failures - 1), stop).await;
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
            Work::Record(input, offset) => (
                input.topic(&self.shared.topology.topics),
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
        Self::pause(self.shared.settings.backoff(failures), stop).await;
        Ok(failures + 1)
    }

    /// Processes the waiting records of input `kind` (number `index` of the worker's;
    /// `first` and what else is fetched, up to a batch) into the staged batch and sends
    /// their outputs.
    async fn run_records(
        &mut self,
        kind: InputKind,
        index: usize,
        first: KafkaResult<BorrowedMessage<'_>>,
        stream: &PartitionStream,
    ) -> Result<()> {
        let mut batch = self.staged();
        let now = self.shared.clock.now_ms();
        let floor = self.floor.get(kind);
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
                    let source = self.position - 1;
                    let processed = self
                        .processor
                        .process_input(kind, &record, &mut batch, now, source);
                    match processed.map_err(|e| (e.disposition(), e)) {
                        Ok(()) => {}
                        Err((Disposition::FetchSchema(id), _)) => {
                            // The batch ends before this record; it is read again once the
                            // schema is known.
                            self.needs_schema = Some((id, index, m.offset()));
                            break;
                        }
                        Err((_, e)) => {
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
        if kind == InputKind::Readings {
            if let Some(next) = batch.next.get(InputKind::Readings) {
                self.position = next;
            }
            if let Some(end) = stream.end() {
                self.slot.saw_end(end);
            }
        }
        self.send_and_stage(batch, result).await
    }

    /// Fires the due timers into the staged batch and sends their outputs.
    async fn run_timers(&mut self) -> Result<()> {
        let fresh = self.slot.is_empty();
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
        let staged = self.slot.take_staged();
        staged.unwrap_or_else(|| self.processor.batch(self.committer.settled()))
    }

    /// Sends the batch's outputs (unless processing failed) and stages it for the committer.
    /// Work without readings of its own (other inputs, timers) commits with the current
    /// reading position.
    async fn send_and_stage(&mut self, mut batch: Batch, mut result: Result<()>) -> Result<()> {
        if batch.next.get(InputKind::Readings).is_none() {
            batch.next.set(InputKind::Readings, Some(self.position));
        }
        if result.is_ok() {
            result = self.send(&batch.outputs).await;
        }
        batch.outputs.clear();
        self.slot.stage(batch);
        result
    }

    /// Sends a batch's outputs (the committer makes them durable).
    async fn send(&self, outputs: &Outputs) -> Result<()> {
        let topics = &self.shared.topology.topics;
        let generation = self.committer.generation();
        let mut scratch = String::new();
        let producer = &self.shared.producer;
        for o in &outputs.records {
            let r = outputs.route(o, topics, self.partition, &mut scratch);
            producer.send(generation, &r).await?;
            // The history has every changelog record, in the same commit (transaction).
            if o.target == Target::Changelog
                && let Some(history) = &topics.history
            {
                let r = Routed {
                    topic: &history.name,
                    ..r
                };
                producer.send(generation, &r).await?;
            }
        }
        Ok(())
    }

    /// Fetches writer schema `id` from the registry, retrying while it cannot be reached.
    async fn fetch_schema(&mut self, id: u32, stop: &CancellationToken) -> Result<()> {
        let registry = self.shared.registry.clone().ok_or_else(|| {
            Error::Config("a Confluent-framed input needs [schema_registry]".into())
        })?;
        let mut failures = 0u32;
        while let Err(e) = registry.fetch(id, &self.shared.topology.codec).await {
            if e.disposition() != Disposition::Retry {
                return Err(e);
            }
            tracing::warn!(error = %e, partition = self.partition, "Schema registry unavailable; retrying.");
            if stop.is_cancelled() {
                return Ok(());
            }
            Self::pause(self.shared.settings.backoff(failures), stop).await;
            failures += 1;
        }
        Ok(())
    }

    /// Forgets in-memory state and seeks every input back to its stored position.
    async fn rewind(&mut self, inputs: &Inputs) -> Result<()> {
        self.epoch = *self.epochs.borrow_and_update();
        self.slot.metrics.replays.inc();
        self.processor.reset();
        self.slot.take_staged();
        let store = self.shared.store.partition(self.partition);
        let topics = &self.shared.topology.topics;
        for (kind, _) in &inputs.streams {
            // Without a stored position, the input was read from its start (or floor) on.
            let stored = store.next_offset(kind.topic(topics))?;
            let floor = match stored {
                Some(at) => at.max(self.start.get(*kind)),
                None => self.floor.get(*kind).max(self.start.get(*kind)),
            };
            self.floor.set(*kind, floor);
        }
        self.position = self.floor.get(InputKind::Readings);
        self.processor.forget_before(&self.floor);
        for (kind, stream) in &inputs.streams {
            stream.seek(self.floor.get(*kind)).await?;
        }
        Ok(())
    }
}
