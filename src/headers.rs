//! The `twinflow.*` headers on output records: the one place their names are spelled.
//!
//! - Changelog records carry [`SOURCE_OFFSET`]: the input offset the change came from (for a
//!   timer, the partition's position − 1). A restore applies only records from input before
//!   where processing resumes; latency tools match it with the input record.
//! - Dead letters carry the original key, value and headers, plus why ([`ERROR_REASON`],
//!   [`ERROR_STAGE`], [`ERROR_MESSAGE`]), where from ([`SOURCE_TOPIC`], [`SOURCE_PARTITION`],
//!   [`SOURCE_OFFSET`]), and what of the original they could not carry
//!   ([`DEAD_LETTER_OMITTED`]).

/// Input topic of the record.
pub const SOURCE_TOPIC: &str = "twinflow.source.topic";
/// Input partition of the record.
pub const SOURCE_PARTITION: &str = "twinflow.source.partition";
/// Input offset of the record (decimal).
pub const SOURCE_OFFSET: &str = "twinflow.source.offset";
/// Why a record was dead-lettered: a `metrics::DeadLetterReason` label.
pub const ERROR_REASON: &str = "twinflow.error.reason";
/// Where processing stopped: `decode`, `validate`, `time`, `ack` or `internal`.
pub const ERROR_STAGE: &str = "twinflow.error.stage";
/// The error, at most 1 KiB.
pub const ERROR_MESSAGE: &str = "twinflow.error.message";
/// What a dead letter could not carry of the original record, with sizes.
pub const DEAD_LETTER_OMITTED: &str = "twinflow.dead_letter.omitted";
