//! `cargo fuzz run key_header`: see [`idemgate_fuzz::key_header`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::key_header(data));
