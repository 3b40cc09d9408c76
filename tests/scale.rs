//! Scale-out: `twinflow run` processes sharing one consumer group divide the partitions; when
//! one is killed the others take its partitions over with their state, and a newly started
//! one receives partitions with their state. Nothing is lost, and no partition is ever
//! worked on by two instances at once.
//!
//! A warm instance (its fleet view has read the changelog) takes partitions over from the
//! view's copy of their twins. The twin API answers through a kill.
//!
//! It runs on the embedded mock cluster (owned by this test process, reached by the
//! instances over TCP) under at-least-once. noida-db cannot host this test: it checks a
//! member's session only when that member itself heartbeats, so a killed member keeps its
//! partitions forever. The mock cluster's transactions are hollow, so exactly-once is left to
//! the crash loops on noida-db (`tests/crash.rs`).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::instance::{
    Instance, Settings, caught_up, committed_offsets, feed, log_micros, micros, read_all,
};
use common::{
    ProcessedOnce, assert_delivery_invariants, now_ms, processed_once, untimed_vehicle_topology,
};
use rdkafka::ClientConfig;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;

const RECORDS: usize = 60_000;

#[test]
fn instances_divide_partitions_and_take_over_a_killed_ones_state() {
    let Scene {
        kafka: _kafka,
        bootstrap,
        topology,
        client,
        input,
        expected,
    } = Scene::start(5, RECORDS);
    assert!(
        expected.alerts.len() > 20,
        "the input raises and clears alerts"
    );

    // About 6k readings/s for 10 s, while instances come and go.
    let feeder = feed(&client, "telemetry", &input, 300, Duration::from_millis(50));
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&bootstrap, "scale");
    let mut a = Instance::spawn(dir.path(), "a", &settings);
    let b = Instance::spawn(dir.path(), "b", &settings);
    wait("two instances divide the partitions and process", || {
        let assigned = [&a, &b].map(|i| i.metric("twinflow_assigned_partitions"));
        assigned.iter().sum::<f64>() == 4.0
            && assigned.iter().all(|n| *n > 0.0)
            && a.consumed() > 0
            && b.consumed() > 0
    });
    // State follows a partition through the changelog up to the group's committed offset
    // (at-least-once replays the rest): let every partition's offset be committed once.
    wait("every partition has a committed offset", || {
        committed_offsets(&client, "scale", "telemetry")
            .iter()
            .all(|o| o.is_some_and(|o| o > 0))
    });

    // The twin API of the survivor answers through the kill and the takeover.
    let answers = Poller::start(b.http, "/twins?limit=5");
    a.stop("KILL");
    let killed_at = micros(SystemTime::now());
    let c = Instance::spawn(dir.path(), "c", &settings);
    wait("the third instance processes", || {
        c.metric("twinflow_assigned_partitions") > 0.0 && c.consumed() > 0
    });
    wait("the survivors own every partition", || {
        let assigned = [&b, &c].map(|i| i.metric("twinflow_assigned_partitions"));
        assigned.iter().sum::<f64>() == 4.0 && b.metric("twinflow_restoring_partitions") == 0.0
    });
    let answers = answers.stop();
    assert!(answers.len() > 10, "b was asked throughout: {answers:?}");
    assert!(
        answers.iter().all(|status| *status == Some(200)),
        "every answer of b's /twins through the kill was 200: {answers:?}"
    );
    feeder.join().unwrap();
    wait("the survivors apply every reading", || {
        caught_up(&client, &[&b, &c], "telemetry")
    });
    let restored = [&b, &c].map(|i| i.metric("twinflow_restore_records_total"));
    for mut i in [b, c] {
        i.stop("TERM");
    }

    let changelog = read_all(&bootstrap, "twin-changelog", &[]);
    let alerts = read_all(&bootstrap, "twin-alerts", &[]);
    let dead = read_all(&bootstrap, "twin-dead-letter", &[]);
    let seen = assert_delivery_invariants(&topology, &expected, &changelog, &alerts);
    assert!(
        dead.len() >= expected.dead_letters,
        "every dead letter is there"
    );
    assert!(
        restored.iter().sum::<f64>() > 0.0,
        "the partitions taken over came with their state"
    );

    // Ownership, from the instances' logs: a partition's worker starts only after its
    // previous owner stopped it (or died).
    let mut owners: BTreeMap<i32, Vec<(i64, i64, &str)>> = BTreeMap::new();
    for (name, end) in [("a", killed_at), ("b", i64::MAX), ("c", i64::MAX)] {
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        for (partition, from, to) in ownership(&log, end) {
            owners.entry(partition).or_default().push((from, to, name));
        }
    }
    assert_eq!(owners.len(), 4, "every partition had an owner");
    for (partition, mut spans) in owners {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[1].0 >= pair[0].1,
                "partition {partition}: {} started it before {} stopped",
                pair[1].2,
                pair[0].2
            );
        }
    }
    eprintln!(
        "scale-out: {RECORDS} readings, a killed, c started; restored {restored:?} records; changelog {} (once {}), {} duplicate versions; alerts {} (once {} transitions); dead letters {} (once {})",
        seen.updates,
        expected.updates,
        seen.duplicate_versions,
        alerts.len(),
        expected.alerts.len(),
        dead.len(),
        expected.dead_letters
    );
}

