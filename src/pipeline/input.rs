//! The inputs of a partition worker, and the input record as the processor sees it: plain
//! slices and numbers, no Kafka type, so the worker, the tests and the benchmarks feed it
//! alike.

use crate::topology::Topics;

/// An input record's headers as bytes. Kafka allows any bytes in a header's name, so a
/// name need not be UTF-8, and a value may be null.
pub trait RecordHeaders {
    /// Calls `f` with each header's name and value, in order.
    fn each(&self, f: &mut dyn FnMut(&[u8], Option<&[u8]>));
}

impl RecordHeaders for &[(&[u8], Option<&[u8]>)] {
    fn each(&self, f: &mut dyn FnMut(&[u8], Option<&[u8]>)) {
        for (name, value) in self.iter() {
            f(name, *value);
        }
    }
}

/// One input record.
pub struct Input<'a> {
    /// Record key (should be the asset id).
    pub key: Option<&'a [u8]>,
    /// Record value.
    pub payload: Option<&'a [u8]>,
    /// Input topic.
    pub topic: &'a str,
    /// Input offset.
    pub offset: i64,
    /// Original headers, copied onto a dead letter.
    pub headers: Option<&'a dyn RecordHeaders>,
}

/// The inputs of a partition worker. Each is a topic partitioned like the telemetry: the
/// worker of telemetry partition `p` reads partition `p` of each, and stores each input's
/// position with the twins, in the same write (and, under exactly-once, the same
/// transaction). Adding an input is a variant here and an arm in
/// [`super::Processor::process_input`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputKind {
    /// Telemetry readings: the topic the group subscribes to. A partition nobody processed
    /// starts where the consumer's `auto.offset.reset` says.
    Readings,
    /// Alert and command acknowledgements: a companion, assigned with the telemetry
    /// partition of its number. A partition nobody processed starts at its beginning:
    /// applying an acknowledgement again changes nothing.
    Acks,
    /// Desired-state writes: a companion like the acknowledgements. A partition nobody
    /// processed starts at its beginning: a write applied again is a repeat (its command
    /// id is an open command's) or supersedes nothing new.
    Desired,
}

impl InputKind {
    /// Every input, the group's first.
    pub const ALL: [InputKind; 3] = [InputKind::Readings, InputKind::Acks, InputKind::Desired];

    /// The input's topic.
    pub fn topic(self, topics: &Topics) -> &str {
        match self {
            InputKind::Readings => &topics.telemetry.name,
            InputKind::Acks => &topics.acks.name,
            InputKind::Desired => &topics.desired.name,
        }
    }

    /// Whether the group subscribes to it (the others are companions).
    pub fn is_group(self) -> bool {
        self == InputKind::Readings
    }

    /// The bounded label of its records, for metrics.
    pub fn label(self) -> &'static str {
        match self {
            InputKind::Readings => "reading",
            InputKind::Acks => "ack",
            InputKind::Desired => "desired",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A value per input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerInput<T>([T; InputKind::ALL.len()]);

impl<T: Copy> PerInput<T> {
    /// The same value for every input.
    pub fn all(value: T) -> Self {
        PerInput([value; InputKind::ALL.len()])
    }

    /// The value of `kind`.
    pub fn get(&self, kind: InputKind) -> T {
        self.0[kind.index()]
    }

    /// Sets the value of `kind`.
    pub fn set(&mut self, kind: InputKind, value: T) {
        self.0[kind.index()] = value;
    }

    /// Each input with its value.
    pub fn iter(&self) -> impl Iterator<Item = (InputKind, T)> + '_ {
        InputKind::ALL.into_iter().map(|k| (k, self.get(k)))
    }
}
