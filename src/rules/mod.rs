//! Alert rules: edge-triggered comparisons on twin properties, and the built-in offline rule.
//!
//! A rule raises one alert when its comparison becomes true and clears it when the comparison
//! stops being true; nothing is emitted while the state holds. Two settings stop a noisy
//! signal from flapping: a clear threshold (hysteresis: raise above 8, clear only at or below 7.5)
//! and a minimum duration in event time (raise only once the comparison has held for 30 s of
//! readings). The raised and pending alerts live in the twin itself, so evaluation keeps no
//! hidden state and a replay from the same twin yields the same events, with the same
//! deterministic alert ids.

pub mod forecast;

use crate::twin::{
    ActiveAlert, CommandState, DesiredWrite, Effects, ForecastWindow, Model, PendingAlert, Reading,
    Severity, Status, Twin, TwinChange, Value,
};
pub use forecast::{Forecast, ForecastSpec, Prediction};
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

    /// Whether `value op threshold` holds.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
        }
    }
}

/// What a rule watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// `property op threshold`, from the model's rules.
    Threshold,
    /// The asset's status is OFFLINE (`ASSET_OFFLINE`, from `offline_after`). Its property
    /// is the silence in seconds, its threshold `offline_after` in seconds.
    Offline,
    /// A command timed out and has not converged since (`DESIRED_NOT_REACHED`, from
    /// `[desired] converge_within`). Its value is the number of such commands, its threshold
    /// `converge_within` in seconds.
    Desired,
    /// `property op threshold` predicted within a horizon by a line through the recent
    /// readings (see [`forecast`]).
    Forecast,
}

/// The code of the built-in offline rule.
pub const OFFLINE_CODE: &str = "ASSET_OFFLINE";

/// The code of the built-in rule on commands that timed out.
pub const DESIRED_CODE: &str = "DESIRED_NOT_REACHED";

/// One alert rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// What it watches.
    pub kind: RuleKind,
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
    /// Hysteresis: once raised, the alert stays until `property op clear_threshold` stops
    /// holding. `None` clears at the raise threshold.
    pub clear_threshold: Option<f64>,
    /// Minimum duration, in event-time milliseconds, the comparison must hold before the
    /// alert is raised.
    pub min_duration: Option<i64>,
    /// Desired values set when the rule raises (property index, value): its action.
    pub on_raise: Vec<(usize, Value)>,
    /// A forecast rule's settings.
    pub forecast: Option<ForecastSpec>,
}

impl Rule {
    /// A threshold rule without hysteresis or minimum duration.
    pub fn threshold(
        code: &str,
        severity: Severity,
        property: (usize, &str),
        op: Op,
        threshold: f64,
    ) -> Rule {
        Rule {
            kind: RuleKind::Threshold,
            code: code.to_owned(),
            severity,
            property: property.0,
            property_name: property.1.to_owned(),
            op,
            threshold,
            clear_threshold: None,
            min_duration: None,
            on_raise: Vec::new(),
            forecast: None,
        }
    }

    /// A forecast rule: raises when `property op threshold` is predicted within the spec's
    /// horizon.
    pub fn forecast(
        code: &str,
        severity: Severity,
        property: (usize, &str),
        (op, threshold): (Op, f64),
        spec: ForecastSpec,
    ) -> Rule {
        Rule {
            kind: RuleKind::Forecast,
            forecast: Some(spec),
            ..Rule::threshold(code, severity, property, op, threshold)
        }
    }

