//! The twin's forecast windows in Avro: the optional `forecasts` field (default null), the
//! readings each forecast rule fits its line through, so that a forecast survives a restore.
//! Its shape is fixed for every model: a twin schema declares it exactly as
//! [`FIELD_SCHEMA`] does (checked by parsing canonical form) or not at all; a model with a
//! forecast rule needs it.

use apache_avro::Schema;

use super::avro::{Cursor, ReadResult, put_double, put_long, put_str};
use super::desired::{put_array, read_array};
use crate::twin::{ForecastWindow, Twin};

/// The name of the field.
pub const FIELD: &str = "forecasts";

/// A record holding the field as a twin schema must declare it.
pub const FIELD_SCHEMA: &str = r#"{"type": "record", "name": "ForecastsField", "namespace": "io.twinflow", "fields": [
  {"name": "forecasts", "type": ["null", {"type": "array", "items": {
    "type": "record", "name": "ForecastWindow", "namespace": "io.twinflow", "fields": [
      {"name": "code", "type": "string"},
      {"name": "points", "type": {"type": "array", "items": {
        "type": "record", "name": "ForecastPoint", "namespace": "io.twinflow", "fields": [
          {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
          {"name": "value", "type": "double"}]}}}]}}], "default": null}
]}"#;

/// Checks the twin schema's `forecasts` field against [`FIELD_SCHEMA`].
///
/// # Errors
/// A message when it has another shape.
pub fn check(schema: &Schema) -> Result<(), String> {
    let Ok(Schema::Record(expected)) = Schema::parse_str(FIELD_SCHEMA) else {
        unreachable!("FIELD_SCHEMA is a record schema");
    };
    let wanted = &expected.fields[0].schema;
    if schema.canonical_form() != wanted.canonical_form() {
        return Err(format!(
            "twin schema field '{FIELD}' must be {} (see schemas/vehicle_twin.avsc)",
            wanted.canonical_form()
        ));
    }
    Ok(())
}

/// Writes the twin's forecast windows.
pub fn put(buf: &mut Vec<u8>, twin: &Twin) {
    put_array(buf, twin.forecasts.len(), |buf| {
        for w in &twin.forecasts {
            put_str(buf, &w.code);
            if !w.points.is_empty() {
                put_long(buf, w.points.len() as i64);
                for (at, value) in &w.points {
                    put_long(buf, *at);
                    put_double(buf, *value);
                }
            }
            put_long(buf, 0);
        }
    });
}

/// Reads the twin's forecast windows.
///
/// # Errors
/// What is wrong with the bytes.
pub fn read(c: &mut Cursor<'_>, twin: &mut Twin) -> ReadResult<()> {
    read_array(c, |c| {
        let mut window = ForecastWindow {
            code: c.str()?.to_owned(),
            points: Vec::new(),
        };
        loop {
            let n = c.block_count()?;
            if n == 0 {
                break;
            }
            for _ in 0..n {
                window.points.push((c.long()?, c.double()?));
            }
        }
        twin.forecasts.push(window);
        Ok(())
    })
}
