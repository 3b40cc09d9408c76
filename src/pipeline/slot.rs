//! A partition's slot: what its worker and the committer share.
//!
//! The worker stages its work here between commits (one [`Batch`]: the twins to write, the
//! counts, each input's position); the committer takes it, makes it durable, and records
//! the progress. Both run under the commit gate, so a batch is never taken half-staged.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::input::{InputKind, PerInput};
use super::processor::Batch;
use crate::kafka::Consumer;
use crate::metrics::PartitionMetrics;
use crate::topology::Topics;

/// One partition's shared state.
pub struct Slot {
    /// The partition.
    pub partition: i32,
    /// Where the committed counts go.
    pub metrics: PartitionMetrics,
    /// The consumer its inputs are assigned to: the group offsets follow the store's
    /// positions through it.
    consumer: Weak<Consumer>,
    /// Work staged since the last commit; `None` when nothing is.
    staged: Mutex<Option<Batch>>,
    /// Set once the partition is restored and its worker processes input.
    processing: AtomicBool,
    /// The last committed reading position, and when it last moved (monotonic).
    progress: Mutex<(i64, Instant)>,
    /// The end of the telemetry partition as the worker last saw it.
    end: AtomicI64,
}

impl Slot {
    /// The slot of `partition`, whose readings start at `start`.
    pub fn new(
        partition: i32,
        start: i64,
        metrics: PartitionMetrics,
        consumer: &Arc<Consumer>,
    ) -> Slot {
        Slot {
            partition,
            metrics,
            consumer: Arc::downgrade(consumer),
            staged: Mutex::new(None),
            processing: AtomicBool::new(false),
            progress: Mutex::new((start, Instant::now())),
            end: AtomicI64::new(start),
        }
    }

    /// Stages `batch` (replacing anything staged: take it first).
    pub fn stage(&self, batch: Batch) {
        *self.staged.lock().expect("slot lock") = Some(batch);
    }

    /// Takes the staged work, if any.
    pub fn take_staged(&self) -> Option<Batch> {
        self.staged.lock().expect("slot lock").take()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.lock().expect("slot lock").is_none()
    }

    /// Marks the partition restored and processing.
    pub fn start_processing(&self) {
        self.processing.store(true, Ordering::SeqCst);
    }

    /// Whether the partition is restored and processing.
    pub fn is_processing(&self) -> bool {
        self.processing.load(Ordering::SeqCst)
    }

    /// Records committed positions: the readings' moves the progress on, and under
    /// at-least-once every input's group offset follows (librdkafka commits them every
    /// `auto.commit.interval.ms` and on revoke), so an instance taking the partition over
    /// replays little and lag tools see progress.
    pub fn progressed(&self, next: &PerInput<Option<i64>>, topics: &Topics, group_offsets: bool) {
        if let Some(readings) = next.get(InputKind::Readings) {
            let mut p = self.progress.lock().expect("progress lock");
            if p.0 != readings {
                *p = (readings, Instant::now());
            }
            drop(p);
            self.metrics.next_offset.set(readings);
            self.update_lag();
        }
        if let (true, Some(consumer)) = (group_offsets, self.consumer.upgrade()) {
            for (input, at) in next.iter() {
                if let Some(at) = at {
                    // librdkafka stores the given offset + 1.
                    let _ = rdkafka::consumer::Consumer::store_offset(
                        &*consumer,
                        input.topic(topics),
                        self.partition,
                        at - 1,
                    );
                }
            }
        }
    }

    /// The consumer its inputs are assigned to, while it lives.
    pub fn consumer(&self) -> Option<Arc<Consumer>> {
        self.consumer.upgrade()
    }

    /// The last committed reading position (where processing started, before any commit).
    pub fn committed(&self) -> i64 {
        self.progress.lock().expect("progress lock").0
    }

    /// Records the end of the telemetry partition as last fetched, and the lag.
    pub fn saw_end(&self, end: i64) {
        self.end.store(end, Ordering::SeqCst);
        self.update_lag();
    }

    /// Input not yet committed: the end as last seen minus the committed position.
    fn update_lag(&self) {
        let lag = self.end.load(Ordering::SeqCst) - self.committed();
        self.metrics.lag.set(lag.max(0));
    }

    /// Whether the partition has input waiting (lag) but its position has not moved for
    /// `after`: the pipeline is wedged.
    pub fn stalled(&self, after: Duration) -> bool {
        let since = self.progress.lock().expect("progress lock").1;
        self.metrics.lag.get() > 0 && since.elapsed() > after
    }
}
