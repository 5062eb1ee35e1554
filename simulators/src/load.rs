//! Load mode for benchmarks: N devices, each its own MQTT connection, publishing telemetry at a
//! fixed total rate (or as fast as the broker takes it) with the current wall-clock time as the
//! event timestamp, so that the receiving side can measure latency. Each device writes all its
//! due publishes at once (`WireDevice`, on rumqttc's packet codec), so that the load
//! generator costs less CPU than what it measures; QoS 2 goes through rumqttc's full client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use millrace_shared::{Event, EventBody, MachineId, Reading, Telemetry};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::Instant;

use rumqttc::QoS;

use crate::publish::{BrokerOptions, PublishError, Publisher};

mod wire;

use wire::WireDevice;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Broker connection template; the client id gets the device number appended.
    pub broker: BrokerOptions,
    /// Number of devices (connections).
    pub devices: u32,
    /// Events per second over all devices; 0 means unlimited.
    pub rate: u64,
    /// How long to send.
    pub duration: Duration,
    /// Readings per telemetry event.
    pub readings: usize,
    /// Site id of the simulated devices.
    pub site: String,
    /// What the devices speak.
    pub format: LoadFormat,
}

/// The payloads of the load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    /// Millrace's JSON telemetry on `factory/{site}/{line}/{device}/telemetry`.
    #[default]
    Json,
    /// Sparkplug B: each device is an edge node (`spBv1.0/{site}/…/dev-N`) that publishes an
    /// NBIRTH declaring its metrics with aliases, then NDATA with every metric by alias only,
    /// as PLC gateways do.
    Sparkplug,
}

/// What was sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Devices connected.
    pub devices: u32,
    /// Events published.
    pub published: u64,
    /// Acknowledgements received.
    pub acked: u64,
    /// Seconds spent publishing (until the last acknowledgement).
    pub elapsed_s: f64,
    /// Events per second achieved.
    pub rate_per_s: f64,
    /// Target rate (0 = unlimited).
    pub target_rate: u64,
    /// Connections made after the first, over all devices.
    #[serde(default)]
    pub reconnects: u64,
}

/// The id of load device `i`: 100 devices per line.
pub fn device_id(site: &str, i: u32) -> MachineId {
    MachineId::new(site, format!("line-{}", i / 100 + 1), format!("dev-{i:05}")).expect("valid ids")
}

/// How long the end of a run waits for the last acknowledgements.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// One device of the load: the wire device for QoS 0 and 1, rumqttc's full client for QoS 2.
#[derive(Debug)]
enum Device {
    Wire(WireDevice),
    Client(Publisher),
}

impl Device {
    async fn connect(
        opts: &BrokerOptions,
        first_by: Instant,
        give_up_at: Instant,
    ) -> Result<Self, PublishError> {
        Ok(match opts.qos {
            QoS::ExactlyOnce => Self::Client(Publisher::connect(opts).await?),
            _ => Self::Wire(WireDevice::connect(opts, first_by, give_up_at).await?),
        })
    }

    fn reconnects(&self) -> u64 {
        match self {
            Self::Wire(d) => d.reconnects(),
            Self::Client(p) => p.counters().reconnects.load(Ordering::Relaxed),
        }
    }

