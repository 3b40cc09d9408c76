//! The twin model: the list of properties a twin has, derived from the telemetry schema.

use super::{Status, Twin};

/// Most properties a model may have (a change is a 128-bit set).
pub const MAX_PROPERTIES: usize = 128;

/// The type of a property, as the schemas declare it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropKind {
    /// Avro `double`.
    Double,
    /// Avro `float`.
    Float,
    /// Avro `int`.
    Int,
    /// Avro `long`.
    Long,
    /// Avro `boolean`.
    Bool,
    /// Avro `string`.
    Str,
}

impl PropKind {
    /// Whether rules can compare it with a number.
    pub fn is_numeric(self) -> bool {
        !matches!(self, PropKind::Str)
    }

    /// The Avro type name.
    pub fn avro_name(self) -> &'static str {
        match self {
            PropKind::Double => "double",
            PropKind::Float => "float",
            PropKind::Int => "int",
            PropKind::Long => "long",
            PropKind::Bool => "boolean",
            PropKind::Str => "string",
        }
    }
}

/// One property of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct PropertyDef {
    /// Field name in both schemas.
    pub name: String,
    /// Schema type.
    pub kind: PropKind,
    /// Smallest valid value; smaller readings are dead-lettered.
    pub min: Option<f64>,
    /// Largest valid value; larger readings are dead-lettered.
    pub max: Option<f64>,
    /// Whether a desired value may be set (`[desired.properties]`).
    pub writable: bool,
    /// How far a reported number may be from the desired one and count as reached.
    pub tolerance: f64,
}

impl PropertyDef {
    /// A property with no range, not writable.
    pub fn new(name: &str, kind: PropKind) -> PropertyDef {
        PropertyDef {
            name: name.to_owned(),
            kind,
            min: None,
            max: None,
            writable: false,
            tolerance: 0.0,
        }
    }
}

/// When an asset counts as ACTIVE rather than IDLE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActiveWhen {
    /// Property index.
    pub property: usize,
    /// ACTIVE while the property is above this.
    pub above: f64,
}

/// How time bounds readings and drives status, all in milliseconds; `None` turns a bound or
/// timer off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TimePolicy {
    /// A reading older than the twin's newest event time by more than this is refused.
    pub allowed_lateness: Option<i64>,
    /// A reading stamped more than this after processing time is refused.
    pub max_future: Option<i64>,
    /// An asset silent for this long (processing time) becomes OFFLINE.
    pub offline_after: Option<i64>,
    /// An asset standing still for this long (processing time) becomes IDLE; `None` makes
    /// it IDLE with the first still reading.
    pub idle_after: Option<i64>,
    /// A twin silent for this long (processing time) is deleted, as by a delete request
    /// (`[lifecycle] retire_after`), so that the store stays bounded for fleets that churn.
    pub retire_after: Option<i64>,
    /// For this long after a twin was deleted, readings of its id are refused (dead-lettered
    /// with reason `deleted`) instead of creating it again (`[lifecycle] refuse_deleted_for`).
    pub refuse_deleted_for: Option<i64>,
}

/// Longest asset id accepted, in bytes: ids are store keys, record keys and page cursors.
pub const MAX_ASSET_ID_BYTES: usize = 512;

/// Longest string property value accepted, in bytes. With at most [`MAX_PROPERTIES`]
/// properties this bounds a twin (and so its changelog record) well under Kafka's default
/// message size of 1 MB.
pub const MAX_STRING_BYTES: usize = 4096;

/// Why a reading is refused for its time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untimely {
    /// Older than the allowed lateness.
    Late,
    /// Too far ahead of processing time.
    Future,
}

/// The properties of a twin and how its status derives from them.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Properties, in telemetry schema order.
    pub properties: Vec<PropertyDef>,
    /// Status rule; `None` means every reporting asset is ACTIVE.
    pub active_when: Option<ActiveWhen>,
    /// Lateness bounds and status timers.
    pub time: TimePolicy,
    /// How desired values converge.
    pub desired: DesiredPolicy,
}

/// How desired values converge (`[desired]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DesiredPolicy {
    /// A command not converged this long (ms) after it was issued times out; `None` never.
    pub converge_within: Option<i64>,
    /// Whether a reached desired value is removed (the default) or stays as the standing
    /// target.
    pub clear_reached: bool,
}

impl Default for DesiredPolicy {
    fn default() -> Self {
        DesiredPolicy {
            converge_within: None,
            clear_reached: true,
        }
    }
}

impl Model {
    /// Index of the property called `name`.
    pub fn property(&self, name: &str) -> Option<usize> {
        self.properties.iter().position(|p| p.name == name)
    }

    /// The twin's location: its `lat` and `lng` properties, when the model has both and the
    /// twin knows both.
    pub fn location_of(&self, twin: &Twin) -> Option<(f64, f64)> {
        let (lat, lng) = self.location()?;
        Some((twin.value(lat)?.as_f64()?, twin.value(lng)?.as_f64()?))
    }

    /// The indices of the `lat` and `lng` properties, when the model has both.
    pub fn location(&self) -> Option<(usize, usize)> {
        Some((self.property("lat")?, self.property("lng")?))
    }

