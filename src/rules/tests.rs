use super::*;
use crate::twin::{Model, PropKind, PropertyDef, Reading, Value};

fn setup() -> (Model, RuleSet) {
    let prop = |name: &str| PropertyDef::new(name, PropKind::Double);
    let model = Model {
        properties: vec![prop("temperature_c"), prop("battery_pct")],
        active_when: None,
        time: Default::default(),
        desired: Default::default(),
    };
    let rule = |code: &str, property: usize, op, threshold| {
        Rule::threshold(
            code,
            Severity::Critical,
            (property, &model.properties[property].name),
            op,
            threshold,
        )
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
    run_with(&model, &rules, readings)
}

fn run_with(
    model: &Model,
    rules: &RuleSet,
    readings: &[(i64, usize, f64)],
) -> (Twin, Vec<AlertEvent>) {
    let mut twin = Twin::new("reefer-7", &model);
    let mut events = Vec::new();
    for (t, p, v) in readings {
        let reading = Reading {
            asset_id: "reefer-7".into(),
            event_time: *t,
            values: vec![(*p, Value::Double(*v))],
        };
        if let Ok(change) = twin.apply(model, &reading, 0) {
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

/// A noisy temperature around the 8 °C threshold: 7.9, 8.1, 7.8, 8.2, ... then 6.0.
fn noisy() -> Vec<(i64, usize, f64)> {
    let mut readings: Vec<_> = (0..40)
        .map(|i| {
            let wobble = if i % 2 == 0 { -0.1 } else { 0.1 } * f64::from(1 + i % 3);
            (i64::from(i) * 1000, 0, 8.0 + wobble)
        })
        .collect();
    readings.push((40_000, 0, 6.0));
    readings
}

#[test]
fn hysteresis_stops_a_noisy_signal_from_flapping() {
    let (model, mut rules) = setup();
    let (_, plain) = run_with(&model, &rules, &noisy());
    rules.rules[0].clear_threshold = Some(7.5);
    let (twin, calm) = run_with(&model, &rules, &noisy());
    let raised = |events: &[AlertEvent]| {
        events
            .iter()
            .filter(|e| e.state == AlertState::Raised)
            .count()
    };
    assert_eq!(
        (raised(&plain), plain.len()),
        (20, 40),
        "every wobble flaps"
    );
    assert_eq!(raised(&calm), 1, "one alert for the whole episode");
    let states: Vec<_> = calm.iter().map(|e| (e.state, e.event_time)).collect();
    assert_eq!(
        states,
        [(AlertState::Raised, 1000), (AlertState::Cleared, 40_000)],
        "cleared only once the value falls to the clear threshold"
    );
    assert!(twin.alerts.is_empty());
}

#[test]
fn minimum_duration_raises_only_once_the_condition_has_held() {
    let (model, mut rules) = setup();
    rules.rules[0].min_duration = Some(30_000);
    // Above for 20 s, a dip, then above for 40 s.
    let mut readings = vec![
        (0, 0, 9.0),
        (10_000, 0, 9.5),
        (20_000, 0, 9.2),
        (25_000, 0, 7.0),
    ];
    readings.extend((0..5).map(|i| (30_000 + i * 10_000, 0, 9.0 + i as f64 / 10.0)));
    let (twin, events) = run_with(&model, &rules, &readings);
    let states: Vec<_> = events.iter().map(|e| (e.state, e.raised_at)).collect();
    assert_eq!(
        states,
        [(AlertState::Raised, 60_000)],
        "the dip restarts the clock: raised 30 s after 30 000, not after 0"
    );
    assert!(twin.pending.is_empty());
    let (twin, events) = run_with(&model, &rules, &readings[..6]);
    assert!(events.is_empty());
    assert_eq!(
        twin.pending[0].since, 30_000,
        "pending, waiting out the duration"
    );
}

/// A value that stays the same over the threshold raises once it has held for `for`: the
/// readings repeat it, so no reading changes the value.
#[test]
fn a_steady_value_over_the_threshold_raises_after_its_minimum_duration() {
    let (model, mut rules) = setup();
    rules.rules[0].min_duration = Some(30_000);
    let readings: Vec<(i64, usize, f64)> = (0..5).map(|i| (i * 10_000, 0, 9.5)).collect();
    let (twin, events) = run_with(&model, &rules, &readings);
    let states: Vec<_> = events.iter().map(|e| (e.state, e.event_time)).collect();
    assert_eq!(states, [(AlertState::Raised, 30_000)]);
    assert!(twin.pending.is_empty());
}

#[test]
fn offline_raises_when_the_status_turns_offline_and_clears_with_the_next_reading() {
    let (mut model, mut rules) = setup();
    model.time.offline_after = Some(60_000);
    rules.rules.push(Rule::offline(Severity::Warning, 60_000));
    let mut twin = Twin::new("reefer-7", &model);
    let mut events = Vec::new();
    let reading = |t| Reading {
        asset_id: "reefer-7".into(),
        event_time: t,
        values: vec![(1, Value::Double(50.0))],
    };
    let change = twin.apply(&model, &reading(5_000), 1_000_000).unwrap();
    rules.evaluate(&mut twin, &change, &mut events);
    assert!(events.is_empty());
    assert!(!twin.tick(&model, 1_059_999), "not yet");
    assert!(twin.tick(&model, 1_060_500));
    rules.evaluate(&mut twin, &TwinChange::default(), &mut events);
    assert!(!twin.tick(&model, 1_090_000), "fires once");
    let change = twin.apply(&model, &reading(100_000), 1_100_000).unwrap();
    rules.evaluate(&mut twin, &change, &mut events);
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.rule, e.state, e.raised_at, e.event_time))
        .collect();
    assert_eq!(
        seen,
        [
            (2, AlertState::Raised, 1_060_000, 1_060_000),
            (2, AlertState::Cleared, 1_060_000, 100_000)
        ],
        "raised at the deadline whenever the timer ran, cleared by the reading"
    );
    assert_eq!(
        events[0].alert_id,
        alert_id("reefer-7", OFFLINE_CODE, 1_060_000)
    );
    assert_eq!(events[0].value, 60.5, "seconds of silence when it fired");
    assert_eq!(twin.status, Status::Active);
}

#[test]
fn acknowledgement_marks_the_active_alert_once() {
    let (model, rules) = setup();
    let (mut twin, events) = run_with(&model, &rules, &[(1, 0, 9.0)]);
    let id = events[0].alert_id.clone();
    let version = twin.version;
    let ack = rules
        .acknowledge(&mut twin, &id, Some("ops"), 5000)
        .unwrap();
    assert_eq!(
        (ack.state, ack.alert_id.as_str(), ack.twin_version),
        (AlertState::Acknowledged, id.as_str(), version + 1)
    );
    assert_eq!(ack.acknowledged_by.as_deref(), Some("ops"));
    assert_eq!(twin.alerts[0].acknowledged_at, Some(5000));
    assert_eq!((twin.version, twin.updated_at), (version + 1, 5000));
    let before = twin.clone();
    assert_eq!(
        rules.acknowledge(&mut twin, &id, Some("ops"), 6000),
        Err(AckOutcome::Repeated)
    );
    assert_eq!(
        rules.acknowledge(&mut twin, "no-such-alert", None, 6000),
        Err(AckOutcome::Unknown)
    );
    assert_eq!(twin, before, "no-ops change nothing");
    // Cleared: the acknowledgement of a cleared alert is unknown.
    let reading = Reading {
        asset_id: "reefer-7".into(),
        event_time: 2,
        values: vec![(0, Value::Double(5.0))],
    };
    let change = twin.apply(&model, &reading, 0).unwrap();
    let mut cleared = Vec::new();
    rules.evaluate(&mut twin, &change, &mut cleared);
    assert_eq!(cleared[0].state, AlertState::Cleared);
    assert_eq!(
        rules.acknowledge(&mut twin, &id, None, 7000),
        Err(AckOutcome::Unknown)
    );
}

/// A battery model with `LOW_BATTERY` (< 15) and `LOW_BATTERY_PREDICTED` (< 15 within 40
/// minutes, fitted over 15 minutes).
fn forecasting() -> (Model, RuleSet) {
    let (model, mut rules) = setup();
    let spec = ForecastSpec {
        horizon: 40 * MINUTE,
        clear_horizon: 50 * MINUTE,
        window: 15 * MINUTE,
        min_samples: 5,
        min_span: 15 * MINUTE,
        min_fit: 0.8,
    };
    let name = model.properties[1].name.clone();
    let forecast = Rule::forecast(
        "LOW_BATTERY_PREDICTED",
        Severity::Warning,
        (1, &name),
        (Op::Lt, 15.0),
        spec,
    );
    rules.rules.push(forecast);
    (model, rules)
}

const MINUTE: i64 = 60_000;

/// Readings of the battery, one a minute from minute 0, through the forecasting rules as the
/// processor runs them (the step); the twin and the events.
fn battery(values: &[f64]) -> (Twin, Vec<AlertEvent>) {
    let readings: Vec<(i64, f64)> = (values.iter().enumerate())
        .map(|(m, v)| (m as i64 * MINUTE, *v))
        .collect();
    battery_at(&readings, forecasting())
}

/// Readings `(event time, battery)` of one truck through `rules`, each processed at its event
/// time; the twin and the events.
fn battery_at(
    readings: &[(i64, f64)],
    (model, rules): (Model, RuleSet),
) -> (Twin, Vec<AlertEvent>) {
    let core = crate::step::Core {
        model: &model,
        rules: &rules,
    };
    let mut twin = Twin::new("truck-3", &model);
    let (mut events, mut alerts, mut fx) = (Vec::new(), Vec::new(), Default::default());
    for (at, v) in readings {
        let reading = Reading {
            asset_id: "truck-3".into(),
            event_time: *at,
            values: vec![(1, Value::Double(*v))],
        };
        core.reading(&mut twin, &reading, *at, &mut fx, &mut alerts)
            .expect("timely");
        events.append(&mut alerts);
    }
    (twin, events)
}

fn codes(
    events: &[AlertEvent],
    rules: &RuleSet,
) -> Vec<(String, AlertState, Option<&'static str>)> {
    events
        .iter()
        .map(|e| (rules.rules[e.rule].code.clone(), e.state, e.reason))
        .collect()
}

/// A drain of 1 %/min from 60 %: the threshold of 15 % is crossed at minute 45. The forecast
/// raises once the readings span 12 minutes, predicting the crossing within a minute of the
/// truth; when the real alert raises, it clears as breached.
#[test]
fn a_steady_drain_is_forecast_within_a_minute_and_ends_breached() {
    let drain: Vec<f64> = (0..50).map(|m| 60.0 - m as f64).collect();
    let (twin, events) = battery(&drain);
    let (_, rules) = forecasting();
    assert_eq!(
        codes(&events, &rules),
        [
            ("LOW_BATTERY_PREDICTED".into(), AlertState::Raised, None),
            ("LOW_BATTERY".into(), AlertState::Raised, None),
            (
                "LOW_BATTERY_PREDICTED".into(),
                AlertState::Cleared,
                Some("breached")
            ),
        ]
    );
    let raised = &events[0];
    let f = raised.forecast.expect("the prediction");
    assert!((f.breach_at - 45 * MINUTE).abs() <= MINUTE, "{f:?}");
    assert!(f.time_to_breach <= 40 * MINUTE && f.fit > 0.99, "{f:?}");
    assert_eq!(
        raised.event_time,
        15 * MINUTE,
        "raised once the readings span the window"
    );
    assert!(twin.forecasts[0].points.len() <= forecast::MAX_POINTS);
}

/// A device that reports every two seconds: the window keeps a point per 23rd of it, spread
/// over the whole window, so the forecast raises as for a reading a minute (with the default
/// `min_span`, the window less one bucket), within a minute of the true crossing.
#[test]
fn a_dense_drain_is_forecast_over_the_whole_window() {
    let (model, mut rules) = forecasting();
    let spec = rules.rules.last_mut().unwrap().forecast.as_mut().unwrap();
    spec.min_span = spec.window - forecast::bucket(spec.window);
    let readings: Vec<(i64, f64)> = (0..30 * 30)
        .map(|i| (i * 2_000, 60.0 - i as f64 * 2.0 / 60.0))
        .collect();
    let (twin, events) = battery_at(&readings, (model, rules));
    let raised = (events.iter())
        .find(|e| e.state == AlertState::Raised)
        .expect("raised");
    let f = raised.forecast.expect("the prediction");
    assert!((f.breach_at - 45 * MINUTE).abs() <= MINUTE, "{f:?}");
    assert!(
        raised.event_time <= 15 * MINUTE + 2 * forecast::bucket(15 * MINUTE),
        "raised once the window is full: {}",
        raised.event_time
    );
    let points = &twin.forecasts[0].points;
    assert!(points.len() <= forecast::MAX_POINTS, "{}", points.len());
    let span = points.last().unwrap().0 - points[0].0;
    assert!(span >= 14 * MINUTE, "the points span the window: {span}");
}

/// The same drain with noise of up to ±1 %, twenty seeds: every raise predicts the crossing
/// within three minutes of the true one.
#[test]
fn a_noisy_drain_is_forecast_within_three_minutes() {
    for seed in 0..20 {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let noisy: Vec<f64> = (0..45)
            .map(|m| 60.0 - m as f64 + rand::Rng::gen_range(&mut rng, -1.0..1.0))
            .collect();
        let (_, events) = battery(&noisy);
        let raised: Vec<_> = events
            .iter()
            .filter(|e| e.state == AlertState::Raised)
            .collect();
        assert!(!raised.is_empty(), "seed {seed}: {events:?}");
        for e in raised {
            let f = e.forecast.expect("the prediction");
            assert!(
                (f.breach_at - 45 * MINUTE).abs() <= 3 * MINUTE,
                "seed {seed}: {f:?}"
            );
        }
    }
}

/// A flat series, a single spike and a slow drain far from the threshold raise nothing; a
/// drain that turns clears as averted; an asset that goes OFFLINE clears it as stale.
#[test]
fn spikes_and_flat_series_raise_nothing_and_turned_trends_are_averted() {
    let (_, rules) = forecasting();
    let mut spike = vec![60.0; 20];
    spike[15] = 20.0;
    assert_eq!(battery(&spike).1, []);
    assert_eq!(battery(&[60.0; 20]).1, []);
    let slow: Vec<f64> = (0..30).map(|m| 90.0 - 0.1 * m as f64).collect();
    assert_eq!(battery(&slow).1, []);

    let mut turned: Vec<f64> = (0..20).map(|m| 60.0 - m as f64).collect();
    turned.extend((1..20).map(|m| 41.0 + m as f64));
    let (_, events) = battery(&turned);
    assert_eq!(
        codes(&events, &rules),
        [
            ("LOW_BATTERY_PREDICTED".into(), AlertState::Raised, None),
            (
                "LOW_BATTERY_PREDICTED".into(),
                AlertState::Cleared,
                Some("averted")
            ),
        ]
    );

    let drain: Vec<f64> = (0..20).map(|m| 60.0 - m as f64).collect();
    let (mut twin, events) = battery(&drain);
    assert_eq!(events.len(), 1);
    twin.status = Status::Offline;
    let mut out = Vec::new();
    rules.evaluate(&mut twin, &TwinChange::default(), &mut out);
    assert_eq!(
        codes(&out, &rules),
        [(
            "LOW_BATTERY_PREDICTED".into(),
            AlertState::Cleared,
            Some("stale")
        )]
    );
}

/// Replayed in any order, the same readings leave the same forecast window in the twin.
#[test]
fn the_window_does_not_depend_on_arrival_order() {
    let (model, rules) = forecasting();
    let readings: Vec<(i64, f64)> = (0..40)
        .map(|m| (m * MINUTE, 60.0 - m as f64 * 0.7))
        .collect();
    let window = |order: &mut dyn Iterator<Item = &(i64, f64)>| {
        let mut twin = Twin::new("truck-3", &model);
        for (t, v) in order {
            let reading = Reading {
                asset_id: "truck-3".into(),
                event_time: *t,
                values: vec![(1, Value::Double(*v))],
            };
            rules.observe(&mut twin, &reading);
            let _ = twin.apply(&model, &reading, 0);
        }
        twin.forecasts
    };
    let forward = window(&mut readings.iter());
    let backward = window(&mut readings.iter().rev());
    let shuffled = window(
        &mut readings
            .iter()
            .step_by(3)
            .chain(readings.iter().skip(1).step_by(3))
            .chain(readings.iter().skip(2).step_by(3)),
    );
    assert_eq!(forward, backward);
    assert_eq!(forward, shuffled);
    assert_eq!(
        forward[0].points.len(),
        16,
        "the newest 15 minutes, both ends included"
    );
}
