//! A device's byte stream at the MQTT door: the CONNECT header parser and the PUBLISH scanner,
//! fed in reads of sizes the input chooses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace_shared::mqtt::{Scanner, connect_level};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let _ = connect_level(rest);
    // The low bit picks the protocol version; the rest, how the stream is cut into reads.
    let mut scanner = Scanner::new(flags & 1 == 1, 64 * 1024);
    let mut out = Vec::new();
    let step = usize::from(flags >> 1).max(1);
    for chunk in rest.chunks(step) {
        if scanner.push(chunk, &mut out).is_err() {
            break;
        }
        // Whatever is found lies within what was sent.
        for p in out.drain(..) {
            assert!(p.topic.len() + p.payload.len() <= rest.len());
        }
    }
});
