//! Scenario 6: produce → changelog-visible latency at a fixed offered rate.
//!
//! The producer is open-loop: record i is due at `i / rate` after the start, whether or not
//! the system kept up, and its latency is measured from that intended time, not from when
//! the send call happened. A stall therefore shows in the figures as the queue it causes
//! (every record due during the stall is late by the remaining stall), instead of being
//! hidden by a producer that waited for it (coordinated omission). The producer's own
//! largest lag behind its schedule is printed beside the figures.
//!
//! Each output record is matched to the input it came from by partition and input offset:
//! twinflow's changelog records carry the input offset in `twinflow.source.offset`; the
//! passthrough writes each record at the same offset of the same partition of a fresh topic.
//! The reader is `read_committed`, so under exactly-once a record counts once its
//! transaction is committed: visible to a downstream consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{DeliveryResult, Headers};
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Runtime;
use twinflow::config::Guarantee;
use twinflow::headers::SOURCE_OFFSET;
use twinflow::topology::Topology;

use crate::common::Noida;
use crate::harness::{self, Instance, client, create_topics};

/// What is measured.
#[derive(Clone, Copy)]
pub enum Contender {
    Passthrough,
    Twinflow(Guarantee),
}

/// Latencies in milliseconds.
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Records measured (after the warm-up).
    pub samples: usize,
    /// The producer's largest lag behind its schedule, in milliseconds.
    pub behind: f64,
}

/// Records whose intended send time falls in the first `WARMUP` are not measured (the first
/// quarter of a shorter input).
const WARMUP: Duration = Duration::from_secs(2);

/// Offers `input` (as many records as `seconds` at `rate` take) to `contender` at `rate`
/// records/s on a fresh broker.
pub fn measure(
    rt: &Runtime,
    topology: &Topology,
    input: &[(Vec<u8>, Vec<u8>)],
    contender: Contender,
    rate: f64,
    seconds: f64,
    run: usize,
) -> Latency {
    let broker = Noida::start();
    create_topics(rt, &broker, topology);
    let from = topology.topics.telemetry.name.clone();
    let to = topology.topics.changelog.name.clone();
    let partitions = topology.topics.telemetry.partitions;
    let count = ((rate * seconds) as usize).min(input.len());

    // The contender, running and assigned before the first record is due.
    let store = tempfile::tempdir().expect("a store directory");
    let stop = Arc::new(AtomicBool::new(false));
    let (instance, passthrough) = match contender {
        Contender::Twinflow(guarantee) => {
            let group = format!("bench-latency-{guarantee:?}-{run}").to_lowercase();
            let mut instance = Instance::start(
                rt,
                &harness::config(&broker.bootstrap, &group, guarantee, store.path()),
            );
            instance.wait_ready(rt, &reqwest::Client::new(), harness::timeout_for(0));
            (Some(instance), None)
        }
        Contender::Passthrough => {
            let (bootstrap, stop, from, to) = (
                broker.bootstrap.clone(),
                stop.clone(),
                from.clone(),
                to.clone(),
            );
            let group = format!("bench-latency-passthrough-{run}");
            let thread = std::thread::spawn(move || {
                harness::passthrough(&bootstrap, &group, &from, &to, |_| {
                    stop.load(Ordering::SeqCst)
                });
            });
            // Its consumer joins while the first records are due: the warm-up covers it.
            (None, Some(thread))
        }
    };

    // The reader: every output record's arrival, by (partition, input offset).
    let passthrough_offsets = passthrough.is_some();
    let reading = Arc::new(AtomicBool::new(true));
    let arrived = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (bootstrap, to) = (broker.bootstrap.clone(), to.clone());
        let (reading, arrived) = (reading.clone(), arrived.clone());
        std::thread::spawn(move || {
            read_arrivals(
                &bootstrap,
                &to,
                partitions,
                passthrough_offsets,
                &reading,
                &arrived,
            )
        })
    };

    // The open-loop producer.
    let context = Stamps::default();
    let sent = context.sent.clone();
    let mut c = client(&broker.bootstrap);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0");
    let producer: ThreadedProducer<Stamps> = c.create_with_context(context).expect("a producer");
    let start = Instant::now();
    let epoch = start.duration_since(*EPOCH);
    let mut behind = Duration::ZERO;
    for (i, (k, v)) in input[..count].iter().enumerate() {
        let due = Duration::from_secs_f64(i as f64 / rate);
        let now = start.elapsed();
        if now < due {
            std::thread::sleep(due - now);
        } else {
            behind = behind.max(now - due);
        }
        let mut record = BaseRecord::with_opaque_to(&from, Box::new(epoch + due))
            .key(k)
            .payload(v);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(60)).expect("delivered");

    // Wait until every delivered record's output has arrived, or none has for a while (a
    // duplicate reading has no changelog record).
    let expected = sent.lock().expect("stamps").len();
    let (mut last, mut quiet) = (0, 0);
    let arrivals = loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = arrived.load(Ordering::SeqCst);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
        if now >= expected || quiet >= 10 {
            reading.store(false, Ordering::SeqCst);
            break reader.join().expect("the reader");
        }
    };
    stop.store(true, Ordering::SeqCst);
    if let Some(thread) = passthrough {
        thread.join().expect("the passthrough");
    }
    if let Some(instance) = instance {
        instance.stop(rt);
    }

    let sent = sent.lock().expect("stamps");
    // A small input (a smoke run) may not last the warm-up: then its first quarter is left out.
    let warmup = WARMUP.min(Duration::from_secs_f64(count as f64 / rate / 4.0));
    let mut latencies: Vec<f64> = arrivals
        .iter()
        .filter_map(|(at, arrived)| {
            let due = sent.get(at)?;
            (*due >= epoch + warmup).then(|| arrived.saturating_sub(*due).as_secs_f64() * 1000.0)
        })
        .collect();
    assert!(!latencies.is_empty(), "no output arrived");
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Latency {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
        max: *latencies.last().expect("samples"),
        samples: latencies.len(),
        behind: behind.as_secs_f64() * 1000.0,
    }
}

/// Reads `topic` from the beginning while `reading`, counting in `arrived`; returns each
/// record's `(partition, input offset)` and arrival time since [`EPOCH`].
fn read_arrivals(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    same_offsets: bool,
    reading: &AtomicBool,
    arrived: &AtomicUsize,
) -> Vec<((i32, i64), Duration)> {
    let consumer: BaseConsumer = client(bootstrap)
        .set("group.id", "bench-latency-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("a reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("a partition");
    }
    consumer.assign(&tpl).expect("assigned");
    let mut arrivals = Vec::new();
    while reading.load(Ordering::SeqCst) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let at = EPOCH.elapsed();
        let source = if same_offsets {
            Some(m.offset())
        } else {
            m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == SOURCE_OFFSET)
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
            })
        };
        if let Some(offset) = source {
            arrivals.push(((m.partition(), offset), at));
            arrived.fetch_add(1, Ordering::SeqCst);
        }
    }
    arrivals
}

/// The clock the producer's schedule and the reader's arrivals share.
static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// Records each delivered record's intended send time by (partition, offset).
#[derive(Default)]
struct Stamps {
    sent: Arc<Mutex<HashMap<(i32, i64), Duration>>>,
}

impl ClientContext for Stamps {}

impl ProducerContext for Stamps {
    type DeliveryOpaque = Box<Duration>;

    fn delivery(&self, result: &DeliveryResult<'_>, due: Self::DeliveryOpaque) {
        if let Ok(m) = result {
            self.sent
                .lock()
                .expect("stamps")
                .insert((m.partition(), m.offset()), *due);
        }
    }
}