/// A warm instance, whose fleet view has read the changelog, takes partitions over from
/// its view's copy of their twins and reads only the changelog after it: on a clean
/// hand-over, and after a kill under load, where the view has read the dead owner's
/// unfinished tail and takes those twins back to their versions before it. The outputs
/// are those of the input processed once.
#[test]
fn a_warm_instance_takes_partitions_over_from_its_fleet_view() {
    let Scene {
        kafka: _kafka,
        bootstrap,
        topology,
        client,
        input,
        expected,
    } = Scene::start(6, RECORDS * 2);

    // About 6k readings/s for 20 s.
    let feeder = feed(&client, "telemetry", &input, 300, Duration::from_millis(50));
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&bootstrap, "promote");
    let warm = |i: &Instance| i.consumed() > 0 && i.metric("twinflow_view_twins") >= 100.0;
    let mut a = Instance::spawn(dir.path(), "a", &settings);
    let mut b = Instance::spawn(dir.path(), "b", &settings);
    wait("a and b divide the partitions, b's view reads", || {
        let assigned = [&a, &b].map(|i| i.metric("twinflow_assigned_partitions"));
        assigned.iter().sum::<f64>() == 4.0 && assigned.iter().all(|n| *n > 0.0) && warm(&b)
    });

    // A clean hand-over: a commits what it processed and leaves the group.
    let moving = a.metric("twinflow_assigned_partitions");
    let before = Promoted::of(&b);
    a.stop("TERM");
    wait("b owns every partition, restored", || {
        b.metric("twinflow_restore_promotions_total") >= before.outcomes + moving && ready(&b)
    });
    let handed = Promoted::of(&b).since(&before);
    assert_eq!(
        handed.restores,
        moving,
        "each partition a handed over was promoted from b's view: {}",
        outcomes(&b)
    );
    assert!(handed.twins > 0.0, "b took twins from its view");

    // A kill under load: c, warm, takes b's partitions over.
    let c = Instance::spawn(dir.path(), "c", &settings);
    wait("b and c divide the partitions, c's view reads", || {
        let assigned = [&b, &c].map(|i| i.metric("twinflow_assigned_partitions"));
        assigned.iter().sum::<f64>() == 4.0
            && c.metric("twinflow_assigned_partitions") > 0.0
            && ready(&c)
            && warm(&c)
    });
    // The takeover resumes from the group's offsets: let b's be committed once (librdkafka
    // skips its timed commits while the group rebalances, as it did a moment ago).
    wait("every partition has a committed offset", || {
        committed_offsets(&client, "promote", "telemetry")
            .iter()
            .all(|o| o.is_some_and(|o| o > 0))
    });
    assert!(!feeder.is_finished(), "the kill comes under load");
    let moving = b.metric("twinflow_assigned_partitions");
    let before = Promoted::of(&c);
    b.stop("KILL");
    wait("c owns every partition, restored", || {
        c.metric("twinflow_restore_promotions_total") >= before.outcomes + moving && ready(&c)
    });
    let killed = Promoted::of(&c).since(&before);
    assert_eq!(
        killed.restores,
        moving,
        "each partition of the killed b was promoted from c's view: {}\n{}",
        outcomes(&c),
        c.log_tail()
    );
    assert!(
        killed.reverted > 0.0,
        "c's view had read b's unfinished tail, and those twins went back before it"
    );
    feeder.join().unwrap();
    wait("c applies every reading", || {
        caught_up(&client, &[&c], "telemetry")
    });
    let mut c = c;
    c.stop("TERM");

    let changelog = read_all(&bootstrap, "twin-changelog", &[]);
    let alerts = read_all(&bootstrap, "twin-alerts", &[]);
    let seen = assert_delivery_invariants(&topology, &expected, &changelog, &alerts);
    eprintln!(
        "takeover from the view: {} readings; clean hand-over {handed:?}; kill {killed:?}; changelog {} (once {}), {} duplicate versions; alerts {} (once {} transitions)",
        input.len(),
        seen.updates,
        expected.updates,
        seen.duplicate_versions,
        alerts.len(),
        expected.alerts.len()
    );
}

/// An embedded cluster with the topology's topics, `records` readings of 300 vehicles
/// (simulated from `seed`, 1 % malformed) to feed it, and what they yield processed once.
struct Scene {
    kafka: EmbeddedKafka,
    bootstrap: String,
    topology: Arc<Topology>,
    client: ClientConfig,
    input: Vec<(Vec<u8>, Vec<u8>)>,
    expected: ProcessedOnce,
}

