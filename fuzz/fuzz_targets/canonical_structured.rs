//! Canonical reader, structure-aware: a random small canonical adapter (consistent or not, see
//! tests/common/canonical_gen.rs), sometimes with one byte of its header changed, written by the
//! library's writer and read back. A refusal is one line. What is accepted validates, round-trips
//! and runs (common.rs); and when it also fits the generated base and the merge plans it, the
//! dense reference of docs/FORMAT.md must agree that the targets make sense (a plan for targets
//! that contradict each other or the base would be silent corruption).
#![no_main]

use boft::adapter::{canonical, Adapter};
use boft::checkpoint::SafeFile;
use boft::merge::{self, Direction};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;
#[path = "structured.rs"]
mod structured;

use structured::{base_of, extremes, one_line, random_case, reference, Bytes, Draw};

fuzz_target!(|data: &[u8]| {
    let mut d = Bytes(data);
    let case = random_case(&mut d);
    let mut targets = case.targets.clone();
    extremes(&mut d, &mut targets);
    let adapter = Adapter {
        targets,
        source_format: "fuzz".into(),
        ..Default::default()
    };
    let Ok(mut bytes) = canonical::to_bytes(&adapter) else {
        return;
    };
    let flipped = d.chance(0.2);
    if flipped {
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let i = 8 + d.range(0, header_len.saturating_sub(1));
        bytes[i] = d.next() as u8;
    }
    let f = match SafeFile::from_bytes("adapter.safetensors", bytes) {
        Ok(f) => f,
        Err(e) => {
            assert!(
                flipped,
                "our own writer's file does not parse: {}",
                e.message
            );
            return one_line(&e);
        }
    };
    let mut a = match canonical::from_file(f) {
        Ok(a) => a,
        Err(e) => return one_line(&e),
    };
    common::exercise(&a);
    let base = base_of(&case);
    if let Err(e) = merge::fit_in(&base, &mut a, true, None).and_then(|_| a.materialise()) {
        return one_line(&e);
    }
    match merge::plan(&base, &a, Direction::Merge) {
        Err(e) => one_line(&e),
        Ok(_) if !flipped => assert!(
            reference(&a.targets, &case.shape, &case.w).is_some(),
            "planned a merge of targets that contradict each other or the base: {:#?} on {:?}",
            a.targets,
            case.shape
        ),
        Ok(_) => {}
    }
});
