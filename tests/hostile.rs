//! Hostile records: whatever a record's bytes, size, headers or timestamps, it ends as a twin
//! update, a counted skip or a dead letter, and its partition goes on.
//!
//! `tests/corpus/records.json` holds every hostile record found so far, each with the outcome
//! it must have. It is replayed through the record path (`Processor`) and through the whole
//! pipeline on the real test broker; a fuzz test throws arbitrary records and
//! acknowledgements at the record path.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{NOIDA_CLIENT, Noida, TestPipeline, vehicle_topology};
use proptest::prelude::*;
use rdkafka::ClientConfig;
use rdkafka::message::{Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use twinflow::codec::Format;
use twinflow::headers::DEAD_LETTER_OMITTED;
use twinflow::metrics::{BatchCounts, DeadLetterReason};
use twinflow::pipeline::{Batch, Input, Processor, Target};
use twinflow::rules::AckOutcome;
use twinflow::topology::Topology;
use twinflow::twin::{CommandState, NoChange, Reading, Unapplied};

/// Processing time: the test pipeline's clock starts here too.
const NOW: i64 = 1_800_000_000_000;

type Header = (Vec<u8>, Option<Vec<u8>>);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Door {
    Telemetry,
    Acks,
    Desired,
}

impl Door {
    fn topic(self, topology: &Topology) -> &str {
        let t = &topology.topics;
        match self {
            Door::Telemetry => &t.telemetry.name,
            Door::Acks => &t.acks.name,
            Door::Desired => &t.desired.name,
        }
    }
}

/// One record of the corpus and the outcome it must have.
struct Entry {
    name: String,
    door: Door,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<Header>,
    expect: String,
}

fn topology(format: Format) -> Arc<Topology> {
    let t = vehicle_topology();
    let mut topology = Topology::load(&t).unwrap();
    topology.topics.telemetry.format = Some(format);
    Arc::new(topology)
}

/// Bytes as the corpus writes them: `{"text": ...}`, `{"hex": ...}`, `{"fill": [byte, n]}`,
/// or `{"reading": {...}}` (a reading in the telemetry topic's format); `null` is none.
fn bytes(v: &serde_json::Value, topology: &Topology) -> Option<Vec<u8>> {
    let v = v.as_object()?;
    let (kind, arg) = v.iter().next().expect("one field");
    Some(match kind.as_str() {
        "text" => arg.as_str().unwrap().as_bytes().to_vec(),
        "hex" => {
            let digits: String = arg.as_str().unwrap().split_whitespace().collect();
            (0..digits.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
                .collect()
        }
        "fill" => vec![arg[0].as_u64().unwrap() as u8; arg[1].as_u64().unwrap() as usize],
        "reading" => {
            let mut reading = arg.clone();
            // "@fill:<byte>:<n>" stands for n copies of a byte (an overlong id).
            if let Some(id) = reading["asset_id"].as_str()
                && let Some(spec) = id.strip_prefix("@fill:")
            {
                let (b, n) = spec.split_once(':').unwrap();
                let id = String::from(b.parse::<u8>().unwrap() as char).repeat(n.parse().unwrap());
                reading["asset_id"] = id.into();
            }
            let json = serde_json::to_vec(&reading).unwrap();
            match topology.topics.telemetry_format() {
                Format::Json => json,
                _ => {
                    let mut r = Reading::default();
                    topology
                        .codec
                        .decode_reading(Format::Json, &json, &mut r)
                        .unwrap();
                    let mut avro = Vec::new();
                    topology.codec.encode_reading(&r, &mut avro);
                    avro
                }
            }
        }
        other => panic!("unknown bytes form {other}"),
    })
}

fn corpus(topology: &Topology) -> Vec<Entry> {
    let path = common::root().join("tests/corpus/records.json");
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    entries
        .iter()
        .map(|e| {
            let headers = match &e["headers"] {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::String(many) => {
                    // "@many:<n>:<bytes>": n headers with values of that many bytes.
                    let spec = many.strip_prefix("@many:").unwrap();
                    let (n, size) = spec.split_once(':').unwrap();
                    (0..n.parse::<usize>().unwrap())
                        .map(|i| {
                            let value = vec![b'v'; size.parse().unwrap()];
                            (format!("h{i}").into_bytes(), Some(value))
                        })
                        .collect()
                }
                list => list
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| (bytes(&h[0], topology).unwrap(), bytes(&h[1], topology)))
                    .collect(),
            };
            Entry {
                name: e["name"].as_str().unwrap().to_owned(),
                door: match e["input"].as_str().unwrap() {
                    "telemetry" => Door::Telemetry,
                    "acks" => Door::Acks,
                    "desired" => Door::Desired,
                    other => panic!("unknown input {other}"),
                },
                key: bytes(&e["key"], topology),
                value: bytes(&e["value"], topology),
                headers,
                expect: e["expect"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

/// Every outcome label with its count in `c`.
fn tally(c: &BatchCounts) -> Vec<(&'static str, u64)> {
    let mut t = vec![("update", c.updates())];
    t.extend(NoChange::ALL.map(|r| (r.reason(), c.skipped(r))));
    t.extend(DeadLetterReason::ALL.map(|r| (r.label(), c.dead_lettered(r))));
    t.extend(AckOutcome::ALL.map(|o| (o.label(), c.acks(o))));
    t.extend(Unapplied::ALL.map(|u| (u.label(), c.command_noops(u))));
    // A refused desired write changes no twin; its answer is the REJECTED event.
    t.push(("rejected", c.command_events(CommandState::Rejected)));
    t
}

/// The one outcome whose count grew between two tallies.
fn outcome(before: &[(&'static str, u64)], after: &[(&'static str, u64)]) -> Vec<&'static str> {
    before
        .iter()
        .zip(after)
        .flat_map(|((label, b), (_, a))| std::iter::repeat_n(*label, (a - b) as usize))
        .collect()
}

/// Runs one record through the processor; returns its outcome labels.
fn run(
    p: &mut Processor,
    batch: &mut Batch,
    door: Door,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
    offset: i64,
    now: i64,
) -> Vec<&'static str> {
    let headers: Vec<(&[u8], Option<&[u8]>)> = headers
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_deref()))
        .collect();
    let headers = &headers[..];
    let input = Input {
        key,
        payload: value,
        topic: match door {
            Door::Telemetry => "telemetry",
            Door::Acks => "twin-alert-acks",
            Door::Desired => "twin-desired",
        },
        offset,
        headers: Some(&headers),
    };
    let before = tally(&batch.counts);
    match door {
        Door::Telemetry => p.process(&input, batch, now).unwrap(),
        Door::Acks => p.process_ack(&input, batch, now, offset).unwrap(),
        Door::Desired => p.process_desired(&input, batch, now, offset).unwrap(),
    }
    outcome(&before, &tally(&batch.counts))
}

fn header<'a>(headers: &'a [(String, Option<Vec<u8>>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

/// Checks every dead letter staged in `batch`: it fits in `max` bytes, says why, and says
/// what it left out. Returns how many there are.
fn check_dead_letters(batch: &Batch, max: usize) -> usize {
    let mut n = 0;
    for o in batch
        .outputs
        .records
        .iter()
        .filter(|o| o.target == Target::DeadLetter)
    {
        n += 1;
        let (key, value) = batch.outputs.bytes(o);
        let size = key.map_or(0, <[u8]>::len)
            + value.map_or(0, <[u8]>::len)
            + o.headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 12)
                .sum::<usize>();
        assert!(size <= max, "a dead letter of {size} bytes, over {max}");
        let reason = header(&o.headers, "twinflow.error.reason").expect("a reason");
        assert!(
            DeadLetterReason::ALL
                .iter()
                .any(|r| r.label().as_bytes() == reason),
            "{reason:?}"
        );
        for h in [
            "twinflow.error.stage",
            "twinflow.error.message",
            "twinflow.source.topic",
            "twinflow.source.partition",
            "twinflow.source.offset",
        ] {
            assert!(header(&o.headers, h).is_some(), "no {h}");
        }
    }
    n
}

#[test]
fn corpus_records_end_as_their_outcome_in_the_record_path() {
    for format in [Format::Avro, Format::Json] {
        let topology = topology(format);
        let dir = tempfile::tempdir().unwrap();
        let store = twinflow::store::Store::open(dir.path()).unwrap();
        let max = twinflow::kafka::DEFAULT_MAX_RECORD_BYTES;
        let mut p = Processor::new(topology.clone(), store.partition(0), 1000);
        let mut batch = p.batch(true);
        for (i, e) in corpus(&topology).iter().enumerate() {
            let dead_before = batch.outputs.records.len();
            let got = run(
                &mut p,
                &mut batch,
                e.door,
                e.key.as_deref(),
                e.value.as_deref(),
                &e.headers,
                i as i64,
                NOW,
            );
            assert_eq!(got, [e.expect.as_str()], "{format:?}: {}", e.name);
            let new = &batch.outputs.records[dead_before..];
            if let Some(dl) = new.iter().find(|o| o.target == Target::DeadLetter) {
                let omitted = header(&dl.headers, DEAD_LETTER_OMITTED)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                let (_, value) = batch.outputs.bytes(dl);
                match e.name.as_str() {
                    n if n.starts_with("a value just over 1 MB") => {
                        assert!(value.is_none(), "the value is left out");
                        let omitted = omitted.expect("says what it left out");
                        assert!(omitted.contains("value: 1000100 bytes"), "{omitted}");
                    }
                    n if n.starts_with("a header whose name is not UTF-8") => {
                        assert!(omitted.unwrap().contains("1 whose names are not UTF-8"));
                        assert_eq!(header(&dl.headers, "trace-id"), Some(&b"abc"[..]));
                        assert!(value.is_some(), "the value is kept");
                    }
                    n if n.starts_with("a null header value") => {
                        let null = dl.headers.iter().find(|(k, _)| k == "empty-or-null");
                        assert_eq!(null, Some(&("empty-or-null".to_owned(), None)));
                        assert_eq!(header(&dl.headers, "empty"), Some(&b""[..]));
                        assert_eq!(omitted, None);
                    }
                    n if n.starts_with("1650 headers") => {
                        assert!(omitted.unwrap().contains("headers: 1650"));
                        assert_eq!(value, Some(&[1u8][..]), "the value is kept");
                    }
                    _ => {}
                }
            }
        }
        check_dead_letters(&batch, max);
    }
}

/// A reading of `asset` at `event_time` with `speed`, possibly cut or with a byte changed.
fn reading_bytes(
    topology: &Topology,
    asset: &str,
    event_time: i64,
    speed: f64,
    cut: Option<usize>,
    flip: Option<(usize, u8)>,
) -> Vec<u8> {
    let speed_index = topology.model.property("speed_kmh").unwrap();
    let reading = Reading {
        asset_id: asset.into(),
        event_time,
        values: vec![(speed_index, twinflow::twin::Value::Double(speed))],
    };
    let mut bytes = Vec::new();
    match topology.topics.telemetry_format() {
        Format::Json => {
            let json = serde_json::json!({
                "asset_id": asset, "event_time": event_time, "speed_kmh": speed
            });
            bytes = serde_json::to_vec(&json).unwrap_or_default();
        }
        _ => topology.codec.encode_reading(&reading, &mut bytes),
    }
    if let Some((at, b)) = flip
        && !bytes.is_empty()
    {
        let at = at % bytes.len();
        bytes[at] ^= b;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut);
    }
    bytes
}

fn times() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(-1i64),
        Just(0i64),
        Just(1i64),
        Just(i64::MAX),
        Just(253_402_300_800_000i64), // the year 10000
        (NOW - 7_200_000..NOW + 600_000),
        any::<i64>(),
    ]
}

