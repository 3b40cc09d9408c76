//! `twinflow export`: the twin versions of a time window, read from the history topic, as
//! Parquet files for training.
//!
//! - `twins/date=YYYY-MM-DD/part-NNNNN.parquet`: one row per twin version made that day
//!   (UTC): `asset_id`, `version`, `status` (`DELETED` for a deletion), `event_time`,
//!   `last_seen`, `updated_at`, `active_alerts` (codes), then each model property as a
//!   column of its type with its event time beside it (`<property>_time`).
//! - `alerts/part-00000.parquet`: one row per alert the versions show: raised (event time),
//!   acknowledged (processing time, by whom), cleared (the event time of the version that
//!   no longer lists it, or the deletion's time with reason `deleted`); null while it was
//!   still raised at the window's end. Labels for time-to-failure models.
//!
//! Versions are chosen by when twinflow made them: a history record's timestamp is its
//! twin's `updated_at` (processing time). Each partition is read from the first offset at
//! or after `from` by the broker's time index to the last before `to`, `read_committed`, so
//! an aborted transaction's versions are never exported. A broker that cannot look offsets
//! up by time is read from its start; records are filtered by timestamp either way.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::codec::rfc3339;
use crate::error::{Error, Result};
use crate::headers;
use crate::kafka::{Clients, OutputReader};
use crate::registry::{Registry, decode_fetching};
use crate::rules::DELETED;
use crate::topology::Topology;
use crate::twin::{ActiveAlert, Model, PropKind, Twin, Value};

/// Rows per record batch (and so at most per date buffered before a write).
const BATCH_ROWS: usize = 8192;
/// Dates written at once; the least recently written is closed beyond them (its later rows
/// go to a new part file), so memory stays bounded on a long export.
const OPEN_DATES: usize = 8;

/// What to export.
pub struct Export<'a> {
    /// The topology: the history topic and the model.
    pub topology: &'a Topology,
    /// The Kafka clients' settings.
    pub clients: &'a Clients,
    /// For a Confluent-framed history.
    pub registry: Option<&'a Registry>,
    /// Versions made at or after this (epoch ms)...
    pub from: i64,
    /// ...and before this.
    pub to: i64,
    /// An empty or missing directory.
    pub out: &'a Path,
    /// Print progress to stderr every this long.
    pub progress: Option<Duration>,
}

/// What an export wrote.
#[derive(Debug, Default)]
pub struct Summary {
    /// Twin version rows.
    pub versions: u64,
    /// Alert rows.
    pub alerts: u64,
    /// Parquet files written.
    pub files: Vec<PathBuf>,
    /// Records read from the history topic (the window's and around it).
    pub records: u64,
    /// Records of the window left out: no UTF-8 key, or not a twin of this model.
    pub skipped: u64,
}

