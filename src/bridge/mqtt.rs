//! The bridge's MQTT connection, MQTT 5 or 3.1.1 behind one face: the events the bridge
//! acts on, manual acknowledgement of what it received, and publishing commands.
//!
//! The client is rumqttc (see ARCHITECTURE.md for why). Both protocol versions run with a
//! persistent session (clean start off, a session expiry under 5) and manual
//! acknowledgements: a reading is acknowledged only when the bridge says so, after Kafka has
//! it. Under 5 the bridge announces its receive maximum (the readings the broker may have
//! in flight to it unacknowledged) and its largest packet.

use bytes::Bytes;
use rumqttc::tokio_native_tls::native_tls;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;

use crate::config::{MqttConfig, MqttVersion};
use crate::error::{Error, Result};

/// A message the broker delivered to the bridge.
pub struct Message {
    /// Its MQTT topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    handle: Handle,
}

enum Handle {
    V5(p5::Publish),
    V4(rumqttc::Publish),
}

/// What the connection reports.
pub enum Event {
    /// (Re)connected; whether the broker kept the session.
    Connected {
        /// The broker had the bridge's session (subscriptions, unacknowledged messages).
        session_present: bool,
    },
    /// The broker granted a subscription.
    Subscribed,
    /// A message for the bridge.
    Message(Message),
    /// A publish of the bridge's left for the broker with this packet id (a retransmission
    /// after a reconnect reports its id again).
    Sent(u16),
    /// The broker acknowledged the bridge's publish with this packet id.
    Acknowledged(u16),
    /// The bridge's own disconnect went out: the connection is done.
    Closed,
}

/// The sending side: acknowledgements, subscriptions, publishes.
#[derive(Clone)]
pub enum Client {
    /// MQTT 5.
    V5(v5::AsyncClient),
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
}

/// The receiving side; [`Connection::poll`] drives the connection (and reconnects).
pub enum Connection {
    /// MQTT 5.
    V5(v5::EventLoop),
    /// MQTT 3.1.1.
    V4(rumqttc::EventLoop),
}

/// Why a poll failed.
pub struct PollError {
    /// For the log.
    pub message: String,
    /// The broker answered the connect in a way that says it does not speak MQTT 5.
    pub not_v5: bool,
}

/// Where the broker is: host, port and whether TLS is on.
pub fn endpoint(url: &str) -> Result<(String, u16, bool)> {
    let bad = |why: &str| Error::Config(format!("ingest.mqtt.url '{url}': {why}"));
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("expected mqtt[s]://host[:port]"));
    }
    let port = port.map_or(Ok(default_port), |p| {
        p.parse().map_err(|_| bad("the port is not a number"))
    })?;
    Ok((host.to_owned(), port, tls))
}

fn transport(config: &MqttConfig) -> Result<rumqttc::Transport> {
    let tls = |e: native_tls::Error| Error::Config(format!("ingest.mqtt TLS: {e}"));
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))
    };
    let mut builder = native_tls::TlsConnector::builder();
    if let Some(ca) = &config.ca_location {
        builder.add_root_certificate(native_tls::Certificate::from_pem(&read(ca)?).map_err(tls)?);
    }
    if let (Some(cert), Some(key)) = (&config.certificate_location, &config.key_location) {
        let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?).map_err(tls)?;
        builder.identity(identity);
    }
    let connector = builder.build().map_err(tls)?;
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::NativeConnector(connector),
    ))
}

/// A connection to the broker `config` names, speaking `version` (5 or 3.1.1; `Auto` is
/// taken as 5, the caller falls back).
///
/// # Errors
/// `Error::Config` on a bad URL or unreadable TLS files.
pub fn connect(config: &MqttConfig, version: MqttVersion) -> Result<(Client, Connection)> {
    let (host, port, tls) = endpoint(&config.url)?;
    let transport = if tls {
        transport(config)?
    } else {
        rumqttc::Transport::Tcp
    };
    let credentials = config.username.as_ref().map(|user| {
        let password = config.password.as_ref().map_or("", |p| p.0.as_str());
        (user.clone(), password.to_owned())
    });
    // Room in the request channel for every acknowledgement the bridge may owe, so that
    // acknowledging never waits on the connection.
    let capacity = usize::from(config.max_in_flight) * 2 + 64;
    let keep_alive = config.keep_alive;
    if version == MqttVersion::V311 {
        let mut o = rumqttc::MqttOptions::new(&config.client_id, host, port);
        o.set_transport(transport)
            .set_keep_alive(keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_inflight(config.max_in_flight)
            .set_max_packet_size(config.max_packet_bytes as usize, 1024 * 1024);
        if let Some((user, password)) = credentials {
            o.set_credentials(user, password);
        }
        let (client, eventloop) = rumqttc::AsyncClient::new(o, capacity);
        return Ok((Client::V4(client), Connection::V4(eventloop)));
    }
    let mut o = v5::MqttOptions::new(&config.client_id, host, port);
    o.set_transport(transport)
        .set_keep_alive(keep_alive)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ))
        .set_manual_acks(true)
        .set_receive_maximum(Some(config.max_in_flight))
        .set_outgoing_inflight_upper_limit(config.max_in_flight)
        .set_max_packet_size(Some(config.max_packet_bytes));
    if let Some((user, password)) = credentials {
        o.set_credentials(user, password);
    }
    let (client, eventloop) = v5::AsyncClient::new(o, capacity);
    Ok((Client::V5(client), Connection::V5(eventloop)))
}

