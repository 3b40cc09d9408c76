//! Kafka faults injected into the embedded mock cluster while the pipeline runs
//! (at-least-once): broker outages mid-stream, produce requests failed with a retriable
//! error, a produce request rejected outright, and offset commits rejected throughout.
//!
//! Each test proves that no reading is lost: the changelog holds every twin version, the
//! last changelog record of every asset equals the twin that the same readings give when
//! run straight through the pipeline's own `Processor`, and every alert event is there. It
//! also proves that nothing is counted twice, and that a fault that makes the pipeline drop
//! its uncommitted work shows in `twinflow_commits_total{outcome="aborted"}`.
//!
//! The pipeline's clock stands still, so a replayed reading gives the same twin, byte for
//! byte, and the expected result can be exact.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::instance::committed_offsets;
use common::{ProcessedOnce, TestPipeline, processed_once, text, vehicle_topology};
use rdkafka::ClientConfig;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::twin::Twin;

/// Event time of the first round of readings.
const T0: i64 = 1_790_000_000_000;
/// Assets of the test stream. Their ids hash to all four input partitions.
const ASSETS: usize = 16;
/// How long an outage lasts.
const OUTAGE: Duration = Duration::from_secs(2);
/// Bound on waiting for the pipeline to get somewhere.
const WITHIN: Duration = Duration::from_secs(30);
/// The broker of a one-broker cluster.
const ONLY_BROKER: i32 = 1;
/// In a split cluster, the leader of the input topic.
const INPUT_BROKER: i32 = 1;
/// In a split cluster, the leader of every output topic.
const OUTPUT_BROKER: i32 = 2;

/// An outage of the broker that leads the outputs while readings keep coming in, then of
/// the broker that leads the input, each for two seconds: nothing is committed while its
/// outputs cannot be delivered, the pipeline carries on when the brokers come back, and in
/// the end every reading is reflected and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outages_mid_stream_lose_no_reading() {
    let (kafka, mut p) = split_brokers(&[("reconnect.backoff.max.ms", "500")]);
    let input = readings(&p, 0..480);
    let (a, rest) = input.split_at(160);
    let (b, c) = rest.split_at(160);
    let (c1, c2) = c.split_at(ASSETS);
    let e = expected(&p, &input);
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;

    // The outputs' broker goes; the input stays readable and readings keep arriving.
    kafka.broker_down(OUTPUT_BROKER).unwrap();
    let outage = tokio::time::sleep(OUTAGE); // the fault's length, not a wait for anything
    send_all(&p, b).await;
    outage.await;
    assert_eq!(
        consumed(&p),
        len(a),
        "nothing is committed while its outputs cannot be delivered"
    );
    kafka.broker_up(OUTPUT_BROKER).unwrap();
    p.wait_consumed(len(a) + len(b)).await;

    // The input's broker goes right after more readings arrived.
    send_all(&p, c1).await;
    kafka.broker_down(INPUT_BROKER).unwrap();
    tokio::time::sleep(OUTAGE).await; // the fault's length, not a wait for anything
    kafka.broker_up(INPUT_BROKER).unwrap();
    send_all(&p, c2).await;
    p.wait_consumed(len(&input)).await;

    assert_outage_survived(&p, &e, input.len());
    p.stop().await;
}

/// Produce requests answered "not leader for partition", an error the producer retries by
/// itself: nothing is lost, nothing is written twice and no commit is abandoned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_produce_errors_are_retried_without_replay() {
    let (kafka, mut p) = split_brokers(&[]);
    let input = readings(&p, 0..320);
    let (a, b) = input.split_at(160);
    let e = expected(&p, &input);
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;

    kafka
        .push_request_errors(
            OUTPUT_BROKER,
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
        )
        .unwrap();
    send_all(&p, b).await;
    eventually(
        "the pipeline's producer met every injected error",
        WITHIN,
        || {
            kafka
                .pending_request_errors(OUTPUT_BROKER, RDKafkaApiKey::Produce)
                .unwrap()
                == 0
        },
    )
    .await;
    p.wait_consumed(len(&input)).await;

    assert_reflects(&p, &e, Repeats::Forbidden);
    assert_counted(&p, input.len(), e.updates);
    assert_eq!(
        aborted_commits(&p),
        0,
        "a retried produce request abandons no commit"
    );
    assert_eq!(
        p.metrics().total("twinflow_output_delivery_failures_total"),
        0,
        "retried records are delivered"
    );
    p.stop().await;
}

