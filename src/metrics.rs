//! Prometheus metrics: every family registered once on the instance's own registry, and
//! per-partition handles with their label values resolved up front.
//!
//! Names follow `twinflow_<noun>_<unit>[_total]`; labels come from bounded sets only
//! (partition numbers, rule codes, fixed reasons), never from asset ids.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::rules::{AckOutcome, AlertState, RuleSet};
use crate::twin::{CommandState, NoChange, Unapplied};

/// Why a record was dead-lettered: the `reason` label of
/// `twinflow_records_dead_lettered_total` and the `twinflow.error.reason` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The value is not a reading (or acknowledgement) of the model's format.
    Decode,
    /// A reading that breaks a rule of the model (range, id, size).
    Invalid,
    /// The record's key is not the asset id.
    KeyMismatch,
    /// The record has no value.
    Empty,
    /// Older than the twin's newest reading by more than the allowed lateness.
    Late,
    /// Stamped further ahead of processing time than `max_future`.
    Future,
    /// Processing the record panicked: a bug, isolated to this record.
    Internal,
    /// A device's message whose topic names no acceptable asset id, or whose payload names
    /// another asset than its topic (the MQTT bridge).
    Identity,
    /// A reading of a twin deleted less than `[lifecycle] refuse_deleted_for` ago.
    Deleted,
}

impl DeadLetterReason {
    /// Every reason, in label order.
    pub const ALL: [DeadLetterReason; 9] = [
        DeadLetterReason::Decode,
        DeadLetterReason::Invalid,
        DeadLetterReason::KeyMismatch,
        DeadLetterReason::Empty,
        DeadLetterReason::Late,
        DeadLetterReason::Future,
        DeadLetterReason::Internal,
        DeadLetterReason::Identity,
        DeadLetterReason::Deleted,
    ];

    /// The label and header value.
    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::Decode => "decode",
            DeadLetterReason::Invalid => "invalid",
            DeadLetterReason::KeyMismatch => "key_mismatch",
            DeadLetterReason::Empty => "empty",
            DeadLetterReason::Late => "late",
            DeadLetterReason::Future => "future",
            DeadLetterReason::Internal => "internal",
            DeadLetterReason::Identity => "identity",
            DeadLetterReason::Deleted => "deleted",
        }
    }
}

/// What a twin deletion was: asked for (a delete request), a retirement (`retire_after`),
/// or a request for a twin that does not exist (a no-op).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// A delete request: `DELETE /twins/{id}` or a control record.
    Requested,
    /// The twin was silent for `[lifecycle] retire_after`.
    Retired,
    /// A request for a twin that does not exist: nothing to delete.
    Unknown,
}

impl Deletion {
    /// Every kind, in label order.
    pub const ALL: [Deletion; 3] = [Deletion::Requested, Deletion::Retired, Deletion::Unknown];

    /// The label (and, but for `Unknown`, the `twinflow.deleted.cause` header value).
    pub fn label(self) -> &'static str {
        match self {
            Deletion::Requested => "requested",
            Deletion::Retired => "retired",
            Deletion::Unknown => "unknown",
        }
    }
}

/// How a forecast alert ends (the CLEARED event's reason).
pub const FORECAST_OUTCOMES: [&str; 3] = ["breached", "averted", "stale"];

