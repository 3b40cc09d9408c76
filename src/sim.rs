//! The fleet simulator: seeded, reproducible telemetry of tracked vehicles, for the demo,
//! tests and benchmarks.
//!
//! Vehicles drive between waypoints around a few cities, stop, speed now and then, drain
//! their batteries and recharge; reefer trucks carry a cold-chain temperature that sometimes
//! breaches and recovers; some devices fall silent for a while; some device clocks run
//! ahead or behind (a few far ahead, broken); about 0.5 % of readings arrive late (held back
//! up to five rounds, so out of order) and 0.5 % arrive twice; a configurable fraction of
//! records is malformed in one of several ways. The same seed and start time give the same
//! records, byte for byte.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::codec::Codec;
use crate::twin::{Reading, Value};

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
    /// A reading with a latitude out of range.
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
}

/// Indices of the vehicle model's properties.
struct Props {
    lat: usize,
    lng: usize,
    speed: usize,
    temp: usize,
    battery: usize,
}

/// A seeded fleet producing one record per call.
pub struct Fleet {
    config: FleetConfig,
    rng: ChaCha8Rng,
    vehicles: Vec<Vehicle>,
    props: Props,
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
    /// A fleet for the vehicle model of `codec`.
    ///
    /// # Errors
    /// When the model lacks a vehicle property or the configuration is out of range.
    pub fn new(config: FleetConfig, codec: &Codec) -> Result<Fleet> {
        if config.assets == 0 || !(0.0..=1.0).contains(&config.malformed) || config.interval_ms <= 0
        {
            bail!(
                "the simulator needs at least one asset, a malformed fraction in 0..1 and a positive interval"
            );
        }
        let find = |name: &str| {
            codec
                .properties()
                .iter()
                .position(|p| p.name == name)
                .with_context(|| {
                    format!("the simulator drives the vehicle model; this model has no '{name}'")
                })
        };
        let props = Props {
            lat: find("lat")?,
            lng: find("lng")?,
            speed: find("speed_kmh")?,
            temp: find("temperature_c")?,
            battery: find("battery_pct")?,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let vehicles = (0..config.assets)
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
                    skew_ms: match rng.gen_range(0..1000) {
                        0..2 => 86_400_000, // a broken clock, a day ahead
                        2..50 => rng.gen_range(-120_000..120_000),
                        _ => 0,
                    },
                }
            })
            .collect();
        Ok(Fleet {
            config,
            rng,
            vehicles,
            props,
            codec: codec.clone(),
            next: 0,
            round: 0,
            reading: Reading::default(),
            held: Vec::new(),
            again: None,
        })
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
            self.next = (self.next + 1) % self.vehicles.len();
            if self.next == 0 {
                self.round += 1;
            }
            let jitter = (i as i64 * 7919) % self.config.interval_ms;
            let event_time = self.config.start_ms
                + self.round * self.config.interval_ms
                + jitter
                + self.vehicles[i].skew_ms;
            let dt_h = self.config.interval_ms as f64 / 3_600_000.0;
            if !step(&mut self.vehicles[i], &mut self.rng, dt_h) {
                continue; // silent this round
            }
            let v = &self.vehicles[i];
            let r = &mut self.reading;
            r.clear();
            r.asset_id.push_str(&v.id);
            r.event_time = event_time;
            r.values
                .push((self.props.lat, Value::Double(round(v.lat, 6))));
            r.values
                .push((self.props.lng, Value::Double(round(v.lng, 6))));
            r.values
                .push((self.props.speed, Value::Double(round(v.speed, 1))));
            if let Some(t) = v.temp {
                r.values.push((self.props.temp, Value::Double(round(t, 2))));
            }
            if v.ticks.is_multiple_of(5) || v.phase == Phase::Charging {
                r.values
                    .push((self.props.battery, Value::Double(round(v.battery, 1))));
            }
            r.values.sort_by_key(|(p, _)| *p);
            key.extend_from_slice(v.id.as_bytes());

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
                    for (p, val) in &mut r.values {
                        if *p == self.props.lat {
                            *val = Value::Double(123.4);
                        }
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
        let target = if v.excursion_left > 0 { 11.5 } else { 3.5 };
        *t += (target - *t) * 0.15 + rng.gen_range(-0.2..0.2);
    }
    true
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

struct Counting(Arc<AtomicU64>);

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
    /// Stop after this many records.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// Publishes the fleet's records until the count or duration is reached or `stop` is set.
/// Blocking: run it on its own thread.
///
/// # Errors
/// When the producer cannot be created or does not flush within 30 s at the end.
pub fn publish(mut fleet: Fleet, publish: &Publish, stop: &AtomicBool) -> Result<SimStats> {
    let failed = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<Counting> = publish
        .client
        .clone()
        .set("linger.ms", "5")
        // Keeps each vehicle's readings in order through retries.
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .create_with_context(Counting(failed.clone()))
        .context("creating the simulator's producer")?;
    let started = Instant::now();
    let mut stats = SimStats::default();
    let (mut key, mut value) = (Vec::new(), Vec::new());
    while !stop.load(Ordering::Relaxed)
        && publish.count.is_none_or(|c| stats.sent < c)
        && publish.duration.is_none_or(|d| started.elapsed() < d)
    {
        if publish.rate > 0 {
            let due = (started.elapsed().as_secs_f64() * publish.rate as f64) as u64;
            if stats.sent >= due {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        if fleet.next_record(&mut key, &mut value).is_malformed() {
            stats.malformed += 1;
        }
        let mut record = BaseRecord::to(&publish.topic)
            .key(&key[..])
            .payload(&value[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e).context("producing a simulated record"),
            }
        }
        stats.sent += 1;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the simulator's producer")?;
    stats.failed = failed.load(Ordering::Relaxed);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        Codec::new(
            include_str!("../schemas/vehicle_telemetry.avsc"),
            include_str!("../schemas/vehicle_twin.avsc"),
        )
        .unwrap()
    }

    fn records(seed: u64, n: usize, malformed: f64) -> Vec<(Vec<u8>, Vec<u8>, Kind)> {
        let config = FleetConfig {
            assets: 50,
            seed,
            malformed,
            start_ms: 1_700_000_000_000,
            interval_ms: 1000,
        };
        let mut fleet = Fleet::new(config, &codec()).unwrap();
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
        assert_eq!(records(7, 2000, 0.05), records(7, 2000, 0.05));
        assert_ne!(records(7, 200, 0.0), records(8, 200, 0.0));
    }

    #[test]
    fn produces_breaches_recoveries_and_malformed_records() {
        let c = codec();
        let mut r = Reading::default();
        let (mut speeding, mut hot, mut low, mut bad) = (0, 0, 0, 0);
        let (mut late, mut twice) = (0, 0);
        for (_, v, kind) in records(1, 200_000, 0.01) {
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
}
