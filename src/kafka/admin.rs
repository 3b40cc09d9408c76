//! `topology apply`: create missing topics with their configs, and report how existing ones
//! differ from the declaration.

use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::error::{Error, Result};
use crate::topology::{TopicSpec, Topics};

/// What `apply` did or found for one topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicReport {
    /// Created with the declared partitions and configs.
    Created(String),
    /// Already there and as declared.
    Unchanged(String),
    /// Already there, but not as declared: each string says how.
    Mismatch(String, Vec<String>),
}

impl TopicReport {
    /// Whether the topic is not as declared.
    pub fn is_mismatch(&self) -> bool {
        matches!(self, TopicReport::Mismatch(..))
    }
}

impl fmt::Display for TopicReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicReport::Created(t) => write!(f, "created    {t}"),
            TopicReport::Unchanged(t) => write!(f, "ok         {t}"),
            TopicReport::Mismatch(t, why) => write!(f, "MISMATCH   {t}: {}", why.join("; ")),
        }
    }
}

/// Creates the missing topics of `topics` and checks the existing ones.
///
/// # Errors
/// `Error::Kafka` when the cluster cannot be reached or refuses a creation.
pub async fn apply_topology(client: &ClientConfig, topics: &Topics) -> Result<Vec<TopicReport>> {
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let timeout = Duration::from_secs(15);
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let metadata = admin.inner().fetch_metadata(None, timeout)?;
    let existing = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };

    let mut reports = Vec::new();
    let missing: Vec<&TopicSpec> = topics
        .all()
        .into_iter()
        .filter(|s| existing(&s.name).is_none())
        .collect();
    let new_topics: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|s| {
            s.config.iter().fold(
                NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(s.replication_factor),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    if !new_topics.is_empty() {
        for result in admin.create_topics(&new_topics, &opts).await? {
            match result {
                Ok(name) => reports.push(TopicReport::Created(name)),
                Err((name, code)) => {
                    return Err(Error::Config(format!("creating topic {name}: {code}")));
                }
            }
        }
    }

    for spec in topics.all() {
        let Some(partitions) = existing(&spec.name) else {
            continue;
        };
        let mut why = Vec::new();
        if partitions != spec.partitions {
            why.push(format!(
                "has {partitions} partitions, declared {}",
                spec.partitions
            ));
        }
        if !spec.config.is_empty() {
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(&spec.name)], &opts)
                .await?;
            if let Some(Ok(resource)) = described.first() {
                for (key, want) in &spec.config {
                    let have = resource.get(key).and_then(|e| e.value.as_deref());
                    if have != Some(want.as_str()) {
                        why.push(format!(
                            "{key} is {}, declared {want}",
                            have.unwrap_or("unset")
                        ));
                    }
                }
            }
        }
        reports.push(if why.is_empty() {
            TopicReport::Unchanged(spec.name.clone())
        } else {
            TopicReport::Mismatch(spec.name.clone(), why)
        });
    }
    Ok(reports)
}
