//! The library's error type and what each error tells the caller to do.
//!
//! Every failure the hot loop can meet is an [`Error`] variant named for what failed, and
//! [`Error::disposition`] is the single place that decides whether it is bad data to skip,
//! a writer schema to fetch before the record is read again, a transient failure to retry,
//! or a reason to stop. Callers match on that, never on variants.

use thiserror::Error;

/// What the pipeline does next after an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Bad input: count it, dead-letter it, advance past it.
    Skip,
    /// The record names a writer schema not fetched yet (this registry id): fetch it, then
    /// read the record again. Nothing was done with the record.
    FetchSchema(u32),
    /// Transient Kafka or IO failure: back off and replay from the last committed position.
    Retry,
    /// Configuration, a corrupt store or a fatal client error: stop and exit non-zero.
    Fatal,
}

/// A library error.
#[derive(Debug, Error)]
pub enum Error {
    /// A record's bytes could not be decoded with the input schema.
    #[error("cannot decode record: {0}")]
    Decode(String),
    /// The local RocksDB store failed.
    #[error("store: {0}")]
    Store(String),
    /// A stored twin could not be decoded: the store is corrupt or was written by another model.
    #[error("corrupt store: {0}")]
    CorruptStore(String),
    /// Kafka failed in a way that may pass.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The configuration, topology or schemas are wrong.
    #[error("config: {0}")]
    Config(String),
    /// A Confluent-framed record names a schema registry id not fetched yet: fetch it and
    /// read the record again.
    #[error("schema id {0} not fetched from the schema registry yet")]
    SchemaNeeded(u32),
    /// A task of the instance's own (a store write, a seek, a restore) panicked or was
    /// cancelled.
    #[error("task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The schema registry could not be reached or refused a request.
    #[error("schema registry: {0}")]
    Registry(String),
    /// Processing a record or timer panicked (a bug). The work is set aside and the
    /// partition replays from its stored position past it.
    #[error("processing {work} panicked: {message}")]
    Panicked {
        /// What was being processed, e.g. `reading at offset 42`.
        work: String,
        /// The panic's message.
        message: String,
    },
    /// The MQTT client stopped (the bridge is stopping).
    #[error("mqtt: {0}")]
    Mqtt(String),
    /// An export could not write its files.
    #[error("export: {0}")]
    Export(String),
    /// The instance cannot go on safely (for example, its transaction cannot be aborted).
    #[error("{0}")]
    Fatal(String),
}

impl Error {
    /// What the caller should do about this error.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Decode(_) => Disposition::Skip,
            Error::SchemaNeeded(id) => Disposition::FetchSchema(*id),
            Error::Store(_) | Error::Registry(_) | Error::Panicked { .. } | Error::Mqtt(_) => {
                Disposition::Retry
            }
            // A transaction error says itself whether it is fatal (fenced, broken producer)
            // or can be aborted and replayed.
            Error::Kafka(rdkafka::error::KafkaError::Transaction(e)) => {
                if e.is_fatal() {
                    Disposition::Fatal
                } else {
                    Disposition::Retry
                }
            }
            Error::Kafka(e) => match e.rdkafka_error_code() {
                Some(code) if is_fatal_kafka(code) => Disposition::Fatal,
                _ => Disposition::Retry,
            },
            Error::CorruptStore(_)
            | Error::Config(_)
            | Error::Task(_)
            | Error::Export(_)
            | Error::Fatal(_) => Disposition::Fatal,
        }
    }
}

fn is_fatal_kafka(code: rdkafka::types::RDKafkaErrorCode) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        code,
        C::Fatal
            | C::Fenced
            | C::InvalidProducerEpoch
            | C::ProducerFenced
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::UnknownTopicOrPartition
    )
}

/// Result with the library [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Store(e.into_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Export(e.to_string())
    }
}

impl From<arrow_schema::ArrowError> for Error {
    fn from(e: arrow_schema::ArrowError) -> Self {
        Error::Export(e.to_string())
    }
}

impl From<parquet::errors::ParquetError> for Error {
    fn from(e: parquet::errors::ParquetError) -> Self {
        Error::Export(e.to_string())
    }
}
