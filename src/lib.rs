//! twinflow: a Kafka-native stream processor that keeps a live digital twin of every asset.
//!
//! # Layout
//! - [`config`]: the configuration tree, defaults, environment overrides, validation.
//! - [`topology`]: topics, twin model and rules, loaded from `topology/` and `schemas/`.
//! - [`twin`]: the twin, readings and the merge (pure).
//! - [`rules`]: edge-triggered alert rules (pure).
//! - [`step`]: one twin's step on a reading or a timer, model and rules together (pure): what
//!   the pipeline, the what-if simulation and the backtest run.
//! - [`codec`]: Avro/JSON decoding and encoding, driven by the model's schemas; the
//!   Confluent wire format.
//! - [`registry`]: the schema registry client (register outputs, fetch input schemas by id).
//! - [`store`]: the RocksDB state store: twins and input positions per partition.
//! - [`kafka`]: every Kafka client: their settings, the consumer with rebalance hand-off,
//!   partition streams, the output producer and its transactions, the output reader, topic admin.
//! - [`headers`]: the `twinflow.*` header names of output records.
//! - [`pipeline`]: the coordinator and the partition workers' hot loop.
//! - [`metrics`]: Prometheus metrics on the instance's own registry.
//! - [`view`]: the fleet view: a read replica of every twin, fed from the changelog, and the
//!   live event stream.
//! - [`api`]: the HTTP endpoint (metrics, health, the twin API, the fleet page).
//! - [`app`]: config → build → run.
//! - [`bridge`]: `twinflow bridge`, devices over MQTT: readings and acknowledgements into
//!   Kafka, commands out to the devices.
//! - [`clock`]: processing time, controllable in tests.
//! - [`demo`]: `twinflow demo`, with the in-process Kafka-protocol cluster
//!   ([`demo::embedded`]) and the fleet simulator ([`demo::sim`]) the demo, tests and
//!   benchmarks use, apart from the service.
//! - [`backtest`]: `twinflow backtest`, a window of telemetry through the live and a candidate
//!   model, side by side.
//! - [`cli`]: the command line.
//! - [`error`]: the library error and its dispositions.
#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod backtest;
pub mod bridge;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod demo;
pub mod error;
pub mod export;
pub mod headers;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod rules;
pub mod step;
pub mod store;
pub mod topology;
pub mod twin;
pub mod view;

pub use app::App;
pub use config::Config;
pub use error::{Disposition, Error};