/// A produce request the broker rejects (INVALID_RECORD, which the producer does not retry:
/// its records fail delivery) while readings stream in: the commit waiting for them fails,
/// is counted as aborted, the uncommitted work is replayed from the store's position, and
/// nothing is lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_produce_request_is_replayed_without_loss() {
    let (kafka, mut p) = split_brokers(&[]);
    let input = readings(&p, 0..320 + ASSETS);
    let (a, rest) = input.split_at(160);
    let (b, c) = rest.split_at(160);
    let e = expected(&p, &input);
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;

    reject_next_produce_request(&kafka);
    send_all(&p, b).await;
    eventually("a commit fails on the rejected records", WITHIN, || {
        aborted_commits(&p) >= 1
    })
    .await;
    // One more reading per asset, so every partition has input after the failure.
    send_all(&p, c).await;
    p.wait_consumed(len(&input)).await;

    assert_reflects(&p, &e, Repeats::Allowed);
    assert_counted(&p, input.len(), e.updates);
    assert_eq!(
        aborted_commits(&p),
        1,
        "one rejected request, one abandoned commit"
    );
    assert!(
        p.metrics().total("twinflow_output_delivery_failures_total") > 0,
        "the rejected records are counted"
    );
    p.stop().await;
}

/// The same rejection when it hits the outputs of a partition's last reading: the reading is
/// still replayed and reflected, without waiting for more input on its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_outputs_of_a_last_reading_are_replayed_without_new_input() {
    let (kafka, mut p) = split_brokers(&[]);
    let input = readings(&p, 0..ASSETS + 1);
    let (a, last) = input.split_at(ASSETS);
    let e = expected(&p, &input);
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;

    reject_next_produce_request(&kafka);
    send_all(&p, last).await;
    eventually("a commit fails on the rejected records", WITHIN, || {
        aborted_commits(&p) >= 1
    })
    .await;
    eventually(
        "the reading whose outputs were rejected is replayed with no further input",
        Duration::from_secs(10),
        || consumed(&p) >= len(&input),
    )
    .await;

    assert_reflects(&p, &e, Repeats::Allowed);
    assert_counted(&p, input.len(), e.updates);
    p.stop().await;
}

/// Every offset commit of the group is rejected (REBALANCE_IN_PROGRESS, as a broker answers
/// during a rebalance), with auto-commit every 100 ms so that many are tried: processing is
/// not disturbed, and a restart on the same store resumes where the pipeline stopped, because
/// the store, not the group offset, holds the position. Nothing is lost or read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_offset_commits_lose_nothing_and_a_restart_resumes_from_the_store() {
    const REJECTIONS: usize = 1_000;
    let (kafka, mut p) = one_broker(&[("auto.commit.interval.ms", "100")]);
    let input = readings(&p, 0..240);
    let (a, b) = input.split_at(160);
    let e_a = expected(&p, a);
    let e = expected(&p, &input);
    kafka
        .push_request_errors(
            ONLY_BROKER,
            RDKafkaApiKey::OffsetCommit,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; REJECTIONS],
        )
        .unwrap();
    let rejections_left = || {
        kafka
            .pending_request_errors(ONLY_BROKER, RDKafkaApiKey::OffsetCommit)
            .unwrap()
    };
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;
    eventually("the group tries to commit its offsets", WITHIN, || {
        rejections_left() < REJECTIONS
    })
    .await;
    assert!(
        group_offsets(&p).iter().all(Option::is_none),
        "the group has no committed offset to resume from"
    );
    assert_eq!(
        aborted_commits(&p),
        0,
        "a rejected offset commit abandons no pipeline commit"
    );
    p.stop().await;

    send_all(&p, b).await;
    p.start();
    p.wait_consumed(len(b)).await;
    assert_reflects(&p, &e, Repeats::Forbidden);
    assert_counted(&p, b.len(), e.updates - e_a.updates);
    assert!(
        rejections_left() > 0,
        "offset commits were rejected until the end"
    );
    p.stop().await;
}

