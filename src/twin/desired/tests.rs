use super::*;
use crate::rules::{AlertState, DESIRED_CODE, Rule, RuleSet};
use crate::twin::{DesiredPolicy, PropKind, PropertyDef, Reading, TimePolicy, TwinChange};
use proptest::prelude::*;

const MINUTE: i64 = 60_000;
const T0: i64 = 1_790_000_000_000;
const TEMP: usize = 0;
const MODE: usize = 1;
const SPEED: usize = 2;

fn model() -> Model {
    let mut temp = PropertyDef::new("temperature_c", PropKind::Double);
    temp.writable = true;
    temp.tolerance = 1.0;
    temp.min = Some(-60.0);
    temp.max = Some(80.0);
    let mut mode = PropertyDef::new("mode", PropKind::Str);
    mode.writable = true;
    Model {
        properties: vec![temp, mode, PropertyDef::new("speed_kmh", PropKind::Double)],
        active_when: None,
        time: TimePolicy::default(),
        desired: DesiredPolicy {
            converge_within: Some(10 * MINUTE),
            clear_reached: true,
        },
    }
}

fn rules() -> RuleSet {
    RuleSet {
        rules: vec![Rule::desired_not_reached(
            crate::twin::Severity::Warning,
            10 * MINUTE,
        )],
    }
}

/// A twin that has had one reading (a desired write needs one).
fn twin(m: &Model) -> Twin {
    let mut t = Twin::new("reefer-1", m);
    t.apply(m, &reading(T0 - MINUTE, &[(TEMP, 9.0)]), T0 - MINUTE)
        .expect("first reading");
    t
}

fn reading(t: i64, values: &[(usize, f64)]) -> Reading {
    Reading {
        asset_id: "reefer-1".into(),
        event_time: t,
        values: values
            .iter()
            .map(|(i, v)| (*i, Value::Double(*v)))
            .collect(),
    }
}

fn write(id: &str, values: &[(usize, Option<Value>)], if_match: Option<i64>) -> DesiredWrite {
    DesiredWrite {
        command_id: id.into(),
        values: values.to_vec(),
        if_match,
        by: "ops".into(),
    }
}

fn temp(v: f64) -> Option<Value> {
    Some(Value::Double(v))
}

/// A twin with command c1 (temperature 4.0) and c2 (mode eco), both issued at T0.
fn with_two_commands(m: &Model) -> (Twin, Effects) {
    let mut t = twin(m);
    let mut fx = Effects::default();
    t.set_desired(m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("applied");
    let eco = Some(Value::Str("eco".into()));
    t.set_desired(m, &write("c2", &[(MODE, eco)], None), T0, &mut fx)
        .expect("applied");
    (t, fx)
}

/// What the processor does with a reading: catch up on timeouts, merge, converge.
fn observe(t: &mut Twin, m: &Model, r: &Reading, now: i64, fx: &mut Effects) {
    t.expire(now, fx);
    if t.apply(m, r, now).is_ok() {
        t.converge(m, fx);
    }
}

fn states(fx: &Effects) -> Vec<(&str, CommandState)> {
    fx.events
        .iter()
        .map(|e| (e.command_id.as_str(), e.state))
        .collect()
}

#[test]
fn a_reading_within_tolerance_at_or_after_set_at_converges_and_clears_the_value() {
    let m = model();
    let mut t = twin(&m);
    let mut fx = Effects::default();
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], Some(0)), T0, &mut fx)
        .expect("applied");
    assert_eq!(states(&fx), [("c1", CommandState::Issued)]);
    assert_eq!(fx.sends, ["c1"]);
    assert_eq!((t.desired_version, t.delta), (1, 1 << TEMP));

    // Within tolerance but stamped before the write: the device had not seen it yet.
    fx.clear();
    observe(
        &mut t,
        &m,
        &reading(T0 - 1, &[(TEMP, 4.5)]),
        T0 + 1000,
        &mut fx,
    );
    assert!(fx.is_empty());
    assert_eq!(t.delta, 0, "the delta follows the reported value");
    // After the write but outside tolerance.
    observe(
        &mut t,
        &m,
        &reading(T0 + 1000, &[(TEMP, 5.5)]),
        T0 + 2000,
        &mut fx,
    );
    assert!(fx.is_empty());
    assert_eq!(t.delta, 1 << TEMP);
    // Within tolerance (|4.0 - 4.9| <= 1.0), after the write.
    observe(
        &mut t,
        &m,
        &reading(T0 + 2000, &[(TEMP, 4.9)]),
        T0 + 3000,
        &mut fx,
    );
    assert_eq!(states(&fx), [("c1", CommandState::Converged)]);
    assert_eq!(
        fx.events[0].at,
        T0 + 2000,
        "at the converging reading's event time"
    );
    assert!(t.desired.is_empty() && t.commands.is_empty() && t.delta == 0);
    assert_eq!(t.desired_version, 1, "clearing a reached value is no write");
}

