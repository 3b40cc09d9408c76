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

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::Notify;

use crate::metrics::Metrics;

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
    consumer: OnceLock<Weak<Consumer>>,
    handler: Arc<dyn RebalanceHandler>,
    metrics: Metrics,
}

impl RebalanceContext {
    /// A context calling `handler` and counting client errors in `metrics`.
    pub fn new(handler: Arc<dyn RebalanceHandler>, metrics: &Metrics) -> Self {
        RebalanceContext {
            consumer: OnceLock::new(),
            handler,
            metrics: metrics.clone(),
        }
    }

    /// Tells the context which consumer it belongs to; needed before the first poll.
    pub fn attach(consumer: &Arc<Consumer>) {
        let _ = consumer.context().consumer.set(Arc::downgrade(consumer));
    }
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

/// Messages of one partition, awaitable. Wakes on librdkafka's "queue became non-empty"
/// callback; `Notify` keeps a wake-up that comes between an empty poll and the wait.
pub struct PartitionStream {
    queue: PartitionQueue<RebalanceContext>,
    ready: Arc<Notify>,
}

impl PartitionStream {
    /// Splits `topic`/`partition` off the consumer's main queue.
    pub fn split(consumer: &Arc<Consumer>, topic: &str, partition: i32) -> Option<PartitionStream> {
        let mut queue = consumer.split_partition_queue(topic, partition)?;
        let ready = Arc::new(Notify::new());
        let wake = ready.clone();
        queue.set_nonempty_callback(move || wake.notify_one());
        Some(PartitionStream { queue, ready })
    }

    /// The next message if one is waiting.
    pub fn try_next(&self) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        self.queue.poll(Duration::ZERO)
    }

    /// The next message, waiting for it. Cancel-safe.
    ///
    /// librdkafka signals only the empty → non-empty transition of a queue, and not on
    /// every path that fills one; like rdkafka's own stream consumer, the wait is therefore
    /// bounded, so a missed signal costs at most `RECHECK`, never a wedged partition.
    pub async fn next(&self) -> KafkaResult<BorrowedMessage<'_>> {
        const RECHECK: Duration = Duration::from_millis(100);
        loop {
            if let Some(m) = self.try_next() {
                return m;
            }
            let _ = tokio::time::timeout(RECHECK, self.ready.notified()).await;
        }
    }
}
