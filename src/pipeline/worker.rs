//! The partition worker: the async shell around a [`Processor`] for one input partition.
//!
//! Invariants:
//! - a batch's outputs are all delivered before its twins and next offset are committed, in
//!   one store write; a crash in between replays the batch and re-emits the same outputs
//!   (same twin versions, same alert ids): at-least-once, never loss;
//! - only transient Kafka or store failures leave a batch; they rewind to the stored position
//!   and the batch is processed again from committed state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer as _;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::{Message, Offset};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::processor::{Batch, Input, Outputs, Processor, Target};
use crate::error::{Disposition, Error, Result};
use crate::kafka::{Consumer, Emitter, PartitionStream};
use crate::metrics::PartitionMetrics;
use crate::store::PartitionStore;

/// Consecutive failed batches after which a transient failure counts as fatal.
const MAX_REPLAYS: u32 = 10;

/// One partition's worker.
pub struct PartitionWorker {
    shared: Arc<Shared>,
    consumer: Arc<Consumer>,
    topic: String,
    partition: i32,
    store: PartitionStore,
    processor: Processor,
    emitter: Emitter,
    metrics: PartitionMetrics,
    /// First offset not yet committed to the store; `None` until the first commit of a
    /// partition with no stored position.
    next_offset: Option<i64>,
}

impl PartitionWorker {
    /// A worker for `topic`/`partition`, starting at `next_offset` (the store's position).
    pub fn new(
        shared: Arc<Shared>,
        consumer: Arc<Consumer>,
        topic: String,
        partition: i32,
        next_offset: Option<i64>,
    ) -> Self {
        let store = shared.store.partition(partition);
        let metrics = shared.metrics.partition(partition, &shared.topology.rules);
        if let Some(next) = next_offset {
            metrics.next_offset.set(next);
        }
        PartitionWorker {
            processor: Processor::new(
                shared.topology.clone(),
                store.clone(),
                shared.settings.twin_cache_per_partition,
            ),
            emitter: Emitter::new(shared.producer.clone()),
            store,
            metrics,
            consumer,
            topic,
            partition,
            next_offset,
            shared,
        }
    }

    /// Runs until `stop` is cancelled (after finishing the batch in flight) or a fatal error.
    ///
    /// # Errors
    /// A fatal error, or a transient one that kept failing `MAX_REPLAYS` times in a row.
    pub async fn run(mut self, stream: PartitionStream, stop: CancellationToken) -> Result<()> {
        let mut failures = 0u32;
        let mut rewind = false;
        loop {
            if rewind {
                let backoff = self.shared.settings.retry_backoff * 2u32.pow(failures.min(6) - 1);
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff.min(Duration::from_secs(30))) => {}
                }
                match self.rewind().await {
                    Ok(()) => rewind = false,
                    Err(e) => failures = self.failed(e, failures)?,
                }
                continue;
            }
            let first = tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                m = stream.next() => m,
            };
            let started = Instant::now();
            match self.run_batch(first, &stream).await {
                Ok(()) => {
                    failures = 0;
                    self.metrics
                        .batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    failures = self.failed(e, failures)?;
                    rewind = true;
                }
            }
        }
    }

    /// Decides whether a failure is retried (returning the new failure count) or stops the
    /// worker.
    fn failed(&self, e: Error, failures: u32) -> Result<u32> {
        if e.disposition() != Disposition::Retry || failures >= MAX_REPLAYS {
            return Err(e);
        }
        self.metrics.replays.inc();
        tracing::warn!(error = %e, partition = self.partition, attempt = failures + 1, "Batch failed; replaying from the stored position.");
        Ok(failures + 1)
    }

    async fn run_batch(
        &mut self,
        first: rdkafka::error::KafkaResult<BorrowedMessage<'_>>,
        stream: &PartitionStream,
    ) -> Result<()> {
        let mut batch = self.processor.batch(self.next_offset);
        let now = self.shared.clock.now_ms();
        let mut next = Some(first);
        let mut taken = 0;
        // The messages borrow the stream; they are all processed before the first await.
        while let Some(m) = next.take() {
            let m = m?;
            // Offsets below the stored position were applied already (a fetch from before a
            // rewind); everything else is processed.
            if self.next_offset.is_none_or(|n| m.offset() >= n) {
                let input = Input {
                    key: m.key(),
                    payload: m.payload(),
                    topic: m.topic(),
                    offset: m.offset(),
                    headers: m.headers(),
                };
                self.processor.process(&input, &mut batch, now)?;
            }
            taken += 1;
            next = if taken < self.shared.settings.batch_max_records {
                stream.try_next()
            } else {
                None
            };
        }
        drop(next);
        self.emit(&batch.outputs).await?;
        self.commit(batch).await
    }

    /// Sends the batch's outputs and waits until every one is delivered.
    async fn emit(&mut self, outputs: &Outputs) -> Result<()> {
        let topics = &self.shared.topology.topics;
        for o in &outputs.records {
            let (key, payload) = outputs.bytes(o);
            let (topic, partition, headers) = match o.target {
                Target::Changelog => (&topics.changelog.name, Some(self.partition), None),
                Target::Alerts => (&topics.alerts.name, None, None),
                Target::DeadLetter => {
                    let headers = o
                        .headers
                        .iter()
                        .fold(OwnedHeaders::new(), |h, (key, value)| {
                            h.insert(Header {
                                key,
                                value: Some(value),
                            })
                        });
                    (&topics.dead_letter.name, None, Some(headers))
                }
            };
            self.emitter
                .send(topic, partition, key, payload, headers)
                .await?;
        }
        self.emitter.flush().await
    }

    /// Commits the batch's twins and position together, then publishes its metrics.
    async fn commit(&mut self, mut batch: Batch) -> Result<()> {
        let Some(next) = batch.next_offset.filter(|n| Some(*n) != self.next_offset) else {
            return Ok(());
        };
        batch.store.set_next_offset(&self.topic, next);
        let started = Instant::now();
        let store = self.store.clone();
        let writes = batch.store;
        tokio::task::spawn_blocking(move || store.commit(writes))
            .await
            .map_err(|e| Error::Store(format!("store commit task: {e}")))??;
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.next_offset = Some(next);
        self.metrics.publish(&batch.counts);
        self.metrics.next_offset.set(next);
        // Advisory only: the store owns the position. The group offset shows lag to tools.
        // (librdkafka stores the given offset + 1: the last processed record is passed.)
        if let Err(error) = self
            .consumer
            .store_offset(&self.topic, self.partition, next - 1)
        {
            tracing::debug!(%error, partition = self.partition, "Cannot store the group offset.");
        }
        Ok(())
    }

    /// Drops in-memory state and seeks back to the stored position.
    async fn rewind(&mut self) -> Result<()> {
        self.emitter.abandon();
        self.processor.reset();
        let offset = self.next_offset.map_or(Offset::Beginning, Offset::Offset);
        let consumer = self.consumer.clone();
        let (topic, partition) = (self.topic.clone(), self.partition);
        tokio::task::spawn_blocking(move || {
            consumer.seek(&topic, partition, offset, Duration::from_secs(10))
        })
        .await
        .map_err(|e| Error::Store(format!("seek task: {e}")))??;
        Ok(())
    }
}
