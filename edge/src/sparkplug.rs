//! A Sparkplug B host application (Eclipse Sparkplug 3.0) inside the edge.
//!
//! PLC gateways, Ignition, Kepware and the Tahu libraries publish protobuf payloads under
//! `spBv1.0/{group}/{NBIRTH|NDATA|NDEATH|DBIRTH|DDATA|DDEATH}/{node}[/{device}]`. Ingest hands
//! those to the [`Host`] instead of the JSON decoder: it keeps each node's birth (its `bdSeq`,
//! the metric aliases, types and units), checks sequence numbers, maps metrics into the factory
//! model (telemetry, machine state, part counters; see [`SparkplugConfig`]) and asks a node to
//! rebirth (`NCMD Node Control/Rebirth`) when it cannot trust what it holds: a sequence gap,
//! an alias its birth did not declare, data before a birth, a payload it cannot decode. The
//! events then go the way every device event goes: stored before the node is acknowledged,
//! functions, sync, reports.
//!
//! Layout:
//! - `config`: the host id and the mapping of groups, nodes and devices to machines.
//! - `host`: the state machine and the node status the API shows.
//!
//! The host's `STATE` (`spBv1.0/STATE/{host_id}`, retained) is published online at start and
//! offline at shutdown by the edge (see `crate::Edge`).

mod config;
mod host;

pub use config::{MachineMapping, SparkplugConfig, SparkplugConfigError, StateMapping};
pub(crate) use host::NAMESPACE;
pub use host::{DeviceStatus, Host, MetricStatus, NodeStatus, Publisher, WRITE_PREFIX};