#[test]
fn a_reading_stamped_after_the_write_but_applied_before_it_converges_it() {
    let m = model();
    let mut t = twin(&m);
    let mut fx = Effects::default();
    // The inputs are separate topics: the reading may be processed first.
    observe(&mut t, &m, &reading(T0 + 500, &[(TEMP, 4.2)]), T0, &mut fx);
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("applied");
    assert_eq!(
        states(&fx),
        [
            ("c1", CommandState::Issued),
            ("c1", CommandState::Converged)
        ]
    );
    assert_eq!(fx.events[1].at, T0 + 500, "converged when the reading says");
    assert!(t.commands.is_empty() && t.desired.is_empty());
    // One stamped before the write does not count.
    let mut t = twin(&m);
    fx.clear();
    observe(&mut t, &m, &reading(T0 - 1, &[(TEMP, 4.2)]), T0, &mut fx);
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("applied");
    assert_eq!(states(&fx), [("c1", CommandState::Issued)]);
}

#[test]
fn a_rule_action_sets_desired_values_in_the_raising_change() {
    let m = model();
    let mut rule = Rule::threshold(
        "SPEEDING",
        crate::twin::Severity::Warning,
        (SPEED, "speed_kmh"),
        crate::rules::Op::Gt,
        120.0,
    );
    rule.on_raise = vec![(MODE, Value::Str("limp_home".into()))];
    let rules = RuleSet { rules: vec![rule] };
    let mut t = twin(&m);
    let mut fx = Effects::default();
    let mut alerts = Vec::new();
    let change = t
        .apply(&m, &reading(T0, &[(SPEED, 140.0)]), T0)
        .expect("a change");
    rules.evaluate(&mut t, &change, &mut alerts);
    let version = t.version;
    rules.act(&mut t, &m, &alerts, T0, &mut fx);
    let id = format!("rule-{}", alerts[0].alert_id);
    assert_eq!(states(&fx), [(id.as_str(), CommandState::Issued)]);
    assert_eq!(fx.events[0].set_by, "rule:SPEEDING");
    assert_eq!(fx.sends, [id.clone()]);
    assert_eq!(t.version, version, "part of the reading's change");
    assert_eq!((t.desired_version, t.desired[0].property), (1, MODE));
    // The same raise again (a replay of the reading on the stored twin) issues nothing new.
    fx.clear();
    rules.act(&mut t, &m, &alerts, T0, &mut fx);
    assert!(fx.is_empty());
    // Staying breached raises nothing, so acts on nothing.
    let change = t
        .apply(&m, &reading(T0 + 1, &[(SPEED, 150.0)]), T0 + 1)
        .expect("a change");
    alerts.clear();
    rules.evaluate(&mut t, &change, &mut alerts);
    rules.act(&mut t, &m, &alerts, T0 + 1, &mut fx);
    assert!(alerts.is_empty() && fx.is_empty());
}

#[test]
fn with_clear_reached_off_a_reached_value_stays_as_the_target() {
    let mut m = model();
    m.desired.clear_reached = false;
    let mut t = twin(&m);
    let mut fx = Effects::default();
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("applied");
    observe(
        &mut t,
        &m,
        &reading(T0 + 1, &[(TEMP, 4.0)]),
        T0 + 2,
        &mut fx,
    );
    assert_eq!(states(&fx).last(), Some(&("c1", CommandState::Converged)));
    assert_eq!(t.desired.len(), 1);
    assert!(t.commands.is_empty());
    // Drifting away shows in the delta, with no command to chase it.
    observe(
        &mut t,
        &m,
        &reading(T0 + 3, &[(TEMP, 7.0)]),
        T0 + 4,
        &mut fx,
    );
    assert_eq!(t.delta, 1 << TEMP);
}

