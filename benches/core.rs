//! Core throughput without Kafka: decode → validate → merge → rules → encode → store, on one
//! core, through the same `Processor` the partition workers run, with RocksDB on disk.
//!
//! Baseline, measured in the same run on the same records: decoding them with the reference
//! `apache-avro` crate's generic reader (decode only, no merge, no store). Ratios > 1 mean the
//! whole twinflow path is faster than that decode alone.
//!
//! `cargo bench --bench core` (full: 1M records over 100k twins, median of 3 runs);
//! `TWINFLOW_BENCH_RECORDS=20000 TWINFLOW_BENCH_TWINS=2000 cargo bench --bench core` for a smoke run.

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::{env, median};
use twinflow::pipeline::processor::{Input, Processor};
use twinflow::sim::{Fleet, FleetConfig};
use twinflow::store::Store;
use twinflow::topology::Topology;

fn main() {
    let records = env("TWINFLOW_BENCH_RECORDS", 1_000_000);
    let twins = env("TWINFLOW_BENCH_TWINS", 100_000);
    let runs = env("TWINFLOW_BENCH_RUNS", 3);
    let batch = 2000;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let topology = Arc::new(
        Topology::load(
            &root.join("topology/topics.toml"),
            &root.join("topology/vehicle.toml"),
        )
        .expect("topology"),
    );
    let config = FleetConfig {
        assets: twins,
        seed: 1,
        malformed: 0.0,
        start_ms: 1_790_000_000_000,
        interval_ms: 1000,
    };
    let mut fleet = Fleet::new(config, &topology.codec).expect("fleet");
    let data = fleet.take(records);
    let bytes: usize = data.iter().map(|(_, v)| v.len()).sum();

    let schema = apache_avro::Schema::parse_str(
        &std::fs::read_to_string(root.join("schemas/vehicle_telemetry.avsc")).unwrap(),
    )
    .unwrap();
    let (mut base, mut decode, mut core) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap();
        let t = Instant::now();
        for (_, v) in &data {
            std::hint::black_box(reader.read_value(&mut &v[..]).unwrap());
        }
        base.push(records as f64 / t.elapsed().as_secs_f64());

        let mut reading = twinflow::twin::Reading::default();
        let t = Instant::now();
        for (_, v) in &data {
            topology
                .codec
                .decode_reading(twinflow::codec::Format::Avro, v, &mut reading)
                .unwrap();
            std::hint::black_box(&reading);
        }
        decode.push(records as f64 / t.elapsed().as_secs_f64());

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut processor = Processor::new(topology.clone(), store.partition(0), twins.max(batch));
        let t = Instant::now();
        let mut updates = 0;
        for (i, chunk) in data.chunks(batch).enumerate() {
            let mut b = processor.batch();
            for (j, (k, v)) in chunk.iter().enumerate() {
                let input = Input {
                    key: Some(k),
                    payload: Some(v),
                    topic: "telemetry",
                    offset: (i * batch + j) as i64,
                    headers: None,
                };
                processor
                    .process(&input, &mut b, 1_790_000_000_000)
                    .unwrap();
            }
            updates += b.counts.updates();
            b.store
                .set_next_offset("telemetry", ((i + 1) * batch) as i64);
            store.partition(0).commit(b.store).unwrap();
        }
        core.push(records as f64 / t.elapsed().as_secs_f64());
        assert!(updates > 0);
    }
    let (base, decode, core) = (median(base), median(decode), median(core));
    println!(
        "core benchmark: {records} records ({} B avg) over {twins} twins, batches of {batch}, one thread, median of {runs}",
        bytes / records.max(1)
    );
    println!(
        "| path                                             | events/s   | vs apache-avro decode |"
    );
    println!(
        "|--------------------------------------------------|-----------:|----------------------:|"
    );
    println!("| apache-avro generic decode (baseline)            | {base:>10.0} | 1.00 |");
    println!(
        "| twinflow decode                                  | {decode:>10.0} | {:.2} |",
        decode / base
    );
    println!(
        "| twinflow decode→merge→rules→encode→RocksDB store | {core:>10.0} | {:.2} |",
        core / base
    );
}
