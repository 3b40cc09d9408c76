use super::*;
use proptest::prelude::*;

fn model() -> Model {
    let prop = |name: &str| PropertyDef {
        name: name.into(),
        kind: PropKind::Double,
        min: None,
        max: None,
    };
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
    }
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

proptest! {
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
