//! The fleet simulator: seeded, reproducible telemetry of any model, for the demo, tests and
//! benchmarks.
//!
//! A model with the vehicle properties (`lat`, `lng`, `speed_kmh`, `temperature_c`,
//! `battery_pct`) gets vehicles: they drive between waypoints around a few cities, stop,
//! speed now and then, drain their batteries and recharge; reefer trucks carry a cold-chain
//! temperature that sometimes breaches and recovers. Any other model gets machines
//! ([`Machine`]): each numeric property wanders in a normal band derived from the model's
//! ranges and rules, and now and then goes past one of its rules' thresholds for longer than
//! the rule's minimum duration, then recovers past its clear threshold; the status property
//! alternates between active and still, booleans follow it, strings are a per-asset
//! constant, and a model with `lat` and `lng` gets a wandering location.
//!
//! For both, some devices fall silent for a while; some device clocks run ahead or behind
//! (a few far ahead, broken); about 0.5 % of readings arrive late (held back up to five
//! rounds, so out of order) and 0.5 % arrive twice; a configurable fraction of records is
//! malformed in one of several ways. The same seed and start time give the same records,
//! byte for byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Message as _};

use super::sink::Sink;
use crate::codec::Codec;
use crate::rules::{Op, RuleKind};
use crate::topology::Topology;
use crate::twin::{Model, PropKind, Reading, Value};

/// City centres the routes are drawn around (lat, lng).
const CITIES: [(f64, f64); 5] = [
    (52.37, 4.90),
    (51.92, 4.48),
    (50.85, 4.35),
    (51.22, 6.78),
    (48.86, 2.35),
];

/// What a generated record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A valid reading.
    Reading,
    /// Random bytes.
    Garbage,
    /// A valid datum cut short.
    Truncated,
    /// A reading with a value out of its valid range (or, in a model without ranges, an
    /// asset id too long).
    OutOfRange,
    /// A reading whose key is not its asset id.
    WrongKey,
    /// A valid reading delivered late, after newer ones of its vehicle.
    Late,
    /// A valid reading sent a second time.
    Duplicate,
}

impl Kind {
    /// Whether the record is malformed (dead-lettered by the pipeline).
    pub fn is_malformed(self) -> bool {
        !matches!(self, Kind::Reading | Kind::Late | Kind::Duplicate)
    }
}

/// How to simulate.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Number of vehicles.
    pub assets: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Fraction of malformed records, 0..1.
    pub malformed: f64,
    /// Event time of the first round, epoch ms.
    pub start_ms: i64,
    /// Simulated time between two readings of one vehicle, ms.
    pub interval_ms: i64,
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Driving,
    Stopped,
    Charging,
}

struct Vehicle {
    id: String,
    lat: f64,
    lng: f64,
    route: Vec<(f64, f64)>,
    leg: usize,
    speed: f64,
    cruise: f64,
    phase: Phase,
    phase_left: u32,
    speeding_left: u32,
    speeder: bool,
    temp: Option<f64>,
    excursion_left: u32,
    battery: f64,
    recharge_below: f64,
    silent_left: u32,
    ticks: u64,
    /// How far the device clock is off, ms.
    skew_ms: i64,
    /// The cargo temperature the reefer unit holds (a command sets it).
    setpoint: f64,
}

/// Indices of the vehicle model's properties.
struct Props {
    lat: usize,
    lng: usize,
    speed: usize,
    temp: usize,
    battery: usize,
}

/// The assets of a fleet and how they move.
enum Assets {
    /// The vehicle model's trucks.
    Vehicles(Vec<Vehicle>, Props),
    /// Any other model's machines, moved by the same signals.
    Machines(Vec<Machine>, Signals),
}

impl Assets {
    fn len(&self) -> usize {
        match self {
            Assets::Vehicles(v, _) => v.len(),
            Assets::Machines(m, _) => m.len(),
        }
    }

    fn id(&self, index: usize) -> &str {
        match self {
            Assets::Vehicles(v, _) => &v[index].id,
            Assets::Machines(m, _) => &m[index].id,
        }
    }
}

/// A seeded fleet producing one record per call.
pub struct Fleet {
    config: FleetConfig,
    rng: ChaCha8Rng,
    assets: Assets,
    codec: Codec,
    next: usize,
    round: i64,
    reading: Reading,
    /// Readings held back to arrive late: `(round to release in, key, value)`.
    held: Vec<(i64, Vec<u8>, Vec<u8>)>,
    /// A reading to send again.
    again: Option<(Vec<u8>, Vec<u8>)>,
}

