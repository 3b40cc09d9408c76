//! The reader of twinflow's output topics: a consumer that assigns itself partitions at
//! given positions and reads them as the pipeline committed them. It serves the restore
//! (one changelog partition, to its end) and the fleet view (every changelog and alert
//! partition, on and on).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _};
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};

use crate::error::Result;
use crate::headers::{DEADLINE, NO_DEADLINE, SOURCE_OFFSET};

/// What a poll brought.
pub enum Polled<'a> {
    /// A record.
    Record(OutputRecord<'a>),
    /// The reader reached the end of this partition, as it is now.
    End(i32),
    /// Nothing within the timeout.
    Idle,
}

/// One record of an output topic.
pub struct OutputRecord<'a>(BorrowedMessage<'a>);

impl OutputRecord<'_> {
    /// Its topic.
    pub fn topic(&self) -> &str {
        self.0.topic()
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.0.partition()
    }

    /// Its offset.
    pub fn offset(&self) -> i64 {
        self.0.offset()
    }

    /// Its key: the asset id.
    pub fn key(&self) -> Option<&[u8]> {
        self.0.key()
    }

    /// Its timestamp (epoch ms), if it has one.
    pub fn timestamp(&self) -> Option<i64> {
        self.0.timestamp().to_millis()
    }

    /// Its value; `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.0.payload()
    }

    /// The input offset it came from (its `twinflow.source.offset` header).
    pub fn source_offset(&self) -> Option<i64> {
        self.number(SOURCE_OFFSET)
    }

    /// The twin's timer deadline its `twinflow.deadline` header carries: `Some(None)` for
    /// none, `None` without the header (or with one that says neither).
    pub fn deadline(&self) -> Option<Option<i64>> {
        let value = self
            .0
            .headers()?
            .iter()
            .find(|h| h.key == DEADLINE)?
            .value?;
        if value == NO_DEADLINE.as_bytes() {
            return Some(None);
        }
        Some(Some(std::str::from_utf8(value).ok()?.parse().ok()?))
    }

    /// The text of header `name` (invalid UTF-8 replaced), if it has one.
    pub fn text(&self, name: &str) -> Option<String> {
        self.0
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())
    }

    /// The decimal number in header `name`, if it has one.
    pub fn number(&self, name: &str) -> Option<i64> {
        self.0
            .headers()?
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
    }
}

/// Settings of a reader of a window up to known offsets (`export`, `backtest`): a fetch
/// answered after at most 10 ms unless configured otherwise (`fetch.wait.max.ms`, 500 ms
/// by default). On the embedded mock cluster, a minute of the demo's telemetry (small
/// batches) read at about 1,000 records/s with the default and in seconds with 10 ms.
pub fn window_reader(config: &mut ClientConfig) {
    if config.get("fetch.wait.max.ms").is_none() {
        config.set("fetch.wait.max.ms", "10");
    }
}

/// A reader of output partitions; see the module documentation.
pub struct OutputReader {
    consumer: BaseConsumer<Quiet>,
}

impl OutputReader {
    /// A reader with `config` (from [`super::Clients::reader`]).
    ///
    /// # Errors
    /// When librdkafka refuses the configuration.
    pub fn new(config: &ClientConfig) -> Result<OutputReader> {
        Ok(OutputReader {
            consumer: config.create_with_context(Quiet)?,
        })
    }

    /// The `(low, high)` offsets of a partition, asked of the broker.
    ///
    /// # Errors
    /// When the broker does not answer within `timeout`.
    pub fn watermarks(&self, topic: &str, partition: i32, timeout: Duration) -> Result<(i64, i64)> {
        Ok(self.consumer.fetch_watermarks(topic, partition, timeout)?)
    }

    /// A partition's `(low, high)` offsets as of the last fetch; see [`super::cached_watermarks`].
    pub fn cached_watermarks(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        super::cached_watermarks(&self.consumer, topic, partition)
    }

