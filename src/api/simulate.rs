//! `POST /twins/{id}/simulate`: what-if on a copy of a twin. Readings and clock advances are
//! applied to a copy, with the model's rules or changed ones, by the step production runs
//! ([`crate::step`]); each answer says what production would write: the twin, the alert
//! events (with the ids they would get), command events and commands, timers that fire,
//! forecasts, and why a reading would be refused.
//!
//! Nothing is written anywhere: the handler holds the fleet view (to read the twin) and no
//! producer, store or metric of the pipeline. It runs on any instance for any twin.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;

use super::{Answer, ApiState, error, predictions, rule_json};
use crate::codec::{
    Codec, command_event_json, decode_command, encode_alert, encode_command, encode_command_event,
    rfc3339,
};
use crate::rules::{AlertEvent, RuleKind, RuleSet};
use crate::step::{Core, Timed};
use crate::topology::Topology;
use crate::twin::{Effects, Reading, Twin};

/// Largest request body.
pub const MAX_BODY: usize = 256 * 1024;
/// Most steps (readings and advances) in one request.
pub const MAX_STEPS: usize = 1000;
/// Longest simulated time, from the start to the last advance.
pub const MAX_SPAN_MS: i64 = 366 * 86_400_000;
/// The latest time a simulation takes (the end of year 9999), in epoch ms; the earliest is 0.
const MAX_TIME: i64 = 253_402_300_799_999;
/// Most timers one catch-up fires: a twin's deadlines are few (idle, offline, commands,
/// retirement), so more means a deadline that does not move; the simulation stops there.
const MAX_TIMERS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Request {
    /// `now` (the twin as the view has it, the default), `empty` (a twin that never
    /// reported), or a time: the twin as it was then (event time, a kept version).
    #[serde(default)]
    start: Option<String>,
    /// Processing time the simulation starts at (RFC 3339 or epoch ms); by default the
    /// instance's clock (`now`, `empty`) or the start version's processing time.
    at: Option<serde_json::Value>,
    /// Changed settings of the model's rules, by code.
    #[serde(default)]
    rules: BTreeMap<String, Override>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Step {
    /// A reading in the JSON input format (`event_time` defaults to the simulated clock, or
    /// just after the twin's newest reading if that is later; `asset_id`, if given, must be
    /// the twin's).
    Reading(serde_json::Map<String, serde_json::Value>),
    /// Moves the simulated clock on, e.g. `10m`; the timers due on the way fire.
    Advance(String),
}

/// A rule's settings to change; what is left out stays.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Override {
    threshold: Option<f64>,
    clear_threshold: Option<f64>,
    #[serde(rename = "for")]
    min_duration: Option<String>,
    horizon: Option<String>,
    clear_horizon: Option<String>,
    window: Option<String>,
    min_samples: Option<usize>,
    min_span: Option<String>,
    min_fit: Option<f64>,
}

/// A span such as `90s` or `10m` (`<digits><ms|s|m|h|d>`), in milliseconds.
fn millis(name: &str, text: &str) -> Result<i64, String> {
    super::span(text)
        .ok_or_else(|| format!("{name}: expected a span such as 90s or 10m, not '{text}'"))
}