    /// Checks its settings, as a model file or a simulation's overrides give them: finite
    /// thresholds, a clear threshold on the safe side, a forecast's spans and guards in range.
    ///
    /// # Errors
    /// What is wrong, naming the rule.
    pub fn check(&self) -> Result<(), String> {
        let code = &self.code;
        if !self.threshold.is_finite() || self.clear_threshold.is_some_and(|c| !c.is_finite()) {
            return Err(format!("rule {code}: thresholds must be finite numbers"));
        }
        if let Some(clear) = self.clear_threshold {
            // The clear threshold lies on the safe side of the raise threshold.
            let safe = match self.op {
                Op::Gt | Op::Ge => clear <= self.threshold,
                Op::Lt | Op::Le => clear >= self.threshold,
            };
            if !safe {
                return Err(format!(
                    "rule {code}: clear_threshold {clear} must lie on the other side of threshold {} from where the rule raises (op {})",
                    self.threshold,
                    self.op.symbol()
                ));
            }
        }
        let Some(spec) = &self.forecast else {
            return Ok(());
        };
        if spec.horizon <= 0 || spec.window <= 0 {
            return Err(format!(
                "rule {code}: horizon and window must be more than 0"
            ));
        }
        if spec.clear_horizon < spec.horizon {
            return Err(format!(
                "rule {code}: clear_horizon must be at least horizon"
            ));
        }
        if spec.min_samples < 2 || spec.min_samples > forecast::MAX_POINTS {
            return Err(format!(
                "rule {code}: min_samples must be 2 to {}",
                forecast::MAX_POINTS
            ));
        }
        if !(0.0..=1.0).contains(&spec.min_fit) {
            return Err(format!("rule {code}: min_fit is an R² from 0 to 1"));
        }
        if spec.min_span < 0 || spec.min_span > spec.window {
            return Err(format!("rule {code}: min_span must be within the window"));
        }
        Ok(())
    }

    /// The built-in offline rule for `offline_after` milliseconds.
    pub fn offline(severity: Severity, offline_after: i64) -> Rule {
        Rule {
            kind: RuleKind::Offline,
            code: OFFLINE_CODE.to_owned(),
            severity,
            property: usize::MAX,
            property_name: "silent_seconds".to_owned(),
            op: Op::Ge,
            threshold: offline_after as f64 / 1000.0,
            clear_threshold: None,
            min_duration: None,
            on_raise: Vec::new(),
            forecast: None,
        }
    }

    /// The built-in rule on commands not converged within `converge_within` milliseconds.
    pub fn desired_not_reached(severity: Severity, converge_within: i64) -> Rule {
        Rule {
            kind: RuleKind::Desired,
            code: DESIRED_CODE.to_owned(),
            severity,
            property: usize::MAX,
            property_name: "command_age_seconds".to_owned(),
            op: Op::Ge,
            threshold: converge_within as f64 / 1000.0,
            clear_threshold: None,
            min_duration: None,
            on_raise: Vec::new(),
            forecast: None,
        }
    }
}

/// Whether an alert event opens or closes an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AlertState {
    /// The condition became true.
    Raised,
    /// The condition stopped being true.
    Cleared,
    /// Someone acknowledged the active alert.
    Acknowledged,
}

impl AlertState {
    /// The Avro enum symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            AlertState::Raised => "RAISED",
            AlertState::Cleared => "CLEARED",
            AlertState::Acknowledged => "ACKNOWLEDGED",
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
    /// On ACKNOWLEDGED: who acknowledged it.
    pub acknowledged_by: Option<String>,
    /// On CLEARED, when not because the condition stopped holding: why (`deleted`; for a
    /// forecast, `breached`, `averted` or `stale`).
    pub reason: Option<&'static str>,
    /// On a forecast's RAISED: the predicted crossing.
    pub forecast: Option<Forecast>,
}

/// The reason of the CLEARED events of a deleted twin's alerts.
pub const DELETED: &str = "deleted";

/// What an acknowledgement did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// It acknowledged an active alert.
    Applied,
    /// No such active alert: unknown, or cleared already.
    Unknown,
    /// The alert was acknowledged already.
    Repeated,
}

