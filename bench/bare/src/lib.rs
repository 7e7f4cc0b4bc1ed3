//! The benchmark floor without the proxy-wasm SDK and without `std`: a diagnostic.
//!
//! It does what `bench/floor` does — reads one request header (`idempotency-key`) and
//! continues — through its own declarations of the proxy-wasm ABI (0.2.1) instead of the
//! `proxy-wasm` crate, in a `no_std` module with a bump allocator. `make bench` reports its
//! size beside the floor's (how much of any filter is the SDK and Rust's std on wasm32-wasip1)
//! and its cost per request (how much of the floor's is the SDK's dispatching rather than
//! Envoy's own work for a wasm filter).
//!
//! Not a model for a filter: the allocator hands out memory from a fixed arena and takes it
//! all back at the next request's headers, which is right only for a filter that keeps
//! nothing the host gave it beyond the callback it got it in.
// Built for wasm32 only (`make bench`); on other targets the crate is empty, so the workspace's
// host builds (clippy, tests) pass over it.
#![cfg(target_arch = "wasm32")]
#![no_std]

use core::cell::UnsafeCell;

/// Header read per request (the one idemgate reads first).
const HEADER: &[u8] = b"idempotency-key";

const MAP_HTTP_REQUEST_HEADERS: u32 = 0;
const ACTION_CONTINUE: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// Memory the host asks for (header values): a bump arena, emptied at each request's headers.
struct Arena {
    bytes: UnsafeCell<[u8; ARENA]>,
    used: UnsafeCell<usize>,
}

const ARENA: usize = 64 * 1024;

// SAFETY: a proxy-wasm VM runs on one thread; no two callbacks run at once.
unsafe impl Sync for Arena {}

static ARENA_MEM: Arena = Arena {
    bytes: UnsafeCell::new([0; ARENA]),
    used: UnsafeCell::new(0),
};

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    // SAFETY: single-threaded VM (see `Arena`); the range handed out lies inside the arena.
    unsafe {
        let used = &mut *ARENA_MEM.used.get();
        let start = (*used + 7) & !7;
        match start.checked_add(size) {
            Some(end) if end <= ARENA => {
                *used = end;
                ARENA_MEM.bytes.get().cast::<u8>().add(start)
            }
            _ => core::ptr::null_mut(),
        }
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(_context_id: u32, _parent_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(_root_id: u32, _size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(_context_id: u32, _headers: usize, _eos: u32) -> u32 {
    // SAFETY: single-threaded VM; nothing handed out earlier is still in use.
    unsafe { *ARENA_MEM.used.get() = 0 }
    let mut data: *mut u8 = core::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes an address it got from `proxy_on_memory_allocate` and a size.
    let status = unsafe {
        proxy_get_header_map_value(
            MAP_HTTP_REQUEST_HEADERS,
            HEADER.as_ptr(),
            HEADER.len(),
            &mut data,
            &mut size,
        )
    };
    // The value is deliberately unused (black-boxed so the call is not elided).
    core::hint::black_box((status, data, size));
    ACTION_CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_log(_context_id: u32) {}

#[no_mangle]
pub extern "C" fn proxy_on_delete(_context_id: u32) {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}