/// The model's rules with `overrides` applied and checked as a model file's are.
fn overridden(rules: &RuleSet, overrides: &BTreeMap<String, Override>) -> Result<RuleSet, String> {
    let mut rules = rules.clone();
    for (code, o) in overrides {
        let rule = (rules.rules.iter_mut())
            .find(|r| &r.code == code)
            .ok_or_else(|| format!("rules: the model has no rule {code}"))?;
        if !matches!(rule.kind, RuleKind::Threshold | RuleKind::Forecast) {
            return Err(format!(
                "rules: {code} is built in; its settings are the model's status and desired sections"
            ));
        }
        if let Some(t) = o.threshold {
            rule.threshold = t;
        }
        if let Some(d) = &o.min_duration {
            rule.min_duration = Some(millis("for", d)?).filter(|d| *d > 0);
        }
        let forecast_settings = [&o.horizon, &o.clear_horizon, &o.window, &o.min_span]
            .iter()
            .any(|x| x.is_some())
            || o.min_samples.is_some()
            || o.min_fit.is_some();
        match &mut rule.forecast {
            None if forecast_settings => {
                return Err(format!(
                    "rules: {code} is no forecast; horizon, window and the like belong to forecasts"
                ));
            }
            None => {
                if let Some(c) = o.clear_threshold {
                    rule.clear_threshold = Some(c);
                }
            }
            Some(_) if o.clear_threshold.is_some() => {
                return Err(format!(
                    "rules: {code} is a forecast; it has clear_horizon, not clear_threshold"
                ));
            }
            Some(spec) => {
                let set = |v: &Option<String>, name: &str, into: &mut i64| -> Result<(), String> {
                    if let Some(v) = v {
                        *into = millis(name, v)?;
                    }
                    Ok(())
                };
                set(&o.horizon, "horizon", &mut spec.horizon)?;
                set(&o.clear_horizon, "clear_horizon", &mut spec.clear_horizon)?;
                set(&o.window, "window", &mut spec.window)?;
                set(&o.min_span, "min_span", &mut spec.min_span)?;
                spec.min_samples = o.min_samples.unwrap_or(spec.min_samples);
                spec.min_fit = o.min_fit.unwrap_or(spec.min_fit);
            }
        }
        rule.check()?;
    }
    Ok(rules)
}

/// A simulation in progress: the copy of the twin, the simulated clock and what happened.
struct Run<'a> {
    topology: &'a Topology,
    core: Core<'a>,
    twin: Twin,
    now: i64,
    fx: Effects,
    alerts: Vec<AlertEvent>,
    out: Vec<serde_json::Value>,
}

