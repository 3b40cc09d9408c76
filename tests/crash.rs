//! Crash loops against a real broker process (noida-db): the `twinflow` binary is killed
//! with SIGKILL at random points while it works through a seeded input, and restarted each
//! time. The outputs are then checked against an oracle computed directly from the input.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apache_avro::types::Value as AV;
use common::{NOIDA_CLIENT, Noida, avro_read, root, text, vehicle_topology};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use twinflow::kafka::apply_topology;
use twinflow::pipeline::processor::{Input, Processor, Target};
use twinflow::sim::{Fleet, FleetConfig};
use twinflow::store::Store;
use twinflow::topology::Topology;
use twinflow::twin::Twin;

const RECORDS: usize = 300_000;
const KILLS: usize = 10;

fn kills() -> usize {
    std::env::var("TWINFLOW_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(KILLS)
}

fn client(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in NOIDA_CLIENT {
        c.set(k, v);
    }
    c
}

/// What processing the input once, in order, must produce.
struct Oracle {
    twins: BTreeMap<String, Twin>,
    alerts: BTreeMap<(String, String), usize>,
    updates: usize,
    dead_letters: usize,
    skips: usize,
}

fn oracle(topology: &Arc<Topology>, input: &[(Vec<u8>, Vec<u8>)]) -> Oracle {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut processor = Processor::new(topology.clone(), store.partition(0), 1_000_000);
    let schema = apache_avro::Schema::parse_str(twinflow::codec::ALERT_SCHEMA).unwrap();
    let mut o = Oracle {
        twins: BTreeMap::new(),
        alerts: BTreeMap::new(),
        updates: 0,
        dead_letters: 0,
        skips: 0,
    };
    let mut batch = processor.batch();
    for (i, (k, v)) in input.iter().enumerate() {
        let input = Input {
            key: Some(k),
            payload: Some(v),
            topic: "telemetry",
            offset: i as i64,
            headers: None,
        };
        processor.process(&input, &mut batch, 0).unwrap();
    }
    for out in &batch.outputs.records {
        let (_, payload) = batch.outputs.bytes(out);
        match out.target {
            Target::Changelog => {
                let twin = topology.codec.decode_twin(payload.unwrap()).unwrap();
                o.updates += 1;
                o.twins.insert(twin.asset_id.clone(), twin);
            }
            Target::Alerts => {
                let a = alert_key(&avro_read(&schema, payload.unwrap()));
                *o.alerts.entry(a).or_default() += 1;
            }
            Target::DeadLetter => o.dead_letters += 1,
        }
    }
    o.skips = input.len() - o.updates - o.dead_letters;
    o
}

fn alert_key(v: &AV) -> (String, String) {
    let AV::Record(f) = v else {
        panic!("alert is a record")
    };
    let get = |n: &str| text(&f.iter().find(|(k, _)| k == n).unwrap().1);
    (get("alert_id"), get("state"))
}

/// Every record of `topic`, read to its end, in partition/offset order.
fn read_all(bootstrap: &str, topic: &str) -> Vec<OwnedMessage> {
    let noida: BTreeMap<String, String> = NOIDA_CLIENT
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let settings = [
        ("enable.partition.eof", "true"),
        ("isolation.level", "read_committed"),
    ];
    let (consumer, partitions) = common::reader(bootstrap, &noida, topic, &settings);
    let (mut out, mut ended) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended < partitions {
        assert!(Instant::now() < deadline, "reading {topic} took over 120 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(KafkaError::PartitionEOF(_))) => ended += 1,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    // An offset names one record: should the client hand one over twice, count it once.
    out.dedup_by_key(|m| (m.partition(), m.offset()));
    out
}

/// The oracle processes the input in the order it was sent; check that the broker holds it
/// so, per key (a key's readings share a partition), before blaming the pipeline.
fn assert_input_as_sent(bootstrap: &str, input: &[(Vec<u8>, Vec<u8>)]) {
    let mut sent: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
    for (k, v) in input {
        sent.entry(k).or_default().push(v);
    }
    let held = read_all(bootstrap, "telemetry");
    let mut stored: HashMap<&[u8], Vec<&[u8]>> = HashMap::new();
    for m in &held {
        stored
            .entry(m.key().unwrap())
            .or_default()
            .push(m.payload().unwrap());
    }
    assert_eq!(
        held.len(),
        input.len(),
        "the broker holds every reading once"
    );
    for (k, want) in &sent {
        assert!(
            stored.get(k) == Some(want),
            "the broker holds the readings of {} in the order they were sent",
            String::from_utf8_lossy(k)
        );
    }
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("twinflow.log")).unwrap_or_default();
    let lines: Vec<_> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Stops an instance with `signal` (KILL: no chance to clean up; TERM: a clean shutdown).
fn stop(child: &mut Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    child.wait().unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(dir: &Path, bootstrap: &str, guarantee: &str, http: u16) -> std::path::PathBuf {
    let t = vehicle_topology();
    let text = format!(
        r#"[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "crash-{guarantee}"
[kafka.librdkafka]
"receive.message.max.bytes" = "2147483647"
[kafka.consumer]
"fetch.wait.max.ms" = "10"
"session.timeout.ms" = "6000"
"auto.commit.interval.ms" = "100"
# Static membership: a restarted instance takes its partitions back at once (noida-db does
# not expire the sessions of killed members).
"group.instance.id" = "crash-instance"
[topology]
topics = "{}"
model = "{}"
[store]
path = "{}"
[processing]
guarantee = "{guarantee}"
[http]
listen = "127.0.0.1:{http}"
"#,
        t.topics.display(),
        t.model.display(),
        dir.join("store").display()
    );
    let path = dir.join(format!("twinflow-{http}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn(dir: &Path, bootstrap: &str, guarantee: &str) -> (Child, u16) {
    let http = free_port();
    let config = write_config(dir, bootstrap, guarantee, http);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("twinflow.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_twinflow"))
        .args(["run", "--config"])
        .arg(&config)
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("twinflow starts");
    (child, http)
}

/// The instance's /metrics page (`None` until it answers).
fn scrape(http: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The sum of a metric's series on the instance's /metrics (0 until it answers).
fn metric(http: u16, name: &str) -> f64 {
    scrape(http)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn consumed(http: u16) -> u64 {
    metric(http, "twinflow_records_consumed_total") as u64
}

/// Whether the instance applied every input record: its `twinflow_input_next_offset` per
/// partition reached the end of the partition.
fn caught_up(bootstrap: &str, http: u16, topic: &str) -> bool {
    let Some(body) = scrape(http) else {
        return false;
    };
    let consumer: BaseConsumer = client(bootstrap).create().unwrap();
    (0..4).all(|p| {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        let prefix = format!("twinflow_input_next_offset{{partition=\"{p}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|next| next as i64 >= high)
    })
}

fn crash_loop(guarantee: &str, signal: &str) {
    let broker = Noida::start();
    let topology =
        Arc::new(Topology::load(&vehicle_topology().topics, &vehicle_topology().model).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let created = rt
        .block_on(apply_topology(&client(&broker.bootstrap), &topology.topics))
        .unwrap();
    assert_eq!(created.len(), 4);

    // A seeded input with breaches that raise and clear, and malformed records.
    let config = FleetConfig {
        assets: 500,
        seed: 11,
        malformed: 0.01,
        start_ms: 1_790_000_000_000,
        interval_ms: 5000,
    };
    let mut fleet = Fleet::new(config, &topology.codec).unwrap();
    let input = fleet.take(RECORDS);
    let expected = oracle(&topology, &input);
    assert!(
        expected.alerts.len() > 50,
        "the input raises and clears alerts"
    );

    // The readings keep arriving (about 16k/s, for about 18 s) while instances are killed and restarted.
    let feeder = {
        let (bootstrap, input) = (broker.bootstrap.clone(), input.clone());
        std::thread::spawn(move || {
            let producer: ThreadedProducer<DefaultProducerContext> =
                // Idempotence keeps each partition in production order through retries: the
                // oracle processes the input in that order.
                client(&bootstrap).set("linger.ms", "5").set("enable.idempotence", "true").create().unwrap();
            for chunk in input.chunks(1000) {
                for (k, v) in chunk {
                    let mut r = BaseRecord::to("telemetry").key(&k[..]).payload(&v[..]);
                    while let Err((_, back)) = producer.send(r) {
                        r = back;
                        producer.poll(Duration::from_millis(5));
                    }
                }
                std::thread::sleep(Duration::from_millis(60));
            }
            producer.flush(Duration::from_secs(60)).unwrap();
        })
    };

    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let mut stop_points = Vec::new();
    let mut restored = 0.0;
    for _ in 0..kills() {
        let (mut child, http) = spawn(dir.path(), &broker.bootstrap, guarantee);
        // Stop the run at a random point once it is processing.
        let started = Instant::now();
        while consumed(http) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "a restarted instance made no progress in 60 s; log tail:\n{}",
                log_tail(dir.path())
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..600)));
        let at = consumed(http);
        restored += metric(http, "twinflow_restore_records_total");
        stop(&mut child, signal);
        stop_points.push(at);
    }
    feeder.join().unwrap();
    assert_input_as_sent(&broker.bootstrap, &input);
    let (mut child, http) = spawn(dir.path(), &broker.bootstrap, guarantee);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !caught_up(&broker.bootstrap, http, "telemetry") {
        assert!(
            Instant::now() < deadline,
            "the pipeline did not catch up within 180 s; log tail:\n{}",
            log_tail(dir.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    restored += metric(http, "twinflow_restore_records_total");
    child.kill().unwrap();
    child.wait().unwrap();

    let changelog = read_all(&broker.bootstrap, "twin-changelog");
    let alerts = read_all(&broker.bootstrap, "twin-alerts");
    let dead = read_all(&broker.bootstrap, "twin-dead-letter");
    let schema = apache_avro::Schema::parse_str(twinflow::codec::ALERT_SCHEMA).unwrap();

    let mut last: HashMap<String, Twin> = HashMap::new();
    let mut versions: HashMap<(String, i64), Vec<Twin>> = HashMap::new();
    for m in &changelog {
        let mut twin = topology.codec.decode_twin(m.payload().unwrap()).unwrap();
        twin.last_seen = 0; // processing time: differs between runs by design
        versions
            .entry((twin.asset_id.clone(), twin.version))
            .or_default()
            .push(twin.clone());
        last.insert(twin.asset_id.clone(), twin);
    }
    let mut seen_alerts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for m in &alerts {
        *seen_alerts
            .entry(alert_key(&avro_read(&schema, m.payload().unwrap())))
            .or_default() += 1;
    }

    // Final state equals the oracle, whatever the guarantee.
    assert_eq!(last.len(), expected.twins.len(), "every twin present");
    for (id, want) in &expected.twins {
        let mut want = want.clone();
        want.last_seen = 0;
        assert_eq!(last.get(id), Some(&want), "twin {id}");
    }
    assert_eq!(
        seen_alerts.keys().collect::<Vec<_>>(),
        expected.alerts.keys().collect::<Vec<_>>(),
        "every alert transition, and no other"
    );
    let duplicate_versions = versions.values().filter(|v| v.len() > 1).count();
    for copies in versions.values() {
        assert!(
            copies.iter().all(|t| *t == copies[0]),
            "a replayed version is identical"
        );
    }
    assert_eq!(stop_points.len(), kills());
    // The store is never behind the committed work after a crash (a commit prepared before
    // the transaction is applied at the next start), and what a crashed run sent without
    // committing is replayed, not restored.
    assert_eq!(restored, 0.0, "a restart restores nothing");
    if guarantee == "exactly_once" {
        assert_eq!(duplicate_versions, 0, "no duplicate versions");
        assert_eq!(
            changelog.len(),
            expected.updates,
            "each reading's change exactly once"
        );
        assert!(
            seen_alerts.values().all(|n| *n == 1),
            "each alert transition exactly once"
        );
        assert_eq!(dead.len(), expected.dead_letters);
        assert_eq!(
            changelog.len() + dead.len() + expected.skips,
            RECORDS,
            "input = updates + dead letters + skips"
        );
    } else {
        assert!(changelog.len() >= expected.updates);
        assert!(dead.len() >= expected.dead_letters);
    }
    let log = std::fs::read_to_string(dir.path().join("twinflow.log")).unwrap_or_default();
    let prepared = log.matches("Applied the commit prepared").count();
    eprintln!(
        "crash loop ({guarantee}): {RECORDS} records, SIG{signal} after {stop_points:?} records of a run; {restored} records restored, {prepared} prepared commits applied at a start; changelog {} (oracle {}), {} duplicate versions, alerts {} (oracle {} transitions), dead letters {} (oracle {}), skips {}",
        changelog.len(),
        expected.updates,
        duplicate_versions,
        alerts.len(),
        expected.alerts.len(),
        dead.len(),
        expected.dead_letters,
        expected.skips
    );
}

#[test]
fn at_least_once_loses_nothing_in_a_crash_loop() {
    crash_loop("at_least_once", "KILL");
}

#[test]
fn exactly_once_is_exact_across_clean_restarts() {
    crash_loop("exactly_once", "TERM");
}

#[test]
fn exactly_once_survives_a_crash_loop() {
    crash_loop("exactly_once", "KILL");
}
