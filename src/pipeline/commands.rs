//! Commands: inputs that act on twins instead of reporting readings. Today, alert
//! acknowledgements: key = asset id, value = JSON `{"alert_id": "...", "by": "..."}`.

use super::input::Input;
use crate::metrics::DeadLetterReason;

/// An acknowledgement of an alert.
#[derive(Debug, serde::Deserialize)]
pub struct Ack {
    /// The alert's id, from its RAISED event.
    pub alert_id: String,
    /// Who acknowledges it, as they say.
    pub by: Option<String>,
}

/// The asset id and acknowledgement of an input record.
///
/// # Errors
/// Why it is not one (to dead-letter it): no value or not the JSON object (`decode`), or a
/// key that is not an asset id (`key_mismatch`).
pub fn decode_ack<'a>(input: &Input<'a>) -> Result<(&'a str, Ack), (DeadLetterReason, String)> {
    let id = input.key.and_then(|k| std::str::from_utf8(k).ok());
    let ack = input
        .payload
        .ok_or_else(|| "record has no value".to_owned())
        .and_then(|p| serde_json::from_slice::<Ack>(p).map_err(|e| e.to_string()));
    match (id, ack) {
        (Some(id), Ok(ack)) if !id.is_empty() => Ok((id, ack)),
        (_, Err(why)) => Err((
            DeadLetterReason::Decode,
            format!("not an acknowledgement ({{\"alert_id\": ..., \"by\": ...}}): {why}"),
        )),
        _ => Err((
            DeadLetterReason::KeyMismatch,
            "the key must be the asset id".to_owned(),
        )),
    }
}
