//! The output producer: one per instance, shared by the partition workers, optionally
//! transactional.
//!
//! Workers only enqueue, each record tagged with the commit *generation* it belongs to. Its
//! delivery callback records, per generation, what that commit needs to know: whether any
//! record failed, and the offset of the last changelog record per partition (the store
//! remembers it, so a restore reads only the tail after it). So a commit can wait for the
//! records of its own generation while workers already send the next one's.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Message, TopicPartitionList};

use super::Clients;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::pipeline::Routed;

/// librdkafka's default `message.max.bytes`: the largest record a producer sends.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

/// What the deliveries since the last commit came to.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// The first delivery error, if any.
    pub failure: Option<KafkaError>,
    /// Number of failed deliveries.
    pub failed: u64,
    /// Per changelog partition, the offset after the last delivered record.
    pub changelog_next: BTreeMap<i32, i64>,
}

/// One generation's records.
#[derive(Debug, Default)]
struct Generation {
    /// Records enqueued whose delivery report has not run yet.
    unreported: i64,
    deliveries: Deliveries,
}

/// The generations not yet taken by a commit.
#[derive(Debug, Default)]
struct Generations {
    open: BTreeMap<u64, Generation>,
    /// Reports of generations before it are ignored: their work was dropped.
    floor: u64,
}

/// Delivery bookkeeping, per generation, taken by the commits.
pub struct Tracking {
    changelog: String,
    state: Mutex<Generations>,
    reported: Condvar,
    metrics: Metrics,
}

impl ClientContext for Tracking {
    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.kafka_error("producer", &error);
        tracing::warn!(%error, reason, "Kafka producer error.");
    }
}

impl ProducerContext for Tracking {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, generation: usize) {
        let mut state = self.lock();
        let generation = generation as u64;
        if generation < state.floor {
            self.count(result);
            return;
        }
        let g = state.open.entry(generation).or_default();
        g.unreported -= 1;
        self.record(result, &mut g.deliveries);
        drop(state);
        self.reported.notify_all();
    }
}

impl Tracking {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.state.lock().expect("delivery state lock")
    }

    /// Counts a failed delivery in the metrics; purges are left out (an abort purges on
    /// purpose).
    fn count(&self, result: &DeliveryResult<'_>) {
        if let Err((error, _)) = result
            && !matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
            )
        {
            self.metrics.delivery_failures.inc();
        }
    }

    fn record(&self, result: &DeliveryResult<'_>, state: &mut Deliveries) {
        self.count(result);
        match result {
            Ok(m) if m.topic() == self.changelog => {
                let next = state.changelog_next.entry(m.partition()).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
            Ok(_) => {}
            // A purged record was not delivered either: an aborted transaction's (whose
            // work is replayed anyway), or what was queued when the producer hit a fatal
            // error, which must fail the commit.
            Err((error, _)) => {
                state.failed += 1;
                state.failure.get_or_insert_with(|| error.clone());
            }
        }
    }
}

/// The instance's producer of changelog, alert and dead-letter records.
pub struct OutputProducer {
    producer: ThreadedProducer<Tracking>,
    max_record_bytes: usize,
    transactional: bool,
}

/// Bound on starting transactions (the broker may fence an earlier incarnation first).
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

