//! What the edge's Sparkplug B host receives from nodes and devices: a session of births, data,
//! deaths, commands, other hosts' STATE and raw bytes on mapped and unmapped topics, plus
//! functions' write requests. The input is a script (see `millrace_edge::fuzzing`) so that the
//! fuzzer reaches the paths behind a valid birth, not only the protobuf decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    millrace_edge::fuzzing::sparkplug_session(data);
});