impl Fleet {
    /// A fleet for the model of `topology`: vehicles if it has the vehicle properties,
    /// machines otherwise.
    ///
    /// # Errors
    /// When the configuration is out of range.
    pub fn new(config: FleetConfig, topology: &Topology) -> Result<Fleet> {
        if config.assets == 0 || !(0.0..=1.0).contains(&config.malformed) || config.interval_ms <= 0
        {
            bail!(
                "the simulator needs at least one asset, a malformed fraction in 0..1 and a positive interval"
            );
        }
        let model = &topology.model;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let assets = match Props::of(model) {
            Some(props) => Assets::Vehicles(vehicles(&config, &mut rng), props),
            None => {
                let signals = Signals::of(topology, config.interval_ms);
                let prefix = asset_prefix(topology);
                let machines = (0..config.assets)
                    .map(|i| signals.machine(format!("{prefix}-{i:05}"), &mut rng))
                    .collect();
                Assets::Machines(machines, signals)
            }
        };
        Ok(Fleet {
            config,
            rng,
            assets,
            codec: topology.codec.clone(),
            next: 0,
            round: 0,
            reading: Reading::default(),
            held: Vec::new(),
            again: None,
        })
    }

    /// The id of asset `index` (of `0..assets`).
    pub fn asset_id(&self, index: usize) -> &str {
        self.assets.id(index % self.assets.len())
    }

    /// Hands a command's values (property index, value) to the device of `asset_id`, which
    /// moves toward them from its next reading on at its own pace: a reefer unit toward a
    /// cargo temperature, a machine's signal toward a new resting value. About 2 % of the
    /// devices ignore commands; a truck without a reefer unit refuses a temperature.
    /// `None` for an asset the fleet does not have.
    pub fn command(&mut self, asset_id: &str, values: &[(usize, Value)]) -> Option<Obeyed> {
        let index: usize = asset_id.rsplit('-').next()?.parse().ok()?;
        if index >= self.assets.len() || self.assets.id(index) != asset_id {
            return None;
        }
        if index % 50 == 17 {
            return Some(Obeyed::Ignored);
        }
        match &mut self.assets {
            Assets::Vehicles(vehicles, props) => {
                let v = &mut vehicles[index];
                for (p, value) in values {
                    match (*p == props.temp, v.temp, value.as_f64()) {
                        (true, Some(_), Some(t)) => v.setpoint = t,
                        (true, None, _) => return Some(Obeyed::Rejected("no reefer unit")),
                        _ => return Some(Obeyed::Rejected("not settable on this device")),
                    }
                }
            }
            Assets::Machines(machines, signals) => {
                let m = &mut machines[index];
                for (p, value) in values {
                    let Some(s) = signals.list.iter().position(|(q, _)| q == p) else {
                        return Some(Obeyed::Rejected("not settable on this device"));
                    };
                    match (&signals.list[s].1, value) {
                        (Shape::Number { valid, .. }, v) if v.as_f64().is_some() => {
                            m.rest[s] = v.as_f64().unwrap_or_default().clamp(valid.0, valid.1);
                        }
                        (Shape::Flag, Value::Bool(on)) => {
                            m.active = *on;
                            m.phase_left = 400;
                        }
                        _ => return Some(Obeyed::Rejected("not settable on this device")),
                    }
                }
            }
        }
        Some(Obeyed::Accepted)
    }

    /// The next `n` records as owned `(key, value)` pairs, for tests and benchmarks.
    pub fn take(&mut self, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        (0..n)
            .map(|_| {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                self.next_record(&mut k, &mut v);
                (k, v)
            })
            .collect()
    }