/// The metric families of one instance.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    consumed: IntCounterVec,
    updates: IntCounterVec,
    twins_created: IntCounterVec,
    timers_fired: IntCounterVec,
    deletions: IntCounterVec,
    acks: IntCounterVec,
    command_events: IntCounterVec,
    commands_sent: IntCounter,
    command_noops: IntCounterVec,
    skipped: IntCounterVec,
    dead_lettered: IntCounterVec,
    alerts: IntCounterVec,
    forecast_outcomes: IntCounterVec,
    batch_seconds: HistogramVec,
    replays: IntCounterVec,
    commit_outcomes: IntCounterVec,
    panics: IntCounterVec,
    /// Partitions whose worker ended unexpectedly (the instance is stopping).
    pub failed_partitions: IntGauge,
    /// Errors the Kafka clients reported, by client and error code (they retry most).
    pub kafka_errors: IntCounterVec,
    /// Output records the producer could not deliver (their work is replayed).
    pub delivery_failures: IntCounter,
    /// Time to make one commit durable (deliveries or transaction, then the store).
    pub commit_seconds: Histogram,
    /// The commit's time by phase: `deliveries` (the outputs acknowledged), `prepare` (the
    /// prepared copy, exactly-once), `transaction` (its commit round trips, exactly-once),
    /// `store` (the store write).
    pub commit_phase_seconds: HistogramVec,
    restored: IntCounterVec,
    promotions: IntCounterVec,
    /// Twins promoted from the fleet view into the pipeline's store by takeovers.
    pub promoted_twins: IntCounter,
    /// Of the assets promoted, those taken back to the version before an unfinished tail.
    pub reverted_twins: IntCounter,
    restore_remaining: IntGaugeVec,
    restore_seconds: prometheus::GaugeVec,
    /// Partitions being restored from the changelog right now.
    pub restoring_partitions: IntGauge,
    next_offset: IntGaugeVec,
    lag: IntGaugeVec,
    end_to_end: Histogram,
    convergence: Histogram,
    /// Partitions this instance currently owns.
    pub assigned_partitions: IntGauge,
    /// Approximate size of the local store.
    pub store_bytes: IntGauge,
    /// Twins in the fleet view.
    pub view_twins: IntGauge,
    /// Changelog records the fleet view has not read yet (as of its last look).
    pub view_lag: IntGauge,
    /// Open `/twins/stream` clients.
    pub stream_clients: IntGauge,
    /// Stream clients dropped for falling behind.
    pub stream_dropped: IntCounter,
    /// Desired writes the HTTP API sent to the desired-state topic.
    pub desired_writes: IntCounter,
    /// Desired writes the HTTP API refused over the per-asset rate limit.
    pub desired_writes_limited: IntCounter,
    ingest: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .expect("metric names are static and valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each family registers once");
    c
}

/// A per-partition histogram of durations from 0.1 ms to about 3 s.
fn histogram(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    durations(registry, name, help, &["partition"], 16)
}

/// A histogram of durations in `count` buckets doubling from 0.1 ms, by `labels`.
fn durations(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    count: usize,
) -> HistogramVec {
    let buckets =
        prometheus::exponential_buckets(0.0001, 2.0, count).expect("static buckets are valid");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("metric names are static and valid");
    registry
        .register(Box::new(h.clone()))
        .expect("each family registers once");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric names are static and valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each family registers once");
    g
}