impl Run<'_> {
    /// Fires the twin's timers due up to `until`, each at its deadline.
    fn catch_up(&mut self, step: usize, until: i64) -> Result<(), String> {
        for _ in 0..MAX_TIMERS {
            let due = (self.core.model.deadline(&self.twin))
                .filter(|d| *d <= until && self.twin.version > 0);
            let Some(deadline) = due else {
                self.now = self.now.max(until);
                return Ok(());
            };
            self.now = self.now.max(deadline);
            let timed = self
                .core
                .timer(&mut self.twin, self.now, &mut self.fx, &mut self.alerts);
            let entry = match timed {
                Timed::Unchanged => {
                    self.now = self.now.max(until);
                    return Ok(());
                }
                Timed::Fired => self.outputs(step, "timer", "fired"),
                Timed::Retire => self.retire(step),
            };
            self.out.push(entry);
        }
        Err(format!(
            "step {step}: more than {MAX_TIMERS} timers fired; the simulation stops here"
        ))
    }

    /// Retires the twin as production would: its alerts clear (reason `deleted`), its
    /// commands are cancelled, and a reading after it starts a new twin.
    fn retire(&mut self, step: usize) -> serde_json::Value {
        let version = self.twin.version + 1;
        self.alerts.clear();
        self.fx.clear();
        (self.core.rules).clear_deleted(&mut self.twin, self.now, version, &mut self.alerts);
        let detail = "the twin was deleted (retired)";
        self.twin.cancel_commands(self.now, detail, &mut self.fx);
        let mut entry = self.events(step, "timer", "retired", version);
        self.twin = Twin::new(&self.twin.asset_id, self.core.model);
        entry["twin"] = serde_json::Value::Null;
        entry
    }

    /// Applies one reading object at the simulated clock.
    fn reading(&mut self, step: usize, mut object: serde_json::Map<String, serde_json::Value>) {
        let id = self.twin.asset_id.clone();
        match object.get("asset_id") {
            None => {
                object.insert("asset_id".into(), id.clone().into());
            }
            Some(given) if given.as_str() != Some(&id) => {
                let why = format!("asset_id {given} is not the twin's '{id}'");
                self.out.push(refused(step, self.now, "key_mismatch", &why));
                return;
            }
            Some(_) => {}
        }
        // By default the device reports at the simulated clock, or just after the twin's
        // newest reading when that is later (a device whose clock runs ahead).
        let at = match self.twin.version {
            0 => self.now,
            _ => self.now.max(self.twin.event_time.saturating_add(1)),
        };
        object.entry("event_time").or_insert_with(|| at.into());
        let mut reading = Reading::default();
        if let Err((reason, why)) = super::ingest::check(self.topology, &object, &mut reading) {
            self.out.push(refused(step, self.now, reason.label(), &why));
            return;
        }
        let applied = self.core.reading(
            &mut self.twin,
            &reading,
            self.now,
            &mut self.fx,
            &mut self.alerts,
        );
        let entry = match applied {
            Err((reason, why)) => refused(step, self.now, reason.label(), &why),
            Ok(applied) if applied.change.is_none() => {
                let reason = applied.skipped.map_or("unchanged", |s| s.reason());
                serde_json::json!({
                    "step": step, "kind": "reading", "at": rfc3339(self.now),
                    "outcome": "skipped", "reason": reason,
                })
            }
            Ok(_) => self.outputs(step, "reading", "applied"),
        };
        self.out.push(entry);
    }

    /// What production would write for the change just made: the twin, its alert events,
    /// command events and commands, and the forecasts.
    fn outputs(&self, step: usize, kind: &str, outcome: &str) -> serde_json::Value {
        let mut entry = self.events(step, kind, outcome, self.twin.version);
        let codec = &self.topology.codec;
        entry["twin"] = codec.twin_json(&self.twin);
        let names = |i: usize| self.core.model.properties[i].name.as_str();
        let mut buf = Vec::new();
        let commands: Vec<serde_json::Value> = (self.fx.sends.iter())
            .filter_map(|c| {
                buf.clear();
                encode_command(&self.twin, c, &names, &mut buf).then_some(())?;
                let record = decode_command(&buf).ok()?;
                serde_json::from_slice(&crate::bridge::commands::to_json(&record)).ok()
            })
            .collect();
        entry["commands"] = commands.into();
        if self.core.rules.rules.iter().any(|r| r.forecast.is_some()) {
            entry["forecasts"] = predictions(self.core.rules, &self.twin, None).into();
        }
        entry
    }

    /// The alert and command events of the twin's change at `version`.
    fn events(&self, step: usize, kind: &str, outcome: &str, version: i64) -> serde_json::Value {
        let codec: &Codec = &self.topology.codec;
        let id = &self.twin.asset_id;
        let alerts: Vec<serde_json::Value> = (self.alerts.iter())
            .filter_map(|event| {
                let mut buf = codec.alerts_header().map(Vec::from).unwrap_or_default();
                encode_alert(event, id, self.core.rules, &mut buf);
                codec.alert_json(&buf).ok()
            })
            .collect();
        let command_events: Vec<serde_json::Value> = (self.fx.events.iter())
            .filter_map(|event| {
                let mut buf = Vec::new();
                encode_command_event(event, id, version, &mut buf);
                command_event_json(&buf).ok()
            })
            .collect();
        serde_json::json!({
            "step": step, "kind": kind, "at": rfc3339(self.now), "outcome": outcome,
            "version": version, "alerts": alerts, "command_events": command_events,
        })
    }
}

fn refused(step: usize, now: i64, reason: &str, why: &str) -> serde_json::Value {
    serde_json::json!({
        "step": step, "kind": "reading", "at": rfc3339(now),
        "outcome": "refused", "reason": reason, "error": why,
    })
}

