//! A device message as ingest receives it: topic and JSON payload (split at the first NUL).
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace_shared::Event;

fuzz_target!(|data: &[u8]| {
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"factory/s/l/m/telemetry"[..], data),
    };
    let topic = String::from_utf8_lossy(topic);
    if let Ok(e) = Event::decode(&topic, payload) {
        // What was accepted encodes and decodes again.
        let again = Event::decode(&e.topic(), &e.to_payload()).expect("re-decodes");
        assert_eq!(again.machine, e.machine);
        assert_eq!(again.seq, e.seq);
    }
});