impl Metrics {
    /// Registers every family on `registry`.
    pub fn new(registry: Registry) -> Metrics {
        let r = &registry;
        let next_offset = IntGaugeVec::new(
            Opts::new(
                "twinflow_input_next_offset",
                "Next input offset to process, per partition.",
            ),
            &["partition"],
        )
        .expect("metric names are static and valid");
        r.register(Box::new(next_offset.clone()))
            .expect("each family registers once");
        let lag = IntGaugeVec::new(
            Opts::new(
                "twinflow_consumer_lag_records",
                "Input records not yet committed, per partition: the partition's end (as of the last fetch) minus the committed position.",
            ),
            &["partition"],
        )
        .expect("metric names are static and valid");
        r.register(Box::new(lag.clone()))
            .expect("each family registers once");
        let end_to_end = Histogram::with_opts(
            HistogramOpts::new(
                "twinflow_end_to_end_latency_seconds",
                "From a reading's event time to the commit that made its twin update durable (device clock skew included).",
            )
            .buckets(
                prometheus::exponential_buckets(0.001, 2.0, 22).expect("static buckets are valid"),
            ),
        )
        .expect("metric names are static and valid");
        r.register(Box::new(end_to_end.clone()))
            .expect("each family registers once");
        let convergence = Histogram::with_opts(
            HistogramOpts::new(
                "twinflow_command_convergence_seconds",
                "From a command's issue to the event time of the reading that converged it (device clock skew included).",
            )
            .buckets(
                prometheus::exponential_buckets(0.05, 1.5, 24).expect("static buckets are valid"),
            ),
        )
        .expect("metric names are static and valid");
        r.register(Box::new(convergence.clone()))
            .expect("each family registers once");
        Metrics {
            lag,
            end_to_end,
            convergence,
            consumed: counter(
                r,
                "twinflow_records_consumed_total",
                "Input records read.",
                &["partition"],
            ),
            updates: counter(
                r,
                "twinflow_twin_updates_total",
                "Twin changes written to the changelog.",
                &["partition"],
            ),
            twins_created: counter(
                r,
                "twinflow_twins_created_total",
                "Twins seen for the first time.",
                &["partition"],
            ),
            timers_fired: counter(
                r,
                "twinflow_timers_fired_total",
                "Status changes by processing time alone (offline, idle).",
                &["partition"],
            ),
            deletions: counter(
                r,
                "twinflow_twin_deletions_total",
                "Twin deletions, by kind: requested (DELETE /twins/{id} or a control record), retired (silent for retire_after), unknown (a request for a twin that does not exist).",
                &["kind"],
            ),
            acks: counter(
                r,
                "twinflow_alert_acks_total",
                "Acknowledgements read, by result: applied, unknown (no such active alert) or repeated.",
                &["result"],
            ),
            command_events: counter(
                r,
                "twinflow_command_events_total",
                "Command transitions, by state: ISSUED, DELIVERED, CONVERGED, REJECTED, TIMED_OUT, SUPERSEDED, CANCELLED.",
                &["state"],
            ),
            commands_sent: {
                let c = IntCounter::new(
                    "twinflow_commands_sent_total",
                    "Command records sent to devices (first attempts and re-sends).",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("registered once");
                c
            },
            command_noops: counter(
                r,
                "twinflow_command_noops_total",
                "Desired writes and device acknowledgements that changed nothing, by reason: repeated (the write's command id is an open command's), unknown (no such open command or twin), stale (the command is past what the acknowledgement says).",
                &["reason"],
            ),
            skipped: counter(
                r,
                "twinflow_records_skipped_total",
                "Input records skipped on purpose (changed nothing).",
                &["reason"],
            ),
            dead_lettered: counter(
                r,
                "twinflow_records_dead_lettered_total",
                "Input records sent to the dead-letter topic.",
                &["reason"],
            ),
            alerts: counter(
                r,
                "twinflow_alerts_emitted_total",
                "Alert events emitted.",
                &["rule", "state"],
            ),
            forecast_outcomes: counter(
                r,
                "twinflow_forecast_outcomes_total",
                "How forecast alerts ended, by rule: breached (the value crossed the threshold), averted (the trend turned), stale (the asset went OFFLINE).",
                &["rule", "outcome"],
            ),
            batch_seconds: histogram(
                r,
                "twinflow_batch_duration_seconds",
                "Time to process and send one batch.",
            ),
            commit_outcomes: counter(
                r,
                "twinflow_commits_total",
                "Commits (transactions under exactly-once) by outcome: committed, or aborted and replayed.",
                &["outcome"],
            ),
            panics: counter(
                r,
                "twinflow_processing_panics_total",
                "Panics while processing a record or timer (bugs), by kind of work: reading, ack, timer. The record is dead-lettered with reason internal.",
                &["work"],
            ),
            failed_partitions: gauge(
                r,
                "twinflow_failed_partitions",
                "Partitions whose worker ended unexpectedly; the instance stops non-zero.",
            ),
            kafka_errors: counter(
                r,
                "twinflow_kafka_errors_total",
                "Errors reported by the Kafka clients (connection, request and broker errors; most are retried), by client and librdkafka error code.",
                &["client", "code"],
            ),
            delivery_failures: counter(
                r,
                "twinflow_output_delivery_failures_total",
                "Output records the producer could not deliver; the work they came from is replayed.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            commit_seconds: {
                let buckets = prometheus::exponential_buckets(0.0001, 2.0, 18)
                    .expect("static buckets are valid");
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "twinflow_commit_duration_seconds",
                        "Time to make one commit durable, store write included.",
                    )
                    .buckets(buckets),
                )
                .expect("metric names are static and valid");
                r.register(Box::new(h.clone()))
                    .expect("each family registers once");
                h
            },
            commit_phase_seconds: durations(
                r,
                "twinflow_commit_phase_duration_seconds",
                "A commit's time by phase: deliveries, prepare (exactly-once), transaction (exactly-once), store.",
                &["phase"],
                18,
            ),
            restored: counter(
                r,
                "twinflow_restore_records_total",
                "Changelog records applied to the store by restores.",
                &["partition"],
            ),
            promotions: counter(
                r,
                "twinflow_restore_promotions_total",
                "Restores by whether the partition's twins came from the fleet view \
                 (promoted) or why not (view_off, not_indexed, store_ahead, unfinished_tail).",
                &["outcome"],
            ),
            promoted_twins: {
                let c = IntCounter::new(
                    "twinflow_restore_promoted_twins_total",
                    "Twins copied from the fleet view into the store by takeovers.",
                )
                .expect("metric names are static and valid");
                r.register(Box::new(c.clone()))
                    .expect("each family registers once");
                c
            },
            reverted_twins: {
                let c = IntCounter::new(
                    "twinflow_restore_reverted_twins_total",
                    "Assets a takeover took back to the version before a crashed owner's \
                     unfinished tail, which the replay writes again.",
                )
                .expect("metric names are static and valid");
                r.register(Box::new(c.clone()))
                    .expect("each family registers once");
                c
            },
            restore_remaining: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "twinflow_restore_remaining_records",
                        "Changelog records a running restore has still to read.",
                    ),
                    &["partition"],
                )
                .expect("metric names are static and valid");
                r.register(Box::new(g.clone()))
                    .expect("each family registers once");
                g
            },
            restore_seconds: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "twinflow_restore_duration_seconds",
                        "Duration of the last restore of a partition.",
                    ),
                    &["partition"],
                )
                .expect("metric names are static and valid");
                r.register(Box::new(g.clone()))
                    .expect("each family registers once");
                g
            },
            restoring_partitions: gauge(
                r,
                "twinflow_restoring_partitions",
                "Partitions being restored from the changelog.",
            ),
            replays: counter(
                r,
                "twinflow_replays_total",
                "Batches abandoned after a transient failure and replayed from the store's position.",
                &["partition"],
            ),
            next_offset,
            assigned_partitions: gauge(
                r,
                "twinflow_assigned_partitions",
                "Input partitions owned by this instance.",
            ),
            store_bytes: gauge(
                r,
                "twinflow_store_size_bytes",
                "Approximate bytes in the local store.",
            ),
            view_twins: gauge(
                r,
                "twinflow_view_twins",
                "Twins in this instance's fleet view (the whole fleet, for the HTTP API).",
            ),
            view_lag: gauge(
                r,
                "twinflow_view_lag_records",
                "Changelog records this instance's fleet view has not read yet.",
            ),
            stream_clients: gauge(
                r,
                "twinflow_stream_clients",
                "Open /twins/stream clients.",
            ),
            stream_dropped: counter(
                r,
                "twinflow_stream_clients_dropped_total",
                "Stream clients dropped because they fell too far behind.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            desired_writes: counter(
                r,
                "twinflow_http_desired_writes_total",
                "Desired writes the HTTP API sent to the desired-state topic.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            ingest: counter(
                r,
                "twinflow_ingest_records_total",
                "Readings taken from devices outside Kafka, by source (http) and result: accepted (Kafka has it), invalid (refused, none of its request written), failed (Kafka did not take it).",
                &["source", "result"],
            ),
            desired_writes_limited: counter(
                r,
                "twinflow_http_desired_writes_limited_total",
                "Desired writes the HTTP API refused over http.desired_writes_per_minute.",
                &[],
            )
            .with_label_values::<&str>(&[]),
            registry,
        }
    }

    /// Counts readings of the HTTP ingestion by result.
    pub fn ingest(&self, results: &[(&str, u64)]) {
        for (result, n) in results {
            self.ingest.with_label_values(&["http", result]).inc_by(*n);
        }
    }

    /// Counts an error a Kafka client (`consumer` or `producer`) reported.
    pub fn kafka_error(&self, client: &str, error: &rdkafka::error::KafkaError) {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "other".to_owned(), |c| format!("{c:?}"));
        self.kafka_errors.with_label_values(&[client, &code]).inc();
    }

    /// The counter of committed (`true`) or aborted commits.
    pub fn commits(&self, committed: bool) -> IntCounter {
        self.commit_outcomes
            .with_label_values(&[if committed { "committed" } else { "aborted" }])
    }

    /// The counter of panics in work of `kind` (`reading`, `ack`, `timer`).
    pub fn panics(&self, kind: &str) -> IntCounter {
        self.panics.with_label_values(&[kind])
    }

    /// Counts a restore that promoted the fleet view's twins (`promoted`) or why it did not.
    pub fn promotion(&self, outcome: &str) {
        self.promotions.with_label_values(&[outcome]).inc();
    }

    /// Handles for one partition's restore: records applied, records remaining, duration.
    pub fn restore(&self, partition: i32) -> (IntCounter, IntGauge, prometheus::Gauge) {
        let p = partition.to_string();
        (
            self.restored.with_label_values(&[&p]),
            self.restore_remaining.with_label_values(&[&p]),
            self.restore_seconds.with_label_values(&[&p]),
        )
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles for one partition's worker.
    pub fn partition(&self, partition: i32, rules: &RuleSet) -> PartitionMetrics {
        let p = partition.to_string();
        PartitionMetrics {
            consumed: self.consumed.with_label_values(&[&p]),
            updates: self.updates.with_label_values(&[&p]),
            twins_created: self.twins_created.with_label_values(&[&p]),
            timers_fired: self.timers_fired.with_label_values(&[&p]),
            deletions: Deletion::ALL.map(|d| self.deletions.with_label_values(&[d.label()])),
            acks: AckOutcome::ALL.map(|o| self.acks.with_label_values(&[o.label()])),
            command_events: CommandState::ALL
                .map(|s| self.command_events.with_label_values(&[s.symbol()])),
            commands_sent: self.commands_sent.clone(),
            command_noops: Unapplied::ALL
                .map(|u| self.command_noops.with_label_values(&[u.label()])),
            skipped: NoChange::ALL.map(|r| self.skipped.with_label_values(&[r.reason()])),
            dead_lettered: DeadLetterReason::ALL
                .map(|r| self.dead_lettered.with_label_values(&[r.label()])),
            alerts: rules
                .rules
                .iter()
                .map(|rule| {
                    [
                        AlertState::Raised,
                        AlertState::Cleared,
                        AlertState::Acknowledged,
                    ]
                    .map(|s| {
                        self.alerts
                            .with_label_values(&[rule.code.as_str(), s.symbol()])
                    })
                })
                .collect(),
            forecast_outcomes: rules
                .rules
                .iter()
                .map(|rule| {
                    rule.forecast.map(|_| {
                        FORECAST_OUTCOMES.map(|o| {
                            self.forecast_outcomes
                                .with_label_values(&[rule.code.as_str(), o])
                        })
                    })
                })
                .collect(),
            batch_seconds: self.batch_seconds.with_label_values(&[&p]),
            replays: self.replays.with_label_values(&[&p]),
            next_offset: self.next_offset.with_label_values(&[&p]),
            lag: self.lag.with_label_values(&[&p]),
            end_to_end: self.end_to_end.clone(),
            convergence: self.convergence.clone(),
        }
    }

    /// Sum of a counter family over all label values: for progress displays and tests.
    pub fn total(&self, name: &str) -> u64 {
        sum(&self.registry, name, &[]) as u64
    }

    /// The value of one labelled counter: for tests.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        sum(&self.registry, name, labels) as u64
    }
}

