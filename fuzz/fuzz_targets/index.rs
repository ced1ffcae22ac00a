//! `model.safetensors.index.json` parser: whatever it accepts must name only paths inside the
//! checkpoint folder.
#![no_main]

use std::path::Component;

use boft::checkpoint::parse_index;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(shards) = parse_index(data) else {
        return;
    };
    assert!(!shards.is_empty());
    for (path, tensors) in &shards {
        assert!(!path.as_os_str().is_empty());
        assert!(
            path.components().all(|c| matches!(c, Component::Normal(_))),
            "escaping shard path {path:?}"
        );
        assert!(!tensors.is_empty());
    }
    let mut seen: Vec<_> = shards.iter().map(|(p, _)| p).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), shards.len(), "one shard listed twice");
});
