//! One step of one twin: what a valid reading, or processing time passing, does to a twin
//! under a model and its rules. Pure: no store, no Kafka, no clock of its own.
//!
//! The partition's processor runs it on the twins it owns and writes what it returns; the
//! what-if simulation (`POST /twins/{id}/simulate`) runs it on a copy of a twin and shows
//! what it returns; the backtest runs it on replayed input and counts. One code path, so a
//! simulation or a backtest says what production does.

use crate::metrics::DeadLetterReason;
use crate::rules::{AlertEvent, RuleSet};
use crate::twin::{Effects, Model, NoChange, Reading, Status, Twin, TwinChange, Untimely};

/// A model and the rules evaluated on its twins.
#[derive(Clone, Copy)]
pub struct Core<'a> {
    /// The twin model.
    pub model: &'a Model,
    /// Its alert rules (a simulation's may differ from the model file's).
    pub rules: &'a RuleSet,
}

/// What a reading did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Applied {
    /// The twin changed (its version grew by one): which properties did. An empty change is
    /// one of commands that timed out or of a forecast's window, not of values.
    pub change: Option<TwinChange>,
    /// The reading's values changed nothing: why (a counted skip). Both are set when the
    /// reading changed no value but timed-out commands or a window did.
    pub skipped: Option<NoChange>,
    /// The reading's values were merged (the twin changed by them, or was created).
    pub merged: bool,
}

/// What processing time did to a twin whose deadline came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timed {
    /// Silent for `retire_after`: the twin is to be deleted.
    Retire,
    /// Nothing changed (the deadline was early).
    Unchanged,
    /// The status moved on or commands timed out: the twin changed.
    Fired,
}

/// A refused reading: the dead-letter reason and the message for a person.
pub type Refused = (DeadLetterReason, String);

impl Core<'_> {
    /// Applies a valid `reading` to `twin` at processing time `now`: checks its event time,
    /// times out the commands due, feeds the forecast windows, merges, converges the desired
    /// state and, if the twin changed, evaluates the rules and their actions. The alert
    /// events go to `alerts`, command transitions and sends to `fx` (both cleared first).
    ///
    /// # Errors
    /// The reading is too late or too far in the future: the twin is unchanged.
    pub fn reading(
        &self,
        twin: &mut Twin,
        reading: &Reading,
        now: i64,
        fx: &mut Effects,
        alerts: &mut Vec<AlertEvent>,
    ) -> Result<Applied, Refused> {
        alerts.clear();
        fx.clear();
        if let Err(untimely) = self.model.check_time(twin, reading.event_time, now) {
            return Err(refusal(untimely, twin, reading.event_time, now));
        }
        let was_offline = twin.status == Status::Offline;
        let expired = twin.expire(now, fx);
        // A forecast's window takes the reading even when it is late for the twin's values.
        let observed = self.rules.observe(twin, reading);
        match twin.apply(self.model, reading, now) {
            Ok(change) => {
                twin.converge(self.model, fx);
                if was_offline && twin.status != Status::Offline {
                    twin.resend(fx);
                }
                self.settle(twin, &change, fx, alerts);
                Ok(Applied {
                    change: Some(change),
                    skipped: None,
                    merged: true,
                })
            }
            Err(unchanged) => {
                let skipped = (!observed).then_some(unchanged);
                if !(expired || observed) {
                    return Ok(Applied {
                        change: None,
                        skipped,
                        merged: false,
                    });
                }
                // The reading changed no value; the commands that timed out, or a
                // forecast's window, did.
                twin.touch(now);
                let change = TwinChange::default();
                self.settle(twin, &change, fx, alerts);
                Ok(Applied {
                    change: Some(change),
                    skipped,
                    merged: false,
                })
            }
        }
    }

    /// Moves `twin` on to processing time `now`, its deadline having come: retirement,
    /// status (offline, idle), commands timed out. Outputs as [`Core::reading`].
    pub fn timer(
        &self,
        twin: &mut Twin,
        now: i64,
        fx: &mut Effects,
        alerts: &mut Vec<AlertEvent>,
    ) -> Timed {
        alerts.clear();
        fx.clear();
        if self.model.retire_at(twin).is_some_and(|at| at <= now) {
            return Timed::Retire;
        }
        let ticked = twin.tick(self.model, now);
        if twin.expire(now, fx) && !ticked {
            twin.touch(now);
        } else if !ticked {
            return Timed::Unchanged;
        }
        self.settle(twin, &TwinChange::default(), fx, alerts);
        Timed::Fired
    }

    /// Applies `act`, a command input's record (a desired write, an acknowledgement), to
    /// `twin` at processing time `now`, after the twin caught up on its timed-out commands.
    /// Returns whether the twin changed; then the rules were evaluated and the alert event
    /// `act` returned follows their events. Outputs as [`Core::reading`].
    pub fn command(
        &self,
        twin: &mut Twin,
        now: i64,
        fx: &mut Effects,
        alerts: &mut Vec<AlertEvent>,
        act: impl FnOnce(&mut Twin, &mut Effects) -> Option<AlertEvent>,
    ) -> bool {
        alerts.clear();
        fx.clear();
        let version = twin.version;
        let expired = twin.expire(now, fx);
        let event = act(twin, fx);
        if expired && twin.version == version {
            twin.touch(now);
        }
        if twin.version == version {
            return false;
        }
        self.settle(twin, &TwinChange::default(), fx, alerts);
        alerts.extend(event);
        true
    }

    /// After a change of `twin`: evaluates the rules (events to `alerts`) and applies the
    /// actions of those that raised (commands to `fx`), at the twin's processing time.
    pub fn settle(
        &self,
        twin: &mut Twin,
        change: &TwinChange,
        fx: &mut Effects,
        alerts: &mut Vec<AlertEvent>,
    ) {
        self.rules.evaluate(twin, change, alerts);
        let now = twin.updated_at;
        self.rules.act(twin, self.model, alerts, now, fx);
    }
}

/// The dead-letter reason and message of a reading at `event_time` that is `untimely` for
/// `twin` at processing time `now`.
fn refusal(untimely: Untimely, twin: &Twin, event_time: i64, now: i64) -> Refused {
    use crate::codec::rfc3339;
    match untimely {
        Untimely::Late => (
            DeadLetterReason::Late,
            format!(
                "event_time {} is more than the allowed lateness before the twin's newest reading ({})",
                rfc3339(event_time),
                rfc3339(twin.event_time)
            ),
        ),
        Untimely::Future => (
            DeadLetterReason::Future,
            format!(
                "event_time {} is more than max_future after processing time {}",
                rfc3339(event_time),
                rfc3339(now)
            ),
        ),
    }
}