impl AckOutcome {
    /// All outcomes, in metric label order.
    pub const ALL: [AckOutcome; 3] = [
        AckOutcome::Applied,
        AckOutcome::Unknown,
        AckOutcome::Repeated,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AckOutcome::Applied => "applied",
            AckOutcome::Unknown => "unknown",
            AckOutcome::Repeated => "repeated",
        }
    }
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
    /// Applies the actions of the rules that `alerts` raised: each sets its desired values
    /// as part of the twin's current change, as a command `rule-<alert id>` set by
    /// `rule:<code>` (so a replay issues the same command), at processing time `now`.
    pub fn act(
        &self,
        twin: &mut Twin,
        model: &Model,
        alerts: &[AlertEvent],
        now: i64,
        out: &mut Effects,
    ) {
        for event in alerts {
            let rule = &self.rules[event.rule];
            if event.state != AlertState::Raised || rule.on_raise.is_empty() {
                continue;
            }
            let write = DesiredWrite {
                command_id: format!("rule-{}", event.alert_id),
                values: rule
                    .on_raise
                    .iter()
                    .map(|(i, v)| (*i, Some(v.clone())))
                    .collect(),
                if_match: None,
                by: format!("rule:{}", rule.code),
            };
            if twin
                .commands
                .iter()
                .all(|c| c.command_id != write.command_id)
            {
                twin.write_desired(model, &write, now, out);
            }
        }
    }

    /// Checks the rules whose property `change` touched, and the offline rule against the
    /// twin's status; updates the twin's raised and pending alerts and appends the
    /// transitions to `out`.
    pub fn evaluate(&self, twin: &mut Twin, change: &TwinChange, out: &mut Vec<AlertEvent>) {
        for (index, rule) in self.rules.iter().enumerate() {
            match rule.kind {
                RuleKind::Threshold => self.evaluate_threshold(index, twin, change, out),
                RuleKind::Offline => self.evaluate_offline(index, twin, out),
                RuleKind::Desired => self.evaluate_desired(index, twin, out),
                RuleKind::Forecast => self.evaluate_forecast(index, twin, out),
            }
        }
    }

    /// Adds `reading`'s values to the windows of the forecast rules on them. Returns whether
    /// a window changed (a change of the twin even when its values did not: a late reading
    /// within a window).
    pub fn observe(&self, twin: &mut Twin, reading: &Reading) -> bool {
        let mut changed = false;
        for (index, rule) in self.rules.iter().enumerate() {
            let Some(spec) = rule.forecast else { continue };
            let Some(value) = (reading.values.iter())
                .find(|(p, _)| *p == rule.property)
                .and_then(|(_, v)| v.as_f64())
            else {
                continue;
            };
            let at = match twin.forecasts.iter().position(|w| w.code == rule.code) {
                Some(at) => at,
                None => {
                    let at = self.insert_at(&twin.forecasts, index, |w| &w.code);
                    let window = ForecastWindow {
                        code: rule.code.clone(),
                        points: Vec::new(),
                    };
                    twin.forecasts.insert(at, window);
                    at
                }
            };
            let points = &mut twin.forecasts[at].points;
            changed |= forecast::observe(points, reading.event_time, value, spec.window);
        }
        changed
    }

    /// The prediction of forecast rule `index` for `twin`.
    pub fn predict(&self, index: usize, twin: &Twin) -> Prediction {
        let rule = &self.rules[index];
        let Some(spec) = &rule.forecast else {
            return Prediction::Unknown;
        };
        let points = (twin.forecasts.iter())
            .find(|w| w.code == rule.code)
            .map_or(&[][..], |w| &w.points[..]);
        forecast::predict(points, spec, rule.op, rule.threshold)
    }

    /// A forecast rule: raises (after `for`, in event time) when the crossing is predicted
    /// within the horizon; clears as `breached` when the value crossed, `stale` when the
    /// asset is OFFLINE, `averted` when no crossing is predicted within the clear horizon.
    fn evaluate_forecast(&self, index: usize, twin: &mut Twin, out: &mut Vec<AlertEvent>) {
        let rule = &self.rules[index];
        let spec = rule.forecast.expect("a forecast rule has its spec");
        let prediction = self.predict(index, twin);
        let (newest, last) = (twin.forecasts.iter())
            .find(|w| w.code == rule.code)
            .and_then(|w| w.points.last().copied())
            .unwrap_or((twin.event_time, 0.0));
        if let Some(at) = twin.alerts.iter().position(|a| a.code == rule.code) {
            let reason = match prediction {
                _ if twin.status == Status::Offline => "stale",
                Prediction::Breached => "breached",
                Prediction::Crossing(f) if f.time_to_breach <= spec.clear_horizon => return,
                Prediction::Unknown => return,
                Prediction::Crossing(_) | Prediction::Clear => "averted",
            };
            let alert = twin.alerts.remove(at);
            out.push(AlertEvent {
                rule: index,
                state: AlertState::Cleared,
                alert_id: alert.alert_id,
                value: last,
                event_time: newest,
                raised_at: alert.raised_at,
                twin_version: twin.version,
                acknowledged_by: None,
                reason: Some(reason),
                forecast: None,
            });
            return;
        }
        let forecast = match prediction {
            Prediction::Crossing(f)
                if f.time_to_breach <= spec.horizon && twin.status != Status::Offline =>
            {
                Some(f)
            }
            _ => None,
        };
        if !self.held(index, twin, forecast.is_some(), newest) {
            return;
        }
        let forecast = forecast.expect("held only while predicted");
        self.raise(index, twin, forecast.value, newest, out);
        if let Some(event) = out.last_mut() {
            event.forecast = Some(forecast);
        }
    }

    fn evaluate_threshold(
        &self,
        index: usize,
        twin: &mut Twin,
        change: &TwinChange,
        out: &mut Vec<AlertEvent>,
    ) {
        let rule = &self.rules[index];
        // A pending rule is looked at again when its property's reading is newer, whether or
        // not its value changed: a value that stays over the threshold must raise once it
        // has held for `for`.
        let pending = twin.pending.iter().any(|p| p.code == rule.code);
        if !change.changed(rule.property) && !pending {
            return;
        }
        let Some(prop) = twin.props[rule.property].as_ref() else {
            return;
        };
        let Some(value) = prop.value.as_f64() else {
            return;
        };
        let event_time = prop.time;
        if let Some(at) = twin.alerts.iter().position(|a| a.code == rule.code) {
            let clear_at = rule.clear_threshold.unwrap_or(rule.threshold);
            if !rule.op.holds(value, clear_at) {
                let alert = twin.alerts.remove(at);
                out.push(AlertEvent {
                    rule: index,
                    state: AlertState::Cleared,
                    alert_id: alert.alert_id,
                    value,
                    event_time,
                    raised_at: alert.raised_at,
                    twin_version: twin.version,
                    acknowledged_by: None,
                    reason: None,
                    forecast: None,
                });
            }
            return;
        }
        if self.held(
            index,
            twin,
            rule.op.holds(value, rule.threshold),
            event_time,
        ) {
            self.raise(index, twin, value, event_time, out);
        }
    }

    /// Whether rule `index`, whose condition holds (`holds`) at event time `at`, raises now:
    /// at once, or (with `for`) once the condition has held that long. Keeps the twin's
    /// pending entry of the rule: from the first time it holds until it raises or stops.
    fn held(&self, index: usize, twin: &mut Twin, holds: bool, at: i64) -> bool {
        let rule = &self.rules[index];
        let pending = twin.pending.iter().position(|p| p.code == rule.code);
        if !holds {
            if let Some(i) = pending {
                twin.pending.remove(i);
            }
            return false;
        }
        let Some(duration) = rule.min_duration.filter(|d| *d > 0) else {
            return true;
        };
        let since = match pending {
            Some(i) => twin.pending[i].since,
            None => {
                let i = self.insert_at(&twin.pending, index, |p| &p.code);
                let code = rule.code.clone();
                twin.pending.insert(i, PendingAlert { code, since: at });
                at
            }
        };
        if at - since < duration {
            return false;
        }
        twin.pending.retain(|p| p.code != rule.code);
        true
    }

    fn evaluate_offline(&self, index: usize, twin: &mut Twin, out: &mut Vec<AlertEvent>) {
        let rule = &self.rules[index];
        let raised = twin.alerts.iter().position(|a| a.code == rule.code);
        match (twin.status == Status::Offline, raised) {
            (true, None) => {
                // When it went offline, not when the timer happened to run: a deterministic id.
                let at = twin.last_seen + (rule.threshold * 1000.0) as i64;
                let silent = (twin.updated_at - twin.last_seen) as f64 / 1000.0;
                self.raise(index, twin, silent, at, out);
            }
            (false, Some(at)) => Self::clear_condition(index, twin, at, out),
            _ => {}
        }
    }

    fn evaluate_desired(&self, index: usize, twin: &mut Twin, out: &mut Vec<AlertEvent>) {
        let rule = &self.rules[index];
        let raised = twin.alerts.iter().position(|a| a.code == rule.code);
        let timed_out = twin
            .commands
            .iter()
            .filter(|c| c.state == CommandState::TimedOut);
        // Raised at the first deadline missed (a deterministic id), the command then as
        // old as the threshold.
        let first = timed_out.filter_map(|c| c.expires_at).min();
        match (first, raised) {
            (Some(at), None) => self.raise(index, twin, rule.threshold, at, out),
            (None, Some(at)) => Self::clear_condition(index, twin, at, out),
            _ => {}
        }
    }

    /// Clears the raised alert at `at` of a rule on a condition of the twin (not on a
    /// property value): value 0, at the twin's event time.
    fn clear_condition(index: usize, twin: &mut Twin, at: usize, out: &mut Vec<AlertEvent>) {
        let alert = twin.alerts.remove(at);
        out.push(AlertEvent {
            rule: index,
            state: AlertState::Cleared,
            alert_id: alert.alert_id,
            value: 0.0,
            event_time: twin.event_time,
            raised_at: alert.raised_at,
            twin_version: twin.version,
            acknowledged_by: None,
            reason: None,
            forecast: None,
        });
    }

    fn raise(
        &self,
        index: usize,
        twin: &mut Twin,
        value: f64,
        event_time: i64,
        out: &mut Vec<AlertEvent>,
    ) {
        let rule = &self.rules[index];
        let alert_id = alert_id(&twin.asset_id, &rule.code, event_time);
        let at = self.insert_at(&twin.alerts, index, |a| &a.code);
        twin.alerts.insert(
            at,
            ActiveAlert {
                alert_id: alert_id.clone(),
                code: rule.code.clone(),
                severity: rule.severity,
                value,
                threshold: rule.threshold,
                raised_at: event_time,
                acknowledged_at: None,
                acknowledged_by: None,
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
            acknowledged_by: None,
            reason: None,
            forecast: None,
        });
    }

    /// Acknowledges the active alert `alert_id` at processing time `now`: marks it in the twin
    /// (a change: `version` grows by one) and returns the ACKNOWLEDGED event.
    ///
    /// # Errors
    /// Why nothing changed: no such active alert (unknown or already cleared), or it is
    /// acknowledged already.
    pub fn acknowledge(
        &self,
        twin: &mut Twin,
        alert_id: &str,
        by: Option<&str>,
        now: i64,
    ) -> Result<AlertEvent, AckOutcome> {
        let alert = twin
            .alerts
            .iter_mut()
            .find(|a| a.alert_id == alert_id)
            .ok_or(AckOutcome::Unknown)?;
        if alert.acknowledged_at.is_some() {
            return Err(AckOutcome::Repeated);
        }
        let rule = self.position(&alert.code).ok_or(AckOutcome::Unknown)?;
        alert.acknowledged_at = Some(now);
        alert.acknowledged_by = by.map(str::to_owned);
        let event = AlertEvent {
            rule,
            state: AlertState::Acknowledged,
            alert_id: alert.alert_id.clone(),
            value: alert.value,
            event_time: twin.event_time,
            raised_at: alert.raised_at,
            twin_version: twin.version + 1,
            acknowledged_by: alert.acknowledged_by.clone(),
            reason: None,
            forecast: None,
        };
        twin.version += 1;
        twin.updated_at = now;
        Ok(event)
    }

    /// Clears every raised alert of a twin being deleted at processing time `now`: CLEARED
    /// events with reason `deleted`, at `now`, of twin version `version` (the deletion's).
    /// Pending alerts go with the twin without an event: none was raised.
    pub fn clear_deleted(
        &self,
        twin: &mut Twin,
        now: i64,
        version: i64,
        out: &mut Vec<AlertEvent>,
    ) {
        twin.pending.clear();
        for alert in twin.alerts.drain(..) {
            let Some(rule) = self.position(&alert.code) else {
                continue; // a rule the model no longer has: it has no event to clear
            };
            let value = match self.rules[rule].kind {
                RuleKind::Threshold | RuleKind::Forecast => twin.props[self.rules[rule].property]
                    .as_ref()
                    .and_then(|p| p.value.as_f64())
                    .unwrap_or(alert.value),
                RuleKind::Offline | RuleKind::Desired => 0.0,
            };
            out.push(AlertEvent {
                rule,
                state: AlertState::Cleared,
                alert_id: alert.alert_id,
                value,
                event_time: now,
                raised_at: alert.raised_at,
                twin_version: version,
                acknowledged_by: None,
                reason: Some(DELETED),
                forecast: None,
            });
        }
    }

    /// Where an entry of rule `index` goes in a list kept in rule order.
    fn insert_at<T>(&self, list: &[T], index: usize, code: impl Fn(&T) -> &String) -> usize {
        list.iter()
            .position(|x| self.position(code(x)) > Some(index))
            .unwrap_or(list.len())
    }

    fn position(&self, code: &str) -> Option<usize> {
        self.rules.iter().position(|r| r.code == code)
    }
}

#[cfg(test)]
mod tests;
