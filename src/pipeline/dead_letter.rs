//! Dead letters: an input record the pipeline cannot apply goes to the dead-letter topic
//! with why, as far as a record the producer sends can carry it.
//!
//! A dead letter carries the original key, value and headers, plus twinflow's headers
//! ([`crate::headers`]): the reason (a [`DeadLetterReason`] label, the same as the metric's),
//! the stage and the message, and where the record came from. When the original does not fit
//! in `max_record_bytes` (the producer's `message.max.bytes`), it leaves out the largest of
//! value, original headers and key until the rest fits, and names what it left out, with
//! sizes, in `twinflow.dead_letter.omitted`. A header name that is not UTF-8 cannot be
//! produced, so such a header is left out and counted in the same note. The message is cut
//! to 1 KiB.

use super::input::Input;
use super::output::{OutputHeader, Outputs, Target};
use crate::headers;
use crate::metrics::DeadLetterReason;

/// Room left in a dead letter for the record framing librdkafka counts against
/// `message.max.bytes` (record header varints, timestamps; about 40 bytes) and per header.
const RECORD_OVERHEAD: usize = 128;
const HEADER_OVERHEAD: usize = 12;

/// Longest `twinflow.error.message`: a message quoting hostile input stays small.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Where processing of a record stopped: the `twinflow.error.stage` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Decoding the value.
    Decode,
    /// Checking it against the model (ranges, key, sizes).
    Validate,
    /// Checking its event time.
    Time,
    /// Reading an acknowledgement.
    Ack,
    /// Reading a desired-state write.
    Desired,
    /// A panic while processing it (a bug).
    Internal,
    /// The MQTT bridge, turning a device's message into a record.
    Bridge,
}

impl Stage {
    /// The header value.
    pub fn label(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Validate => "validate",
            Stage::Time => "time",
            Stage::Ack => "ack",
            Stage::Desired => "desired",
            Stage::Internal => "internal",
            Stage::Bridge => "bridge",
        }
    }
}

/// Why a record is dead-lettered.
pub struct Why<'a> {
    /// The reason, as counted.
    pub reason: DeadLetterReason,
    /// Where processing stopped.
    pub stage: Stage,
    /// What went wrong, for a person.
    pub message: &'a str,
}

/// Stages `input`, of input partition `partition`, as a dead letter in `outputs`, within
/// `max_record_bytes`; see the module documentation.
pub fn dead_letter(
    outputs: &mut Outputs,
    input: &Input<'_>,
    partition: i32,
    why: &Why<'_>,
    max_record_bytes: usize,
) {
    let mut copied: Vec<OutputHeader> = Vec::new();
    let mut original_bytes = 0;
    let mut not_utf8 = 0;
    if let Some(h) = input.headers {
        h.each(&mut |name, value| match std::str::from_utf8(name) {
            Ok(name) => {
                original_bytes += name.len() + value.map_or(0, <[u8]>::len) + HEADER_OVERHEAD;
                copied.push((name.to_owned(), value.map(<[u8]>::to_vec)));
            }
            Err(_) => not_utf8 += 1,
        });
    }
    let mut message = why.message;
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message = &message[..end];
    }
    let ours = [
        (headers::ERROR_REASON, why.reason.label().to_owned()),
        (headers::ERROR_STAGE, why.stage.label().to_owned()),
        (headers::ERROR_MESSAGE, message.to_owned()),
        (headers::SOURCE_TOPIC, input.topic.to_owned()),
        (headers::SOURCE_PARTITION, partition.to_string()),
        (headers::SOURCE_OFFSET, input.offset.to_string()),
    ];
    // What is left for the original's key, value and headers, keeping room for the
    // note on what was left out.
    let fixed: usize = ours
        .iter()
        .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
        .sum::<usize>()
        + RECORD_OVERHEAD
        + headers::DEAD_LETTER_OMITTED.len()
        + 256;
    let room = max_record_bytes.saturating_sub(fixed);
    let (mut key, mut value) = (input.key, input.payload);
    let mut omitted = Vec::new();
    // Leave out the largest of value, headers and key until the rest fits.
    loop {
        let sizes = [
            value.map_or(0, <[u8]>::len),
            if copied.is_empty() { 0 } else { original_bytes },
            key.map_or(0, <[u8]>::len),
        ];
        if sizes.iter().sum::<usize>() <= room {
            break;
        }
        let largest = (0..3).max_by_key(|i| sizes[*i]).expect("three parts");
        match largest {
            0 => {
                omitted.push(format!("value: {} bytes", sizes[0]));
                value = None;
            }
            1 => {
                omitted.push(format!("headers: {}, {} bytes", copied.len(), sizes[1]));
                copied.clear();
            }
            _ => {
                omitted.push(format!("key: {} bytes", sizes[2]));
                key = None;
            }
        }
    }
    if !omitted.is_empty() {
        omitted.push(format!(
            "over the largest record the producer sends (message.max.bytes = {})",
            max_record_bytes
        ));
    }
    if not_utf8 > 0 {
        omitted.push(format!(
            "headers: {not_utf8} whose names are not UTF-8 cannot be copied"
        ));
    }
    for (name, value) in ours {
        copied.push((name.to_owned(), Some(value.into_bytes())));
    }
    if !omitted.is_empty() {
        copied.push((
            headers::DEAD_LETTER_OMITTED.to_owned(),
            Some(omitted.join("; ").into_bytes()),
        ));
    }
    outputs.push(Target::DeadLetter, input.offset, key, value, copied);
}