    /// Writes the next record's key and value into the buffers (cleared first).
    pub fn next_record(&mut self, key: &mut Vec<u8>, value: &mut Vec<u8>) -> Kind {
        key.clear();
        value.clear();
        if let Some((k, v)) = self.again.take() {
            key.extend_from_slice(&k);
            value.extend_from_slice(&v);
            return Kind::Duplicate;
        }
        if let Some(at) = self.held.iter().position(|(r, _, _)| *r <= self.round) {
            let (_, k, v) = self.held.swap_remove(at);
            key.extend_from_slice(&k);
            value.extend_from_slice(&v);
            return Kind::Late;
        }
        loop {
            let i = self.next;
            self.next = (self.next + 1) % self.assets.len();
            if self.next == 0 {
                self.round += 1;
            }
            let jitter = (i as i64 * 7919) % self.config.interval_ms;
            let event_time = self.config.start_ms + self.round * self.config.interval_ms + jitter;
            let dt_h = self.config.interval_ms as f64 / 3_600_000.0;
            let alive = match &mut self.assets {
                Assets::Vehicles(v, _) => step(&mut v[i], &mut self.rng, dt_h),
                Assets::Machines(m, signals) => signals.step(&mut m[i], &mut self.rng),
            };
            if !alive {
                continue; // silent this round
            }
            let r = &mut self.reading;
            r.clear();
            let skew_ms = match &self.assets {
                Assets::Vehicles(v, props) => {
                    props.fill(&v[i], r);
                    v[i].skew_ms
                }
                Assets::Machines(m, signals) => {
                    signals.fill(&m[i], r);
                    m[i].skew_ms
                }
            };
            r.asset_id.push_str(self.assets.id(i));
            r.event_time = event_time + skew_ms;
            key.extend_from_slice(r.asset_id.as_bytes());

            let kind = if self.rng.gen_bool(self.config.malformed) {
                match self.rng.gen_range(0..4) {
                    0 => Kind::Garbage,
                    1 => Kind::Truncated,
                    2 => Kind::OutOfRange,
                    _ => Kind::WrongKey,
                }
            } else {
                Kind::Reading
            };
            match kind {
                Kind::Garbage => {
                    let n = self.rng.gen_range(1..40);
                    value.extend((0..n).map(|_| self.rng.r#gen::<u8>()));
                }
                Kind::OutOfRange => {
                    match &self.assets {
                        Assets::Vehicles(_, props) => {
                            for (p, val) in &mut r.values {
                                if *p == props.lat {
                                    *val = Value::Double(123.4);
                                }
                            }
                        }
                        Assets::Machines(_, signals) => signals.out_of_range(r),
                    }
                    self.codec.encode_reading(r, value);
                }
                _ => self.codec.encode_reading(r, value),
            }
            if kind == Kind::Truncated {
                value.truncate(value.len() / 2);
            }
            if kind == Kind::WrongKey {
                key.clear();
                key.extend_from_slice(b"unknown-device");
            }
            if kind == Kind::Reading {
                match self.rng.gen_range(0..1000) {
                    0..5 => {
                        let release = self.round + self.rng.gen_range(1..=5);
                        self.held.push((release, key.clone(), value.clone()));
                        key.clear();
                        value.clear();
                        continue; // it arrives later
                    }
                    5..10 => self.again = Some((key.clone(), value.clone())),
                    _ => {}
                }
            }
            return kind;
        }
    }
}

impl Props {
    /// The vehicle properties' indices, when the model has all of them.
    fn of(model: &Model) -> Option<Props> {
        Some(Props {
            lat: model.property("lat")?,
            lng: model.property("lng")?,
            speed: model.property("speed_kmh")?,
            temp: model.property("temperature_c")?,
            battery: model.property("battery_pct")?,
        })
    }

    /// The reading of a vehicle: where it is, how fast, its cargo temperature (reefers),
    /// and its battery every fifth reading (every reading while charging).
    fn fill(&self, v: &Vehicle, r: &mut Reading) {
        r.values.push((self.lat, Value::Double(round(v.lat, 6))));
        r.values.push((self.lng, Value::Double(round(v.lng, 6))));
        r.values
            .push((self.speed, Value::Double(round(v.speed, 1))));
        if let Some(t) = v.temp {
            r.values.push((self.temp, Value::Double(round(t, 2))));
        }
        if v.ticks.is_multiple_of(5) || v.phase == Phase::Charging {
            r.values
                .push((self.battery, Value::Double(round(v.battery, 1))));
        }
        r.values.sort_by_key(|(p, _)| *p);
    }
}

/// The vehicles of a fleet, drawn from `rng`.
fn vehicles(config: &FleetConfig, rng: &mut ChaCha8Rng) -> Vec<Vehicle> {
    (0..config.assets)
        .map(|i| {
            let reefer = rng.gen_bool(0.4);
            let (clat, clng) = CITIES[rng.gen_range(0..CITIES.len())];
            let route: Vec<_> = (0..rng.gen_range(4..7))
                .map(|_| {
                    (
                        clat + rng.gen_range(-0.3..0.3),
                        clng + rng.gen_range(-0.45..0.45),
                    )
                })
                .collect();
            Vehicle {
                id: format!("{}-{i:05}", if reefer { "reefer" } else { "truck" }),
                lat: route[0].0,
                lng: route[0].1,
                leg: 1,
                route,
                speed: 0.0,
                cruise: rng.gen_range(55.0..100.0),
                phase: Phase::Driving,
                phase_left: 0,
                speeding_left: 0,
                speeder: rng.gen_bool(0.15),
                temp: reefer.then(|| rng.gen_range(2.0..5.0)),
                excursion_left: 0,
                battery: rng.gen_range(10.0..100.0),
                recharge_below: rng.gen_range(8.0..22.0),
                silent_left: 0,
                ticks: 0,
                skew_ms: clock_skew(rng),
                setpoint: 3.5,
            }
        })
        .collect()
}

/// How far a device clock is off, ms: most are right, some a little off, a few broken.
fn clock_skew(rng: &mut ChaCha8Rng) -> i64 {
    match rng.gen_range(0..1000) {
        0..2 => 86_400_000, // a broken clock, a day ahead
        2..50 => rng.gen_range(-120_000..120_000),
        _ => 0,
    }
}

/// The prefix of machine ids: the twin schema's file name without `_twin`
/// (`pump_twin.avsc` gives `pump-00000`, `pump-00001`, ...).
fn asset_prefix(topology: &Topology) -> String {
    let stem = topology
        .twin_schema
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = stem.trim_end_matches("_twin").trim_end_matches("-twin");
    if prefix.is_empty() {
        "asset".to_owned()
    } else {
        prefix.to_owned()
    }
}

/// One machine of a model that is not the vehicle model.
pub struct Machine {
    id: String,
    /// Each signal's current value (numbers), in the order of [`Signals::list`].
    values: Vec<f64>,
    /// Each number's resting value: somewhere in its normal band, per machine.
    rest: Vec<f64>,
    /// The signal being driven past a rule's threshold, its target and readings left.
    excursion: Option<(usize, f64, u32)>,
    /// Whether it is active (status property above its threshold) and for how many more
    /// readings it stays so.
    active: bool,
    phase_left: u32,
    /// Location, when the model has one.
    at: Option<(f64, f64)>,
    /// The suffix of its string values.
    variant: u32,
    silent_left: u32,
    ticks: u64,
    skew_ms: i64,
}

/// How a property of a machine moves.
enum Shape {
    /// A number resting in `band`, kept within `valid`; `breaches` are the values past
    /// each rule's threshold it heads for in an excursion, with the readings the excursion
    /// lasts. `still`: the status property's value while the machine stands still.
    Number {
        band: (f64, f64),
        valid: (f64, f64),
        breaches: Vec<(f64, u32)>,
        still: Option<f64>,
        whole: bool,
    },
    /// True while the machine is active.
    Flag,
    /// A constant per machine: `<property>-<variant>`.
    Text,
}

/// The properties of a model as a machine's signals.
pub struct Signals {
    list: Vec<(usize, Shape)>,
    location: Option<(usize, usize)>,
}

impl Signals {
    /// The signals of `topology`'s model: each numeric property rests in a band below
    /// the thresholds of its `>` rules and above those of its `<` rules (their clear
    /// thresholds, where set), within its valid range; an excursion heads a quarter of the
    /// band past a threshold and lasts longer than the rule's minimum duration at
    /// `interval_ms` per reading.
    fn of(topology: &Topology, interval_ms: i64) -> Signals {
        let model = &topology.model;
        let location = model.location();
        let list = model
            .properties
            .iter()
            .enumerate()
            .filter(|(i, _)| location.is_none_or(|(lat, lng)| *i != lat && *i != lng))
            .map(|(i, def)| {
                let shape = match def.kind {
                    PropKind::Bool => Shape::Flag,
                    PropKind::Str => Shape::Text,
                    _ => {
                        let rules: Vec<_> = topology
                            .rules
                            .rules
                            .iter()
                            .filter(|r| r.kind == RuleKind::Threshold && r.property == i)
                            .collect();
                        let upper = rules
                            .iter()
                            .filter(|r| matches!(r.op, Op::Gt | Op::Ge))
                            .map(|r| r.clear_threshold.unwrap_or(r.threshold).min(r.threshold))
                            .reduce(f64::min);
                        let lower = rules
                            .iter()
                            .filter(|r| matches!(r.op, Op::Lt | Op::Le))
                            .map(|r| r.clear_threshold.unwrap_or(r.threshold).max(r.threshold))
                            .reduce(f64::max);
                        let (min, max) = match def.kind {
                            PropKind::Int => (f64::from(i32::MIN), f64::from(i32::MAX)),
                            _ => (f64::MIN, f64::MAX),
                        };
                        let valid = (def.min.unwrap_or(min), def.max.unwrap_or(max));
                        let (low, high) = match (lower, upper) {
                            (Some(l), Some(u)) if l < u => (l, u),
                            (Some(l), _) => (l, def.max.unwrap_or(l + l.abs().max(10.0))),
                            (None, Some(u)) => (def.min.unwrap_or(u - u.abs().max(10.0)), u),
                            (None, None) => {
                                let low = def.min.unwrap_or(0.0);
                                (low, def.max.unwrap_or(low + 100.0))
                            }
                        };
                        let width = high - low;
                        let band = (low + 0.2 * width, low + 0.8 * width);
                        let breaches = rules
                            .iter()
                            .filter_map(|r| {
                                let past = match r.op {
                                    Op::Gt | Op::Ge => r.threshold + 0.25 * width,
                                    Op::Lt | Op::Le => r.threshold - 0.25 * width,
                                };
                                let readings = r.min_duration.unwrap_or(0) / interval_ms + 10;
                                let within = valid.0 <= past && past <= valid.1;
                                within.then_some((past, readings.min(100_000) as u32))
                            })
                            .collect();
                        let still = model
                            .active_when
                            .filter(|a| a.property == i)
                            .map(|a| if a.above > 0.0 { 0.0 } else { a.above - 1.0 }.max(valid.0));
                        let band = match model.active_when.filter(|a| a.property == i) {
                            // Active means above the status threshold.
                            Some(a) if band.0 <= a.above => {
                                let low = a.above + 0.2 * (high - a.above).max(1.0);
                                (low, low.max(band.1))
                            }
                            _ => band,
                        };
                        let whole = matches!(def.kind, PropKind::Int | PropKind::Long);
                        Shape::Number {
                            band,
                            valid,
                            breaches,
                            still,
                            whole,
                        }
                    }
                };
                (i, shape)
            })
            .collect();
        Signals { list, location }
    }

    /// A new machine called `id`, drawn from `rng`.
    fn machine(&self, id: String, rng: &mut ChaCha8Rng) -> Machine {
        let rest: Vec<f64> = self
            .list
            .iter()
            .map(|(_, shape)| match shape {
                Shape::Number { band, .. } if band.0 < band.1 => rng.gen_range(band.0..band.1),
                Shape::Number { band, .. } => band.0,
                _ => 0.0,
            })
            .collect();
        let at = self.location.map(|_| {
            let (lat, lng) = CITIES[rng.gen_range(0..CITIES.len())];
            (
                lat + rng.gen_range(-0.3..0.3),
                lng + rng.gen_range(-0.45..0.45),
            )
        });
        Machine {
            id,
            values: rest.clone(),
            rest,
            excursion: None,
            active: true,
            phase_left: rng.gen_range(20..200),
            at,
            variant: rng.gen_range(1..4),
            silent_left: 0,
            ticks: 0,
            skew_ms: clock_skew(rng),
        }
    }

    /// Advances a machine by one reading; false if it is silent this time.
    fn step(&self, m: &mut Machine, rng: &mut ChaCha8Rng) -> bool {
        m.ticks += 1;
        if m.silent_left > 0 {
            m.silent_left -= 1;
            return false;
        }
        if rng.gen_bool(0.0005) {
            m.silent_left = rng.gen_range(30..300);
        }
        m.phase_left = m.phase_left.saturating_sub(1);
        if m.phase_left == 0 {
            m.active = !m.active;
            m.phase_left = if m.active {
                rng.gen_range(50..400)
            } else {
                rng.gen_range(5..40)
            };
        }
        match &mut m.excursion {
            Some((_, _, left)) if *left > 1 => *left -= 1,
            Some(_) => m.excursion = None,
            None if rng.gen_bool(0.003) => {
                let options: Vec<(usize, f64, u32)> = self
                    .list
                    .iter()
                    .enumerate()
                    .flat_map(|(s, (_, shape))| match shape {
                        Shape::Number { breaches, .. } => {
                            breaches.iter().map(|(to, n)| (s, *to, *n)).collect()
                        }
                        _ => Vec::new(),
                    })
                    .collect();
                if !options.is_empty() {
                    let (s, to, n) = options[rng.gen_range(0..options.len())];
                    m.excursion = Some((s, to, n + rng.gen_range(0..20)));
                }
            }
            None => {}
        }
        for (s, (_, shape)) in self.list.iter().enumerate() {
            let Shape::Number {
                band, valid, still, ..
            } = shape
            else {
                continue;
            };
            let target = match (m.excursion, still) {
                (Some((e, to, _)), _) if e == s => to,
                (_, Some(v)) if !m.active => *v,
                _ => m.rest[s],
            };
            let noise = 0.03 * (band.1 - band.0).abs().max(0.01);
            let v = m.values[s] + (target - m.values[s]) * 0.5 + rng.gen_range(-noise..noise);
            m.values[s] = v.clamp(valid.0, valid.1);
            if still.is_some() && !m.active && m.excursion.is_none_or(|(e, ..)| e != s) {
                m.values[s] = target; // standing still reads exactly still
            }
        }
        if let Some((lat, lng)) = &mut m.at
            && m.active
        {
            *lat = (*lat + rng.gen_range(-0.001..0.001)).clamp(-90.0, 90.0);
            *lng = (*lng + rng.gen_range(-0.001..0.001)).clamp(-180.0, 180.0);
        }
        true
    }

    /// The reading of a machine: every property, in model order.
    fn fill(&self, m: &Machine, r: &mut Reading) {
        if let (Some((lat, lng)), Some((at_lat, at_lng))) = (self.location, m.at) {
            r.values.push((lat, Value::Double(round(at_lat, 6))));
            r.values.push((lng, Value::Double(round(at_lng, 6))));
        }
        for (s, (p, shape)) in self.list.iter().enumerate() {
            let value = match shape {
                Shape::Number { whole: true, .. } => Value::Long(m.values[s].round() as i64),
                Shape::Number { .. } => Value::Double(round(m.values[s], 3)),
                Shape::Flag => Value::Bool(m.active),
                Shape::Text => Value::Str(format!("{}-{}", m.variant, m.ticks / 10_000).into()),
            };
            r.values.push((*p, value));
        }
        r.values.sort_by_key(|(p, _)| *p);
    }

    /// Makes a reading invalid: a value past its valid range, or without any range, an
    /// asset id longer than a model allows.
    fn out_of_range(&self, r: &mut Reading) {
        // Only a range the model sets (an int's own bounds cannot be passed in Avro).
        let past = self.list.iter().find_map(|(p, shape)| match shape {
            Shape::Number { valid, whole, .. } => {
                let v = if valid.1 < f64::from(i32::MAX) {
                    valid.1 + valid.1.abs().max(1.0)
                } else if valid.0 > f64::from(i32::MIN) {
                    valid.0 - valid.0.abs().max(1.0)
                } else {
                    return None;
                };
                Some((
                    *p,
                    if *whole {
                        Value::Long(v as i64)
                    } else {
                        Value::Double(v)
                    },
                ))
            }
            _ => None,
        });
        match past {
            Some((p, v)) => {
                for (q, val) in &mut r.values {
                    if *q == p {
                        *val = v.clone();
                    }
                }
            }
            None => r
                .asset_id
                .push_str(&"x".repeat(crate::twin::MAX_ASSET_ID_BYTES)),
        }
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Advances a vehicle by one interval; false if it is silent this round.
fn step(v: &mut Vehicle, rng: &mut ChaCha8Rng, dt_h: f64) -> bool {
    v.ticks += 1;
    if v.silent_left > 0 {
        v.silent_left -= 1;
        return false;
    }
    if rng.gen_bool(0.0005) {
        v.silent_left = rng.gen_range(30..300);
    }
    match v.phase {
        Phase::Driving => {
            if v.speeding_left > 0 {
                v.speeding_left -= 1;
            } else if v.speeder && rng.gen_bool(0.01) {
                v.speeding_left = rng.gen_range(5..20);
            }
            let target = if v.speeding_left > 0 {
                rng.gen_range(124.0..145.0)
            } else {
                v.cruise
            };
            v.speed =
                (v.speed + (target - v.speed) * 0.5 + rng.gen_range(-4.0..4.0)).clamp(5.0, 160.0);
            let (tlat, tlng) = v.route[v.leg];
            let km_per_deg_lng = 111.0 * v.lat.to_radians().cos();
            let (dy, dx) = ((tlat - v.lat) * 111.0, (tlng - v.lng) * km_per_deg_lng);
            let dist = (dx * dx + dy * dy).sqrt();
            let travel = v.speed * dt_h;
            if travel >= dist {
                v.lat = tlat;
                v.lng = tlng;
                v.leg = (v.leg + 1) % v.route.len();
                if rng.gen_bool(0.3) {
                    v.phase = Phase::Stopped;
                    v.phase_left = rng.gen_range(5..30);
                }
            } else {
                v.lat += dy / dist * travel / 111.0;
                v.lng += dx / dist * travel / km_per_deg_lng;
            }
            v.battery -= rng.gen_range(0.02..0.08);
            if v.battery < v.recharge_below {
                v.phase = Phase::Charging;
            }
        }
        Phase::Stopped => {
            v.speed = 0.0;
            v.battery -= 0.005;
            v.phase_left = v.phase_left.saturating_sub(1);
            if v.phase_left == 0 {
                v.phase = Phase::Driving;
            }
        }
        Phase::Charging => {
            v.speed = 0.0;
            v.battery += rng.gen_range(1.0..3.0);
            if v.battery >= 95.0 {
                v.battery = v.battery.min(100.0);
                v.recharge_below = rng.gen_range(8.0..22.0);
                v.phase = Phase::Driving;
            }
        }
    }
    v.battery = v.battery.clamp(0.0, 100.0);
    if let Some(t) = v.temp.as_mut() {
        if v.excursion_left > 0 {
            v.excursion_left -= 1;
        } else if rng.gen_bool(0.003) {
            v.excursion_left = rng.gen_range(10..40);
        }
        let target = if v.excursion_left > 0 {
            11.5
        } else {
            v.setpoint
        };
        *t += (target - *t) * 0.15 + rng.gen_range(-0.2..0.2);
    }
    true
}

/// What a simulated device did with a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Obeyed {
    /// It takes the values on.
    Accepted,
    /// It cannot, and says why.
    Rejected(&'static str),
    /// It does not answer (and does nothing).
    Ignored,
}

/// Counts of a simulator run.
#[derive(Debug, Default, Clone, Copy)]
pub struct SimStats {
    /// Records handed to the producer.
    pub sent: u64,
    /// Of those, malformed on purpose.
    pub malformed: u64,
    /// Records the broker did not acknowledge.
    pub failed: u64,
}

/// A producer context that counts records not delivered.
pub(super) struct Counting(pub(super) Arc<AtomicU64>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.0.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "Simulator record not delivered.");
        }
    }
}

/// Where and how fast to publish.
#[derive(Clone, Debug)]
pub struct Publish {
    /// Producer settings (servers, security).
    pub client: ClientConfig,
    /// Telemetry topic.
    pub topic: String,
    /// Records per second; 0 for as fast as possible.
    pub rate: u64,
    /// Records sent first as fast as possible (a backlog, as a gateway flushing its buffer
    /// sends it), before the rest is paced at `rate`.
    pub burst: u64,
    /// Stop after this many records.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// The devices obey the commands on this topic, acknowledging on the other.
    pub obey: Option<Obey>,
    /// The door the devices send their readings through.
    pub via: super::sink::Via,
}

/// Where simulated devices read their commands and send their acknowledgements.
#[derive(Clone, Debug)]
pub struct Obey {
    /// The command topic (schemas/command.avsc), read from its end.
    pub commands: String,
    /// The acknowledgement topic.
    pub acks: String,
}

/// The devices' side of the command topic: decodes commands, hands them to the fleet and
/// sends the devices' acknowledgements.
struct Devices {
    consumer: BaseConsumer,
    acks: String,
    properties: Vec<String>,
}

impl Devices {
    fn new(client: &ClientConfig, obey: &Obey, topology: &Topology) -> Result<Devices> {
        let consumer: BaseConsumer = client
            .clone()
            .set("group.id", "twinflow-simulated-devices")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .create()
            .context("creating the simulated devices' consumer")?;
        consumer
            .subscribe(&[&obey.commands])
            .context("subscribing to the command topic")?;
        Ok(Devices {
            consumer,
            acks: obey.acks.clone(),
            properties: topology
                .model
                .properties
                .iter()
                .map(|p| p.name.clone())
                .collect(),
        })
    }