#[test]
fn a_command_not_converged_in_time_times_out_raises_an_alert_and_clears_it_on_convergence() {
    let (m, rules) = (model(), rules());
    let mut t = twin(&m);
    let mut fx = Effects::default();
    let mut alerts = Vec::new();
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("applied");
    let due = T0 + 10 * MINUTE;
    assert_eq!(m.deadline(&t), Some(due), "the timeout is the twin's timer");

    fx.clear();
    assert!(!t.expire(due - 1, &mut fx));
    assert!(t.expire(due, &mut fx));
    assert_eq!(states(&fx), [("c1", CommandState::TimedOut)]);
    assert_eq!(fx.events[0].at, due);
    assert_eq!(m.deadline(&t), None, "a timed-out command has no timer");
    rules.evaluate(&mut t, &TwinChange::default(), &mut alerts);
    assert_eq!(alerts.len(), 1);
    assert_eq!(
        (alerts[0].state, alerts[0].raised_at),
        (AlertState::Raised, due)
    );
    assert_eq!(t.alerts[0].code, DESIRED_CODE);
    // Again: edge-triggered, nothing new.
    assert!(!t.expire(due + MINUTE, &mut fx));
    rules.evaluate(&mut t, &TwinChange::default(), &mut alerts);
    assert_eq!(alerts.len(), 1);

    // It still converges later: CONVERGED, and the alert clears.
    fx.clear();
    observe(
        &mut t,
        &m,
        &reading(due + MINUTE, &[(TEMP, 3.5)]),
        due + MINUTE,
        &mut fx,
    );
    assert_eq!(states(&fx), [("c1", CommandState::Converged)]);
    rules.evaluate(&mut t, &TwinChange::default(), &mut alerts);
    assert_eq!(alerts[1].state, AlertState::Cleared);
    assert!(t.alerts.is_empty());
}

#[test]
fn an_asset_back_online_gets_its_unreached_commands_again() {
    let m = model();
    let (mut t, mut fx) = with_two_commands(&m);
    // The mode is reached, the temperature is not.
    observe(&mut t, &m, &reading(T0 + 1, &[]), T0 + 1, &mut fx);
    let mut r = reading(T0 + 2, &[(TEMP, 8.0)]);
    r.values.push((MODE, Value::Str("eco".into())));
    fx.clear();
    observe(&mut t, &m, &r, T0 + 2, &mut fx);
    assert_eq!(states(&fx), [("c2", CommandState::Converged)]);

    fx.clear();
    t.resend(&mut fx);
    assert_eq!(fx.sends, ["c1"]);
    assert!(
        fx.events.is_empty(),
        "a re-send is an attempt, not a new command"
    );
    assert_eq!(t.commands[0].attempt, 2);
}

#[test]
fn newer_writes_supersede_a_command_once_it_owns_no_value() {
    let m = model();
    let mut t = twin(&m);
    let mut fx = Effects::default();
    let eco = Some(Value::Str("eco".into()));
    t.set_desired(
        &m,
        &write("c1", &[(TEMP, temp(4.0)), (MODE, eco)], None),
        T0,
        &mut fx,
    )
    .expect("applied");
    // c2 takes the temperature; c1 still owns the mode.
    t.set_desired(
        &m,
        &write("c2", &[(TEMP, temp(2.0))], None),
        T0 + 1,
        &mut fx,
    )
    .expect("applied");
    assert_eq!(t.commands.len(), 2);
    // c3 removes the mode (a merge-patch null): c1 owns nothing and ends.
    fx.clear();
    t.set_desired(&m, &write("c3", &[(MODE, None)], None), T0 + 2, &mut fx)
        .expect("applied");
    // c3 itself has nothing to reach: it is done at once, so its writer gets an answer.
    assert_eq!(
        states(&fx),
        [
            ("c1", CommandState::Superseded),
            ("c3", CommandState::Converged)
        ]
    );
    assert!(
        fx.sends.is_empty(),
        "a write that only removes sends nothing"
    );
    assert_eq!(
        fx.events[0].detail.as_deref(),
        Some("replaced by c3 (desired_version 3)")
    );
    assert_eq!(t.desired_version, 3);
    assert_eq!(t.desired.len(), 1);
    assert_eq!(t.desired[0].command_id, "c2");
}

