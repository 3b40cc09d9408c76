//! The processor: one partition's record logic, synchronous and free of Kafka IO, so the
//! worker, the benchmarks and the tests run the same code.
//!
//! For each input record it decodes, validates, merges into the twin, evaluates the rules
//! and stages the outputs (changelog twin, alert events or a dead letter) and the store
//! writes of the batch. The worker emits what was staged and commits.

use std::collections::HashMap;
use std::sync::Arc;

use super::commands::{AckRecord, DesiredRecord, Refusal, decode_ack, decode_desired};
use super::dead_letter::{MAX_MESSAGE_BYTES, Stage, Why, dead_letter};
use super::input::{Input, InputKind, PerInput};
use super::output::{Outputs, Target};
use crate::codec::{encode_alert, encode_command, encode_command_event, rfc3339};
use crate::error::{Error, Result};
use crate::headers;
use crate::metrics::{BatchCounts, DeadLetterReason, Deletion};
use crate::rules::{AckOutcome, AlertEvent};
use crate::step::Timed;
use crate::store::{PartitionStore, StoreBatch};
use crate::topology::Topology;
use crate::twin::{DesiredWrite, Effects, Reading, Twin};

/// With the test-only `fault-injection` feature, a valid reading of this asset panics in the
/// record path, so that tests can show a panic is isolated to its record.
#[cfg(feature = "fault-injection")]
pub const PANICKING_ASSET: &str = "twinflow-test-panic";

/// A unit of work of the processor: what a panic is pinned on, so that a replay can set
/// that one record (or timer) aside and go on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Work {
    /// The record of this input at this offset.
    Record(InputKind, i64),
    /// The timer of this asset at this deadline.
    Timer(i64, String),
}

impl Work {
    /// The bounded label of its kind, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Work::Record(input, _) => input.label(),
            Work::Timer(..) => "timer",
        }
    }
}

/// What a batch accumulates.
pub struct Batch {
    /// Twins to write (and, at commit, the position).
    pub store: StoreBatch,
    /// Counts for the metrics.
    pub counts: BatchCounts,
    /// Records to emit before the commit.
    pub outputs: Outputs,
    /// Per input, the offset after the last record processed, if any was.
    pub next: PerInput<Option<i64>>,
}

/// The record logic of one partition.
pub struct Processor {
    topology: Arc<Topology>,
    store: PartitionStore,
    partition: i32,
    /// Decoded twins; between batches every entry equals the store. Hashed with foldhash
    /// (seeded per process): SipHash took a few per cent of the record path. Boxed, so a
    /// table slot is 24 bytes: the table keeps up to half its slots empty.
    cache: HashMap<Box<str>, Box<Twin>, foldhash::fast::RandomState>,
    cache_limit: usize,
    reading: Reading,
    alerts: Vec<AlertEvent>,
    /// Command transitions and sends of the twin being processed.
    effects: Effects,
    scratch: Vec<u8>,
    /// The last timer looked at: every one before it has fired or moved (in the store or
    /// the staged batch), so the next look starts after it.
    due_after: Option<(i64, String)>,
    /// Largest record the producer sends (`message.max.bytes`): dead letters stay within it.
    max_record_bytes: usize,
    /// What is being processed right now; after a panic, what panicked.
    current: Option<Work>,
    /// Work that panicked, with the panic's message: every replay sets it aside (a record is
    /// dead-lettered as `internal`, a timer entry dropped) instead of processing it again,
    /// until the stored position is past it ([`Processor::forget_before`]). An entry must
    /// outlive the replay that used it: another panic in the same uncommitted work drops
    /// that replay too.
    quarantine: HashMap<Work, String>,
    /// Deletion notes (`refuse_deleted_for`) of the uncommitted work: when the twin was
    /// deleted, or `None` for a note removed. The store has the committed ones.
    deleted: HashMap<Box<str>, Option<i64>>,
}

impl Processor {
    /// A processor of `partition`, keeping up to `cache_limit` decoded twins.
    pub fn new(topology: Arc<Topology>, store: PartitionStore, cache_limit: usize) -> Self {
        Processor {
            partition: store.partition(),
            topology,
            store,
            cache: HashMap::default(),
            cache_limit,
            reading: Reading::default(),
            alerts: Vec::new(),
            effects: Effects::default(),
            scratch: Vec::new(),
            due_after: None,
            max_record_bytes: crate::kafka::DEFAULT_MAX_RECORD_BYTES,
            current: None,
            quarantine: HashMap::new(),
            deleted: HashMap::new(),
        }
    }

