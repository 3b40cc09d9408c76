//! The fleet view: every instance keeps a read replica of the whole fleet, fed from the
//! changelog, so any instance answers for any twin (see `ARCHITECTURE.md`, "The twin API").
//!
//! One thread tails every changelog partition (from where the view last stopped) and every
//! alert and command event partition (from its end: they are live only), writes the newest
//! twin of each asset (and its partition) to the store's view keys, answers the API's
//! waits for the decision on a desired write, keeps the fleet counts (by status, by active alert) up
//! to date, and publishes each change for the live stream in a bounded log that keeps the
//! latest event per asset (and per alert), so a client that falls behind during a burst
//! catches up with the latest state instead of being dropped.
//! It never touches the pipeline's state and the pipeline never waits for it: a slow
//! view or a slow stream client costs the pipeline nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::{ClientConfig, Offset};
use tokio::sync::{oneshot, watch};

use crate::config::ViewConfig;
use crate::error::Result;
use crate::kafka::{OutputReader, Polled};
use crate::metrics::Metrics;
use crate::registry::{Registry, decode_fetching};
use crate::store::{Checkpoints, ViewPosition, ViewStore, ViewedTwin};
use crate::topology::Topology;
use crate::twin::{Status, Twin};

/// Changes kept for the live stream: the latest event of this many assets (and alerts). A
/// client is dropped only when one it has not read yet had to go: when more than this many
/// different assets changed since its last read.
pub const STREAM_BUFFER: usize = 16_384;

/// How long the view waits at start for the instance's restores to finish.
pub const START_DEFER: Duration = Duration::from_secs(10);

/// Refused records kept, the newest of each asset: for this many assets at most.
pub const REFUSALS_KEPT: usize = 10_000;

/// A record of an asset the pipeline refused (a dead letter), as this instance saw it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Refusal {
    /// The dead-letter reason (`late`, `invalid`, ...).
    pub reason: String,
    /// Where processing stopped.
    pub stage: String,
    /// Why, for a person.
    pub message: String,
    /// The input topic of the refused record.
    pub source_topic: String,
    /// Its offset there.
    pub source_offset: Option<i64>,
    /// The dead letter's timestamp (RFC 3339).
    pub at: String,
    /// The version of the asset's twin this view had when the dead letter came: the
    /// refusal is the latest word on the asset while the twin is still at it.
    pub twin_version: i64,
}

/// The newest refusal of each of at most [`REFUSALS_KEPT`] assets, the oldest forgotten first.
#[derive(Default)]
struct Refusals {
    by_asset: HashMap<String, (u64, Refusal)>,
    order: std::collections::VecDeque<(u64, String)>,
    seq: u64,
}

impl Refusals {
    fn insert(&mut self, asset_id: String, refusal: Refusal) {
        self.seq += 1;
        self.order.push_back((self.seq, asset_id.clone()));
        self.by_asset.insert(asset_id, (self.seq, refusal));
        while self.by_asset.len() > REFUSALS_KEPT || self.order.len() > 2 * REFUSALS_KEPT {
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if self.by_asset.get(&id).is_some_and(|(s, _)| *s == seq) {
                self.by_asset.remove(&id);
            }
        }
    }
}

/// Changelog records applied per view write.
const VIEW_BATCH: usize = 2000;

/// Which versions of a twin's history to read.
#[derive(Clone, Debug, Default)]
pub struct HistoryQuery {
    /// Versions at or after this time (ms).
    pub from: Option<i64>,
    /// Versions at or before this time (ms).
    pub to: Option<i64>,
    /// By processing time (`updated_at`) instead of event time.
    pub processing: bool,
    /// The page's cursor: versions after (or, descending, before) this one.
    pub after: Option<u64>,
    /// Newest first.
    pub descending: bool,
    /// Versions per page.
    pub limit: usize,
}

impl HistoryQuery {
    /// The time of `twin` this query goes by. Both grow with the version: a twin's event
    /// time is its newest reading's, its `updated_at` the processing time of its change.
    fn time(&self, twin: &Twin) -> i64 {
        if self.processing {
            twin.updated_at
        } else {
            twin.event_time
        }
    }
}

