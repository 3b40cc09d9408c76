//! Operating the `twinflow` binary (on the mock cluster). Stopping: SIGTERM finishes the
//! batch, commits, closes the stores, leaves the group and exits 0; a stop that cannot finish
//! ends after `processing.shutdown_timeout`; a second signal ends it at once. Health:
//! `/healthz` turns false when the pipeline is wedged.

mod common;

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::instance::{Instance, Settings, caught_up, committed_offsets, feed};
use common::{http_get, untimed_vehicle_topology};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;

const GROUP: &str = "shutdown";

/// A one-broker cluster with the topics and `n` readings waiting in the input.
fn cluster(n: usize) -> (EmbeddedKafka, ClientConfig) {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let t = untimed_vehicle_topology();
    let topology = Topology::load(&t).unwrap();
    for spec in topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", kafka.bootstrap_servers());
    let config = FleetConfig {
        assets: 500,
        seed: 3,
        malformed: 0.01,
        start_ms: 1_790_000_000_000,
        interval_ms: 5000,
    };
    let input = Fleet::new(config, &topology).unwrap().take(n);
    feed(&client, "telemetry", &input, 1000, Duration::ZERO)
        .join()
        .unwrap();
    (kafka, client)
}

/// A password the instances get the way container secrets come: a file named in the
/// environment. It must never show in a log or on /metrics.
const SECRET: &str = "pa55-7f3c9e1d-never-logged";

fn spawn(dir: &Path, kafka: &EmbeddedKafka, timeout: &str) -> Instance {
    let secret = dir.join("kafka_password");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let secret = secret.display().to_string();
    let bootstrap = kafka.bootstrap_servers();
    let timeout = format!("\"{timeout}\"");
    let stall = "\"2s\"".to_owned();
    let settings = Settings {
        bootstrap: &bootstrap,
        group: GROUP,
        guarantee: "at_least_once",
        librdkafka: &[],
        consumer: &[("fetch.wait.max.ms", "10")],
        processing: &[("shutdown_timeout", &timeout), ("stall_after", &stall)],
        env: &[("TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD_FILE", &secret)],
    };
    Instance::spawn(dir, "stopping", &settings)
}

/// `GET path` on the instance's HTTP port: status code and body.
fn get(instance: &Instance, path: &str) -> (u16, String) {
    http_get(instance.http, path).expect("the instance answers")
}