#[test]
fn a_write_on_a_stale_version_is_rejected_and_changes_nothing() {
    let m = model();
    let mut t = twin(&m);
    let mut fx = Effects::default();
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], Some(0)), T0, &mut fx)
        .expect("applied");
    let before = t.clone();
    fx.clear();
    // Two writers read version 0: the second loses.
    t.set_desired(
        &m,
        &write("c2", &[(TEMP, temp(2.0))], Some(0)),
        T0 + 1,
        &mut fx,
    )
    .expect("answered");
    assert_eq!(states(&fx), [("c2", CommandState::Rejected)]);
    assert_eq!(
        fx.events[0].detail.as_deref(),
        Some("version_conflict: If-Match 0, current desired_version 1")
    );
    assert_eq!(t, before);
    // The same command id again is a no-op, whatever it says.
    assert_eq!(
        t.set_desired(
            &m,
            &write("c1", &[(TEMP, temp(9.0))], None),
            T0 + 2,
            &mut fx
        ),
        Err(Unapplied::Repeated)
    );
    assert_eq!(t, before);
}

#[test]
fn a_write_to_an_asset_never_heard_from_is_rejected() {
    let m = model();
    let mut t = Twin::new("ghost", &m);
    let mut fx = Effects::default();
    t.set_desired(&m, &write("c1", &[(TEMP, temp(4.0))], None), T0, &mut fx)
        .expect("answered");
    assert_eq!(states(&fx), [("c1", CommandState::Rejected)]);
    assert_eq!(t, Twin::new("ghost", &m));
}

#[test]
fn device_acknowledgements_deliver_or_reject_and_repeats_are_no_ops() {
    let m = model();
    let (mut t, mut fx) = with_two_commands(&m);
    fx.clear();
    let v = t.version;
    t.device_ack(&m, "c1", DeviceResult::Accepted, None, T0 + 1, &mut fx)
        .expect("applied");
    assert_eq!(states(&fx), [("c1", CommandState::Delivered)]);
    assert_eq!(t.version, v + 1);
    assert_eq!(
        t.device_ack(&m, "c1", DeviceResult::Done, None, T0 + 2, &mut fx),
        Err(Unapplied::Stale)
    );
    assert_eq!(
        t.device_ack(&m, "nope", DeviceResult::Accepted, None, T0 + 2, &mut fx),
        Err(Unapplied::Unknown)
    );
    fx.clear();
    t.device_ack(
        &m,
        "c2",
        DeviceResult::Rejected,
        Some("mode not supported"),
        T0 + 3,
        &mut fx,
    )
    .expect("applied");
    assert_eq!(states(&fx), [("c2", CommandState::Rejected)]);
    assert_eq!(fx.events[0].detail.as_deref(), Some("mode not supported"));
    assert!(
        t.desired.iter().all(|d| d.property != MODE),
        "its value goes"
    );
    assert_eq!(t.commands.len(), 1);
    assert_eq!(t.delta, 1 << TEMP);
}

#[test]
fn writes_are_checked_against_the_model() {
    let m = model();
    let check = |values: &[(usize, Option<Value>)]| m.validate_desired(&write("c", values, None));
    assert_eq!(check(&[(TEMP, temp(4.0))]), Ok(()));
    assert_eq!(check(&[(TEMP, None)]), Ok(()));
    assert_eq!(
        check(&[(SPEED, temp(4.0))]),
        Err("speed_kmh is not a desired (writable) property".into())
    );
    assert_eq!(
        check(&[(TEMP, temp(400.0))]),
        Err("temperature_c = 400 is outside [-60, 80]".into())
    );
    assert_eq!(
        check(&[(TEMP, Some(Value::Str("cold".into())))]),
        Err("temperature_c takes a double value".into())
    );
    assert_eq!(check(&[]), Err("the write sets no property".into()));
    let long = "x".repeat(MAX_COMMAND_ID_BYTES + 1);
    assert!(
        m.validate_desired(&write(&long, &[(TEMP, temp(1.0))], None))
            .is_err()
    );
}

