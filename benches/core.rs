//! Core throughput without Kafka: decode → validate → merge → rules → encode → store, on one
//! core, through the same `Processor` the partition workers run, with RocksDB on disk, for a
//! store of 100k and of 1M twins. A first round creates every twin (not timed); then the
//! measured readings update them, once with every twin cached in the processor (hot) and
//! once with no cache, so that every event reads its twin from RocksDB and writes it back.
//!
//! Baseline, measured in the same run on the same records: decoding them with the reference
//! `apache-avro` crate's generic reader (decode only, no merge, no store). Ratios > 1 mean the
//! whole twinflow path is faster than that decode alone.
//!
//! The hot path runs twice: with the shipped model, and with the same model without its
//! forecast rule (`LOW_BATTERY_PREDICTED`), so the forecast's cost is measured in the same run.
//!
//! Timers (offline, idle) with `TWINFLOW_BENCH_TIMER_TWINS` twins (default 1M): the cost of a
//! look at the deadline index when nothing is due, against a scan of every twin (what a
//! timer without an index would cost each second), and how fast due timers fire.
//!
//! Takeover with `TWINFLOW_BENCH_TAKEOVER_TWINS` twins (default 1M) in 12 partitions, all in
//! the fleet view: promoting every partition's twins from the view into the pipeline's store
//! (`PartitionStore::promote`, and a flush as the end mark), what a warm instance does
//! when it is assigned partitions, a thread per partition as the workers do; the baseline,
//! in the same run, is what a changelog restore writes to the store for the same twins
//! (each twin and its timer, batches of 10k without the log, one flush, a thread per
//! partition), without the reading and decoding that a restore also does.
//!
//! `cargo bench --bench core` (full: 1M measured readings, median of 3 runs); sizes from
//! `TWINFLOW_BENCH_RECORDS`, `TWINFLOW_BENCH_TWINS` (100k), `TWINFLOW_BENCH_TWINS_LARGE` (1M),
//! `TWINFLOW_BENCH_TIMER_TWINS` (1M), `TWINFLOW_BENCH_TAKEOVER_TWINS` (1M) and
//! `TWINFLOW_BENCH_RUNS`.

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::{env, median};
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::pipeline::{Input, Processor};
use twinflow::store::Store;
use twinflow::topology::Topology;

