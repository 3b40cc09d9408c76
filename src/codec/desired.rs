//! The twin's desired-state fields in Avro: `desired_version`, `desired`, `delta` and
//! `commands`, appended to a twin schema as optional fields (default null), so that twins
//! stored or written before them still read, with no desired state.
//!
//! Their shape is fixed for every model: a twin schema declares them exactly as
//! [`FIELDS_SCHEMA`] does (checked by parsing canonical form) or not at all.

use apache_avro::Schema;

use super::avro::{Cursor, ReadResult, put_bool, put_double, put_long, put_str};
use super::{opt_long, put_opt_long};
use crate::twin::{Command, CommandEvent, CommandState, DesiredValue, Twin, Value};

/// The names of the desired-state fields, in the order a twin schema appends them.
pub const DESIRED_FIELDS: [&str; 4] = ["desired_version", "desired", "delta", "commands"];

/// The desired-state fields as a twin schema must declare them (docs aside).
pub const FIELDS_SCHEMA: &str = r#"{"type": "record", "name": "DesiredFields", "namespace": "io.twinflow", "fields": [
  {"name": "desired_version", "type": ["null", "long"], "default": null},
  {"name": "desired", "type": ["null", {"type": "array", "items": {
    "type": "record", "name": "DesiredValue", "namespace": "io.twinflow", "fields": [
      {"name": "property", "type": "string"},
      {"name": "value", "type": ["double", "long", "boolean", "string"]},
      {"name": "set_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
      {"name": "set_by", "type": "string"},
      {"name": "command_id", "type": "string"}]}}], "default": null},
  {"name": "delta", "type": ["null", {"type": "array", "items": "string"}], "default": null},
  {"name": "commands", "type": ["null", {"type": "array", "items": {
    "type": "record", "name": "OpenCommand", "namespace": "io.twinflow", "fields": [
      {"name": "command_id", "type": "string"},
      {"name": "desired_version", "type": "long"},
      {"name": "state", "type": {"type": "enum", "name": "CommandState", "namespace": "io.twinflow",
        "symbols": ["ISSUED", "DELIVERED", "CONVERGED", "REJECTED", "TIMED_OUT", "SUPERSEDED"]}},
      {"name": "issued_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
      {"name": "expires_at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}], "default": null},
      {"name": "attempt", "type": "long"},
      {"name": "set_by", "type": "string"}]}}], "default": null}
]}"#;

/// The desired-state field `name` (one of [`DESIRED_FIELDS`]) of a twin schema, checked
/// against [`FIELDS_SCHEMA`].
///
/// # Errors
/// A message when the field does not have the shape of its name.
pub fn field(name: &str, schema: &Schema) -> Result<Field, String> {
    let at = DESIRED_FIELDS
        .iter()
        .position(|f| *f == name)
        .ok_or_else(|| format!("'{name}' is not a desired-state field"))?;
    let Ok(Schema::Record(expected)) = Schema::parse_str(FIELDS_SCHEMA) else {
        unreachable!("FIELDS_SCHEMA is a record schema");
    };
    let wanted = &expected.fields[at].schema;
    if schema.canonical_form() != wanted.canonical_form() {
        return Err(format!(
            "twin schema field '{name}' must be {} (see schemas/vehicle_twin.avsc)",
            wanted.canonical_form()
        ));
    }
    Ok([
        Field::Version,
        Field::Desired,
        Field::Delta,
        Field::Commands,
    ][at])
}

/// One desired-state field of the twin schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `desired_version`: null until the first accepted write.
    Version,
    /// `desired`: null when nothing is desired.
    Desired,
    /// `delta`: null when every desired value is reached.
    Delta,
    /// `commands`: null when no command is open.
    Commands,
}