/// Fleet-wide counts.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Counts {
    /// Twins in the view.
    pub twins: u64,
    /// Twins by status.
    pub by_status: BTreeMap<&'static str, u64>,
    /// Active alerts by rule code.
    pub by_alert: BTreeMap<String, u64>,
}

impl Counts {
    fn add(&mut self, twin: &Twin, sign: i64) {
        let step = |n: &mut u64| *n = n.saturating_add_signed(sign);
        step(&mut self.twins);
        step(self.by_status.entry(twin.status.symbol()).or_default());
        for a in &twin.alerts {
            step(self.by_alert.entry(a.code.clone()).or_default());
        }
        self.by_alert.retain(|_, n| *n > 0);
    }
}

/// What a stream event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A twin changed; the JSON is the twin.
    Twin,
    /// An alert was raised, cleared or acknowledged; the JSON is the alert event.
    Alert,
    /// A command changed state; the JSON is the command event.
    Command,
    /// A twin was deleted; the JSON is `{"asset_id": ..., "deleted": true}`. It replaces
    /// the twin's last change for a client behind.
    Deleted,
}

/// One live event.
#[derive(Debug)]
pub struct Event {
    /// Twin or alert.
    pub kind: EventKind,
    /// The asset.
    pub asset_id: String,
    /// Alert codes it concerns: the twin's active alerts, or the alert's code.
    pub codes: Vec<String>,
    /// What of the asset it is about, for a client behind: empty for a twin, the alert's
    /// code, or the command's id.
    pub about: String,
    /// The event as JSON text.
    pub json: String,
}

/// What a stream event replaces when a client is behind: the asset's twin, or one alert
/// code's event of the asset.
type EventKey = (EventKind, String, String);

/// The live changes: per key only the latest event, in the order of their last change.
#[derive(Default)]
struct Recent {
    /// The sequence number of the next event.
    next: u64,
    /// Every event before this one is gone (or replaced by a later one of its key).
    floor: u64,
    latest: HashMap<EventKey, u64>,
    log: BTreeMap<u64, (EventKey, Arc<Event>)>,
}

/// One stream client's place in the live changes.
pub struct Subscription {
    view: Arc<FleetView>,
    cursor: u64,
    changed: watch::Receiver<u64>,
}

