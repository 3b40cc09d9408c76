//! Memory per twin: the resident set of a process that holds a partition's state (the
//! `Processor` the workers run, over a RocksDB store on disk, with the store's default
//! options) after one reading per twin has created `N` twins.
//!
//! Each figure comes from a fresh child process (this binary, re-run with `--child`), so one
//! measurement's allocations cannot flatter another's:
//! Figures are the resident set of a child with an empty store plus what processing added
//! to it (the simulator's own vehicles, allocated before, are left out):
//! - **fixed**: the same twins with no decoded twin kept in memory (cache 0), so what remains
//!   is RocksDB's memtables and block cache, the allocator, and the code;
//! - **all hot**: every twin decoded and cached; bytes per hot twin = (hot − fixed) / N;
//! - **10M twins** with the default cache (100k per partition): that it runs, its time and
//!   its resident set.
//!
//! Kafka clients are not part of it: librdkafka's fetch queues are bounded by
//! `queued.max.messages.kbytes` and its producer queue by `queue.buffering.max.kbytes`.
//!
//! `cargo bench --bench memory`; `TWINFLOW_BENCH_MEMORY_TWINS=100000,1000000` and
//! `TWINFLOW_BENCH_MEMORY_LARGE=10000000` set the sizes (0 leaves the large one out).

mod support;

use std::process::Command;
use std::time::Instant;

use support::env;
use twinflow::config::ProcessingConfig;
use twinflow::demo::sim::{Fleet, FleetConfig};
use twinflow::pipeline::{Input, Processor};
use twinflow::store::Store;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let twins = args[i + 1].parse().expect("a twin count");
        let cache = args[i + 2].parse().expect("a cache size");
        return child(twins, cache);
    }
    let sizes: Vec<usize> = std::env::var("TWINFLOW_BENCH_MEMORY_TWINS")
        .unwrap_or_else(|_| "100000,1000000".to_owned())
        .split(',')
        .map(|s| s.trim().parse().expect("a twin count"))
        .collect();
    let large = env("TWINFLOW_BENCH_MEMORY_LARGE", 10_000_000);
    let default_cache = ProcessingConfig::default().twin_cache_per_partition;

    let empty = measure(0, 0);
    println!(
        "memory benchmark: resident set of a child process holding one partition's state (Processor over RocksDB on disk, default store options), \
         after one reading per twin; an empty store: {:.1} MB",
        mb(empty.rss)
    );
    println!(
        "| twins      | fixed: no twin cached | all twins cached | bytes per hot twin | target            |"
    );
    println!(
        "|-----------:|----------------------:|-----------------:|-------------------:|------------------:|"
    );
    for twins in sizes {
        let fixed = empty.rss + measure(twins, 0).state();
        let hot = empty.rss + measure(twins, twins).state();
        println!(
            "| {twins:>10} | {:>18.1} MB | {:>13.1} MB | {:>18.0} | ≤ 128 MB + 512 B/twin |",
            mb(fixed),
            mb(hot),
            hot.saturating_sub(fixed) as f64 / twins as f64
        );
    }
    if large > 0 {
        let run = measure(large, default_cache);
        println!(
            "{large} twins, default cache ({default_cache} twins per partition): ran in {:.0} s ({:.0} twins/s created), resident set {:.1} MB (peak {:.1} MB), store on disk {:.0} MB",
            run.seconds,
            large as f64 / run.seconds,
            mb(empty.rss + run.state()),
            mb(empty.rss + run.peak.saturating_sub(run.base)),
            mb(run.disk)
        );
    }
}

/// What a child reports.
struct Figures {
    /// Resident set at the end.
    rss: u64,
    /// Resident set before the first reading (the simulator's vehicles allocated).
    base: u64,
    peak: u64,
    seconds: f64,
    disk: u64,
}

impl Figures {
    /// What processing added to the resident set.
    fn state(&self) -> u64 {
        self.rss.saturating_sub(self.base)
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Runs a child for `twins` twins with `cache` cached and reads its report.
fn measure(twins: usize, cache: usize) -> Figures {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .args(["--child", &twins.to_string(), &cache.to_string()])
        .output()
        .expect("the child runs");
    assert!(
        out.status.success(),
        "the child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8(out.stdout).expect("UTF-8");
    let field = |name: &str| -> f64 {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name} in {report}"))
            .parse()
            .expect("a number")
    };
    Figures {
        rss: field("rss") as u64,
        base: field("base") as u64,
        peak: field("peak") as u64,
        seconds: field("seconds"),
        disk: field("disk") as u64,
    }
}

/// The child: creates `twins` twins, keeping up to `cache` decoded, and prints its figures.
fn child(twins: usize, cache: usize) {
    let topology = support::vehicle_topology();
    let config = FleetConfig {
        assets: twins.max(1),
        seed: 3,
        malformed: 0.0,
        start_ms: 1_790_000_000_000,
        interval_ms: 1000,
    };
    let mut fleet = Fleet::new(config, &topology).expect("fleet");
    let dir = tempfile::tempdir().expect("a store directory");
    let store = Store::open(dir.path()).expect("the store");
    let mut processor = Processor::new(topology.clone(), store.partition(0), cache);
    // The simulator's own state (every vehicle's route) is not twinflow's: measured before.
    let base = resident()[0];
    let now = 1_790_000_000_000 + 60_000;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let batch_size = 2000;
    let mut done = 0;
    while done < twins {
        let mut batch = processor.batch(true);
        let n = batch_size.min(twins - done);
        for i in 0..n {
            fleet.next_record(&mut key, &mut value);
            let input = Input {
                key: Some(&key),
                payload: Some(&value),
                topic: "telemetry",
                offset: (done + i) as i64,
                headers: None,
            };
            processor
                .process(&input, &mut batch, now)
                .expect("processed");
        }
        done += n;
        batch.store.set_next_offset("telemetry", done as i64);
        store.partition(0).commit(batch.store).expect("committed");
    }
    // The cache is trimmed when the next batch starts.
    drop(processor.batch(true));
    let seconds = started.elapsed().as_secs_f64();
    let [rss, peak] = resident();
    let disk: u64 = walk(dir.path());
    std::hint::black_box(&processor);
    println!("rss={rss} peak={peak} base={base} seconds={seconds} disk={disk}");
}

/// This process's resident set and its peak, in bytes.
fn resident() -> [u64; 2] {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    [kb("VmRSS:"), kb("VmHWM:")]
}

/// Bytes of the files under `dir`.
fn walk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => walk(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
