//! The schema registry client: the documented Confluent REST subset twinflow needs.
//!
//! - At start, the output schemas are registered (or only looked up) under `<topic>-value`,
//!   and their ids go into the codec, which frames every changelog and alert value with them.
//! - On input, a Confluent-framed record whose schema id the codec has not seen makes the
//!   worker call [`Registry::fetch`] once; the codec then caches how to read that id. Ids
//!   are immutable in a registry, so nothing is ever fetched twice.
//!
//! Keys stay plain UTF-8 asset ids (what Confluent's `StringSerializer` writes), so no
//! `<topic>-key` subject is registered and partitioning by key is unchanged.

use std::time::Duration;

use serde::Deserialize;

use crate::codec::confluent::Writer;
use crate::codec::{ALERT_SCHEMA, Codec, Format};
use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::topology::Topology;

/// A registry client.
#[derive(Clone, Debug)]
pub struct Registry {
    client: reqwest::Client,
    base: String,
    user: Option<(String, Option<String>)>,
    auto_register: bool,
}

#[derive(Deserialize)]
struct Id {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaText {
    schema: String,
}

#[derive(Deserialize)]
struct RegistryError {
    error_code: Option<i64>,
    message: Option<String>,
}

/// Confluent's "schema not found" and "subject not found" codes.
const NOT_FOUND: [i64; 2] = [40403, 40401];

impl Registry {
    /// A client for `config`.
    ///
    /// # Errors
    /// `Error::Config` when a TLS file cannot be read or used.
    pub fn new(config: &RegistryConfig) -> Result<Registry> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("schema_registry: {}: {e}", path.display())))
        };
        let tls = |e: reqwest::Error| Error::Config(format!("schema_registry TLS: {e}"));
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)));
        if let Some(ca) = &config.ca_location {
            builder = builder
                .add_root_certificate(reqwest::Certificate::from_pem(&read(ca)?).map_err(tls)?);
        }
        if let (Some(cert), Some(key)) = (&config.certificate_location, &config.key_location) {
            builder = builder.identity(
                reqwest::Identity::from_pkcs8_pem(&read(cert)?, &read(key)?).map_err(tls)?,
            );
        }
        Ok(Registry {
            client: builder.build().map_err(tls)?,
            base: config.url.trim_end_matches('/').to_owned(),
            user: config.username.clone().map(|u| {
                let password = config.password.as_ref().map(|p| p.0.clone());
                (u, password)
            }),
            auto_register: config.auto_register,
        })
    }

    /// Sends one request; `Ok(None)` when the registry says the schema or subject does not
    /// exist.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method.clone(), &url).header(
            reqwest::header::ACCEPT,
            "application/vnd.schemaregistry.v1+json",
        );
        if let Some((user, password)) = &self.user {
            request = request.basic_auth(user, password.as_deref());
        }
        if let Some(body) = body {
            request = request
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/vnd.schemaregistry.v1+json",
                )
                .body(body.to_string());
        }
        let failed = |e: reqwest::Error| Error::Registry(format!("{method} {url}: {e}"));
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(failed)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Registry(format!("{method} {url}: unexpected answer: {e}")));
        }
        let error: Option<RegistryError> = serde_json::from_slice(&bytes).ok();
        let code = error.as_ref().and_then(|e| e.error_code);
        if status == reqwest::StatusCode::NOT_FOUND && code.is_some_and(|c| NOT_FOUND.contains(&c))
        {
            return Ok(None);
        }
        let message = error
            .and_then(|e| e.message)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let what = format!("{method} {url}: {status}: {message}");
        Err(match status.as_u16() {
            // Wrong credentials or a schema the registry rejects do not pass by waiting.
            401 | 403 | 409 | 422 => Error::Config(format!("schema registry: {what}")),
            _ => Error::Registry(what),
        })
    }

    /// The id of `schema` under `subject`: registered if `auto_register` is on (a schema
    /// already there keeps its id), looked up otherwise.
    ///
    /// # Errors
    /// `Error::Config` when it is not registered and may not be; `Error::Registry` when the
    /// registry cannot be reached.
    pub async fn id_of(&self, subject: &str, schema: &str) -> Result<u32> {
        let body = serde_json::json!({ "schema": schema });
        if self.auto_register {
            let path = format!("/subjects/{subject}/versions");
            let id: Option<Id> = self.call(reqwest::Method::POST, &path, Some(body)).await?;
            return id.map(|i| i.id).ok_or_else(|| {
                Error::Registry(format!("registering under {subject}: subject not found"))
            });
        }
        let id: Option<Id> = self
            .call(
                reqwest::Method::POST,
                &format!("/subjects/{subject}"),
                Some(body),
            )
            .await?;
        id.map(|i| i.id).ok_or_else(|| {
            Error::Config(format!(
                "schema registry: the schema is not registered under subject {subject}, and \
                 schema_registry.auto_register is false"
            ))
        })
    }

    /// Fetches schema `id` and tells the codec how to read it. An id the registry does not
    /// know is remembered as unreadable, so its records are dead-lettered.
    ///
    /// # Errors
    /// `Error::Registry` when the registry cannot be reached (try again later).
    pub async fn fetch(&self, id: u32, codec: &Codec) -> Result<()> {
        let text: Option<SchemaText> = self
            .call(reqwest::Method::GET, &format!("/schemas/ids/{id}"), None)
            .await?;
        let (telemetry, twin) = codec.schemas();
        let writer = match text {
            Some(t) => Writer::new(&t.schema, telemetry, twin),
            None => Writer::unknown(id),
        };
        tracing::info!(id, "Fetched a writer schema from the schema registry.");
        codec.writers().insert(id, writer);
        Ok(())
    }

    /// Registers (or looks up) the schemas of the topology's Confluent-framed outputs and
    /// sets their ids in its codec; the model's own telemetry schema too, when the input is
    /// Confluent-framed, so records written with it take the direct path.
    ///
    /// # Errors
    /// As [`Registry::id_of`].
    pub async fn prepare(&self, topology: &Topology) -> Result<()> {
        let topics = &topology.topics;
        let subject = |name: &str| format!("{name}-value");
        let (telemetry_text, twin_text) = topology.codec.schema_texts();
        let mut changelog = None;
        let mut alerts = None;
        if topics.changelog.format == Some(Format::ConfluentAvro) {
            changelog = Some(
                self.id_of(&subject(&topics.changelog.name), twin_text)
                    .await?,
            );
        }
        if topics.alerts.format == Some(Format::ConfluentAvro) {
            alerts = Some(
                self.id_of(&subject(&topics.alerts.name), ALERT_SCHEMA)
                    .await?,
            );
        }
        if topics.telemetry_format() == Format::ConfluentAvro {
            // Only a lookup: producers register telemetry schemas, not twinflow.
            let path = format!("/subjects/{}", subject(&topics.telemetry.name));
            let body = serde_json::json!({ "schema": telemetry_text });
            let id: Option<Id> = self.call(reqwest::Method::POST, &path, Some(body)).await?;
            if let Some(Id { id }) = id {
                self.fetch(id, &topology.codec).await?;
            }
        }
        topology.codec.set_output_ids(changelog, alerts);
        tracing::info!(
            changelog = ?changelog,
            alerts = ?alerts,
            "Schema registry ready."
        );
        Ok(())
    }
}

/// Runs `decode` until it no longer needs a writer schema, fetching each one it names from
/// `registry` first; for readers of Confluent-framed output topics (restore, fleet view).
/// Blocking: it waits for the fetch on `runtime`, so call it from a thread of its own.
///
/// # Errors
/// What `decode` returns otherwise; `Error::Config` when a schema is needed and no registry
/// is configured; a failed fetch's error (try again later).
pub fn decode_fetching<T>(
    registry: Option<&Registry>,
    codec: &Codec,
    runtime: &tokio::runtime::Handle,
    mut decode: impl FnMut(&Codec) -> Result<T>,
) -> Result<T> {
    loop {
        match decode(codec) {
            Err(e) => {
                let crate::error::Disposition::FetchSchema(id) = e.disposition() else {
                    return Err(e);
                };
                let registry = registry.ok_or_else(|| {
                    Error::Config("a Confluent-framed output topic needs [schema_registry]".into())
                })?;
                runtime.block_on(registry.fetch(id, codec))?;
            }
            decoded => return decoded,
        }
    }
}