/// Writes `field` of `twin`; `names` gives property names.
pub fn put<'a>(buf: &mut Vec<u8>, field: Field, twin: &Twin, names: &dyn Fn(usize) -> &'a str) {
    let delta = twin.delta;
    match field {
        Field::Version => put_opt_long(
            buf,
            (twin.desired_version > 0).then_some(twin.desired_version),
        ),
        Field::Desired => put_array(buf, twin.desired.len(), |buf| {
            for d in &twin.desired {
                put_str(buf, names(d.property));
                put_value(buf, &d.value);
                put_long(buf, d.set_at);
                put_str(buf, &d.set_by);
                put_str(buf, &d.command_id);
            }
        }),
        Field::Delta => put_array(buf, delta.count_ones() as usize, |buf| {
            for index in (0..128).filter(|i| delta & (1u128 << i) != 0) {
                put_str(buf, names(index));
            }
        }),
        Field::Commands => put_array(buf, twin.commands.len(), |buf| {
            for c in &twin.commands {
                put_str(buf, &c.command_id);
                put_long(buf, c.desired_version);
                put_long(buf, state_index(c.state));
                put_long(buf, c.issued_at);
                put_opt_long(buf, c.expires_at);
                put_long(buf, c.attempt);
                put_str(buf, &c.set_by);
            }
        }),
    }
}

/// Reads `field` into `twin`; `index` finds a property by name.
///
/// # Errors
/// What is wrong with the bytes.
pub fn read(
    c: &mut Cursor<'_>,
    field: Field,
    twin: &mut Twin,
    index: &dyn Fn(&str) -> Option<usize>,
) -> ReadResult<()> {
    match field {
        Field::Version => twin.desired_version = opt_long(c)?.unwrap_or(0),
        Field::Desired => read_array(c, |c| {
            let name = c.str()?;
            let property = index(name).ok_or_else(|| format!("unknown property '{name}'"))?;
            twin.desired.push(DesiredValue {
                property,
                value: read_value(c)?,
                set_at: c.long()?,
                set_by: c.str()?.to_owned(),
                command_id: c.str()?.to_owned(),
            });
            Ok(())
        })?,
        Field::Delta => read_array(c, |c| {
            let name = c.str()?;
            let property = index(name).ok_or_else(|| format!("unknown property '{name}'"))?;
            twin.delta |= 1u128 << property;
            Ok(())
        })?,
        Field::Commands => read_array(c, |c| {
            let command_id = c.str()?.to_owned();
            let desired_version = c.long()?;
            let s = c.long()?;
            let state = usize::try_from(s)
                .ok()
                .and_then(|s| CommandState::ALL.get(s).copied())
                .ok_or_else(|| format!("unknown command state {s}"))?;
            twin.commands.push(Command {
                command_id,
                desired_version,
                state,
                issued_at: c.long()?,
                expires_at: opt_long(c)?,
                attempt: c.long()?,
                set_by: c.str()?.to_owned(),
            });
            Ok(())
        })?,
    }
    Ok(())
}

/// The symbol index of `state` in the `CommandState` enum.
pub fn state_index(state: CommandState) -> i64 {
    CommandState::ALL
        .iter()
        .position(|s| *s == state)
        .expect("ALL lists every state") as i64
}

/// A `["null", array]` union: null when `len` is 0, else one block written by `items`.
pub(super) fn put_array(buf: &mut Vec<u8>, len: usize, items: impl FnOnce(&mut Vec<u8>)) {
    if len == 0 {
        return put_long(buf, 0);
    }
    put_long(buf, 1);
    put_long(buf, len as i64);
    items(buf);
    put_long(buf, 0);
}

/// Reads a `["null", array]` union, calling `item` per element.
pub(super) fn read_array<'a>(
    c: &mut Cursor<'a>,
    mut item: impl FnMut(&mut Cursor<'a>) -> ReadResult<()>,
) -> ReadResult<()> {
    match c.long()? {
        0 => return Ok(()),
        1 => {}
        b => return Err(format!("union branch {b}")),
    }
    loop {
        let n = c.block_count()?;
        if n == 0 {
            return Ok(());
        }
        for _ in 0..n {
            item(c)?;
        }
    }
}

/// A `["double", "long", "boolean", "string"]` union.
pub fn put_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Double(v) => {
            put_long(buf, 0);
            put_double(buf, *v);
        }
        Value::Long(v) => {
            put_long(buf, 1);
            put_long(buf, *v);
        }
        Value::Bool(v) => {
            put_long(buf, 2);
            put_bool(buf, *v);
        }
        Value::Str(v) => {
            put_long(buf, 3);
            put_str(buf, v);
        }
    }
}

