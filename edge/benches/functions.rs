//! Per-invocation overhead of on-device functions (release build, one thread).
//!
//! Measures, in one run: a native Rust closure doing the threshold check (the baseline), a
//! trivial Wasm function (`handle` returns 0) and the threshold-alert example on a telemetry
//! event: median and p99 of one invocation (fresh store + instance + call + effects collected)
//! and invocations per second on one core.
//!
//! Run: cargo bench --workspace -p millrace-edge --bench functions [-- <invocations>]

use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace_edge::functions::{EventRef, FunctionEngine, Input, KvRead, TriggerKind, WasmEngine};
use millrace_shared::{Event, EventBody, MachineId, Reading, Telemetry};

struct NoKv;

impl KvRead for NoKv {
    fn get(&self, _key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }
}

fn input() -> Input {
    let e = Event {
        machine: MachineId::new("plant-1", "line-1", "press-01").unwrap(),
        ts_ms: 1_767_600_000_000,
        seq: 1,
        body: EventBody::Telemetry(Telemetry {
            readings: ["temperature", "vibration", "spindle_load", "power"]
                .iter()
                .map(|n| Reading {
                    name: (*n).into(),
                    value: 61.5,
                    unit: Default::default(),
                })
                .collect(),
        }),
    };
    Input {
        trigger: TriggerKind::Topic,
        topic: e.topic().into(),
        device: e.machine.to_string().into(),
        ts_ms: e.ts_ms,
        event: Some(EventRef::new(e)),
        payload: None,
        log_seq: Some(1),
        fired_ms: None,
        replay_at: None,
    }
}

struct Figures {
    median_us: f64,
    p99_us: f64,
    per_s: f64,
}

fn measure(n: usize, mut f: impl FnMut()) -> Figures {
    for _ in 0..n / 10 {
        f();
    }
    let mut each = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f();
        each.push(t.elapsed());
    }
    let total = start.elapsed();
    each.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Figures {
        median_us: us(each[n / 2]),
        p99_us: us(each[n * 99 / 100]),
        per_s: n as f64 / total.as_secs_f64(),
    }
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let engine = WasmEngine::new().unwrap();
    let kv: Arc<dyn KvRead> = Arc::new(NoKv);
    let input = input();
    let timeout = Duration::from_millis(100);
    let cap = 16 << 20;

    let native = measure(n, || {
        let t = match &input.event.as_ref().unwrap().body {
            EventBody::Telemetry(t) => t
                .readings
                .iter()
                .find(|r| r.name == "temperature")
                .map(|r| r.value),
            _ => None,
        };
        std::hint::black_box(t.is_some_and(|t| t > 72.0));
    });
    let trivial_module = engine
        .compile(
            br#"(module (func (export "handle") (result i32) (i32.const 0)))"#,
            cap,
        )
        .unwrap();
    let trivial = measure(n, || {
        let (r, _) = trivial_module.invoke(&input, kv.clone(), timeout, cap);
        r.unwrap();
    });
    let wat = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/functions/threshold_alert.wat"
    ))
    .unwrap();
    let threshold_module = engine.compile(&wat, cap).unwrap();
    let threshold = measure(n, || {
        let (r, _) = threshold_module.invoke(&input, kv.clone(), timeout, cap);
        r.unwrap();
    });
    let row = |name: &str, f: &Figures| {
        println!(
            "{name:<34} median {:>7.2} µs   p99 {:>7.2} µs   {:>10.0} invocations/s (one thread)",
            f.median_us, f.p99_us, f.per_s
        );
    };
    println!("{n} invocations each, one thread");
    row("native closure (baseline)", &native);
    row("wasm: trivial handle", &trivial);
    row("wasm: threshold_alert.wat", &threshold);
    println!(
        "{}",
        serde_json::json!({
            "invocations": n,
            "native_median_us": native.median_us,
            "trivial_median_us": trivial.median_us,
            "trivial_p99_us": trivial.p99_us,
            "trivial_per_s": trivial.per_s,
            "threshold_median_us": threshold.median_us,
            "threshold_p99_us": threshold.p99_us,
            "threshold_per_s": threshold.per_s,
        })
    );
}
