//! `twinflow demo`: the whole system in one process, with no Kafka to install, and the parts
//! only the demo, the simulator command, the tests and the benchmarks use: the embedded
//! cluster ([`embedded`]), the fleet simulator ([`sim`]) and the doors its devices send
//! through ([`sink`]: Kafka, HTTP, MQTT).
//!
//! `twinflow demo` runs, in one process, an embedded Kafka-protocol cluster, the topics of
//! the topology, the fleet simulator (for any model) and the pipeline, with a progress line
//! every two seconds. The fleet's recent past comes
//! first, as a backlog sent as fast as it goes, so alerts that need a breach to last (a
//! rule's `for`) show within seconds; then the fleet is live at `--rate`. With `--mqtt` a
//! bridge to that MQTT broker runs in the process too; `--via http|mqtt` sends the devices'
//! readings through `POST /ingest` or that broker instead of straight to Kafka.

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
    Config, HttpConfig, KafkaConfig, ProcessingConfig, Secret, StoreConfig, TopologyConfig,
};
pub mod embedded;
pub mod sim;
pub mod sink;

use crate::metrics::BridgeMetrics;
use crate::topology::Topology;
use embedded::EmbeddedKafka;
use rand::SeedableRng;
use sim::{Fleet, FleetConfig, Obey, Publish};
use sink::Via;

/// The demo's write credential unless `--write-token` sets one.
pub const DEMO_WRITE_TOKEN: &str = "demo-write-token";

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
    /// The write credential (named `demo`) for desired-state writes through the API. The
    /// endpoint listens on loopback unless `--http` says otherwise: set your own then.
    #[arg(long, env = "TWINFLOW_DEMO_WRITE_TOKEN", default_value = DEMO_WRITE_TOKEN)]
    pub write_token: String,
    /// How the simulated devices send their readings: to Kafka, to the HTTP ingestion
    /// endpoint (`POST /ingest`), or to the MQTT broker of `--mqtt`.
    #[arg(long, value_enum, default_value = "kafka")]
    pub via: Door,
    /// An MQTT broker (`mqtt://host:port`) to bridge: devices publishing there reach their
    /// twins and get their commands there (a `twinflow bridge` inside the demo).
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Topology files.
    #[command(flatten)]
    pub topology: TopologyConfig,
}

/// The door simulated devices send readings through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Door {
    /// Straight to the telemetry topic.
    Kafka,
    /// `POST /ingest`.
    Http,
    /// An MQTT broker (`--mqtt`), through the bridge.
    Mqtt,
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
            writers: [("demo".to_owned(), Secret(opts.write_token.clone()))].into(),
            ..HttpConfig::default()
        },
        schema_registry: None,
        ingest: Default::default(),
        view: Default::default(),
    };
    if opts.via == Door::Mqtt && opts.mqtt.is_none() {
        anyhow::bail!("--via mqtt needs the broker: --mqtt mqtt://host:port");
    }
    let mut config = config;
    if let Some(url) = &opts.mqtt {
        let section = format!(
            "url = {}\nclient_id = \"twinflow-demo-bridge\"",
            toml::Value::from(url.as_str())
        );
        config.ingest.mqtt = Some(toml::from_str(&section).context("--mqtt")?);
    }
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

    // The bridge, subscribed before any device publishes.
    let bridge = match &opts.mqtt {
        None => None,
        Some(url) => {
            let metrics = BridgeMetrics::new(prometheus::Registry::new());
            let stop = CancellationToken::new();
            let (c, m, s) = (config.clone(), metrics.clone(), stop.clone());
            let task = tokio::spawn(async move { crate::bridge::run(&c, m, s).await });
            let deadline = Instant::now() + Duration::from_secs(10);
            while metrics.connected.get() == 0 && !task.is_finished() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if metrics.connected.get() == 0 {
                tracing::warn!(%url, "The bridge is not subscribed to the MQTT broker yet.");
            }
            println!(
                "  MQTT:       devices on {url} publish to assets/<id>/telemetry, get commands on assets/<id>/commands"
            );
            Some((stop, task))
        }
    };
    let via = match opts.via {
        Door::Kafka => Via::Kafka,
        Door::Http => Via::Http {
            url: format!("http://{addr}"),
            token: opts.write_token.clone(),
            runtime: tokio::runtime::Handle::current(),
        },
        Door::Mqtt => Via::Mqtt {
            url: opts.mqtt.clone().unwrap_or_default(),
        },
    };
    let publish = Publish {
        via,
        client: config.kafka.admin_config(),
        topic: topology.topics.telemetry.name.clone(),
        rate: opts.rate,
        burst: (backlog_ms as u64).saturating_mul(opts.rate) / 1000,
        count: None,
        duration: None,
        obey: Some(Obey {
            commands: topology.topics.commands.name.clone(),
            acks: topology.topics.acks.name.clone(),
        }),
    };
    let targets = DesiredTargets::of(&topology, &fleet, opts.assets);
    let simulator = {
        let stop = stop_sim.clone();
        let topology = topology.clone();
        std::thread::spawn(move || sim::publish(fleet, &publish, &topology, &stop))
    };
    let writer: rdkafka::producer::FutureProducer = config
        .kafka
        .admin_config()
        .create()
        .context("creating the demo's desired-state writer")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);

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
                // Now and then an operator changes a setpoint.
                if let Some((asset, write)) = targets.as_ref().and_then(|t| t.pick(&mut rng)) {
                    let record = rdkafka::producer::FutureRecord::to(&topology.topics.desired.name)
                        .key(asset.as_bytes())
                        .payload(write.as_bytes());
                    if let Err((error, _)) = writer.send(record, Duration::from_secs(5)).await {
                        tracing::warn!(%error, "The demo's desired write was not sent.");
                    }
                }
                let consumed = metrics.total("twinflow_records_consumed_total");
                let rate = (consumed - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), consumed);
                let commands = |state: &str| {
                    metrics.counter("twinflow_command_events_total", &[("state", state)])
                };
                println!(
                    "[{:>4}s] twins {:>6} | {:>7.0} events/s | alerts raised {:>5} cleared {:>5} | dead-lettered {:>5} | skipped {:>4} | commands issued {:>4} converged {:>4} rejected {:>3} timed out {:>3}",
                    started.elapsed().as_secs(),
                    metrics.total("twinflow_twins_created_total"),
                    rate,
                    metrics.counter("twinflow_alerts_emitted_total", &[("state", "RAISED")]),
                    metrics.counter("twinflow_alerts_emitted_total", &[("state", "CLEARED")]),
                    metrics.total("twinflow_records_dead_lettered_total"),
                    metrics.total("twinflow_records_skipped_total"),
                    commands("ISSUED"),
                    commands("CONVERGED"),
                    commands("REJECTED"),
                    commands("TIMED_OUT"),
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
    if let Some((stop, task)) = bridge {
        stop.cancel();
        task.await.context("joining the bridge")??;
    }
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
    drop(writer);
    if let Some((p50, p99, n)) = convergence(&metrics) {
        println!(
            "twinflow demo: {n} commands converged, issue to convergence p50 {p50:.1}s, p99 {p99:.1}s (histogram buckets)"
        );
    }
    drop(kafka);
    Ok(())
}

