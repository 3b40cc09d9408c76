//! Every Kafka client of an instance is configured here: the group consumer, the output
//! producer, the API's writer, and the changelog readers (restore, fleet view). Each starts from the
//! `[kafka]` section (connection, security, passthrough properties for its role), then
//! twinflow's settings go on top; what the clients must agree on, the isolation level
//! above all, follows from the guarantee, decided once.

use rdkafka::ClientConfig;

use crate::config::{Config, Guarantee, KafkaConfig, Role};

/// Consumer settings twinflow relies on; passthrough properties may override them.
const CONSUMER_DEFAULTS: [(&str, &str); 4] = [
    ("auto.offset.reset", "earliest"),
    ("partition.assignment.strategy", "cooperative-sticky"),
    ("enable.partition.eof", "false"),
    // At-least-once: how often the group offset follows the store's position.
    ("auto.commit.interval.ms", "1000"),
];

/// Producer settings: ordered, acknowledged by all replicas, batched and compressed;
/// passthrough properties may override them.
const PRODUCER_DEFAULTS: [(&str, &str); 4] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("linger.ms", "5"),
    ("compression.type", "lz4"),
];

/// The client settings of one instance.
#[derive(Clone, Debug)]
pub struct Clients {
    kafka: KafkaConfig,
    /// Set under exactly-once: the producer's transactional id.
    transactional_id: Option<String>,
}

impl Clients {
    /// The clients of the instance `config` describes. Under exactly-once the transactional
    /// id is the configured one, else one unique per instance and stable across its
    /// restarts: the group plus a hash of the store path (an instance is its store).
    pub fn new(config: &Config) -> Clients {
        let transactional_id = (config.processing.guarantee == Guarantee::ExactlyOnce).then(|| {
            config
                .processing
                .transactional_id
                .clone()
                .unwrap_or_else(|| {
                    let store = &config.store.path;
                    let path = std::fs::canonicalize(store).unwrap_or_else(|_| store.to_owned());
                    let hash = xxhash_rust::xxh3::xxh3_64(path.to_string_lossy().as_bytes());
                    format!("twinflow-{}-{hash:016x}", config.kafka.group_id)
                })
        });
        Clients {
            kafka: config.kafka.clone(),
            transactional_id,
        }
    }

    /// Whether outputs and input offsets commit in transactions.
    pub fn exactly_once(&self) -> bool {
        self.transactional_id.is_some()
    }

    /// What consumers read: only committed transactions under exactly-once.
    fn isolation(&self) -> &'static str {
        if self.exactly_once() {
            "read_committed"
        } else {
            "read_uncommitted"
        }
    }

    fn base(&self, role: Role, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        self.kafka.apply(&mut c, role);
        c
    }

    /// The group consumer of the telemetry topic (and the companion partitions).
    pub fn group_consumer(&self) -> ClientConfig {
        let mut c = self.base(Role::Consumer, &CONSUMER_DEFAULTS);
        c.set("group.id", &self.kafka.group_id)
            // Group offsets: at-least-once, stored by the committer after the store write
            // and committed by librdkafka; exactly-once, sent in the transaction only.
            .set(
                "enable.auto.commit",
                if self.exactly_once() { "false" } else { "true" },
            )
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", self.isolation());
        c
    }

    /// The output producer; transactional under exactly-once.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base(Role::Producer, &PRODUCER_DEFAULTS);
        if let Some(id) = &self.transactional_id {
            // A restarted instance with the same id fences its previous incarnation and
            // aborts its open transaction at once; a dead one's is aborted after this long.
            c.set("transactional.id", id)
                .set("transaction.timeout.ms", "10000");
        }
        c
    }

    /// The producer of the HTTP API's desired-state writes: idempotent, never
    /// transactional (a write is one record, acknowledged before the API answers).
    pub fn writer(&self) -> ClientConfig {
        self.base(Role::Producer, &PRODUCER_DEFAULTS)
    }

    /// The MQTT bridges' consumer of the command topic, in their own `group`: offsets are
    /// stored by the bridge once the MQTT broker has a command, and committed by
    /// librdkafka; a group that never committed starts at the end (old commands are not
    /// sent to devices).
    pub fn bridge_consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base(Role::Consumer, &[("auto.offset.reset", "latest")]);
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("isolation.level", self.isolation());
        c
    }

    /// A reader of output topics that assigns its partitions itself and commits nothing
    /// (`group` only names it to the broker), reading what the pipeline commits; with
    /// `ends`, it reports reaching the end of a partition (a reader that stops there).
    pub fn reader(&self, group: &str, ends: bool) -> ClientConfig {
        let mut c = self.base(Role::Consumer, &[]);
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", if ends { "true" } else { "false" })
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", self.isolation());
        c
    }

    /// Whether a partition nobody processed yet starts at its end rather than its
    /// beginning (the consumer's `auto.offset.reset`).
    pub fn starts_at_end(&self) -> bool {
        matches!(
            self.group_consumer().get("auto.offset.reset"),
            Some("latest" | "largest" | "end")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(extra: &str) -> Clients {
        let text = format!("[kafka]\nbootstrap_servers = \"localhost:9092\"\n{extra}");
        let config = Config::from_toml(&text, std::iter::empty()).expect("a valid config");
        Clients::new(&config)
    }

    #[test]
    fn the_guarantee_decides_isolation_commits_and_transactions_for_every_client() {
        let alo = clients("");
        assert_eq!(
            alo.group_consumer().get("isolation.level"),
            Some("read_uncommitted")
        );
        assert_eq!(alo.group_consumer().get("enable.auto.commit"), Some("true"));
        assert_eq!(
            alo.reader("r", true).get("isolation.level"),
            Some("read_uncommitted")
        );
        assert_eq!(alo.producer().get("transactional.id"), None);

        let eos = clients("[processing]\nguarantee = \"exactly_once\"\n");
        assert_eq!(
            eos.group_consumer().get("isolation.level"),
            Some("read_committed")
        );
        assert_eq!(
            eos.group_consumer().get("enable.auto.commit"),
            Some("false")
        );
        assert_eq!(
            eos.reader("r", false).get("isolation.level"),
            Some("read_committed")
        );
        let id = eos.producer().get("transactional.id").map(str::to_owned);
        assert!(id.is_some_and(|id| id.starts_with("twinflow-twinflow-")));
    }

    #[test]
    fn passthrough_settings_override_defaults_and_say_where_new_partitions_start() {
        let c = clients("[kafka.consumer]\n\"auto.offset.reset\" = \"latest\"\n");
        assert!(c.starts_at_end());
        assert_eq!(c.group_consumer().get("auto.offset.reset"), Some("latest"));
        assert!(!clients("").starts_at_end());
    }
}
