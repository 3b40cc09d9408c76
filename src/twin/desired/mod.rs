//! Desired state: what operators and systems want an asset to do, the commands that carry
//! it to the device, and whether the asset did it.
//!
//! A twin holds, per writable property, at most one desired value, tagged with the command
//! that set it. A command is open (ISSUED, DELIVERED, TIMED_OUT) while it owns a desired
//! value; it ends CONVERGED when a reading at or after its `set_at` brings every value it
//! owns within tolerance, REJECTED when the device refuses it, SUPERSEDED when newer writes
//! took over every value it owned. Like the rest of the twin, this is deterministic and free
//! of IO: the same writes, readings, acknowledgements and clock give the same twin and the
//! same events.

use super::{Model, Twin, Value};

/// Longest command id accepted, in bytes.
pub const MAX_COMMAND_ID_BYTES: usize = 128;

/// Longest `set_by` or device `detail` kept, in bytes (longer ones are cut).
pub const MAX_NOTE_BYTES: usize = 256;

/// A value someone wants a property to have.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredValue {
    /// Property index in the model.
    pub property: usize,
    /// The wanted value.
    pub value: Value,
    /// Processing time at which the owner accepted it.
    pub set_at: i64,
    /// Who set it: the credential's or rule's name, never a secret.
    pub set_by: String,
    /// The command that carries it.
    pub command_id: String,
}

/// Where a command is in its life. The first three are open, the rest final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandState {
    /// Accepted and sent to the device.
    Issued,
    /// The device acknowledged it.
    Delivered,
    /// Every value it carries was reported within tolerance.
    Converged,
    /// The device refused it, or its write lost a version race.
    Rejected,
    /// Not converged within `converge_within`; still open: it may converge later.
    TimedOut,
    /// Newer writes replaced every value it carried.
    Superseded,
    /// Its twin was deleted (only on the command event topic: a twin never keeps it).
    Cancelled,
}

impl CommandState {
    /// All states, in schema symbol order.
    pub const ALL: [CommandState; 7] = [
        CommandState::Issued,
        CommandState::Delivered,
        CommandState::Converged,
        CommandState::Rejected,
        CommandState::TimedOut,
        CommandState::Superseded,
        CommandState::Cancelled,
    ];

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            CommandState::Issued => "ISSUED",
            CommandState::Delivered => "DELIVERED",
            CommandState::Converged => "CONVERGED",
            CommandState::Rejected => "REJECTED",
            CommandState::TimedOut => "TIMED_OUT",
            CommandState::Superseded => "SUPERSEDED",
            CommandState::Cancelled => "CANCELLED",
        }
    }

    /// Whether the command can still move on.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            CommandState::Issued | CommandState::Delivered | CommandState::TimedOut
        )
    }
}

/// An open command, as the twin keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    /// Unique id: given by the writer, or derived from the input position that set it.
    pub command_id: String,
    /// The twin's `desired_version` the command's write made.
    pub desired_version: i64,
    /// Where it is (always open while kept).
    pub state: CommandState,
    /// Processing time it was accepted.
    pub issued_at: i64,
    /// When it times out (`converge_within` after `issued_at`); `None` never.
    pub expires_at: Option<i64>,
    /// How often it was sent: 1, and one more for each re-send after the asset came back.
    pub attempt: i64,
    /// Who wrote it.
    pub set_by: String,
}

impl Command {
    /// Its transition to `state` at `at`, for `detail`.
    fn event(&self, state: CommandState, at: i64, detail: Option<String>) -> CommandEvent {
        CommandEvent {
            command_id: self.command_id.clone(),
            state,
            desired_version: self.desired_version,
            at,
            set_by: self.set_by.clone(),
            detail,
        }
    }
}

/// One command transition, ready to encode.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandEvent {
    /// The command.
    pub command_id: String,
    /// Its new state.
    pub state: CommandState,
    /// The desired version its write made (for a rejected write: the twin's current one).
    pub desired_version: i64,
    /// Processing time of the transition (for CONVERGED: the converging reading's event time;
    /// for TIMED_OUT: the deadline).
    pub at: i64,
    /// Who wrote the command.
    pub set_by: String,
    /// Why, in words: the conflict, the device's detail, the superseding command.
    pub detail: Option<String>,
}

/// A request to change desired values: a JSON Merge Patch of the desired properties.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredWrite {
    /// The command id to give the change.
    pub command_id: String,
    /// `(property index, value)`; `None` removes the desired value.
    pub values: Vec<(usize, Option<Value>)>,
    /// Apply only if the twin's `desired_version` is this (optimistic concurrency).
    pub if_match: Option<i64>,
    /// Who writes (the credential's name).
    pub by: String,
}

