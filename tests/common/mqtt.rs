//! A real MQTT broker (Debian's mosquitto) on a free loopback port, the bridge's
//! configuration for it, and devices on paho-mqtt (tests/python/mqtt_device.py).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use tempfile::TempDir;

use super::{free_port, root, untimed_vehicle_topology, venv};

/// The largest packet the test broker takes from a device; larger ones are refused.
pub const BROKER_MAX_PACKET: usize = 64 * 1024;

/// A mosquitto process with its own configuration; killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker that queues without limit for offline sessions (the bridge's
    /// back-pressure rests on it) and refuses packets over [`BROKER_MAX_PACKET`]. It keeps
    /// the test's user (started as root, mosquitto would switch to its own user, which
    /// cannot read the test's files).
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Starts a broker as [`Mosquitto::start`] does, with more configuration lines (more
    /// listeners, say; paths relative to `dir` may be named as `{dir}`).
    pub fn start_with(extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let extra = extra.replace("{dir}", &dir.path().display().to_string());
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 user root\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nmax_packet_size {BROKER_MAX_PACKET}\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n{extra}\n"
            ),
        )
        .unwrap();
        // stderr: written at once, unlike a log file.
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts (bash .ci/setup installs it)");
        super::wait_listening(port, "mosquitto", &dir.path().join("mosquitto.log"));
        Mosquitto { child, port, dir }
    }

    /// The broker's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration file for `twinflow bridge` on `bootstrap` and the broker on
/// `mqtt_port`, with `[ingest.mqtt]` lines `extra` added; returns its path.
pub fn bridge_config(
    dir: &Path,
    bootstrap: &str,
    mqtt_port: u16,
    http: u16,
    extra: &str,
) -> PathBuf {
    let t = untimed_vehicle_topology();
    let text = format!(
        "[kafka]\nbootstrap_servers = \"{bootstrap}\"\n[topology]\ntopics = \"{}\"\nmodel = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n\
         [ingest.mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\n{extra}\n",
        t.topics.display(),
        t.model.display(),
    );
    let path = dir.join(format!("bridge-{http}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `mqtt_device.py publish` for `messages` (topic, payload) from `clients`
/// connections; returns the line numbers the broker refused.
pub fn publish(port: u16, messages: &[(String, Vec<u8>)], clients: usize, tag: &str) -> Vec<usize> {
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: String = messages
        .iter()
        .map(|(topic, payload)| {
            let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "topic": topic, "payload_hex": hex }).to_string() + "\n"
        })
        .collect();
    std::fs::write(file.path(), lines).unwrap();
    let out = python()
        .args([
            "publish",
            "--port",
            &port.to_string(),
            "--clients",
            &clients.to_string(),
        ])
        .args(["--tag", tag, "--file"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mqtt_device.py publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    answer["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap() as usize)
        .collect()
}

/// The device script under the test venv's Python.
pub fn python() -> Command {
    let mut c = Command::new(venv().join("bin/python"));
    c.arg(root().join("tests/python/mqtt_device.py"));
    c
}

/// A running `mqtt_device.py obey`: devices taking commands, one JSON line per command.
pub struct Obeying {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    early: std::collections::VecDeque<serde_json::Value>,
}

impl Obeying {
    /// Starts devices `assets` under session `tag` that obey `count` commands (0: only
    /// make the persistent session and leave); returns once they are subscribed.
    /// Their readings carry `event_time` (ms).
    pub fn start(port: u16, assets: &str, count: usize, tag: &str, event_time: i64) -> Obeying {
        let mut child = python()
            .args(["obey", "--port", &port.to_string(), "--assets", assets])
            .args(["--count", &count.to_string(), "--tag", tag])
            .args(["--event-time", &event_time.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut early = std::collections::VecDeque::new();
        loop {
            let line = lines.next().expect("the devices report ready").unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["ready"] == true {
                break;
            }
            early.push_back(v);
        }
        Obeying {
            child,
            lines,
            early,
        }
    }

    /// The next command the devices got, with its topic and message expiry.
    pub fn next_command(&mut self) -> serde_json::Value {
        if let Some(v) = self.early.pop_front() {
            return v;
        }
        let line = self.lines.next().expect("a command").unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// Waits for the devices to leave.
    pub fn wait(mut self) {
        assert!(self.child.wait().unwrap().success());
    }

    /// The one command these devices obey, once they have acknowledged it and left (on a
    /// blocking thread).
    pub async fn only_command(mut self) -> serde_json::Value {
        tokio::task::spawn_blocking(move || {
            let got = self.next_command();
            self.wait();
            got
        })
        .await
        .unwrap()
    }
}

impl Drop for Obeying {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, a certificate for a server on 127.0.0.1 and one for a client (`client.pem` with
/// its PKCS#8 key `client.key`), made with the openssl command in `dir`.
pub fn certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=twinflow test CA",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for (name, subject, ext) in [
        ("server", "/CN=127.0.0.1", true),
        ("client", "/CN=twinflow-bridge", false),
    ] {
        let (keyfile, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            &[
                &["req"][..],
                &key,
                &["-keyout", &keyfile, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        );
        let mut sign = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
        ];
        if ext {
            sign.extend(["-extfile", "server.ext"]);
        }
        openssl(&sign);
    }
}
