//! The output producer: one per instance, shared by the partition workers, optionally
//! transactional.
//!
//! Workers only enqueue. Its delivery callback records what a commit needs to know: whether
//! any record failed since the last commit, and the offset of the last changelog record per
//! partition (the store remembers it, so a restore reads only the tail after it).

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientConfig, ClientContext, Message};

use crate::error::{Error, Result};
use crate::metrics::Metrics;

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

/// Delivery bookkeeping, read and reset at each commit.
pub struct Tracking {
    changelog: String,
    state: Mutex<Deliveries>,
    /// Records enqueued whose delivery report has not run yet.
    unreported: Mutex<i64>,
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
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        self.record(result);
        *self.unreported.lock().expect("delivery count lock") -= 1;
        self.reported.notify_all();
    }
}

impl Tracking {
    fn record(&self, result: &DeliveryResult<'_>) {
        let mut state = self.state.lock().expect("delivery state lock");
        match result {
            Ok(m) if m.topic() == self.changelog => {
                let next = state.changelog_next.entry(m.partition()).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
            Ok(_) => {}
            // A purged record was not delivered either: an aborted transaction's (whose
            // work is replayed anyway), or what was queued when the producer hit a fatal
            // error, which must fail the commit. The metric leaves purges out: an abort
            // purges on purpose.
            Err((error, _)) => {
                let purged = matches!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                );
                if !purged {
                    self.metrics.delivery_failures.inc();
                }
                state.failed += 1;
                state.failure.get_or_insert_with(|| error.clone());
            }
        }
    }
}

/// The instance's producer of changelog, alert and dead-letter records.
pub struct OutputProducer {
    producer: ThreadedProducer<Tracking>,
}

impl OutputProducer {
    /// Creates the producer; `changelog` is the topic whose offsets are tracked; errors and
    /// failed deliveries are counted in `metrics`.
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn new(
        config: &ClientConfig,
        changelog: &str,
        metrics: &Metrics,
    ) -> Result<OutputProducer> {
        let context = Tracking {
            changelog: changelog.to_owned(),
            state: Mutex::new(Deliveries::default()),
            unreported: Mutex::new(0),
            reported: Condvar::new(),
            metrics: metrics.clone(),
        };
        Ok(OutputProducer {
            producer: config.create_with_context(context)?,
        })
    }

    /// The underlying producer, for flushes and transactions.
    pub fn inner(&self) -> &ThreadedProducer<Tracking> {
        &self.producer
    }

    /// What happened to the records sent since the last call, resetting it. Blocking: it
    /// first waits, up to `timeout`, until every record sent so far has had its delivery
    /// report (a flush can return while the last reports are still being handled).
    ///
    /// # Errors
    /// `Error::Kafka` (timed out) when reports are still missing after `timeout`.
    pub fn take_deliveries(&self, timeout: Duration) -> Result<Deliveries> {
        let tracking = self.producer.context();
        let unreported = tracking.unreported.lock().expect("delivery count lock");
        let (unreported, wait) = tracking
            .reported
            .wait_timeout_while(unreported, timeout, |n| *n > 0)
            .expect("delivery count lock");
        if wait.timed_out() {
            return Err(Error::Kafka(KafkaError::Flush(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        drop(unreported);
        Ok(std::mem::take(
            &mut *tracking.state.lock().expect("delivery state lock"),
        ))
    }

    /// Enqueues one record; when librdkafka's queue is full, waits briefly and tries again.
    ///
    /// # Errors
    /// `Error::Kafka` when the record cannot be enqueued (for example, a fatal producer
    /// error or a transaction that must be aborted).
    pub async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<()> {
        let mut headers = headers;
        loop {
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
            record.key = key;
            record.payload = payload;
            record.partition = partition;
            record.headers = headers.take();
            // Counted before the send: its report may run before `send` returns.
            *self
                .producer
                .context()
                .unreported
                .lock()
                .expect("delivery count lock") += 1;
            let sent = self.producer.send(record);
            if sent.is_err() {
                *self
                    .producer
                    .context()
                    .unreported
                    .lock()
                    .expect("delivery count lock") -= 1;
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
}
