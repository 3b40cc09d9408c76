//! The command line: `run`, `bridge`, `demo`, `simulate`, `export`, `backtest` and
//! `topology describe|apply`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, TopologyConfig};
use crate::demo::sim::{self, Fleet, FleetConfig, Publish};
use crate::demo::{self, DemoOptions};
use crate::kafka::apply_topology;
use crate::topology::Topology;

/// twinflow keeps a live digital twin of every asset on Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TWINFLOW_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipeline against real brokers.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Bridge devices on an MQTT broker to Kafka (`[ingest.mqtt]`): readings and command
    /// acknowledgements in, commands out.
    Bridge {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run everything in one process on an embedded Kafka-protocol cluster.
    Demo(DemoOptions),
    /// Write simulated fleet telemetry to real brokers (Kafka, or an instance's HTTP
    /// ingestion, or an MQTT broker).
    Simulate {
        /// Bootstrap servers.
        #[arg(long)]
        brokers: Option<String>,
        /// Telemetry topic.
        #[arg(long, default_value = "telemetry")]
        topic: String,
        /// Simulated vehicles.
        #[arg(long, default_value_t = 1000)]
        assets: usize,
        /// Readings per second; 0 for as fast as possible.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Stop after this many readings.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Seed; the same seed and start give the same records.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fraction of malformed readings.
        #[arg(long, default_value_t = 0.0)]
        malformed: f64,
        /// Event time of the first reading (RFC 3339); now by default.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        start: Option<std::time::SystemTime>,
        /// Simulated time between two readings of one vehicle; by default, paced by the rate.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Extra librdkafka producer properties, `key=value`.
        #[arg(long = "property", short = 'X')]
        properties: Vec<String>,
        /// How the devices send: to Kafka (`--brokers`), to an instance's `POST /ingest`
        /// (`--http`, `--token`), or to an MQTT broker (`--mqtt`) that a bridge carries.
        #[arg(long, value_enum, default_value = "kafka")]
        via: crate::demo::Door,
        /// The instance for `--via http`, e.g. `http://127.0.0.1:8080`.
        #[arg(long)]
        http: Option<String>,
        /// A write credential for `--via http`.
        #[arg(long, env = "TWINFLOW_SIMULATE_TOKEN")]
        token: Option<String>,
        /// The MQTT broker for `--via mqtt`, e.g. `mqtt://127.0.0.1:1883`.
        #[arg(long)]
        mqtt: Option<String>,
        /// Topology files.
        #[command(flatten)]
        topology: TopologyConfig,
    },
    /// Export the twin versions of a time window from the history topic, for training:
    /// Parquet files of twin versions (by date) and of alerts.
    Export {
        /// Configuration file (TOML): the brokers and topology paths.
        #[arg(long, short)]
        config: PathBuf,
        /// Versions made at or after this time (RFC 3339 or epoch ms)...
        #[arg(long, value_parser = parse_time)]
        from: i64,
        /// ...and before this one.
        #[arg(long, value_parser = parse_time)]
        to: i64,
        /// Output format.
        #[arg(long, value_enum, default_value = "parquet")]
        format: ExportFormat,
        /// An empty or new directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay a time window of the telemetry topic through the live model and a candidate,
    /// with a consumer of its own and no writes: per rule, raises, clears, time active and
    /// flaps under each, and the assets whose alerts differ.
    Backtest {
        /// Configuration file (TOML): the brokers, the topics and the live model.
        #[arg(long, short)]
        config: PathBuf,
        /// The candidate model file (same telemetry schema as the live one).
        #[arg(long)]
        model: PathBuf,
        /// Readings that arrived at or after this time (RFC 3339 or epoch ms)...
        #[arg(long, value_parser = parse_time)]
        from: i64,
        /// ...and before this one.
        #[arg(long, value_parser = parse_time)]
        to: i64,
        /// A raise this soon after a clear of the same rule and asset counts as a flap.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
        flap_within: Duration,
        /// Print the report as JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Show or create the topics.
    Topology {
        /// What to do with it.
        #[command(subcommand)]
        action: TopologyAction,
    },
}

/// Formats `export` writes.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportFormat {
    /// Apache Parquet (Snappy).
    Parquet,
}

fn parse_time(text: &str) -> std::result::Result<i64, String> {
    crate::codec::parse_time(text)
        .ok_or_else(|| format!("'{text}' is neither RFC 3339 nor epoch milliseconds"))
}

/// `topology` subcommands.
#[derive(Subcommand, Debug)]
pub enum TopologyAction {
    /// Print the processing graph and the topics.
    Describe {
        /// Topology files.
        #[command(flatten)]
        topology: TopologyConfig,
    },
    /// Create missing topics with their configs; report existing ones that differ.
    Apply {
        /// Configuration file (TOML): the brokers and topology paths.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// How long `demo` and `simulate` may take to stop cleanly.
const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(30);

/// Cancels the returned token on the first SIGINT or SIGTERM; exits at once (130) on the
/// second, or (1) when the stop takes longer than `timeout` after the token was cancelled,
/// by a signal or by the instance itself after a fatal error.
pub fn shutdown_on_signals(timeout: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n > 0 {
                tracing::error!("Second signal: exiting at once, without a clean stop.");
                eprintln!("twinflow: second signal: exiting at once.");
                std::process::exit(130);
            }
            t.cancel();
        }
    });
    let t = token.clone();
    tokio::spawn(async move {
        t.cancelled().await;
        // A plain thread: the runtime may be what is stuck.
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            tracing::error!(
                timeout = %humantime::format_duration(timeout),
                "The stop did not finish within processing.shutdown_timeout; exiting without it. Uncommitted work is replayed on the next start."
            );
            eprintln!(
                "twinflow: the stop did not finish within {}; exiting.",
                humantime::format_duration(timeout)
            );
            std::process::exit(1);
        });
    });
    token
}