/// The sum of the counters or gauges of family `name` whose labels include `labels`.
fn sum(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().value() + m.get_gauge().value())
        .sum()
}

/// Pre-resolved handles of one partition; the worker counts locally and adds once per batch.
pub struct PartitionMetrics {
    pub(crate) consumed: IntCounter,
    pub(crate) updates: IntCounter,
    pub(crate) twins_created: IntCounter,
    pub(crate) timers_fired: IntCounter,
    pub(crate) deletions: [IntCounter; Deletion::ALL.len()],
    pub(crate) skipped: [IntCounter; NoChange::ALL.len()],
    pub(crate) dead_lettered: [IntCounter; DeadLetterReason::ALL.len()],
    /// Per rule: `[raised, cleared]`.
    pub(crate) alerts: Vec<[IntCounter; 3]>,
    /// Per forecast rule: its outcomes, in [`FORECAST_OUTCOMES`] order.
    forecast_outcomes: Vec<Option<[IntCounter; 3]>>,
    pub(crate) acks: [IntCounter; 3],
    pub(crate) command_events: [IntCounter; CommandState::ALL.len()],
    pub(crate) commands_sent: IntCounter,
    pub(crate) command_noops: [IntCounter; Unapplied::ALL.len()],
    pub(crate) batch_seconds: Histogram,
    pub(crate) replays: IntCounter,
    pub(crate) next_offset: IntGauge,
    pub(crate) lag: IntGauge,
    end_to_end: Histogram,
    convergence: Histogram,
}

