//! Alert rules: edge-triggered comparisons on twin properties.
//!
//! A rule raises one alert when its comparison becomes true and clears it when the comparison
//! stops being true; nothing is emitted while the state holds. The set of raised alerts lives
//! in the twin itself, so evaluation keeps no hidden state and a replay from the same twin
//! yields the same events, with the same deterministic alert ids.

use crate::twin::{ActiveAlert, Severity, Twin, TwinChange};
use serde::Deserialize;

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Op {
    /// Greater than.
    #[serde(rename = ">")]
    Gt,
    /// Greater than or equal.
    #[serde(rename = ">=")]
    Ge,
    /// Less than.
    #[serde(rename = "<")]
    Lt,
    /// Less than or equal.
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    /// The operator as written in rules and alert events.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
        }
    }

    fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }
}

/// One alert rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Stable code, e.g. `TEMP_BREACH`; unique within a rule set.
    pub code: String,
    /// Severity of its alerts.
    pub severity: Severity,
    /// Index of the compared property in the model.
    pub property: usize,
    /// Name of the compared property (for alert events).
    pub property_name: String,
    /// Comparison.
    pub op: Op,
    /// Threshold.
    pub threshold: f64,
}

/// Whether an alert event opens or closes an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlertState {
    /// The condition became true.
    Raised,
    /// The condition stopped being true.
    Cleared,
}

impl AlertState {
    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            AlertState::Raised => "RAISED",
            AlertState::Cleared => "CLEARED",
        }
    }
}

/// One alert transition, ready to encode.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    /// Index of the rule in the set.
    pub rule: usize,
    /// RAISED or CLEARED.
    pub state: AlertState,
    /// Deterministic id shared by RAISED and CLEARED.
    pub alert_id: String,
    /// Property value at the transition.
    pub value: f64,
    /// Event time of the reading that caused the transition.
    pub event_time: i64,
    /// Event time of the raising reading.
    pub raised_at: i64,
    /// Twin version the transition belongs to.
    pub twin_version: i64,
}

/// The rules of a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleSet {
    /// The rules, in configuration order.
    pub rules: Vec<Rule>,
}

/// The deterministic id of the alert `code` on `asset_id` raised by the reading at `raised_at`:
/// a replay of the same input yields the same id, so downstream systems can de-duplicate.
pub fn alert_id(asset_id: &str, code: &str, raised_at: i64) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(asset_id.as_bytes());
    h.update(&[0]);
    h.update(code.as_bytes());
    h.update(&[0]);
    h.update(&raised_at.to_be_bytes());
    format!("{:032x}", h.digest128())
}

impl RuleSet {
    /// Checks the rules whose property `change` touched, updates the twin's raised alerts and
    /// appends the transitions to `out`.
    pub fn evaluate(&self, twin: &mut Twin, change: &TwinChange, out: &mut Vec<AlertEvent>) {
        for (index, rule) in self.rules.iter().enumerate() {
            if !change.changed(rule.property) {
                continue;
            }
            let Some(prop) = twin.props[rule.property].as_ref() else {
                continue;
            };
            let Some(value) = prop.value.as_f64() else {
                continue;
            };
            let event_time = prop.time;
            let holds = rule.op.holds(value, rule.threshold);
            let raised = twin.alerts.iter().position(|a| a.code == rule.code);
            match (holds, raised) {
                (true, None) => {
                    let alert_id = alert_id(&twin.asset_id, &rule.code, event_time);
                    let at = twin
                        .alerts
                        .iter()
                        .position(|a| self.position(&a.code) > Some(index))
                        .unwrap_or(twin.alerts.len());
                    twin.alerts.insert(
                        at,
                        ActiveAlert {
                            alert_id: alert_id.clone(),
                            code: rule.code.clone(),
                            severity: rule.severity,
                            value,
                            threshold: rule.threshold,
                            raised_at: event_time,
                        },
                    );
                    out.push(AlertEvent {
                        rule: index,
                        state: AlertState::Raised,
                        alert_id,
                        value,
                        event_time,
                        raised_at: event_time,
                        twin_version: twin.version,
                    });
                }
                (false, Some(at)) => {
                    let alert = twin.alerts.remove(at);
                    out.push(AlertEvent {
                        rule: index,
                        state: AlertState::Cleared,
                        alert_id: alert.alert_id,
                        value,
                        event_time,
                        raised_at: alert.raised_at,
                        twin_version: twin.version,
                    });
                }
                _ => {}
            }
        }
    }

    fn position(&self, code: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.code == code)
    }
}

#[cfg(test)]
mod tests;
