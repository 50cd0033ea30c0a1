//! See `mesh_agent::fuzzing::hbone_connect`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::hbone_connect(data));