impl Subscription {
    /// The next change the client has not read: the latest event of its asset (or alert)
    /// as of now, so a client behind skips what was replaced. Waits for one.
    ///
    /// # Errors
    /// The number of changes lost, when the client fell so far behind that a change it had
    /// not read had to go ([`STREAM_BUFFER`]).
    pub async fn next(&mut self) -> Result<Arc<Event>, u64> {
        loop {
            // Marked seen before looking, so a change published after the look wakes us.
            self.changed.borrow_and_update();
            {
                let recent = self.view.recent.lock().expect("recent lock");
                if recent.floor > self.cursor {
                    return Err(recent.floor - self.cursor);
                }
                if let Some((seq, (_, event))) = recent.log.range(self.cursor..).next() {
                    self.cursor = seq + 1;
                    return Ok(event.clone());
                }
            }
            if self.changed.changed().await.is_err() {
                return Err(0);
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.view.subscribers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fleet view of one instance.
pub struct FleetView {
    store: ViewStore,
    /// How much history the view keeps.
    config: ViewConfig,
    metrics: Metrics,
    topology: Arc<Topology>,
    counts: Mutex<Counts>,
    recent: Mutex<Recent>,
    /// The sequence number of the last change published.
    published: watch::Sender<u64>,
    subscribers: AtomicUsize,
    caught_up: AtomicBool,
    /// The API's waits for the decision on a command, by command id.
    decisions: Mutex<HashMap<String, oneshot::Sender<serde_json::Value>>>,
    /// The newest refused record of each asset, from the dead-letter topic.
    refusals: Mutex<Refusals>,
}

/// A wait for the decision on one desired write: the first event of its command (ISSUED,
/// CONVERGED at once, or REJECTED). Dropping it ends the wait.
pub struct Decision {
    view: Arc<FleetView>,
    command_id: String,
    answer: oneshot::Receiver<serde_json::Value>,
}

impl Decision {
    /// The decision, as the command event's JSON, or `None` if none came within `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Option<serde_json::Value> {
        tokio::time::timeout(timeout, &mut self.answer)
            .await
            .ok()?
            .ok()
    }
}

impl Drop for Decision {
    fn drop(&mut self) {
        let mut decisions = self.view.decisions.lock().expect("decisions lock");
        decisions.remove(&self.command_id);
    }
}

impl FleetView {
    /// The view over `store`. Its counts start empty: [`FleetView::run`] rebuilds them from
    /// what the store holds before it reads on, so a restart is not held up by a scan of
    /// every twin; until the view has caught up, `/fleet` says so.
    pub fn open(
        store: ViewStore,
        topology: Arc<Topology>,
        metrics: Metrics,
        config: ViewConfig,
    ) -> Arc<FleetView> {
        Arc::new(FleetView {
            store,
            config,
            metrics,
            topology,
            counts: Mutex::new(Counts::default()),
            recent: Mutex::default(),
            published: watch::Sender::new(0),
            subscribers: AtomicUsize::new(0),
            caught_up: AtomicBool::new(false),
            decisions: Mutex::default(),
            refusals: Mutex::default(),
        })
    }

    /// The newest record of `asset_id` the pipeline refused since this view started (of at
    /// most [`REFUSALS_KEPT`] assets).
    pub fn refusal(&self, asset_id: &str) -> Option<Refusal> {
        let refusals = self.refusals.lock().expect("refusals lock");
        refusals.by_asset.get(asset_id).map(|(_, r)| r.clone())
    }

    /// The changelog partition of the twin of `asset_id`, if the view knows it.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn partition(&self, asset_id: &str) -> Result<Option<i32>> {
        self.store.partition(asset_id)
    }

    /// Starts waiting for the decision on command `command_id`: call it before the write
    /// is sent, so that a quick answer is not missed.
    pub fn decision(self: &Arc<Self>, command_id: &str) -> Decision {
        let (tx, answer) = oneshot::channel();
        let mut decisions = self.decisions.lock().expect("decisions lock");
        decisions.insert(command_id.to_owned(), tx);
        Decision {
            view: self.clone(),
            command_id: command_id.to_owned(),
            answer,
        }
    }

    /// Starts waiting for the twin of `asset_id` to be deleted (its tombstone applied): call
    /// it before the delete request is sent.
    pub fn deletion(self: &Arc<Self>, asset_id: &str) -> Decision {
        self.decision(&deletion(asset_id))
    }

    /// The twin of `asset_id`.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails; `Error::Decode` for an unreadable twin.
    pub fn twin(&self, asset_id: &str) -> Result<Option<Twin>> {
        self.store
            .twin(asset_id)?
            .map(|b| self.topology.codec.decode_twin(&b))
            .transpose()
    }

    /// A page of the history of `asset_id` at `now` (see [`HistoryQuery`]): the versions and
    /// the cursor of the next page, if there may be one. `None` when there is no such twin.
    ///
    /// # Errors
    /// As [`FleetView::twin`].
    pub fn history(
        &self,
        asset_id: &str,
        q: &HistoryQuery,
        now: i64,
    ) -> Result<Option<(Vec<Twin>, Option<u64>)>> {
        let Some(newest) = self.twin(asset_id)? else {
            return Ok(None);
        };
        let lowest = self.lowest_served(&newest);
        let oldest_time = now.saturating_sub(
            i64::try_from(self.config.history_retention.as_millis()).unwrap_or(i64::MAX),
        );
        // Oldest first starts at the oldest version served, not at what a trim left over.
        let start = match (q.after, q.descending) {
            (Some(a), true) => Some(a.saturating_sub(1)),
            (Some(a), false) => Some(a.saturating_add(1).max(lowest)),
            (None, true) => None,
            (None, false) => Some(lowest),
        };
        let mut page = Vec::new();
        let mut next = None;
        for item in self.store.history(asset_id, start, q.descending) {
            let (version, bytes) = item?;
            if version < lowest {
                if q.descending {
                    break;
                }
                continue;
            }
            let twin = self.topology.codec.decode_twin(&bytes)?;
            let time = q.time(&twin);
            if twin.updated_at < oldest_time || q.from.is_some_and(|f| time < f) {
                if q.descending {
                    break;
                }
                continue;
            }
            if q.to.is_some_and(|t| time > t) {
                if q.descending {
                    continue;
                }
                break;
            }
            if page.len() == q.limit {
                next = page.last().map(|t: &Twin| t.version as u64);
                break;
            }
            page.push(twin);
        }
        Ok(Some((page, next)))
    }

    /// The twin of `asset_id` as it was at `at` (event time, or processing time with
    /// `processing`): its newest kept version at or before then. `Ok(None)` when there is
    /// no twin, `Ok(Some(None))` when no kept version is that old.
    ///
    /// # Errors
    /// As [`FleetView::twin`].
    pub fn as_of(&self, asset_id: &str, at: i64, processing: bool) -> Result<Option<Option<Twin>>> {
        let Some(newest) = self.twin(asset_id)? else {
            return Ok(None);
        };
        let q = HistoryQuery {
            processing,
            ..HistoryQuery::default()
        };
        let lowest = self.lowest_served(&newest);
        for item in self.store.history(asset_id, None, true) {
            let (version, bytes) = item?;
            if version < lowest {
                break;
            }
            let twin = self.topology.codec.decode_twin(&bytes)?;
            if q.time(&twin) <= at {
                return Ok(Some(Some(twin)));
            }
        }
        Ok(Some(None))
    }

    /// The oldest version served: the newest `history_versions` are (more may be stored
    /// until the next trim).
    fn lowest_served(&self, newest: &Twin) -> u64 {
        (newest.version.max(0) as u64).saturating_sub(self.config.history_versions) + 1
    }

    /// Up to `limit` twins after `after`, in asset id order.
    ///
    /// # Errors
    /// As [`FleetView::twin`].
    pub fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<Twin>> {
        self.store
            .scan(after, limit)?
            .iter()
            .map(|(_, b)| self.topology.codec.decode_twin(b))
            .collect()
    }

    /// The fleet counts.
    pub fn counts(&self) -> Counts {
        self.counts.lock().expect("counts lock").clone()
    }

    /// Whether the view has read the changelog up to where it stood when the view started.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// A stream client's place in the changes, from now on.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribers.fetch_add(1, Ordering::SeqCst);
        let cursor = self.recent.lock().expect("recent lock").next;
        Subscription {
            view: self.clone(),
            cursor,
            changed: self.published.subscribe(),
        }
    }

    /// Publishes a change for the stream clients: it replaces the earlier event of its key,
    /// and the oldest key goes when more than [`STREAM_BUFFER`] are kept.
    fn publish(&self, event: Event) {
        let kind = match event.kind {
            EventKind::Deleted => EventKind::Twin,
            kind => kind,
        };
        let key = (kind, event.asset_id.clone(), event.about.clone());
        let mut recent = self.recent.lock().expect("recent lock");
        let seq = recent.next;
        recent.next += 1;
        if let Some(replaced) = recent.latest.insert(key.clone(), seq) {
            recent.log.remove(&replaced);
        }
        recent.log.insert(seq, (key, Arc::new(event)));
        if recent.log.len() > STREAM_BUFFER
            && let Some((oldest, (key, _))) = recent.log.pop_first()
        {
            recent.latest.remove(&key);
            recent.floor = oldest + 1;
        }
        drop(recent);
        self.published.send_replace(seq);
    }

    /// Whether any stream client listens (events are published only then).
    fn live(&self) -> bool {
        self.subscribers.load(Ordering::SeqCst) > 0
    }

    /// The model the twins follow.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Tails the changelog and alert topics until `stop` is set. Blocking: run it on a
    /// thread of its own. `client` is the reader's (`Clients::reader`, without ends).
    ///
    /// It starts once `ready` says the instance has restored its partitions, or after
    /// [`START_DEFER`]: a restore reads the same changelog and needs the same cores, and
    /// processing comes first.
    pub fn run(
        self: Arc<Self>,
        client: ClientConfig,
        registry: Option<Arc<Registry>>,
        runtime: tokio::runtime::Handle,
        stop: Arc<AtomicBool>,
        ready: impl Fn() -> bool,
    ) {
        let deferred = std::time::Instant::now();
        while !ready() && deferred.elapsed() < START_DEFER && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut failures = 0u32;
        while !stop.load(Ordering::SeqCst) {
            if let Err(error) = self.count_stored(&stop) {
                failures += 1;
                tracing::warn!(%error, "Fleet view cannot read its store; starting over.");
                std::thread::sleep(Duration::from_millis(200 * u64::from(failures.min(25))));
                continue;
            }
            break;
        }
        while !stop.load(Ordering::SeqCst) {
            match self.tail(&client, registry.as_deref(), &runtime, &stop) {
                Ok(()) => return,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(%error, "Fleet view failed; starting over.");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(failures.min(25))));
                }
            }
        }
    }

    /// Counts the twins the store holds (before any is written by this run).
    fn count_stored(&self, stop: &AtomicBool) -> Result<()> {
        let mut counts = Counts::default();
        let mut after: Option<String> = None;
        while !stop.load(Ordering::SeqCst) {
            let page = self.store.scan(after.as_deref(), 10_000)?;
            for (_, bytes) in &page {
                if let Ok(twin) = self.topology.codec.decode_twin(bytes) {
                    counts.add(&twin, 1);
                }
            }
            match page.last() {
                Some((id, _)) => after = Some(id.clone()),
                None => break,
            }
        }
        self.metrics.view_twins.set(counts.twins as i64);
        *self.counts.lock().expect("counts lock") = counts;
        Ok(())
    }

    fn tail(
        &self,
        client: &ClientConfig,
        registry: Option<&Registry>,
        runtime: &tokio::runtime::Handle,
        stop: &AtomicBool,
    ) -> Result<()> {
        let reader = OutputReader::new(client)?;
        let topics = &self.topology.topics;
        let changelog = topics.changelog.name.as_str();
        let mut from = Vec::new();
        let mut targets = HashMap::new();
        // Per partition, the checkpoints of the partitions the view indexes: those it has
        // read from their first record with the index.
        let mut sources: HashMap<i32, Checkpoints> = HashMap::new();
        for p in 0..topics.changelog.partitions {
            let at = self.store.position(p)?;
            match (at, self.store.checkpoints(p)?) {
                (None, _) => _ = sources.insert(p, Checkpoints::default()),
                (Some(_), Some(checkpoints)) => _ = sources.insert(p, checkpoints),
                (Some(_), None) => {}
            }
            from.push((changelog, p, at.map_or(Offset::Beginning, Offset::Offset)));
            let (_, high) = reader.watermarks(changelog, p, Duration::from_secs(10))?;
            targets.insert(p, high);
        }
        for live in [&topics.alerts, &topics.command_events, &topics.dead_letter] {
            for p in 0..live.partitions {
                // From the end as it is now: alerts and command events are live only.
                let (_, high) = reader.watermarks(&live.name, p, Duration::from_secs(10))?;
                from.push((&live.name, p, Offset::Offset(high)));
            }
        }
        reader.assign(&from)?;
        let codec = &self.topology.codec;
        let mut positions: HashMap<i32, i64> = HashMap::new();
        let mut pending: Vec<ViewedTwin> = Vec::new();
        let refuse = self.topology.model.time.refuse_deleted_for.is_some();
        while !stop.load(Ordering::SeqCst) {
            let idle = match reader.poll(Duration::from_millis(50)) {
                Ok(Polled::Record(m)) => {
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    if m.topic() == changelog {
                        positions.insert(m.partition(), m.offset() + 1);
                        if let Some(checkpoints) = sources.get_mut(&m.partition()) {
                            checkpoints.advance(m.offset() + 1, m.source_offset());
                        }
                        if let Some(asset_id) = key {
                            let twin = match m.value() {
                                Some(v) => Some(decode_fetching(registry, codec, runtime, |c| {
                                    c.stored_twin(v).map(|t| t.into_owned())
                                })?),
                                None => None,
                            };
                            // A twin's deadline is filled in when it is decoded.
                            let timer = match twin {
                                Some(_) => None,
                                None => m.number(crate::headers::DELETED_AT).filter(|_| refuse),
                            };
                            pending.push(ViewedTwin {
                                asset_id,
                                partition: m.partition(),
                                twin,
                                timer,
                            });
                        }
                    } else if m.topic() == topics.dead_letter.name {
                        if let Some(id) = key {
                            self.refused(id, &m)?;
                        }
                    } else if let (Some(id), Some(v)) = (key, m.value()) {
                        if m.topic() == topics.alerts.name {
                            self.publish_alert(id, v);
                        } else {
                            self.command_event(id, v);
                        }
                    }
                    false
                }
                Ok(Polled::End(_) | Polled::Idle) => true,
                Err(error) => {
                    // Transport errors pass: librdkafka reconnects and fetches on.
                    tracing::debug!(%error, "Fleet view consumer error.");
                    continue;
                }
            };
            if idle {
                let lag: i64 = (0..topics.changelog.partitions)
                    .filter_map(|p| {
                        let (_, high) = reader.cached_watermarks(changelog, p)?;
                        let at = self.store.position(p).ok().flatten().unwrap_or(0);
                        Some((high - at).max(0))
                    })
                    .sum();
                self.metrics.view_lag.set(lag);
            }
            let apply = pending.len() >= VIEW_BATCH || (idle && !positions.is_empty());
            if apply {
                let positions: Vec<ViewPosition> = (positions.drain())
                    .map(|(partition, next)| ViewPosition {
                        partition,
                        next,
                        checkpoints: sources.get(&partition).cloned(),
                    })
                    .collect();
                self.apply(std::mem::take(&mut pending), &positions)?;
            }
            if (apply || idle) && !self.caught_up() {
                let reached = targets.iter().all(|(p, high)| {
                    *high == 0 || self.store.position(*p).ok().flatten().unwrap_or(0) >= *high
                });
                self.caught_up.store(reached, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Writes a batch of changelog twins, updates the counts and publishes the changes.
    fn apply(&self, mut changes: Vec<ViewedTwin>, positions: &[ViewPosition]) -> Result<()> {
        let codec = &self.topology.codec;
        let live = self.live();
        let mut latest: HashMap<&str, Option<&Vec<u8>>> = HashMap::new();
        let mut versions = Vec::with_capacity(changes.len());
        let mut deadlines = Vec::with_capacity(changes.len());
        let mut diff = Counts::default();
        let mut removed = Counts::default();
        for change in &changes {
            let (id, twin) = (&change.asset_id, &change.twin);
            let before = match latest.get(id.as_str()) {
                Some(b) => b.and_then(|b| codec.decode_twin(b).ok()),
                None => self
                    .store
                    .twin(id)?
                    .and_then(|b| codec.decode_twin(&b).ok()),
            };
            if let Some(b) = &before {
                removed.add(b, 1);
            }
            let after = twin.as_ref().and_then(|b| codec.decode_twin(b).ok());
            versions.push(after.as_ref().and_then(|a| u64::try_from(a.version).ok()));
            deadlines.push(after.as_ref().and_then(|a| self.topology.model.deadline(a)));
            if let Some(a) = &after {
                diff.add(a, 1);
                if live {
                    self.publish(Event {
                        kind: EventKind::Twin,
                        asset_id: id.clone(),
                        codes: a.alerts.iter().map(|x| x.code.clone()).collect(),
                        about: String::new(),
                        json: codec.twin_json(a).to_string(),
                    });
                }
            }
            if let (None, Some(before)) = (&after, &before) {
                self.deleted(id, before.alerts.iter().map(|a| a.code.clone()).collect());
            }
            latest.insert(id, twin.as_ref());
        }
        for (change, deadline) in changes.iter_mut().zip(deadlines) {
            if change.twin.is_some() {
                change.timer = deadline;
            }
        }
        self.store
            .write(&changes, &versions, self.config.history_versions, positions)?;
        let mut counts = self.counts.lock().expect("counts lock");
        merge(&mut counts, &diff, 1);
        merge(&mut counts, &removed, -1);
        self.metrics.view_twins.set(counts.twins as i64);
        Ok(())
    }

    /// Answers the wait for the deletion of the twin of `asset_id`, if any, and publishes it
    /// (to the streams of the alert `codes` it had too).
    fn deleted(&self, asset_id: &str, codes: Vec<String>) {
        let json = serde_json::json!({ "asset_id": asset_id, "deleted": true });
        let waiting = self
            .decisions
            .lock()
            .expect("decisions lock")
            .remove(&deletion(asset_id));
        if let Some(answer) = waiting {
            let _ = answer.send(json.clone());
        }
        if self.live() {
            self.publish(Event {
                kind: EventKind::Deleted,
                asset_id: asset_id.to_owned(),
                codes,
                about: String::new(),
                json: json.to_string(),
            });
        }
    }

    /// Notes the dead letter `m` of `asset_id`: only its headers are read, each cut to
    /// 1 KiB (anyone who can write the topic writes its headers). A key longer than any
    /// asset id, or a twin the view cannot decode, is no asset's refusal to keep.
    fn refused(&self, asset_id: String, m: &crate::kafka::OutputRecord<'_>) -> Result<()> {
        use crate::headers as h;
        if asset_id.len() > crate::twin::MAX_ASSET_ID_BYTES {
            return Ok(());
        }
        let text = |name: &str| {
            let mut text = m.text(name).unwrap_or_default();
            let mut end = text.len().min(1024);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text
        };
        let mut refusal = Refusal {
            reason: text(h::ERROR_REASON),
            stage: text(h::ERROR_STAGE),
            message: text(h::ERROR_MESSAGE),
            source_topic: text(h::SOURCE_TOPIC),
            source_offset: m.source_offset(),
            at: crate::codec::rfc3339(m.timestamp().unwrap_or(0)),
            twin_version: 0,
        };
        if let Some(bytes) = self.store.twin(&asset_id)? {
            let twin = self.topology.codec.decode_twin(&bytes).ok();
            refusal.twin_version = twin.map_or(0, |t| t.version);
        }
        let mut refusals = self.refusals.lock().expect("refusals lock");
        refusals.insert(asset_id, refusal);
        Ok(())
    }

    fn publish_alert(&self, asset_id: String, value: &[u8]) {
        if !self.live() {
            return;
        }
        let Ok(json) = self.topology.codec.alert_json(value) else {
            return;
        };
        let code = json["code"].as_str().unwrap_or_default().to_owned();
        self.publish(Event {
            kind: EventKind::Alert,
            asset_id,
            codes: vec![code.clone()],
            about: code,
            json: json.to_string(),
        });
    }

    /// Answers the wait for the decision on the event's command, if any, and publishes it.
    fn command_event(&self, asset_id: String, value: &[u8]) {
        let Ok(json) = crate::codec::command_event_json(value) else {
            return;
        };
        let command_id = json["command_id"].as_str().unwrap_or_default().to_owned();
        let waiting = self
            .decisions
            .lock()
            .expect("decisions lock")
            .remove(&command_id);
        if let Some(answer) = waiting {
            let _ = answer.send(json.clone());
        }
        if self.live() {
            self.publish(Event {
                kind: EventKind::Command,
                asset_id,
                codes: Vec::new(),
                about: command_id,
                json: json.to_string(),
            });
        }
    }
}

/// The key of a wait for a deletion among the waits for commands' decisions: no command id
/// starts with a NUL byte.
fn deletion(asset_id: &str) -> String {
    format!("\0deleted:{asset_id}")
}

fn merge(into: &mut Counts, from: &Counts, sign: i64) {
    into.twins = into.twins.saturating_add_signed(sign * from.twins as i64);
    for (s, n) in &from.by_status {
        let e = into.by_status.entry(s).or_default();
        *e = e.saturating_add_signed(sign * *n as i64);
    }
    for (c, n) in &from.by_alert {
        let e = into.by_alert.entry(c.clone()).or_default();
        *e = e.saturating_add_signed(sign * *n as i64);
    }
    into.by_alert.retain(|_, n| *n > 0);
    for s in Status::ALL {
        into.by_status.entry(s.symbol()).or_default();
    }
}
