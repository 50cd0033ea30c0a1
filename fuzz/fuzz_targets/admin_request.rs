//! See `mesh_agent::fuzzing::admin_request`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::admin_request(data));
