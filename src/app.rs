//! Config → build → run: [`App::build`] validates the configuration and opens everything
//! (topology, store, Kafka clients, HTTP listener); [`App::run`] is the only async entry
//! point and returns when the shutdown token is cancelled or a worker fails fatally.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::Consumer as _;
use rdkafka::producer::Producer as _;
use rdkafka::{ClientConfig, Message, Offset};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Guarantee, Role};
use crate::kafka::OutputProducer;
use crate::kafka::{Consumer, RebalanceContext};
use crate::metrics::Metrics;
use crate::pipeline::{Committer, Coordinator, Failure, Handler, Shared};
use crate::registry::Registry;
use crate::store::Store;
use crate::topology::Topology;
use crate::view::FleetView;

/// Consumer settings twinflow relies on; passthrough properties may override the first group.
const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("enable.partition.eof", "false"),
    // At-least-once: how often the group offset follows the store's position.
    ("auto.commit.interval.ms", "1000"),
];

/// Producer settings: ordered, acknowledged by all replicas, batched and compressed.
const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
];

/// A built, not yet running, twinflow instance.
pub struct App {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
    coordinator: Arc<Coordinator>,
    consumer: Arc<Consumer>,
    listener: std::net::TcpListener,
    token: Option<String>,
}

impl App {
    /// Builds an instance on the system clock. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// Anything wrong with the configuration, topology, store or Kafka clients, with context.
    pub fn build(config: &Config) -> Result<App> {
        Self::build_with_clock(config, Arc::new(SystemClock))
    }

    /// Builds an instance on `clock`. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// As [`App::build`].
    pub fn build_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<App> {
        let topology = Topology::load(&config.topology.topics, &config.topology.model)
            .context("loading the topology")?;
        std::fs::create_dir_all(&config.store.path).with_context(|| {
            format!(
                "creating the store directory {}",
                config.store.path.display()
            )
        })?;
        let store = Store::open(&config.store.path).context("opening the store")?;

        let settings = &config.processing;
        let exactly_once = settings.guarantee == Guarantee::ExactlyOnce;
        let mut producer_config = ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            producer_config.set(k, v);
        }
        if exactly_once {
            let id = settings.transactional_id.clone().unwrap_or_else(|| {
                default_transactional_id(&config.kafka.group_id, &config.store.path)
            });
            // A restarted instance with the same id fences its previous incarnation and
            // aborts its open transaction at once; a dead one's is aborted after this long.
            producer_config
                .set("transactional.id", &id)
                .set("transaction.timeout.ms", "10000");
        }
        config.kafka.apply(&mut producer_config, Role::Producer);
        let metrics = Metrics::new(prometheus::Registry::new());
        let producer =
            OutputProducer::new(&producer_config, &topology.topics.changelog.name, &metrics)
                .context("creating the producer")?;
        if exactly_once {
            let p = producer.inner();
            p.init_transactions(Duration::from_secs(60))
                .context("initialising transactions")?;
            p.begin_transaction()
                .context("beginning the first transaction")?;
        }
        let mut restore_client = ClientConfig::new();
        config.kafka.apply(&mut restore_client, Role::Consumer);

        let registry = match (&config.schema_registry, topology.topics.uses_registry()) {
            (Some(r), true) => Some(Arc::new(Registry::new(r)?)),
            (None, true) => anyhow::bail!(
                "a topic in {} has format = \"confluent_avro\": configure [schema_registry]",
                config.topology.topics.display()
            ),
            (_, false) => None,
        };
        let telemetry = topology.topics.telemetry.name.clone();
        let shared = Arc::new(Shared {
            topology: Arc::new(topology),
            store,
            metrics,
            settings: settings.clone(),
            clock,
            producer,
            restore_client,
            failure: Failure::default(),
            registry,
        });
        let committer = Arc::new(Committer::new(shared.clone()));
        let coordinator = Arc::new(Coordinator::new(
            shared.clone(),
            committer.clone(),
            tokio::runtime::Handle::current(),
        ));

        let mut consumer_config = ClientConfig::new();
        for (k, v) in CONSUMER_DEFAULTS {
            consumer_config.set(k, v);
        }
        config.kafka.apply(&mut consumer_config, Role::Consumer);
        consumer_config
            .set("group.id", &config.kafka.group_id)
            // Group offsets: at-least-once, stored by the committer after the store write and
            // committed by librdkafka; exactly-once, sent in the transaction only.
            .set(
                "enable.auto.commit",
                if exactly_once { "false" } else { "true" },
            )
            .set("enable.auto.offset.store", "false")
            .set(
                "isolation.level",
                if exactly_once {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            );
        let context =
            RebalanceContext::new(Arc::new(Handler(coordinator.clone())), &shared.metrics);
        let consumer: Arc<Consumer> = Arc::new(
            consumer_config
                .create_with_context(context)
                .context("creating the consumer")?,
        );
        RebalanceContext::attach(&consumer);
        committer.attach(&consumer);
        consumer
            .subscribe(&[&telemetry])
            .with_context(|| format!("subscribing to {telemetry}"))?;

        let listener = std::net::TcpListener::bind(config.http.listen)
            .with_context(|| format!("binding the HTTP endpoint {}", config.http.listen))?;
        listener
            .set_nonblocking(true)
            .context("configuring the HTTP listener")?;
        Ok(App {
            shared,
            committer,
            coordinator,
            consumer,
            listener,
            token: config.http.token.as_ref().map(|t| t.0.clone()),
        })
    }

