//! The output records of a batch, and where each goes: the one place that chooses an
//! output's topic, partition and headers.
//!
//! - A changelog record goes to the changelog partition of the input's number, keyed by
//!   asset id, with [`headers::SOURCE_OFFSET`] naming the input record it came from,
//!   [`headers::DEADLINE`] when the model has timers (and a deleted twin's tombstone with the
//!   `twinflow.deleted.*` headers).
//! - An alert event goes to the alert topic, keyed by asset id (the producer's partitioner
//!   picks the partition), with no headers.
//! - A command and a command event go to their topics, keyed by asset id (the producer's
//!   partitioner picks the partition), with no headers.
//! - A dead letter goes to the dead-letter topic with the original key, value and headers
//!   and twinflow's own (see [`super::dead_letter`]).

use std::fmt::Write as _;
use std::ops::Range;

use crate::headers;
use crate::topology::Topics;

/// Where an output record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The twin changelog, same partition number as the input.
    Changelog,
    /// The alert topic.
    Alerts,
    /// The dead-letter topic.
    DeadLetter,
    /// The command topic.
    Commands,
    /// The command event topic.
    CommandEvents,
}

/// A header of an output record: a name and a value, which may be null.
pub type OutputHeader = (String, Option<Vec<u8>>);

/// One staged output record; its bytes live in its batch's [`Outputs`].
#[derive(Debug)]
pub struct Output {
    /// Destination.
    pub target: Target,
    /// Offset of the input record it came from.
    pub source: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    /// Headers (dead letters, and a deleted twin's tombstone; a changelog record's source
    /// offset is added when it is routed).
    pub headers: Vec<OutputHeader>,
    /// The record's timestamp (epoch ms): a changelog record's is its twin's `updated_at`,
    /// so the history can be read by processing time; others get the producer's clock.
    pub timestamp: Option<i64>,
    /// A changelog twin's timer deadline (epoch ms) or `Some(None)` for none, when the
    /// model has timers; `None` writes no deadline header.
    pub deadline: Option<Option<i64>>,
}

/// An output record as the producer takes it.
pub struct Routed<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition; `None` leaves it to the producer's partitioner (by key).
    pub partition: Option<i32>,
    /// Key.
    pub key: Option<&'a [u8]>,
    /// Value.
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: Vec<(&'a str, Option<&'a [u8]>)>,
    /// Timestamp; `None` leaves it to the producer.
    pub timestamp: Option<i64>,
}

/// The output records of a batch, sharing one buffer.
#[derive(Debug, Default)]
pub struct Outputs {
    buf: Vec<u8>,
    /// The records, in emission order.
    pub records: Vec<Output>,
}

impl Outputs {
    /// Pushes a record with the given key, value and headers.
    pub fn push(
        &mut self,
        target: Target,
        source: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: Vec<OutputHeader>,
    ) {
        let k = key.map(|k| self.append(k));
        let p = payload.map(|p| self.append(p));
        self.records.push(Output {
            target,
            source,
            key: k,
            payload: p,
            headers,
            timestamp: None,
            deadline: None,
        });
    }

    /// Pushes an alert record (or any other with a value), its value framed by `header` if
    /// given.
    pub fn push_value(
        &mut self,
        target: Target,
        source: i64,
        key: &[u8],
        header: Option<[u8; 5]>,
        value: &[u8],
    ) {
        let k = self.append(key);
        let payload = self.framed(header, value);
        self.records.push(Output {
            target,
            source,
            key: Some(k),
            payload: Some(payload),
            headers: Vec::new(),
            timestamp: None,
            deadline: None,
        });
    }

    /// Pushes a changelog record: the twin of `key` (its value framed by the header if
    /// given), or with no value a tombstone, with `headers`, stamped `at` (the twin's
    /// `updated_at`, or the deletion's time), carrying the twin's timer `deadline` (see
    /// [`Output::deadline`]).
    pub fn push_twin(
        &mut self,
        source: i64,
        key: &[u8],
        value: Option<(Option<[u8; 5]>, &[u8])>,
        headers: Vec<OutputHeader>,
        (at, deadline): (i64, Option<Option<i64>>),
    ) {
        let k = self.append(key);
        let payload = value.map(|(framing, value)| self.framed(framing, value));
        self.records.push(Output {
            target: Target::Changelog,
            source,
            key: Some(k),
            payload,
            headers,
            timestamp: Some(at),
            deadline,
        });
    }

    /// Appends `value`, after the 5-byte framing header if given.
    fn framed(&mut self, header: Option<[u8; 5]>, value: &[u8]) -> Range<usize> {
        let start = self.buf.len();
        self.buf
            .extend_from_slice(header.as_ref().map_or(&[][..], |h| &h[..]));
        self.buf.extend_from_slice(value);
        start..self.buf.len()
    }

    fn append(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.buf.len();
        self.buf.extend_from_slice(bytes);
        start..self.buf.len()
    }

    /// Key and value of a record.
    pub fn bytes(&self, o: &Output) -> (Option<&[u8]>, Option<&[u8]>) {
        (
            o.key.clone().map(|r| &self.buf[r]),
            o.payload.clone().map(|r| &self.buf[r]),
        )
    }

    /// Where and how record `o` of input partition `partition` goes; `scratch` holds the
    /// text of the headers made here.
    pub fn route<'a>(
        &'a self,
        o: &'a Output,
        topics: &'a Topics,
        partition: i32,
        scratch: &'a mut String,
    ) -> Routed<'a> {
        let (key, value) = self.bytes(o);
        let (topic, partition, headers) = match o.target {
            Target::Changelog => {
                scratch.clear();
                let _ = write!(scratch, "{}", o.source);
                let split = scratch.len();
                match o.deadline {
                    Some(Some(deadline)) => _ = write!(scratch, "{deadline}"),
                    Some(None) => scratch.push_str(headers::NO_DEADLINE),
                    None => {}
                }
                let (source, deadline) = scratch.as_bytes().split_at(split);
                let mut headers = vec![(headers::SOURCE_OFFSET, Some(source))];
                if o.deadline.is_some() {
                    headers.push((headers::DEADLINE, Some(deadline)));
                }
                headers.extend(o.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref())));
                (&topics.changelog.name, Some(partition), headers)
            }
            Target::Alerts => (&topics.alerts.name, None, Vec::new()),
            Target::Commands => (&topics.commands.name, None, Vec::new()),
            Target::CommandEvents => (&topics.command_events.name, None, Vec::new()),
            Target::DeadLetter => {
                let headers = o
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_deref()))
                    .collect();
                (&topics.dead_letter.name, None, headers)
            }
        };
        Routed {
            topic,
            partition,
            key,
            value,
            headers,
            timestamp: o.timestamp,
        }
    }

    /// Empties the buffer, keeping its memory.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.records.clear();
    }
}
