//! Against a separate broker process (noida-db): topic admin with configs, the full pipeline,
//! and outside consumers (Python confluent-kafka + fastavro) reading the outputs with nothing
//! but `schemas/`.

mod common;

use common::{
    NOIDA_CLIENT, Noida, TestPipeline, root, text, untimed_vehicle_topology, vehicle_topology, venv,
};
use rdkafka::Message;
use twinflow::config::Guarantee;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::kafka::{TopicReport, apply_topology};
use twinflow::twin::{Status, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_pipeline_and_python_consumers() {
    let broker = Noida::start();
    let mut p = TestPipeline::new(&broker.bootstrap, vehicle_topology(), &NOIDA_CLIENT);
    let admin = p.config().kafka.admin_config();

    // Topology apply creates the nine topics with their configs, then finds them as declared.
    let created = apply_topology(&admin, &p.topology.topics).await.unwrap();
    assert_eq!(
        created
            .iter()
            .filter(|r| matches!(r, TopicReport::Created(_)))
            .count(),
        9,
        "{created:?}"
    );
    let again = apply_topology(&admin, &p.topology.topics).await.unwrap();
    assert!(
        again.iter().all(|r| matches!(r, TopicReport::Unchanged(_))),
        "cleanup.policy=compact and the rest as declared: {again:?}"
    );
    let mut drifted = p.topology.topics.clone();
    drifted.alerts.partitions = 2;
    drifted
        .changelog
        .config
        .insert("cleanup.policy".into(), "delete".into());
    let reports = apply_topology(&admin, &drifted).await.unwrap();
    let mismatches: Vec<_> = reports
        .iter()
        .filter(|r| r.is_mismatch())
        .map(|r| r.to_string())
        .collect();
    assert_eq!(mismatches.len(), 2, "{reports:?}");
    assert!(
        mismatches
            .iter()
            .any(|m| m.contains("has 4 partitions, declared 2")),
        "{mismatches:?}"
    );
    assert!(
        mismatches
            .iter()
            .any(|m| m.contains("cleanup.policy is compact, declared delete")),
        "{mismatches:?}"
    );

    // The pipeline over it, fed by the simulator (with malformed records).
    p.start();
    let config = FleetConfig {
        assets: 40,
        seed: 3,
        malformed: 0.02,
        start_ms: 1_790_000_000_000,
        interval_ms: 30_000,
    };
    let mut fleet = Fleet::new(config, &p.topology).unwrap();
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let mut malformed = 0;
    for _ in 0..3000 {
        if fleet.next_record(&mut key, &mut value).is_malformed() {
            malformed += 1;
        }
        p.send_raw(Some(&key), Some(&value)).await;
    }
    p.wait_consumed(3000).await;
    let m = p.metrics();
    let updates = m.total("twinflow_twin_updates_total");
    let alerts = m.total("twinflow_alerts_emitted_total");
    assert_eq!(m.total("twinflow_records_dead_lettered_total"), malformed);
    assert_eq!(
        updates + m.total("twinflow_records_skipped_total") + malformed,
        3000
    );
    assert!(alerts > 0, "the simulated fleet breaches rules");
    let raised_expected = m.counter("twinflow_alerts_emitted_total", &[("state", "RAISED")]);
    // At-least-once commits neither prepare a copy nor run a transaction.
    for phase in ["prepare", "transaction"] {
        let timed = m.commit_phase_seconds.with_label_values(&[phase]);
        assert_eq!(timed.get_sample_count(), 0, "no {phase} phase");
    }

    // What twinflow says the twins are.
    let ours = p.changelog(updates as usize);
    p.stop().await;

    // A Python consumer decodes both topics with only the shipped schemas.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(venv().join("bin/python"))
            .arg(root().join("tests/python/read_outputs.py"))
            .args([
                "--bootstrap",
                &broker.bootstrap,
                "--changelog",
                "twin-changelog",
                "--alerts",
                "twin-alerts",
            ])
            .arg("--twin-schema")
            .arg(root().join("schemas/vehicle_twin.avsc"))
            .arg("--alert-schema")
            .arg(root().join("schemas/alert_event.avsc"))
            .args([
                "--expect-changelog",
                &updates.to_string(),
                "--expect-alerts",
                &alerts.to_string(),
                "--timeout",
                "60",
            ])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "read_outputs.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["changelog_records"], updates);
    assert_eq!(doc["alert_records"], alerts);
    let twins = doc["twins"].as_object().unwrap();
    let temperature = p.topology.model.property("temperature_c").unwrap();
    let mut checked = 0;
    for twin in ours.iter().filter(|t| {
        ours.iter()
            .all(|o| o.asset_id != t.asset_id || o.version <= t.version)
    }) {
        let py = &twins[&twin.asset_id];
        assert_eq!(py["version"], twin.version, "{}", twin.asset_id);
        assert_eq!(py["status"], twin.status.symbol());
        assert_eq!(py["event_time"], twin.event_time);
        let expected = twin.value(temperature).and_then(Value::as_f64);
        assert_eq!(py["temperature_c"].as_f64(), expected);
        assert_eq!(
            py["active_alerts"].as_array().unwrap().len(),
            twin.alerts.len()
        );
        checked += 1;
    }
    assert_eq!(checked, twins.len());
    let raised = doc["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "RAISED")
        .count() as u64;
    assert_eq!(raised, raised_expected);
}

/// Under exactly-once, timer and acknowledgement output is part of a transaction: a
/// read_committed reader sees the OFFLINE twin, its ASSET_OFFLINE alert and then the
/// ACKNOWLEDGED event, which only committed transactions show (the acknowledgement's offset
/// goes into the transaction with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timer_and_ack_output_commit_in_the_transaction_under_exactly_once() {
    let broker = Noida::start();
    let mut p = TestPipeline::new(&broker.bootstrap, vehicle_topology(), &NOIDA_CLIENT);
    p.guarantee = Guarantee::ExactlyOnce;
    let offline_after = p.topology.model.time.offline_after.unwrap();
    apply_topology(&p.config().kafka.admin_config(), &p.topology.topics)
        .await
        .unwrap();
    p.start();
    p.send("truck-x", 1_790_000_000_000, &[("speed_kmh", 50.0)])
        .await;
    p.wait_consumed(1).await;
    p.clock.advance(offline_after + 1000);

    // From here on the test's own readers read committed records only.
    p.extra
        .insert("isolation.level".into(), "read_committed".into());
    let twins = p.changelog(2);
    assert_eq!(
        twins
            .iter()
            .map(|t| (t.version, t.status))
            .collect::<Vec<_>>(),
        [(1, Status::Active), (2, Status::Offline)]
    );
    let alerts = p.alerts(1);
    assert_eq!(
        (text(&alerts[0]["code"]), text(&alerts[0]["state"])),
        ("ASSET_OFFLINE".into(), "RAISED".into())
    );

    let id = text(&alerts[0]["alert_id"]);
    let ack = format!(r#"{{"alert_id": "{id}", "by": "ops"}}"#);
    p.send_to(
        &p.topology.topics.acks.name,
        Some(b"truck-x"),
        Some(ack.as_bytes()),
    )
    .await;
    let alerts = p.alerts(2);
    assert_eq!(
        (text(&alerts[1]["state"]), text(&alerts[1]["alert_id"])),
        ("ACKNOWLEDGED".into(), id)
    );
    assert_eq!(
        p.changelog(3)[2].alerts[0].acknowledged_by.as_deref(),
        Some("ops")
    );

    // A desired write: the twin, its command and the command event commit in the
    // transaction with the desired input's offset, so a restart does not apply it again.
    let write = r#"{"desired": {"temperature_c": 4.0}, "command_id": "eos-1", "by": "erp"}"#;
    let desired = p.topology.topics.desired.name.clone();
    p.send_to(&desired, Some(b"truck-x"), Some(write.as_bytes()))
        .await;
    let twin = &p.changelog(4)[3];
    assert_eq!((twin.desired_version, twin.commands.len()), (1, 1));
    let events = |n| {
        let topic = &p.topology.topics.command_events.name;
        p.read(topic, n, std::time::Duration::from_secs(30))
            .iter()
            .map(|m| {
                let json = twinflow::codec::command_event_json(m.payload().unwrap()).unwrap();
                common::command_key(&json)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(events(1), [("eos-1".to_owned(), "ISSUED".to_owned())]);
    let commands = p.read(
        &p.topology.topics.commands.name,
        1,
        std::time::Duration::from_secs(30),
    );
    assert_eq!(commands[0].key(), Some(&b"truck-x"[..]));
    // The group's position in the desired input moved on with the transaction.
    let committed: i64 = {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &p.bootstrap)
            .set("group.id", &p.group);
        for (k, v) in NOIDA_CLIENT {
            c.set(k, v);
        }
        let consumer: BaseConsumer = c.create().unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for partition in 0..p.topology.topics.desired.partitions {
            tpl.add_partition(&desired, partition);
        }
        let offsets = consumer
            .committed_offsets(tpl, std::time::Duration::from_secs(10))
            .unwrap();
        offsets
            .elements()
            .iter()
            .filter_map(|e| e.offset().to_raw())
            .filter(|o| *o > 0)
            .sum()
    };
    assert_eq!(
        committed, 1,
        "the desired input's offset commits with the transaction"
    );
    // Commits are serial, and later ones made these records visible: the first commits
    // have shown their time in every phase, the prepared copy and the transaction included.
    let phases = &p.metrics().commit_phase_seconds;
    for phase in ["deliveries", "prepare", "transaction", "store"] {
        assert!(
            phases.with_label_values(&[phase]).get_sample_count() > 0,
            "the commits' {phase} phase is timed"
        );
    }
    p.stop().await;

    // Restarted, the same write again is a counted no-op (its command is open) that changes
    // nothing.
    p.start();
    p.send_to(&desired, Some(b"truck-x"), Some(write.as_bytes()))
        .await;
    let m = p.metrics().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while m.counter("twinflow_command_noops_total", &[("reason", "repeated")]) < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the repeat was not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(m.total("twinflow_twin_updates_total"), 0, "no twin change");
    p.stop().await;
}

/// The history topic holds every twin version the pipeline wrote, each once under
/// exactly-once (a read_committed reader), with the changelog's key, value and headers. It
/// is not compacted (`cleanup.policy = delete`, checked by `topology apply` above), so what
/// the changelog's compaction removes stays here until retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_holds_every_version_once_under_exactly_once() {
    use common::instance::read_all;
    let broker = Noida::start();
    let mut p = TestPipeline::new(&broker.bootstrap, untimed_vehicle_topology(), &NOIDA_CLIENT);
    p.guarantee = Guarantee::ExactlyOnce;
    apply_topology(&p.config().kafka.admin_config(), &p.topology.topics)
        .await
        .unwrap();
    p.start();
    let (assets, versions) = (10_u32, 20_u32);
    let t = 1_790_000_000_000_i64;
    for v in 0..versions {
        for a in 0..assets {
            let speed = f64::from(v + 1);
            p.send(
                &format!("hist-{a}"),
                t + i64::from(v) * 1000,
                &[("speed_kmh", speed)],
            )
            .await;
        }
    }
    p.wait_consumed(u64::from(assets * versions)).await;
    p.stop().await;

    let mut committed = NOIDA_CLIENT.to_vec();
    committed.push(("isolation.level", "read_committed"));
    let changelog = read_all(&broker.bootstrap, "twin-changelog", &committed);
    let history = read_all(&broker.bootstrap, "twin-history", &committed);
    let mut seen = std::collections::BTreeMap::new();
    for m in &history {
        let twin = p.topology.codec.decode_twin(m.payload().unwrap()).unwrap();
        assert_eq!(
            m.key(),
            Some(twin.asset_id.as_bytes()),
            "keyed as the changelog"
        );
        assert!(common::header(m, "twinflow.source.offset").is_some());
        let speed = p.topology.model.property("speed_kmh").unwrap();
        assert_eq!(twin.value(speed), Some(&Value::Double(twin.version as f64)));
        *seen.entry((twin.asset_id, twin.version)).or_insert(0) += 1;
    }
    assert_eq!(
        history.len(),
        (assets * versions) as usize,
        "every version once"
    );
    // The changelog's records (not compacted yet here), on the same partitions.
    let same = |m: &rdkafka::message::OwnedMessage| {
        let bytes = |b: Option<&[u8]>| b.map(<[u8]>::to_vec);
        (m.partition(), bytes(m.key()), bytes(m.payload()))
    };
    assert_eq!(
        history.iter().map(same).collect::<Vec<_>>(),
        changelog.iter().map(same).collect::<Vec<_>>()
    );
    for a in 0..assets {
        for v in 1..=i64::from(versions) {
            assert_eq!(
                seen.get(&(format!("hist-{a}"), v)),
                Some(&1),
                "hist-{a} v{v}"
            );
        }
    }
}