    async fn publish_all(
        &mut self,
        topic: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(), PublishError> {
        match self {
            Self::Wire(d) => d.publish_all(topic, payloads).await,
            Self::Client(p) => {
                for payload in payloads {
                    p.publish(topic.to_owned(), payload).await?;
                }
                Ok(())
            }
        }
    }

    async fn keep_alive(&mut self) -> Result<(), PublishError> {
        match self {
            Self::Wire(d) => d.keep_alive().await,
            Self::Client(_) => Ok(()),
        }
    }

    /// Waits for the acknowledgements and disconnects; returns how many arrived.
    async fn close(self) -> Result<u64, PublishError> {
        let timeout = CLOSE_TIMEOUT;
        match self {
            Self::Wire(d) => d.close(timeout).await,
            Self::Client(p) => {
                let counters = p.counters().clone();
                // `close` waits for the acknowledgements first.
                p.close(timeout).await?;
                Ok(counters.acked.load(Ordering::Relaxed))
            }
        }
    }
}

/// Runs the load and reports what it achieved.
pub async fn run_load(opts: &LoadOptions) -> Result<LoadReport, PublishError> {
    let mut devices = Vec::with_capacity(opts.devices as usize);
    // Devices try to connect for as long as the run lasts, and reconnect while the broker is
    // away until the run's time and the wait for the last acknowledgements are over.
    let first_by = Instant::now() + opts.duration;
    let give_up_at = first_by + CLOSE_TIMEOUT;
    for i in 0..opts.devices {
        let mut b = opts.broker.clone();
        b.client_id = format!("{}-{i}", opts.broker.client_id);
        devices.push(Device::connect(&b, first_by, give_up_at).await?);
    }
    let per_device = opts.rate as f64 / f64::from(opts.devices.max(1));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, mut device) in devices.into_iter().enumerate() {
        let id = device_id(&opts.site, i as u32);
        let (duration, readings, stop, format) =
            (opts.duration, opts.readings, stop.clone(), opts.format);
        tasks.spawn(async move {
            let topic = match format {
                LoadFormat::Json => id.topic(millrace_shared::EventKind::Telemetry),
                LoadFormat::Sparkplug => {
                    let node = format!("spBv1.0/{}/NBIRTH/{}", id.site, id.machine);
                    device
                        .publish_all(&node, vec![sparkplug::birth(readings)])
                        .await?;
                    format!("spBv1.0/{}/NDATA/{}", id.site, id.machine)
                }
            };
            let payload = |n: u64| match format {
                LoadFormat::Json => telemetry(&id, n, readings).to_payload(),
                LoadFormat::Sparkplug => sparkplug::data(n, readings),
            };
            let mut seq = 0u64;
            while t0.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                let due = if per_device > 0.0 {
                    (t0.elapsed().as_secs_f64() * per_device) as u64
                } else {
                    seq + 256
                };
                // Everything due goes out in one write, stamped when it is encoded.
                let batch: Vec<Vec<u8>> = (seq + 1..=due).map(payload).collect();
                seq = seq.max(due);
                device.publish_all(&topic, batch).await?;
                if per_device > 0.0 {
                    device.keep_alive().await?;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                } else {
                    tokio::task::yield_now().await;
                }
            }
            Ok::<(u64, Device), PublishError>((seq, device))
        });
    }
    let (mut published, mut done) = (0, Vec::with_capacity(opts.devices as usize));
    while let Some(r) = tasks.join_next().await {
        match r.expect("load task panicked") {
            Ok((n, device)) => {
                published += n;
                done.push(device);
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
    let (mut acked, mut reconnects) = (0, 0);
    for device in done {
        reconnects += device.reconnects();
        acked += device.close().await?;
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    Ok(LoadReport {
        devices: opts.devices,
        published,
        acked,
        elapsed_s,
        rate_per_s: published as f64 / elapsed_s.max(1e-9),
        target_rate: opts.rate,
        reconnects,
    })
}

/// Sparkplug B payloads of a load device (encoded with the prost code of Eclipse Tahu's
/// `sparkplug_b.proto`, from `srad-types`).
mod sparkplug {
    use srad_types::payload::{DataType, Message as _, Metric, Payload, metric::Value};

    fn now() -> u64 {
        chrono::Utc::now().timestamp_millis() as u64
    }

    /// The NBIRTH: `bdSeq` 0 and `m0`…`m{readings-1}` (Double) with aliases 1….
    pub(super) fn birth(readings: usize) -> Vec<u8> {
        let t = now();
        let mut metrics = vec![Metric {
            name: Some("bdSeq".into()),
            timestamp: Some(t),
            datatype: Some(DataType::Int64 as u32),
            value: Some(Value::LongValue(0)),
            ..Default::default()
        }];
        metrics.extend((0..readings).map(|i| Metric {
            name: Some(format!("m{i}")),
            alias: Some(i as u64 + 1),
            timestamp: Some(t),
            datatype: Some(DataType::Double as u32),
            value: Some(Value::DoubleValue(0.0)),
            ..Default::default()
        }));
        Payload {
            timestamp: Some(t),
            seq: Some(0),
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// The `n`th NDATA (seq `n` mod 256): every metric by alias, no name, no type.
    pub(super) fn data(n: u64, readings: usize) -> Vec<u8> {
        let t = now();
        Payload {
            timestamp: Some(t),
            seq: Some(n % 256),
            metrics: (0..readings)
                .map(|i| Metric {
                    alias: Some(i as u64 + 1),
                    timestamp: Some(t),
                    value: Some(Value::DoubleValue(
                        ((n % 1000) as f64 * 0.01 + i as f64 * 10.0 + 20.0).round(),
                    )),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

fn telemetry(id: &MachineId, seq: u64, readings: usize) -> Event {
    let now = chrono::Utc::now().timestamp_millis();
    const NAMES: [(&str, &str); 4] = [
        ("temperature", "degC"),
        ("vibration", "mm/s"),
        ("spindle_load", "%"),
        ("power", "kW"),
    ];
    let readings = (0..readings)
        .map(|i| {
            let (name, unit) = NAMES[i % NAMES.len()];
            Reading {
                name: if i < NAMES.len() {
                    name.into()
                } else {
                    format!("{name}_{i}").into()
                },
                value: ((seq % 1000) as f64 * 0.01 + i as f64 * 10.0 + 20.0).round(),
                unit: unit.into(),
            }
        })
        .collect();
    Event {
        machine: id.clone(),
        ts_ms: now,
        seq,
        body: EventBody::Telemetry(Telemetry { readings }),
    }
}
