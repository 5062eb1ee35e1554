//! The WebAssembly runtime (wasmtime, core modules) and the host ABI functions see.
//!
//! The ABI (documented for users in `docs/functions.md`): a module exports `memory` and
//! `handle: () -> i32` (0 = success) and/or `handle_batch: (count: i32) -> i32` (several
//! events in one invocation; `select_event(i)` makes event `i` the one the input functions
//! read), and imports what it needs from the module `millrace`.
//! Each invocation gets a fresh instance (from an [`InstancePre`]): nothing survives between
//! invocations but what the function writes to its key-value store. Actions (publish, points,
//! alerts, key-value writes) are buffered and take effect only if the invocation succeeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use millrace_shared::{Event, EventBody};
use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, ResourceLimiter, Store, Trap, ValType,
};

use super::{Effects, Input, InvokeError, KvRead, LogLine, Point};

/// How often the epoch advances: the resolution of time limits.
pub const TICK: Duration = Duration::from_millis(2);

/// Most actions (publishes + points + alerts + key-value writes) one invocation may take.
pub const MAX_ACTIONS: usize = 10_000;
/// Most log lines one invocation keeps (later ones are counted, not kept).
pub const MAX_LOG_LINES: usize = 100;
/// Longest log line kept, bytes.
pub const MAX_LOG_LINE: usize = 1024;
/// Longest key-value key and value, bytes.
pub const MAX_KV_KEY: usize = 256;
/// Longest key-value value, bytes.
pub const MAX_KV_VALUE: usize = 64 * 1024;

/// A function engine: compiles modules into something that can be invoked. The edge uses
/// [`WasmEngine`]; the trait keeps the rest of the edge independent of wasmtime.
pub trait FunctionEngine: Send + Sync + std::fmt::Debug {
    /// Validates and compiles a module (binary Wasm or WAT text).
    fn compile(&self, module: &[u8], memory_cap: u64) -> Result<Arc<dyn Compiled>, String>;
}

/// A compiled function.
pub trait Compiled: Send + Sync + std::fmt::Debug {
    /// Runs one invocation with a fresh instance.
    fn invoke(
        &self,
        input: &Input,
        kv: Arc<dyn KvRead>,
        timeout: Duration,
        memory_cap: u64,
    ) -> (Result<(), InvokeError>, Effects) {
        self.invoke_batch(Arc::new(vec![input.clone()]), kv, timeout, memory_cap)
    }

    /// Runs one invocation over `inputs` with a fresh instance: `handle_batch(len)` when the
    /// module exports it (and `handle` for a single event when it exports that too), else
    /// `handle`, and then `inputs` holds one event.
    fn invoke_batch(
        &self,
        inputs: Arc<Vec<Input>>,
        kv: Arc<dyn KvRead>,
        timeout: Duration,
        memory_cap: u64,
    ) -> (Result<(), InvokeError>, Effects);

    /// Whether the module exports `handle_batch`.
    fn takes_batches(&self) -> bool {
        false
    }
}

/// wasmtime with epoch interruption; a ticker thread advances the epoch every [`TICK`].
#[derive(Debug)]
pub struct WasmEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    stop: Arc<AtomicBool>,
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl WasmEngine {
    /// Creates the engine (256 MiB largest memory, 256 instances at once) and starts its
    /// epoch ticker.
    pub fn new() -> Result<Self, String> {
        Self::with_limits(256, 256)
    }

    /// Creates the engine with a pool of `slots` instances (invocations running at once across
    /// all functions) whose memories can grow to `max_memory_mib`, and starts its epoch ticker.
    /// Pooled instances reuse their memory mappings: instantiation costs no `mmap`.
    pub fn with_limits(max_memory_mib: u32, slots: u32) -> Result<Self, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(512 << 10);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .max_memory_size((max_memory_mib as usize) << 20)
            .linear_memory_keep_resident(64 << 10)
            .table_keep_resident(4 << 10);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let linker = Arc::new(host_linker(&engine).map_err(|e| e.to_string())?);
        let stop = Arc::new(AtomicBool::new(false));
        std::thread::Builder::new()
            .name("millrace-fn-epoch".into())
            .spawn({
                let (engine, stop) = (engine.clone(), stop.clone());
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            engine,
            linker,
            stop,
        })
    }
}

