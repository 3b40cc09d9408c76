//! An embedded Kafka-protocol broker: librdkafka's in-process mock cluster, for the demo and
//! tests. Real Kafka clients (this process's, kcat, Python) connect to it over TCP on
//! 127.0.0.1. It has no topic configs, no compaction and hollow transactions, so it serves
//! the demo and the at-least-once tests; production runs against real Kafka.

use std::ffi::c_int;

use anyhow::{Context, Result};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

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

    /// Makes `broker` the leader of `partition` of `topic`; clients learn it from their next
    /// metadata request.
    ///
    /// # Errors
    /// When the broker id is unknown.
    pub fn set_leader(&self, topic: &str, partition: i32, broker: i32) -> Result<()> {
        Ok(self
            .cluster()
            .partition_leader(topic, partition, Some(broker))?)
    }

    /// Makes the next requests of kind `api` that reach `broker`, from whichever client, fail
    /// with `errors`, one error per request in the given order (fault injection for tests).
    ///
    /// # Errors
    /// When the broker id is unknown.
    pub fn push_request_errors(
        &self,
        broker: i32,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<()> {
        let no_delay: c_int = 0;
        for &error in errors {
            // SAFETY: the cluster lives as long as `host`. The variadic arguments are what a
            // count of 1 tells librdkafka to read: one error code and one round-trip time in
            // milliseconds, both C ints.
            let result = unsafe {
                rdkafka::bindings::rd_kafka_mock_broker_push_request_error_rtts(
                    self.raw(),
                    broker,
                    api.into(),
                    1,
                    error as c_int,
                    no_delay,
                )
            };
            anyhow::ensure!(
                result == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
                "injecting {api:?} errors on broker {broker}: {result:?}"
            );
        }
        Ok(())
    }

    /// How many of the errors injected for `api` on `broker` no request has met yet.
    ///
    /// # Errors
    /// When the broker id is unknown.
    pub fn pending_request_errors(&self, broker: i32, api: RDKafkaApiKey) -> Result<usize> {
        let mut pending = 0usize;
        // SAFETY: the cluster lives as long as `host`; librdkafka writes only `pending`.
        let result = unsafe {
            rdkafka::bindings::rd_kafka_mock_broker_error_stack_cnt(
                self.raw(),
                broker,
                api.into(),
                &mut pending,
            )
        };
        anyhow::ensure!(
            result == RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            "counting {api:?} errors on broker {broker}: {result:?}"
        );
        Ok(pending)
    }

    /// The raw cluster, for the fault injections the safe wrapper lacks.
    fn raw(&self) -> *mut rdkafka::bindings::rd_kafka_mock_cluster_t {
        // SAFETY: the handle is valid while `host` lives; the call only reads it. `start`
        // checked that it has a cluster.
        unsafe { rdkafka::bindings::rd_kafka_handle_mock_cluster(self.host.client().native_ptr()) }
    }
}