/// Counts gathered during one batch.
#[derive(Default)]
pub struct BatchCounts {
    pub(crate) consumed: u64,
    pub(crate) updates: u64,
    pub(crate) twins_created: u64,
    pub(crate) timers_fired: u64,
    pub(crate) deletions: [u64; Deletion::ALL.len()],
    pub(crate) acks: [u64; 3],
    pub(crate) command_events: [u64; CommandState::ALL.len()],
    pub(crate) commands_sent: u64,
    pub(crate) command_noops: [u64; Unapplied::ALL.len()],
    /// Milliseconds from issue to convergence of the commands that converged.
    pub(crate) converged_after: Vec<i64>,
    /// Event times of the readings that changed a twin.
    pub(crate) event_times: Vec<i64>,
    pub(crate) skipped: [u64; NoChange::ALL.len()],
    pub(crate) dead_lettered: [u64; DeadLetterReason::ALL.len()],
    /// `(rule, state)` pairs, in emission order.
    pub(crate) alerts: Vec<(usize, AlertState)>,
    /// `(rule, outcome)` of the forecast alerts that cleared.
    pub(crate) forecast_outcomes: Vec<(usize, &'static str)>,
}

impl BatchCounts {
    /// Twin changes in the batch.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Records consumed from the input.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Records skipped for `reason`.
    pub fn skipped(&self, reason: NoChange) -> u64 {
        self.skipped[reason as usize]
    }

