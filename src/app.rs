//! Config → build → run: [`App::build`] validates the configuration and opens everything
//! (topology, store, Kafka clients, HTTP listener); [`App::run`] is the only async entry
//! point and returns when the shutdown token is cancelled or a worker fails fatally.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::kafka::{self, Clients, Consumer, OutputProducer, RecordWriter};
use crate::metrics::Metrics;
use crate::pipeline::{Committer, Coordinator, Failure, Handler, Shared};
use crate::registry::Registry;
use crate::store::Store;
use crate::topology::Topology;
use crate::view::FleetView;

/// A built, not yet running, twinflow instance.
pub struct App {
    shared: Arc<Shared>,
    committer: Arc<Committer>,
    coordinator: Arc<Coordinator>,
    consumer: Arc<Consumer>,
    listener: std::net::TcpListener,
    http: crate::config::HttpConfig,
    view: crate::config::ViewConfig,
    writer: Arc<RecordWriter>,
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
        let topology = Topology::load(&config.topology).context("loading the topology")?;
        std::fs::create_dir_all(&config.store.path).with_context(|| {
            format!(
                "creating the store directory {}",
                config.store.path.display()
            )
        })?;
        let store = Store::open(&config.store.path).context("opening the store")?;

        let settings = &config.processing;
        let clients = Clients::new(config);
        let metrics = Metrics::new(prometheus::Registry::new());
        let producer = OutputProducer::new(&clients, &topology.topics.changelog.name, &metrics)
            .context("creating the producer")?;
        let writer = Arc::new(RecordWriter::new(&clients).context("creating the API's writer")?);

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
            clients,
            failure: Failure::default(),
            registry,
            view: config.view.enabled,
        });
        let committer = Arc::new(Committer::new(shared.clone()));
        let coordinator = Arc::new(Coordinator::new(
            shared.clone(),
            committer.clone(),
            tokio::runtime::Handle::current(),
        ));

        let consumer = kafka::subscribe(
            &shared.clients.group_consumer(),
            Arc::new(Handler(coordinator.clone())),
            &shared.metrics,
            &telemetry,
        )
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
            http: config.http.clone(),
            view: config.view.clone(),
            writer,
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
            http,
            view: view_config,
            writer,
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
        let view_enabled = view_config.enabled;
        let view = FleetView::open(
            shared.store.view(),
            shared.topology.clone(),
            shared.metrics.clone(),
            view_config,
        );
        let viewer = match view_enabled {
            true => {
                let view = view.clone();
                let client = shared.clients.reader("twinflow-view", false);
                let (registry, runtime) =
                    (shared.registry.clone(), tokio::runtime::Handle::current());
                let coordinator = coordinator.clone();
                Some(Worker::start("fleet view", move |stop| {
                    view.run(client, registry, runtime, stop, || coordinator.ready());
                })?)
            }
            false => None,
        };
        let state = ApiState {
            health: coordinator.clone(),
            metrics: shared.metrics.clone(),
            store: shared.store.clone(),
            view,
            view_enabled,
            token: http.token.as_ref().map(|t| t.0.clone()),
            writers: Arc::new(
                http.writers
                    .iter()
                    .map(|(name, token)| (token.0.clone(), name.clone()))
                    .collect(),
            ),
            writes: Arc::new(api::RateLimit::new(http.desired_writes_per_minute)),
            readings: Arc::new(api::RateLimit::new(http.ingest_readings_per_minute)),
            writer,
            clock: shared.clock.clone(),
            ingest_max_readings: http.ingest_max_readings,
            ingest_max_bytes: http.ingest_max_bytes,
            page: api::page(&http).into(),
            stop: http_stop.clone(),
        };
        let http = tokio::spawn(api::serve(listener, state, http_stop.clone()));

        let poller = {
            let coordinator = coordinator.clone();
            Worker::start("consumer", move |stop| {
                kafka::serve(consumer, &stop, || coordinator.stop_all());
            })?
        };

        let failed = shared.failure.token();
        tokio::select! {
            _ = shutdown.cancelled() => tracing::info!("Shutting down."),
            // The stop after a fatal error is bounded like any other.
            _ = failed.cancelled() => shutdown.cancel(),
        }
        poller.stop().await?;
        http_stop.cancel();
        // Requests in flight get a moment to finish; open streams are ended (they close on
        // the stop token), and a client that reads nothing does not hold up the exit.
        let http_abort = http.abort_handle();
        match tokio::time::timeout(Duration::from_secs(2), http).await {
            Ok(joined) => joined.context("joining the HTTP endpoint")??,
            Err(_) => http_abort.abort(),
        }
        if let Some(viewer) = viewer {
            viewer.stop().await?;
        }
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

/// A thread of the instance's own, told to stop by a flag.
struct Worker {
    name: &'static str,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Starts `run` on a thread named for `name`, with the flag that tells it to stop.
    fn start(
        name: &'static str,
        run: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("twinflow-{}", name.replace(' ', "-")))
            .spawn(move || run(flag))
            .with_context(|| format!("starting the {name} thread"))?;
        Ok(Worker { name, stop, thread })
    }

    /// Tells the thread to stop and waits until it has.
    async fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let Worker { name, thread, .. } = self;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .with_context(|| format!("joining the {name} thread"))?
            .map_err(|_| anyhow::anyhow!("the {name} thread panicked"))
    }
}