/// The signature of each host import: (params, results).
fn host_signature(name: &str) -> Option<(&'static [ValType], &'static [ValType])> {
    use ValType::{F64, I32, I64};
    Some(match name {
        "log" => (&[I32, I32, I32], &[]),
        "input_len" => (&[I32], &[I32]),
        "input_read" => (&[I32, I32, I32], &[I32]),
        "event_ts" | "now_ms" => (&[], &[I64]),
        "event_number" => (&[I32, I32], &[F64]),
        "event_string" => (&[I32, I32, I32, I32], &[I32]),
        "publish" => (&[I32, I32, I32, I32], &[I32]),
        "write_point" => (&[I32, I32, I64, F64], &[I32]),
        "alert" => (&[I32, I32, I32], &[I32]),
        "kv_get" => (&[I32, I32, I32, I32], &[I32]),
        "kv_set" => (&[I32, I32, I32, I32], &[I32]),
        "kv_delete" => (&[I32, I32], &[I32]),
        "select_event" => (&[I32], &[I32]),
        _ => return None,
    })
}

fn same_types(a: impl ExactSizeIterator<Item = ValType>, b: &[ValType]) -> bool {
    a.len() == b.len() && a.zip(b).all(|(x, y)| ValType::eq(&x, y))
}

fn types(t: impl Iterator<Item = ValType>) -> String {
    let v: Vec<String> = t.map(|t| t.to_string()).collect();
    format!("({})", v.join(", "))
}

impl FunctionEngine for WasmEngine {
    fn compile(&self, bytes: &[u8], memory_cap: u64) -> Result<Arc<dyn Compiled>, String> {
        let is_binary = bytes.starts_with(b"\0asm");
        if !is_binary && std::str::from_utf8(bytes).is_err() {
            return Err(
                "not a WebAssembly module: neither Wasm binary (\\0asm) nor WAT text".into(),
            );
        }
        let module = Module::new(&self.engine, bytes).map_err(|e| {
            let e = format!("{e:#}");
            if is_binary {
                format!("invalid WebAssembly module: {e}")
            } else {
                format!("not a valid WAT/WebAssembly module: {e}")
            }
        })?;
        // Imports: only the host's, with the right signatures.
        for import in module.imports() {
            let (m, n) = (import.module(), import.name());
            let ExternType::Func(f) = import.ty() else {
                return Err(format!(
                    "imports `{m}.{n}`, which is not a function: the host provides functions only (export your own memory)"
                ));
            };
            let expected = match (m, n) {
                ("millrace", n) => host_signature(n),
                // AssemblyScript's runtime reports failed assertions through `env.abort`.
                ("env", "abort") => Some((
                    &[ValType::I32, ValType::I32, ValType::I32, ValType::I32][..],
                    &[][..],
                )),
                _ => None,
            };
            let Some((params, results)) = expected else {
                return Err(format!(
                    "imports `{m}.{n}`, which the host does not provide (see docs/functions.md for the `millrace` imports)"
                ));
            };
            if !same_types(f.params(), params) || !same_types(f.results(), results) {
                return Err(format!(
                    "imports `{m}.{n}` with signature {} -> {}, expected {} -> {}",
                    types(f.params()),
                    types(f.results()),
                    types(params.iter().cloned()),
                    types(results.iter().cloned())
                ));
            }
        }
        // Exports: `handle: () -> i32` and/or `handle_batch: (i32) -> i32`, and `memory` if it
        // uses pointers.
        let entry = |name: &str, params: &[ValType]| -> Result<bool, String> {
            let Some(export) = module.get_export(name) else {
                return Ok(false);
            };
            let ExternType::Func(h) = export else {
                return Err(format!("exports `{name}`, but it is not a function"));
            };
            if !same_types(h.params(), params) || !same_types(h.results(), &[ValType::I32]) {
                return Err(format!(
                    "exports `{name}` with signature {} -> {}, expected {} -> (i32)",
                    types(h.params()),
                    types(h.results()),
                    types(params.iter().cloned()),
                ));
            }
            Ok(true)
        };
        let single = entry("handle", &[])?;
        let batch = entry("handle_batch", &[ValType::I32])?;
        if !single && !batch {
            return Err(
                "exports no function `handle` (the entry point: `(func (export \"handle\") (result i32))`) nor `handle_batch` (`(func (export \"handle_batch\") (param i32) (result i32))`)"
                    .into(),
            );
        }
        let needs_memory = module
            .imports()
            .any(|i| !matches!(i.name(), "event_ts" | "now_ms" | "select_event"));
        match module.get_export("memory") {
            Some(ExternType::Memory(m)) => {
                let initial = m.minimum().saturating_mul(m.page_size());
                if initial > memory_cap {
                    return Err(format!(
                        "its memory starts at {} KiB, above the function's memory limit of {} KiB",
                        initial >> 10,
                        memory_cap >> 10
                    ));
                }
            }
            Some(_) => return Err("exports `memory`, but it is not a memory".into()),
            None if needs_memory => {
                return Err(
                    "exports no `memory`: the host reads and writes the function's memory through it"
                        .into(),
                );
            }
            None => {}
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| format!("cannot link the module: {e:#}"))?;
        Ok(Arc::new(WasmFunction {
            engine: self.engine.clone(),
            pre,
            single,
            batch,
        }))
    }
}