/// Exports the window; see the module documentation. Blocking: run it off the async
/// runtime (`runtime` serves the registry's fetches).
///
/// # Errors
/// `Config` for a topology without a history topic, a model whose column names clash or an
/// output directory that is not empty; Kafka, decoding and file errors.
pub fn export(e: &Export<'_>, runtime: &tokio::runtime::Handle) -> Result<Summary> {
    let history = e.topology.topics.history.as_ref().ok_or_else(|| {
        Error::Config("the topology has no [history] topic: there is nothing to export".into())
    })?;
    if e.from >= e.to {
        return Err(Error::Config(format!(
            "--from {} must be before --to {}",
            rfc3339(e.from),
            rfc3339(e.to)
        )));
    }
    let empty = match std::fs::read_dir(e.out) {
        Ok(mut entries) => entries.next().is_none(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => true,
        Err(err) => return Err(Error::Config(format!("{}: {err}", e.out.display()))),
    };
    if !empty {
        return Err(Error::Config(format!(
            "{} is not empty: export into a new directory",
            e.out.display()
        )));
    }
    let model = &e.topology.model;
    let columns = Columns::new(model)?;
    let mut twins = Files::new(e.out.join("twins"), columns.schema.clone());
    let mut alerts = AlertTable::new(e.out.join("alerts"))?;
    let mut summary = Summary::default();

    let mut config = e.clients.reader("twinflow-export", true);
    config.set("isolation.level", "read_committed");
    crate::kafka::window_reader(&mut config);
    let reader = OutputReader::new(&config)?;
    let topic = history.name.as_str();
    let window = reader.window(topic, history.partitions, e.from, e.to)?;
    let total: i64 = window.iter().map(|(_, a, b)| b - a).sum();
    let mut ends = reader.read_window(topic, &window)?;
    let started = Instant::now();
    let mut printed = Instant::now();
    let mut read = 0i64;
    let codec = &e.topology.codec;
    // Rows not yet written, by UTC day number.
    let mut buffers: HashMap<i64, Columns> = HashMap::new();
    while let Some(m) = reader.next_in(&mut ends)? {
        read += 1;
        summary.records += 1;
        if let Some(every) = e.progress
            && read % 4096 == 0
            && printed.elapsed() >= every
        {
            printed = Instant::now();
            let rate = summary.versions as f64 / started.elapsed().as_secs_f64();
            eprintln!(
                "export: {} versions, {} alerts closed, {:.0}% of the window read, {rate:.0} versions/s",
                summary.versions,
                alerts.rows,
                100.0 * read as f64 / total.max(1) as f64
            );
        }
        let at = m.timestamp().unwrap_or(i64::MIN);
        if at < e.from || at >= e.to {
            continue;
        }
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            summary.skipped += 1;
            continue;
        };
        let version = match m.value() {
            Some(v) => {
                match decode_fetching(e.registry, codec, runtime, |c| c.decode_changelog_twin(v)) {
                    Ok(twin) => Version::Twin(twin),
                    // Not a twin of this model (another writer's record, an older model): it is
                    // left out and counted, as the restore does.
                    Err(err) if err.disposition() == crate::error::Disposition::Skip => {
                        if summary.skipped == 0 {
                            eprintln!(
                                "export: partition {} offset {}: not a twin of this model, left out: {err}",
                                m.partition(),
                                m.offset()
                            );
                        }
                        summary.skipped += 1;
                        continue;
                    }
                    Err(err) => return Err(err),
                }
            }
            None => Version::Deleted {
                version: m.number(headers::DELETED_VERSION),
                at: m.number(headers::DELETED_AT).unwrap_or(at),
            },
        };
        alerts.track(key, &version)?;
        let day = version.updated_at().div_euclid(DAY);
        let rows = buffers
            .entry(day)
            .or_insert_with(|| Columns::new(model).expect("checked above"));
        rows.push(key, &version, model);
        summary.versions += 1;
        if rows.len == BATCH_ROWS {
            let batch = rows.finish()?;
            twins.write(&date(day), &batch)?;
        }
        if buffers.len() > OPEN_DATES * 4 {
            // Dates long written: flush them, keeping memory bounded.
            for (day, mut rows) in buffers.drain() {
                if rows.len > 0 {
                    twins.write(&date(day), &rows.finish()?)?;
                }
            }
        }
    }
    reader.close_in_background();
    for (day, mut rows) in buffers.drain() {
        if rows.len > 0 {
            twins.write(&date(day), &rows.finish()?)?;
        }
    }
    summary.files = twins.close()?;
    let (alert_files, alert_rows) = alerts.close_all()?;
    summary.files.extend(alert_files);
    summary.alerts = alert_rows;
    Ok(summary)
}

/// Milliseconds in a day.
const DAY: i64 = 86_400_000;

/// The date of UTC day number `day` (days since the epoch), `YYYY-MM-DD`.
fn date(day: i64) -> String {
    rfc3339(day.saturating_mul(DAY))[..10].to_owned()
}

/// One record of the history: a twin version, or a deletion.
enum Version {
    Twin(Twin),
    Deleted { version: Option<i64>, at: i64 },
}

impl Version {
    fn updated_at(&self) -> i64 {
        match self {
            Version::Twin(t) => t.updated_at,
            Version::Deleted { at, .. } => *at,
        }
    }
}

fn utc() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn timestamps() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

/// A property's column builder.
enum Values {
    Double(Float64Builder),
    Long(Int64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder),
}

/// The columns of the twins table, being filled.
struct Columns {
    schema: SchemaRef,
    asset_id: StringBuilder,
    version: Int64Builder,
    status: StringBuilder,
    event_time: TimestampMillisecondBuilder,
    last_seen: TimestampMillisecondBuilder,
    updated_at: TimestampMillisecondBuilder,
    active_alerts: ListBuilder<StringBuilder>,
    props: Vec<(Values, TimestampMillisecondBuilder)>,
    len: usize,
}