/// One operation on a twin, at a processing time.
#[derive(Clone, Debug)]
enum Op {
    Reading {
        temp: f64,
        late: bool,
    },
    Write {
        temp: Option<f64>,
        if_match: Option<i64>,
    },
    Ack {
        command: usize,
        result: DeviceResult,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0.0..10.0f64, any::<bool>()).prop_map(|(temp, late)| Op::Reading { temp, late }),
        (
            prop::option::weighted(0.8, 0.0..10.0f64),
            prop::option::of(0..4i64)
        )
            .prop_map(|(temp, if_match)| Op::Write { temp, if_match }),
        (
            0..6usize,
            prop_oneof![
                Just(DeviceResult::Accepted),
                Just(DeviceResult::Done),
                Just(DeviceResult::Rejected)
            ]
        )
            .prop_map(|(command, result)| Op::Ack { command, result }),
    ]
}

/// Runs `ops` (each `gap` ms after the last) as the processor does: every operation first
/// catches the twin up to its time. `ticks[i]` fires the timer before operation `i`, at a
/// time between the previous operation and it; a last tick at the end. Returns the twin
/// and every command event.
fn run(ops: &[(Op, i64)], ticks: &[Option<i64>]) -> (Twin, Vec<CommandEvent>) {
    let (m, rules) = (model(), rules());
    let mut t = twin(&m);
    let mut fx = Effects::default();
    let mut alerts = Vec::new();
    let mut now = T0;
    for (i, (op, gap)) in ops.iter().enumerate() {
        let next = now + gap;
        if let Some(fraction) = ticks.get(i).copied().flatten() {
            t.expire(now + gap * fraction / 100, &mut fx);
        }
        now = next;
        t.expire(now, &mut fx);
        match op {
            Op::Reading { temp, late } => {
                let at = if *late { now - 30 * MINUTE } else { now };
                if t.apply(&m, &reading(at, &[(TEMP, *temp)]), now).is_ok() {
                    t.converge(&m, &mut fx);
                }
            }
            Op::Write { temp, if_match } => {
                let id = format!("c{i}");
                let w = write(&id, &[(TEMP, temp.map(Value::Double))], *if_match);
                let _ = t.set_desired(&m, &w, now, &mut fx);
            }
            Op::Ack { command, result } => {
                let id = format!("c{command}");
                let _ = t.device_ack(&m, &id, *result, None, now, &mut fx);
            }
        }
        rules.evaluate(&mut t, &TwinChange::default(), &mut alerts);
    }
    t.expire(now + 60 * MINUTE, &mut fx);
    (t, fx.events)
}

proptest! {
    /// Timers fire whenever the worker gets to them; wherever they fire between operations
    /// (or not at all), the twin's desired state and the command events are those of the
    /// run without them.
    #[test]
    fn when_a_timer_fires_changes_no_outcome(
        ops in prop::collection::vec((op(), 0..(8 * MINUTE)), 1..30),
        ticks in prop::collection::vec(prop::option::of(0..100i64), 30),
    ) {
        let (reference, events) = run(&ops, &[]);
        let (twin, got) = run(&ops, &ticks);
        prop_assert_eq!(&got, &events);
        prop_assert_eq!(&twin.desired, &reference.desired);
        prop_assert_eq!(&twin.commands, &reference.commands);
        prop_assert_eq!(twin.delta, reference.delta);
        prop_assert_eq!(&twin.alerts, &reference.alerts);
        // Every command ends at most once, and an ended one never moves again.
        let mut ended = std::collections::HashSet::new();
        for e in &events {
            prop_assert!(!ended.contains(&e.command_id), "{} moved after it ended", e.command_id);
            if !e.state.is_open() {
                ended.insert(e.command_id.clone());
            }
        }
    }
}
