//! The Confluent wire format: a zero magic byte, the writer schema's registry id (4 bytes,
//! big-endian), then the Avro datum.
//!
//! [`WriterSchemas`] remembers, per registry id, how to read a datum written with that
//! schema into the model: directly when the writer schema is the model's own (the hot path),
//! through Avro schema resolution when it differs but is compatible (fields added or removed
//! with defaults), or not at all. It is filled from outside (see `crate::registry`); this
//! module does no IO.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::writer::datum::GenericDatumWriter;

use crate::error::{Error, Result};

/// The first byte of every Confluent-framed value.
pub const MAGIC: u8 = 0;

/// The 5-byte frame header of schema `id`.
pub fn header(id: u32) -> [u8; 5] {
    let b = id.to_be_bytes();
    [MAGIC, b[0], b[1], b[2], b[3]]
}

/// Splits a framed value into its schema id and Avro datum.
///
/// # Errors
/// `Error::Decode` when the value is not in the Confluent wire format.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8])> {
    match bytes {
        [MAGIC, a, b, c, d, rest @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), rest)),
        [] => Err(Error::Decode("empty value".into())),
        [m, ..] if *m != MAGIC => Err(Error::Decode(format!(
            "not in the Confluent wire format: first byte is {m}, not the magic byte 0"
        ))),
        _ => Err(Error::Decode(format!(
            "not in the Confluent wire format: {} bytes, shorter than the 5-byte header",
            bytes.len()
        ))),
    }
}

/// How a datum of one writer schema is read as the model's schema (telemetry or twin).
#[derive(Debug)]
pub enum Reading {
    /// The writer schema is the model's own: decode the bytes as they are.
    Direct,
    /// A different but compatible schema: resolve to the model's schema, then decode. (Where
    /// compatibility is partial, e.g. unions that overlap only in part, a record that cannot
    /// be resolved is a decode error of its own, as Avro resolution defines.)
    Resolve(Schema),
    /// Not readable as the model's schema; the reason goes into the dead letter.
    Unreadable(String),
}

/// A registry id's schema, as far as the model is concerned.
#[derive(Debug)]
pub struct Writer {
    /// As a telemetry reading.
    pub telemetry: Reading,
    /// As a twin (changelog records, for restore).
    pub twin: Reading,
}

impl Writer {
    /// Works out how to read a datum written with `text` (from the registry) as the model's
    /// `telemetry` and `twin` schemas.
    pub fn new(text: &str, telemetry: &Schema, twin: &Schema) -> Writer {
        let schema = match Schema::parse_str(text) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("the registry's schema does not parse: {e}");
                return Writer {
                    telemetry: Reading::Unreadable(why.clone()),
                    twin: Reading::Unreadable(why),
                };
            }
        };
        let reading = |reader: &Schema, what: &str| {
            if schema.canonical_form() == reader.canonical_form() {
                return Reading::Direct;
            }
            match SchemaCompatibility::can_read(&schema, reader) {
                Ok(_) => Reading::Resolve(schema.clone()),
                Err(e) => Reading::Unreadable(format!(
                    "written with a schema the {what} schema cannot read: {e}"
                )),
            }
        };
        Writer {
            telemetry: reading(telemetry, "telemetry"),
            twin: reading(twin, "twin"),
        }
    }

    /// A schema id the registry does not know.
    pub fn unknown(id: u32) -> Writer {
        let why = format!("schema id {id} is not in the schema registry");
        Writer {
            telemetry: Reading::Unreadable(why.clone()),
            twin: Reading::Unreadable(why),
        }
    }
}

/// Writer schemas by registry id, shared by every partition of an instance.
#[derive(Clone, Debug, Default)]
pub struct WriterSchemas {
    by_id: Arc<RwLock<HashMap<u32, Arc<Writer>>>>,
}

impl WriterSchemas {
    /// The writer of `id`, if known.
    pub fn get(&self, id: u32) -> Option<Arc<Writer>> {
        self.by_id.read().expect("writers lock").get(&id).cloned()
    }

    /// Remembers the writer of `id`.
    pub fn insert(&self, id: u32, writer: Writer) {
        self.by_id
            .write()
            .expect("writers lock")
            .insert(id, Arc::new(writer));
    }
}

/// Resolves `datum` (written with `writer`) to `reader` and re-encodes it with `reader`, so
/// the model's own decoder can read it. Only for writer schemas that differ from the model's.
///
/// # Errors
/// `Error::Decode` when the datum does not match its writer schema.
pub fn resolve(datum: &[u8], writer: &Schema, reader: &Schema) -> Result<Vec<u8>> {
    let value = GenericDatumReader::builder(writer)
        .maybe_reader_schema(Some(reader))
        .build()
        .and_then(|r| r.read_value(&mut &datum[..]))
        .map_err(|e| Error::Decode(format!("Avro schema resolution: {e}")))?;
    GenericDatumWriter::builder(reader)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(|e| Error::Decode(format!("schema resolution: {e}")))
}