impl Columns {
    fn new(model: &Model) -> Result<Columns> {
        let mut fields = vec![
            Field::new("asset_id", DataType::Utf8, false),
            Field::new("version", DataType::Int64, true),
            Field::new("status", DataType::Utf8, false),
            Field::new("event_time", utc(), true),
            Field::new("last_seen", utc(), true),
            Field::new("updated_at", utc(), false),
            Field::new(
                "active_alerts",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ];
        let mut props = Vec::new();
        for p in &model.properties {
            let (kind, values) = match p.kind {
                PropKind::Double | PropKind::Float => {
                    (DataType::Float64, Values::Double(Float64Builder::new()))
                }
                PropKind::Long | PropKind::Int => {
                    (DataType::Int64, Values::Long(Int64Builder::new()))
                }
                PropKind::Bool => (DataType::Boolean, Values::Bool(BooleanBuilder::new())),
                PropKind::Str => (DataType::Utf8, Values::Str(StringBuilder::new())),
            };
            fields.push(Field::new(&p.name, kind, true));
            fields.push(Field::new(format!("{}_time", p.name), utc(), true));
            props.push((values, timestamps()));
        }
        let mut names = std::collections::HashSet::new();
        if let Some(clash) = fields.iter().find(|f| !names.insert(f.name().clone())) {
            return Err(Error::Config(format!(
                "the export's column {} is twice in the model's columns (a property and another's _time?)",
                clash.name()
            )));
        }
        Ok(Columns {
            schema: Arc::new(Schema::new(fields)),
            asset_id: StringBuilder::new(),
            version: Int64Builder::new(),
            status: StringBuilder::new(),
            event_time: timestamps(),
            last_seen: timestamps(),
            updated_at: timestamps(),
            active_alerts: ListBuilder::new(StringBuilder::new()),
            props,
            len: 0,
        })
    }

    fn push(&mut self, asset_id: &str, version: &Version, model: &Model) {
        self.asset_id.append_value(asset_id);
        self.len += 1;
        let twin = match version {
            Version::Twin(twin) => twin,
            Version::Deleted { version, at } => {
                self.version.append_option(*version);
                self.status.append_value("DELETED");
                self.event_time.append_null();
                self.last_seen.append_null();
                self.updated_at.append_value(*at);
                self.active_alerts.append(true);
                for (values, times) in &mut self.props {
                    match values {
                        Values::Double(b) => b.append_null(),
                        Values::Long(b) => b.append_null(),
                        Values::Bool(b) => b.append_null(),
                        Values::Str(b) => b.append_null(),
                    }
                    times.append_null();
                }
                return;
            }
        };
        self.version.append_value(twin.version);
        self.status.append_value(twin.status.symbol());
        self.event_time.append_value(twin.event_time);
        self.last_seen.append_value(twin.last_seen);
        self.updated_at.append_value(twin.updated_at);
        for a in &twin.alerts {
            self.active_alerts.values().append_value(&a.code);
        }
        self.active_alerts.append(true);
        debug_assert_eq!(model.properties.len(), self.props.len());
        for (prop, (values, times)) in twin.props.iter().zip(&mut self.props) {
            let value = prop.as_ref().map(|p| &p.value);
            match (values, value) {
                (Values::Double(b), Some(v)) => b.append_option(v.as_f64()),
                (Values::Long(b), Some(Value::Long(v))) => b.append_value(*v),
                (Values::Bool(b), Some(Value::Bool(v))) => b.append_value(*v),
                (Values::Str(b), Some(Value::Str(v))) => b.append_value(v),
                (Values::Double(b), None) => b.append_null(),
                (Values::Long(b), _) => b.append_null(),
                (Values::Bool(b), _) => b.append_null(),
                (Values::Str(b), _) => b.append_null(),
            }
            times.append_option(prop.as_ref().map(|p| p.time));
        }
    }

    /// The rows so far as a batch; the builders start over.
    fn finish(&mut self) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.asset_id.finish()),
            Arc::new(self.version.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.event_time.finish()),
            Arc::new(self.last_seen.finish()),
            Arc::new(self.updated_at.finish()),
            Arc::new(self.active_alerts.finish()),
        ];
        for (values, times) in &mut self.props {
            columns.push(match values {
                Values::Double(b) => Arc::new(b.finish()),
                Values::Long(b) => Arc::new(b.finish()),
                Values::Bool(b) => Arc::new(b.finish()),
                Values::Str(b) => Arc::new(b.finish()),
            });
            columns.push(Arc::new(times.finish()));
        }
        self.len = 0;
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// The twins table's files: one writer per date, at most [`OPEN_DATES`] open.
struct Files {
    dir: PathBuf,
    schema: SchemaRef,
    /// Open writers, the most recently written last.
    open: VecDeque<(String, ArrowWriter<File>)>,
    /// Part files made per date.
    parts: HashMap<String, u32>,
    written: Vec<PathBuf>,
}