pub(super) async fn simulate(
    State(s): State<ApiState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    body: Bytes,
) -> Answer {
    let Path(id) = id.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let request: Request = serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body: {e}")))?;
    if request.steps.len() > MAX_STEPS {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} steps; at most {MAX_STEPS} a request",
                request.steps.len()
            ),
        ));
    }
    let topology = s.view.topology();
    let rules = overridden(&topology.rules, &request.rules)
        .map_err(|why| error(StatusCode::BAD_REQUEST, why))?;
    let internal = |e: crate::error::Error| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let bad = |why: String| error(StatusCode::BAD_REQUEST, why);
    let not_found = || error(StatusCode::NOT_FOUND, format!("no twin '{id}'"));
    let at = match &request.at {
        None => None,
        Some(serde_json::Value::Number(n)) if n.as_i64().is_some() => n.as_i64(),
        Some(serde_json::Value::String(t)) if crate::codec::parse_time(t).is_some() => {
            crate::codec::parse_time(t)
        }
        Some(other) => {
            return Err(bad(format!(
                "at: {other} is neither epoch milliseconds nor an RFC 3339 time"
            )));
        }
    };
    let in_range = |t: i64, what: &str| {
        if (0..=MAX_TIME).contains(&t) {
            Ok(t)
        } else {
            Err(bad(format!(
                "{what}: times run from 1970 to the end of year 9999"
            )))
        }
    };
    let at = at.map(|t| in_range(t, "at")).transpose()?;
    let (start, twin, now) = match request.start.as_deref() {
        None | Some("now") => {
            let twin = s.view.twin(&id).map_err(internal)?.ok_or_else(not_found)?;
            ("now", twin, at.unwrap_or_else(|| s.clock.now_ms()))
        }
        Some("empty") => {
            if id.is_empty() || id.len() > crate::twin::MAX_ASSET_ID_BYTES {
                return Err(bad("the asset id must be 1 to 256 bytes".into()));
            }
            let twin = Twin::new(&id, &topology.model);
            ("empty", twin, at.unwrap_or_else(|| s.clock.now_ms()))
        }
        Some(time) => {
            let when = crate::codec::parse_time(time).ok_or_else(|| {
                bad(format!(
                    "start: expected now, empty or a time, not '{time}'"
                ))
            })?;
            let when = in_range(when, "start")?;
            let twin = match s.view.as_of(&id, when, false).map_err(internal)? {
                None => return Err(not_found()),
                Some(None) => {
                    return Err(error(
                        StatusCode::NOT_FOUND,
                        format!("no kept version of '{id}' at or before {time}"),
                    ));
                }
                Some(Some(twin)) => twin,
            };
            let now = at.unwrap_or(twin.updated_at.max(when));
            ("as_of", twin, now)
        }
    };
    let began = now;
    let start_json = serde_json::json!({
        "from": start, "at": rfc3339(now), "twin": topology.codec.twin_json(&twin),
    });
    let mut run = Run {
        topology,
        core: Core {
            model: &topology.model,
            rules: &rules,
        },
        twin,
        now,
        fx: Effects::default(),
        alerts: Vec::new(),
        out: Vec::new(),
    };
    let mut stopped = None;
    for (index, step) in request.steps.into_iter().enumerate() {
        let until = match &step {
            Step::Reading(_) => run.now,
            Step::Advance(span) => {
                let by = millis("advance", span).map_err(bad)?;
                run.now.saturating_add(by)
            }
        };
        if until - began > MAX_SPAN_MS || until > MAX_TIME {
            return Err(bad(format!(
                "step {index}: more than 366 days after the start, or after year 9999"
            )));
        }
        if let Err(why) = run.catch_up(index, until) {
            stopped = Some(why);
            break;
        }
        if let Step::Reading(object) = step {
            run.reading(index, object);
        }
    }
    let changed: Vec<serde_json::Value> = (request.rules.keys())
        .filter_map(|code| rules.rules.iter().find(|r| &r.code == code))
        .map(|r| rule_json(r, &topology.model))
        .collect();
    let twin = (run.twin.version > 0).then(|| topology.codec.twin_json(&run.twin));
    Ok(Json(serde_json::json!({
        "asset_id": id,
        "start": start_json,
        "rules": changed,
        "steps": run.out,
        "twin": twin,
        "stopped": stopped,
    }))
    .into_response())
}
