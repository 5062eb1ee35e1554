//! Simulated factories for Millrace: realistic machines that publish factory events over MQTT,
//! deterministic from a seed, and that know the true KPIs of what they simulated.
//!
//! # Layout
//! - [`config`]: the factory's layout and machine behaviour (flags or TOML).
//! - [`machine`]: one machine as a state machine in simulated time (cycles, breakdowns from
//!   MTBF/MTTR, minor stops, changeovers, shift breaks, telemetry with noise, drift and
//!   breakdown precursors).
//! - [`factory`]: all machines merged in time order, and the [`factory::GroundTruth`].
//! - [`publish`]: an MQTT publisher on rumqttc that counts acknowledgements and reconnects.
//! - [`run`]: pacing (real time or accelerated), fault injection and the publish report.
//! - [`load`]: the benchmark load mode (N devices × rate).
//! - [`push`]: a simulated factory pushed straight to a cloud over the sync protocol.
#![warn(missing_docs)]

pub mod config;
pub mod factory;
pub mod load;
pub mod machine;
pub mod publish;
pub mod push;
pub mod run;