    /// The offsets of the records of `topic` (partitions `0..partitions`) timestamped in
    /// `[from, to)`, per partition that has any: `(partition, first offset, offset after the
    /// last)`. Where the broker has no time index (the mock cluster), the partition's last
    /// record's timestamp says whether it has any, and a binary search over timestamps finds
    /// both ends.
    ///
    /// # Errors
    /// When the broker does not answer.
    pub fn window(
        &self,
        topic: &str,
        partitions: i32,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i32, i64, i64)>> {
        let timeout = Duration::from_secs(30);
        let starts = self.offsets_for_time(topic, partitions, from, timeout)?;
        let ends = self.offsets_for_time(topic, partitions, to, timeout)?;
        let mut marks = Vec::new();
        for p in 0..partitions {
            let (low, high) = self.watermarks(topic, p, timeout)?;
            if low < high {
                marks.push((p, low, high));
            }
        }
        // "No offset at or after `from`" means every record is older, unless the broker does
        // not look offsets up by time at all: then the partition's last record says otherwise.
        let unknown: Vec<(i32, i64)> = (marks.iter())
            .filter(|(p, _, _)| starts[*p as usize].is_none())
            .map(|(p, _, high)| (*p, high - 1))
            .collect();
        let last = match unknown.is_empty() {
            true => Default::default(),
            false => self.timestamps_at(topic, &unknown, timeout)?,
        };
        // Where the broker has no time index, each end is found by a binary search over the
        // records' timestamps (a fetch a step for all such partitions at once), so a window
        // near the end of a long partition is not read from its start.
        let searched: Vec<(i32, i64, i64)> = (marks.iter())
            .filter(|(p, _, _)| last.get(p).is_some_and(|t| *t >= from))
            .copied()
            .collect();
        let first = self.first_at(topic, searched.clone(), from, timeout)?;
        let ending: Vec<(i32, i64, i64)> = (searched.iter())
            .filter(|(p, _, _)| last.get(p).is_some_and(|t| *t >= to))
            .map(|(p, _, high)| (*p, first[p], *high))
            .collect();
        let before_end = self.first_at(topic, ending, to, timeout)?;
        let mut out = Vec::new();
        for (p, low, high) in marks {
            let (start, end) = match starts[p as usize] {
                Some(o) => (o.max(low), ends[p as usize].map_or(high, |o| o.min(high))),
                None => match first.get(&p) {
                    Some(start) => (*start, before_end.get(&p).copied().unwrap_or(high)),
                    None => continue,
                },
            };
            if start < end {
                out.push((p, start, end));
            }
        }
        Ok(out)
    }

    /// Reads the `window` of `topic` (as [`OutputReader::window`] gives it): assigns its
    /// partitions at their first offsets and returns what [`OutputReader::next_in`] walks.
    ///
    /// # Errors
    /// When the client refuses the assignment.
    pub fn read_window(
        &self,
        topic: &str,
        window: &[(i32, i64, i64)],
    ) -> Result<std::collections::HashMap<i32, i64>> {
        let from: Vec<_> = (window.iter())
            .map(|(p, start, _)| (topic, *p, Offset::Offset(*start)))
            .collect();
        self.assign(&from)?;
        Ok(window.iter().map(|(p, _, end)| (*p, *end)).collect())
    }

