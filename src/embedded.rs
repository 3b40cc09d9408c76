//! An embedded Kafka-protocol broker: librdkafka's in-process mock cluster, for the demo and
//! tests. Real Kafka clients (this process's, kcat, Python) connect to it over TCP on
//! 127.0.0.1. It has no topic configs, no compaction and hollow transactions, so it serves
//! the demo and the at-least-once tests; production runs against real Kafka.

use anyhow::{Context, Result};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};

/// A running mock cluster; it stops when dropped.
pub struct EmbeddedKafka {
    /// The client that owns the cluster; the cluster lives as long as it does.
    host: BaseProducer,
}

impl EmbeddedKafka {
    /// Starts a cluster of `brokers` brokers on random loopback ports.
    ///
    /// # Errors
    /// When librdkafka cannot start it.
    pub fn start(brokers: u32) -> Result<EmbeddedKafka> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .context("starting the embedded Kafka cluster")?;
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster;
        // SAFETY: the handle is valid while `host` lives; the call only reads it. Setting the
        // group's initial rebalance delay to 0 makes joins take about a second instead of 3+.
        unsafe {
            let mock = cluster(host.client().native_ptr());
            anyhow::ensure!(!mock.is_null(), "the client has no mock cluster");
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(mock, 0);
        }
        Ok(EmbeddedKafka { host })
    }

    fn cluster(
        &self,
    ) -> rdkafka::mocking::MockCluster<'_, rdkafka::producer::DefaultProducerContext> {
        self.host
            .client()
            .mock_cluster()
            .expect("the host client was created with a mock cluster")
    }

    /// `host:port,...` of the brokers.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// When the cluster refuses it.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.cluster()
            .create_topic(name, partitions, 1)
            .with_context(|| format!("creating topic {name} on the embedded cluster"))
    }

    /// Takes a broker down (fault injection for tests).
    ///
    /// # Errors
    /// When the broker id is unknown.
    pub fn broker_down(&self, broker: i32) -> Result<()> {
        Ok(self.cluster().broker_down(broker)?)
    }

    /// Brings a broker back up.
    ///
    /// # Errors
    /// When the broker id is unknown.
    pub fn broker_up(&self, broker: i32) -> Result<()> {
        Ok(self.cluster().broker_up(broker)?)
    }
}
