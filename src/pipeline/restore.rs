//! Restore: brings a partition's twins up to date from its changelog partition before the
//! partition is processed.
//!
//! The store remembers the changelog offset its twins reflect, so a restore reads only the
//! tail after it: nothing after a clean hand-over, the uncommitted tail after a crash, the
//! whole (compacted) partition for a store that never had it. Under exactly-once it reads
//! `read_committed`, so aborted output never becomes state.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use super::Shared;
use crate::config::Guarantee;
use crate::error::Result;

/// Records per store write during a restore.
const RESTORE_BATCH: usize = 10_000;

/// Applies changelog partition `partition` from the stored changelog position to its end.
/// Blocking: run it on a blocking thread. Returns the number of records applied.
///
/// # Errors
/// `Retry` for Kafka or store failures (the restore resumes from what it stored).
pub fn restore(shared: &Shared, partition: i32) -> Result<u64> {
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

    let mut batch = store.batch();
    let mut in_batch = 0;
    let mut total = 0u64;
    loop {
        match consumer.poll(Duration::from_secs(1)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    tracing::warn!(
                        partition,
                        offset = m.offset(),
                        "Changelog record without a UTF-8 key; skipped."
                    );
                    continue;
                };
                match m.payload() {
                    Some(twin) => batch.put_twin(key, twin),
                    None => batch.delete_twin(key),
                }
                in_batch += 1;
                total += 1;
                remaining.set((high - m.offset() - 1).max(0));
                if in_batch == RESTORE_BATCH {
                    batch.set_changelog_next(m.offset() + 1);
                    store.commit(std::mem::replace(&mut batch, store.batch()))?;
                    applied.inc_by(in_batch as u64);
                    in_batch = 0;
                }
                if m.offset() + 1 >= high {
                    batch.set_changelog_next(m.offset() + 1);
                    break;
                }
            }
        }
    }
    if !batch.is_empty() {
        // Past the last record there may be transaction markers: resume after them.
        batch.set_changelog_next(high);
        store.commit(batch)?;
        applied.inc_by(in_batch as u64);
    }
    remaining.set(0);
    let elapsed = started.elapsed().as_secs_f64();
    seconds.set(elapsed);
    tracing::info!(
        topic,
        partition,
        records = total,
        seconds = elapsed,
        "Restore finished."
    );
    Ok(total)
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
