//! See `mesh_agent::fuzzing::config_yaml`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mesh_agent::fuzzing::config_yaml(data));
