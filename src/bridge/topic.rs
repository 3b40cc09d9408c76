//! MQTT topic templates such as `assets/{asset_id}/telemetry`: the subscription filter
//! they make, the asset id a topic names, and the topic of an asset.

/// A topic with one level that is the asset id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    levels: Vec<String>,
    /// Which level is the asset id.
    asset: usize,
}

/// The placeholder level.
const ASSET: &str = "{asset_id}";

impl TopicTemplate {
    /// Parses a template: levels separated by `/`, exactly one of them `{asset_id}`, the
    /// others plain (no wildcard, no braces, not empty, not starting with `$`).
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let levels: Vec<String> = template.split('/').map(str::to_owned).collect();
        let mut asset = None;
        for (i, level) in levels.iter().enumerate() {
            if level == ASSET {
                if asset.replace(i).is_some() {
                    return Err(format!("'{template}' has {ASSET} twice"));
                }
            } else if level.is_empty() || level.contains(['+', '#', '{', '}', '\0']) {
                return Err(format!(
                    "'{template}': level '{level}' must be plain text or {ASSET} alone"
                ));
            }
        }
        if template.starts_with('$') {
            return Err(format!("'{template}' must not start with '$'"));
        }
        let asset = asset.ok_or_else(|| format!("'{template}' has no {ASSET} level"))?;
        Ok(TopicTemplate { levels, asset })
    }

    /// The subscription filter (`+` for the asset id), shared by `group` unless it is empty.
    pub fn filter(&self, group: &str) -> String {
        let filter = self
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| if i == self.asset { "+" } else { l.as_str() })
            .collect::<Vec<_>>()
            .join("/");
        if group.is_empty() {
            filter
        } else {
            format!("$share/{group}/{filter}")
        }
    }

    /// The asset id `topic` names, if it is a topic of this template.
    pub fn asset_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let mut found = None;
        let mut n = 0;
        for (i, level) in topic.split('/').enumerate() {
            let want = self.levels.get(i)?;
            if i == self.asset {
                found = Some(level);
            } else if level != want {
                return None;
            }
            n += 1;
        }
        (n == self.levels.len()).then_some(found).flatten()
    }

    /// The topic of `asset_id`; `None` for an id that would not be one level (a `/`) or
    /// that holds a wildcard.
    pub fn topic_of(&self, asset_id: &str) -> Option<String> {
        if asset_id.is_empty() || asset_id.contains(['/', '+', '#', '\0']) {
            return None;
        }
        let levels: Vec<&str> = self
            .levels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == self.asset {
                    asset_id
                } else {
                    l.as_str()
                }
            })
            .collect();
        Some(levels.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_gives_its_filter_the_asset_of_a_topic_and_the_topic_of_an_asset() {
        let t = TopicTemplate::parse("assets/{asset_id}/telemetry").unwrap();
        assert_eq!(t.filter(""), "assets/+/telemetry");
        assert_eq!(t.filter("twinflow"), "$share/twinflow/assets/+/telemetry");
        assert_eq!(t.asset_of("assets/truck-1/telemetry"), Some("truck-1"));
        assert_eq!(
            t.asset_of("assets/../telemetry"),
            Some(".."),
            "the pattern refuses it"
        );
        for other in [
            "assets/truck-1/telemetry/x",
            "assets/truck-1",
            "assets/truck-1/commands",
            "devices/truck-1/telemetry",
            "",
        ] {
            assert_eq!(t.asset_of(other), None, "{other}");
        }
        assert_eq!(
            t.topic_of("truck-1").as_deref(),
            Some("assets/truck-1/telemetry")
        );
        for bad in ["a/b", "+", "#", ""] {
            assert_eq!(t.topic_of(bad), None, "{bad}");
        }
        let first = TopicTemplate::parse("{asset_id}/up").unwrap();
        assert_eq!(first.asset_of("m-7/up"), Some("m-7"));
    }

    #[test]
    fn a_template_needs_one_asset_level_and_plain_levels() {
        for bad in [
            "assets/telemetry",
            "assets/{asset_id}/{asset_id}",
            "assets/+/{asset_id}",
            "assets/#",
            "assets//{asset_id}",
            "$SYS/{asset_id}",
            "assets/x{asset_id}",
        ] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad}");
        }
    }
}