fn main() {
    let records = env("TWINFLOW_BENCH_RECORDS", 1_000_000);
    let sizes = [
        env("TWINFLOW_BENCH_TWINS", 100_000),
        env("TWINFLOW_BENCH_TWINS_LARGE", 1_000_000),
    ];
    let runs = env("TWINFLOW_BENCH_RUNS", 3);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let topology = support::vehicle_topology();
    // The same model without its forecast rule: what the forecast costs, in the same run.
    let mut unforecast = (*topology).clone();
    (unforecast.rules.rules).retain(|r| r.forecast.is_none());
    let unforecast = Arc::new(unforecast);
    let schema = apache_avro::Schema::parse_str(
        &std::fs::read_to_string(root.join("schemas/vehicle_telemetry.avsc")).unwrap(),
    )
    .unwrap();

    println!(
        "core benchmark: decode → validate → merge → rules → encode → RocksDB, one thread, batches of {BATCH}, \
         {records} measured readings after a first round that creates every twin, median of {runs}"
    );
    println!(
        "| path                                                     | twins     | events/s   | vs apache-avro decode | target     |"
    );
    println!(
        "|----------------------------------------------------------|----------:|-----------:|----------------------:|-----------:|"
    );
    for twins in sizes {
        let data = Fleet::new(fleet(twins, 1), &topology)
            .expect("fleet")
            .take(twins + records);
        let (create, measured) = data.split_at(twins);
        let (mut base, mut decode, mut hot, mut cold) = (vec![], vec![], vec![], vec![]);
        let mut hot_unforecast = vec![];
        for _ in 0..runs {
            let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
                .build()
                .unwrap();
            let t = Instant::now();
            for (_, v) in measured {
                std::hint::black_box(reader.read_value(&mut &v[..]).unwrap());
            }
            base.push(rate(measured.len(), t));

            let mut reading = twinflow::twin::Reading::default();
            let t = Instant::now();
            for (_, v) in measured {
                topology
                    .codec
                    .decode_reading(twinflow::codec::Format::Avro, v, &mut reading)
                    .unwrap();
                std::hint::black_box(&reading);
            }
            decode.push(rate(measured.len(), t));

            hot.push(full_path(&topology, create, measured, twins));
            hot_unforecast.push(full_path(&unforecast, create, measured, twins));
            cold.push(full_path(&topology, create, measured, 0));
        }
        let base = median(base);
        let row = |name: &str, rate: f64, target: &str| {
            println!(
                "| {name:<56} | {twins:>9} | {rate:>10.0} | {:>21.2} | {target:>10} |",
                rate / base
            );
        };
        row("apache-avro generic decode (baseline)", base, "");
        row("twinflow decode", median(decode), "");
        row(
            "full path, every twin cached (hot)",
            median(hot),
            "≥ 1000000",
        );
        row(
            "full path hot, without the forecast rule",
            median(hot_unforecast),
            "",
        );
        row(
            "full path, every event reads and writes RocksDB",
            median(cold),
            "≥ 300000",
        );
    }

    let timer_twins = env("TWINFLOW_BENCH_TIMER_TWINS", 1_000_000);
    let timers = timers(&topology, timer_twins, runs);
    println!();
    println!(
        "timers: {timer_twins} twins in one partition, each with a deadline (offline after 5 min), median of {runs}"
    );
    println!(
        "| operation                                        | figure          | vs scanning every twin |"
    );
    println!(
        "|--------------------------------------------------|----------------:|-----------------------:|"
    );
    println!(
        "| scan every twin, decode, check its deadline (baseline) | {:>9.1} ms | 1.00 |",
        timers.scan_ms
    );
    println!(
        "| look at the deadline index, nothing due          | {:>9.1} µs | {:.6} |",
        timers.look_us,
        timers.look_us / 1000.0 / timers.scan_ms
    );
    println!(
        "| fire due timers (offline: twin, changelog, alert) | {:>9.0} /s | |",
        timers.fire_rate
    );

    let takeover_twins = env("TWINFLOW_BENCH_TAKEOVER_TWINS", 1_000_000);
    let t = takeover(&topology, takeover_twins, runs);
    println!();
    println!(
        "takeover: {takeover_twins} twins in {PARTITIONS} partitions, all in the fleet view, a thread per partition, median of {runs}"
    );
    println!(
        "| operation                                              | twins/s    | seconds, all | vs the restore's writes | target |"
    );
    println!(
        "|--------------------------------------------------------|-----------:|-------------:|------------------------:|-------:|"
    );
    println!(
        "| a restore's store writes of the same twins (baseline)  | {:>10.0} | {:>12.3} | 1.00 | |",
        t.restore_rate,
        takeover_twins as f64 / t.restore_rate
    );
    println!(
        "| promote from the fleet view, then flush                | {:>10.0} | {:>12.3} | {:.2} | < 1 s for 1M |",
        t.promote_rate,
        takeover_twins as f64 / t.promote_rate,
        t.promote_rate / t.restore_rate
    );
}

/// Partitions of the takeover figures.
const PARTITIONS: i32 = 12;

struct TakeoverFigures {
    promote_rate: f64,
    restore_rate: f64,
}

