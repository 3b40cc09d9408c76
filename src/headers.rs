//! The `twinflow.*` headers on output records: the one place their names are spelled.
//!
//! - Changelog records carry [`SOURCE_OFFSET`]: the input offset the change came from (for a
//!   timer, the partition's position − 1). A restore applies only records from input before
//!   where processing resumes; latency tools match it with the input record. A twin with a
//!   timer carries its [`DEADLINE`].
//! - Dead letters carry the original key, value and headers, plus why ([`ERROR_REASON`],
//!   [`ERROR_STAGE`], [`ERROR_MESSAGE`]), where from ([`SOURCE_TOPIC`], [`SOURCE_PARTITION`],
//!   [`SOURCE_OFFSET`]), and what of the original they could not carry
//!   ([`DEAD_LETTER_OMITTED`]).
//! - A deleted twin's changelog and history tombstone carries how, who, when and which
//!   version ([`DELETED_CAUSE`], [`DELETED_BY`], [`DELETED_AT`], [`DELETED_VERSION`]).
//! - On an input, [`CONTROL`] makes a desired-state record a control record (a delete).

/// Input topic of the record.
pub const SOURCE_TOPIC: &str = "twinflow.source.topic";
/// Input partition of the record.
pub const SOURCE_PARTITION: &str = "twinflow.source.partition";
/// Input offset of the record (decimal).
pub const SOURCE_OFFSET: &str = "twinflow.source.offset";
/// On a changelog twin of a model with timers: when the twin's status next changes by
/// itself, epoch milliseconds (decimal), or [`NO_DEADLINE`]. A restore files the timer
/// from it without decoding the twin (and decodes a record without it).
pub const DEADLINE: &str = "twinflow.deadline";
/// The value of [`DEADLINE`] for a twin whose status changes by no timer now.
pub const NO_DEADLINE: &str = "none";
/// Why a record was dead-lettered: a `metrics::DeadLetterReason` label.
pub const ERROR_REASON: &str = "twinflow.error.reason";
/// Where processing stopped: `decode`, `validate`, `time`, `ack` or `internal`.
pub const ERROR_STAGE: &str = "twinflow.error.stage";
/// The error, at most 1 KiB.
pub const ERROR_MESSAGE: &str = "twinflow.error.message";
/// What a dead letter could not carry of the original record, with sizes.
pub const DEAD_LETTER_OMITTED: &str = "twinflow.dead_letter.omitted";

/// On a record of the desired-state topic: a control record instead of a write. `delete`
/// deletes the twin of the record's key (the value is not read).
pub const CONTROL: &str = "twinflow.control";
/// On a control record: who sends it, for the audit trail (at most 256 bytes are kept).
pub const CONTROL_BY: &str = "twinflow.control.by";
/// On a changelog (and history) tombstone of a deleted twin: `requested` (a delete request)
/// or `retired` (silent for `retire_after`).
pub const DELETED_CAUSE: &str = "twinflow.deleted.cause";
/// On a tombstone: who asked for the deletion (a credential's name, a control record's
/// `twinflow.control.by`), empty for a retirement.
pub const DELETED_BY: &str = "twinflow.deleted.by";
/// On a tombstone: the processing time of the deletion, milliseconds since the epoch
/// (decimal). A restore keeps refusing the id until `refuse_deleted_for` after it.
pub const DELETED_AT: &str = "twinflow.deleted.at";
/// On a tombstone: the deletion's twin version, one more than the last (decimal).
pub const DELETED_VERSION: &str = "twinflow.deleted.version";
