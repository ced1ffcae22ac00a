//! PEFT adapter importer. Input: a 4-byte little-endian length L, then L bytes of
//! `adapter_config.json`, then the bytes of `adapter_model.safetensors`.
#![no_main]

use boft::checkpoint::SafeFile;
use boft::formats::peft;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    let rest = &data[4..];
    let (config, weights) = rest.split_at(len.min(rest.len()));
    let Ok(f) = SafeFile::from_bytes(peft::WEIGHTS, weights.to_vec()) else {
        return;
    };
    let Ok(adapter) = peft::import_bytes(config, f) else {
        return;
    };
    common::exercise(&adapter);
});
