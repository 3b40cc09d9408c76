//! `twinflow export` against a plain consumer of the same history topic, on the embedded
//! mock cluster (in this process, a fresh one per run), and what a twin version costs on disk.
//!
//! The history topic is filled with real twin versions: the simulated fleet's readings
//! merged into twins by the model (`Twin::apply`, the rules evaluated), each version encoded
//! as the pipeline writes it, stamped with its `updated_at`, keyed by asset id, lz4 batches.
//! Then, alternating, a plain consumer reads the whole topic (the baseline: the broker and
//! librdkafka alone) and the export writes the same window to Parquet. Reported: rows/s of
//! each and their ratio (median of the per-run ratios), and bytes per twin version in the
//! history topic (key, value and headers as sent), in the Parquet files, and in the fleet
//! view's store (`[view] history_versions`, RocksDB with LZ4, after a flush).
//!
//! The mock cluster keeps about 5 MiB per partition, so the history topic gets 16 partitions
//! here (the export reads as many as the topology says); it has no time index, so the
//! export finds the window's ends by a binary search over timestamps, as it does on such a
//! broker (here the window is the whole topic). (On noida-db a
//! consumer of 300,000 of these records now and then waited for minutes: it answers a fetch
//! with the whole backlog.)
//!
//! `cargo bench --bench export`; sizes from `TWINFLOW_BENCH_VERSIONS` (default 300,000),
//! `TWINFLOW_BENCH_ASSETS` (10,000) and `TWINFLOW_BENCH_RUNS` (3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use support::{env, median};
use twinflow::config::Config;
use twinflow::demo::embedded::EmbeddedKafka;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::topology::Topology;
use twinflow::twin::{Reading, Twin};

const START_MS: i64 = 1_790_000_000_000;

/// The encoded versions: `(asset id, twin datum, updated_at)`, in the order made.
fn versions(topology: &Topology, count: usize, assets: usize) -> Vec<(String, Vec<u8>, i64)> {
    let readings = Fleet::new(
        FleetConfig {
            assets,
            seed: 3,
            malformed: 0.0,
            start_ms: START_MS,
            interval_ms: 1000,
        },
        topology,
    )
    .expect("fleet")
    .take(count * 2);
    let format = topology.topics.telemetry_format();
    let (model, codec) = (&topology.model, &topology.codec);
    let mut twins: HashMap<String, Twin> = HashMap::new();
    let mut reading = Reading::default();
    let mut alerts = Vec::new();
    let mut out = Vec::with_capacity(count);
    for (i, (_, value)) in readings.iter().enumerate() {
        if out.len() == count {
            break;
        }
        codec
            .decode_reading(format, value, &mut reading)
            .expect("a reading");
        let now = START_MS + i as i64 * 10;
        let twin = twins
            .entry(reading.asset_id.clone())
            .or_insert_with(|| Twin::new(&reading.asset_id, model));
        let Ok(change) = twin.apply(model, &reading, now) else {
            continue;
        };
        alerts.clear();
        topology.rules.evaluate(twin, &change, &mut alerts);
        let mut bytes = Vec::new();
        codec.encode_twin(twin, &mut bytes);
        out.push((twin.asset_id.clone(), bytes, now));
    }
    out
}

/// Client settings for the broker.
fn client(bootstrap: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Writes the versions to `topic`, stamped, with the changelog's source-offset header.
fn fill(bootstrap: &str, topic: &str, versions: &[(String, Vec<u8>, i64)]) -> usize {
    let mut client = client(bootstrap);
    client
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("acks", "all");
    let producer: ThreadedProducer<DefaultProducerContext> = client.create().expect("producer");
    let mut bytes = 0;
    for (i, (id, value, at)) in versions.iter().enumerate() {
        let offset = i.to_string();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: twinflow::headers::SOURCE_OFFSET,
            value: Some(offset.as_bytes()),
        });
        bytes += id.len() + value.len() + twinflow::headers::SOURCE_OFFSET.len() + offset.len();
        let mut record = BaseRecord::to(topic)
            .key(id.as_bytes())
            .payload(value)
            .timestamp(*at)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(_), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("producing: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flushed");
    bytes
}

/// Exports everything into a fresh directory; rows/s and the Parquet bytes.
fn export(
    config: &Config,
    topology: &Topology,
    rt: &tokio::runtime::Runtime,
    rows: usize,
) -> (f64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("export");
    let clients = twinflow::kafka::Clients::new(config);
    let e = twinflow::export::Export {
        topology,
        clients: &clients,
        registry: None,
        from: 0,
        to: i64::MAX,
        out: &out,
        progress: None,
    };
    let started = Instant::now();
    let summary = twinflow::export::export(&e, rt.handle()).expect("export");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(summary.versions as usize, rows, "every version exported");
    let bytes = summary
        .files
        .iter()
        .map(|f| std::fs::metadata(f).expect("a file").len())
        .sum();
    (rows as f64 / seconds, bytes)
}

