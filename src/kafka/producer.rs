//! The output producer: one per instance, shared by the partition workers, optionally
//! transactional.
//!
//! Workers only enqueue. Its delivery callback records what a commit needs to know: whether
//! any record failed since the last commit, and the offset of the last changelog record per
//! partition (the store remembers it, so a restore reads only the tail after it).

use std::collections::BTreeMap;
use std::sync::Mutex;
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
        let mut state = self.state.lock().expect("delivery state lock");
        match result {
            Ok(m) if m.topic() == self.changelog => {
                let next = state.changelog_next.entry(m.partition()).or_insert(0);
                *next = (*next).max(m.offset() + 1);
            }
            Ok(_) => {}
            // Records purged by an abort we asked for are not failures.
            Err((error, _))
                if matches!(
                    error.rdkafka_error_code(),
                    Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)
                ) => {}
            Err((error, _)) => {
                self.metrics.delivery_failures.inc();
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

    /// What happened since the last call, resetting it.
    pub fn take_deliveries(&self) -> Deliveries {
        std::mem::take(
            &mut *self
                .producer
                .context()
                .state
                .lock()
                .expect("delivery state lock"),
        )
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
            match self.producer.send(record) {
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