    /// Deletions of `kind`.
    pub fn deletions(&self, kind: Deletion) -> u64 {
        self.deletions[kind as usize]
    }

    /// Records dead-lettered for `reason`.
    pub fn dead_lettered(&self, reason: DeadLetterReason) -> u64 {
        self.dead_lettered[reason as usize]
    }

    /// Acknowledgements with `outcome`.
    pub fn acks(&self, outcome: AckOutcome) -> u64 {
        self.acks[outcome as usize]
    }

    /// Command transitions to `state`.
    pub fn command_events(&self, state: CommandState) -> u64 {
        self.command_events[state as usize]
    }

    /// Desired writes and device acknowledgements that changed nothing, for `why`.
    pub fn command_noops(&self, why: Unapplied) -> u64 {
        self.command_noops[why as usize]
    }

    /// Counts a desired write or device acknowledgement that changed nothing.
    pub fn command_noop(&mut self, why: Unapplied) {
        self.command_noops[why as usize] += 1;
    }

    /// Counts a skip.
    pub fn skip(&mut self, reason: NoChange) {
        self.skipped[reason as usize] += 1;
    }

    /// Counts a dead-lettered record.
    pub fn dead_letter(&mut self, reason: DeadLetterReason) {
        self.dead_lettered[reason as usize] += 1;
    }
}

impl PartitionMetrics {
    /// Publishes a committed batch's counts; `now` is when it became durable.
    pub fn publish(&self, c: &BatchCounts, now: i64) {
        for t in &c.event_times {
            self.end_to_end.observe((now - t).max(0) as f64 / 1000.0);
        }
        self.consumed.inc_by(c.consumed);
        self.updates.inc_by(c.updates);
        self.twins_created.inc_by(c.twins_created);
        self.timers_fired.inc_by(c.timers_fired);
        for (h, n) in self.deletions.iter().zip(c.deletions) {
            h.inc_by(n);
        }
        for (h, n) in self.acks.iter().zip(c.acks) {
            h.inc_by(n);
        }
        for (h, n) in self.command_events.iter().zip(c.command_events) {
            h.inc_by(n);
        }
        self.commands_sent.inc_by(c.commands_sent);
        for ms in &c.converged_after {
            self.convergence.observe(*ms as f64 / 1000.0);
        }
        for (h, n) in self.command_noops.iter().zip(c.command_noops) {
            h.inc_by(n);
        }
        for (h, n) in self.skipped.iter().zip(c.skipped) {
            h.inc_by(n);
        }
        for (h, n) in self.dead_lettered.iter().zip(c.dead_lettered) {
            h.inc_by(n);
        }
        for (rule, state) in &c.alerts {
            self.alerts[*rule][*state as usize].inc();
        }
        for (rule, outcome) in &c.forecast_outcomes {
            let at = FORECAST_OUTCOMES.iter().position(|o| o == outcome);
            if let (Some(Some(counters)), Some(at)) = (self.forecast_outcomes.get(*rule), at) {
                counters[at].inc();
            }
        }
    }
}

/// The metric families of an MQTT bridge (`twinflow bridge`), on its own registry.
#[derive(Clone)]
pub struct BridgeMetrics {
    registry: Registry,
    records: IntCounterVec,
    commands: IntCounterVec,
    /// From receiving a device's message to acknowledging it to the broker (after Kafka
    /// has its record).
    pub ack_seconds: Histogram,
    /// Device messages received and not yet acknowledged.
    pub in_flight: IntGauge,
    /// 1 while connected to the MQTT broker and subscribed to the devices' topics.
    pub connected: IntGauge,
    /// Records Kafka did not take, sent again.
    pub delivery_retries: IntCounter,
}

impl BridgeMetrics {
    /// Registers every family on `registry`.
    pub fn new(registry: Registry) -> BridgeMetrics {
        let r = &registry;
        let ack_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "twinflow_ingest_ack_latency_seconds",
                "From receiving a device's MQTT message to acknowledging it (PUBACK), which the bridge does only after Kafka has its record.",
            )
            .buckets(
                prometheus::exponential_buckets(0.0005, 2.0, 18).expect("static buckets are valid"),
            ),
        )
        .expect("metric names are static and valid");
        r.register(Box::new(ack_seconds.clone()))
            .expect("each family registers once");
        let retries = IntCounter::new(
            "twinflow_ingest_delivery_retries_total",
            "Device records Kafka did not take in time, sent again (the device's message stays unacknowledged).",
        )
        .expect("metric names are static and valid");
        r.register(Box::new(retries.clone()))
            .expect("each family registers once");
        BridgeMetrics {
            records: counter(
                r,
                "twinflow_ingest_records_total",
                "Device messages by source (mqtt: readings, mqtt_ack: command acknowledgements) and result: accepted (written to its topic), or the reason it was dead-lettered.",
                &["source", "result"],
            ),
            commands: counter(
                r,
                "twinflow_bridge_commands_total",
                "Command records by what the bridge did with them: published, superseded (a later command of the batch sets the same properties), expired, unroutable, undecodable.",
                &["result"],
            ),
            ack_seconds,
            in_flight: gauge(
                r,
                "twinflow_ingest_in_flight",
                "Device messages received and not yet acknowledged to the MQTT broker.",
            ),
            connected: gauge(
                r,
                "twinflow_bridge_connected",
                "1 while the bridge is connected to the MQTT broker and subscribed to the devices' topics.",
            ),
            delivery_retries: retries,
            registry,
        }
    }

    /// The registry, for `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The sum of a counter or gauge's series whose labels include `labels`: for tests.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.registry, name, labels)
    }

    /// Counts a device message of `source` with `result`.
    pub fn record(&self, source: &str, result: &str) {
        self.records.with_label_values(&[source, result]).inc();
    }

    /// Counts a command record with `result`.
    pub fn command(&self, result: &str) {
        self.commands.with_label_values(&[result]).inc();
    }
}
