//! What a user deploys as a function (`POST /api/v1/functions`, `millrace-edge fn deploy`):
//! bytes loaded as a WebAssembly binary or WAT text, their imports and exports checked against
//! the host's. Loaded or refused with a message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = millrace_edge::fuzzing::load_function_module(data) {
        assert!(!e.is_empty());
    }
});