    /// Whether the twin's values say it is standing still (IDLE rather than ACTIVE).
    pub fn is_still(&self, twin: &Twin) -> bool {
        let Some(rule) = self.active_when else {
            return false;
        };
        matches!(twin.value(rule.property).and_then(|v| v.as_f64()), Some(v) if v <= rule.above)
    }

    /// The status a twin has at processing time `now`: OFFLINE once silent for
    /// `offline_after`, IDLE once still for `idle_after`, else ACTIVE.
    pub fn status_at(&self, twin: &Twin, now: i64) -> Status {
        if self
            .time
            .offline_after
            .is_some_and(|after| now >= twin.last_seen + after)
        {
            return Status::Offline;
        }
        match twin.still_since {
            Some(since) if now >= since + self.time.idle_after.unwrap_or(0) => Status::Idle,
            _ => Status::Active,
        }
    }

    /// Whether anything of a twin changes by processing time alone (a status timer, command
    /// timeouts, retirement, the end of a deleted id's refusal): then each partition looks
    /// for due timers, and a restore files them.
    pub fn has_timers(&self) -> bool {
        let t = &self.time;
        t.offline_after.is_some()
            || t.idle_after.is_some()
            || t.retire_after.is_some()
            || t.refuse_deleted_for.is_some()
            || self.desired.converge_within.is_some()
    }

    /// The processing time at which the twin next changes by itself (a timer: its status,
    /// a command timing out, or its retirement), if ever.
    pub fn deadline(&self, twin: &Twin) -> Option<i64> {
        [
            self.status_deadline(twin),
            twin.command_deadline(),
            self.retire_at(twin),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The processing time at which the twin is deleted for its silence (`retire_after`).
    pub fn retire_at(&self, twin: &Twin) -> Option<i64> {
        let after = self.time.retire_after?;
        (twin.version > 0).then(|| twin.last_seen.saturating_add(after))
    }

    /// The processing time at which the twin's status next changes by itself, if ever.
    fn status_deadline(&self, twin: &Twin) -> Option<i64> {
        if twin.version == 0 || twin.status == Status::Offline {
            return None;
        }
        let offline = self.time.offline_after.map(|after| twin.last_seen + after);
        let idle = match (twin.status, twin.still_since) {
            (Status::Active, Some(since)) => Some(since + self.time.idle_after.unwrap_or(0)),
            _ => None,
        };
        match (offline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a reading stamped `event_time` may be applied to `twin` at processing time
    /// `now`.
    ///
    /// # Errors
    /// Why it may not.
    pub fn check_time(&self, twin: &Twin, event_time: i64, now: i64) -> Result<(), Untimely> {
        if self
            .time
            .max_future
            .is_some_and(|max| event_time > now.saturating_add(max))
        {
            return Err(Untimely::Future);
        }
        if twin.version > 0
            && self
                .time
                .allowed_lateness
                .is_some_and(|max| event_time < twin.event_time.saturating_sub(max))
        {
            return Err(Untimely::Late);
        }
        Ok(())
    }
}

impl Model {
    /// Checks a decoded reading against the model: an id, a plausible time, finite numbers
    /// inside the configured ranges.
    ///
    /// # Errors
    /// A message naming the offending field, for the dead-letter headers.
    pub fn validate(&self, reading: &super::Reading) -> Result<(), String> {
        if reading.asset_id.is_empty() {
            return Err("asset_id is empty".into());
        }
        if reading.asset_id.len() > MAX_ASSET_ID_BYTES {
            return Err(format!(
                "asset_id is {} bytes long; at most {MAX_ASSET_ID_BYTES} are allowed",
                reading.asset_id.len()
            ));
        }
        if reading.event_time <= 0 {
            return Err(format!(
                "event_time {} is not after 1970",
                reading.event_time
            ));
        }
        for (index, value) in &reading.values {
            self.check_value(*index, value)?;
        }
        Ok(())
    }

    /// Checks one value of property `index`: a bounded string, a finite number inside the
    /// configured range (an `int` property: one that fits 32 bits).
    ///
    /// # Errors
    /// A message naming the property.
    pub fn check_value(&self, index: usize, value: &super::Value) -> Result<(), String> {
        let def = &self.properties[index];
        if let super::Value::Str(text) = value
            && text.len() > MAX_STRING_BYTES
        {
            return Err(format!(
                "{} is {} bytes long; at most {MAX_STRING_BYTES} are allowed",
                def.name,
                text.len()
            ));
        }
        if let super::Value::Long(v) = value
            && def.kind == PropKind::Int
            && i32::try_from(*v).is_err()
        {
            return Err(format!("{} = {v} does not fit an int", def.name));
        }
        let Some(v) = value.as_f64() else {
            return Ok(());
        };
        if !v.is_finite() {
            return Err(format!("{} is {v}", def.name));
        }
        if def.min.is_some_and(|min| v < min) || def.max.is_some_and(|max| v > max) {
            return Err(format!(
                "{} = {v} is outside [{}, {}]",
                def.name,
                def.min.map_or("-inf".into(), |m| m.to_string()),
                def.max.map_or("inf".into(), |m| m.to_string()),
            ));
        }
        Ok(())
    }
}
