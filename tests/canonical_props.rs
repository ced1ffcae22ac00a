//! Property test of the canonical model (docs/FORMAT.md, "Invariants"): random small canonical
//! adapters — sides, block sizes, factors, permutations, scales, crops, views and row slices,
//! consistent or not — written with the library's writer and merged into a random small f32 base
//! the way `boft-merge` does it. Each must either be refused with one clear line, or merge to what
//! a dense reference computes here from FORMAT.md's semantics alone (the n×n matrix of every
//! factor built from its blocks and permutation, then `diag(s)·W·Mᵀ` or `diag(s)·M·W`). Never a
//! panic. Deterministic seeds.

use std::collections::HashMap;
use std::path::Path;

use boft::adapter::{canonical, Adapter, BlockKind, Side, Strength, Target};
use boft::checkpoint::{serialize, Checkpoint, OwnedTensor};
use boft::merge::{self, CpuBackend, Direction, Layer};
use boft::Class;

#[path = "common/canonical_gen.rs"]
mod canonical_gen;
use canonical_gen::{random_case, reference, Case, Draw, Rng};

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Merge as `boft-merge` does: read (validating), fit, plan, execute.
fn merge_file(base: &Path, adapter: &Path, out: &Path) -> boft::Result<Vec<f32>> {
    merge_dir(base, adapter, out, Direction::Merge)
}

fn merge_dir(
    base: &Path,
    adapter: &Path,
    out: &Path,
    direction: Direction,
) -> boft::Result<Vec<f32>> {
    let mut a = boft::formats::load_deferred_as(adapter, boft::formats::Source::Auto)?;
    let ck = Checkpoint::open(base)?;
    merge::fit_in(&ck, &mut a, true, None)?;
    let layer = Layer {
        adapter: &a,
        direction,
        strength: Strength::FULL,
    };
    merge::merge_to(
        &ck,
        &[layer],
        out,
        &[base, adapter],
        false,
        &CpuBackend,
        &merge::NoProgress,
    )?;
    let merged = Checkpoint::open(out)?;
    let (f, info) = merged.get("w.weight").expect("tensor kept");
    Ok(f.data(info)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

fn write_base(path: &Path, shape: &[usize], w: &[f32]) {
    let tensors = [
        (
            "w.weight".to_string(),
            OwnedTensor {
                dtype: safetensors::Dtype::F32,
                shape: shape.to_vec(),
                data: f32_bytes(w),
            },
        ),
        (
            "w.bias".to_string(),
            OwnedTensor {
                dtype: safetensors::Dtype::F32,
                shape: vec![3],
                data: f32_bytes(&[1.0, 2.0, 3.0]),
            },
        ),
    ];
    let bytes = serialize(tensors.iter().map(|(k, t)| (k, t)), HashMap::new()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn one_case(seed: u64, dir: &Path) -> &'static str {
    let Case { shape, w, targets } = random_case(&mut Rng::new(seed));
    let base = dir.join("base.safetensors");
    write_base(&base, &shape, &w);
    let adapter_path = dir.join("adapter.safetensors");
    let adapter = Adapter {
        targets: targets.clone(),
        source_format: "test".into(),
        ..Default::default()
    };
    if canonical::write(&adapter, &adapter_path).is_err() {
        return "unwritable";
    }
    let out = dir.join("merged.safetensors");
    let want = reference(&targets, &shape, &w);
    match (merge_file(&base, &adapter_path, &out), want) {
        (Err(e), _) => {
            assert!(
                matches!(e.class, Class::BadAdapter | Class::ShapeMismatch),
                "seed {seed}: refused with class {:?}: {}",
                e.class,
                e.message
            );
            assert!(
                !e.message.contains('\n') && !e.message.is_empty(),
                "seed {seed}: {}",
                e.message
            );
            assert!(!out.exists(), "seed {seed}: refused but wrote {out:?}");
            "refused"
        }
        (Ok(got), None) => panic!(
            "seed {seed}: merged targets that contradict each other or the base: {targets:#?} \
             on shape {shape:?} (got {got:?})"
        ),
        (Ok(got), Some(want)) => {
            let big = want.iter().fold(1f32, |m, x| m.max(x.abs()));
            for (i, (g, x)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - x).abs() <= 1e-5 * big,
                    "seed {seed}: element {i}: merged {g}, reference {x}; {targets:#?} on shape \
                     {shape:?}"
                );
            }
            if targets.iter().any(|t| t.stage > 0) {
                "merged-staged"
            } else if targets.iter().any(|t| t.share) {
                "merged-shared"
            } else {
                "merged"
            }
        }
    }
}

#[test]
fn random_canonical_adapters_are_refused_or_merge_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for seed in 1..=400u64 {
        let dir = tmp.path().join(seed.to_string());
        std::fs::create_dir(&dir).unwrap();
        let res = std::panic::catch_unwind(|| one_case(seed, &dir));
        match res {
            Ok(k) => *counts.entry(k).or_default() += 1,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("seed {seed}: {msg}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
    eprintln!("{counts:?}");
    // Both outcomes must be well represented for the test to mean anything.
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    assert!(
        count("merged") + count("merged-shared") + count("merged-staged") >= 100,
        "{counts:?}"
    );
    assert!(count("merged-shared") >= 10, "{counts:?}");
    assert!(count("merged-staged") >= 10, "{counts:?}");
    assert!(count("refused") >= 60, "{counts:?}");
}

/// `block_kind: cayley` is the file's word; a block that is not orthogonal is un-merged by a
/// solve, not by its transpose (docs/FORMAT.md, "Semantics"): merging then un-merging restores
/// the base.
#[test]
fn unmerge_of_blocks_labelled_cayley_that_are_not_orthogonal_restores_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Rng::new(7);
    for side in [Side::Input, Side::Output] {
        let shape = [6usize, 6];
        let w: Vec<f32> = (0..36).map(|_| r.f32()).collect();
        let base = tmp.path().join("base.safetensors");
        write_base(&base, &shape, &w);
        // Blocks I + 0.3·E: well conditioned, far from orthogonal.
        let data: Vec<f32> = (0..2 * 2 * 9)
            .map(|i| if (i % 9) % 4 == 0 { 1.0 } else { 0.3 * r.f32() })
            .collect();
        let t = Target {
            name: "w.weight".into(),
            module: "w".into(),
            side,
            factors: 2,
            blocks: 2,
            block_size: 3,
            data,
            perms: vec![None, Some(vec![5, 0, 3, 1, 4, 2])],
            kind: BlockKind::Cayley,
            ..Default::default()
        };
        let adapter = tmp.path().join("adapter.safetensors");
        let a = Adapter {
            targets: vec![t],
            ..Default::default()
        };
        canonical::write(&a, &adapter).unwrap();
        let merged = tmp.path().join(format!("merged-{side:?}.safetensors"));
        merge_file(&base, &adapter, &merged).unwrap();
        let restored = tmp.path().join(format!("restored-{side:?}.safetensors"));
        let got = merge_dir(&merged, &adapter, &restored, Direction::Unmerge).unwrap();
        for (i, (g, x)) in got.iter().zip(&w).enumerate() {
            assert!(
                (g - x).abs() <= 1e-5,
                "{side:?}: element {i}: restored {g}, base {x}"
            );
        }
    }
}