fn headers() -> impl Strategy<Value = Vec<Header>> {
    prop::collection::vec(
        (
            prop::collection::vec(any::<u8>(), 0..12),
            prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
        ),
        0..4,
    )
}

/// Largest record in the fuzz: small, so that values and headers do not fit.
const FUZZ_MAX: usize = 3000;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any record, of either telemetry format, ends as exactly one of: a twin update, a
    /// counted skip, or a dead letter that fits and says why. Nothing panics.
    #[test]
    fn any_record_ends_as_one_outcome(
        json in any::<bool>(),
        records in prop::collection::vec((
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
                prop::sample::select(vec!["truck-1", "truck-2", ""]).prop_map(|s| Some(s.as_bytes().to_vec())),
                Just(Some(vec![b'k'; 5000])),
            ],
            prop_oneof![
                Just(0u8),
                Just(1u8),
                Just(2u8),
            ],
            prop::sample::select(vec!["truck-1", "truck-2", "", "\u{0}x"]),
            times(),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0), Just(1e308), -10.0f64..300.0],
            prop::option::of(0usize..40),
            prop::option::of((0usize..64, 1u8..=255)),
            prop::collection::vec(any::<u8>(), 0..200),
            headers(),
            prop_oneof![Just(NOW), times()],
        ), 1..24),
    ) {
        let topology = topology(if json { Format::Json } else { Format::Avro });
        let dir = tempfile::tempdir().unwrap();
        let store = twinflow::store::Store::open(dir.path()).unwrap();
        let mut p = Processor::new(topology.clone(), store.partition(0), 1000)
            .with_max_record_bytes(FUZZ_MAX);
        let mut batch = p.batch(true);
        for (i, (key, kind, asset, t, speed, cut, flip, raw, headers, now)) in records.iter().enumerate() {
            let value = match kind {
                0 => Some(reading_bytes(&topology, asset, *t, *speed, *cut, *flip)),
                1 => Some(raw.clone()),
                _ => None,
            };
            let key = key.clone().or_else(|| (*kind == 0).then(|| asset.as_bytes().to_vec()));
            let got = run(&mut p, &mut batch, Door::Telemetry, key.as_deref(), value.as_deref(), headers, i as i64, *now);
            prop_assert_eq!(got.len(), 1, "{:?}", got);
        }
        prop_assert_eq!(batch.counts.consumed(), records.len() as u64);
        let dead: u64 = DeadLetterReason::ALL.iter().map(|r| batch.counts.dead_lettered(*r)).sum();
        prop_assert_eq!(check_dead_letters(&batch, FUZZ_MAX) as u64, dead);
    }

    /// Any acknowledgement ends as exactly one of: a twin update, a counted no-op, or a
    /// dead letter that fits and says why.
    #[test]
    fn any_acknowledgement_ends_as_one_outcome(
        acks in prop::collection::vec((
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u8>(), 0..20).prop_map(Some),
                Just(Some(b"truck-1".to_vec())),
            ],
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u8>(), 0..100).prop_map(Some),
                ".{0,40}".prop_map(|id| Some(serde_json::to_vec(&serde_json::json!({"alert_id": id, "by": "ops"})).unwrap())),
                Just(Some(vec![b'['; 5000])),
            ],
            headers(),
            times(),
        ), 1..16),
    ) {
        // truck-1 speeds: a twin with a raised alert to acknowledge.
        each_ends_as_one_outcome(Door::Acks, 200.0, &acks)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any desired write ends as exactly one of: a twin update (accepted), a counted no-op
    /// (repeated), a REJECTED answer (version conflict, unknown asset), or a dead letter
    /// that fits and says why.
    #[test]
    fn any_desired_write_ends_as_one_outcome(
        writes in prop::collection::vec((
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u8>(), 0..20).prop_map(Some),
                Just(Some(b"truck-1".to_vec())),
                Just(Some(b"truck-unknown".to_vec())),
            ],
            prop_oneof![
                Just(None),
                prop::collection::vec(any::<u8>(), 0..100).prop_map(Some),
                (
                    prop::sample::select(vec!["temperature_c", "speed_kmh", "nope", ""]),
                    prop_oneof![
                        Just(serde_json::json!(null)),
                        Just(serde_json::json!("cold")),
                        Just(serde_json::json!(true)),
                        (-100.0f64..100.0).prop_map(|v| serde_json::json!(v)),
                        any::<i64>().prop_map(|v| serde_json::json!(v)),
                    ],
                    prop::option::of(any::<i64>()),
                    prop::option::of("[a-z0-9]{0,8}|.{0,200}"),
                )
                    .prop_map(|(name, value, if_match, command_id)| {
                        let write = serde_json::json!({
                            "desired": { name: value },
                            "if_match": if_match,
                            "command_id": command_id,
                            "by": "fuzz",
                        });
                        Some(serde_json::to_vec(&write).unwrap())
                    }),
                Just(Some(vec![b'{'; 5000])),
            ],
            headers(),
            times(),
        ), 1..16),
    ) {
        each_ends_as_one_outcome(Door::Desired, 20.0, &writes)?;
    }
}