    /// Keeps dead letters within `bytes` (the producer's `message.max.bytes`).
    pub fn with_max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// After a panic: sets aside the work that panicked, so that the replay after the
    /// rewind does not process it again. Returns it, or `None` when the same work had
    /// panicked before (it panicked again while being set aside: a bug to stop for).
    pub fn quarantine(&mut self, message: String) -> Option<Work> {
        let work = self.current.take()?;
        if self.quarantine.contains_key(&work) {
            return None;
        }
        self.quarantine.insert(work.clone(), message);
        Some(work)
    }

    /// A new, empty batch. Call it only when nothing is staged; with `evict`, when the store
    /// also holds every committed twin, it may shed cached twins.
    pub fn batch(&mut self, evict: bool) -> Batch {
        if evict {
            self.evict();
            self.deleted.clear(); // the store has them all
        }
        Batch {
            store: self.store.batch(),
            counts: BatchCounts::default(),
            outputs: Outputs::default(),
            next: PerInput::default(),
        }
    }

    /// Forgets the set-aside records before the stored positions of their inputs: they are
    /// committed, so no replay reaches them again.
    pub fn forget_before(&mut self, stored: &PerInput<i64>) {
        self.quarantine.retain(|work, _| match work {
            Work::Record(input, offset) => *offset >= stored.get(*input),
            // Keyed by deadline: a timer filed again has another key. One entry per panic.
            Work::Timer(..) => true,
        });
    }