/// Bytes per version the fleet view keeps: the versions written as the view writes them.
fn view_bytes(versions: &[(String, Vec<u8>, i64)]) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = twinflow::store::Store::open(dir.path()).expect("store");
    let view = store.view();
    let mut seen: HashMap<&str, u64> = HashMap::new();
    for chunk in versions.chunks(10_000) {
        let twins: Vec<_> = chunk
            .iter()
            .map(|(id, v, _)| twinflow::store::ViewedTwin {
                asset_id: id.clone(),
                partition: 0,
                twin: Some(v.clone()),
                timer: None,
            })
            .collect();
        let kept: Vec<_> = chunk
            .iter()
            .map(|(id, _, _)| {
                let v = seen.entry(id).or_default();
                *v += 1;
                Some(*v)
            })
            .collect();
        let position = twinflow::store::ViewPosition {
            partition: 0,
            next: 0,
            checkpoints: None,
        };
        view.write(&twins, &kept, 1000, &[position])
            .expect("written");
    }
    store.flush().expect("flushed");
    // Less the newest twin per asset (kept once more under its own key).
    let mut newest: HashMap<&str, usize> = HashMap::new();
    for (id, v, _) in versions {
        newest.insert(id, v.len());
    }
    let latest: usize = newest.values().sum();
    (store.size_bytes() as f64 - latest as f64) / versions.len() as f64
}

fn main() {
    let count = env("TWINFLOW_BENCH_VERSIONS", 300_000);
    let assets = env("TWINFLOW_BENCH_ASSETS", 10_000);
    let runs = env("TWINFLOW_BENCH_RUNS", 3).max(1);
    let mut topology = Topology::load(&common::vehicle_topology()).expect("topology");
    let history = (topology.topics.history.as_mut()).expect("the shipped topology has a history");
    history.partitions = 16;
    let history = history.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let versions = versions(&topology, count, assets);
    println!(
        "export benchmark: {} twin versions of {assets} vehicles in {} ({} partitions) on the embedded mock cluster, \
         median of {runs} run(s)",
        versions.len(),
        history.name,
        history.partitions
    );
    let (mut plain, mut exported, mut ratios, mut parquet, mut sent) =
        (vec![], vec![], vec![], 0, 0);
    for run in 0..runs {
        let broker = EmbeddedKafka::start(1).expect("the embedded cluster");
        let bootstrap = broker.bootstrap_servers();
        broker
            .create_topic(&history.name, history.partitions)
            .expect("the history topic");
        let filling = Instant::now();
        sent = fill(&bootstrap, &history.name, &versions);
        eprintln!(
            "run {}: history filled in {:.1} s",
            run + 1,
            filling.elapsed().as_secs_f64()
        );
        let text = format!(
            "[kafka]\nbootstrap_servers = \"{}\"\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"10\"\n[topology]\ntopics = \"{}\"\nmodel = \"{}\"\n\
             [store]\npath = \"unused\"\n",
            bootstrap,
            common::vehicle_topology().topics.display(),
            common::vehicle_topology().model.display(),
        );
        let config = Config::from_toml(&text, std::iter::empty()).expect("config");
        // Alternate which goes first.
        let (p, (e, bytes)) = if run % 2 == 0 {
            let p = common::consume_all(&bootstrap, &history.name, versions.len());
            (p, export(&config, &topology, &rt, versions.len()))
        } else {
            let e = export(&config, &topology, &rt, versions.len());
            (
                common::consume_all(&bootstrap, &history.name, versions.len()),
                e,
            )
        };
        println!(
            "run {}: plain consumer {p:.0} records/s, export {e:.0} rows/s, ratio {:.2}",
            run + 1,
            e / p
        );
        plain.push(p);
        exported.push(e);
        ratios.push(e / p);
        parquet = bytes;
        drop(broker);
    }
    let view = view_bytes(&versions);
    let n = versions.len() as f64;
    println!();
    println!("| figure | value |");
    println!("|---|---:|");
    println!(
        "| plain consumer of the history topic, records/s | {:.0} |",
        median(plain)
    );
    println!("| export to Parquet, rows/s | {:.0} |", median(exported));
    println!(
        "| export / plain consumer (median of runs) | {:.2} |",
        median(ratios)
    );
    println!(
        "| history topic, bytes per version (key + value + headers, before lz4) | {:.0} |",
        sent as f64 / n
    );
    println!(
        "| Parquet (Snappy), bytes per row | {:.1} |",
        parquet as f64 / n
    );
    println!(
        "| fleet view store, bytes per kept version (RocksDB, LZ4) | {:.1} |",
        view
    );
}
