//! `cargo fuzz run body`: see [`idemgate_fuzz::body`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::body(data));