fn properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("twinflow {}", env!("CARGO_PKG_VERSION")))
        .build()
}

impl Files {
    fn new(dir: PathBuf, schema: SchemaRef) -> Files {
        Files {
            dir,
            schema,
            open: VecDeque::new(),
            parts: HashMap::new(),
            written: Vec::new(),
        }
    }

    fn write(&mut self, date: &str, batch: &RecordBatch) -> Result<()> {
        let at = match self.open.iter().position(|(d, _)| d == date) {
            Some(at) => at,
            None => {
                if self.open.len() == OPEN_DATES {
                    let (_, oldest) = self.open.pop_front().expect("full");
                    oldest.close()?;
                }
                let part = self.parts.entry(date.to_owned()).or_default();
                let dir = self.dir.join(format!("date={date}"));
                std::fs::create_dir_all(&dir)?;
                let path = dir.join(format!("part-{part:05}.parquet"));
                *part += 1;
                let file = File::create(&path)?;
                let writer = ArrowWriter::try_new(file, self.schema.clone(), Some(properties()))?;
                self.written.push(path);
                self.open.push_back((date.to_owned(), writer));
                self.open.len() - 1
            }
        };
        let entry = self.open.remove(at).expect("found");
        self.open.push_back(entry);
        let (_, writer) = self.open.back_mut().expect("just pushed");
        writer.write(batch)?;
        Ok(())
    }

    fn close(mut self) -> Result<Vec<PathBuf>> {
        for (_, w) in self.open.drain(..) {
            w.close()?;
        }
        Ok(self.written)
    }
}

/// One alert's life as the versions show it.
struct AlertRow {
    alert_id: String,
    asset_id: String,
    code: String,
    severity: &'static str,
    value: f64,
    threshold: f64,
    raised_at: i64,
    acknowledged_at: Option<i64>,
    acknowledged_by: Option<String>,
}

impl AlertRow {
    fn new(asset_id: &str, a: &ActiveAlert) -> AlertRow {
        AlertRow {
            alert_id: a.alert_id.clone(),
            asset_id: asset_id.to_owned(),
            code: a.code.clone(),
            severity: a.severity.symbol(),
            value: a.value,
            threshold: a.threshold,
            raised_at: a.raised_at,
            acknowledged_at: a.acknowledged_at,
            acknowledged_by: a.acknowledged_by.clone(),
        }
    }
}

/// The alerts table: alerts raised per asset as of its last version read, and the file.
struct AlertTable {
    path: PathBuf,
    raised: HashMap<String, Vec<AlertRow>>,
    builders: AlertColumns,
    writer: Option<ArrowWriter<File>>,
    rows: u64,
}

#[derive(Default)]
struct AlertColumns {
    alert_id: StringBuilder,
    asset_id: StringBuilder,
    code: StringBuilder,
    severity: StringBuilder,
    value: Float64Builder,
    threshold: Float64Builder,
    raised_at: TimestampMillisecondBuilder,
    acknowledged_at: TimestampMillisecondBuilder,
    acknowledged_by: StringBuilder,
    cleared_at: TimestampMillisecondBuilder,
    cleared_version: Int64Builder,
    cleared_reason: StringBuilder,
    len: usize,
}

fn alert_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("alert_id", DataType::Utf8, false),
        Field::new("asset_id", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, false),
        Field::new("severity", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("threshold", DataType::Float64, false),
        Field::new("raised_at", utc(), false),
        Field::new("acknowledged_at", utc(), true),
        Field::new("acknowledged_by", DataType::Utf8, true),
        Field::new("cleared_at", utc(), true),
        Field::new("cleared_version", DataType::Int64, true),
        Field::new("cleared_reason", DataType::Utf8, true),
    ]))
}

