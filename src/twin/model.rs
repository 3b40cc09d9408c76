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
}

/// When an asset counts as ACTIVE rather than IDLE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActiveWhen {
    /// Property index.
    pub property: usize,
    /// ACTIVE while the property is above this.
    pub above: f64,
}

/// The properties of a twin and how its status derives from them.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// Properties, in telemetry schema order.
    pub properties: Vec<PropertyDef>,
    /// Status rule; `None` means every reporting asset is ACTIVE.
    pub active_when: Option<ActiveWhen>,
}

impl Model {
    /// Index of the property called `name`.
    pub fn property(&self, name: &str) -> Option<usize> {
        self.properties.iter().position(|p| p.name == name)
    }

    /// The status a twin's current values imply.
    pub fn status_of(&self, twin: &Twin) -> Status {
        let Some(rule) = self.active_when else {
            return Status::Active;
        };
        match twin.value(rule.property).and_then(|v| v.as_f64()) {
            Some(v) if v <= rule.above => Status::Idle,
            _ => Status::Active,
        }
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
        if reading.event_time <= 0 {
            return Err(format!(
                "event_time {} is not after 1970",
                reading.event_time
            ));
        }
        for (index, value) in &reading.values {
            let def = &self.properties[*index];
            let Some(v) = value.as_f64() else { continue };
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
        }
        Ok(())
    }
}
