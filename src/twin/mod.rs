//! The digital twin: its model, the readings merged into it, and the merge itself.
//!
//! Everything here is synchronous, deterministic and free of IO: replaying the same readings
//! onto the same twin yields the same twin. The model is data, derived from the telemetry
//! schema (see `codec`), so adding a property to a schema needs no code change.
//!
//! Invariants:
//! - a property holds the value with the newest event time seen for that property; a reading
//!   older than the stored value never overwrites it;
//! - `version` grows by exactly one per applied change, so `(asset_id, version)` names a state.

mod desired;
mod model;

pub use desired::{
    Command, CommandEvent, CommandState, DesiredValue, DesiredWrite, DeviceResult, Effects,
    MAX_COMMAND_ID_BYTES, MAX_NOTE_BYTES, Unapplied, command_id,
};
pub use model::{
    ActiveWhen, DesiredPolicy, MAX_ASSET_ID_BYTES, MAX_PROPERTIES, MAX_STRING_BYTES, Model,
    PropKind, PropertyDef, TimePolicy, Untimely,
};

use std::fmt;

/// A property value. Float and int schema types widen to `Double` and `Long` in memory and
/// narrow again on output.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `double` or `float`.
    Double(f64),
    /// `long` or `int`.
    Long(i64),
    /// `boolean`.
    Bool(bool),
    /// `string`.
    Str(Box<str>),
}

impl Value {
    /// The value as a number, for rules and status; `None` for strings.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(v) => Some(*v),
            Value::Long(v) => Some(*v as f64),
            Value::Bool(v) => Some(if *v { 1.0 } else { 0.0 }),
            Value::Str(_) => None,
        }
    }
}

/// One decoded reading. Readings are partial: `values` holds only the measured properties.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// The asset the reading is about.
    pub asset_id: String,
    /// Device time of the reading, epoch milliseconds.
    pub event_time: i64,
    /// `(property index in the model, value)`, in schema order.
    pub values: Vec<(usize, Value)>,
}

impl Reading {
    /// Empties the reading for reuse without freeing its buffers.
    pub fn clear(&mut self) {
        self.asset_id.clear();
        self.event_time = 0;
        self.values.clear();
    }
}

/// Operating status of an asset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Reporting and moving (or, for models without a motion property, reporting).
    Active,
    /// Reporting but standing still.
    Idle,
    /// Silent for too long.
    Offline,
}

impl Status {
    /// All statuses, in schema symbol order.
    pub const ALL: [Status; 3] = [Status::Active, Status::Idle, Status::Offline];

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Status::Active => "ACTIVE",
            Status::Idle => "IDLE",
            Status::Offline => "OFFLINE",
        }
    }
}

/// How serious an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Severity {
    /// For information.
    Info,
    /// Needs attention.
    Warning,
    /// Needs action now.
    Critical,
}

impl Severity {
    /// All severities, in schema symbol order.
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Severity::Info => "INFO",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// A property's current value and the event time of the reading it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Prop {
    /// The value.
    pub value: Value,
    /// Event time of the reading that set it, epoch milliseconds.
    pub time: i64,
}

/// An alert that is raised and not yet cleared.
#[derive(Clone, Debug, PartialEq)]
pub struct ActiveAlert {
    /// Deterministic id, shared by the RAISED and CLEARED events.
    pub alert_id: String,
    /// Rule code.
    pub code: String,
    /// Rule severity at raise time.
    pub severity: Severity,
    /// Property value that raised it.
    pub value: f64,
    /// Rule threshold at raise time.
    pub threshold: f64,
    /// Event time of the raising reading.
    pub raised_at: i64,
    /// Processing time of its acknowledgement, if acknowledged.
    pub acknowledged_at: Option<i64>,
    /// Who acknowledged it.
    pub acknowledged_by: Option<String>,
}

/// A rule whose condition holds but not yet for its minimum duration.
#[derive(Clone, Debug, PartialEq)]
pub struct PendingAlert {
    /// Rule code.
    pub code: String,
    /// Event time since which the condition has held.
    pub since: i64,
}

/// The state of one asset.
#[derive(Clone, Debug, PartialEq)]
pub struct Twin {
    /// The asset id (also the Kafka key).
    pub asset_id: String,
    /// Grows by one per change; 0 means "never changed" (a fresh twin).
    pub version: i64,
    /// Event time of the newest applied reading.
    pub event_time: i64,
    /// Processing time at which the newest reading was applied: when the asset was last
    /// heard from.
    pub last_seen: i64,
    /// Processing time of the newest change, by a reading or a timer.
    pub updated_at: i64,
    /// Processing time since which the asset has been standing still; `None` while moving.
    pub still_since: Option<i64>,
    /// Derived operating status.
    pub status: Status,
    /// One slot per model property, `None` until first reported.
    pub props: Vec<Option<Prop>>,
    /// Raised alerts, in rule order.
    pub alerts: Vec<ActiveAlert>,
    /// Rules whose condition holds, waiting out their minimum duration, in rule order.
    pub pending: Vec<PendingAlert>,
    /// Grows by one with every accepted desired write; 0 before the first.
    pub desired_version: i64,
    /// Desired values, in property order.
    pub desired: Vec<DesiredValue>,
    /// The desired properties not reached: a bit per property index (see
    /// [`Twin::update_delta`]).
    pub delta: u128,
    /// Open commands, in the order they were issued.
    pub commands: Vec<Command>,
    /// The windows of the model's forecast rules, in rule order.
    pub forecasts: Vec<ForecastWindow>,
}

