//! `twinflow demo`: the whole system in one process, with no Kafka to install, and the parts
//! only the demo, the simulator command, the tests and the benchmarks use: the embedded
//! cluster ([`embedded`]) and the fleet simulator ([`sim`]).
//!
//! `twinflow demo` runs, in one process, an embedded Kafka-protocol cluster, the topics of
//! the topology, the fleet simulator (for any model) and the pipeline, with a progress line
//! every two seconds. The fleet's recent past comes
//! first, as a backlog sent as fast as it goes, so alerts that need a breach to last (a
//! rule's `for`) show within seconds; then the fleet is live at `--rate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::{Clock, SystemClock};
use crate::config::{
    Config, HttpConfig, KafkaConfig, ProcessingConfig, StoreConfig, TopologyConfig,
};
pub mod embedded;
pub mod sim;

use crate::topology::Topology;
use embedded::EmbeddedKafka;
use sim::{Fleet, FleetConfig, Publish};

/// What the demo runs (the options of `twinflow demo`).
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Stop after this long (e.g. 30s, 5m); runs until Ctrl-C without it.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Simulated assets (vehicles, or machines of another model).
    #[arg(long, default_value_t = 2000)]
    pub assets: usize,
    /// How much of the fleet's past arrives first, as a backlog (e.g. 1m; 0s for none).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    pub backlog: Duration,
    /// Readings per second.
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Simulator seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction of malformed readings.
    #[arg(long, default_value_t = 0.005)]
    pub malformed: f64,
    /// HTTP endpoint.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// Keep the store here instead of a temporary directory.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Topology files.
    #[command(flatten)]
    pub topology: TopologyConfig,
}

/// Runs the demo until `shutdown` or the duration.
///
/// # Errors
/// When any part fails to start, or the pipeline fails.
pub async fn run(opts: DemoOptions, shutdown: CancellationToken) -> Result<()> {
    let topology = Topology::load(&opts.topology)?;
    let kafka = EmbeddedKafka::start(1)?;
    for spec in topology.topics.all() {
        kafka.create_topic(&spec.name, spec.partitions)?;
    }
    let temp = tempfile::tempdir().context("creating a state directory")?;
    let state = opts
        .state_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let mut consumer = std::collections::BTreeMap::new();
    consumer.insert("fetch.wait.max.ms".to_owned(), "10".to_owned());
    consumer.insert("session.timeout.ms".to_owned(), "6000".to_owned());
    let config = Config {
        kafka: KafkaConfig {
            bootstrap_servers: kafka.bootstrap_servers(),
            group_id: "twinflow-demo".into(),
            librdkafka: Default::default(),
            consumer,
            producer: Default::default(),
        },
        topology: opts.topology.clone(),
        store: StoreConfig { path: state },
        processing: ProcessingConfig::default(),
        http: HttpConfig {
            listen: opts.http,
            token: None,
        },
        schema_registry: None,
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let app = App::build(&config)?;
    let metrics = app.metrics();
    let addr = app.http_addr();
    println!(
        "twinflow demo: embedded Kafka at {}",
        kafka.bootstrap_servers()
    );
    let stop_sim = Arc::new(AtomicBool::new(false));
    let now = SystemClock.now_ms();
    let backlog_ms = i64::try_from(opts.backlog.as_millis())
        .ok()
        .filter(|b| *b < now)
        .with_context(|| {
            format!(
                "--backlog {} reaches back before 1970",
                humantime::format_duration(opts.backlog)
            )
        })?;
    let fleet = Fleet::new(
        FleetConfig {
            assets: opts.assets,
            seed: opts.seed,
            malformed: opts.malformed,
            start_ms: now - backlog_ms,
            interval_ms: ((opts.assets as u64 * 1000) / opts.rate.max(1)).max(1) as i64,
        },
        &topology,
    )?;
    println!(
        "  {} assets of {}, {} readings/s after a backlog of {}, {:.1}% malformed, seed {}",
        opts.assets,
        opts.topology.model.display(),
        opts.rate,
        humantime::format_duration(opts.backlog),
        opts.malformed * 100.0,
        opts.seed
    );
    println!("  fleet page: http://{addr}/   (live map, statuses and alerts)");
    println!(
        "  twins:      curl http://{addr}/twins?limit=5   ·   curl http://{addr}/twins/{}",
        fleet.asset_id(opts.assets.min(4) - 1)
    );
    println!("  alerts:     curl http://{addr}/alerts   ·   metrics: curl http://{addr}/metrics");
    println!(
        "  stop with Ctrl-C{}",
        opts.duration.map_or(String::new(), |d| format!(
            " (or after {})",
            humantime::format_duration(d)
        ))
    );

    let publish = Publish {
        client: config.kafka.admin_config(),
        topic: topology.topics.telemetry.name.clone(),
        rate: opts.rate,
        burst: (backlog_ms as u64).saturating_mul(opts.rate) / 1000,
        count: None,
        duration: None,
    };
    let simulator = {
        let stop = stop_sim.clone();
        std::thread::spawn(move || sim::publish(fleet, &publish, &stop))
    };

    let app_stop = CancellationToken::new();
    let pipeline = tokio::spawn(app.run(app_stop.clone()));
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    let mut last = (Instant::now(), 0u64);
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut deadline => break,
            _ = ticker.tick() => {
                let consumed = metrics.total("twinflow_records_consumed_total");
                let rate = (consumed - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), consumed);
                println!(
                    "[{:>4}s] twins {:>6} | {:>7.0} events/s | alerts raised {:>5} cleared {:>5} | dead-lettered {:>5} | skipped {:>4}",
                    started.elapsed().as_secs(),
                    metrics.total("twinflow_twins_created_total"),
                    rate,
                    metrics.counter("twinflow_alerts_emitted_total", &[("state", "RAISED")]),
                    metrics.counter("twinflow_alerts_emitted_total", &[("state", "CLEARED")]),
                    metrics.total("twinflow_records_dead_lettered_total"),
                    metrics.total("twinflow_records_skipped_total"),
                );
            }
        }
        if pipeline.is_finished() {
            break;
        }
    }
    stop_sim.store(true, Ordering::SeqCst);
    let sent = tokio::task::spawn_blocking(move || simulator.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the simulator panicked"))??;
    app_stop.cancel();
    pipeline.await.context("joining the pipeline")??;
    let consumed = metrics.total("twinflow_records_consumed_total");
    println!(
        "twinflow demo: sent {} readings ({} malformed), processed {} in {:.1}s ({:.0} events/s on average)",
        sent.sent,
        sent.malformed,
        consumed,
        started.elapsed().as_secs_f64(),
        consumed as f64 / started.elapsed().as_secs_f64()
    );
    drop(kafka);
    Ok(())
}
