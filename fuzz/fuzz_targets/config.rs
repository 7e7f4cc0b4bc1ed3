//! `cargo fuzz run config`: see [`idemgate_fuzz::config`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::config(data));
