//! `twinflow backtest`: replays a time window of the telemetry topic through the live model
//! and a candidate model, side by side, with a consumer of its own (no group, no commits)
//! and no writes, and says per rule how often each would have raised and cleared, how long
//! its alerts were active, how often they flapped, and which assets' alerts differ.
//!
//! Each reading is decoded once and stepped through both models by the step production
//! runs ([`crate::step`]), at its record's timestamp (its arrival, as processing time).
//! Timers fire on each partition's own clock, at their deadlines, as records of that
//! partition pass them; at the end every partition's clock moves to the window's end. Twins
//! start empty at the window's start: an alert raised before it shows as raised by the
//! first reading that still breaches.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use crate::codec::rfc3339;
use crate::error::{Error, Result};
use crate::kafka::OutputReader;
use crate::registry::{Registry, decode_fetching};
use crate::rules::{AlertEvent, AlertState};
use crate::step::{Core, Timed};
use crate::topology::Topology;
use crate::twin::{Effects, Reading, Twin};

/// Readings handed to the candidate's thread at a time.
const BATCH: usize = 1024;

/// A decoded reading with its partition and processing time.
type Stepped = (i32, i64, Reading);

/// A raise this soon after a clear of the same rule and asset is a flap.
pub const DEFAULT_FLAP_WITHIN: i64 = 10 * 60_000;

/// What to replay.
pub struct Backtest<'a> {
    /// The live topology: topics and the model running now.
    pub live: &'a Topology,
    /// The candidate model (same telemetry schema).
    pub candidate: &'a Topology,
    /// Kafka clients.
    pub clients: &'a crate::kafka::Clients,
    /// The registry, for Confluent-framed telemetry.
    pub registry: Option<&'a Registry>,
    /// Records whose timestamp is at or after this (epoch ms)...
    pub from: i64,
    /// ...and before this.
    pub to: i64,
    /// A raise within this of a clear is a flap (ms).
    pub flap_within: i64,
    /// Called now and then with (records read, records in the window).
    pub progress: &'a mut dyn FnMut(u64, u64),
}

/// One rule's figures under one model.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct RuleFigures {
    /// RAISED events.
    pub raises: u64,
    /// CLEARED events.
    pub clears: u64,
    /// Total time its alerts were raised (processing time), within the window, seconds.
    pub active_seconds: f64,
    /// Raises within the flap span of a clear of the same asset.
    pub flaps: u64,
    /// Assets it raised on.
    pub assets: u64,
}

/// What one model did with the window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ModelFigures {
    /// Per rule code, in the model's rule order.
    pub rules: Vec<(String, RuleFigures)>,
    /// Readings applied (twin changes by readings).
    pub applied: u64,
    /// Readings refused (late, future, invalid ...), by reason.
    pub refused: std::collections::BTreeMap<String, u64>,
    /// Timers that fired.
    pub timers: u64,
}

/// What a backtest found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Telemetry records read in the window.
    pub readings: u64,
    /// Records that did not decode.
    pub undecodable: u64,
    /// The live model's figures.
    pub live: ModelFigures,
    /// The candidate's.
    pub candidate: ModelFigures,
    /// Assets whose alert events differ between the models, in id order.
    pub differing_assets: Vec<String>,
    /// Assets with alert events under either model.
    pub assets: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// One model's replay state.
struct Side<'a> {
    core: Core<'a>,
    twins: HashMap<Box<str>, Twin, foldhash::fast::RandomState>,
    /// Per partition (by number): (deadline, asset id) of the twins that have one.
    timers: Vec<BTreeSet<(i64, Box<str>)>>,
    /// Per rule: figures; per (rule, asset): raised at (processing time), last clear.
    figures: Vec<RuleFigures>,
    open: HashMap<(usize, Box<str>), i64, foldhash::fast::RandomState>,
    cleared: HashMap<(usize, Box<str>), i64, foldhash::fast::RandomState>,
    raised_on: HashMap<usize, BTreeSet<Box<str>>>,
    /// Per asset: a hash of its alert events (code, state, event time), to compare models.
    trail: HashMap<Box<str>, u64, foldhash::fast::RandomState>,
    applied: u64,
    refused: std::collections::BTreeMap<String, u64>,
    timers_fired: u64,
    fx: Effects,
    alerts: Vec<AlertEvent>,
}