/// Waits (polling) for `done`, at most 60 s.
fn wait(what: &str, instance: &Instance, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; log tail:\n{}",
            instance.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(instance: &Instance, signal: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(instance.child.id().to_string())
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Sends SIGTERM and returns how the process ended and how long after the signal.
fn terminate(instance: &mut Instance) -> (ExitStatus, Duration) {
    let started = Instant::now();
    kill(instance, "TERM");
    let status = instance.child.wait().unwrap();
    (status, started.elapsed())
}

fn high_watermarks(client: &ClientConfig) -> Vec<i64> {
    let consumer: BaseConsumer = client.create().unwrap();
    (0..4)
        .map(|p| {
            consumer
                .fetch_watermarks("telemetry", p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}

#[test]
fn sigterm_commits_and_exits_zero() {
    let (kafka, client) = cluster(20_000);
    let dir = tempfile::tempdir().unwrap();
    let mut instance = spawn(dir.path(), &kafka, "30s");
    wait("every reading is applied", &instance, || {
        caught_up(&client, &[&instance], "telemetry")
    });
    // Idle with nothing waiting is healthy, however long the position stands still.
    std::thread::sleep(Duration::from_secs(3)); // longer than stall_after, not a wait for anything
    assert_eq!(get(&instance, "/healthz").0, 200);
    assert!(
        instance.metric("twinflow_end_to_end_latency_seconds_count") > 0.0,
        "end-to-end latency is measured"
    );
    assert!(
        !instance.scrape().unwrap().contains(SECRET),
        "the secret is not on /metrics"
    );
    let (status, took) = terminate(&mut instance);
    let log = std::fs::read_to_string(&instance.log).unwrap();
    assert!(!log.contains(SECRET), "the secret is not in the log");
    assert!(
        status.success() && log.contains("Stopped cleanly."),
        "{status}; log tail:\n{}",
        instance.log_tail()
    );
    assert!(took < Duration::from_secs(30), "stopped in {took:?}");
    assert_eq!(
        committed_offsets(&client, GROUP, "telemetry"),
        high_watermarks(&client)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>(),
        "the group's offsets were committed on the way out"
    );
}

const STUCK: usize = 5000;

/// An instance (with `shutdown_timeout`) whose produce requests keep failing (retriably), so
/// its commits cannot finish; returned once it has outputs waiting to be delivered.
fn stuck_instance(shutdown_timeout: &str) -> (EmbeddedKafka, tempfile::TempDir, Instance) {
    let (kafka, _) = cluster(5_000);
    kafka
        .push_request_errors(
            1,
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; STUCK],
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let instance = spawn(dir.path(), &kafka, shutdown_timeout);
    wait("outputs are waiting to be delivered", &instance, || {
        kafka
            .pending_request_errors(1, RDKafkaApiKey::Produce)
            .unwrap()
            < STUCK
    });
    (kafka, dir, instance)
}

#[test]
fn a_stop_that_cannot_finish_ends_after_its_timeout() {
    let (_kafka, _dir, mut instance) = stuck_instance("3s");
    let (status, took) = terminate(&mut instance);
    assert_eq!(status.code(), Some(1), "log tail:\n{}", instance.log_tail());
    assert!(
        (Duration::from_secs(3)..Duration::from_secs(15)).contains(&took),
        "ended {took:?} after the signal"
    );
    let log = std::fs::read_to_string(&instance.log).unwrap();
    assert!(
        log.contains("did not finish within"),
        "{}",
        instance.log_tail()
    );
}

#[test]
fn a_second_signal_ends_a_stop_at_once() {
    let (_kafka, _dir, mut instance) = stuck_instance("10m");
    kill(&instance, "TERM");
    wait("the stop began", &instance, || {
        std::fs::read_to_string(&instance.log)
            .unwrap()
            .contains("Shutting down.")
    });
    let started = Instant::now();
    kill(&instance, "TERM");
    let status = instance.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "log tail:\n{}",
        instance.log_tail()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ended {:?} after the second signal",
        started.elapsed()
    );
}

#[test]
fn healthz_turns_false_when_the_pipeline_is_wedged() {
    let (_kafka, _dir, mut instance) = stuck_instance("10m");
    wait("input is waiting", &instance, || {
        instance.metric("twinflow_consumer_lag_records") > 0.0
    });
    wait("/healthz says the pipeline is wedged", &instance, || {
        get(&instance, "/healthz").0 == 503
    });
    let (_, body) = get(&instance, "/healthz");
    assert!(body.contains("wedged: partitions"), "{body}");
    instance.stop("KILL");
}

/// A partition whose worker ends (here: a stored twin that does not decode, a fatal error)
/// makes `/healthz` answer 503 naming the partition and the cause, and the instance stops
/// non-zero instead of running on without it. Produce requests keep failing, so the stop
/// takes until `shutdown_timeout` and the endpoint can be asked meanwhile.
#[test]
fn healthz_names_a_partition_whose_worker_ended_and_the_instance_stops_non_zero() {
    let (kafka, _) = cluster(5_000);
    let dir = tempfile::tempdir().unwrap();
    {
        // Garbage where some of the simulated fleet's twins would be, in every partition.
        let store = twinflow::store::Store::open(&dir.path().join("stopping-store")).unwrap();
        for p in 0..4 {
            let partition = store.partition(p);
            let mut batch = partition.batch();
            for i in 0..5 {
                for kind in ["truck", "reefer"] {
                    batch.put_twin(&format!("{kind}-{i:05}"), &[0xff; 7]);
                }
            }
            partition.commit(batch).unwrap();
        }
    }
    kafka
        .push_request_errors(
            1,
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; STUCK],
        )
        .unwrap();
    let mut instance = spawn(dir.path(), &kafka, "5s");
    let mut seen = None;
    wait("/healthz names the failed partition", &instance, || {
        seen = http_get(instance.http, "/healthz")
            .filter(|(status, body)| *status == 503 && body.contains("failed:"));
        seen.is_some()
    });
    let (_, body) = seen.unwrap();
    assert!(
        body.contains("failed: the worker of partition ") && body.contains("corrupt store"),
        "{body}"
    );
    let status = instance.child.wait().unwrap();
    assert!(
        !status.success(),
        "{status}; log tail:\n{}",
        instance.log_tail()
    );
    let log = std::fs::read_to_string(&instance.log).unwrap();
    assert!(log.contains("corrupt store"), "{}", instance.log_tail());
}
