//! The API's writer: records answered one by one when the broker has them (desired writes,
//! HTTP ingestion). The pipeline's outputs go through [`super::OutputProducer`] instead; this
//! one only feeds input topics.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Clients;
use crate::error::{Error, Result};

/// How long a write may wait for the broker's acknowledgement.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes single records to input topics.
pub struct RecordWriter {
    producer: FutureProducer,
}

impl RecordWriter {
    /// A writer with the instance's client settings.
    ///
    /// # Errors
    /// `Error::Kafka` when librdkafka refuses the settings.
    pub fn new(clients: &Clients) -> Result<RecordWriter> {
        Ok(RecordWriter {
            producer: clients.writer().create()?,
        })
    }

    /// Records handed to librdkafka and not yet acknowledged (or failed).
    pub fn in_flight(&self) -> i32 {
        use rdkafka::producer::Producer as _;
        self.producer.in_flight_count()
    }

    /// Writes one record to `partition` of `topic` (`None`: the partitioner's choice by key)
    /// and waits until the broker acknowledges it; returns the partition and offset it got.
    ///
    /// # Errors
    /// `Error::Kafka` when the broker does not take it in time.
    pub async fn write(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        value: &[u8],
    ) -> Result<(i32, i64)> {
        let mut record = FutureRecord::to(topic).key(key).payload(value);
        record.partition = partition;
        self.send(record).await
    }

    /// Writes a record with no value and the given headers, as [`RecordWriter::write`]: a
    /// control record.
    ///
    /// # Errors
    /// As [`RecordWriter::write`].
    pub async fn write_control(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64)> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .key(key)
            .headers(owned);
        record.partition = partition;
        self.send(record).await
    }

    async fn send(&self, record: FutureRecord<'_, [u8], [u8]>) -> Result<(i32, i64)> {
        self.producer
            .send(record, WRITE_TIMEOUT)
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| Error::Kafka(e))
    }
}