impl<'a> Side<'a> {
    fn new(topology: &'a Topology) -> Side<'a> {
        Side {
            core: topology.core(),
            twins: HashMap::default(),
            timers: Vec::new(),
            figures: vec![RuleFigures::default(); topology.rules.rules.len()],
            open: HashMap::default(),
            cleared: HashMap::default(),
            raised_on: HashMap::new(),
            trail: HashMap::default(),
            applied: 0,
            refused: Default::default(),
            timers_fired: 0,
            fx: Effects::default(),
            alerts: Vec::new(),
        }
    }

    /// Fires the timers of `partition` due by `now`, each at its deadline.
    fn fire(&mut self, partition: i32, now: i64, flap_within: i64) {
        let core = self.core;
        loop {
            let Some(timers) = self.timers.get_mut(partition as usize) else {
                return;
            };
            let Some((deadline, id)) = timers
                .first()
                .filter(|t| t.0 <= now)
                .is_some()
                .then(|| timers.pop_first())
                .flatten()
            else {
                return;
            };
            let Some(twin) = self.twins.get_mut(&id) else {
                continue;
            };
            match core.model.deadline(twin) {
                Some(actual) if actual > deadline => {
                    // It moved later since it was filed.
                    timers.insert((actual, id));
                    continue;
                }
                None => continue,
                Some(_) => {}
            }
            match core.timer(twin, deadline, &mut self.fx, &mut self.alerts) {
                Timed::Unchanged => continue,
                Timed::Fired => {
                    self.timers_fired += 1;
                    if let Some(next) = core.model.deadline(twin) {
                        self.file(partition, next, &id);
                    }
                }
                Timed::Retire => {
                    self.timers_fired += 1;
                    let mut twin = self.twins.remove(&id).expect("looked up above");
                    let version = twin.version + 1;
                    self.alerts.clear();
                    (core.rules).clear_deleted(&mut twin, deadline, version, &mut self.alerts);
                }
            }
            self.count(&id, deadline, flap_within);
        }
    }

    /// Files a timer of the twin of `id` at `deadline`.
    fn file(&mut self, partition: i32, deadline: i64, id: &str) {
        let at = partition as usize;
        if self.timers.len() <= at {
            self.timers.resize_with(at + 1, BTreeSet::new);
        }
        self.timers[at].insert((deadline, id.into()));
    }

    /// Steps `reading` (of partition `partition`) at processing time `now`.
    fn reading(&mut self, partition: i32, reading: &Reading, now: i64, flap_within: i64) {
        self.fire(partition, now, flap_within);
        let id = reading.asset_id.as_str();
        if self.core.model.validate(reading).is_err() {
            *self.refused.entry("invalid".into()).or_default() += 1;
            return;
        }
        if !self.twins.contains_key(id) {
            self.twins.insert(id.into(), Twin::new(id, self.core.model));
        }
        let twin = self.twins.get_mut(id).expect("inserted above");
        let before = self.core.model.deadline(twin);
        let applied = (self.core).reading(twin, reading, now, &mut self.fx, &mut self.alerts);
        let after = self.core.model.deadline(twin);
        let version = twin.version;
        match applied {
            Err((reason, _)) => *self.refused.entry(reason.label().into()).or_default() += 1,
            Ok(applied) => self.applied += u64::from(applied.merged),
        }
        if version == 0 {
            self.twins.remove(id); // refused before it ever changed: no twin
            return;
        }
        if let Some(after) = after.filter(|a| before.is_none_or(|b| *a < b)) {
            self.file(partition, after, id);
        }
        self.count(id, now, flap_within);
    }

    /// Counts the alert events of the last step of `id` at processing time `now`.
    fn count(&mut self, id: &str, now: i64, flap_within: i64) {
        for event in &self.alerts {
            let key = (event.rule, Box::<str>::from(id));
            let figures = &mut self.figures[event.rule];
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&self.trail.get(id).copied().unwrap_or(0).to_le_bytes());
            h.update(self.core.rules.rules[event.rule].code.as_bytes());
            h.update(&[event.state as u8]);
            h.update(&event.raised_at.to_le_bytes());
            self.trail.insert(id.into(), h.digest());
            match event.state {
                AlertState::Raised => {
                    figures.raises += 1;
                    if self
                        .cleared
                        .get(&key)
                        .is_some_and(|c| now - c <= flap_within)
                    {
                        figures.flaps += 1;
                    }
                    (self.raised_on.entry(event.rule).or_default()).insert(id.into());
                    self.open.insert(key, now);
                }
                AlertState::Cleared => {
                    figures.clears += 1;
                    if let Some(at) = self.open.remove(&key) {
                        figures.active_seconds += (now - at).max(0) as f64 / 1000.0;
                    }
                    self.cleared.insert(key, now);
                }
                AlertState::Acknowledged => {}
            }
        }
    }