/// A compiled module, ready to instantiate.
struct WasmFunction {
    engine: Engine,
    pre: InstancePre<HostState>,
    /// Exports `handle`.
    single: bool,
    /// Exports `handle_batch`.
    batch: bool,
}

impl std::fmt::Debug for WasmFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmFunction").finish_non_exhaustive()
    }
}

impl Compiled for WasmFunction {
    fn takes_batches(&self) -> bool {
        self.batch
    }

    fn invoke_batch(
        &self,
        inputs: Arc<Vec<Input>>,
        kv: Arc<dyn KvRead>,
        timeout: Duration,
        memory_cap: u64,
    ) -> (Result<(), InvokeError>, Effects) {
        let count = inputs.len();
        let state = HostState {
            inputs,
            current: 0,
            payload: None,
            effects: Effects::default(),
            kv_overlay: BTreeMap::new(),
            kv,
            memory_cap: memory_cap as usize,
            memory_exceeded: false,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // The limit is the invocation's CPU time, so that a function descheduled under load is
        // not stopped for time it did not use; wall time is capped at 1.5 times the limit.
        let ticks = |d: Duration| d.as_micros().div_ceil(TICK.as_micros()) as u64 + 1;
        store.set_epoch_deadline(ticks(timeout));
        // Thread CPU time as a plain duration (the callback runs on this thread).
        let cpu = || cpu_time::ThreadTime::now().as_duration();
        let (cpu0, wall0) = (cpu(), std::time::Instant::now());
        let wall_cap = timeout * 3 / 2;
        store.epoch_deadline_callback(move |_| {
            let (used, wall) = (cpu().saturating_sub(cpu0), wall0.elapsed());
            if used >= timeout || wall >= wall_cap {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            } else {
                // Check again when either limit can next be reached.
                Ok(wasmtime::UpdateDeadline::Continue(ticks(
                    (timeout - used).min(wall_cap - wall),
                )))
            }
        });
        let result = (|| {
            let instance = self.pre.instantiate(&mut store)?;
            if self.batch && (count > 1 || !self.single) {
                let handle = instance.get_typed_func::<i32, i32>(&mut store, "handle_batch")?;
                handle.call(&mut store, count as i32)
            } else {
                let handle = instance.get_typed_func::<(), i32>(&mut store, "handle")?;
                handle.call(&mut store, ())
            }
        })();
        let exceeded = store.data().memory_exceeded;
        let effects = std::mem::take(&mut store.data_mut().effects);
        let overlay = std::mem::take(&mut store.data_mut().kv_overlay);
        let mut effects = effects;
        let outcome = match result {
            Ok(0) => {
                effects.kv = overlay.into_iter().collect();
                Ok(())
            }
            Ok(code) if self.batch && (count > 1 || !self.single) => {
                Err(InvokeError::Failed(format!("handle_batch returned {code}")))
            }
            Ok(code) => Err(InvokeError::Failed(format!("handle returned {code}"))),
            Err(_) if exceeded => Err(InvokeError::Memory(format!(
                "memory limit of {} KiB exceeded",
                memory_cap >> 10
            ))),
            Err(e) => match e.downcast_ref::<Trap>() {
                Some(Trap::Interrupt) => Err(InvokeError::Timeout(format!(
                    "stopped at its time limit of {} ms (CPU time; wall time at most 1.5 times that)",
                    timeout.as_millis()
                ))),
                Some(t) => Err(InvokeError::Trap(format!("{t}"))),
                None => Err(InvokeError::Trap(format!("{e:#}"))),
            },
        };
        (outcome, effects)
    }
}

/// What one instance sees of the host.
struct HostState {
    /// The invocation's events (one, except for `handle_batch`).
    inputs: Arc<Vec<Input>>,
    /// The one the input functions read (`select_event`).
    current: usize,
    /// The payload bytes, made on first use.
    payload: Option<Arc<Vec<u8>>>,
    effects: Effects,
    /// Key-value writes of this invocation (read back by `kv_get`, applied on success).
    kv_overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    kv: Arc<dyn KvRead>,
    memory_cap: usize,
    memory_exceeded: bool,
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.memory_exceeded = true;
            wasmtime::bail!("memory limit of {} KiB exceeded", self.memory_cap >> 10);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl HostState {
    fn input(&self) -> &Input {
        &self.inputs[self.current]
    }

    fn payload(&mut self) -> Arc<Vec<u8>> {
        if self.payload.is_none() {
            self.payload = Some(self.input().payload_bytes());
        }
        self.payload.clone().expect("set above")
    }

    /// Records why an action was refused (the call returns -1 to the function).
    fn refuse(&mut self, message: String) -> i32 {
        self.effects.logs.push(LogLine {
            level: "error",
            message,
        });
        -1
    }

    /// Sets (`Some`) or deletes (`None`) a key for this invocation.
    fn kv_write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> wasmtime::Result<i32> {
        if !self.kv_overlay.contains_key(&key) {
            self.action()?;
        }
        self.kv_overlay.insert(key, value);
        Ok(0)
    }

    fn action(&mut self) -> wasmtime::Result<()> {
        let e = &self.effects;
        if e.publishes.len() + e.points.len() + e.alerts.len() + self.kv_overlay.len()
            >= MAX_ACTIONS
        {
            wasmtime::bail!("more than {MAX_ACTIONS} actions in one invocation");
        }
        Ok(())
    }
}

type Cx<'a> = Caller<'a, HostState>;

/// The guest's memory and the host state.
fn memory<'a>(caller: &'a mut Cx<'_>) -> wasmtime::Result<(&'a mut [u8], &'a mut HostState)> {
    let m = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::format_err!("the module exports no `memory`"))?;
    Ok(m.data_and_store_mut(caller))
}

