//! Canonical adapter reader: arbitrary bytes as a canonical file. Whatever it accepts must write
//! back and read again, and its transforms must build and run on a base that fits them.
#![no_main]

use boft::adapter::{canonical, Adapter};
use boft::checkpoint::SafeFile;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = SafeFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let Ok(adapter): Result<Adapter, _> = canonical::from_file(f) else {
        return;
    };
    common::exercise(&adapter);
});
