//! The group consumer and its per-partition streams.
//!
//! Rebalances are handed to a [`RebalanceHandler`] from inside librdkafka's rebalance
//! callback, which runs on the thread that polls the consumer (a dedicated thread, never a
//! runtime worker), so the handler may block until workers have started or drained:
//! - on assign, the handler splits each partition into its own queue *before* the partitions
//!   are assigned (a split queue stays split: librdkafka does not re-forward queues the
//!   application forwarded), and returns the offset each partition starts from, which the
//!   store owns;
//! - on revoke, the handler returns only after the partitions' workers committed and stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Bound on a seek.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// The consumer type of the pipeline.
pub type Consumer = BaseConsumer<RebalanceContext>;

/// `(topic, partition)`.
pub type TopicPartition = (String, i32);

/// What the pipeline does when partitions come and go.
pub trait RebalanceHandler: Send + Sync {
    /// Partitions are about to be assigned: prepare their workers and say what to assign and
    /// where each starts: the group's partitions, and any companion partitions read along
    /// with them (a companion goes with the group partition of its number).
    fn assign(
        &self,
        consumer: &Arc<Consumer>,
        partitions: &[TopicPartition],
    ) -> Vec<(TopicPartition, Offset)>;
    /// Partitions are being taken away: return once their work is committed and stopped,
    /// with the companion partitions to let go as well.
    fn revoke(&self, partitions: &[TopicPartition]) -> Vec<TopicPartition>;
}

/// Consumer context that routes rebalances to a [`RebalanceHandler`].
pub struct RebalanceContext {
    /// The consumer itself, which the handler splits partition queues off: set by
    /// [`subscribe`] before the first poll.
    consumer: OnceLock<Weak<Consumer>>,
    handler: Arc<dyn RebalanceHandler>,
    metrics: Metrics,
}

/// Creates the group consumer with `config`, routing its rebalances to `handler` and
/// counting its errors in `metrics`, and subscribes it to `topic`.
///
/// # Errors
/// When librdkafka refuses the configuration or the subscription.
pub fn subscribe(
    config: &ClientConfig,
    handler: Arc<dyn RebalanceHandler>,
    metrics: &Metrics,
    topic: &str,
) -> Result<Arc<Consumer>> {
    let context = RebalanceContext {
        consumer: OnceLock::new(),
        handler,
        metrics: metrics.clone(),
    };
    let consumer: Arc<Consumer> = Arc::new(config.create_with_context(context)?);
    let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
    consumer.subscribe(&[topic])?;
    Ok(consumer)
}

/// Serves the consumer's callbacks (rebalances, errors) until `stop` is set, then calls
/// `drain`, which must stop the work on every partition, and closes the consumer: it
/// revokes (nothing left to drain), commits the stored offsets and leaves the group.
/// Blocking: run it on the consumer's own thread.
pub fn serve(consumer: Arc<Consumer>, stop: &AtomicBool, drain: impl FnOnce()) {
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                // Every assigned partition has its own queue, split before it was assigned,
                // so this should not happen; if it does, hand the record back to its queue.
                let (topic, partition, offset) =
                    (msg.topic().to_owned(), msg.partition(), msg.offset());
                drop(msg);
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    "Record on the main queue; seeking back."
                );
                if let Err(error) = seek(&consumer, &topic, partition, offset) {
                    tracing::error!(%error, "Seek failed.");
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "Consumer error."),
        }
    }
    drain();
    // Dropping the last handle closes the consumer.
    drop(consumer);
}

/// Moves the next fetch of a partition to `offset`. Blocking, up to 10 s.
///
/// # Errors
/// `Error::Kafka` when the seek fails.
pub fn seek(consumer: &Consumer, topic: &str, partition: i32, offset: i64) -> Result<()> {
    consumer
        .seek(topic, partition, Offset::Offset(offset), SEEK_TIMEOUT)
        .map_err(Error::Kafka)
}

impl ClientContext for RebalanceContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.metrics.kafka_error("consumer", &error);
        tracing::warn!(%error, reason, "Kafka client error.");
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let parts = partitions(tpl);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    tracing::error!(
                        "Rebalance before the consumer was attached; assignment ignored."
                    );
                    return;
                };
                tracing::info!(partitions = ?parts, cooperative, "Partitions assigned.");
                let mut assignment = TopicPartitionList::new();
                for ((topic, partition), offset) in self.handler.assign(&consumer, &parts) {
                    if let Err(error) = assignment.add_partition_offset(&topic, partition, offset) {
                        tracing::error!(%error, topic, partition, "Cannot set the start offset.");
                    }
                }
                if cooperative {
                    base.incremental_assign(&assignment)
                } else {
                    base.assign(&assignment)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts, cooperative, "Partitions revoked.");
                let companions = self.handler.revoke(&parts);
                if cooperative {
                    for (topic, partition) in &companions {
                        tpl.add_partition(topic, *partition);
                    }
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "Rebalance failed; dropping the assignment.");
                self.handler.revoke(&parts);
                base.unassign()
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "Applying the rebalance failed.");
        }
    }
}

/// A partition's `(low, high)` offsets as of the client's last fetch from it: no request, so
/// cheap enough to read after every batch. `None` before the first fetch.
pub fn cached_watermarks<C: ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: the client outlives the call; librdkafka reads the NUL-terminated topic name
    // and writes the two offsets, nothing else.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            consumer.client().native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some((low, high))
}

/// Messages of one partition. librdkafka's "queue became non-empty" callback notifies a
/// `Notify` that the reader shares among its partitions (it keeps a wake-up that comes
/// between an empty poll and the wait).
pub struct PartitionStream {
    queue: PartitionQueue<RebalanceContext>,
    consumer: Arc<Consumer>,
    topic: String,
    partition: i32,
}

impl PartitionStream {
    /// Splits `topic`/`partition` off the consumer's main queue; `ready` is notified when
    /// records arrive in an empty queue.
    ///
    /// # Errors
    /// `Error::Config` when librdkafka does not know the topic.
    pub fn split(
        consumer: &Arc<Consumer>,
        topic: &str,
        partition: i32,
        ready: &Arc<Notify>,
    ) -> Result<PartitionStream> {
        let mut queue = consumer
            .split_partition_queue(topic, partition)
            .ok_or_else(|| {
                Error::Config(format!("cannot split {topic}/{partition} off the consumer"))
            })?;
        let wake = ready.clone();
        queue.set_nonempty_callback(move || wake.notify_one());
        Ok(PartitionStream {
            queue,
            consumer: consumer.clone(),
            topic: topic.to_owned(),
            partition,
        })
    }

    /// Moves the next record of this partition to `offset` (on a blocking thread).
    ///
    /// # Errors
    /// `Error::Kafka` when the seek fails.
    pub async fn seek(&self, offset: i64) -> Result<()> {
        let (consumer, topic, partition) =
            (self.consumer.clone(), self.topic.clone(), self.partition);
        tokio::task::spawn_blocking(move || seek(&consumer, &topic, partition, offset)).await?
    }

    /// The partition's end as of the client's last fetch from it (no request). `None`
    /// before the first fetch.
    pub fn end(&self) -> Option<i64> {
        let (_, high) = cached_watermarks(&*self.consumer, &self.topic, self.partition)?;
        Some(high)
    }

    /// The next message if one is waiting.
    pub fn try_next(&self) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        self.queue.poll(Duration::ZERO)
    }
}