fn range(mem: &[u8], ptr: i32, len: i32) -> wasmtime::Result<std::ops::Range<usize>> {
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    if len < 0 || p.checked_add(l).is_none_or(|end| end > mem.len()) {
        wasmtime::bail!("pointer {ptr} + length {len} is outside the module's memory");
    }
    Ok(p..p + l)
}

/// A string in the guest's memory, borrowed (no copy: field names are read once per call).
fn text_ref<'m>(mem: &'m [u8], ptr: i32, len: i32, what: &str) -> wasmtime::Result<&'m str> {
    let r = range(mem, ptr, len)?;
    std::str::from_utf8(&mem[r]).map_err(|_| wasmtime::format_err!("{what} is not UTF-8"))
}

fn text(mem: &[u8], ptr: i32, len: i32, what: &str) -> wasmtime::Result<String> {
    let r = range(mem, ptr, len)?;
    String::from_utf8(mem[r].to_vec()).map_err(|_| wasmtime::format_err!("{what} is not UTF-8"))
}

/// One part of the input, as `input_len` and `input_read` number them.
enum InputPart<'a> {
    Text(&'a str),
    Owned(String),
    Payload(Arc<Vec<u8>>),
}

impl InputPart<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Owned(t) => t.as_bytes(),
            Self::Payload(p) => p,
        }
    }
}

/// Part 0 the topic, 1 the payload, 2 the device, 3 the trigger kind, 4 the trigger's id.
fn input_part(st: &mut HostState, part: i32) -> Option<InputPart<'_>> {
    Some(match part {
        0 => InputPart::Text(st.input().topic.as_ref()),
        1 => InputPart::Payload(st.payload()),
        2 => InputPart::Text(st.input().device.as_ref()),
        3 => InputPart::Text(st.input().trigger.as_str()),
        4 => InputPart::Owned(st.input().trigger_id()),
        _ => return None,
    })
}

/// Copies `src` to the guest at `ptr` if it fits in `cap`; returns its full length, or -1 when
/// there is nothing (no such part, field or key).
fn copy_out(mem: &mut [u8], ptr: i32, cap: i32, src: Option<&[u8]>) -> wasmtime::Result<i32> {
    let Some(src) = src else {
        return Ok(-1);
    };
    if src.len() <= cap.max(0) as usize {
        let r = range(mem, ptr, src.len() as i32)?;
        mem[r].copy_from_slice(src);
    }
    Ok(src.len() as i32)
}

