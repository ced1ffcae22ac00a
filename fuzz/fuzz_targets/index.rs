//! `model.safetensors.index.json` parser: whatever it accepts must name only paths inside the
//! checkpoint folder.
#![no_main]

use std::path::Component;

use boft::checkpoint::parse_index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = parse_index(data) else {
        return;
    };
    assert!(!index.shards.is_empty());
    for path in &index.shards {
        assert!(!path.as_os_str().is_empty());
        assert!(
            path.components().all(|c| matches!(c, Component::Normal(_))),
            "escaping shard path {path:?}"
        );
    }
    // Every shard listed holds a tensor, and every tensor's shard is listed.
    let mut held = vec![0usize; index.shards.len()];
    for (_, si) in index.entries() {
        held[si] += 1;
    }
    assert!(held.iter().all(|&n| n > 0), "a shard that holds nothing");
    let mut seen: Vec<_> = index.shards.iter().collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), index.shards.len(), "one shard listed twice");
});
