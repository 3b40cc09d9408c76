use super::*;
use proptest::prelude::*;

fn model() -> Model {
    let prop = |name: &str| PropertyDef::new(name, PropKind::Double);
    Model {
        properties: vec![
            prop("speed_kmh"),
            prop("temperature_c"),
            prop("battery_pct"),
        ],
        active_when: Some(ActiveWhen {
            property: 0,
            above: 1.0,
        }),
        time: TimePolicy::default(),
        desired: Default::default(),
    }
}

fn timed() -> Model {
    let mut m = model();
    m.time = TimePolicy {
        allowed_lateness: Some(60_000),
        max_future: Some(5_000),
        offline_after: Some(300_000),
        idle_after: Some(120_000),
        ..TimePolicy::default()
    };
    m
}

fn reading(t: i64, values: &[(usize, f64)]) -> Reading {
    Reading {
        asset_id: "truck-1".into(),
        event_time: t,
        values: values
            .iter()
            .map(|(i, v)| (*i, Value::Double(*v)))
            .collect(),
    }
}

#[test]
fn absent_properties_keep_their_previous_value() {
    let m = model();
    let mut twin = Twin::new("truck-1", &m);
    twin.apply(&m, &reading(1000, &[(0, 50.0), (1, 4.0)]), 5)
        .unwrap();
    let change = twin.apply(&m, &reading(2000, &[(2, 80.0)]), 6).unwrap();
    assert_eq!(twin.value(0), Some(&Value::Double(50.0)));
    assert_eq!(twin.value(1), Some(&Value::Double(4.0)));
    assert_eq!(twin.value(2), Some(&Value::Double(80.0)));
    assert!(change.changed(2) && !change.changed(0));
    assert_eq!(
        (twin.version, twin.event_time, twin.last_seen),
        (2, 2000, 6)
    );
}

#[test]
fn late_reading_updates_only_properties_it_is_newer_for() {
    let m = model();
    let mut twin = Twin::new("truck-1", &m);
    twin.apply(&m, &reading(3000, &[(0, 60.0)]), 1).unwrap();
    let change = twin
        .apply(&m, &reading(2000, &[(0, 10.0), (1, 5.0)]), 2)
        .unwrap();
    assert_eq!(
        twin.value(0),
        Some(&Value::Double(60.0)),
        "newer speed kept"
    );
    assert_eq!(
        twin.value(1),
        Some(&Value::Double(5.0)),
        "unknown temperature taken"
    );
    assert_eq!(twin.event_time, 3000, "event time never goes back");
    assert!(change.changed(1) && !change.changed(0));
}

#[test]
fn duplicate_and_stale_readings_change_nothing() {
    let m = model();
    let mut twin = Twin::new("truck-1", &m);
    twin.apply(&m, &reading(3000, &[(0, 60.0)]), 1).unwrap();
    let before = twin.clone();
    assert_eq!(
        twin.apply(&m, &reading(3000, &[(0, 60.0)]), 9),
        Err(NoChange::Duplicate)
    );
    assert_eq!(
        twin.apply(&m, &reading(1000, &[(0, 70.0)]), 9),
        Err(NoChange::Stale)
    );
    assert_eq!(twin, before);
}

#[test]
fn status_follows_the_motion_property() {
    let m = model();
    let mut twin = Twin::new("truck-1", &m);
    twin.apply(&m, &reading(1000, &[(1, 4.0)]), 1).unwrap();
    assert_eq!(
        twin.status,
        Status::Active,
        "no speed known yet: reporting means active"
    );
    twin.apply(&m, &reading(2000, &[(0, 0.0)]), 1).unwrap();
    assert_eq!(twin.status, Status::Idle);
    twin.apply(&m, &reading(3000, &[(0, 42.0)]), 1).unwrap();
    assert_eq!(twin.status, Status::Active);
}

#[test]
fn idle_and_offline_follow_the_wall_clock() {
    let m = timed();
    let mut twin = Twin::new("truck-1", &m);
    assert_eq!(m.deadline(&twin), None, "a fresh twin has no timer");
    twin.apply(&m, &reading(1000, &[(0, 50.0)]), 10_000)
        .unwrap();
    assert_eq!(
        m.deadline(&twin),
        Some(310_000),
        "offline after 5 min of silence"
    );
    twin.apply(&m, &reading(2000, &[(0, 0.0)]), 20_000).unwrap();
    assert_eq!(
        (twin.status, twin.still_since),
        (Status::Active, Some(20_000)),
        "standing still, not yet for long"
    );
    assert_eq!(m.deadline(&twin), Some(140_000), "idle after 2 min still");
    twin.apply(&m, &reading(3000, &[(0, 0.5)]), 30_000).unwrap();
    assert_eq!(
        twin.still_since,
        Some(20_000),
        "still since the first still reading"
    );
    assert!(!twin.tick(&m, 139_999));
    let version = twin.version;
    assert!(twin.tick(&m, 140_000));
    assert_eq!(
        (twin.status, twin.version, twin.updated_at),
        (Status::Idle, version + 1, 140_000)
    );
    assert_eq!(twin.last_seen, 30_000, "a timer is not a reading");
    assert_eq!(m.deadline(&twin), Some(330_000));
    assert!(twin.tick(&m, 400_000));
    assert_eq!(twin.status, Status::Offline);
    assert_eq!(m.deadline(&twin), None, "offline until the next reading");
    assert!(!twin.tick(&m, 900_000), "each timer fires once");
    twin.apply(&m, &reading(4000, &[(0, 30.0)]), 950_000)
        .unwrap();
    assert_eq!((twin.status, twin.still_since), (Status::Active, None));
}

