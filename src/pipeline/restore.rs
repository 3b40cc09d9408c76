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

use rdkafka::Offset;

use super::Shared;
use crate::error::{Disposition, Result};
use crate::kafka::{OutputReader, Polled};
use crate::registry::decode_fetching;

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
    let reader = OutputReader::new(&shared.clients.reader("twinflow-restore", true))?;
    let (low, high) = reader.watermarks(topic, partition, Duration::from_secs(30))?;
    let start = from.unwrap_or(low).max(low);
    if start >= high {
        reader.close_in_background();
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
    reader.assign(&[(topic, partition, Offset::Offset(start))])?;
    let runtime = tokio::runtime::Handle::current();
    let (codec, registry) = (&shared.topology.codec, shared.registry.as_deref());

    let time = shared.topology.model.time;
    let timers = shared.topology.model.has_timers();
    let mut batch = store.batch();
    let (mut in_batch, mut total, mut unfinished) = (0u64, 0u64, 0u64);
    let mut read_any = false;
    loop {
        let m = match reader.poll(Duration::from_secs(1))? {
            Polled::Idle => continue,
            Polled::End(_) => break,
            Polled::Record(m) => m,
        };
        read_any = true;
        remaining.set((high - m.offset() - 1).max(0));
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        match (key, m.source_offset()) {
            (None, _) => tracing::warn!(
                partition,
                offset = m.offset(),
                "Changelog record without a UTF-8 key; skipped."
            ),
            (Some(_), Some(source)) if source >= resume => unfinished += 1,
            (Some(key), _) => {
                let stored = m
                    .value()
                    .map(|v| decode_fetching(registry, codec, &runtime, |c| c.stored_twin(v)));
                match stored {
                    Some(Ok(twin)) => {
                        batch.put_twin(key, &twin);
                        if timers {
                            // An older entry of this twin may stay behind: a timer that
                            // comes due checks the twin before it fires.
                            let deadline = codec
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
                    None => {
                        batch.delete_twin(key);
                        // A deleted twin's id stays refused for a while, here too.
                        let deleted = m.number(crate::headers::DELETED_AT);
                        if let (Some(refuse), Some(at)) = (time.refuse_deleted_for, deleted) {
                            batch.put_deleted(key, at);
                            batch.put_deadline(at.saturating_add(refuse), key);
                        }
                    }
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
    reader.close_in_background();
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
