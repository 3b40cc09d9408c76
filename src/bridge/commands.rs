//! Commands to devices: the command topic's records as the MQTT messages the bridge
//! publishes, and which of a batch to publish.
//!
//! A batch is what the command consumer reads until each partition it has records of is
//! read to its end as last fetched (see `CommandsOut::fill`). Within it, a command for a
//! property that a later command of the batch also sets loses that property (the later
//! value wins), and one left with no values is not published (`superseded`), nor is one
//! already expired (`expired`). After a restart or a rebalance the bridge reads again the
//! commands it published but had not committed yet; they come as one batch, so the device
//! gets each property's newest command again, never an older one after it.

use std::collections::HashSet;

use crate::codec::{CommandRecord, rfc3339, value_json};
/// What became of a command record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Published to the device's command topic.
    Published,
    /// Its values are all set again by a later command of the batch.
    Superseded,
    /// Past its `expires_at`.
    Expired,
    /// Its asset id makes no topic (a `/` or a wildcard in it).
    Unroutable,
    /// Not a command record.
    Undecodable,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Superseded => "superseded",
            Outcome::Expired => "expired",
            Outcome::Unroutable => "unroutable",
            Outcome::Undecodable => "undecodable",
        }
    }
}

/// Drops from each command of `batch` (in record order) the properties a later command of
/// the same asset sets; a command left without values becomes `None`.
pub fn supersede(batch: &mut [Option<CommandRecord>]) {
    let mut later: HashSet<(String, String)> = HashSet::new();
    for slot in batch.iter_mut().rev() {
        let Some(command) = slot else { continue };
        let asset = command.asset_id.clone();
        command
            .values
            .retain(|(name, _)| !later.contains(&(asset.clone(), name.clone())));
        if command.values.is_empty() {
            *slot = None;
            continue;
        }
        for (name, _) in &command.values {
            later.insert((asset.clone(), name.clone()));
        }
    }
}

/// The MQTT 5 message expiry of `command` at `now_ms`, in whole seconds rounded up;
/// `Err` when it has expired, `Ok(None)` when it never does.
pub fn expiry_secs(command: &CommandRecord, now_ms: i64) -> Result<Option<u32>, ()> {
    match command.expires_at {
        None => Ok(None),
        Some(at) if at <= now_ms => Err(()),
        Some(at) => {
            let secs = (at - now_ms + 999) / 1000;
            Ok(Some(u32::try_from(secs).unwrap_or(u32::MAX)))
        }
    }
}

/// The JSON a device receives: `{"command_id", "asset_id", "desired_version", "attempt",
/// "values": {...}, "issued_at", "expires_at"}` with RFC 3339 times.
pub fn to_json(command: &CommandRecord) -> Vec<u8> {
    let values: serde_json::Map<String, serde_json::Value> = command
        .values
        .iter()
        .map(|(name, v)| (name.clone(), value_json(v)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "command_id": command.command_id,
        "asset_id": command.asset_id,
        "desired_version": command.desired_version,
        "attempt": command.attempt,
        "values": values,
        "issued_at": rfc3339(command.issued_at),
        "expires_at": command.expires_at.map(rfc3339),
    }))
    .expect("JSON values serialize")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twin::Value;

    fn command(id: &str, asset: &str, values: &[(&str, f64)]) -> Option<CommandRecord> {
        Some(CommandRecord {
            command_id: id.into(),
            asset_id: asset.into(),
            desired_version: 1,
            attempt: 1,
            values: values
                .iter()
                .map(|(n, v)| ((*n).to_owned(), Value::Double(*v)))
                .collect(),
            issued_at: 1_000,
            expires_at: Some(61_000),
        })
    }

    #[test]
    fn a_later_command_of_the_batch_takes_the_properties_it_sets() {
        let mut batch = vec![
            command("c1", "a", &[("setpoint", 1.0), ("fan", 1.0)]),
            command("c2", "b", &[("setpoint", 2.0)]),
            command("c3", "a", &[("setpoint", 3.0)]),
            command("c4", "a", &[("fan", 4.0)]),
        ];
        supersede(&mut batch);
        let left: Vec<(&str, Vec<&str>)> = batch
            .iter()
            .flatten()
            .map(|c| {
                (
                    c.command_id.as_str(),
                    c.values.iter().map(|(n, _)| n.as_str()).collect(),
                )
            })
            .collect();
        assert_eq!(
            left,
            vec![
                ("c2", vec!["setpoint"]),
                ("c3", vec!["setpoint"]),
                ("c4", vec!["fan"])
            ],
            "c1 is superseded whole: each of its properties is set later"
        );
    }

    #[test]
    fn expiry_is_rounded_up_and_an_expired_command_is_not_sent() {
        let c = command("c1", "a", &[("setpoint", 1.0)]).unwrap();
        assert_eq!(expiry_secs(&c, 1_000), Ok(Some(60)));
        assert_eq!(expiry_secs(&c, 60_500), Ok(Some(1)));
        assert_eq!(expiry_secs(&c, 61_000), Err(()));
        let never = CommandRecord {
            expires_at: None,
            ..c.clone()
        };
        assert_eq!(expiry_secs(&never, i64::MAX), Ok(None));
        let json: serde_json::Value = serde_json::from_slice(&to_json(&c)).unwrap();
        assert_eq!(json["values"]["setpoint"], 1.0);
        assert_eq!(json["expires_at"], "1970-01-01T00:01:01.000Z");
    }
}
