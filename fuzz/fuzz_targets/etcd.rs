//! `cargo fuzz run etcd`: see [`idemgate_fuzz::etcd`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| idemgate_fuzz::etcd(data));
