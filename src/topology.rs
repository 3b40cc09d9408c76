//! The topology: which topics exist, what the twin model is and which rules apply, loaded
//! from `topology/*.toml` and the schemas they name, and checked as a whole before anything
//! connects to Kafka.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::{Codec, Format};
use crate::config::TopologyConfig;
use crate::error::{Error, Result};
use crate::rules::{DESIRED_CODE, OFFLINE_CODE, Op, Rule, RuleSet};
use crate::twin::{
    ActiveWhen, DesiredPolicy, Model, PropKind, PropertyDef, Severity, TimePolicy, Value,
};

/// One topic declaration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor.
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Wire format: `avro` (default), `confluent_avro` or, for telemetry only, `json`. The
    /// dead-letter and acknowledgement topics take none.
    #[serde(default)]
    pub format: Option<Format>,
    /// Topic configs (`cleanup.policy`, `retention.ms`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// The topics of a pipeline.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Input readings.
    pub telemetry: TopicSpec,
    /// Full twins after each change (compacted).
    pub changelog: TopicSpec,
    /// Alert transitions.
    pub alerts: TopicSpec,
    /// Records that could not be applied.
    pub dead_letter: TopicSpec,
    /// Input: alert and command acknowledgements, keyed by asset id, partitioned like the
    /// telemetry.
    pub acks: TopicSpec,
    /// Input: desired-state writes, keyed by asset id, partitioned like the telemetry.
    pub desired: TopicSpec,
    /// Output: commands for devices, keyed by asset id.
    pub commands: TopicSpec,
    /// Output: command transitions (the audit trail), keyed by asset id.
    pub command_events: TopicSpec,
    /// Output: every twin version, as the changelog has it, kept by time instead of
    /// compacted (for ML teams' history). Left out: no history topic.
    #[serde(default)]
    pub history: Option<TopicSpec>,
}

impl Topics {
    /// All of them, the inputs first.
    pub fn all(&self) -> Vec<&TopicSpec> {
        let mut all = vec![
            &self.telemetry,
            &self.acks,
            &self.desired,
            &self.changelog,
            &self.alerts,
            &self.dead_letter,
            &self.commands,
            &self.command_events,
        ];
        all.extend(self.history.as_ref());
        all
    }

    /// The desired-state topic's wire format: JSON unless it says Avro.
    pub fn desired_format(&self) -> Format {
        self.desired.format.unwrap_or(Format::Json)
    }

    /// The telemetry topic's wire format.
    pub fn telemetry_format(&self) -> Format {
        self.telemetry.format.unwrap_or_default()
    }

