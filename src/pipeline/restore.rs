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
//!
//! A store that never had the partition, or had it long ago, first takes the fleet view's
//! copy of its twins when the view has read further ([`PartitionStore::promote`]): the
//! changelog is then read only after the view's position. Restores longer than a batch write
//! without RocksDB's log and flush once at the end; shorter ones write with the log.

use std::collections::HashMap;
use std::ops::Range;
use std::time::{Duration, Instant};

use rdkafka::Offset;

use super::Shared;
use crate::error::{Disposition, Result};
use crate::kafka::{OutputReader, Polled};
use crate::registry::decode_fetching;
use crate::store::{PartitionStore, Reverted};

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
    let started = Instant::now();
    promote(shared, &store, resume)?;
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
    reader.assign(&[(topic, partition, Offset::Offset(start))])?;
    let runtime = tokio::runtime::Handle::current();
    let (codec, registry) = (&shared.topology.codec, shared.registry.as_deref());

    let time = shared.topology.model.time;
    let timers = shared.topology.model.has_timers();
    let mut batch = store.batch();
    let (mut in_batch, mut total, mut unfinished) = (0u64, 0u64, 0u64);
    let (mut read_any, mut unlogged) = (false, false);
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
                            // comes due checks the twin before it fires. A record written
                            // before the deadline header is decoded for it.
                            let deadline = match m.deadline() {
                                Some(carried) => carried,
                                None => codec
                                    .decode_twin(&twin)
                                    .ok()
                                    .and_then(|t| shared.topology.model.deadline(&t)),
                            };
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
            store.commit_unlogged(std::mem::replace(&mut batch, store.batch()))?;
            unlogged = true;
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
        if unlogged {
            store.commit_unlogged(batch)?;
            // Written without the log: durable before the partition is processed (whose
            // commits use the log), so a crash never keeps a commit whose restore it lost.
            store.flush()?;
        } else {
            // A restore that fits in one batch (the tail after a promotion, or a store that
            // was nearly current) goes into the log as the partition's commits do: a flush
            // costs more than the whole restore of a few hundred twins.
            store.commit(batch)?;
        }
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

/// Replaces the partition's twins by the fleet view's copy when it is usable (see
/// [`PartitionStore::promote`]), so that the restore reads only the changelog after the
/// view's position.
fn promote(shared: &Shared, store: &PartitionStore, resume: i64) -> Result<()> {
    if !shared.view {
        shared.metrics.promotion("view_off");
        return Ok(());
    }
    let started = Instant::now();
    let refuse = shared.topology.model.time.refuse_deleted_for;
    let revert = |range, version: &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>| {
        before_tail(shared, store.partition(), range, version)
    };
    match store.promote(resume, shared.clock.now_ms(), refuse, revert)? {
        Ok(promotion) => {
            shared.metrics.promotion("promoted");
            shared.metrics.promoted_twins.inc_by(promotion.twins);
            shared.metrics.reverted_twins.inc_by(promotion.reverted);
            tracing::info!(
                partition = store.partition(),
                twins = promotion.twins,
                reverted = promotion.reverted,
                changelog_next = promotion.changelog_next,
                seconds = started.elapsed().as_secs_f64(),
                "Promoted the fleet view's twins of the partition."
            );
        }
        Err(why) => {
            shared.metrics.promotion(why.label());
            tracing::info!(
                partition = store.partition(),
                why = why.label(),
                resume,
                "The fleet view's twins are not promoted; restoring from the changelog."
            );
        }
    }
    Ok(())
}

/// The twins of the assets that changelog `range` of `partition` changes, as they were
/// before it: the version before the first one in the range, from the view's kept versions
/// (`version`); `None` when one is not kept or the range deletes a twin first.
fn before_tail(
    shared: &Shared,
    partition: i32,
    range: Range<i64>,
    version: &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>,
) -> Result<Option<Reverted>> {
    let topic = &shared.topology.topics.changelog.name;
    let (codec, registry) = (&shared.topology.codec, shared.registry.as_deref());
    let model = &shared.topology.model;
    let runtime = tokio::runtime::Handle::current();
    let reader = OutputReader::new(&shared.clients.reader("twinflow-restore", true))?;
    reader.assign(&[(topic, partition, Offset::Offset(range.start))])?;
    let mut first: HashMap<String, Option<u64>> = HashMap::new();
    let read = (|| -> Result<()> {
        loop {
            let m = match reader.poll(Duration::from_secs(1))? {
                Polled::Idle => continue,
                Polled::End(_) => return Ok(()),
                Polled::Record(m) => m,
            };
            if let Some(id) = m.key().and_then(|k| std::str::from_utf8(k).ok())
                && !first.contains_key(id)
            {
                let version = match m.value() {
                    Some(v) => {
                        let twin = decode_fetching(registry, codec, &runtime, |c| {
                            c.stored_twin(v).map(|t| t.into_owned())
                        })?;
                        u64::try_from(codec.decode_twin(&twin)?.version).ok()
                    }
                    None => None,
                };
                first.insert(id.to_owned(), version);
            }
            if m.offset() + 1 >= range.end {
                return Ok(());
            }
        }
    })();
    reader.close_in_background();
    read?;
    let mut reverted = Reverted::new();
    for (id, first) in first {
        let before = match first {
            None | Some(0) => return Ok(None),
            Some(1) => None,
            Some(v) => {
                let Some(twin) = version(&id, v - 1)? else {
                    return Ok(None);
                };
                let deadline = model.deadline(&codec.decode_twin(&twin)?);
                Some((twin, deadline))
            }
        };
        reverted.insert(id, before);
    }
    Ok(Some(reverted))
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