impl Scene {
    fn start(seed: u64, records: usize) -> Scene {
        let kafka = EmbeddedKafka::start(1).unwrap();
        let bootstrap = kafka.bootstrap_servers();
        let topology = Arc::new(Topology::load(&untimed_vehicle_topology()).unwrap());
        for spec in topology.topics.all() {
            kafka.create_topic(&spec.name, spec.partitions).unwrap();
        }
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &bootstrap);
        let fleet = FleetConfig {
            assets: 300,
            seed,
            malformed: 0.01,
            start_ms: 1_790_000_000_000,
            interval_ms: 5000,
        };
        let input = Fleet::new(fleet, &topology).unwrap().take(records);
        let pairs: Vec<(&[u8], &[u8])> = input.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let expected = processed_once(&topology, &pairs, now_ms());
        Scene {
            kafka,
            bootstrap,
            topology,
            client,
            input,
            expected,
        }
    }
}

/// At-least-once instances of `group` that notice a killed member within about 2 s.
fn settings<'a>(bootstrap: &'a str, group: &'a str) -> Settings<'a> {
    Settings {
        bootstrap,
        group,
        guarantee: "at_least_once",
        librdkafka: &[],
        processing: &[],
        env: &[],
        consumer: &[
            ("fetch.wait.max.ms", "10"),
            ("session.timeout.ms", "2000"),
            ("heartbeat.interval.ms", "300"),
        ],
    }
}

/// The outcomes of an instance's restores, as its metrics list them.
fn outcomes(instance: &Instance) -> String {
    let page = instance.scrape().unwrap_or_default();
    let lines = page
        .lines()
        .filter(|l| l.starts_with("twinflow_restore_promotions_total{"));
    lines.collect::<Vec<_>>().join(", ")
}

/// Whether every partition of `instance` is restored and processing.
fn ready(instance: &Instance) -> bool {
    common::http_get(instance.http, "/readyz").is_some_and(|(status, _)| status == 200)
}

/// What an instance's restores took from its fleet view.
#[derive(Debug)]
struct Promoted {
    /// Restores, whatever their outcome.
    outcomes: f64,
    /// Restores that promoted the view's twins.
    restores: f64,
    twins: f64,
    reverted: f64,
    /// Changelog records the restores read.
    records: f64,
}

impl Promoted {
    fn of(instance: &Instance) -> Promoted {
        let page = instance.scrape().unwrap_or_default();
        let restores = page
            .lines()
            .find_map(|l| {
                l.strip_prefix("twinflow_restore_promotions_total{outcome=\"promoted\"} ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        Promoted {
            outcomes: instance.metric("twinflow_restore_promotions_total"),
            restores,
            twins: instance.metric("twinflow_restore_promoted_twins_total"),
            reverted: instance.metric("twinflow_restore_reverted_twins_total"),
            records: instance.metric("twinflow_restore_records_total"),
        }
    }

    fn since(&self, before: &Promoted) -> Promoted {
        Promoted {
            outcomes: self.outcomes - before.outcomes,
            restores: self.restores - before.restores,
            twins: self.twins - before.twins,
            reverted: self.reverted - before.reverted,
            records: self.records - before.records,
        }
    }
}

/// Asks `GET path` of an instance again and again on a thread of its own, noting each
/// answer's status (`None`: no answer), until stopped.
struct Poller {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Option<u16>>>,
}

impl Poller {
    fn start(port: u16, path: &'static str) -> Poller {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                answers.push(common::http_get(port, path).map(|(status, _)| status));
                std::thread::sleep(Duration::from_millis(20));
            }
            answers
        });
        Poller { stop, thread }
    }

    fn stop(self) -> Vec<Option<u16>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// Polls `done` until it holds, for at most a minute.
fn wait(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(partition, started, stopped)` of every partition worker in an instance's log, in
/// microseconds since the epoch; a worker still running at the end of the log runs to
/// `end`.
fn ownership(log: &str, end: i64) -> Vec<(i32, i64, i64)> {
    let mut open: BTreeMap<i32, i64> = BTreeMap::new();
    let mut spans = Vec::new();
    for line in log.lines() {
        let started = line.contains("Partition worker started.");
        if !started && !line.contains("Partition worker stopped.") {
            continue;
        }
        let partition = line
            .split("partition=")
            .nth(1)
            .and_then(|r| r.split(' ').next()?.parse().ok())
            .expect("the line names its partition");
        let at = log_micros(line.split(' ').next().unwrap());
        if started {
            open.insert(partition, at);
        } else if let Some(from) = open.remove(&partition) {
            spans.push((partition, from, at));
        }
    }
    spans.extend(open.into_iter().map(|(p, from)| (p, from, end)));
    spans
}

#[test]
fn log_timestamps_parse_to_the_epoch() {
    assert_eq!(log_micros("1970-01-01T00:00:00.000001Z"), 1);
    assert_eq!(
        log_micros("2026-11-22T04:48:26.393637Z"),
        micros(SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_322_906_393_637))
    );
}
