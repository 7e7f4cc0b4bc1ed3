//! `cargo fuzz run render`: see [`idemgate_fuzz::render`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::render(data));