/// A number of the triggering event by name: a reading's value, or a numeric field.
fn event_number(input: &Input, key: &str) -> Option<f64> {
    if let Some(e) = &input.event {
        return match (&e.body, key) {
            (_, "ts") => Some(e.ts_ms as f64),
            (_, "seq") => Some(e.seq as f64),
            (EventBody::Telemetry(t), k) => {
                t.readings.iter().find(|r| r.name == k).map(|r| r.value)
            }
            (EventBody::Part(p), "cycle_time_ms") => Some(f64::from(p.cycle_time_ms)),
            _ => None,
        };
    }
    let v: serde_json::Value = serde_json::from_slice(&input.payload_bytes()).ok()?;
    v.get(key).and_then(|x| x.as_f64()).or_else(|| {
        v.get("readings")?
            .as_array()?
            .iter()
            .find(|r| r.get("name").and_then(|n| n.as_str()) == Some(key))?
            .get("value")?
            .as_f64()
    })
}

/// A text field of the triggering event by name.
fn event_string(input: &Input, key: &str) -> Option<String> {
    if let Some(e) = &input.event {
        return event_field(e, key);
    }
    let v: serde_json::Value = serde_json::from_slice(&input.payload_bytes()).ok()?;
    v.get(key).and_then(|x| x.as_str()).map(str::to_owned)
}

fn event_field(e: &Event, key: &str) -> Option<String> {
    let m = &e.machine;
    Some(match (key, &e.body) {
        ("kind", b) => b.kind().as_str().to_owned(),
        ("site", _) => m.site.to_string(),
        ("line", _) => m.line.to_string(),
        ("machine", _) => m.machine.to_string(),
        ("state", EventBody::State(s)) => s.state.as_str().to_owned(),
        ("reason", EventBody::State(s)) => s.reason?.as_str().to_owned(),
        ("outcome", EventBody::Part(p)) => p.outcome.as_str().to_owned(),
        ("part_id", EventBody::Part(p)) => p.part_id.clone()?,
        ("operator", EventBody::Operator(o)) => o.operator.clone(),
        ("action", EventBody::Operator(o)) => match o.action {
            millrace_shared::OperatorAction::Login => "login".into(),
            millrace_shared::OperatorAction::Logout => "logout".into(),
        },
        _ => return None,
    })
}