/// The only broker is down for 20 s while readings wait to be processed (as when a broker
/// restarts), and comes back: the pipeline waits without giving up, then carries on, and
/// every reading is reflected and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twenty_second_cluster_outage_is_waited_out() {
    let (kafka, mut p) = one_broker(&[("reconnect.backoff.max.ms", "1000")]);
    let input = readings(&p, 0..320);
    let (a, b) = input.split_at(160);
    let e = expected(&p, &input);
    p.start();
    send_all(&p, a).await;
    p.wait_consumed(len(a)).await;

    kafka.broker_down(ONLY_BROKER).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await; // the outage's length, not a wait for anything
    kafka.broker_up(ONLY_BROKER).unwrap();
    send_all(&p, b).await;
    p.wait_consumed(len(&input)).await;

    assert_outage_survived(&p, &e, input.len());
    p.stop().await;
}

/// Makes the output broker reject the next produce request outright (INVALID_RECORD, which
/// the producer does not retry: its records fail delivery).
fn reject_next_produce_request(kafka: &EmbeddedKafka) {
    kafka
        .push_request_errors(
            OUTPUT_BROKER,
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD],
        )
        .unwrap();
}

/// A one-broker cluster with the topology's topics, and a stopped pipeline on it whose
/// clients all get the `extra` librdkafka settings.
fn one_broker(extra: &[(&str, &str)]) -> (EmbeddedKafka, TestPipeline) {
    let kafka = EmbeddedKafka::start(1).unwrap();
    let p = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), extra);
    for spec in p.topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
    }
    (kafka, p)
}

/// Two brokers: `INPUT_BROKER` leads the telemetry topic, `OUTPUT_BROKER` every topic the
/// pipeline writes. A fault on the output broker then hits the pipeline's producer, never
/// the test's own input producer, and input keeps flowing while it lasts.
fn split_brokers(extra: &[(&str, &str)]) -> (EmbeddedKafka, TestPipeline) {
    let kafka = EmbeddedKafka::start(2).unwrap();
    let p = TestPipeline::new(&kafka.bootstrap_servers(), vehicle_topology(), extra);
    let topics = &p.topology.topics;
    for spec in topics.all() {
        kafka.create_topic(&spec.name, spec.partitions).unwrap();
        let leader = if spec.name == topics.telemetry.name {
            INPUT_BROKER
        } else {
            OUTPUT_BROKER
        };
        for partition in 0..spec.partitions {
            kafka.set_leader(&spec.name, partition, leader).unwrap();
        }
    }
    (kafka, p)
}

/// Readings `range` of a fixed stream that cycles through `ASSETS` reefers, one round per
/// second of event time, as `(asset id, encoded reading)`. The values cross every rule's
/// threshold back and forth, so alerts are raised and cleared; every tenth reading comes
/// late, older than what its twin holds, and is mostly a counted skip.
fn readings(p: &TestPipeline, range: Range<usize>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            let asset = format!("reefer-{:02}", i % ASSETS);
            let round = (i / ASSETS) as i64;
            let late: i64 = if i % 10 == 9 { 3_500 } else { 0 };
            let values = [
                ("temperature_c", 2.0 + ((i * 7) % 11) as f64),
                ("speed_kmh", ((i * 37) % 150) as f64),
                ("battery_pct", 100.0 - ((i * 3) % 95) as f64),
            ];
            let bytes = p.encode(&asset, T0 + round * 1_000 - late, &values);
            (asset, bytes)
        })
        .collect()
}

async fn send_all(p: &TestPipeline, readings: &[(String, Vec<u8>)]) {
    for (asset, bytes) in readings {
        p.send_raw(Some(asset.as_bytes()), Some(bytes.as_slice()))
            .await;
    }
}

fn len<T>(records: &[T]) -> u64 {
    records.len() as u64
}

/// Runs `input` through the pipeline's record logic in one pass, with no Kafka in between,
/// at the pipeline's (still) clock.
fn expected(p: &TestPipeline, input: &[(String, Vec<u8>)]) -> ProcessedOnce {
    let pairs: Vec<(&[u8], &[u8])> = input
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_slice()))
        .collect();
    let e = processed_once(&Arc::new(p.topology.clone()), &pairs, p.now());
    assert_eq!(e.dead_letters, 0, "the test readings are all valid");
    e
}