impl Connection {
    /// The next event the bridge acts on (others are handled by the client: pings,
    /// subscription answers); reconnects after an error on the next call.
    ///
    /// # Errors
    /// The connection broke or could not be made; call again to reconnect.
    pub async fn poll(&mut self) -> std::result::Result<Option<Event>, PollError> {
        match self {
            Connection::V5(l) => match l.poll().await {
                Ok(v5::Event::Incoming(p5::Packet::Publish(p))) => {
                    Ok(Some(Event::Message(Message {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload.clone(),
                        handle: Handle::V5(p),
                    })))
                }
                Ok(v5::Event::Incoming(p5::Packet::ConnAck(c))) => Ok(Some(Event::Connected {
                    session_present: c.session_present,
                })),
                Ok(v5::Event::Incoming(p5::Packet::PubAck(a))) => {
                    Ok(Some(Event::Acknowledged(a.pkid)))
                }
                Ok(v5::Event::Incoming(p5::Packet::SubAck(_))) => Ok(Some(Event::Subscribed)),
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    Ok(Some(Event::Sent(pkid)))
                }
                Ok(v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ok(Some(Event::Closed)),
                Ok(_) => Ok(None),
                Err(e) => Err(PollError {
                    not_v5: matches!(
                        &e,
                        v5::ConnectionError::ConnectionRefused(
                            p5::ConnectReturnCode::UnsupportedProtocolVersion
                        ) | v5::ConnectionError::MqttState(v5::StateError::Deserialization(_))
                    ),
                    message: e.to_string(),
                }),
            },
            Connection::V4(l) => match l.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    Ok(Some(Event::Message(Message {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        handle: Handle::V4(p),
                    })))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(c))) => {
                    Ok(Some(Event::Connected {
                        session_present: c.session_present,
                    }))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => {
                    Ok(Some(Event::Acknowledged(a.pkid)))
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    Ok(Some(Event::Subscribed))
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                    Ok(Some(Event::Sent(pkid)))
                }
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                    Ok(Some(Event::Closed))
                }
                Ok(_) => Ok(None),
                Err(e) => Err(PollError {
                    not_v5: false,
                    message: e.to_string(),
                }),
            },
        }
    }
}

impl Client {
    /// The protocol version spoken.
    pub fn version(&self) -> &'static str {
        match self {
            Client::V5(_) => "5",
            Client::V4(_) => "3.1.1",
        }
    }

    /// Acknowledges `m` to the broker (PUBACK): the broker forgets it.
    pub fn ack(&self, m: &Message) {
        let sent = match (self, &m.handle) {
            (Client::V5(c), Handle::V5(p)) => c.try_ack(p).is_ok(),
            (Client::V4(c), Handle::V4(p)) => c.try_ack(p).is_ok(),
            _ => false,
        };
        if !sent {
            // Only when the connection is gone: the broker sends the message again.
            tracing::debug!(topic = %m.topic, "Acknowledgement not sent; the broker redelivers.");
        }
    }

    /// Asks the connection to close cleanly, after what was queued before.
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.disconnect().await.is_ok(),
            Client::V4(c) => c.disconnect().await.is_ok(),
        };
    }

    /// Subscribes to `filter` at QoS 1.
    ///
    /// # Errors
    /// When the client has stopped.
    pub async fn subscribe(&self, filter: &str) -> Result<()> {
        let r = match self {
            Client::V5(c) => c
                .subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
            Client::V4(c) => c
                .subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .await
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| Error::Mqtt(format!("subscribing to {filter}: {e}")))
    }

    /// Publishes `payload` to `topic` at QoS 1; under MQTT 5 the broker drops it after
    /// `expiry_secs` if it could not deliver it by then.
    ///
    /// # Errors
    /// When the client has stopped.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        expiry_secs: Option<u32>,
    ) -> Result<()> {
        let r = match self {
            Client::V5(c) => {
                let properties = p5::PublishProperties {
                    message_expiry_interval: expiry_secs,
                    content_type: Some("application/json".into()),
                    payload_format_indicator: Some(1),
                    ..Default::default()
                };
                c.publish_with_properties(
                    topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    properties,
                )
                .await
                .map_err(|e| e.to_string())
            }
            Client::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| e.to_string()),
        };
        r.map_err(|e| Error::Mqtt(format!("publishing to {topic}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_gives_host_port_and_tls() {
        assert_eq!(
            endpoint("mqtt://broker").unwrap(),
            ("broker".into(), 1883, false)
        );
        assert_eq!(
            endpoint("mqtts://broker").unwrap(),
            ("broker".into(), 8883, true)
        );
        assert_eq!(
            endpoint("mqtt://10.0.0.1:1884/").unwrap(),
            ("10.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            endpoint("mqtt://[::1]:1885").unwrap(),
            ("::1".into(), 1885, false)
        );
        for bad in ["tcp://broker", "mqtt://", "mqtt://broker:x", "mqtt://a/b"] {
            assert!(endpoint(bad).is_err(), "{bad}");
        }
    }
}
