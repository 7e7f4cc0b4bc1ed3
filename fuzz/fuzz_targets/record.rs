//! `cargo fuzz run record`: see [`idemgate_fuzz::record`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::record(data));