/// Why a write or acknowledgement changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unapplied {
    /// The write's command id is an open command's: it was applied before.
    Repeated,
    /// No open command has the acknowledged id (unknown, or finished).
    Unknown,
    /// The acknowledgement says what the command's state already says.
    Stale,
}

impl Unapplied {
    /// Every reason, in the order of the discriminants.
    pub const ALL: [Unapplied; 3] = [Unapplied::Repeated, Unapplied::Unknown, Unapplied::Stale];

    /// The bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Unapplied::Repeated => "repeated",
            Unapplied::Unknown => "unknown",
            Unapplied::Stale => "stale",
        }
    }
}

/// A device's answer to a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceResult {
    /// It took the command.
    Accepted,
    /// It refused it.
    Rejected,
    /// It says it did it (convergence is still judged by its readings).
    Done,
}

/// What a change to desired state produced: transitions, and commands to send to the device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    /// Transitions, in order.
    pub events: Vec<CommandEvent>,
    /// Ids of commands to send now (new, or again after the asset came back).
    pub sends: Vec<String>,
    /// For each command that converged: milliseconds from its issue to the reading that
    /// reached it.
    pub converged_after: Vec<i64>,
}

impl Effects {
    /// Nothing happened.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.sends.is_empty()
    }

    /// Forgets everything, keeping the buffers.
    pub fn clear(&mut self) {
        self.events.clear();
        self.sends.clear();
        self.converged_after.clear();
    }
}

/// The deterministic id of a command given no id by its writer: from the input record that
/// carried it, so a replay gives the same id.
pub fn command_id(asset_id: &str, topic: &str, partition: i32, offset: i64) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [asset_id.as_bytes(), topic.as_bytes()] {
        h.update(part);
        h.update(&[0]);
    }
    h.update(&partition.to_be_bytes());
    h.update(&offset.to_be_bytes());
    format!("{:032x}", h.digest128())
}

