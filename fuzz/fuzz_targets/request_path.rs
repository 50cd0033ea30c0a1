//! See `mesh_agent::fuzzing::request_path`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::request_path(data));