/// p50 and p99 (upper bucket bounds) of `twinflow_command_convergence_seconds`, with the
/// number of observations, if any.
fn convergence(metrics: &crate::metrics::Metrics) -> Option<(f64, f64, u64)> {
    let families = metrics.registry().gather();
    let h = families
        .iter()
        .find(|f| f.name() == "twinflow_command_convergence_seconds")?
        .get_metric()
        .first()?
        .get_histogram()
        .clone();
    let n = h.get_sample_count();
    let quantile = |q: f64| {
        let want = (q * n as f64).ceil() as u64;
        h.get_bucket()
            .iter()
            .find(|b| b.cumulative_count() >= want)
            .map_or(f64::INFINITY, |b| b.upper_bound())
    };
    (n > 0).then(|| (quantile(0.5), quantile(0.99), n))
}

/// Which assets the demo's operator sets desired values on, and to what: the model's first
/// writable property, within its range (for the vehicle model, a reefer's cargo
/// temperature between 2 and 6 °C).
struct DesiredTargets {
    assets: Vec<String>,
    property: String,
    kind: crate::twin::PropKind,
    range: (f64, f64),
}

impl DesiredTargets {
    fn of(topology: &Topology, fleet: &Fleet, assets: usize) -> Option<DesiredTargets> {
        let def = topology.model.properties.iter().find(|p| p.writable)?;
        let ids: Vec<String> = (0..assets).map(|i| fleet.asset_id(i).to_owned()).collect();
        let reefers: Vec<String> = ids
            .iter()
            .filter(|id| id.starts_with("reefer"))
            .cloned()
            .collect();
        let (assets, range) = if def.name == "temperature_c" && !reefers.is_empty() {
            (reefers, (2.0, 6.0))
        } else {
            let (low, high) = (def.min.unwrap_or(0.0), def.max.unwrap_or(100.0));
            (ids, (low + 0.3 * (high - low), low + 0.7 * (high - low)))
        };
        Some(DesiredTargets {
            assets,
            property: def.name.clone(),
            kind: def.kind,
            range,
        })
    }

    /// A random asset and a write of a random value, as JSON.
    fn pick(&self, rng: &mut impl rand::Rng) -> Option<(String, String)> {
        use crate::twin::PropKind;
        let asset = self
            .assets
            .get(rng.gen_range(0..self.assets.len()))?
            .clone();
        let v = rng.gen_range(self.range.0..=self.range.1);
        let value = match self.kind {
            PropKind::Bool => serde_json::json!(rng.gen_bool(0.5)),
            PropKind::Int | PropKind::Long => serde_json::json!(v.round() as i64),
            PropKind::Str => return None,
            _ => serde_json::json!((v * 10.0).round() / 10.0),
        };
        let write = serde_json::json!({ "desired": { &self.property: value }, "by": "demo" });
        Some((asset, write.to_string()))
    }
}
