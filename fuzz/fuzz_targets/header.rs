//! Checkpoint header parser: arbitrary bytes as a whole safetensors file.
#![no_main]

use boft::checkpoint::file::{parse_header, SafeFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((data_offset, tensors, _)) = parse_header(data) else {
        return;
    };
    // What the merge engine relies on: tensors tile the data section exactly, in order.
    assert!(data_offset <= data.len());
    let mut at = 0;
    for t in &tensors {
        assert_eq!(t.start, at);
        assert!(t.end >= t.start && data_offset + t.end <= data.len());
        let bytes = t.dtype.byte_len(t.numel() as u64).unwrap();
        assert_eq!(bytes, (t.end - t.start) as u64);
        at = t.end;
    }
    assert_eq!(data_offset + at, data.len());
    // The same bytes through SafeFile, and every tensor's data is reachable.
    let f = SafeFile::from_bytes("fuzz.safetensors", data.to_vec()).unwrap();
    for t in &f.tensors {
        assert_eq!(f.data(t).len(), t.end - t.start);
    }
});
