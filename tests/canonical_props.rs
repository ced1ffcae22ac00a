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
use boft::merge::{self, CpuBackend, Direction, Options};
use boft::Class;

/// xorshift64*: small, seeded, good enough to spread cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in lo..=hi.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn perm(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            p.swap(i, self.range(0, i));
        }
        p
    }
    fn divisor(&mut self, n: usize) -> usize {
        let ds: Vec<usize> = (1..=n.min(5)).filter(|d| n % d == 0).collect();
        ds[self.range(0, ds.len() - 1)]
    }
}

/// A random target for a tensor of `shape`: usually a consistent one, sometimes not.
fn random_target(r: &mut Rng, shape: &[usize]) -> Target {
    let rows = shape[0];
    let cols: usize = shape[1..].iter().product();
    let side = if r.chance(0.5) {
        Side::Input
    } else {
        Side::Output
    };
    let mut t = Target {
        name: "w.weight".into(),
        module: "w".into(),
        side,
        kind: [
            BlockKind::Cayley,
            BlockKind::Neumann,
            BlockKind::Cropped,
            BlockKind::Raw,
        ][r.range(0, 3)],
        ..Default::default()
    };
    // The matrix the transform sees: a view only on the output side (mostly).
    let numel = rows * cols;
    if r.chance(0.15) {
        let a = r.divisor(numel);
        t.view = Some(if r.chance(0.9) {
            (numel / a, a)
        } else {
            (a, numel / a + 1)
        });
        if r.chance(0.9) {
            t.side = Side::Output;
        }
    }
    let (vr, vc) = t.view.unwrap_or((rows, cols));
    if t.side == Side::Output && r.chance(0.35) {
        let a = r.range(0, vr.saturating_sub(1));
        let b = if r.chance(0.9) {
            r.range(a + 1, vr)
        } else {
            r.range(0, vr + 2)
        };
        t.rows = Some((a, b));
    } else if r.chance(0.03) {
        t.rows = Some((0, vr));
    }
    let axis = match (t.side, t.rows) {
        (Side::Input, _) => vc,
        (Side::Output, None) => vr,
        (Side::Output, Some((a, b))) => b.saturating_sub(a).max(1),
    };
    if r.chance(0.85) {
        t.block_size = r.divisor(axis);
        t.blocks = axis / t.block_size;
        if r.chance(0.2) {
            // Cropped: more blocks than the axis holds.
            t.block_size = r.range(2, 4);
            t.blocks = axis.div_ceil(t.block_size) + usize::from(r.chance(0.2));
            t.crop = Some(axis);
            if r.chance(0.1) {
                t.side = Side::Input;
            }
        }
    } else {
        t.block_size = r.range(1, 4);
        t.blocks = r.range(1, 4);
        if r.chance(0.3) {
            t.crop = Some(r.range(1, t.blocks * t.block_size));
        }
    }
    t.factors = r.range(1, 3);
    let n = t.blocks * t.block_size;
    let hh = t.block_size * t.block_size;
    t.data = (0..t.factors * t.blocks * hh).map(|_| r.f32()).collect();
    t.perms = (0..t.factors)
        .map(|_| {
            if r.chance(0.5) {
                return None;
            }
            let mut p = r.perm(n);
            if n > 1 && r.chance(0.1) {
                p[0] = p[1]; // not a permutation
            }
            Some(p)
        })
        .collect();
    if t.crop.is_some() && r.chance(0.8) {
        t.perms = vec![None; t.factors];
    }
    if r.chance(0.5) {
        let want = match (t.side, t.view) {
            (_, Some((_, c))) => c,
            (Side::Input, None) => rows,
            (Side::Output, None) => axis,
        };
        let len = if r.chance(0.85) {
            want
        } else {
            r.range(1, want + 2)
        };
        t.scale = Some((0..len).map(|_| 0.5 + r.f32().abs()).collect());
    }
    if r.chance(0.1) {
        t.shape = Some(if r.chance(0.5) {
            shape.to_vec()
        } else {
            vec![cols, rows]
        });
    }
    t
}

/// The dense matrix of one factor: `B = Pᵀ·BD·P` with BD cropped to `c` when given.
fn factor_matrix(t: &Target, f: usize, c: usize) -> Vec<f64> {
    let (h, d) = (t.block_size, t.blocks);
    let n = d * h;
    let mut bd = vec![0f64; n * n];
    for k in 0..d {
        for i in 0..h {
            for j in 0..h {
                bd[(k * h + i) * n + k * h + j] = t.data[((f * d + k) * h + i) * h + j] as f64;
            }
        }
    }
    let ident: Vec<u32> = (0..n as u32).collect();
    let p = t.perms[f].as_ref().unwrap_or(&ident);
    // (Pᵀ·BD·P)[p[j], p[k]] = BD[j, k]
    let mut b = vec![0f64; n * n];
    for j in 0..n {
        for k in 0..n {
            b[p[j] as usize * n + p[k] as usize] = bd[j * n + k];
        }
    }
    // The leading c×c part.
    let mut out = vec![0f64; c * c];
    for i in 0..c {
        out[i * c..(i + 1) * c].copy_from_slice(&b[i * n..i * n + c]);
    }
    out
}

/// `M = B_{N−1} ⋯ B_0` on an axis of length `c`.
fn transform(t: &Target, c: usize) -> Vec<f64> {
    let mut m: Vec<f64> = (0..c * c)
        .map(|i| if i / c == i % c { 1.0 } else { 0.0 })
        .collect();
    for f in 0..t.factors {
        let b = factor_matrix(t, f, c);
        let mut next = vec![0f64; c * c];
        for i in 0..c {
            for k in 0..c {
                let x = b[i * c + k];
                if x != 0.0 {
                    for j in 0..c {
                        next[i * c + j] += x * m[k * c + j];
                    }
                }
            }
        }
        m = next;
    }
    m
}