impl Cli {
    /// Runs the command.
    ///
    /// # Errors
    /// Whatever stopped it, with context.
    pub async fn run(self) -> Result<()> {
        match self.command {
            Command::Run { config } => {
                let config = Config::load(&config)?;
                let app = App::build(&config)?;
                tracing::info!(http = %app.http_addr(), "twinflow running.");
                app.run(shutdown_on_signals(config.processing.shutdown_timeout))
                    .await
            }
            Command::Bridge { config } => {
                let config = Config::load(&config)?;
                let metrics = crate::metrics::BridgeMetrics::new(prometheus::Registry::new());
                let stop = shutdown_on_signals(config.processing.shutdown_timeout);
                let listener = tokio::net::TcpListener::bind(config.http.listen)
                    .await
                    .with_context(|| format!("listening on {}", config.http.listen))?;
                tracing::info!(http = %listener.local_addr()?, "twinflow bridge starting.");
                let token = config.http.token.as_ref().map(|t| t.0.clone());
                let http = tokio::spawn(crate::bridge::serve(
                    listener,
                    metrics.clone(),
                    token,
                    stop.clone(),
                ));
                let outcome = crate::bridge::run(&config, metrics, stop.clone()).await;
                stop.cancel();
                let _ = http.await;
                Ok(outcome?)
            }
            Command::Demo(opts) => demo::run(opts, shutdown_on_signals(DEFAULT_SHUTDOWN)).await,
            Command::Simulate {
                brokers,
                topic,
                assets,
                rate,
                count,
                duration,
                seed,
                malformed,
                start,
                interval,
                properties,
                via,
                http,
                token,
                mqtt,
                topology,
            } => {
                let topology = Topology::load(&topology)?;
                let via = match via {
                    crate::demo::Door::Kafka if brokers.is_none() => {
                        bail!("--via kafka (the default) needs --brokers")
                    }
                    crate::demo::Door::Kafka => crate::demo::sink::Via::Kafka,
                    crate::demo::Door::Http => crate::demo::sink::Via::Http {
                        url: http.context("--via http needs --http URL")?,
                        token: token.context("--via http needs --token (a write credential)")?,
                        runtime: tokio::runtime::Handle::current(),
                    },
                    crate::demo::Door::Mqtt => crate::demo::sink::Via::Mqtt {
                        url: mqtt.context("--via mqtt needs --mqtt URL")?,
                    },
                };
                let mut client = rdkafka::ClientConfig::new();
                if let Some(brokers) = &brokers {
                    client.set("bootstrap.servers", brokers);
                }
                for p in &properties {
                    let (k, v) = p
                        .split_once('=')
                        .with_context(|| format!("--property {p}: expected key=value"))?;
                    client.set(k, v);
                }
                let interval_ms = match interval {
                    Some(i) => i.as_millis() as i64,
                    None if rate > 0 => ((assets as u64 * 1000) / rate).max(1) as i64,
                    None => 1000,
                };
                let start_ms = start.map_or_else(
                    || SystemClock.now_ms(),
                    |s| {
                        s.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as i64)
                    },
                );
                let fleet = Fleet::new(
                    FleetConfig {
                        assets,
                        seed,
                        malformed,
                        start_ms,
                        interval_ms,
                    },
                    &topology,
                )?;
                let publish = Publish {
                    via,
                    client,
                    topic,
                    rate,
                    burst: 0,
                    count,
                    duration,
                    obey: None,
                };
                let stop = std::sync::Arc::new(AtomicBool::new(false));
                let s = stop.clone();
                let token = shutdown_on_signals(DEFAULT_SHUTDOWN);
                tokio::spawn(async move {
                    token.cancelled().await;
                    s.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                let stats = tokio::task::spawn_blocking(move || {
                    sim::publish(fleet, &publish, &topology, &stop)
                })
                .await??;
                println!(
                    "sent {} readings ({} malformed), {} not delivered",
                    stats.sent, stats.malformed, stats.failed
                );
                if stats.failed > 0 {
                    bail!("{} readings were not delivered", stats.failed);
                }
                Ok(())
            }
            Command::Export {
                config,
                from,
                to,
                format: ExportFormat::Parquet,
                out,
            } => {
                let config = Config::load(&config)?;
                let topology = Topology::load(&config.topology)?;
                let registry = match (&config.schema_registry, topology.topics.uses_registry()) {
                    (Some(r), true) => Some(crate::registry::Registry::new(r)?),
                    _ => None,
                };
                let runtime = tokio::runtime::Handle::current();
                let started = std::time::Instant::now();
                let summary = tokio::task::spawn_blocking(move || {
                    let clients = crate::kafka::Clients::new(&config);
                    let export = crate::export::Export {
                        topology: &topology,
                        clients: &clients,
                        registry: registry.as_ref(),
                        from,
                        to,
                        out: &out,
                        progress: Some(Duration::from_secs(2)),
                    };
                    crate::export::export(&export, &runtime)
                })
                .await??;
                let seconds = started.elapsed().as_secs_f64();
                println!(
                    "exported {} twin versions and {} alerts ({} records read, {} not twins left out) into {} files in {seconds:.1} s, {:.0} versions/s",
                    summary.versions,
                    summary.alerts,
                    summary.records,
                    summary.skipped,
                    summary.files.len(),
                    summary.versions as f64 / seconds
                );
                Ok(())
            }
            Command::Backtest {
                config,
                model,
                from,
                to,
                flap_within,
                json,
            } => backtest(&config, &model, (from, to), flap_within, json).await,
            Command::Topology {
                action: TopologyAction::Describe { topology },
            } => {
                print!("{}", Topology::load(&topology)?.describe());
                Ok(())
            }
            Command::Topology {
                action: TopologyAction::Apply { config },
            } => {
                let config = Config::load(&config)?;
                let topology = Topology::load(&config.topology)?;
                let reports =
                    apply_topology(&config.kafka.admin_config(), &topology.topics).await?;
                for r in &reports {
                    println!("{r}");
                }
                if reports.iter().any(|r| r.is_mismatch()) {
                    bail!("some topics differ from the topology; fix them or the topology");
                }
                Ok(())
            }
        }
    }
}

/// `twinflow backtest`: loads both models, runs the replay off the runtime with a progress
/// bar on stderr, and prints the report.
async fn backtest(
    config: &std::path::Path,
    model: &std::path::Path,
    (from, to): (i64, i64),
    flap_within: Duration,
    json: bool,
) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let live = Topology::load(&config.topology)?;
    let candidate = Topology::load(&crate::config::TopologyConfig {
        topics: config.topology.topics.clone(),
        model: model.to_owned(),
    })?;
    let registry = match (&config.schema_registry, live.topics.uses_registry()) {
        (Some(r), true) => Some(crate::registry::Registry::new(r)?),
        _ => None,
    };
    let runtime = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || {
        let clients = crate::kafka::Clients::new(&config);
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "backtest {bar:40} {pos}/{len} readings, {per_sec}, {eta} left",
            )
            .expect("a valid template"),
        );
        let mut progress = |read: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(read);
        };
        let mut b = crate::backtest::Backtest {
            live: &live,
            candidate: &candidate,
            clients: &clients,
            registry: registry.as_ref(),
            from,
            to,
            flap_within: i64::try_from(flap_within.as_millis()).unwrap_or(i64::MAX),
            progress: &mut progress,
        };
        let report = crate::backtest::backtest(&mut b, &runtime);
        bar.finish_and_clear();
        report
    })
    .await??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