impl OutputProducer {
    /// Creates the producer the instance's `clients` describe (under exactly-once with its
    /// first transaction open); `changelog` is the topic whose offsets are tracked; errors
    /// and failed deliveries are counted in `metrics`. Blocking under exactly-once.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration, or transactions cannot start.
    pub fn new(clients: &Clients, changelog: &str, metrics: &Metrics) -> Result<OutputProducer> {
        let config = clients.producer();
        let context = Tracking {
            changelog: changelog.to_owned(),
            state: Mutex::new(Generations::default()),
            reported: Condvar::new(),
            metrics: metrics.clone(),
        };
        // librdkafka refuses a larger record at once (MSG_SIZE_TOO_LARGE): the dead
        // letters are cut to fit it.
        let max_record_bytes = config
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_RECORD_BYTES);
        let producer: ThreadedProducer<Tracking> = config.create_with_context(context)?;
        if clients.exactly_once() {
            producer.init_transactions(INIT_TIMEOUT)?;
            producer.begin_transaction()?;
        }
        Ok(OutputProducer {
            producer,
            max_record_bytes,
            transactional: clients.exactly_once(),
        })
    }

    /// Sends the input offsets of the open transaction's work to it, commits it, and opens
    /// the next. Blocking.
    ///
    /// # Errors
    /// `Error::Kafka` with the transaction error (it says whether it is fatal).
    pub fn commit_transaction(
        &self,
        offsets: &TopicPartitionList,
        group: &ConsumerGroupMetadata,
        timeout: Duration,
    ) -> Result<()> {
        self.producer
            .send_offsets_to_transaction(offsets, group, timeout)?;
        self.producer.commit_transaction(timeout)?;
        self.producer.begin_transaction()?;
        Ok(())
    }

    /// Drops what was sent since the last commit: under exactly-once aborts the open
    /// transaction and opens the next; otherwise lets the records in flight settle, so
    /// their failures are not blamed on the replay. Blocking.
    ///
    /// # Errors
    /// `Error::Kafka` when the transaction cannot be aborted.
    pub fn abandon(&self, timeout: Duration) -> Result<()> {
        if self.transactional {
            self.producer.abort_transaction(timeout)?;
            self.producer.begin_transaction()?;
        } else {
            let _ = self.producer.flush(timeout);
        }
        Ok(())
    }

    /// The largest record this producer sends (its `message.max.bytes`).
    pub fn max_record_bytes(&self) -> usize {
        self.max_record_bytes
    }

    /// What happened to the records of `generation` and before, forgetting them. Blocking:
    /// it first waits, up to `timeout`, until each of them has had its delivery report.
    ///
    /// # Errors
    /// `Error::Kafka` (timed out) when reports are still missing after `timeout`.
    pub fn take_deliveries(&self, generation: u64, timeout: Duration) -> Result<Deliveries> {
        let tracking = self.producer.context();
        let state = tracking.lock();
        let (mut state, wait) = tracking
            .reported
            .wait_timeout_while(state, timeout, |s| {
                s.open.range(..=generation).any(|(_, g)| g.unreported > 0)
            })
            .expect("delivery state lock");
        if wait.timed_out() {
            return Err(Error::Kafka(KafkaError::Flush(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        let later = state.open.split_off(&(generation + 1));
        let taken = std::mem::replace(&mut state.open, later);
        let mut all = Deliveries::default();
        for (_, g) in taken {
            let d = g.deliveries;
            all.failed += d.failed;
            if all.failure.is_none() {
                all.failure = d.failure;
            }
            for (p, next) in d.changelog_next {
                let at = all.changelog_next.entry(p).or_insert(next);
                *at = (*at).max(next);
            }
        }
        Ok(all)
    }

    /// Forgets the records of `generation` and before: their work was dropped, so their
    /// reports, even late ones, no longer matter.
    pub fn discard(&self, generation: u64) {
        let mut state = self.producer.context().lock();
        state.floor = state.floor.max(generation + 1);
        state.open = state.open.split_off(&(generation + 1));
    }

    /// Enqueues record `r` of commit `generation`; when librdkafka's queue is full, waits
    /// briefly and tries again.
    ///
    /// # Errors
    /// `Error::Kafka` when the record cannot be enqueued (for example, a fatal producer
    /// error or a transaction that must be aborted).
    pub async fn send(&self, generation: u64, r: &Routed<'_>) -> Result<()> {
        let headers = &r.headers;
        let mut headers = (!headers.is_empty()).then(|| {
            headers.iter().fold(
                OwnedHeaders::new_with_capacity(headers.len()),
                |h, (key, value)| h.insert(Header { key, value: *value }),
            )
        });
        loop {
            let mut record: BaseRecord<'_, [u8], [u8], usize> =
                BaseRecord::with_opaque_to(r.topic, generation as usize);
            record.key = r.key;
            record.payload = r.value;
            record.partition = r.partition;
            record.timestamp = r.timestamp;
            record.headers = headers.take();
            // Counted before the send: its report may run before `send` returns.
            self.unreported(generation, 1);
            let sent = self.producer.send(record);
            if sent.is_err() {
                self.unreported(generation, -1);
            }
            match sent {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    headers = record.headers;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(Error::Kafka(e)),
            }
        }
    }

    fn unreported(&self, generation: u64, n: i64) {
        let mut state = self.producer.context().lock();
        if generation >= state.floor {
            state.open.entry(generation).or_default().unreported += n;
        }
    }
}