/// A record of a fuzz test: key, value, headers, processing time.
type Fuzzed = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>, i64);

/// Runs `records` through `door` of a processor whose truck-1 has had a reading at
/// `speed`: each must end as exactly one outcome, and every dead letter fit and say why.
fn each_ends_as_one_outcome(
    door: Door,
    speed: f64,
    records: &[Fuzzed],
) -> Result<(), TestCaseError> {
    let topology = topology(Format::Avro);
    let dir = tempfile::tempdir().unwrap();
    let store = twinflow::store::Store::open(dir.path()).unwrap();
    let mut p =
        Processor::new(topology.clone(), store.partition(0), 1000).with_max_record_bytes(FUZZ_MAX);
    let mut batch = p.batch(true);
    let first = reading_bytes(&topology, "truck-1", NOW, speed, None, None);
    run(
        &mut p,
        &mut batch,
        Door::Telemetry,
        Some(b"truck-1"),
        Some(&first),
        &[],
        0,
        NOW,
    );
    for (i, (key, value, headers, now)) in records.iter().enumerate() {
        let got = run(
            &mut p,
            &mut batch,
            door,
            key.as_deref(),
            value.as_deref(),
            headers,
            i as i64,
            *now,
        );
        prop_assert_eq!(got.len(), 1, "{:?}", got);
    }
    let dead: u64 = DeadLetterReason::ALL
        .iter()
        .map(|r| batch.counts.dead_lettered(*r))
        .sum();
    prop_assert_eq!(check_dead_letters(&batch, FUZZ_MAX) as u64, dead);
    Ok(())
}