    /// Ends the window at `to`: fires what is due, and counts the alerts still raised as
    /// active until then.
    fn finish(
        mut self,
        to: i64,
        flap_within: i64,
    ) -> (
        ModelFigures,
        HashMap<Box<str>, u64, foldhash::fast::RandomState>,
    ) {
        for p in 0..self.timers.len() {
            self.fire(p as i32, to, flap_within);
        }
        for ((rule, _), at) in &self.open {
            self.figures[*rule].active_seconds += (to - at).max(0) as f64 / 1000.0;
        }
        for (rule, assets) in &self.raised_on {
            self.figures[*rule].assets = assets.len() as u64;
        }
        let rules = (self.core.rules.rules.iter())
            .map(|r| r.code.clone())
            .zip(self.figures)
            .collect();
        let figures = ModelFigures {
            rules,
            applied: self.applied,
            refused: self.refused,
            timers: self.timers_fired,
        };
        (figures, self.trail)
    }
}

/// Runs the backtest; see the module documentation. Blocking: run it off the async runtime
/// (`runtime` serves the registry's fetches).
///
/// # Errors
/// `Config` when the window is empty or the candidate reads another telemetry schema;
/// Kafka errors.
pub fn backtest(b: &mut Backtest<'_>, runtime: &tokio::runtime::Handle) -> Result<Report> {
    if b.from >= b.to {
        return Err(Error::Config(format!(
            "--from {} must be before --to {}",
            rfc3339(b.from),
            rfc3339(b.to)
        )));
    }
    if b.live.codec.schema_texts().0 != b.candidate.codec.schema_texts().0 {
        return Err(Error::Config(
            "the candidate model must read the live model's telemetry schema".into(),
        ));
    }
    let started = Instant::now();
    let topics = &b.live.topics;
    let topic = topics.telemetry.name.as_str();
    let format = topics.telemetry_format();
    let mut config = b.clients.reader("twinflow-backtest", true);
    config.set("isolation.level", "read_committed");
    crate::kafka::window_reader(&mut config);
    let reader = OutputReader::new(&config)?;
    let window = reader.window(topic, topics.telemetry.partitions, b.from, b.to)?;
    let total: i64 = window.iter().map(|(_, a, z)| z - a).sum();
    let mut ends = reader.read_window(topic, &window)?;
    let mut report = Report::default();
    let flap_within = b.flap_within;
    // Each model steps on a thread of its own, fed batches of the readings this thread
    // polled and decoded (once): the two replays share no state.
    let (live, candidate) = std::thread::scope(|scope| -> Result<_> {
        let mut feeds = Vec::new();
        let mut replays = Vec::new();
        for model in [b.live, b.candidate] {
            let (feed, received) = std::sync::mpsc::sync_channel::<Arc<Vec<Stepped>>>(8);
            let to = b.to;
            replays.push(scope.spawn(move || {
                let mut side = Side::new(model);
                for batch in received {
                    for (partition, now, reading) in batch.iter() {
                        side.reading(*partition, reading, *now, flap_within);
                    }
                }
                side.finish(to, flap_within)
            }));
            feeds.push(feed);
        }
        let mut batch = Vec::with_capacity(BATCH);
        let mut reading = Reading::default();
        let mut read = 0u64;
        while let Some(m) = reader.next_in(&mut ends)? {
            let partition = m.partition();
            read += 1;
            if read % 8192 == 0 {
                (b.progress)(read, total as u64);
            }
            let now = m.timestamp().unwrap_or(i64::MIN);
            if now < b.from || now >= b.to {
                continue;
            }
            report.readings += 1;
            let Some(value) = m.value() else {
                report.undecodable += 1;
                continue;
            };
            let codec = &b.live.codec;
            let decoded = decode_fetching(b.registry, codec, runtime, |c| {
                c.decode_reading(format, value, &mut reading)
            });
            if decoded.is_err() || m.key() != Some(reading.asset_id.as_bytes()) {
                report.undecodable += 1;
                continue;
            }
            batch.push((partition, now, reading.clone()));
            if batch.len() == BATCH {
                let full = Arc::new(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
                // Sending fails only when a replay's thread ended: it panicked.
                if feeds.iter().any(|f| f.send(full.clone()).is_err()) {
                    break;
                }
            }
        }
        let last = Arc::new(batch);
        for feed in feeds {
            let _ = feed.send(last.clone());
        }
        reader.close_in_background();
        (b.progress)(read, total as u64);
        let mut done = (replays.into_iter()).map(|r| r.join().expect("a replay does not panic"));
        let live = done.next().expect("two replays");
        let candidate = done.next().expect("two replays");
        Ok((live, candidate))
    })?;
    let ((live, live_trail), (candidate, candidate_trail)) = (live, candidate);
    let mut assets: BTreeSet<&str> = live_trail.keys().map(|k| &**k).collect();
    assets.extend(candidate_trail.keys().map(|k| &**k));
    report.differing_assets = (assets.iter())
        .filter(|a| live_trail.get(**a) != candidate_trail.get(**a))
        .map(|a| a.to_string())
        .collect();
    report.assets = assets.len() as u64;
    report.live = live;
    report.candidate = candidate;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

impl Report {
    /// The report as text: a table of the rules of either model, then the assets whose
    /// alerts differ (the first 20).
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} readings in {:.1} s ({:.0}/s), {} undecodable; {} assets with alerts",
            self.readings,
            self.seconds,
            self.readings as f64 / self.seconds.max(1e-9),
            self.undecodable,
            self.assets
        );
        let _ = writeln!(
            out,
            "| rule | raises live | raises candidate | clears live | clears candidate | active h live | active h candidate | flaps live | flaps candidate | assets live | assets candidate |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let mut codes: Vec<&str> = self.live.rules.iter().map(|(c, _)| c.as_str()).collect();
        for (c, _) in &self.candidate.rules {
            if !codes.contains(&c.as_str()) {
                codes.push(c);
            }
        }
        let find = |m: &ModelFigures, code: &str| {
            m.rules
                .iter()
                .find(|(c, _)| c == code)
                .map(|(_, f)| f.clone())
        };
        for code in codes {
            let (l, c) = (find(&self.live, code), find(&self.candidate, code));
            let cell = |f: &Option<RuleFigures>, v: &dyn Fn(&RuleFigures) -> String| {
                f.as_ref().map_or_else(|| "-".to_owned(), v)
            };
            let raises = |f: &RuleFigures| f.raises.to_string();
            let clears = |f: &RuleFigures| f.clears.to_string();
            let hours = |f: &RuleFigures| format!("{:.1}", f.active_seconds / 3600.0);
            let flaps = |f: &RuleFigures| f.flaps.to_string();
            let assets = |f: &RuleFigures| f.assets.to_string();
            let _ = writeln!(
                out,
                "| {code} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(&l, &raises),
                cell(&c, &raises),
                cell(&l, &clears),
                cell(&c, &clears),
                cell(&l, &hours),
                cell(&c, &hours),
                cell(&l, &flaps),
                cell(&c, &flaps),
                cell(&l, &assets),
                cell(&c, &assets),
            );
        }
        let refused = |m: &ModelFigures| {
            (m.refused.iter())
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "readings applied: live {}, candidate {}; refused: live [{}], candidate [{}]; timers fired: live {}, candidate {}",
            self.live.applied,
            self.candidate.applied,
            refused(&self.live),
            refused(&self.candidate),
            self.live.timers,
            self.candidate.timers
        );
        let shown: Vec<&str> = self
            .differing_assets
            .iter()
            .take(20)
            .map(String::as_str)
            .collect();
        let _ = writeln!(
            out,
            "{} assets whose alerts differ{}{}",
            self.differing_assets.len(),
            if shown.is_empty() { "" } else { ": " },
            shown.join(", ")
        );
        out
    }
}