/// A forecast rule's window in a twin: the readings its line is fitted through.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForecastWindow {
    /// The rule's code.
    pub code: String,
    /// `(event time, value)`, oldest first, distinct times, at most
    /// `rules::forecast::MAX_POINTS`.
    pub points: Vec<(i64, f64)>,
}

/// Which properties an applied reading changed. A bit per model property index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwinChange {
    /// Properties whose value changed.
    pub changed: u128,
    /// The twin did not exist before this reading.
    pub created: bool,
}

impl TwinChange {
    /// Whether property `index` changed value.
    pub fn changed(&self, index: usize) -> bool {
        self.changed & (1u128 << index) != 0
    }
}

/// Why a reading changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoChange {
    /// Same event time and same content as what the twin already holds.
    Duplicate,
    /// Older than every property it carries: the twin already holds newer values.
    Stale,
}

impl NoChange {
    /// Every reason, in the order of the discriminants.
    pub const ALL: [NoChange; 2] = [NoChange::Duplicate, NoChange::Stale];

    /// The bounded reason label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            NoChange::Duplicate => "duplicate",
            NoChange::Stale => "stale",
        }
    }
}

impl Twin {
    /// A twin of `model` that has never received a reading.
    pub fn new(asset_id: &str, model: &Model) -> Twin {
        Twin::blank(asset_id.to_owned(), model.properties.len())
    }

    /// A twin with `properties` properties that has never received a reading.
    pub fn blank(asset_id: String, properties: usize) -> Twin {
        Twin {
            asset_id,
            version: 0,
            event_time: 0,
            last_seen: 0,
            updated_at: 0,
            still_since: None,
            status: Status::Active,
            props: vec![None; properties],
            alerts: Vec::new(),
            pending: Vec::new(),
            desired_version: 0,
            desired: Vec::new(),
            delta: 0,
            commands: Vec::new(),
            forecasts: Vec::new(),
        }
    }

    /// The current value of property `index`, if reported.
    pub fn value(&self, index: usize) -> Option<&Value> {
        self.props
            .get(index)
            .and_then(|p| p.as_ref())
            .map(|p| &p.value)
    }

    /// Merges `reading` into the twin at processing time `now` (epoch ms).
    ///
    /// Each property keeps the value with the newest event time; a reading newer for some
    /// properties and older for others updates only the newer ones. Returns what changed, or
    /// why nothing did. On a change, `version` grows by one and `last_seen` becomes `now`.
    pub fn apply(
        &mut self,
        model: &Model,
        reading: &Reading,
        now: i64,
    ) -> Result<TwinChange, NoChange> {
        let created = self.version == 0;
        let mut changed = 0u128;
        let mut newer = reading.event_time > self.event_time;
        for (index, value) in &reading.values {
            let slot = &mut self.props[*index];
            match slot {
                Some(prop) if prop.time > reading.event_time => {}
                Some(prop) if prop.time == reading.event_time && prop.value == *value => {}
                Some(prop) => {
                    if prop.value != *value {
                        changed |= 1u128 << index;
                        prop.value = value.clone();
                    }
                    if prop.time != reading.event_time {
                        prop.time = reading.event_time;
                        newer = true;
                    }
                }
                None => {
                    changed |= 1u128 << index;
                    newer = true;
                    *slot = Some(Prop {
                        value: value.clone(),
                        time: reading.event_time,
                    });
                }
            }
        }
        if !created && changed == 0 && !newer {
            // A duplicate is what the twin still holds: every value it carries is there at
            // its event time. One whose values were since overwritten by newer readings is
            // stale, duplicate or not: the twin no longer holds it.
            let held = |(index, value): &(usize, Value)| {
                self.props[*index]
                    .as_ref()
                    .is_some_and(|p| p.time == reading.event_time && p.value == *value)
            };
            let duplicate = if reading.values.is_empty() {
                reading.event_time == self.event_time
            } else {
                reading.values.iter().all(held)
            };
            return Err(if duplicate {
                NoChange::Duplicate
            } else {
                NoChange::Stale
            });
        }
        self.event_time = self.event_time.max(reading.event_time);
        self.last_seen = now;
        self.updated_at = now;
        self.version += 1;
        self.still_since = if model.is_still(self) {
            self.still_since.or(Some(now))
        } else {
            None
        };
        self.status = model.status_at(self, now);
        Ok(TwinChange { changed, created })
    }

    /// Moves the status on by processing time alone (offline, idle) at `now`. Returns whether
    /// it changed; a change, like a reading's, grows `version` by one.
    pub fn tick(&mut self, model: &Model, now: i64) -> bool {
        if self.version == 0 {
            return false;
        }
        let status = model.status_at(self, now);
        if status == self.status {
            return false;
        }
        self.status = status;
        self.updated_at = now;
        self.version += 1;
        true
    }
}

#[cfg(test)]
mod tests;