fn is_perm(p: &[u32], n: usize) -> bool {
    let mut seen = vec![false; n];
    p.len() == n
        && p.iter()
            .all(|&x| (x as usize) < n && !std::mem::replace(&mut seen[x as usize], true))
}

/// What FORMAT.md says the merge gives, or None where the targets contradict themselves or the
/// base (then the merge must refuse).
fn reference(targets: &[Target], shape: &[usize], w: &[f32]) -> Option<Vec<f32>> {
    let numel = w.len();
    let view = targets[0].view;
    if targets.iter().any(|t| t.view != view) {
        return None;
    }
    let (rows, cols) = match view {
        Some((r, c)) if r * c == numel => (r, c),
        Some(_) => return None,
        None => (shape[0], numel / shape[0]),
    };
    let mut out: Vec<f64> = w.iter().map(|&x| x as f64).collect();
    let mut covered: Vec<(usize, usize)> = Vec::new();
    for t in targets {
        let n = t.blocks * t.block_size;
        if t.factors == 0 || n == 0 || t.perms.len() != t.factors {
            return None;
        }
        if t.perms.iter().flatten().any(|p| !is_perm(p, n)) {
            return None;
        }
        if t.shape.as_ref().is_some_and(|s| s.as_slice() != shape) {
            return None;
        }
        let axis = t.crop.unwrap_or(n);
        if let Some(c) = t.crop {
            let cayley_cropped = c < n && t.kind == BlockKind::Cayley;
            if t.side == Side::Input || c == 0 || c > n || cayley_cropped {
                return None;
            }
            if t.perms.iter().any(Option::is_some) {
                return None;
            }
        }
        match t.side {
            Side::Input => {
                if targets.len() > 1 || t.rows.is_some() || view.is_some() || axis != cols {
                    return None;
                }
                if t.scale.as_ref().is_some_and(|s| s.len() != rows) {
                    return None;
                }
                let m = transform(t, axis);
                for r in 0..rows {
                    let x = &w[r * cols..(r + 1) * cols];
                    let s = t.scale.as_ref().map_or(1.0, |s| s[r] as f64);
                    for i in 0..cols {
                        let y: f64 = (0..cols).map(|j| m[i * cols + j] * x[j] as f64).sum();
                        out[r * cols + i] = s * y;
                    }
                }
            }
            Side::Output => {
                if targets.len() > 1 && t.rows.is_none() {
                    return None;
                }
                let (a, b) = t.rows.unwrap_or((0, rows));
                if a >= b || b > rows || b - a != axis {
                    return None;
                }
                let want = if view.is_some() { cols } else { axis };
                if t.scale.as_ref().is_some_and(|s| s.len() != want) {
                    return None;
                }
                if covered.iter().any(|&(x, y)| a < y && x < b) {
                    return None;
                }
                covered.push((a, b));
                let m = transform(t, axis);
                for c in 0..cols {
                    for i in 0..axis {
                        let y: f64 = (0..axis)
                            .map(|j| m[i * axis + j] * w[(a + j) * cols + c] as f64)
                            .sum();
                        let s = match (&t.scale, view) {
                            (None, _) => 1.0,
                            (Some(s), Some(_)) => s[c] as f64,
                            (Some(s), None) => s[i] as f64,
                        };
                        out[(a + i) * cols + c] = s * y;
                    }
                }
            }
        }
    }
    Some(out.iter().map(|&x| x as f32).collect())
}

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
    let opts = Options {
        direction,
        progress: &merge::NoProgress,
        strength: Strength::FULL,
    };
    merge::merge_to(&ck, &a, out, &[base, adapter], false, &CpuBackend, &opts)?;
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
    let mut r = Rng::new(seed);
    let rows = r.range(1, 10);
    let shape = if r.chance(0.3) {
        vec![rows, r.range(1, 3), r.range(1, 4)]
    } else {
        vec![rows, r.range(1, 12)]
    };
    let numel: usize = shape.iter().product();
    let w: Vec<f32> = (0..numel).map(|_| r.f32()).collect();
    let ntargets = if r.chance(0.75) { 1 } else { r.range(2, 3) };
    let mut targets: Vec<Target> = (0..ntargets)
        .map(|_| random_target(&mut r, &shape))
        .collect();
    if ntargets > 1 && r.chance(0.6) {
        // Row slices that tile the rows: the valid kind of several targets.
        let vr = targets[0].view.map_or(shape[0], |v| v.0);
        let view = targets[0].view;
        let mut start = 0;
        targets.retain(|_| true);
        for t in targets.iter_mut() {
            if start >= vr {
                break;
            }
            let end = r.range(start + 1, vr);
            let len = end - start;
            let bs = r.divisor(len);
            let factors = r.range(1, 2);
            *t = Target {
                name: "w.weight".into(),
                module: "w".into(),
                side: Side::Output,
                rows: Some((start, end)),
                view: if r.chance(0.9) { view } else { None },
                factors,
                blocks: len / bs,
                block_size: bs,
                data: (0..factors * len * bs).map(|_| r.f32()).collect(),
                perms: (0..factors)
                    .map(|_| r.chance(0.5).then(|| r.perm(len)))
                    .collect(),
                kind: BlockKind::Raw,
                ..Default::default()
            };
            start = end;
        }
    }
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
            "merged"
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
    assert!(
        counts.get("merged").copied().unwrap_or(0) >= 100,
        "{counts:?}"
    );
    assert!(
        counts.get("refused").copied().unwrap_or(0) >= 60,
        "{counts:?}"
    );
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