/// Cuts `text` to at most [`MAX_NOTE_BYTES`] bytes on a character boundary.
pub fn note(text: &str) -> String {
    let mut end = text.len().min(MAX_NOTE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl Model {
    /// Whether `reported` is within the tolerance of property `index` of `desired`.
    pub fn within_tolerance(&self, index: usize, desired: &Value, reported: &Value) -> bool {
        match (desired.as_f64(), reported.as_f64(), desired) {
            (_, _, Value::Str(_)) | (_, _, Value::Bool(_)) => desired == reported,
            (Some(d), Some(r), _) => (d - r).abs() <= self.properties[index].tolerance,
            _ => false,
        }
    }

    /// Checks a write against the model: writable properties, values of their type, finite
    /// and inside the configured ranges.
    ///
    /// # Errors
    /// A message naming the offending property.
    pub fn validate_desired(&self, write: &DesiredWrite) -> Result<(), String> {
        if write.values.is_empty() {
            return Err("the write sets no property".into());
        }
        if write.command_id.is_empty() || write.command_id.len() > MAX_COMMAND_ID_BYTES {
            return Err(format!(
                "command_id must be 1 to {MAX_COMMAND_ID_BYTES} bytes long"
            ));
        }
        for (index, value) in &write.values {
            let def = &self.properties[*index];
            if !def.writable {
                return Err(format!("{} is not a desired (writable) property", def.name));
            }
            let Some(value) = value else { continue };
            let fits = matches!(
                (value, def.kind),
                (
                    Value::Double(_),
                    super::PropKind::Double | super::PropKind::Float
                ) | (Value::Long(_), super::PropKind::Long | super::PropKind::Int)
                    | (Value::Bool(_), super::PropKind::Bool)
                    | (Value::Str(_), super::PropKind::Str)
            );
            if !fits {
                return Err(format!(
                    "{} takes a {} value",
                    def.name,
                    def.kind.avro_name()
                ));
            }
            self.check_value(*index, value)?;
        }
        Ok(())
    }
}

impl Twin {
    /// Recomputes [`Twin::delta`]: the desired properties whose reported value is outside
    /// tolerance (or not reported). Every change to desired or reported values calls it.
    pub fn update_delta(&mut self, model: &Model) {
        let mut delta = 0u128;
        for d in &self.desired {
            let reached = self
                .value(d.property)
                .is_some_and(|r| model.within_tolerance(d.property, &d.value, r));
            if !reached {
                delta |= 1u128 << d.property;
            }
        }
        self.delta = delta;
    }

    /// Applies a desired write at processing time `now` (check it first with
    /// [`Model::validate_desired`]). An accepted write moves `desired_version` and `version`
    /// on by one, issues its command (when it sets any value) and supersedes the commands
    /// left with no value. A write whose `if_match` is not the current `desired_version`,
    /// or to a twin that has no reading yet, is REJECTED: the twin does not change, the
    /// event is the writer's answer.
    ///
    /// # Errors
    /// [`Unapplied::Repeated`] when the command id is an open command's.
    pub fn set_desired(
        &mut self,
        model: &Model,
        write: &DesiredWrite,
        now: i64,
        out: &mut Effects,
    ) -> Result<(), Unapplied> {
        if self
            .commands
            .iter()
            .any(|c| c.command_id == write.command_id)
        {
            return Err(Unapplied::Repeated);
        }
        let conflict = if self.version == 0 {
            // Desired state needs a twin: a write cannot bring an asset into being.
            Some("unknown_asset: no reading of this asset has been applied".to_owned())
        } else {
            write
                .if_match
                .filter(|v| *v != self.desired_version)
                .map(|expected| {
                    format!(
                        "version_conflict: If-Match {expected}, current desired_version {}",
                        self.desired_version
                    )
                })
        };
        if let Some(detail) = conflict {
            out.events.push(CommandEvent {
                command_id: write.command_id.clone(),
                state: CommandState::Rejected,
                desired_version: self.desired_version,
                at: now,
                set_by: note(&write.by),
                detail: Some(detail),
            });
            return Ok(());
        }
        self.touch(now);
        self.write_desired(model, write, now, out);
        Ok(())
    }

    /// Applies `write` as part of the twin's current change (it does not move `version`):
    /// `desired_version` moves on by one, its command is issued (when it sets any value) and
    /// the commands left with no value are superseded. [`Twin::set_desired`] decides
    /// whether a write is accepted; a rule's action is, as part of the reading that raised
    /// it (see [`crate::rules::RuleSet::act`]).
    pub fn write_desired(
        &mut self,
        model: &Model,
        write: &DesiredWrite,
        now: i64,
        out: &mut Effects,
    ) {
        self.desired_version += 1;
        let mut sets = false;
        for (index, value) in &write.values {
            let at = self.desired.iter().position(|d| d.property >= *index);
            let existing = at.filter(|&i| self.desired[i].property == *index);
            match (value, existing) {
                (None, Some(i)) => {
                    self.desired.remove(i);
                }
                (None, None) => {}
                (Some(value), _) => {
                    sets = true;
                    let entry = DesiredValue {
                        property: *index,
                        value: value.clone(),
                        set_at: now,
                        set_by: note(&write.by),
                        command_id: write.command_id.clone(),
                    };
                    match (existing, at) {
                        (Some(i), _) => self.desired[i] = entry,
                        (None, Some(i)) => self.desired.insert(i, entry),
                        (None, None) => self.desired.push(entry),
                    }
                }
            }
        }
        let version = self.desired_version;
        let detail = format!(
            "replaced by {} (desired_version {version})",
            write.command_id
        );
        self.close_orphans(now, &detail, out);
        let command = Command {
            command_id: write.command_id.clone(),
            desired_version: version,
            state: CommandState::Issued,
            issued_at: now,
            expires_at: model.desired.converge_within.map(|w| now.saturating_add(w)),
            attempt: 1,
            set_by: note(&write.by),
        };
        if sets {
            out.events
                .push(command.event(CommandState::Issued, now, None));
            out.sends.push(write.command_id.clone());
            self.commands.push(command);
        } else {
            // Only removals: accepted, with nothing for the device to reach.
            let detail = "nothing to reach: the write only removes desired values";
            out.events
                .push(command.event(CommandState::Converged, now, Some(detail.into())));
        }
        // A reading stamped at or after the write may have been applied before it: the
        // inputs are separate topics. It counts as it would have after the write.
        self.update_delta(model);
        self.converge(model, out);
    }

    /// Ends every open command as CANCELLED, with `detail`, and forgets the desired values:
    /// the twin is being deleted at processing time `now`.
    pub fn cancel_commands(&mut self, now: i64, detail: &str, out: &mut Effects) {
        for c in self.commands.drain(..) {
            let detail = Some(detail.to_owned());
            out.events
                .push(c.event(CommandState::Cancelled, now, detail));
        }
        self.desired.clear();
        self.delta = 0;
    }

    /// Ends as SUPERSEDED every open command that owns no desired value any more.
    fn close_orphans(&mut self, now: i64, detail: &str, out: &mut Effects) {
        let desired = &self.desired;
        self.commands.retain(|c| {
            let owns = desired.iter().any(|d| d.command_id == c.command_id);
            if !owns {
                let detail = Some(detail.to_owned());
                out.events
                    .push(c.event(CommandState::Superseded, now, detail));
            }
            owns
        });
    }

    /// After a reading was applied: ends as CONVERGED every open command whose values are
    /// all reported within tolerance by readings at or after their `set_at`, and clears
    /// those values if the model says so. Part of the reading's change (no version of its
    /// own).
    pub fn converge(&mut self, model: &Model, out: &mut Effects) {
        if self.desired.is_empty() {
            return;
        }
        self.update_delta(model);
        if self.commands.is_empty() {
            return;
        }
        let mut at = 0;
        while at < self.commands.len() {
            let id = &self.commands[at].command_id;
            let mut reached_at = i64::MIN;
            let reached = self
                .desired
                .iter()
                .filter(|d| d.command_id == *id)
                .all(|d| {
                    let Some(p) = self.props[d.property].as_ref() else {
                        return false;
                    };
                    reached_at = reached_at.max(p.time);
                    p.time >= d.set_at && model.within_tolerance(d.property, &d.value, &p.value)
                });
            if !reached {
                at += 1;
                continue;
            }
            let command = self.commands.remove(at);
            out.converged_after
                .push(reached_at.saturating_sub(command.issued_at).max(0));
            if model.desired.clear_reached {
                self.desired.retain(|d| d.command_id != command.command_id);
            }
            out.events
                .push(command.event(CommandState::Converged, reached_at, None));
        }
        self.update_delta(model);
    }

    /// After a reading brought the asset back from OFFLINE: sends again every open command
    /// with a value still outside tolerance, as its next attempt. Part of the reading's
    /// change.
    pub fn resend(&mut self, out: &mut Effects) {
        let delta = self.delta;
        for command in &mut self.commands {
            let pending = self
                .desired
                .iter()
                .any(|d| d.command_id == command.command_id && delta & (1u128 << d.property) != 0);
            if pending {
                command.attempt += 1;
                out.sends.push(command.command_id.clone());
            }
        }
    }

    /// Times out, at processing time `now`, the commands not converged by their
    /// `expires_at`: TIMED_OUT, still open. Returns whether any did: a change, which the
    /// caller counts ([`Twin::touch`]) unless it is part of another. Every operation on a
    /// twin calls it first, so a timer that fires late changes nothing: the result is the
    /// same as if it had fired on time.
    pub fn expire(&mut self, now: i64, out: &mut Effects) -> bool {
        let mut expired = false;
        for c in &mut self.commands {
            let due = c.expires_at.is_some_and(|at| at <= now);
            if due && c.state != CommandState::TimedOut {
                c.state = CommandState::TimedOut;
                expired = true;
                let at = c.expires_at.unwrap_or(now);
                out.events.push(c.event(CommandState::TimedOut, at, None));
            }
        }
        expired
    }

    /// Counts a change at processing time `now`: `version` grows by one.
    pub fn touch(&mut self, now: i64) {
        self.version += 1;
        self.updated_at = now;
    }

    /// The earliest time an open command times out, if any will.
    pub fn command_deadline(&self) -> Option<i64> {
        self.commands
            .iter()
            .filter(|c| c.state != CommandState::TimedOut)
            .filter_map(|c| c.expires_at)
            .min()
    }

    /// Applies a device's acknowledgement of `command_id` at processing time `now`: accepted
    /// or done makes an ISSUED command DELIVERED; rejected ends it REJECTED and removes the
    /// desired values it owned. A change moves `version` on by one.
    ///
    /// # Errors
    /// [`Unapplied::Unknown`] when no open command has the id; [`Unapplied::Stale`] when the
    /// command is past what the acknowledgement says.
    pub fn device_ack(
        &mut self,
        model: &Model,
        command_id: &str,
        result: DeviceResult,
        detail: Option<&str>,
        now: i64,
        out: &mut Effects,
    ) -> Result<(), Unapplied> {
        let at = self
            .commands
            .iter()
            .position(|c| c.command_id == command_id)
            .ok_or(Unapplied::Unknown)?;
        let detail = detail.map(note);
        match result {
            DeviceResult::Accepted | DeviceResult::Done => {
                let command = &mut self.commands[at];
                if command.state != CommandState::Issued {
                    return Err(Unapplied::Stale);
                }
                command.state = CommandState::Delivered;
                let detail = detail.or_else(|| {
                    (result == DeviceResult::Done).then(|| "device reports done".to_owned())
                });
                out.events
                    .push(command.event(CommandState::Delivered, now, detail));
            }
            DeviceResult::Rejected => {
                let command = self.commands.remove(at);
                self.desired.retain(|d| d.command_id != command.command_id);
                let detail = detail.unwrap_or_else(|| "rejected by the device".to_owned());
                out.events
                    .push(command.event(CommandState::Rejected, now, Some(detail)));
                self.update_delta(model);
            }
        }
        self.touch(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
