//! Random small canonical adapters for the property test (tests/canonical_props.rs) and the
//! structure-aware fuzz targets (fuzz/fuzz_targets/canonical_structured.rs, verify.rs), with the
//! dense reference that says what docs/FORMAT.md makes of them. Kept apart from tests/common so
//! the fuzz crate can include it by path.

use boft::adapter::{BlockKind, Side, Target};

/// A source of choices: a seeded generator in the property test, the fuzzer's bytes in the fuzz
/// targets (so libFuzzer mutates the structure, not the bytes of a file).
pub trait Draw {
    fn next(&mut self) -> u64;
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
        let ds: Vec<usize> = (1..=n.min(5)).filter(|d| n.is_multiple_of(*d)).collect();
        ds[self.range(0, ds.len() - 1)]
    }
}

/// xorshift64*: small, seeded, good enough to spread cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
}

impl Draw for Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One case: a base tensor `w.weight` of `shape` holding `w`, and the targets on it.
pub struct Case {
    pub shape: Vec<usize>,
    pub w: Vec<f32>,
    pub targets: Vec<Target>,
}

/// A random small case: usually consistent targets, sometimes contradictory ones.
pub fn random_case(r: &mut impl Draw) -> Case {
    let rows = r.range(1, 10);
    let shape = if r.chance(0.3) {
        vec![rows, r.range(1, 3), r.range(1, 4)]
    } else {
        vec![rows, r.range(1, 12)]
    };
    let numel: usize = shape.iter().product();
    let w: Vec<f32> = (0..numel).map(|_| r.f32()).collect();
    let ntargets = if r.chance(0.75) { 1 } else { r.range(2, 3) };
    let mut targets: Vec<Target> = (0..ntargets).map(|_| random_target(r, &shape)).collect();
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
    if targets.len() > 1 && r.chance(0.35) {
        // Stages of a composed adapter: any targets may follow one another.
        for t in targets.iter_mut() {
            t.stage = r.range(0, 2) as u32;
        }
    }
    Case { shape, w, targets }
}

/// A random target for a tensor of `shape`: usually a consistent one, sometimes not.
pub fn random_target(r: &mut impl Draw, shape: &[usize]) -> Target {
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
    if r.chance(0.15) {
        // Shared blocks (PEFT block_share): one stored block per factor, sometimes with the
        // count left to the base.
        t.share = true;
        t.data.truncate(t.factors * hh);
        if r.chance(0.9) {
            t.perms = vec![None; t.factors]; // a permuted one is refused
        }
        if r.chance(0.3) {
            t.blocks = 0;
        }
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

/// The dense matrix of one factor of `d` blocks: `B = Pᵀ·BD·P` with BD cropped to `c` when
/// given. Shared blocks are one stored block written at every position.
fn factor_matrix(t: &Target, d: usize, f: usize, c: usize) -> Vec<f64> {
    let h = t.block_size;
    let n = d * h;
    let stored = if t.share { 1 } else { d };
    let mut bd = vec![0f64; n * n];
    for k in 0..d {
        let at = if t.share { 0 } else { k };
        for i in 0..h {
            for j in 0..h {
                bd[(k * h + i) * n + k * h + j] =
                    t.data[((f * stored + at) * h + i) * h + j] as f64;
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

/// `M = B_{N−1} ⋯ B_0` of factors of `d` blocks on an axis of length `c`.
fn transform(t: &Target, d: usize, c: usize) -> Vec<f64> {
    let mut m: Vec<f64> = (0..c * c)
        .map(|i| if i / c == i % c { 1.0 } else { 0.0 })
        .collect();
    for f in 0..t.factors {
        let b = factor_matrix(t, d, f, c);
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

/// Whether any factor permutes: the file stores every permutation, and an identity one is none.
fn permuted(t: &Target) -> bool {
    t.perms
        .iter()
        .flatten()
        .any(|p| p.iter().enumerate().any(|(i, &x)| x as usize != i))
}

fn is_perm(p: &[u32], n: usize) -> bool {
    let mut seen = vec![false; n];
    p.len() == n
        && p.iter()
            .all(|&x| (x as usize) < n && !std::mem::replace(&mut seen[x as usize], true))
}

/// What FORMAT.md says the merge gives, or None where the targets contradict themselves or the
/// base (then the merge must refuse): the stages in order, each on the previous one's values.
pub fn reference(targets: &[Target], shape: &[usize], w: &[f32]) -> Option<Vec<f32>> {
    let mut stages: std::collections::BTreeMap<u32, Vec<Target>> = Default::default();
    for t in targets {
        stages.entry(t.stage).or_default().push(t.clone());
    }
    let mut cur = w.to_vec();
    for ts in stages.values() {
        cur = reference_stage(ts, shape, &cur)?;
    }
    Some(cur)
}

/// `reference` for the targets of one stage.
fn reference_stage(targets: &[Target], shape: &[usize], w: &[f32]) -> Option<Vec<f32>> {
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
        // Shared blocks without a count take it from the base's axis, which they must tile.
        let base_axis = match (t.side, t.rows) {
            (Side::Input, _) => cols,
            (Side::Output, None) => rows,
            (Side::Output, Some((a, b))) => b.saturating_sub(a),
        };
        let d = if t.share && t.blocks == 0 {
            if t.block_size == 0 || base_axis % t.block_size != 0 {
                return None;
            }
            base_axis / t.block_size
        } else {
            t.blocks
        };
        let n = d * t.block_size;
        // Shared blocks are never permuted.
        if t.share && permuted(t) {
            return None;
        }
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
            if permuted(t) {
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
                let m = transform(t, d, axis);
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
                let m = transform(t, d, axis);
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