/// Reads a `["double", "long", "boolean", "string"]` union.
fn read_value(c: &mut Cursor<'_>) -> ReadResult<Value> {
    Ok(match c.long()? {
        0 => Value::Double(c.double()?),
        1 => Value::Long(c.long()?),
        2 => Value::Bool(c.bool()?),
        3 => Value::Str(c.str()?.into()),
        b => return Err(format!("union branch {b}")),
    })
}

/// Appends the command record (schemas/command.avsc) of open command `command_id` of
/// `twin`: its values, all of them on the first attempt and those not reached yet on a
/// re-send. Returns false, writing nothing, if the twin has no such open command.
pub fn encode_command<'a>(
    twin: &Twin,
    command_id: &str,
    names: &dyn Fn(usize) -> &'a str,
    buf: &mut Vec<u8>,
) -> bool {
    let Some(c) = twin.commands.iter().find(|c| c.command_id == command_id) else {
        return false;
    };
    let values: Vec<&DesiredValue> = twin
        .desired
        .iter()
        .filter(|d| d.command_id == command_id)
        .filter(|d| c.attempt == 1 || twin.delta & (1u128 << d.property) != 0)
        .collect();
    put_str(buf, &c.command_id);
    put_str(buf, &twin.asset_id);
    put_long(buf, c.desired_version);
    put_long(buf, c.attempt);
    if !values.is_empty() {
        put_long(buf, values.len() as i64);
        for d in values {
            put_str(buf, names(d.property));
            put_value(buf, &d.value);
        }
    }
    put_long(buf, 0);
    put_long(buf, c.issued_at);
    put_opt_long(buf, c.expires_at);
    true
}

/// A command record (schemas/command.avsc) as read back: what the bridge publishes to a
/// device, and what simulated devices obey.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandRecord {
    /// The command's id.
    pub command_id: String,
    /// The asset.
    pub asset_id: String,
    /// The desired version the command's write made.
    pub desired_version: i64,
    /// 1 when issued, one more with each re-send.
    pub attempt: i64,
    /// Property name to desired value, in record order.
    pub values: Vec<(String, Value)>,
    /// When it was accepted (ms).
    pub issued_at: i64,
    /// When it times out (ms), if ever.
    pub expires_at: Option<i64>,
}

/// Reads a command record.
///
/// # Errors
/// What is wrong with the bytes.
pub fn decode_command(payload: &[u8]) -> ReadResult<CommandRecord> {
    let c = &mut Cursor::new(payload);
    let command_id = c.str()?.to_owned();
    let asset_id = c.str()?.to_owned();
    let desired_version = c.long()?;
    let attempt = c.long()?;
    let mut values = Vec::new();
    loop {
        let n = c.block_count()?;
        if n == 0 {
            break;
        }
        for _ in 0..n {
            let name = c.str()?.to_owned();
            values.push((name, read_value(c)?));
        }
    }
    let issued_at = c.long()?;
    let expires_at = opt_long(c)?;
    if c.remaining() != 0 {
        return Err(format!("{} bytes after the command", c.remaining()));
    }
    Ok(CommandRecord {
        command_id,
        asset_id,
        desired_version,
        attempt,
        values,
        issued_at,
        expires_at,
    })
}

/// Appends `event` of `asset_id` at twin version `twin_version` as a command event record
/// (schemas/command_event.avsc).
pub fn encode_command_event(
    event: &CommandEvent,
    asset_id: &str,
    twin_version: i64,
    buf: &mut Vec<u8>,
) {
    put_str(buf, &event.command_id);
    put_str(buf, asset_id);
    put_long(buf, state_index(event.state));
    put_long(buf, event.desired_version);
    put_long(buf, event.at);
    put_long(buf, twin_version);
    super::put_opt_str(buf, Some(&event.set_by));
    super::put_opt_str(buf, event.detail.as_deref());
}
