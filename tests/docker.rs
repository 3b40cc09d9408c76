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