fn host_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut l: Linker<HostState> = Linker::new(engine);
    l.func_wrap(
        "millrace",
        "log",
        |mut c: Cx<'_>, level: i32, ptr: i32, len: i32| {
            let (mem, st) = memory(&mut c)?;
            let r = range(mem, ptr, len)?;
            let mut line = String::from_utf8_lossy(&mem[r]).into_owned();
            if line.len() > MAX_LOG_LINE {
                let mut cut = MAX_LOG_LINE;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
            }
            if st.effects.logs.len() < MAX_LOG_LINES {
                st.effects.logs.push(LogLine {
                    level: match level {
                        0 => "debug",
                        1 => "info",
                        2 => "warn",
                        _ => "error",
                    },
                    message: line,
                });
            } else {
                st.effects.logs_dropped += 1;
            }
            Ok(())
        },
    )?;
    l.func_wrap("millrace", "input_len", |mut c: Cx<'_>, part: i32| {
        Ok(input_part(c.data_mut(), part).map_or(-1, |p| p.bytes().len() as i32))
    })?;
    l.func_wrap(
        "millrace",
        "input_read",
        |mut c: Cx<'_>, part: i32, ptr: i32, cap: i32| {
            let (mem, st) = memory(&mut c)?;
            let part = input_part(st, part);
            copy_out(mem, ptr, cap, part.as_ref().map(InputPart::bytes))
        },
    )?;
    l.func_wrap("millrace", "event_ts", |c: Cx<'_>| {
        Ok(c.data().input().ts_ms)
    })?;
    l.func_wrap("millrace", "select_event", |mut c: Cx<'_>, index: i32| {
        let st = c.data_mut();
        if index < 0 || index as usize >= st.inputs.len() {
            return Ok(-1);
        }
        if st.current != index as usize {
            st.current = index as usize;
            st.payload = None;
        }
        Ok(0)
    })?;
    l.func_wrap("millrace", "now_ms", |_c: Cx<'_>| {
        Ok(chrono::Utc::now().timestamp_millis())
    })?;
    l.func_wrap(
        "millrace",
        "event_number",
        |mut c: Cx<'_>, ptr: i32, len: i32| {
            let (mem, st) = memory(&mut c)?;
            let key = text_ref(mem, ptr, len, "the field name")?;
            Ok(event_number(st.input(), key).unwrap_or(f64::NAN))
        },
    )?;
    l.func_wrap(
        "millrace",
        "event_string",
        |mut c: Cx<'_>, ptr: i32, len: i32, out: i32, cap: i32| {
            let (mem, st) = memory(&mut c)?;
            let key = text_ref(mem, ptr, len, "the field name")?;
            let value = event_string(st.input(), key);
            copy_out(mem, out, cap, value.as_ref().map(|v| v.as_bytes()))
        },
    )?;
    l.func_wrap(
        "millrace",
        "publish",
        |mut c: Cx<'_>, tp: i32, tl: i32, pp: i32, pl: i32| {
            let (mem, st) = memory(&mut c)?;
            let topic = text(mem, tp, tl, "the topic")?;
            if topic.is_empty() || topic.contains(['+', '#']) || topic.starts_with('$') {
                return Ok(st.refuse(format!(
                    "publish refused: `{topic}` is not a topic to publish to"
                )));
            }
            let payload = mem[range(mem, pp, pl)?].to_vec();
            st.action()?;
            st.effects.publishes.push((topic, payload));
            Ok(0)
        },
    )?;
    l.func_wrap(
        "millrace",
        "write_point",
        |mut c: Cx<'_>, sp: i32, sl: i32, ts: i64, value: f64| {
            let (mem, st) = memory(&mut c)?;
            let series = text(mem, sp, sl, "the series")?;
            match Point::parse(&series, ts, value) {
                Ok(p) => {
                    st.action()?;
                    st.effects.points.push(p);
                    Ok(0)
                }
                Err(e) => Ok(st.refuse(format!("write_point refused: {e}"))),
            }
        },
    )?;
    l.func_wrap(
        "millrace",
        "alert",
        |mut c: Cx<'_>, severity: i32, ptr: i32, len: i32| {
            let (mem, st) = memory(&mut c)?;
            let message = text(mem, ptr, len, "the alert message")?;
            st.action()?;
            let event = st.current;
            st.effects.alerts.push((
                match severity {
                    0 => "info",
                    1 => "warning",
                    _ => "critical",
                },
                message,
                event,
            ));
            Ok(0)
        },
    )?;
    l.func_wrap(
        "millrace",
        "kv_get",
        |mut c: Cx<'_>, kp: i32, kl: i32, out: i32, cap: i32| {
            let (mem, st) = memory(&mut c)?;
            let key = mem[range(mem, kp, kl)?].to_vec();
            let value = match st.kv_overlay.get(&key) {
                Some(v) => v.clone(),
                None => st
                    .kv
                    .get(&key)
                    .map_err(|e| wasmtime::format_err!("key-value store: {e}"))?,
            };
            copy_out(mem, out, cap, value.as_deref())
        },
    )?;
    l.func_wrap(
        "millrace",
        "kv_set",
        |mut c: Cx<'_>, kp: i32, kl: i32, vp: i32, vl: i32| {
            let (mem, st) = memory(&mut c)?;
            if kl as u32 as usize > MAX_KV_KEY || vl as u32 as usize > MAX_KV_VALUE {
                wasmtime::bail!(
                    "kv_set: keys are at most {MAX_KV_KEY} bytes and values {MAX_KV_VALUE}"
                );
            }
            let key = mem[range(mem, kp, kl)?].to_vec();
            let value = mem[range(mem, vp, vl)?].to_vec();
            st.kv_write(key, Some(value))
        },
    )?;
    l.func_wrap(
        "millrace",
        "kv_delete",
        |mut c: Cx<'_>, kp: i32, kl: i32| {
            let (mem, st) = memory(&mut c)?;
            let key = mem[range(mem, kp, kl)?].to_vec();
            st.kv_write(key, None)
        },
    )?;
    l.func_wrap(
        "env",
        "abort",
        |_c: Cx<'_>, _msg: i32, _file: i32, line: i32, col: i32| -> wasmtime::Result<()> {
            wasmtime::bail!("the module called abort (line {line}, column {col})")
        },
    )?;
    Ok(l)
}
