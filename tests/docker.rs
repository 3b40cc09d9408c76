//! `docker/` checked without a Docker engine (there is none on the test machines): the
//! compose file's structure and the references between compose, Prometheus, Grafana and the
//! twinflow config (`tests/python/check_compose.py`, PyYAML). That every metric the Grafana
//! dashboard queries is exported is checked against a running pipeline in `tests/pipeline.rs`.

mod common;

use common::{root, venv};

#[test]
fn compose_file_and_its_references_hold_together() {
    let out = std::process::Command::new(venv().join("bin/python"))
        .arg(root().join("tests/python/check_compose.py"))
        .arg(root().join("docker"))
        .output()
        .expect("the test venv's python runs (bash .ci/setup)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_configuration_loads_with_the_registry_it_needs() {
    // The image's config names /etc/twinflow/topics.toml, copied from docker/topics.toml.
    let config = twinflow::Config::load(&root().join("docker/twinflow.toml")).unwrap();
    let topology = twinflow::topology::Topology::load(&twinflow::config::TopologyConfig {
        topics: root().join("docker/topics.toml"),
        model: root().join("topology/vehicle.toml"),
    })
    .unwrap();
    assert!(
        topology.topics.uses_registry(),
        "the compose setup shows the Confluent format"
    );
    let registry = config.schema_registry.expect("[schema_registry] is set");
    assert_eq!(registry.url, "http://schema-registry:8081");
    let compose = std::fs::read_to_string(root().join("docker/compose.yaml")).unwrap();
    assert!(
        compose.contains("SCHEMA_REGISTRY_LISTENERS: http://0.0.0.0:8081"),
        "compose runs the registry the config names"
    );
}