    /// Hands every command waiting to its device and sends the answers through `producer`.
    fn serve(&self, fleet: &mut Fleet, producer: &ThreadedProducer<Counting>) {
        while let Some(Ok(m)) = self.consumer.poll(Duration::ZERO) {
            let Some((command_id, asset, values)) = m.payload().and_then(|p| self.decode(p)) else {
                continue;
            };
            let result = match fleet.command(&asset, &values) {
                Some(Obeyed::Accepted) => ("accepted", None),
                Some(Obeyed::Rejected(why)) => ("rejected", Some(why)),
                Some(Obeyed::Ignored) | None => continue,
            };
            let ack = serde_json::json!({
                "command_id": command_id, "result": result.0, "detail": result.1,
            })
            .to_string();
            let record = BaseRecord::to(&self.acks)
                .key(asset.as_bytes())
                .payload(ack.as_bytes());
            if let Err((error, _)) = producer.send(record) {
                tracing::warn!(%error, "Simulated device acknowledgement not sent.");
            }
        }
    }

    /// The command id, asset and values of a command record.
    fn decode(&self, payload: &[u8]) -> Option<(String, String, Vec<(usize, Value)>)> {
        let command = crate::codec::decode_command(payload).ok()?;
        let values = command
            .values
            .into_iter()
            .filter_map(|(name, v)| Some((self.properties.iter().position(|n| *n == name)?, v)))
            .collect();
        Some((command.command_id, command.asset_id, values))
    }
}

/// Publishes the fleet's records until the count or duration is reached or `stop` is set.
/// Blocking: run it on its own thread.
///
/// # Errors
/// When the producer cannot be created or does not flush within 30 s at the end.
pub fn publish(
    mut fleet: Fleet,
    publish: &Publish,
    topology: &Topology,
    stop: &AtomicBool,
) -> Result<SimStats> {
    let devices = publish
        .obey
        .as_ref()
        .map(|obey| Devices::new(&publish.client, obey, topology))
        .transpose()?;
    let mut sink = Sink::open(&publish.via, &publish.client, &publish.topic)?;
    // The devices answer commands on Kafka, whatever door their readings take.
    let acks: Option<ThreadedProducer<Counting>> = match (&devices, sink.producer()) {
        (Some(_), None) => Some(
            publish
                .client
                .clone()
                .create_with_context(Counting(Arc::new(AtomicU64::new(0))))
                .context("creating the simulated devices' producer")?,
        ),
        _ => None,
    };
    let serve = |fleet: &mut Fleet, sink: &Sink| {
        if let (Some(devices), Some(producer)) = (&devices, acks.as_ref().or(sink.producer())) {
            devices.serve(fleet, producer);
        }
    };
    let started = Instant::now();
    let mut paced_since = None;
    let mut stats = SimStats::default();
    let (mut key, mut value) = (Vec::new(), Vec::new());
    while !stop.load(Ordering::Relaxed)
        && publish.count.is_none_or(|c| stats.sent < c)
        && publish.duration.is_none_or(|d| started.elapsed() < d)
    {
        if publish.rate > 0 && stats.sent >= publish.burst {
            let paced = *paced_since.get_or_insert_with(Instant::now);
            let due = publish.burst + (paced.elapsed().as_secs_f64() * publish.rate as f64) as u64;
            if stats.sent >= due {
                serve(&mut fleet, &sink);
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        if stats.sent % 1024 == 0 {
            serve(&mut fleet, &sink);
        }
        if fleet.next_record(&mut key, &mut value).is_malformed() {
            stats.malformed += 1;
        }
        sink.send(&key, &value, topology)?;
        stats.sent += 1;
    }
    stats.failed = sink.finish()?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn topology(model: &str) -> Topology {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let paths = crate::config::TopologyConfig::shipped(root, model);
        Topology::load(&paths).expect("the shipped topology loads")
    }

    fn records(model: &str, seed: u64, n: usize, malformed: f64) -> Vec<(Vec<u8>, Vec<u8>, Kind)> {
        let config = FleetConfig {
            assets: 50,
            seed,
            malformed,
            start_ms: 1_700_000_000_000,
            interval_ms: 1000,
        };
        let mut fleet = Fleet::new(config, &topology(model)).unwrap();
        (0..n)
            .map(|_| {
                let (mut k, mut v) = (Vec::new(), Vec::new());
                let kind = fleet.next_record(&mut k, &mut v);
                (k, v, kind)
            })
            .collect()
    }

    #[test]
    fn same_seed_same_records() {
        for model in ["vehicle", "pump"] {
            assert_eq!(records(model, 7, 2000, 0.05), records(model, 7, 2000, 0.05));
            assert_ne!(records(model, 7, 200, 0.0), records(model, 8, 200, 0.0));
        }
    }

    #[test]
    fn produces_breaches_recoveries_and_malformed_records() {
        let topology = topology("vehicle");
        let c = &topology.codec;
        let mut r = Reading::default();
        let (mut speeding, mut hot, mut low, mut bad) = (0, 0, 0, 0);
        let (mut late, mut twice) = (0, 0);
        for (_, v, kind) in records("vehicle", 1, 200_000, 0.01) {
            late += usize::from(kind == Kind::Late);
            twice += usize::from(kind == Kind::Duplicate);
            if kind.is_malformed() {
                bad += 1;
                continue;
            }
            c.decode_reading(crate::codec::Format::Avro, &v, &mut r)
                .unwrap();
            for (p, val) in &r.values {
                let x = val.as_f64().unwrap();
                match c.properties()[*p].name.as_str() {
                    "speed_kmh" if x > 120.0 => speeding += 1,
                    "temperature_c" if x > 8.0 => hot += 1,
                    "battery_pct" if x < 15.0 => low += 1,
                    _ => {}
                }
            }
        }
        assert!(
            speeding > 0 && hot > 0 && low > 0,
            "speeding {speeding}, hot {hot}, low battery {low}"
        );
        assert!((1000..3000).contains(&bad), "about 1% malformed, got {bad}");
        assert!(
            (500..1500).contains(&late) && (500..1500).contains(&twice),
            "about 0.5% late and 0.5% twice, got {late} and {twice}"
        );
    }

    /// A model the simulator has no special case for: every rule is breached for longer
    /// than its minimum duration and recovers past its clear threshold, every valid reading
    /// passes the model's validation, and each kind of malformed record fails it.
    #[test]
    fn drives_any_model_past_every_rule() {
        let topology = topology("pump");
        let (model, rules) = (&topology.model, &topology.rules.rules);
        let thresholds: Vec<_> = rules
            .iter()
            .filter(|r| r.kind == RuleKind::Threshold)
            .collect();
        assert_eq!(thresholds.len(), 2, "the pump model's rules");
        // Per rule: the longest run of breaching readings (event time) of one asset, and
        // whether a breach was followed by a value past the clear threshold.
        let mut runs: Vec<HashMap<String, (i64, i64)>> = vec![HashMap::new(); thresholds.len()];
        let mut longest = vec![0i64; thresholds.len()];
        let mut recovered = vec![false; thresholds.len()];
        let (mut r, mut statuses) = (Reading::default(), [0usize; 2]);
        for (key, v, kind) in records("pump", 3, 100_000, 0.01) {
            let decoded = topology
                .codec
                .decode_reading(crate::codec::Format::Avro, &v, &mut r);
            if kind.is_malformed() {
                let refused =
                    decoded.is_err() || model.validate(&r).is_err() || key != r.asset_id.as_bytes();
                assert!(refused, "a malformed record ({kind:?}) passes");
                continue;
            }
            decoded.unwrap();
            model.validate(&r).unwrap();
            assert!(r.asset_id.starts_with("pump-"), "{}", r.asset_id);
            let active = model.active_when.expect("pump status");
            let flow = r.values.iter().find(|(p, _)| *p == active.property);
            let flow = flow.and_then(|(_, v)| v.as_f64()).expect("flow");
            statuses[usize::from(flow > active.above)] += 1;
            for (i, rule) in thresholds.iter().enumerate() {
                let x = r.values.iter().find(|(p, _)| *p == rule.property);
                let x = x.and_then(|(_, v)| v.as_f64()).expect("a value");
                let run = runs[i].get(&r.asset_id).copied();
                if rule.op.holds(x, rule.threshold) {
                    let since = run.map_or(r.event_time, |(since, _)| since);
                    longest[i] = longest[i].max(r.event_time - since);
                    runs[i].insert(r.asset_id.clone(), (since, r.event_time));
                } else if run.is_some() {
                    let clear = rule.clear_threshold.unwrap_or(rule.threshold);
                    recovered[i] |= !rule.op.holds(x, clear);
                    runs[i].remove(&r.asset_id);
                }
            }
        }
        for (i, rule) in thresholds.iter().enumerate() {
            assert!(
                longest[i] > rule.min_duration.unwrap_or(0),
                "{}: longest breach {} ms",
                rule.code,
                longest[i]
            );
            assert!(recovered[i], "{} never recovers", rule.code);
        }
        assert!(
            statuses[0] > 0 && statuses[1] > 0,
            "active and still: {statuses:?}"
        );
    }
}
