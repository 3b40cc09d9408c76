use super::*;
use crate::twin::{Model, PropKind, PropertyDef, Reading, Value};

fn setup() -> (Model, RuleSet) {
    let prop = |name: &str| PropertyDef {
        name: name.into(),
        kind: PropKind::Double,
        min: None,
        max: None,
    };
    let model = Model {
        properties: vec![prop("temperature_c"), prop("battery_pct")],
        active_when: None,
    };
    let rule = |code: &str, property: usize, op, threshold| Rule {
        code: code.into(),
        severity: Severity::Critical,
        property,
        property_name: model.properties[property].name.clone(),
        op,
        threshold,
    };
    let rules = RuleSet {
        rules: vec![
            rule("TEMP_BREACH", 0, Op::Gt, 8.0),
            rule("LOW_BATTERY", 1, Op::Lt, 15.0),
        ],
    };
    (model, rules)
}

/// Applies readings `(time, property, value)` and returns every alert event, in order.
fn run(readings: &[(i64, usize, f64)]) -> (Twin, Vec<AlertEvent>) {
    let (model, rules) = setup();
    let mut twin = Twin::new("reefer-7", &model);
    let mut events = Vec::new();
    for (t, p, v) in readings {
        let reading = Reading {
            asset_id: "reefer-7".into(),
            event_time: *t,
            values: vec![(*p, Value::Double(*v))],
        };
        if let Ok(change) = twin.apply(&model, &reading, 0) {
            rules.evaluate(&mut twin, &change, &mut events);
        }
    }
    (twin, events)
}

#[test]
fn raises_once_and_clears_once() {
    let (twin, events) = run(&[
        (1, 0, 4.0),
        (2, 0, 9.0),
        (3, 0, 10.5),
        (4, 0, 11.0),
        (5, 0, 7.0),
        (6, 0, 6.0),
    ]);
    let states: Vec<_> = events
        .iter()
        .map(|e| (e.state, e.event_time, e.value))
        .collect();
    assert_eq!(
        states,
        vec![(AlertState::Raised, 2, 9.0), (AlertState::Cleared, 5, 7.0)]
    );
    assert_eq!(
        events[0].alert_id, events[1].alert_id,
        "one id from RAISED to CLEARED"
    );
    assert_eq!(events[1].raised_at, 2);
    assert!(twin.alerts.is_empty());
}

#[test]
fn twin_carries_its_raised_alerts_in_rule_order() {
    let (twin, events) = run(&[(1, 1, 10.0), (2, 0, 9.5)]);
    assert_eq!(events.len(), 2);
    let codes: Vec<_> = twin.alerts.iter().map(|a| a.code.as_str()).collect();
    assert_eq!(codes, ["TEMP_BREACH", "LOW_BATTERY"]);
    assert_eq!(twin.alerts[0].value, 9.5);
    assert_eq!(events[1].twin_version, twin.version);
}

#[test]
fn replay_yields_the_same_alert_ids() {
    let input = [(10, 0, 9.0), (20, 0, 5.0), (30, 0, 12.0)];
    assert_eq!(run(&input).1, run(&input).1);
    let ids: Vec<_> = run(&input).1.iter().map(|e| e.alert_id.clone()).collect();
    assert_ne!(ids[0], ids[2], "a new breach is a new alert");
}

#[test]
fn untouched_rules_emit_nothing() {
    let (_, events) = run(&[(1, 0, 9.0), (2, 1, 80.0), (3, 1, 70.0)]);
    assert_eq!(events.len(), 1);
}