    /// The next record of the window whose partitions' ends are `ends` (from
    /// [`OutputReader::read_window`]; a partition leaves it once read to its end), or `None`
    /// when every partition is read.
    ///
    /// # Errors
    /// As [`OutputReader::poll`].
    pub fn next_in(
        &self,
        ends: &mut std::collections::HashMap<i32, i64>,
    ) -> Result<Option<OutputRecord<'_>>> {
        while !ends.is_empty() {
            let m = match self.poll(Duration::from_millis(200))? {
                Polled::Idle => continue,
                Polled::End(p) => {
                    ends.remove(&p);
                    continue;
                }
                Polled::Record(m) => m,
            };
            let Some(&end) = ends.get(&m.partition()) else {
                continue;
            };
            if m.offset() >= end {
                ends.remove(&m.partition());
                continue;
            }
            if m.offset() + 1 >= end {
                ends.remove(&m.partition());
            }
            return Ok(Some(m));
        }
        Ok(None)
    }

    /// Per `(partition, low, high)` of `topic` (timestamps growing with the offset), the
    /// first offset in `low..high` whose record's timestamp is at or after `at`, or `high`:
    /// a binary search, one fetch per step for all partitions together.
    fn first_at(
        &self,
        topic: &str,
        mut search: Vec<(i32, i64, i64)>,
        at: i64,
        timeout: Duration,
    ) -> Result<std::collections::HashMap<i32, i64>> {
        let mut found = std::collections::HashMap::new();
        while !search.is_empty() {
            let probes: Vec<(i32, i64)> = (search.iter())
                .map(|(p, low, high)| (*p, low + (high - low) / 2))
                .collect();
            let stamps = self.timestamps_at(topic, &probes, timeout)?;
            let mut next = Vec::new();
            for ((p, low, high), (_, mid)) in search.into_iter().zip(probes) {
                // A record gone (compacted) counts as older: the search goes on after it.
                let (low, high) = match stamps.get(&p) {
                    Some(t) if *t >= at => (low, mid),
                    _ => (mid + 1, high),
                };
                if low >= high {
                    found.insert(p, low);
                } else {
                    next.push((p, low, high));
                }
            }
            search = next;
        }
        Ok(found)
    }

    /// Per partition `0..partitions` of `topic`, the first offset whose record's timestamp
    /// is at or after `at` (epoch ms), by the broker's time index; `None` where no record
    /// is that new (or the broker cannot say).
    ///
    /// # Errors
    /// When the broker does not answer within `timeout`.
    pub fn offsets_for_time(
        &self,
        topic: &str,
        partitions: i32,
        at: i64,
        timeout: Duration,
    ) -> Result<Vec<Option<i64>>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(at))?;
        }
        let found = self.consumer.offsets_for_times(tpl, timeout)?;
        let mut out = vec![None; partitions as usize];
        for e in found.elements() {
            if let (Offset::Offset(o), Ok(p)) = (e.offset(), usize::try_from(e.partition())) {
                out[p] = Some(o);
            }
        }
        Ok(out)
    }

    /// The timestamps of the records at these `(partition, offset)`s of `topic`, read by this
    /// reader before it is assigned anything else (it is left unassigned); a partition whose
    /// record is gone (compacted, or deleted by retention) has none.
    ///
    /// # Errors
    /// When the records cannot be fetched within `timeout`.
    pub fn timestamps_at(
        &self,
        topic: &str,
        at: &[(i32, i64)],
        timeout: Duration,
    ) -> Result<std::collections::HashMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in at {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        self.consumer.assign(&tpl)?;
        let mut waiting: std::collections::HashMap<i32, i64> = at.iter().copied().collect();
        let mut found = std::collections::HashMap::new();
        let deadline = std::time::Instant::now() + timeout;
        while !waiting.is_empty() {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    if waiting
                        .get(&m.partition())
                        .is_some_and(|o| m.offset() >= *o)
                    {
                        waiting.remove(&m.partition());
                        if let Some(ts) = m.timestamp().to_millis() {
                            found.insert(m.partition(), ts);
                        }
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    waiting.remove(&p);
                }
                Some(Err(e)) => return Err(e.into()),
                None if std::time::Instant::now() >= deadline => {
                    return Err(crate::error::Error::Kafka(KafkaError::MessageConsumption(
                        rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                    )));
                }
                None => {}
            }
        }
        self.consumer.unassign()?;
        Ok(found)
    }

    /// Reads these partitions from these positions (and no others).
    ///
    /// # Errors
    /// When the assignment is refused.
    pub fn assign(&self, from: &[(&str, i32, Offset)]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in from {
            tpl.add_partition_offset(topic, *partition, *offset)?;
        }
        Ok(self.consumer.assign(&tpl)?)
    }

    /// The next record, waiting up to `timeout`.
    ///
    /// # Errors
    /// What the client reports (transport errors pass: librdkafka reconnects and fetches
    /// on).
    pub fn poll(&self, timeout: Duration) -> Result<Polled<'_>, KafkaError> {
        match self.consumer.poll(timeout) {
            None => Ok(Polled::Idle),
            Some(Ok(m)) => Ok(Polled::Record(OutputRecord(m))),
            Some(Err(KafkaError::PartitionEOF(partition))) => Ok(Polled::End(partition)),
            Some(Err(e)) => Err(e),
        }
    }

    /// Closes the reader off the calling thread: librdkafka's close waits for its broker
    /// threads (100 ms and more on a busy broker), and nothing waits for it.
    pub fn close_in_background(self) {
        // Should the thread not start, the reader is closed here, when the closure drops.
        let _ = std::thread::Builder::new()
            .name("twinflow-reader-close".into())
            .spawn(move || drop(self));
    }
}

/// A consumer context that does not log the end of a partition, which readers reach on
/// purpose.
struct Quiet;

impl ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "Output reader error.");
        }
    }
}

impl ConsumerContext for Quiet {}