impl AlertTable {
    fn new(dir: PathBuf) -> Result<AlertTable> {
        Ok(AlertTable {
            path: dir.join("part-00000.parquet"),
            raised: HashMap::new(),
            builders: AlertColumns {
                raised_at: timestamps(),
                acknowledged_at: timestamps(),
                cleared_at: timestamps(),
                ..AlertColumns::default()
            },
            writer: None,
            rows: 0,
        })
    }

    /// Notes what version `v` of `asset_id` says of its alerts: those it no longer lists are
    /// cleared.
    fn track(&mut self, asset_id: &str, v: &Version) -> Result<()> {
        let before = self.raised.remove(asset_id).unwrap_or_default();
        match v {
            Version::Twin(twin) => {
                let mut now = Vec::with_capacity(twin.alerts.len());
                for row in before {
                    match twin.alerts.iter().find(|a| a.alert_id == row.alert_id) {
                        Some(a) => now.push(AlertRow::new(asset_id, a)),
                        None => self.close(row, Some((twin.event_time, twin.version, None)))?,
                    }
                }
                for a in &twin.alerts {
                    if !now.iter().any(|r| r.alert_id == a.alert_id) {
                        now.push(AlertRow::new(asset_id, a));
                    }
                }
                if !now.is_empty() {
                    self.raised.insert(asset_id.to_owned(), now);
                }
            }
            Version::Deleted { version, at } => {
                for row in before {
                    let version = version.unwrap_or_default();
                    self.close(row, Some((*at, version, Some(DELETED))))?;
                }
            }
        }
        Ok(())
    }

    /// Adds the row of an alert, cleared at `(time, version, reason)` or still raised.
    fn close(&mut self, row: AlertRow, cleared: Option<(i64, i64, Option<&str>)>) -> Result<()> {
        let b = &mut self.builders;
        b.alert_id.append_value(&row.alert_id);
        b.asset_id.append_value(&row.asset_id);
        b.code.append_value(&row.code);
        b.severity.append_value(row.severity);
        b.value.append_value(row.value);
        b.threshold.append_value(row.threshold);
        b.raised_at.append_value(row.raised_at);
        b.acknowledged_at.append_option(row.acknowledged_at);
        b.acknowledged_by
            .append_option(row.acknowledged_by.as_deref());
        b.cleared_at.append_option(cleared.map(|c| c.0));
        b.cleared_version.append_option(cleared.map(|c| c.1));
        b.cleared_reason.append_option(cleared.and_then(|c| c.2));
        b.len += 1;
        self.rows += 1;
        if b.len == BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let b = &mut self.builders;
        if b.len == 0 {
            return Ok(());
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(b.alert_id.finish()),
            Arc::new(b.asset_id.finish()),
            Arc::new(b.code.finish()),
            Arc::new(b.severity.finish()),
            Arc::new(b.value.finish()),
            Arc::new(b.threshold.finish()),
            Arc::new(b.raised_at.finish()),
            Arc::new(b.acknowledged_at.finish()),
            Arc::new(b.acknowledged_by.finish()),
            Arc::new(b.cleared_at.finish()),
            Arc::new(b.cleared_version.finish()),
            Arc::new(b.cleared_reason.finish()),
        ];
        b.len = 0;
        let schema = alert_schema();
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        if self.writer.is_none() {
            std::fs::create_dir_all(self.path.parent().expect("a file in a directory"))?;
            let file = File::create(&self.path)?;
            self.writer = Some(ArrowWriter::try_new(file, schema, Some(properties()))?);
        }
        self.writer.as_mut().expect("made above").write(&batch)?;
        Ok(())
    }

    /// Adds the alerts still raised at the window's end, and closes the file.
    fn close_all(mut self) -> Result<(Vec<PathBuf>, u64)> {
        let raised: Vec<AlertRow> = self.raised.drain().flat_map(|(_, rows)| rows).collect();
        for row in raised {
            self.close(row, None)?;
        }
        self.flush()?;
        match self.writer.take() {
            Some(w) => {
                w.close()?;
                Ok((vec![self.path], self.rows))
            }
            None => Ok((Vec::new(), 0)),
        }
    }
}