#[test]
fn late_and_future_readings_are_refused() {
    let m = timed();
    let mut twin = Twin::new("truck-1", &m);
    let now = 1_000_000;
    assert_eq!(m.check_time(&twin, now + 5_001, now), Err(Untimely::Future));
    assert_eq!(
        m.check_time(&twin, 1, now),
        Ok(()),
        "a first reading is never late"
    );
    twin.apply(&m, &reading(900_000, &[(0, 50.0)]), now)
        .unwrap();
    assert_eq!(m.check_time(&twin, 840_000, now), Ok(()));
    assert_eq!(m.check_time(&twin, 839_999, now), Err(Untimely::Late));
    assert_eq!(m.check_time(&twin, now + 5_000, now), Ok(()));
}

proptest! {
    /// Out-of-order and repeated readings give the same twin as the sorted stream: each
    /// property's newest value and time, the newest event time, the status, and a forecast
    /// rule's window (a bucket holding several readings here) with its prediction.
    #[test]
    fn any_order_with_duplicates_gives_the_sorted_twin(
        readings in prop::collection::vec((0i64..500, prop::collection::vec((0usize..3, 0.0f64..150.0), 1..3)), 1..30),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        repeats in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let m = model();
        // One reading per event time, one value per property, so "newest" is well defined.
        let mut sorted: Vec<Reading> = Vec::new();
        for (t, values) in &readings {
            if sorted.iter().any(|r| r.event_time == t * 10) {
                continue;
            }
            let mut values = values.clone();
            values.sort_by_key(|(p, _)| *p);
            values.dedup_by_key(|(p, _)| *p);
            sorted.push(reading(t * 10, &values));
        }
        sorted.sort_by_key(|r| r.event_time);
        let mut shuffled = sorted.clone();
        for (i, j) in order.iter().enumerate() {
            let n = shuffled.len();
            shuffled.swap(i % n, j.index(n));
        }
        for r in &repeats {
            let again = shuffled[r.index(shuffled.len())].clone();
            shuffled.push(again);
        }
        let spec = crate::rules::ForecastSpec {
            horizon: 60_000,
            clear_horizon: 75_000,
            window: 1_000,
            min_samples: 3,
            min_span: 200,
            min_fit: 0.0,
        };
        let forecast = crate::rules::Rule::forecast(
            "LOW_BATTERY_PREDICTED",
            Severity::Warning,
            (2, "battery_pct"),
            (crate::rules::Op::Lt, 15.0),
            spec,
        );
        let rules = crate::rules::RuleSet { rules: vec![forecast] };
        let final_twin = |stream: &[Reading]| {
            let mut twin = Twin::new("truck-1", &m);
            for r in stream {
                rules.observe(&mut twin, r);
                let _ = twin.apply(&m, r, 7);
            }
            let prediction = rules.predict(0, &twin);
            (twin.props, twin.event_time, twin.status, twin.forecasts, format!("{prediction:?}"))
        };
        prop_assert_eq!(final_twin(&shuffled), final_twin(&sorted));
    }


    /// Replaying the same readings onto the same twin gives the same twin: the property the
    /// at-least-once replay after a crash relies on.
    #[test]
    fn apply_is_deterministic(steps in prop::collection::vec((0i64..50, 0usize..3, -10.0f64..150.0), 1..60)) {
        let m = model();
        let run = || {
            let mut twin = Twin::new("truck-1", &m);
            let mut outcomes = Vec::new();
            for (t, p, v) in &steps {
                outcomes.push(twin.apply(&m, &reading(*t * 100, &[(*p, *v)]), 7));
            }
            (twin, outcomes)
        };
        prop_assert_eq!(run(), run());
    }

    /// Whatever order readings arrive in, every property ends with its newest value.
    #[test]
    fn newest_value_wins_in_any_order(mut steps in prop::collection::vec((0i64..1000, 0usize..3, -10.0f64..150.0), 1..40)) {
        let m = model();
        // One value per (time, property) so "newest" is well defined.
        steps.sort_by_key(|(t, p, _)| (*t, *p));
        steps.dedup_by_key(|(t, p, _)| (*t, *p));
        let mut expected: [Option<(i64, f64)>; 3] = [None; 3];
        for (t, p, v) in &steps {
            if expected[*p].is_none_or(|(et, _)| *t >= et) {
                expected[*p] = Some((*t, *v));
            }
        }
        steps.reverse();
        let mut twin = Twin::new("truck-1", &m);
        for (t, p, v) in &steps {
            let _ = twin.apply(&m, &reading(*t, &[(*p, *v)]), 1);
        }
        for (p, e) in expected.iter().enumerate() {
            prop_assert_eq!(twin.value(p).and_then(Value::as_f64), e.map(|(_, v)| v));
        }
    }
}
