//! See `mesh_agent::fuzzing::api_object`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::api_object(data));