/// Whether the outputs may repeat records, as at-least-once replays do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Repeats {
    Allowed,
    Forbidden,
}

/// Checks that the outputs reflect every reading. For each asset: every version from 1 to
/// the expected one is in the changelog; the records of one version are identical wherever
/// they repeat (replays are deterministic, so consumers may de-duplicate on
/// `(asset_id, version)`); the last record of the key, which compaction keeps, is the
/// expected twin. Every alert event is there, and no other.
fn assert_reflects(p: &TestPipeline, e: &ProcessedOnce, repeats: Repeats) {
    let changelog = p.changelog(e.updates);
    let mut versions: BTreeMap<(String, i64), &Twin> = BTreeMap::new();
    let mut last: BTreeMap<&str, &Twin> = BTreeMap::new();
    for twin in &changelog {
        let first = *versions
            .entry((twin.asset_id.clone(), twin.version))
            .or_insert(twin);
        assert_eq!(
            first, twin,
            "a repeat of {} version {} differs from the first",
            twin.asset_id, twin.version
        );
        last.insert(&twin.asset_id, twin);
    }
    assert_eq!(
        last.keys().copied().collect::<Vec<_>>(),
        e.twins.keys().map(String::as_str).collect::<Vec<_>>(),
        "the changelog has every asset, and no other"
    );
    for (asset, want) in &e.twins {
        let seen: Vec<i64> = versions
            .keys()
            .filter(|(a, _)| a == asset)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(
            seen,
            (1..=want.version).collect::<Vec<_>>(),
            "no version of {asset} is missing"
        );
        assert_eq!(
            last[asset.as_str()],
            want,
            "the last twin of {asset} reflects all its readings"
        );
    }
    if repeats == Repeats::Forbidden {
        assert_eq!(
            changelog.len(),
            e.updates,
            "no changelog record is repeated"
        );
    }

    let alerts = p.alerts(e.alert_events);
    let got: BTreeSet<(String, String)> = alerts
        .iter()
        .map(|a| (text(&a["alert_id"]), text(&a["state"])))
        .collect();
    assert_eq!(
        got,
        e.alerts.keys().cloned().collect(),
        "every alert event is there, and no other"
    );
    if repeats == Repeats::Forbidden {
        assert_eq!(alerts.len(), e.alert_events, "no alert event is repeated");
    }
}

/// Checks the running instance's counters: every record it read is counted once, as a twin
/// update or a skip, whatever was replayed on the way.
/// After broker outages: the outputs reflect every reading (replays allowed), every record is
/// counted, and the outages show in the Kafka error counter.
fn assert_outage_survived(p: &TestPipeline, e: &ProcessedOnce, consumed: usize) {
    assert_reflects(p, e, Repeats::Allowed);
    assert_counted(p, consumed, e.updates);
    assert!(
        p.metrics().total("twinflow_kafka_errors_total") > 0,
        "the outages show in the Kafka error counter"
    );
}

fn assert_counted(p: &TestPipeline, consumed: usize, updates: usize) {
    let m = p.metrics();
    assert_eq!(
        m.total("twinflow_records_consumed_total"),
        consumed as u64,
        "every record read is counted once"
    );
    assert_eq!(
        m.total("twinflow_twin_updates_total"),
        updates as u64,
        "every twin change is counted once"
    );
    assert_eq!(
        m.total("twinflow_records_skipped_total"),
        (consumed - updates) as u64,
        "the other records are counted skips"
    );
    assert_eq!(m.total("twinflow_records_dead_lettered_total"), 0);
}

fn consumed(p: &TestPipeline) -> u64 {
    p.metrics().total("twinflow_records_consumed_total")
}

fn aborted_commits(p: &TestPipeline) -> u64 {
    p.metrics()
        .counter("twinflow_commits_total", &[("outcome", "aborted")])
}

/// The group's committed offsets of the input partitions (`None`: nothing committed).
fn group_offsets(p: &TestPipeline) -> Vec<Option<i64>> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &p.bootstrap);
    committed_offsets(&client, &p.group, &p.topology.topics.telemetry.name)
}

/// Waits until `done` holds, failing with `what` after `within`.
async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