    /// Forgets the cached twins (after a failed batch: the store is the truth).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.deleted.clear();
        self.due_after = None; // the dropped work's timers are back in the index
    }

    /// Processes one record at processing time `now` into `batch`.
    ///
    /// Bad input is dead-lettered and counted, never returned as an error.
    ///
    /// # Errors
    /// Store failures (`Retry`), corrupt stored twins (`Fatal`), and `SchemaNeeded` for a
    /// Confluent-framed record whose writer schema is not known yet; then the record was
    /// not processed and nothing was staged for it.
    pub fn process(&mut self, input: &Input<'_>, batch: &mut Batch, now: i64) -> Result<()> {
        let work = Work::Record(InputKind::Readings, input.offset);
        self.pinned(work, input, batch, |p, batch| p.read(input, batch, now))
    }

    /// Runs `run` on the record of `work`, noting the work as current (so a panic is pinned
    /// on it), unless the record is set aside: then it is dead-lettered instead.
    fn pinned(
        &mut self,
        work: Work,
        input: &Input<'_>,
        batch: &mut Batch,
        run: impl FnOnce(&mut Self, &mut Batch) -> Result<()>,
    ) -> Result<()> {
        if self.set_aside(&work, input, batch) {
            return Ok(());
        }
        self.current = Some(work);
        let result = run(self, batch);
        self.current = None;
        result
    }

    fn read(&mut self, input: &Input<'_>, batch: &mut Batch, now: i64) -> Result<()> {
        let topology = self.topology.clone();
        let decoded = input.payload.map(|payload| {
            topology.codec.decode_reading(
                topology.topics.telemetry_format(),
                payload,
                &mut self.reading,
            )
        });
        if let Some(Err(Error::SchemaNeeded(id))) = decoded {
            // Not processed: the caller fetches the schema and reads this record again.
            return Err(Error::SchemaNeeded(id));
        }
        batch.next.set(InputKind::Readings, Some(input.offset + 1));
        batch.counts.consumed += 1;
        match decoded {
            None => {
                let reason = DeadLetterReason::Empty;
                self.dead_letter(input, batch, reason, Stage::Decode, "record has no value");
                return Ok(());
            }
            Some(Err(e)) => {
                let reason = DeadLetterReason::Decode;
                self.dead_letter(input, batch, reason, Stage::Decode, &e.to_string());
                return Ok(());
            }
            Some(Ok(())) => {}
        }
        if let Err(why) = topology.model.validate(&self.reading) {
            self.dead_letter(
                input,
                batch,
                DeadLetterReason::Invalid,
                Stage::Validate,
                &why,
            );
            return Ok(());
        }
        #[cfg(feature = "fault-injection")]
        if self.reading.asset_id == PANICKING_ASSET {
            panic!("injected panic: a reading of {PANICKING_ASSET}");
        }
        if input.key != Some(self.reading.asset_id.as_bytes()) {
            let why = match input.key {
                None => "record has no key; the key must be the asset id".to_owned(),
                Some(k) => format!(
                    "key '{}' differs from asset_id '{}'; the key must be the asset id",
                    String::from_utf8_lossy(&k[..k.len().min(MAX_MESSAGE_BYTES / 2)]),
                    self.reading.asset_id
                ),
            };
            let reason = DeadLetterReason::KeyMismatch;
            self.dead_letter(input, batch, reason, Stage::Validate, &why);
            return Ok(());
        }

        let reading = std::mem::take(&mut self.reading);
        let result = self.apply(&reading, input, batch, now);
        self.reading = reading;
        result
    }

    /// Applies a valid reading: checks its time, merges it and stages what changed.
    fn apply(
        &mut self,
        reading: &Reading,
        input: &Input<'_>,
        batch: &mut Batch,
        now: i64,
    ) -> Result<()> {
        let id = reading.asset_id.as_str();
        let existed = self.load(id)?;
        if let Some(refuse) = self.topology.model.time.refuse_deleted_for
            && self.cache[id].version == 0
            && let Some(at) = self.deleted_at(id)?
            && now < at.saturating_add(refuse)
        {
            let why = format!(
                "asset '{id}' was deleted at {}; its readings are refused until {} (lifecycle.refuse_deleted_for)",
                rfc3339(at),
                rfc3339(at.saturating_add(refuse))
            );
            if !existed {
                self.cache.remove(id);
            }
            self.dead_letter(
                input,
                batch,
                DeadLetterReason::Deleted,
                Stage::Validate,
                &why,
            );
            return Ok(());
        }
        let core = self.topology.core();
        let twin = self.cache.get_mut(id).expect("loaded above");
        let deadline = core.model.deadline(twin);
        let applied = core.reading(twin, reading, now, &mut self.effects, &mut self.alerts);
        let applied = match applied {
            Ok(applied) => applied,
            Err((reason, why)) => {
                self.dead_letter(input, batch, reason, Stage::Time, &why);
                return Ok(());
            }
        };
        if let Some(skipped) = applied.skipped {
            batch.counts.skip(skipped);
        }
        let Some(change) = applied.change else {
            return Ok(());
        };
        if applied.merged {
            batch.counts.twins_created += u64::from(change.created);
            batch.counts.event_times.push(reading.event_time);
        }
        self.emit(id, deadline, input.offset, batch);
        Ok(())
    }

    /// Processes one record of input `kind` (see [`Processor::process`] and
    /// [`Processor::process_ack`]); `source` is the offset of the last reading processed,
    /// which outputs of other inputs carry.
    ///
    /// # Errors
    /// As [`Processor::process`].
    pub fn process_input(
        &mut self,
        kind: InputKind,
        input: &Input<'_>,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        match kind {
            InputKind::Readings => self.process(input, batch, now),
            InputKind::Acks => self.process_ack(input, batch, now, source),
            InputKind::Desired => self.process_desired(input, batch, now, source),
        }
    }

    /// Processes one desired-state write (see [`super::commands`]) at processing time `now`:
    /// an accepted write changes the twin and issues its command, a rejected one answers
    /// with a REJECTED event only, a repeated one is a counted no-op, a malformed or
    /// invalid one is dead-lettered; a control record deletes the twin
    /// ([`Processor::delete`]). Outputs carry `source`, as acknowledgements' do.
    ///
    /// # Errors
    /// As [`Processor::process`].
    pub fn process_desired(
        &mut self,
        input: &Input<'_>,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        let (kind, stage) = (InputKind::Desired, Stage::Desired);
        self.command_record(kind, stage, input, batch, |p| {
            let format = p.topology.topics.desired_format();
            let (id, record) = decode_desired(input, format, &p.topology.model, p.partition)?;
            Ok(move |p: &mut Self, batch: &mut Batch| match record {
                DesiredRecord::Write(write) => p.write_desired(id, &write, batch, now, source),
                DesiredRecord::Delete(by) => {
                    p.delete(id, Deletion::Requested, &by, batch, now, source)
                }
            })
        })
    }

    /// Takes one record of a command input (`kind`): `decode` says what to apply, or why the
    /// record is dead-lettered (at `stage`).
    fn command_record<F>(
        &mut self,
        kind: InputKind,
        stage: Stage,
        input: &Input<'_>,
        batch: &mut Batch,
        decode: impl FnOnce(&Self) -> std::result::Result<F, Refusal>,
    ) -> Result<()>
    where
        F: FnOnce(&mut Self, &mut Batch) -> Result<()>,
    {
        batch.next.set(kind, Some(input.offset + 1));
        let work = Work::Record(kind, input.offset);
        self.pinned(work, input, batch, |p, batch| match decode(p) {
            Ok(apply) => apply(p, batch),
            Err((reason, why)) => {
                p.dead_letter(input, batch, reason, stage, &why);
                Ok(())
            }
        })
    }

    /// Applies `write` to the twin of `id`.
    fn write_desired(
        &mut self,
        id: &str,
        write: &DesiredWrite,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        self.command(id, batch, now, source, |twin, topology, fx, counts| {
            if let Err(unapplied) = twin.set_desired(&topology.model, write, now, fx) {
                counts.command_noop(unapplied);
            }
            None
        })
    }

    /// Applies `act`, a command input's record, to the twin of `id` at processing time
    /// `now`, after the twin caught up on its timed-out commands. A changed twin is emitted
    /// with its events (and the alert event `act` returns), with `source`; an unchanged one
    /// only with the command events `act` produced (a rejected write's answer), and a twin
    /// that did not exist before is not kept.
    fn command(
        &mut self,
        id: &str,
        batch: &mut Batch,
        now: i64,
        source: i64,
        act: impl FnOnce(&mut Twin, &Topology, &mut Effects, &mut BatchCounts) -> Option<AlertEvent>,
    ) -> Result<()> {
        let existed = self.load(id)?;
        let topology = self.topology.clone();
        let twin = self.cache.get_mut(id).expect("loaded above");
        let deadline = topology.model.deadline(twin);
        let version = twin.version;
        let counts = &mut batch.counts;
        let changed = topology.core().command(
            twin,
            now,
            &mut self.effects,
            &mut self.alerts,
            |twin, fx| act(twin, &topology, fx, counts),
        );
        if changed {
            self.emit(id, deadline, source, batch);
        } else {
            if !existed {
                self.cache.remove(id);
            }
            self.emit_commands(id, version, source, batch);
        }
        Ok(())
    }

    /// Deletes the twin of `id` at processing time `now`, as `kind` asks (`by` who), in one
    /// commit: a changelog (and history) tombstone with the `twinflow.deleted.*` headers,
    /// CLEARED with reason `deleted` for each raised alert, CANCELLED for each open command;
    /// its timer and stored twin go, and with `refuse_deleted_for` its id is noted as
    /// deleted. A later reading creates it again at version 1 (or, within
    /// `refuse_deleted_for`, is refused). A request for a twin that does not exist is a
    /// counted no-op.
    ///
    /// # Errors
    /// As [`Processor::process`].
    fn delete(
        &mut self,
        id: &str,
        kind: Deletion,
        by: &str,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        let existed = self.load(id)?;
        let topology = self.topology.clone();
        let twin = self.cache.get_mut(id).expect("loaded above");
        if twin.version == 0 {
            if !existed {
                self.cache.remove(id);
            }
            batch.counts.deletions[Deletion::Unknown as usize] += 1;
            return Ok(());
        }
        let version = twin.version + 1;
        if let Some(deadline) = topology.model.deadline(twin) {
            batch.store.delete_deadline(deadline, id);
        }
        self.alerts.clear();
        (topology.rules).clear_deleted(twin, now, version, &mut self.alerts);
        self.effects.clear();
        let detail = format!("the twin was deleted ({})", kind.label());
        twin.cancel_commands(now, &detail, &mut self.effects);
        // A fresh twin in its place: the store keeps the deleted one until the commit, and a
        // record later in the batch must not read it back.
        **twin = Twin::new(id, &topology.model);
        batch.store.delete_twin(id);
        if let Some(refuse) = topology.model.time.refuse_deleted_for {
            batch.store.put_deleted(id, now);
            batch.store.put_deadline(now.saturating_add(refuse), id);
            self.deleted.insert(id.into(), Some(now));
        }
        let header = |name: &str, value: String| (name.to_owned(), Some(value.into_bytes()));
        let tombstone = vec![
            header(headers::DELETED_CAUSE, kind.label().to_owned()),
            header(headers::DELETED_BY, by.to_owned()),
            header(headers::DELETED_AT, now.to_string()),
            header(headers::DELETED_VERSION, version.to_string()),
        ];
        (batch.outputs).push_twin(source, id.as_bytes(), None, tombstone, (now, None));
        self.emit_alerts(id, source, batch);
        self.emit_commands(id, version, source, batch);
        batch.counts.deletions[kind as usize] += 1;
        Ok(())
    }

    /// When the twin of `id` was deleted, while its id is noted as deleted.
    fn deleted_at(&mut self, id: &str) -> Result<Option<i64>> {
        if let Some(at) = self.deleted.get(id) {
            return Ok(*at);
        }
        self.store.deleted_at(id)
    }

    /// Processes one acknowledgement record (key: asset id; value: JSON
    /// `{"alert_id": "...", "by": "..."}`) at processing time `now`. An acknowledged alert
    /// changes the twin and emits an ACKNOWLEDGED event, with `source` (the offset of the
    /// last input processed) on its outputs; an unknown, cleared or already acknowledged one
    /// is a counted no-op; a malformed record is dead-lettered.
    ///
    /// # Errors
    /// As [`Processor::process`].
    pub fn process_ack(
        &mut self,
        input: &Input<'_>,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        self.command_record(InputKind::Acks, Stage::Ack, input, batch, |_| {
            let (id, ack) = decode_ack(input)?;
            Ok(move |p: &mut Self, batch: &mut Batch| p.acknowledge(id, &ack, batch, now, source))
        })
    }

    /// Applies `ack` (of an alert, or a device's of a command) to the twin of `id`.
    fn acknowledge(
        &mut self,
        id: &str,
        ack: &AckRecord,
        batch: &mut Batch,
        now: i64,
        source: i64,
    ) -> Result<()> {
        self.command(
            id,
            batch,
            now,
            source,
            |twin, topology, fx, counts| match ack {
                AckRecord::Alert(ack) => {
                    let by = ack.by.as_deref();
                    match topology.rules.acknowledge(twin, &ack.alert_id, by, now) {
                        Ok(event) => {
                            counts.acks[AckOutcome::Applied as usize] += 1;
                            Some(event)
                        }
                        Err(outcome) => {
                            counts.acks[outcome as usize] += 1;
                            None
                        }
                    }
                }
                AckRecord::Command(ack) => {
                    let (id, detail) = (&ack.command_id, ack.detail.as_deref());
                    let done = twin.device_ack(&topology.model, id, ack.result, detail, now, fx);
                    if let Err(unapplied) = done {
                        counts.command_noop(unapplied);
                    }
                    None
                }
            },
        )
    }

    /// Fires the timers due at `now` (at most `limit`): twins whose status changes by
    /// processing time alone. Their outputs carry `source`, the offset of the last input
    /// processed. Returns how many fired.
    ///
    /// # Errors
    /// As [`Processor::process`].
    pub fn fire_timers(
        &mut self,
        batch: &mut Batch,
        now: i64,
        source: i64,
        limit: usize,
    ) -> Result<usize> {
        // Every exit clears the current work, the early ones too.
        let fired = (|| -> Result<usize> {
            let topology = self.topology.clone();
            let model = &topology.model;
            let mut fired = 0;
            // A new deadline is after `now`, so nothing lands behind `due_after`.
            let due = self.store.due(self.due_after.as_ref(), now, limit)?;
            if let Some(last) = due.last() {
                self.due_after = Some(last.clone());
            }
            for (deadline, id) in due {
                // A due entry leaves the index; the twin decides what follows.
                batch.store.delete_deadline(deadline, &id);
                let work = Work::Timer(deadline, id.clone());
                if self.quarantine.contains_key(&work) {
                    // It panicked: the entry is dropped, the twin keeps its status until its
                    // next reading.
                    continue;
                }
                self.current = Some(work);
                if let Some(refuse) = model.time.refuse_deleted_for
                    && let Some(at) = self.deleted_at(&id)?
                    && at.saturating_add(refuse) <= now
                {
                    // The id is no longer refused.
                    batch.store.delete_deleted(&id);
                    self.deleted.insert(id.as_str().into(), None);
                }
                if !self.load(&id)? {
                    self.cache.remove(id.as_str());
                    continue;
                }
                let twin = self.cache.get_mut(id.as_str()).expect("loaded above");
                // The index may lag the twin (staged work, a restore, a deadline that moved
                // later): a deadline still ahead is filed again.
                let Some(actual) = model.deadline(twin) else {
                    continue;
                };
                if actual > now {
                    batch.store.put_deadline(actual, &id);
                    continue;
                }
                match topology
                    .core()
                    .timer(twin, now, &mut self.effects, &mut self.alerts)
                {
                    Timed::Retire => {
                        fired += 1;
                        self.delete(&id, Deletion::Retired, "", batch, now, source)?;
                    }
                    Timed::Unchanged => batch.store.put_deadline(actual, &id),
                    Timed::Fired => {
                        fired += 1;
                        self.emit(&id, None, source, batch);
                    }
                }
            }
            batch.counts.timers_fired += fired as u64;
            Ok(fired)
        })();
        self.current = None;
        fired
    }

    /// Loads the twin of `id` into the cache (a fresh one if it has none). Returns whether
    /// it was stored or cached before.
    fn load(&mut self, id: &str) -> Result<bool> {
        if self.cache.contains_key(id) {
            return Ok(true);
        }
        let (twin, existed) = match self.store.twin(id)? {
            Some(bytes) => {
                let twin = self.topology.codec.decode_twin(&bytes).map_err(|e| {
                    Error::CorruptStore(format!("twin {id} in partition {}: {e}", self.partition))
                })?;
                (twin, true)
            }
            None => (Twin::new(id, &self.topology.model), false),
        };
        self.cache.insert(id.into(), Box::new(twin));
        Ok(existed)
    }

    /// Files the timer of the changed twin of `id` if it is due before `indexed` (the
    /// deadline the index already has an entry at or before, if any), and stages the twin,
    /// its changelog record, its alert events and command outputs (from the step that
    /// changed it: `self.alerts`, `self.effects`).
    fn emit(&mut self, id: &str, indexed: Option<i64>, source: i64, batch: &mut Batch) {
        let topology = &self.topology;
        let twin = self.cache.get_mut(id).expect("emit after load");
        // The index keeps an entry at or before each twin's deadline. Most readings move the
        // deadline later; the old entry then stays, and when it comes due the twin files it
        // again (`fire_timers`). So a reading costs one store write, not three.
        let deadline = topology.model.deadline(twin);
        if let Some(next) = deadline
            && indexed.is_none_or(|at| next < at)
        {
            batch.store.put_deadline(next, id);
        }
        self.scratch.clear();
        topology.codec.encode_twin(twin, &mut self.scratch);

        batch.counts.updates += 1;
        batch.store.put_twin(id, &self.scratch);
        let framing = topology.codec.changelog_header();
        let value = Some((framing, &self.scratch[..]));
        let stamp = (
            twin.updated_at,
            topology.model.has_timers().then_some(deadline),
        );
        (batch.outputs).push_twin(source, id.as_bytes(), value, Vec::new(), stamp);
        let version = twin.version;
        self.emit_alerts(id, source, batch);
        self.emit_commands(id, version, source, batch);
    }

    /// Stages the alert events in `self.alerts` for the twin of `id`.
    fn emit_alerts(&mut self, id: &str, source: i64, batch: &mut Batch) {
        let topology = &self.topology;
        for event in &self.alerts {
            self.scratch.clear();
            encode_alert(event, id, &topology.rules, &mut self.scratch);
            batch.outputs.push_value(
                Target::Alerts,
                source,
                id.as_bytes(),
                topology.codec.alerts_header(),
                &self.scratch,
            );
            batch.counts.alerts.push((event.rule, event.state));
            if let (Some(outcome), Some(_)) =
                (event.reason, topology.rules.rules[event.rule].forecast)
            {
                batch.counts.forecast_outcomes.push((event.rule, outcome));
            }
        }
    }

    /// Stages the command events and commands in `self.effects` for the twin of `id` (in the
    /// cache unless a rejected write left none) at twin version `version`.
    fn emit_commands(&mut self, id: &str, version: i64, source: i64, batch: &mut Batch) {
        if self.effects.is_empty() {
            return;
        }
        let counts = &mut batch.counts;
        counts
            .converged_after
            .extend_from_slice(&self.effects.converged_after);
        let topology = &self.topology;
        for event in &self.effects.events {
            self.scratch.clear();
            encode_command_event(event, id, version, &mut self.scratch);
            batch.outputs.push_value(
                Target::CommandEvents,
                source,
                id.as_bytes(),
                None,
                &self.scratch,
            );
            batch.counts.command_events[event.state as usize] += 1;
        }
        let Some(twin) = self.cache.get(id) else {
            return;
        };
        let names = |i: usize| topology.model.properties[i].name.as_str();
        for command in &self.effects.sends {
            self.scratch.clear();
            if encode_command(twin, command, &names, &mut self.scratch) {
                batch.outputs.push_value(
                    Target::Commands,
                    source,
                    id.as_bytes(),
                    None,
                    &self.scratch,
                );
                batch.counts.commands_sent += 1;
            }
        }
    }

    /// Dead-letters a record whose processing panicked before (reason `internal`, with the
    /// panic's message), and returns true; false if `work` is not set aside.
    fn set_aside(&mut self, work: &Work, input: &Input<'_>, batch: &mut Batch) -> bool {
        let Some(message) = self.quarantine.get(work) else {
            return false;
        };
        let why = format!("processing panicked: {message}");
        if let Work::Record(InputKind::Readings, offset) = work {
            batch.next.set(InputKind::Readings, Some(offset + 1));
            batch.counts.consumed += 1;
        }
        // Should this panic too, the entry is still there: `quarantine` then says so.
        self.current = Some(work.clone());
        self.dead_letter(
            input,
            batch,
            DeadLetterReason::Internal,
            Stage::Internal,
            &why,
        );
        self.current = None;
        true
    }

    /// Stages the record for the dead-letter topic, with why (see [`super::dead_letter`]).
    fn dead_letter(
        &mut self,
        input: &Input<'_>,
        batch: &mut Batch,
        reason: DeadLetterReason,
        stage: Stage,
        message: &str,
    ) {
        batch.counts.dead_letter(reason);
        let why = Why {
            reason,
            stage,
            message,
        };
        dead_letter(
            &mut batch.outputs,
            input,
            self.partition,
            &why,
            self.max_record_bytes,
        );
    }

    /// Keeps the cache within its bound. Called between batches, when every cached twin
    /// equals its stored copy, so dropping any of them loses nothing.
    fn evict(&mut self) {
        if self.cache.len() <= self.cache_limit {
            return;
        }
        let excess = self.cache.len() - self.cache_limit * 9 / 10;
        let victims: Vec<Box<str>> = self.cache.keys().take(excess).cloned().collect();
        for k in victims {
            self.cache.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::twin::{Status, Value};

    const MINUTE: i64 = 60_000;
    const T0: i64 = 1_790_000_000_000;

    fn topology() -> Arc<Topology> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let paths = crate::config::TopologyConfig::shipped(root, "vehicle");
        Arc::new(Topology::load(&paths).expect("the shipped topology loads"))
    }

    /// A reading of `truck-1` at `now` with `speed`, encoded.
    fn speed(speed: f64, now: i64) -> Vec<u8> {
        let topology = topology();
        let reading = Reading {
            asset_id: "truck-1".into(),
            event_time: now,
            values: vec![(
                topology.model.property("speed_kmh").expect("speed"),
                Value::Double(speed),
            )],
        };
        let mut value = Vec::new();
        topology.codec.encode_reading(&reading, &mut value);
        value
    }

    /// Processes a moving reading of `truck-1` at `now` and commits it to the store.
    fn moving(p: &mut Processor, store: &crate::store::PartitionStore, offset: i64, now: i64) {
        let value = speed(50.0, now);
        let input = Input {
            key: Some(b"truck-1"),
            payload: Some(&value),
            topic: "telemetry",
            offset,
            headers: None,
        };
        let mut batch = p.batch(true);
        p.process(&input, &mut batch, now).expect("processed");
        assert_eq!(batch.counts.updates, 1);
        store.commit(batch.store).expect("committed");
    }

    /// A delete and a reading of the same twin in one batch: the reading creates the twin
    /// again at version 1, though the store holds the deleted one until the commit; a second
    /// delete finds nothing to delete.
    #[test]
    fn a_reading_after_a_delete_in_the_same_batch_starts_a_new_twin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store").partition(0);
        let topology = topology();
        let mut p = Processor::new(topology.clone(), store.clone(), 1000);
        moving(&mut p, &store, 0, T0);
        moving(&mut p, &store, 1, T0 + MINUTE);

        let now = T0 + 2 * MINUTE;
        let mut batch = p.batch(true);
        let headers: &[(&[u8], Option<&[u8]>)] = &[(b"twinflow.control", Some(b"delete"))];
        let control = Input {
            key: Some(b"truck-1"),
            payload: None,
            topic: "twin-desired",
            offset: 0,
            headers: Some(&headers),
        };
        p.process_desired(&control, &mut batch, now, 1)
            .expect("deleted");
        p.process_desired(&control, &mut batch, now, 1)
            .expect("no-op");
        let value = speed(9.0, now);
        let input = Input {
            key: Some(b"truck-1"),
            payload: Some(&value),
            topic: "telemetry",
            offset: 2,
            headers: None,
        };
        p.process(&input, &mut batch, now).expect("processed");

        let changelog: Vec<Option<i64>> = (batch.outputs.records.iter())
            .filter(|o| o.target == Target::Changelog)
            .map(|o| {
                let value = batch.outputs.bytes(o).1?;
                Some(
                    topology
                        .codec
                        .decode_changelog_twin(value)
                        .expect("a twin")
                        .version,
                )
            })
            .collect();
        assert_eq!(changelog, [None, Some(1)], "a tombstone, then version 1");
        assert_eq!(batch.counts.deletions(Deletion::Requested), 1);
        assert_eq!(batch.counts.deletions(Deletion::Unknown), 1);
        store.commit(batch.store).expect("committed");
        let stored = store.twin("truck-1").expect("read").expect("stored");
        assert_eq!(
            topology.codec.decode_twin(&stored).expect("a twin").version,
            1
        );
    }

    /// Fires what is due at `now`, commits it, and returns the statuses of the changelog twins.
    fn fire(p: &mut Processor, store: &crate::store::PartitionStore, now: i64) -> Vec<Status> {
        let topology = topology();
        let mut batch = p.batch(true);
        p.fire_timers(&mut batch, now, 0, 100).expect("fired");
        let statuses = batch
            .outputs
            .records
            .iter()
            .filter(|o| o.target == Target::Changelog)
            .map(|o| {
                let (_, value) = batch.outputs.bytes(o);
                let twin = topology
                    .codec
                    .decode_changelog_twin(value.expect("a value"))
                    .expect("a twin");
                twin.status
            })
            .collect();
        store.commit(batch.store).expect("committed");
        statuses
    }

    /// A reading that moves the offline deadline later leaves the old timer entry behind: when
    /// it comes due the twin says "not yet", and the asset turns OFFLINE once, at its real
    /// deadline, also after a restart; the index is empty afterwards.
    #[test]
    fn a_moved_deadline_fires_once_at_the_new_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store").partition(0);
        let offline_after = topology().model.time.offline_after.expect("vehicle model");
        let mut p = Processor::new(topology(), store.clone(), 1000);

        moving(&mut p, &store, 0, T0);
        moving(&mut p, &store, 1, T0 + 4 * MINUTE);
        assert_eq!(fire(&mut p, &store, T0 + offline_after + 1000), []);

        // A new processor (a restart): only the store remembers.
        let mut p = Processor::new(topology(), store.clone(), 1000);
        assert_eq!(fire(&mut p, &store, T0 + offline_after + 2000), []);
        let due = T0 + 4 * MINUTE + offline_after;
        assert_eq!(fire(&mut p, &store, due - 1), []);
        assert_eq!(fire(&mut p, &store, due), [Status::Offline]);
        assert_eq!(fire(&mut p, &store, due + 60 * MINUTE), []);
        assert_eq!(store.due(None, i64::MAX, 100).expect("index"), []);
    }
}
