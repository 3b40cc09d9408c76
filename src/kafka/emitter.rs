//! The emitter: enqueues output records and keeps their delivery futures, so a batch can
//! wait for every one of its outputs before its state and position are committed.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::error::{Error, Result};

/// One worker's view of the shared producer.
pub struct Emitter {
    producer: FutureProducer,
    pending: Vec<DeliveryFuture>,
}

impl Emitter {
    /// An emitter on `producer` (a cheap clone of the instance's producer).
    pub fn new(producer: FutureProducer) -> Self {
        Emitter {
            producer,
            pending: Vec::new(),
        }
    }

    /// Enqueues one record. When librdkafka's queue is full, waits for the deliveries
    /// already pending and tries again.
    ///
    /// # Errors
    /// `Error::Kafka` when the record cannot be enqueued, or a pending delivery failed while
    /// making room.
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) -> Result<()> {
        let mut headers = headers;
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = payload {
                record = record.payload(p);
            }
            if let Some(p) = partition {
                record = record.partition(p);
            }
            if let Some(h) = headers.take() {
                record = record.headers(h);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), record)) => {
                    headers = record.headers;
                    if self.pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    self.flush().await?;
                }
                Err((e, _)) => return Err(Error::Kafka(e)),
            }
        }
    }

    /// Records enqueued and not yet confirmed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Waits until every pending record is delivered.
    ///
    /// # Errors
    /// The first delivery error; every pending future is still awaited.
    pub async fn flush(&mut self) -> Result<()> {
        let mut first = None;
        for delivery in self.pending.drain(..) {
            let outcome = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => Error::Kafka(e),
                Err(_) => Error::Kafka(KafkaError::Canceled),
            };
            first.get_or_insert(outcome);
        }
        first.map_or(Ok(()), Err)
    }

    /// Forgets pending deliveries (after a failed batch, which will be replayed anyway).
    pub fn abandon(&mut self) {
        self.pending.clear();
    }
}