    /// The instance's metrics (its own registry).
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// Where the HTTP endpoint listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Runs until `shutdown` is cancelled or a worker fails. On the way out every worker
    /// finishes its batch and commits, the store closes, and the consumer leaves the group.
    ///
    /// # Errors
    /// The fatal error that stopped a worker, or a failure of the HTTP endpoint.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let App {
            shared,
            committer,
            coordinator,
            consumer,
            listener,
            token,
        } = self;
        if let Some(registry) = &shared.registry {
            // Before the first poll, so before any partition is assigned.
            registry
                .prepare(&shared.topology)
                .await
                .context("preparing the schema registry subjects")?;
        }
        let committing = CancellationToken::new();
        let committer_task = tokio::spawn(committer.clone().run(committing.clone()));
        let listener =
            tokio::net::TcpListener::from_std(listener).context("starting the HTTP endpoint")?;
        let http_stop = CancellationToken::new();
        let view = FleetView::open(
            shared.store.view(),
            shared.topology.clone(),
            shared.metrics.clone(),
        )
        .context("opening the fleet view")?;
        let stop_view = Arc::new(AtomicBool::new(false));
        let viewer = {
            let (view, stop) = (view.clone(), stop_view.clone());
            let mut client = shared.restore_client.clone();
            if shared.settings.guarantee == Guarantee::ExactlyOnce {
                client.set("isolation.level", "read_committed");
            }
            let (registry, runtime) = (shared.registry.clone(), tokio::runtime::Handle::current());
            let coordinator = coordinator.clone();
            std::thread::Builder::new()
                .name("twinflow-view".into())
                .spawn(move || view.run(client, registry, runtime, stop, || coordinator.ready()))
                .context("starting the fleet view thread")?
        };
        let state = ApiState {
            shared: shared.clone(),
            coordinator: coordinator.clone(),
            view,
            token: token.clone(),
            stop: http_stop.clone(),
        };
        let http = tokio::spawn(api::serve(listener, state, http_stop.clone()));

        let stop_polling = Arc::new(AtomicBool::new(false));
        let poller = {
            let (coordinator, stop) = (coordinator.clone(), stop_polling.clone());
            std::thread::Builder::new()
                .name("twinflow-consumer".into())
                .spawn(move || poll_consumer(consumer, &coordinator, &stop))
                .context("starting the consumer thread")?
        };

        let failed = shared.failure.token();
        tokio::select! {
            _ = shutdown.cancelled() => tracing::info!("Shutting down."),
            // The stop after a fatal error is bounded like any other.
            _ = failed.cancelled() => shutdown.cancel(),
        }
        stop_polling.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || poller.join())
            .await
            .context("joining the consumer thread")?
            .map_err(|_| anyhow::anyhow!("the consumer thread panicked"))?;
        http_stop.cancel();
        // Requests in flight get a moment to finish; open streams are ended (they close on
        // the stop token), and a client that reads nothing does not hold up the exit.
        let http_abort = http.abort_handle();
        match tokio::time::timeout(Duration::from_secs(2), http).await {
            Ok(joined) => joined.context("joining the HTTP endpoint")??,
            Err(_) => http_abort.abort(),
        }
        stop_view.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || viewer.join())
            .await
            .context("joining the fleet view thread")?
            .map_err(|_| anyhow::anyhow!("the fleet view thread panicked"))?;
        // The poller committed and closed everything; stop the periodic commits.
        committing.cancel();
        committer_task.await.context("joining the committer")?;
        if let Some(e) = shared.failure.take() {
            return Err(e).context("a partition worker failed");
        }
        // Everything is committed: write the memtables out, so that the next start opens
        // the store without replaying its write-ahead log (seconds for a large fleet).
        let store = shared.store.clone();
        tokio::task::spawn_blocking(move || store.flush())
            .await
            .context("joining the store flush")?
            .context("flushing the store")?;
        tracing::info!("Stopped cleanly.");
        Ok(())
    }
}

/// Serves the consumer's callbacks (rebalances, errors) until told to stop, then drains the
/// workers and closes the consumer, which leaves the group.
fn poll_consumer(consumer: Arc<Consumer>, coordinator: &Coordinator, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(msg)) => {
                // Every assigned partition has its own queue, split before it was assigned,
                // so this should not happen; if it does, hand the record back to its queue.
                tracing::warn!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    "Record on the main queue; seeking back."
                );
                let (topic, partition, offset) =
                    (msg.topic().to_owned(), msg.partition(), msg.offset());
                drop(msg);
                if let Err(error) = consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                ) {
                    tracing::error!(%error, "Seek failed.");
                }
            }
            Some(Err(error)) => tracing::warn!(%error, "Consumer error."),
        }
    }
    coordinator.stop_all();
    // Dropping the last handle closes the consumer: it revokes (nothing left to drain),
    // commits the stored offsets and leaves the group.
    drop(consumer);
}

/// A transactional id unique per instance and stable across its restarts: the group plus a
/// hash of the store path (an instance is its store).
fn default_transactional_id(group: &str, store: &std::path::Path) -> String {
    let path = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_owned());
    let hash = xxhash_rust::xxh3::xxh3_64(path.to_string_lossy().as_bytes());
    format!("twinflow-{group}-{hash:016x}")
}