    /// Whether any topic uses the Confluent wire format, which needs `[schema_registry]`.
    pub fn uses_registry(&self) -> bool {
        self.all()
            .iter()
            .any(|t| t.format == Some(Format::ConfluentAvro))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    telemetry_schema: PathBuf,
    twin_schema: PathBuf,
    status: Option<StatusFile>,
    time: Option<TimeFile>,
    lifecycle: Option<LifecycleFile>,
    #[serde(default)]
    properties: BTreeMap<String, BoundsFile>,
    #[serde(default)]
    rules: Vec<RuleFile>,
    desired: Option<DesiredFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DesiredFile {
    #[serde(default, with = "humantime_serde")]
    converge_within: Option<Duration>,
    #[serde(default = "yes")]
    clear_reached: bool,
    severity: Option<Severity>,
    properties: BTreeMap<String, WritableFile>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WritableFile {
    #[serde(default)]
    tolerance: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusFile {
    active_property: Option<String>,
    active_above: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    idle_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    offline_after: Option<Duration>,
    offline_severity: Option<Severity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeFile {
    #[serde(default, with = "humantime_serde")]
    allowed_lateness: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max_future: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LifecycleFile {
    #[serde(default, with = "humantime_serde")]
    retire_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    refuse_deleted_for: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BoundsFile {
    min: Option<f64>,
    max: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    code: String,
    #[serde(default)]
    kind: RuleKindFile,
    severity: Severity,
    property: String,
    op: Op,
    threshold: f64,
    clear_threshold: Option<f64>,
    #[serde(default, rename = "for", with = "humantime_serde")]
    min_duration: Option<Duration>,
    on_raise: Option<ActionFile>,
    #[serde(default, with = "humantime_serde")]
    horizon: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    clear_horizon: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    min_samples: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    min_span: Option<Duration>,
    min_fit: Option<f64>,
}

/// The settings of a forecast rule, with their defaults (`Rule::check` checks them): `min_samples` 5,
/// `min_span` the window less one bucket (a 23rd of it: the oldest point is the newest of its
/// bucket), `min_fit` 0.8, `clear_horizon` 1.25 × the horizon.
fn forecast_spec(r: &RuleFile) -> Result<crate::rules::ForecastSpec, String> {
    let code = &r.code;
    let (Some(horizon), Some(window)) = (millis(r.horizon), millis(r.window)) else {
        return Err(format!(
            "rule {code}: a forecast needs horizon and window (e.g. \"40m\", \"15m\")"
        ));
    };
    if r.clear_threshold.is_some() {
        return Err(format!(
            "rule {code}: a forecast has clear_horizon, not clear_threshold"
        ));
    }
    let spec = crate::rules::ForecastSpec {
        horizon,
        clear_horizon: millis(r.clear_horizon).unwrap_or(horizon + horizon / 4),
        window,
        min_samples: r.min_samples.unwrap_or(5),
        min_span: millis(r.min_span).unwrap_or(window - crate::rules::forecast::bucket(window)),
        min_fit: r.min_fit.unwrap_or(0.8),
    };
    Ok(spec)
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum RuleKindFile {
    #[default]
    Threshold,
    Forecast,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFile {
    /// Desired values to set, property name to value.
    desired: toml::Table,
}

fn ms(d: i64) -> Duration {
    Duration::from_millis(u64::try_from(d).unwrap_or(0))
}

fn millis(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Everything the pipeline needs to know about its data.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The topics.
    pub topics: Topics,
    /// The twin model.
    pub model: Model,
    /// The alert rules.
    pub rules: RuleSet,
    /// Encoders and decoders for the model's schemas.
    pub codec: Codec,
    /// Path of the twin schema (for `describe`).
    pub twin_schema: PathBuf,
    /// Path of the telemetry schema (for `describe`).
    pub telemetry_schema: PathBuf,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read(path)?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

impl Topology {
    /// Loads the topic file and the model file (whose schema paths are relative to it).
    ///
    /// # Errors
    /// `Error::Config` naming the file and what is wrong in it.
    pub fn load(paths: &TopologyConfig) -> Result<Topology> {
        let model = paths.model.as_path();
        let topics: Topics = parse_toml(&paths.topics)?;
        let file: ModelFile = parse_toml(model)?;
        let base = model.parent().unwrap_or(Path::new("."));
        let telemetry_schema = base.join(&file.telemetry_schema);
        let twin_schema = base.join(&file.twin_schema);
        let codec = Codec::new(&read(&telemetry_schema)?, &read(&twin_schema)?)
            .map_err(|e| Error::Config(format!("{}: {e}", model.display())))?;
        let t = Self::assemble(topics, file, codec, telemetry_schema, twin_schema)
            .map_err(|e| Error::Config(format!("{}: {e}", model.display())))?;
        Ok(t)
    }

    fn assemble(
        topics: Topics,
        file: ModelFile,
        codec: Codec,
        telemetry_schema: PathBuf,
        twin_schema: PathBuf,
    ) -> Result<Topology, String> {
        let mut properties: Vec<PropertyDef> = codec
            .properties()
            .iter()
            .map(|p| PropertyDef::new(&p.name, p.kind))
            .collect();
        let numeric = |name: &str, what: &str, props: &[PropertyDef]| -> Result<usize, String> {
            let i = props.iter().position(|p| p.name == name).ok_or_else(|| {
                format!("{what} names '{name}', which is not a property of the telemetry schema")
            })?;
            if !props[i].kind.is_numeric() {
                return Err(format!("{what} names '{name}', which is not numeric"));
            }
            Ok(i)
        };
        for (name, b) in &file.properties {
            let i = numeric(name, &format!("[properties.{name}]"), &properties)?;
            properties[i].min = b.min;
            properties[i].max = b.max;
        }
        let status = file.status.as_ref();
        let active_when = match status.map(|s| (&s.active_property, s.active_above)) {
            None | Some((None, None)) => None,
            Some((Some(property), Some(above))) => Some(ActiveWhen {
                property: numeric(property, "status.active_property", &properties)?,
                above,
            }),
            Some(_) => {
                return Err("status.active_property and status.active_above go together".to_owned());
            }
        };
        let time = TimePolicy {
            allowed_lateness: millis(file.time.as_ref().and_then(|t| t.allowed_lateness)),
            max_future: millis(file.time.as_ref().and_then(|t| t.max_future)),
            offline_after: millis(status.and_then(|s| s.offline_after)),
            idle_after: millis(status.and_then(|s| s.idle_after)),
            retire_after: millis(file.lifecycle.as_ref().and_then(|l| l.retire_after)),
            refuse_deleted_for: millis(file.lifecycle.as_ref().and_then(|l| l.refuse_deleted_for)),
        };
        if time.idle_after.is_some() && active_when.is_none() {
            return Err("status.idle_after needs status.active_property".to_owned());
        }
        if time.offline_after == Some(0) {
            return Err("status.offline_after must be more than 0".to_owned());
        }
        if time.retire_after == Some(0) {
            return Err("lifecycle.retire_after must be more than 0".to_owned());
        }
        if let (Some(retire), Some(offline)) = (time.retire_after, time.offline_after)
            && retire <= offline
        {
            return Err(
                "lifecycle.retire_after must be longer than status.offline_after".to_owned(),
            );
        }
        let mut codes = HashSet::new();
        let mut rules = Vec::new();
        let mut actions = Vec::new();
        for r in file.rules {
            if !codes.insert(r.code.clone())
                || [OFFLINE_CODE, DESIRED_CODE].contains(&r.code.as_str())
            {
                return Err(format!("rule code {} is used twice", r.code));
            }
            let property = numeric(&r.property, &format!("rule {}", r.code), &properties)?;
            let mut rule = Rule::threshold(
                &r.code,
                r.severity,
                (property, &r.property),
                r.op,
                r.threshold,
            );
            if r.kind == RuleKindFile::Forecast {
                rule = Rule::forecast(
                    &r.code,
                    r.severity,
                    (property, &r.property),
                    (r.op, r.threshold),
                    forecast_spec(&r)?,
                );
            } else if r.horizon.is_some() || r.window.is_some() {
                return Err(format!(
                    "rule {}: horizon and window belong to kind = \"forecast\"",
                    r.code
                ));
            }
            rule.clear_threshold = r.clear_threshold;
            rule.min_duration = millis(r.min_duration);
            rule.check()?;
            if let Some(action) = r.on_raise {
                actions.push((rules.len(), action));
            }
            rules.push(rule);
        }
        if let Some(after) = time.offline_after {
            let severity = status
                .and_then(|s| s.offline_severity)
                .unwrap_or(Severity::Warning);
            rules.push(Rule::offline(severity, after));
        }
        let mut desired = DesiredPolicy::default();
        if let Some(file) = &file.desired {
            if file.properties.is_empty() {
                return Err("[desired] lists no property under [desired.properties]".into());
            }
            for (name, w) in &file.properties {
                let i = properties
                    .iter()
                    .position(|p| p.name == *name)
                    .ok_or_else(|| {
                        format!(
                            "[desired.properties.{name}] names no property of the telemetry schema"
                        )
                    })?;
                if !w.tolerance.is_finite() || w.tolerance < 0.0 {
                    return Err(format!(
                        "[desired.properties.{name}] tolerance must be a finite number >= 0"
                    ));
                }
                properties[i].writable = true;
                properties[i].tolerance = w.tolerance;
            }
            desired.converge_within = millis(file.converge_within);
            desired.clear_reached = file.clear_reached;
            if let Some(within) = desired.converge_within {
                if within == 0 {
                    return Err("desired.converge_within must be more than 0".into());
                }
                let severity = file.severity.unwrap_or(Severity::Warning);
                rules.push(Rule::desired_not_reached(severity, within));
            }
            if !codec.has_desired() {
                return Err(format!(
                    "[desired] needs the twin schema's desired-state fields ({}); see schemas/vehicle_twin.avsc",
                    crate::codec::DESIRED_FIELDS.join(", ")
                ));
            }
        }
        if rules.iter().any(|r| r.forecast.is_some()) && !codec.has_forecasts() {
            return Err(
                "a forecast rule needs the twin schema's forecasts field; see schemas/vehicle_twin.avsc"
                    .into(),
            );
        }
        for spec in topics.all() {
            if spec.partitions < 1 || spec.replication_factor < 1 {
                return Err(format!(
                    "topic {}: partitions and replication_factor must be at least 1",
                    spec.name
                ));
            }
        }
        if topics.changelog.partitions != topics.telemetry.partitions {
            return Err(format!(
                "changelog {} has {} partitions but telemetry {} has {}: they must be equal, \
                 since the twins of input partition p are written to changelog partition p",
                topics.changelog.name,
                topics.changelog.partitions,
                topics.telemetry.name,
                topics.telemetry.partitions
            ));
        }
        if topics
            .changelog
            .config
            .get("cleanup.policy")
            .is_none_or(|p| !p.contains("compact"))
        {
            return Err(format!(
                "changelog {} must have cleanup.policy = \"compact\"",
                topics.changelog.name
            ));
        }
        for (spec, allowed) in [
            (&topics.changelog, "avro or confluent_avro"),
            (&topics.alerts, "avro or confluent_avro"),
            (
                &topics.dead_letter,
                "none: dead letters are the input bytes, untouched",
            ),
            (&topics.acks, "none: acknowledgements are JSON"),
            (&topics.desired, "json or avro"),
            (&topics.commands, "avro"),
            (&topics.command_events, "avro"),
        ] {
            let ok = match spec.format {
                None => true,
                Some(Format::Avro) => allowed.contains("avro"),
                Some(Format::ConfluentAvro) => allowed.contains("confluent_avro"),
                Some(Format::Json) => allowed.starts_with("json"),
            };
            if !ok {
                return Err(format!("topic {}: format must be {allowed}", spec.name));
            }
        }
        if let Some(history) = &topics.history {
            if history.partitions != topics.telemetry.partitions {
                return Err(format!(
                    "history {} has {} partitions but telemetry {} has {}: they must be equal, \
                     since a twin's versions go to the partition number of its changelog records",
                    history.name,
                    history.partitions,
                    topics.telemetry.name,
                    topics.telemetry.partitions
                ));
            }
            if history
                .config
                .get("cleanup.policy")
                .is_some_and(|p| p.contains("compact"))
            {
                return Err(format!(
                    "history {} must not be compacted (cleanup.policy = \"delete\"): compaction keeps only each twin's last version",
                    history.name
                ));
            }
            if history.format.is_some() {
                return Err(format!(
                    "topic {}: format must be none: the history has the changelog's records, in its format",
                    history.name
                ));
            }
        }
        let names: HashSet<_> = topics.all().iter().map(|t| t.name.as_str()).collect();
        if names.len() != topics.all().len() {
            return Err("every topic must have a name of its own".into());
        }
        for (companion, what) in [
            (&topics.acks, "acknowledgements"),
            (&topics.desired, "desired-state writes"),
        ] {
            if companion.partitions != topics.telemetry.partitions {
                return Err(format!(
                    "topic {} has {} partitions but telemetry {} has {}: they must be equal, \
                     since an asset's {what} are applied by the owner of its telemetry partition",
                    companion.name,
                    companion.partitions,
                    topics.telemetry.name,
                    topics.telemetry.partitions
                ));
            }
        }
        let model = Model {
            properties,
            active_when,
            time,
            desired,
        };
        for (at, action) in actions {
            let rule: &mut Rule = &mut rules[at];
            for (name, value) in &action.desired {
                let what = format!("rule {}: on_raise.desired.{name}", rule.code);
                let index = model
                    .property(name)
                    .filter(|i| model.properties[*i].writable)
                    .ok_or_else(|| format!("{what}: not a [desired.properties] property"))?;
                let kind = model.properties[index].kind;
                let value = match (value, kind) {
                    (toml::Value::Float(v), PropKind::Double | PropKind::Float) => {
                        Value::Double(*v)
                    }
                    (toml::Value::Integer(v), PropKind::Double | PropKind::Float) => {
                        Value::Double(*v as f64)
                    }
                    (toml::Value::Integer(v), PropKind::Long | PropKind::Int) => Value::Long(*v),
                    (toml::Value::Boolean(b), PropKind::Bool) => Value::Bool(*b),
                    (toml::Value::String(v), PropKind::Str) => Value::Str(v.as_str().into()),
                    _ => return Err(format!("{what}: takes a {} value", kind.avro_name())),
                };
                model
                    .check_value(index, &value)
                    .map_err(|e| format!("{what}: {e}"))?;
                rule.on_raise.push((index, value));
            }
            rule.on_raise.sort_by_key(|(i, _)| *i);
        }
        Ok(Topology {
            topics,
            model,
            rules: RuleSet { rules },
            codec,
            telemetry_schema,
            twin_schema,
        })
    }

    /// The model and its rules, to step twins with.
    pub fn core(&self) -> crate::step::Core<'_> {
        crate::step::Core {
            model: &self.model,
            rules: &self.rules,
        }
    }

    /// A human-readable account of the processing graph and the topics.
    pub fn describe(&self) -> String {
        let t = &self.topics;
        let mut s = String::new();
        let _ = writeln!(s, "Processing graph");
        let _ = writeln!(
            s,
            "  {} ({:?}, {} partitions)\n    -> decode ({}) -> validate -> merge into twin (RocksDB, per partition)\n    -> rules ({}) -> outputs:",
            t.telemetry.name,
            t.telemetry_format(),
            t.telemetry.partitions,
            self.telemetry_schema.display(),
            self.rules.rules.len()
        );
        let _ = writeln!(
            s,
            "       {}   full twin after each change ({})",
            t.changelog.name,
            self.twin_schema.display()
        );
        if let Some(history) = &t.history {
            let _ = writeln!(
                s,
                "       {}   every twin version, the changelog's records kept by time",
                history.name
            );
        }
        let _ = writeln!(
            s,
            "       {}   RAISED / CLEARED / ACKNOWLEDGED alert events (schemas/alert_event.avsc)",
            t.alerts.name
        );
        let _ = writeln!(
            s,
            "       {}   records that could not be applied, reason in headers",
            t.dead_letter.name
        );
        let _ = writeln!(
            s,
            "       {}   commands for devices (schemas/command.avsc)\n       {}   command transitions (schemas/command_event.avsc)",
            t.commands.name, t.command_events.name
        );
        let _ = writeln!(
            s,
            "  {} (JSON acknowledgements, partition p read with telemetry partition p)\n    -> mark the active alert (or the device's command) in the twin -> changelog, ACKNOWLEDGED (or command) event",
            t.acks.name
        );
        let _ = writeln!(
            s,
            "  {} ({:?} desired-state writes, partition p read with telemetry partition p)\n    -> set desired values (If-Match on desired_version) -> changelog, command, command events",
            t.desired.name,
            t.desired_format()
        );
        let _ = writeln!(s, "\nModel properties");
        for p in &self.model.properties {
            let _ = writeln!(
                s,
                "  {:<20} {:?}{}{}",
                p.name,
                p.kind,
                if p.writable {
                    format!("  writable (tolerance {})", p.tolerance)
                } else {
                    String::new()
                },
                match (p.min, p.max) {
                    (None, None) => String::new(),
                    (min, max) => format!(
                        "  valid {}..{}",
                        min.map_or("".into(), |v| v.to_string()),
                        max.map_or("".into(), |v| v.to_string())
                    ),
                }
            );
        }
        let _ = writeln!(s, "\nRules");
        for r in &self.rules.rules {
            let clear = r
                .clear_threshold
                .map_or(String::new(), |c| format!(", clear at {c}"));
            let hold = r.min_duration.map_or(String::new(), |d| {
                format!(", held for {}", humantime::format_duration(ms(d)))
            });
            let action: Vec<String> = r
                .on_raise
                .iter()
                .map(|(i, v)| format!("{} = {v:?}", self.model.properties[*i].name))
                .collect();
            let hold = if action.is_empty() {
                hold
            } else {
                format!("{hold}; on raise, desired {}", action.join(", "))
            };
            let _ = writeln!(
                s,
                "  {:<16} {:<8} {} {} {}{clear}{hold}",
                r.code,
                r.severity,
                r.property_name,
                r.op.symbol(),
                r.threshold
            );
        }
        let time = &self.model.time;
        let _ = writeln!(s, "\nTime");
        for (what, v) in [
            ("allowed lateness", time.allowed_lateness),
            ("max future", time.max_future),
            ("idle after", time.idle_after),
            ("offline after", time.offline_after),
            ("retire after", time.retire_after),
            ("refuse deleted", time.refuse_deleted_for),
        ] {
            let v = v.map_or("off".to_owned(), |d| {
                humantime::format_duration(ms(d)).to_string()
            });
            let _ = writeln!(s, "  {what:<16} {v}");
        }
        let _ = writeln!(s, "\nTopics");
        for spec in t.all() {
            let config: Vec<_> = spec
                .config
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(
                s,
                "  {:<20} partitions={} replication={} {}",
                spec.name,
                spec.partitions,
                spec.replication_factor,
                config.join(" ")
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn shipped_topologies_load() {
        for model in ["vehicle", "pump"] {
            let t = Topology::load(&TopologyConfig::shipped(&root(), model)).unwrap();
            assert!(!t.rules.rules.is_empty());
            assert!(t.describe().contains(&t.topics.changelog.name));
        }
    }

    #[test]
    fn mismatched_partition_counts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let topics = std::fs::read_to_string(root().join("topology/topics.toml")).unwrap();
        let path = dir.path().join("topics.toml");
        std::fs::write(
            &path,
            topics.replacen("partitions = 4", "partitions = 8", 1),
        )
        .unwrap();
        let paths = TopologyConfig {
            topics: path,
            ..TopologyConfig::shipped(&root(), "vehicle")
        };
        let err = Topology::load(&paths).unwrap_err().to_string();
        assert!(err.contains("must be equal"), "{err}");
    }

    #[test]
    fn rules_on_unknown_properties_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let model = std::fs::read_to_string(root().join("topology/vehicle.toml"))
            .unwrap()
            .replace("../schemas", &root().join("schemas").display().to_string())
            .replace("property = \"speed_kmh\"", "property = \"velocity\"");
        let path = dir.path().join("vehicle.toml");
        std::fs::write(&path, model).unwrap();
        let paths = TopologyConfig {
            model: path,
            ..TopologyConfig::shipped(&root(), "vehicle")
        };
        let err = Topology::load(&paths).unwrap_err().to_string();
        assert!(err.contains("'velocity'"), "{err}");
    }
}