/// Headers with any bytes in their names. The rdkafka crate only takes `&str` names, so
/// they are built with librdkafka's C API and copied into its `OwnedHeaders`.
fn raw_headers(headers: &[Header]) -> OwnedHeaders {
    use rdkafka::bindings as rdsys;
    // SAFETY: librdkafka copies each name and value; rust-rdkafka's `BorrowedHeaders` is a
    // view of the native headers pointer itself (how the crate makes one), and `detach`
    // copies them before they are destroyed.
    unsafe {
        let native = rdsys::rd_kafka_headers_new(headers.len());
        for (name, value) in headers {
            let (ptr, len) = value
                .as_ref()
                .map_or((std::ptr::null(), 0), |v| (v.as_ptr().cast(), v.len()));
            rdsys::rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                ptr,
                len as isize,
            );
        }
        let owned = (*(native as *const rdkafka::message::BorrowedHeaders)).detach();
        rdsys::rd_kafka_headers_destroy(native);
        owned
    }
}

/// The corpus, each record between two ordinary readings, all on partition 0, through the
/// pipeline on the real test broker: every record ends as its outcome, the readings around
/// it are applied, nothing is retried, and each dead letter says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_on_the_broker_are_accounted_and_the_partition_goes_on() {
    let broker = Noida::start();
    let mut p = TestPipeline::new(&broker.bootstrap, vehicle_topology(), &NOIDA_CLIENT);
    let topology = topology(Format::Avro);
    let entries = corpus(&topology);
    let admin = p.config().kafka.admin_config();
    twinflow::kafka::apply_topology(&admin, &p.topology.topics)
        .await
        .unwrap();
    p.start();

    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &broker.bootstrap)
        .set("linger.ms", "0")
        // The input topic takes records over the output producer's 1 MB.
        .set("message.max.bytes", "2000000");
    let producer: FutureProducer = config.create().unwrap();
    let send = |topic: &str, key: Option<Vec<u8>>, value: Option<Vec<u8>>, headers: &[Header]| {
        let (topic, headers) = (topic.to_owned(), raw_headers(headers));
        let producer = producer.clone();
        async move {
            let mut r: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&topic).partition(0).headers(headers);
            r.key = key.as_deref();
            r.payload = value.as_deref();
            producer
                .send(r, Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap()
                .offset
        }
    };
    let telemetry = topology.topics.telemetry.name.clone();
    let sentinel = |i: usize| {
        let asset = format!("sentinel-{i}");
        let value = reading_bytes(&topology, &asset, NOW - 1000, 5.0, None, None);
        (asset.into_bytes(), value)
    };
    // (topic, offset) of each corpus record, in order.
    let mut sent = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (key, value) = sentinel(i);
        send(&telemetry, Some(key), Some(value), &[]).await;
        let topic = e.door.topic(&topology).to_owned();
        let offset = send(&topic, e.key.clone(), e.value.clone(), &e.headers).await;
        sent.push((topic, offset));
    }
    let (key, value) = sentinel(entries.len());
    send(&telemetry, Some(key), Some(value), &[]).await;

    let expect = |label: &str| entries.iter().filter(|e| e.expect == label).count() as u64;
    let sentinels = entries.len() as u64 + 1;
    let dead: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.label()).collect();
    let expected_dead: u64 = dead.iter().map(|l| expect(l)).sum();
    let m = p.metrics().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let updates = m.total("twinflow_twin_updates_total");
        let acked = m.total("twinflow_alert_acks_total");
        let dl = m.total("twinflow_records_dead_lettered_total");
        if updates >= sentinels + expect("update")
            && acked >= expect("unknown")
            && dl >= expected_dead
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in 60 s: {updates} updates, {acked} acknowledgements, {dl} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each outcome exactly as often as the corpus says, and nothing replayed.
    assert_eq!(
        m.total("twinflow_twin_updates_total"),
        sentinels + expect("update")
    );
    for label in &dead {
        assert_eq!(
            m.counter("twinflow_records_dead_lettered_total", &[("reason", label)]),
            expect(label),
            "dead letters with reason {label}"
        );
    }
    for label in ["duplicate", "stale"] {
        assert_eq!(
            m.counter("twinflow_records_skipped_total", &[("reason", label)]),
            expect(label),
            "skips with reason {label}"
        );
    }
    assert_eq!(
        m.counter("twinflow_alert_acks_total", &[("result", "unknown")]),
        expect("unknown")
    );
    assert_eq!(
        m.counter("twinflow_commits_total", &[("outcome", "aborted")]),
        0,
        "nothing was retried"
    );
    assert_eq!(m.total("twinflow_replays_total"), 0, "nothing was replayed");
    assert_eq!(m.total("twinflow_processing_panics_total"), 0);

    // Every sentinel's twin is in the changelog.
    let changelog = p.changelog((sentinels + expect("update")) as usize);
    for i in 0..=entries.len() {
        let id = format!("sentinel-{i}");
        assert!(
            changelog.iter().any(|t| t.asset_id == id),
            "{id} was applied"
        );
    }

    // Each dead letter names its record and reason; the big one left its value out.
    let letters = p.read(
        &topology.topics.dead_letter.name,
        expected_dead as usize,
        Duration::from_secs(30),
    );
    for m in &letters {
        let get = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let at = (
            get("twinflow.source.topic").unwrap(),
            get("twinflow.source.offset")
                .unwrap()
                .parse::<i64>()
                .unwrap(),
        );
        let index = sent.iter().position(|s| *s == at).expect("a corpus record");
        let e = &entries[index];
        assert_eq!(
            get("twinflow.error.reason").unwrap(),
            e.expect,
            "{}",
            e.name
        );
        assert_eq!(get("twinflow.source.partition").as_deref(), Some("0"));
        if e.value.as_ref().is_some_and(|v| v.len() > 1_000_000) {
            assert!(m.payload().is_none(), "{}", e.name);
            assert!(
                get(DEAD_LETTER_OMITTED)
                    .unwrap()
                    .contains("value: 1000100 bytes")
            );
        } else {
            assert_eq!(m.payload(), e.value.as_deref(), "{}", e.name);
        }
    }
    p.stop().await;
}

