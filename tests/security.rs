//! Security settings reach librdkafka through the configuration passthrough. No test broker
//! here speaks SASL or TLS, so this checks what can be checked without one: an instance
//! builds its real clients (consumer, producer) from a config file with SASL_SSL and SCRAM,
//! or SASL PLAIN, and the secrets from the environment; and librdkafka's own refusal of a
//! wrong setting reaches the user naming the setting.

use twinflow::{App, Config};

fn config(security: &str, env: &[(&str, &str)]) -> Result<Config, String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = format!(
        "[kafka]\nbootstrap_servers = \"broker.example:9093\"\n[kafka.librdkafka]\n{security}\n\
         [topology]\ntopics = \"{root}/topology/topics.toml\"\nmodel = \"{root}/topology/vehicle.toml\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{text}[store]\npath = \"{}\"\n",
        dir.keep().join("state").display()
    );
    Config::from_toml(
        &text,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[tokio::test]
async fn sasl_and_tls_settings_build_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("kafka_password");
    std::fs::write(&secret, "scram-s3cret\n").unwrap();
    let secret = secret.display().to_string();
    for security in [
        // SASL over TLS with SCRAM, the CA given as a file.
        "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"twinflow\"\n\"ssl.ca.location\" = \"/etc/ssl/certs/ca-certificates.crt\"\n\
         \"ssl.endpoint.identification.algorithm\" = \"https\"\n",
        // SASL PLAIN without TLS.
        "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\
         \"sasl.username\" = \"twinflow\"\n",
        // TLS only.
        "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/etc/ssl/certs/ca-certificates.crt\"\n",
    ] {
        let config = config(
            security,
            &[("TWINFLOW_KAFKA__LIBRDKAFKA__SASL_PASSWORD_FILE", &secret)],
        )
        .unwrap();
        if security.contains("SASL") {
            assert_eq!(config.kafka.librdkafka["sasl.password"], "scram-s3cret");
        }
        // Building creates the consumer and producer: librdkafka checks every property.
        let app = App::build(&config);
        assert!(app.is_ok(), "{security}: {:#}", app.err().unwrap());
    }
}

#[tokio::test]
async fn librdkafka_refusing_a_security_setting_names_it() {
    for (security, named) in [
        (
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-999\"\n\
             \"sasl.username\" = \"u\"\n\"sasl.password\" = \"p\"\n",
            "SCRAM-SHA-999",
        ),
        (
            "\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-256\"\n",
            "sasl.username and sasl.password must be set",
        ),
        (
            "\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n",
            "ssl.ca.location",
        ),
        (
            "\"security.protocol\" = \"SASL_TLS\"\n",
            "security.protocol",
        ),
    ] {
        let config = config(security, &[]).unwrap();
        let err = format!("{:#}", App::build(&config).err().expect("refused"));
        assert!(err.contains(named), "{security}: {err}");
    }
}
