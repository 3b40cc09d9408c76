//! Restore: brings a partition's twins up to date from its changelog partition before the
//! partition is processed.
//!
//! The store remembers the changelog offset its twins reflect, so a restore reads only the
//! tail after it: nothing after a clean hand-over or a crash, what another instance wrote
//! while it owned the partition, the whole (compacted) partition for a store that never had
//! it. It applies only records of work that is committed: under exactly-once it reads
//! `read_committed`, so aborted output never becomes state; and a record whose source input
//! offset (its `twinflow.source.offset` header) is at or after the position processing
//! resumes from is the unfinished tail of a crashed owner, which the replay writes again.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::Shared;
use super::processor::SOURCE_OFFSET_HEADER;
use crate::config::Guarantee;
use crate::error::{Disposition, Error, Result};

/// Records per store write during a restore.
const RESTORE_BATCH: u64 = 10_000;

/// Applies changelog partition `partition` from the stored changelog position to its end,
/// leaving out records from input at or after `resume` (where processing resumes).
/// Blocking: run it on a blocking thread. Returns the number of records applied.
///
/// # Errors
/// `Retry` for Kafka or store failures (the restore resumes from what it stored).
pub fn restore(shared: &Shared, partition: i32, resume: i64) -> Result<u64> {
    let topic = &shared.topology.topics.changelog.name;
    let store = shared.store.partition(partition);
    let from = store.changelog_next()?;
    let mut config = shared.restore_client.clone();
    config
        .set("group.id", "twinflow-restore")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest");
    if shared.settings.guarantee == Guarantee::ExactlyOnce {
        config.set("isolation.level", "read_committed");
    }
    let consumer: BaseConsumer<Quiet> = config.create_with_context(Quiet)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(30))?;
    let start = from.unwrap_or(low).max(low);
    if start >= high {
        close_in_background(consumer);
        return Ok(0);
    }
    let (applied, remaining, seconds) = shared.metrics.restore(partition);
    shared.metrics.restoring_partitions.inc();
    let _done = scopeguard(|| shared.metrics.restoring_partitions.dec());
    tracing::info!(
        topic,
        partition,
        from = start,
        to = high,
        "Restoring twins from the changelog."
    );
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;

    let time = shared.topology.model.time;
    let timers = time.offline_after.is_some() || time.idle_after.is_some();
    let mut batch = store.batch();
    let (mut in_batch, mut total, mut unfinished) = (0u64, 0u64, 0u64);
    let mut read_any = false;
    loop {
        let m = match consumer.poll(Duration::from_secs(1)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => m,
        };
        read_any = true;
        remaining.set((high - m.offset() - 1).max(0));
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        match (key, source_offset(&m)) {
            (None, _) => tracing::warn!(
                partition,
                offset = m.offset(),
                "Changelog record without a UTF-8 key; skipped."
            ),
            (Some(_), Some(source)) if source >= resume => unfinished += 1,
            (Some(key), _) => {
                match m.payload().map(|v| stored_twin(shared, v)) {
                    Some(Ok(twin)) => {
                        batch.put_twin(key, &twin);
                        if timers {
                            // An older entry of this twin may stay behind: a timer that
                            // comes due checks the twin before it fires.
                            let deadline = shared
                                .topology
                                .codec
                                .decode_twin(&twin)
                                .ok()
                                .and_then(|t| shared.topology.model.deadline(&t));
                            if let Some(deadline) = deadline {
                                batch.put_deadline(deadline, key);
                            }
                        }
                    }
                    Some(Err(e)) if e.disposition() == Disposition::Skip => tracing::warn!(
                        partition,
                        offset = m.offset(),
                        error = %e,
                        "Changelog record that is not a twin of this model; skipped."
                    ),
                    Some(Err(e)) => return Err(e),
                    None => batch.delete_twin(key),
                }
                in_batch += 1;
                total += 1;
            }
        }
        if in_batch == RESTORE_BATCH {
            batch.set_changelog_next(m.offset() + 1);
            store.commit(std::mem::replace(&mut batch, store.batch()))?;
            applied.inc_by(in_batch);
            in_batch = 0;
        }
        if m.offset() + 1 >= high {
            break;
        }
    }
    if read_any {
        // Past the last record there may be transaction markers: resume after them.
        batch.set_changelog_next(high);
        store.commit(batch)?;
        applied.inc_by(in_batch);
    }
    remaining.set(0);
    close_in_background(consumer);
    let elapsed = started.elapsed().as_secs_f64();
    seconds.set(elapsed);
    tracing::info!(
        topic,
        partition,
        records = total,
        unfinished,
        seconds = elapsed,
        "Restore finished."
    );
    Ok(total)
}

/// A changelog value as the store keeps it, fetching its writer schema from the registry
/// first when it is Confluent-framed with an id not seen yet.
fn stored_twin<'a>(shared: &Shared, value: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>> {
    let codec = &shared.topology.codec;
    loop {
        match codec.stored_twin(value) {
            Err(Error::SchemaNeeded(id)) => {
                let registry = shared.registry.as_ref().ok_or_else(|| {
                    Error::Config("a Confluent-framed changelog needs [schema_registry]".into())
                })?;
                // On a blocking thread: wait for the fetch on the instance's runtime.
                tokio::runtime::Handle::current().block_on(registry.fetch(id, codec))?;
            }
            other => return other,
        }
    }
}

/// The input offset a changelog record came from, from its header.
fn source_offset(m: &BorrowedMessage<'_>) -> Option<i64> {
    m.headers()?
        .iter()
        .find(|h| h.key == SOURCE_OFFSET_HEADER)
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
}

/// Closes a restore consumer off the calling thread: librdkafka's close waits for its
/// broker threads (100 ms and more on a busy broker), and the partition is ready without it.
fn close_in_background(consumer: BaseConsumer<Quiet>) {
    // Should the thread not start, the consumer is closed here, when the closure drops.
    let _ = std::thread::Builder::new()
        .name("twinflow-restore-close".into())
        .spawn(move || drop(consumer));
}

/// A consumer context that does not log the end of a partition, which a restore reads on
/// purpose.
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "Restore consumer error.");
        }
    }
}

impl ConsumerContext for Quiet {}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
