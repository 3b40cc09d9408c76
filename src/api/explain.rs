//! `GET /twins/{id}/explain?rule=CODE`: why an alert is raised, pending or not raised for
//! a twin: the rule, the current value against the threshold and the clear threshold, the
//! hysteresis state, the time left of a `for`, a forecast's prediction and its noise guards,
//! the last raise and clear within the kept history, and the last record of the asset the
//! pipeline refused (as this instance saw it). Without `rule`, every rule of the model.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Answer, ApiState, Params, error, params, predictions, rule_json};
use crate::codec::rfc3339;
use crate::rules::{Prediction, Rule, RuleKind, RuleSet};
use crate::twin::{CommandState, Model, Status, Twin};
use crate::view::HistoryQuery;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExplainParams {
    rule: Option<String>,
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// The last raise and clear of `code` in `versions` (newest first): when the alert was
/// raised (its `raised_at`, event time) and the processing time of the version that no
/// longer had it.
fn last_transitions(versions: &[Twin], code: &str) -> (Option<i64>, Option<i64>) {
    let has = |t: &Twin| {
        t.alerts
            .iter()
            .find(|a| a.code == code)
            .map(|a| a.raised_at)
    };
    let raised = versions.iter().find_map(has);
    let cleared = versions
        .windows(2)
        .find(|w| has(&w[0]).is_none() && has(&w[1]).is_some())
        .map(|w| w[0].updated_at);
    (raised, cleared)
}

/// What rule `index` says of `twin` at processing time `now`, with a sentence for a person.
fn explain(rules: &RuleSet, index: usize, model: &Model, twin: &Twin, now: i64) -> Value {
    let rule: &Rule = &rules.rules[index];
    let raised = twin.alerts.iter().find(|a| a.code == rule.code);
    let pending = twin.pending.iter().find(|p| p.code == rule.code);
    let mut out = json!({ "rule": rule_json(rule, model) });
    let (value, value_time) = match rule.kind {
        RuleKind::Threshold | RuleKind::Forecast => {
            let prop = twin.props.get(rule.property).and_then(|p| p.as_ref());
            (prop.and_then(|p| p.value.as_f64()), prop.map(|p| p.time))
        }
        RuleKind::Offline => (
            (twin.version > 0).then(|| (now - twin.last_seen).max(0) as f64 / 1000.0),
            Some(now),
        ),
        RuleKind::Desired => {
            let timed_out = (twin.commands.iter())
                .filter(|c| c.state == CommandState::TimedOut)
                .count();
            (Some(timed_out as f64), Some(now))
        }
    };
    out["value"] = value.into();
    out["value_time"] = value_time.map(rfc3339).into();
    let state = match (raised, pending) {
        (Some(_), _) => "raised",
        (None, Some(_)) => "pending",
        (None, None) => "clear",
    };
    out["state"] = state.into();
    if let Some(a) = raised {
        out["alert"] = json!({
            "alert_id": a.alert_id, "raised_at": rfc3339(a.raised_at), "value": a.value,
            "acknowledged_at": a.acknowledged_at.map(rfc3339),
            "acknowledged_by": a.acknowledged_by,
        });
    }
    let name = &rule.property_name;
    let op = rule.op.symbol();
    let reason = match rule.kind {
        RuleKind::Forecast => {
            let prediction = rules.predict(index, twin);
            let spec = rule.forecast.expect("a forecast rule has its spec");
            let window = (twin.forecasts.iter())
                .find(|w| w.code == rule.code)
                .map_or(&[][..], |w| &w.points[..]);
            let span = match (window.first(), window.last()) {
                (Some(a), Some(b)) => b.0 - a.0,
                _ => 0,
            };
            out["forecast"] = (predictions(rules, twin, None).into_iter())
                .find(|p| p["code"] == rule.code.as_str())
                .unwrap_or(Value::Null);
            out["guards"] = json!({
                "samples": window.len(), "min_samples": spec.min_samples,
                "span_seconds": span as f64 / 1000.0,
                "min_span_seconds": spec.min_span as f64 / 1000.0,
                "min_fit": spec.min_fit,
            });
            let horizon = spec.horizon as f64 / 60_000.0;
            match (state, prediction) {
                (_, Prediction::Unknown) if window.len() < spec.min_samples => format!(
                    "no forecast: {} of the {} readings needed in the window",
                    window.len(),
                    spec.min_samples
                ),
                (_, Prediction::Unknown) if span < spec.min_span => format!(
                    "no forecast: the readings span {:.0} s of the {:.0} s needed",
                    span as f64 / 1000.0,
                    spec.min_span as f64 / 1000.0
                ),
                (_, Prediction::Unknown) => format!(
                    "no forecast: the line fits the readings worse than min_fit {}",
                    spec.min_fit
                ),
                (_, Prediction::Breached) => {
                    format!(
                        "{name} {op} {} already: the threshold rule's business",
                        rule.threshold
                    )
                }
                (_, Prediction::Clear) => {
                    format!("{name} is not heading for {op} {}", rule.threshold)
                }
                ("raised", Prediction::Crossing(f)) => format!(
                    "raised: {name} is predicted {op} {} in {:.1} min; it clears when that is more than {:.1} min away",
                    rule.threshold,
                    f.time_to_breach as f64 / 60_000.0,
                    spec.clear_horizon as f64 / 60_000.0
                ),
                (_, Prediction::Crossing(f)) if twin.status == Status::Offline => format!(
                    "not raised: predicted in {:.1} min, but the asset is OFFLINE",
                    f.time_to_breach as f64 / 60_000.0
                ),
                (_, Prediction::Crossing(f)) if f.time_to_breach > spec.horizon => format!(
                    "not raised: {name} is predicted {op} {} in {:.1} min, beyond the {horizon:.1} min horizon",
                    rule.threshold,
                    f.time_to_breach as f64 / 60_000.0
                ),
                (_, Prediction::Crossing(f)) => format!(
                    "{state}: {name} is predicted {op} {} in {:.1} min, within the {horizon:.1} min horizon",
                    rule.threshold,
                    f.time_to_breach as f64 / 60_000.0
                ),
            }
        }
        RuleKind::Threshold => {
            let clear_at = rule.clear_threshold.unwrap_or(rule.threshold);
            let holds = value.map(|v| rule.op.holds(v, rule.threshold));
            out["holds"] = holds.into();
            out["holds_clear"] = value.map(|v| rule.op.holds(v, clear_at)).into();
            match (state, value) {
                (_, None) => format!("{name} has not been reported"),
                ("raised", Some(v)) => {
                    format!("raised: {name} is {v}; it clears once it is no longer {op} {clear_at}")
                }
                ("pending", Some(v)) => {
                    let since = pending.expect("pending").since;
                    let duration = rule.min_duration.unwrap_or(0);
                    let left = (since.saturating_add(duration))
                        .saturating_sub(twin.event_time)
                        .max(0);
                    out["pending"] = json!({
                        "since": rfc3339(since), "remaining_seconds": left as f64 / 1000.0,
                    });
                    format!(
                        "pending: {name} is {v} {op} {} since {}; it raises once that held for {:.0} s more of readings",
                        rule.threshold,
                        rfc3339(since),
                        left as f64 / 1000.0
                    )
                }
                (_, Some(v)) => format!("not raised: {name} is {v}, not {op} {}", rule.threshold),
            }
        }
        RuleKind::Offline => match state {
            "raised" => "raised: the asset is OFFLINE; its next reading clears it".to_owned(),
            _ => format!(
                "not raised: heard {:.0} s ago; OFFLINE after {:.0} s of silence",
                value.unwrap_or(0.0),
                rule.threshold
            ),
        },
        RuleKind::Desired => match state {
            "raised" => "raised: a command timed out and the twin has not converged since".into(),
            _ => "not raised: no command timed out".into(),
        },
    };
    out["explanation"] = reason.into();
    out
}

pub(super) async fn explain_twin(
    State(s): State<ApiState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
    q: Params<ExplainParams>,
) -> Answer {
    let Path(id) = id.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let q = params(q)?;
    let topology = s.view.topology();
    let rules = &topology.rules;
    let indexes: Vec<usize> = match &q.rule {
        Some(code) => vec![
            rules
                .rules
                .iter()
                .position(|r| &r.code == code)
                .ok_or_else(|| {
                    error(
                        StatusCode::NOT_FOUND,
                        format!("the model has no rule {code}"),
                    )
                })?,
        ],
        None => (0..rules.rules.len()).collect(),
    };
    let now = s.clock.now_ms();
    let view = s.view.clone();
    let found = tokio::task::spawn_blocking(move || {
        let query = HistoryQuery {
            descending: true,
            limit: super::MAX_PAGE,
            ..HistoryQuery::default()
        };
        let twin = view.twin(&id)?;
        let history = view.history(&id, &query, now)?;
        Ok::<_, crate::error::Error>((id, twin, history.map(|h| h.0).unwrap_or_default()))
    })
    .await
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (id, twin, versions) = found;
    let Some(twin) = twin else {
        return Err(error(StatusCode::NOT_FOUND, format!("no twin '{id}'")));
    };
    let explained: Vec<Value> = indexes
        .iter()
        .map(|&i| {
            let mut e = explain(rules, i, &topology.model, &twin, now);
            let (raised, cleared) = last_transitions(&versions, &rules.rules[i].code);
            e["last_raised"] = raised.map(rfc3339).into();
            e["last_cleared"] = cleared.map(rfc3339).into();
            e
        })
        .collect();
    let refused = s.view.refusal(&id);
    // A reading refused while the twin stayed at the version it had: nothing applied since.
    let latest_refused = refused.as_ref().is_some_and(|r| {
        r.source_topic == topology.topics.telemetry.name && r.twin_version >= twin.version
    });
    Ok(Json(json!({
        "asset_id": id,
        "version": twin.version,
        "status": twin.status.symbol(),
        "event_time": rfc3339(twin.event_time),
        "at": rfc3339(now),
        "history_versions": versions.len(),
        "rules": explained,
        "last_refused": refused,
        "latest_reading_refused": latest_refused,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twin::{Effects, Reading, Value as V};

    /// A rule with `for` that holds says how much longer it must hold, in event time.
    #[test]
    fn a_pending_rule_says_how_long_it_must_still_hold() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let paths = crate::config::TopologyConfig::shipped(root, "vehicle");
        let mut topology = crate::topology::Topology::load(&paths).expect("loads");
        let index = (topology.rules.rules.iter())
            .position(|r| r.code == "TEMP_BREACH")
            .expect("the vehicle model has TEMP_BREACH");
        topology.rules.rules[index].min_duration = Some(60_000);
        let temperature = topology
            .model
            .property("temperature_c")
            .expect("a property");
        let mut twin = Twin::new("reefer-1", &topology.model);
        let (mut fx, mut alerts) = (Effects::default(), Vec::new());
        let t0 = 1_800_000_000_000;
        for (at, value) in [(t0, 9.0), (t0 + 20_000, 9.5)] {
            let reading = Reading {
                asset_id: "reefer-1".into(),
                event_time: at,
                values: vec![(temperature, V::Double(value))],
            };
            let core = topology.core();
            core.reading(&mut twin, &reading, t0 + 30_000, &mut fx, &mut alerts)
                .expect("applied");
        }
        let e = explain(&topology.rules, index, &topology.model, &twin, t0 + 30_000);
        assert_eq!(e["state"], "pending", "{e:#}");
        assert_eq!(e["pending"]["since"], rfc3339(t0));
        assert_eq!(e["pending"]["remaining_seconds"], 40.0);
        assert_eq!(e["rule"]["for"], "1m");
    }
}
