//! See `mesh_agent::fuzzing::detect`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::detect(data));