/// `twins` real twins (one reading each, so each has a timer) in the fleet view over
/// [`PARTITIONS`] partitions; then every partition promoted, and the same twins written as a
/// restore writes them, each timed to its flush.
fn takeover(topology: &Arc<Topology>, twins: usize, runs: usize) -> TakeoverFigures {
    use twinflow::store::{Checkpoints, ViewPosition, ViewedTwin};
    let now = 1_790_000_000_000;
    let config = FleetConfig {
        assets: twins,
        seed: 4,
        malformed: 0.0,
        start_ms: now - 1000,
        interval_ms: 1000,
    };
    let data = Fleet::new(config, topology).expect("fleet").take(twins);
    let made = tempfile::tempdir().unwrap();
    let source = Store::open(made.path()).unwrap();
    let mut processor = Processor::new(topology.clone(), source.partition(0), 10_000);
    process_all(&mut processor, &source, &data, 0, now);
    let mut all: Vec<(String, Vec<u8>, Option<i64>)> = Vec::with_capacity(twins);
    let mut after = None;
    loop {
        let page = source.partition(0).scan(after.as_deref(), 10_000).unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (id, bytes) in page {
            let twin = topology.codec.decode_twin(&bytes).unwrap();
            all.push((id, bytes, topology.model.deadline(&twin)));
        }
    }
    let partition = |i: usize| i as i32 % PARTITIONS;
    let (mut promote, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // The fleet view, as its thread writes it: batches of changes with positions.
        let mut checkpoints = vec![Checkpoints::default(); PARTITIONS as usize];
        let mut next = vec![0i64; PARTITIONS as usize];
        for (c, chunk) in all.chunks(BATCH).enumerate() {
            let changes: Vec<ViewedTwin> = chunk
                .iter()
                .enumerate()
                .map(|(j, (id, twin, deadline))| {
                    let p = partition(c * BATCH + j) as usize;
                    next[p] += 1;
                    checkpoints[p].advance(next[p], Some(next[p] - 1));
                    ViewedTwin {
                        asset_id: id.clone(),
                        partition: p as i32,
                        twin: Some(twin.clone()),
                        timer: *deadline,
                    }
                })
                .collect();
            let positions: Vec<ViewPosition> = (0..PARTITIONS)
                .map(|p| ViewPosition {
                    partition: p,
                    next: next[p as usize],
                    checkpoints: Some(checkpoints[p as usize].clone()),
                })
                .collect();
            let versions = vec![None; changes.len()];
            store
                .view()
                .write(&changes, &versions, 0, &positions)
                .unwrap();
        }
        store.flush().unwrap();

        // A thread per partition, as the workers of the partitions a rebalance moves each
        // restore on a blocking thread of their own.
        let t = Instant::now();
        let promoted: u64 = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..PARTITIONS)
                .map(|p| {
                    let store = &store;
                    scope.spawn(move || {
                        let revert =
                            |_: std::ops::Range<i64>, _: &dyn Fn(&str, u64) -> _| unreachable!();
                        let done = store.partition(p).promote(i64::MAX, now, None, revert);
                        done.unwrap().expect("promoted").twins
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        store.flush().unwrap();
        promote.push(promoted as f64 / t.elapsed().as_secs_f64());
        assert_eq!(promoted as usize, all.len(), "every twin promoted");

        let t = Instant::now();
        std::thread::scope(|scope| {
            for p in 0..PARTITIONS {
                let (store, all, next) = (&store, &all, &next);
                scope.spawn(move || {
                    let target = store.partition(100 + p);
                    let mut batch = target.batch();
                    let mine = all.iter().enumerate().filter(|(i, _)| partition(*i) == p);
                    for (n, (_, (id, twin, deadline))) in mine.enumerate() {
                        batch.put_twin(id, twin);
                        if let Some(at) = deadline {
                            batch.put_deadline(*at, id);
                        }
                        if (n + 1) % 10_000 == 0 {
                            target
                                .commit_unlogged(std::mem::replace(&mut batch, target.batch()))
                                .unwrap();
                        }
                    }
                    batch.set_changelog_next(next[p as usize]);
                    target.commit_unlogged(batch).unwrap();
                });
            }
        });
        store.flush().unwrap();
        restore.push(all.len() as f64 / t.elapsed().as_secs_f64());
    }
    TakeoverFigures {
        promote_rate: median(promote),
        restore_rate: median(restore),
    }
}

/// Records in a batch between two store commits, as a worker's default batch.
const BATCH: usize = 2000;

/// The simulated fleet of `assets` vehicles.
fn fleet(assets: usize, seed: u64) -> FleetConfig {
    FleetConfig {
        assets,
        seed,
        malformed: 0.0,
        start_ms: 1_790_000_000_000,
        interval_ms: 1000,
    }
}

fn rate(records: usize, since: Instant) -> f64 {
    records as f64 / since.elapsed().as_secs_f64()
}

/// Events/s of `measured` through the whole record path into a fresh store that `create`
/// filled first, keeping up to `cache` decoded twins (0: every event reads the store).
fn full_path(
    topology: &Arc<Topology>,
    create: &[(Vec<u8>, Vec<u8>)],
    measured: &[(Vec<u8>, Vec<u8>)],
    cache: usize,
) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut processor = Processor::new(topology.clone(), store.partition(0), cache);
    let now = 1_790_000_000_000 + 3_600_000;
    let created = process_all(&mut processor, &store, create, 0, now);
    assert!(created > 0);
    let t = Instant::now();
    let updates = process_all(&mut processor, &store, measured, create.len(), now);
    let rate = rate(measured.len(), t);
    assert!(updates > 0);
    rate
}

/// Runs `data` (input offsets from `first` on) through `processor` at processing time `now`,
/// committing every `BATCH` records to `store` as a worker would. Returns the number of twin
/// updates.
fn process_all(
    processor: &mut Processor,
    store: &Store,
    data: &[(Vec<u8>, Vec<u8>)],
    first: usize,
    now: i64,
) -> u64 {
    let batch = BATCH;
    let mut updates = 0;
    for (i, chunk) in data.chunks(batch).enumerate() {
        let mut b = processor.batch(true);
        for (j, (k, v)) in chunk.iter().enumerate() {
            let input = Input {
                key: Some(k),
                payload: Some(v),
                topic: "telemetry",
                offset: (first + i * batch + j) as i64,
                headers: None,
            };
            processor.process(&input, &mut b, now).unwrap();
        }
        updates += b.counts.updates();
        b.store
            .set_next_offset("telemetry", (first + i * batch + chunk.len()) as i64);
        store.partition(0).commit(b.store).unwrap();
    }
    updates
}

struct TimerFigures {
    scan_ms: f64,
    look_us: f64,
    fire_rate: f64,
}

/// One reading per twin at `now`, so every twin has an offline deadline `now + 5 min`; then
/// looks at the index when nothing is due, a full scan for comparison, and firing them all.
fn timers(topology: &Arc<Topology>, twins: usize, runs: usize) -> TimerFigures {
    let now = 1_790_000_000_000;
    let config = FleetConfig {
        assets: twins,
        seed: 2,
        malformed: 0.0,
        start_ms: now - 1000,
        interval_ms: 1000,
    };
    let data = Fleet::new(config, &topology).expect("fleet").take(twins);
    let offline_after = topology
        .model
        .time
        .offline_after
        .expect("the vehicle model has it");
    let (mut scan, mut look, mut fire) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut processor = Processor::new(topology.clone(), store.partition(0), 10_000);
        process_all(&mut processor, &store, &data, 0, now);

        let t = Instant::now();
        let mut due = 0;
        let mut after = None;
        loop {
            let page = store.partition(0).scan(after.as_deref(), 10_000).unwrap();
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (_, bytes) in &page {
                let twin = topology.codec.decode_twin(bytes).unwrap();
                due += usize::from(topology.model.deadline(&twin).is_some_and(|d| d <= now));
            }
        }
        scan.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(due, 0);

        let looks = 1000;
        let t = Instant::now();
        for i in 0..looks {
            let mut b = processor.batch(true);
            let fired = processor
                .fire_timers(&mut b, now + i, twins as i64, 2000)
                .unwrap();
            assert_eq!(fired, 0);
        }
        look.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(looks as u32));

        let t = Instant::now();
        let mut fired = 0;
        loop {
            let mut b = processor.batch(true);
            let n = processor
                .fire_timers(&mut b, now + offline_after, twins as i64, 2000)
                .unwrap();
            store.partition(0).commit(b.store).unwrap();
            if n == 0 {
                break;
            }
            fired += n;
        }
        fire.push(fired as f64 / t.elapsed().as_secs_f64());
        let stored = store.partition(0).count().unwrap();
        assert_eq!(fired, stored, "every twin turned offline once");
    }
    TimerFigures {
        scan_ms: median(scan),
        look_us: median(look),
        fire_rate: median(fire),
    }
}
