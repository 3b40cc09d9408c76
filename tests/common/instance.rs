//! `twinflow run` as an operator starts it: a config file, a store directory, a log file
//! and the HTTP endpoint; stopped with a signal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message};

use super::{free_port, http_get, root, untimed_vehicle_topology};

/// How an instance is configured beyond the defaults.
pub struct Settings<'a> {
    pub bootstrap: &'a str,
    pub group: &'a str,
    pub guarantee: &'a str,
    /// Properties for every Kafka client of the instance.
    pub librdkafka: &'a [(&'a str, &'a str)],
    /// Consumer-only properties.
    pub consumer: &'a [(&'a str, &'a str)],
    /// `[processing]` keys, as TOML values (`"\"3s\""`).
    pub processing: &'a [(&'a str, &'a str)],
    /// Environment variables of the process (configuration overrides, secrets).
    pub env: &'a [(&'a str, &'a str)],
}

/// A running `twinflow run` process.
pub struct Instance {
    pub child: Child,
    pub http: u16,
    pub log: PathBuf,
    pub name: String,
}

impl Instance {
    /// Starts an instance named `name` with its store in `dir/name-store` (kept across
    /// restarts under the same name) and its log appended to `dir/name.log`.
    pub fn spawn(dir: &Path, name: &str, s: &Settings<'_>) -> Instance {
        let http = free_port();
        let t = untimed_vehicle_topology();
        let table = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
                .collect::<String>()
        };
        let text = format!(
            "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{}\"\n[kafka.librdkafka]\n{}[kafka.consumer]\n{}\
             [topology]\ntopics = \"{}\"\nmodel = \"{}\"\n[store]\npath = \"{}\"\n\
             [processing]\nguarantee = \"{}\"\n{}[http]\nlisten = \"127.0.0.1:{http}\"\n",
            s.bootstrap,
            s.group,
            table(s.librdkafka),
            table(s.consumer),
            t.topics.display(),
            t.model.display(),
            dir.join(format!("{name}-store")).display(),
            s.guarantee,
            s.processing
                .iter()
                .map(|(k, v)| format!("{k} = {v}\n"))
                .collect::<String>(),
        );
        let config = dir.join(format!("{name}-{http}.toml"));
        std::fs::write(&config, text).unwrap();
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_twinflow"))
            .args(["run", "--config"])
            .arg(&config)
            .current_dir(root())
            .envs(s.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("twinflow starts");
        Instance {
            child,
            http,
            log,
            name: name.to_owned(),
        }
    }

    /// Stops the instance with `signal` (KILL: no chance to clean up; TERM: a clean
    /// shutdown) and waits for it.
    pub fn stop(&mut self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap();
    }

    /// The /metrics page (`None` until the instance answers).
    pub fn scrape(&self) -> Option<String> {
        http_get(self.http, "/metrics").map(|(_, body)| body)
    }

    /// The sum of a metric's series (0 until the instance answers).
    pub fn metric(&self, name: &str) -> f64 {
        self.scrape()
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }

    /// Records the instance consumed since it started.
    pub fn consumed(&self) -> u64 {
        self.metric("twinflow_records_consumed_total") as u64
    }

    /// The instance's `twinflow_input_next_offset` of each partition it reports.
    pub fn positions(&self) -> BTreeMap<i32, i64> {
        let prefix = "twinflow_input_next_offset{partition=\"";
        self.scrape()
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (p, v) = l.strip_prefix(prefix)?.split_once("\"} ")?;
                Some((p.parse().ok()?, v.parse::<f64>().ok()? as i64))
            })
            .collect()
    }

    /// The last lines of the instance's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<_> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

/// A test that fails leaves no instance behind: it would go on reconnecting to its broker's
/// port and write into whatever cluster a later test starts there.
impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every input record was applied by one of `instances`: for each partition of
/// `topic`, some instance's position reached the partition's end.
pub fn caught_up(client: &ClientConfig, instances: &[&Instance], topic: &str) -> bool {
    let positions: Vec<_> = instances.iter().map(|i| i.positions()).collect();
    let consumer: BaseConsumer = client.create().unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    (0..metadata.topics()[0].partitions().len() as i32).all(|p| {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        positions
            .iter()
            .any(|ps| ps.get(&p).is_some_and(|next| *next >= high))
    })
}

/// The offsets `group` committed for each partition of `topic`, in partition order (`None`:
/// nothing committed), read by a client that does not join the group.
pub fn committed_offsets(client: &ClientConfig, group: &str, topic: &str) -> Vec<Option<i64>> {
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..metadata.topics()[0].partitions().len() as i32 {
        tpl.add_partition(topic, p);
    }
    let offsets = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some(o),
            _ => None,
        })
        .collect()
}

/// Every record of `topic`, read to its end, in partition/offset order. `settings` are the
/// reader's client settings (broker workarounds, isolation level).
pub fn read_all(bootstrap: &str, topic: &str, settings: &[(&str, &str)]) -> Vec<OwnedMessage> {
    let mut all = vec![("enable.partition.eof", "true")];
    all.extend_from_slice(settings);
    let (consumer, partitions) = super::reader(bootstrap, &BTreeMap::new(), topic, &all);
    let (mut out, mut ended) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended < partitions {
        assert!(Instant::now() < deadline, "reading {topic} took over 120 s");
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(KafkaError::PartitionEOF(_))) => ended += 1,
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    // An offset names one record: should the client hand one over twice, count it once.
    out.dedup_by_key(|m| (m.partition(), m.offset()));
    out
}

/// Sends `input` to `topic` from a thread, `chunk` records at a time with `pause` between
/// chunks, as devices keep doing while instances come and go. The producer is idempotent,
/// which keeps each partition in the order of `input` through retries.
pub fn feed(
    client: &ClientConfig,
    topic: &str,
    input: &[(Vec<u8>, Vec<u8>)],
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let (mut client, topic, input) = (client.clone(), topic.to_owned(), input.to_vec());
    std::thread::spawn(move || {
        let producer: ThreadedProducer<DefaultProducerContext> = client
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .unwrap();
        for records in input.chunks(chunk) {
            for (k, v) in records {
                let mut r = BaseRecord::to(&topic).key(&k[..]).payload(&v[..]);
                while let Err((_, back)) = producer.send(r) {
                    r = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
            std::thread::sleep(pause); // the devices' pace, not a wait for anything
        }
        producer.flush(Duration::from_secs(60)).unwrap();
    })
}

/// Microseconds since the epoch of `t`.
pub fn micros(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Microseconds since the epoch of a log line's timestamp, such as
/// `2026-11-22T04:48:26.393637Z`.
pub fn log_micros(s: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    // Days from the civil date (proleptic Gregorian), after H. Hinnant.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19);
    let fraction = &s[20..s.len() - 1];
    let micros = format!("{fraction:0<6}")[..6].parse::<i64>().unwrap();
    seconds * 1_000_000 + micros
}