/// A record whose processing panics (injected: test builds only) is dead-lettered with reason
/// `internal` and the panic's message, counted, and the readings around it are applied. Each
/// panic costs a replay of the uncommitted work, not the partition: twelve of them, more than
/// the ten failures in a row that stop an instance, leave it running, and it stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_record_is_dead_lettered_as_internal_and_the_partition_goes_on() {
    use twinflow::pipeline::PANICKING_ASSET;
    let (_kafka, mut p) = common::on_embedded(common::untimed_vehicle_topology());
    p.start();
    let n = 12;
    for i in 0..n {
        p.send(&format!("before-{i}"), NOW - 1000, &[("speed_kmh", 5.0)])
            .await;
        p.send(PANICKING_ASSET, NOW - 1000 + i, &[("speed_kmh", 5.0)])
            .await;
    }
    p.send("after", NOW - 1000, &[("speed_kmh", 5.0)]).await;

    let m = p.metrics().clone();
    let internal = || {
        m.counter(
            "twinflow_records_dead_lettered_total",
            &[("reason", "internal")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while internal() < n as u64 || m.total("twinflow_twin_updates_total") < n as u64 + 1 {
        assert!(
            Instant::now() < deadline,
            "in 60 s: {} internal dead letters, {} updates",
            internal(),
            m.total("twinflow_twin_updates_total")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(internal(), n as u64);
    assert_eq!(m.total("twinflow_twin_updates_total"), n as u64 + 1);
    assert_eq!(
        m.counter("twinflow_processing_panics_total", &[("work", "reading")]),
        n as u64
    );
    assert_eq!(m.total("twinflow_failed_partitions"), 0);

    let letters = p.read(
        &p.topology.topics.dead_letter.name,
        n as usize,
        Duration::from_secs(30),
    );
    for letter in &letters {
        let header = |name: &str| common::header(letter, name).unwrap().to_owned();
        assert_eq!(header("twinflow.error.reason"), "internal");
        assert!(
            header("twinflow.error.message").contains("injected panic"),
            "{}",
            header("twinflow.error.message")
        );
        assert_eq!(letter.key(), Some(PANICKING_ASSET.as_bytes()));
    }
    p.stop().await;
}
