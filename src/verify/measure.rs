//! What is measured on a transform: orthogonality, distance from the identity and the largest
//! rotation angle (exactly on the dense matrix up to `DENSE_MAX`, on probes above), structural
//! reach, degrees of freedom, hyperspherical energy.

use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::adapter::Target;
use crate::checkpoint::{dtype, Dtype};
use crate::math::kernel::{Chain, Factor, ScaleOn, Scratch};

use super::{Dof, Energy, Measure, Reach};

/// Transforms up to this size are measured exactly on the dense matrix; larger ones on probes.
pub const DENSE_MAX: usize = 512;

pub(super) struct Props {
    pub orth: Measure,
    pub distance: Measure,
    pub angle: Measure,
}

pub(super) fn transform_properties(chain: &Chain, probes: usize, dense_max: usize) -> Props {
    let n = chain.n;
    if n <= dense_max {
        let m = chain.dense();
        let mm = DMatrix::from_row_slice(n, n, &m);
        let gram = mm.transpose() * &mm;
        let mut orth = 0f64;
        let mut dist = 0f64;
        for i in 0..n {
            for j in 0..n {
                let id = if i == j { 1.0 } else { 0.0 };
                orth = orth.max((gram[(i, j)] - id).abs());
                dist += (mm[(i, j)] - id).powi(2);
            }
        }
        let sym = (&mm + mm.transpose()) * 0.5;
        let lmin = sym
            .symmetric_eigenvalues()
            .iter()
            .fold(f64::INFINITY, |a, &b| a.min(b));
        return Props {
            orth: Measure {
                value: orth,
                method: "exact",
            },
            distance: Measure {
                value: dist.sqrt(),
                method: "exact",
            },
            angle: Measure {
                value: lmin.clamp(-1.0, 1.0).acos().to_degrees(),
                method: "exact",
            },
        };
    }
    // Matrix-free: Gaussian probes for orthogonality and a Hutchinson estimate of ‖M − I‖_F².
    let k = probes.max(2);
    let normals = probe_normals(n, k);
    let (orig, start) = normals.split_at(k * n);
    let mut v = orig.to_vec();
    chain.apply_rows(&mut v, 0, k, &mut Scratch::default());
    let dot = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
    };
    let mut orth = 0f64;
    let mut dist2 = 0f64;
    for a in 0..k {
        let (va, oa) = (&v[a * n..(a + 1) * n], &orig[a * n..(a + 1) * n]);
        dist2 += va
            .iter()
            .zip(oa)
            .map(|(&x, &y)| ((x - y) as f64).powi(2))
            .sum::<f64>();
        for b in a..k {
            let (vb, ob) = (&v[b * n..(b + 1) * n], &orig[b * n..(b + 1) * n]);
            let norm = (dot(oa, oa) * dot(ob, ob)).sqrt();
            orth = orth.max((dot(va, vb) - dot(oa, ob)).abs() / norm);
        }
    }
    // Largest rotation angle: the top eigenvalue of I − ½(M + Mᵀ) is 1 − cos θ.
    let lambda = top_eigenvalue(chain, start);
    Props {
        orth: Measure {
            value: orth,
            method: "probe",
        },
        distance: Measure {
            value: (dist2 / k as f64).sqrt(),
            method: "estimate",
        },
        angle: Measure {
            value: (1.0 - lambda).clamp(-1.0, 1.0).acos().to_degrees(),
            method: "estimate",
        },
    }
}

/// Steps of `top_eigenvalue`'s Lanczos iteration.
pub const LANCZOS_STEPS: usize = 32;

/// The largest eigenvalue of `A = I − ½(M + Mᵀ)` (`M` the chain), matrix-free: Lanczos from
/// `start` in f64, `A` applied through the chain's f32 kernel; the largest eigenvalue of the
/// tridiagonal matrix it builds. Its top Ritz value approaches the true one from below, and much
/// faster than a power iteration does: a transform's rotation angles cluster (many blocks rotate
/// by about as much). On the benchmark's 2-factor BOFT adapter (56 targets of 1024 and 2816),
/// 100 power steps read up to 0.17° below 96 Lanczos steps; 32 steps are within 0.003° of them
/// (docs/VERIFY.md). Each step applies `M` and `Mᵀ` to one vector: a third of the applications
/// the power iteration made, which were a tenth to a sixth of a verify's time. Only the last two
/// vectors are kept (memory stays at a few vectors of n, as the adapter's size bounds it): the
/// extreme Ritz values converge without full reorthogonalisation (the orthogonality that is lost
/// only repeats converged values), and each new vector is reorthogonalised against the two.
fn top_eigenvalue(chain: &Chain, start: &[f32]) -> f64 {
    let n = chain.n;
    let mt = chain.transposed();
    let mut s = Scratch::default();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let norm0 = norm_f64(start).max(1e-30);
    let mut q: Vec<f64> = start.iter().map(|&x| x as f64 / norm0).collect();
    let mut prev = vec![0f64; n];
    let (mut alpha, mut beta) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    let steps = LANCZOS_STEPS.min(n);
    for j in 0..steps {
        // The caller checks for a signal once this returns; stopping early keeps that prompt.
        if crate::output::interrupted() {
            break;
        }
        a.iter_mut().zip(&q).for_each(|(a, &x)| *a = x as f32);
        b.copy_from_slice(&a);
        chain.apply_rows_given_transpose(&mt, &mut a, 0, 1, &mut s);
        chain.apply_rows_transposed(&mt, &mut b, 1, &mut s);
        let mut w: Vec<f64> = (0..n)
            .map(|i| q[i] - 0.5 * (a[i] as f64 + b[i] as f64))
            .collect();
        let aj = dot(&q, &w);
        alpha.push(aj);
        let bp = beta.last().copied().unwrap_or(0.0);
        w.iter_mut()
            .zip(q.iter().zip(&prev))
            .for_each(|(w, (&x, &p))| *w -= aj * x + bp * p);
        for v in [&q, &prev] {
            let c = dot(v, &w);
            w.iter_mut().zip(v).for_each(|(w, &x)| *w -= c * x);
        }
        let bj = dot(&w, &w).sqrt();
        // An invariant subspace: the tridiagonal matrix so far holds its eigenvalues exactly.
        if bj <= 1e-12 || j + 1 == steps {
            break;
        }
        beta.push(bj);
        w.iter_mut().for_each(|x| *x /= bj);
        prev = std::mem::replace(&mut q, w);
    }
    let k = alpha.len();
    if k == 0 {
        return 0.0;
    }
    let mut t = DMatrix::<f64>::zeros(k, k);
    for i in 0..k {
        t[(i, i)] = alpha[i];
        if i + 1 < k {
            t[(i, i + 1)] = beta[i];
            t[(i + 1, i)] = beta[i];
        }
    }
    t.symmetric_eigenvalues()
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x))
}

/// `transform_properties` of a chain whose factors repeat a shared block (`Factor::repeat`)
/// without permuting, measured without repeating it: M is then block diagonal, and its first
/// `r + 1` blocks are one (r the least repeat of the factors). The diagonal from position r on
/// holds every distinct block once (orthogonality and largest angle are the worst of its
/// blocks); the distance from I adds the first block's r more times. None for any other chain.
pub(super) fn shared_properties(chain: &Chain, probes: usize, dense_max: usize) -> Option<Props> {
    let f0 = chain.factors.first()?;
    let (h, d) = (f0.h, f0.d);
    let r = chain.factors.iter().map(|f| f.repeat).min()?;
    let plain = chain
        .factors
        .iter()
        .all(|f| f.h == h && f.d == d && f.perm.is_none());
    if r == 0 || !plain || chain.n != h * d {
        return None;
    }
    // Positions r..d, each factor's blocks written out (no more than the factor with the least
    // repeat stores), and position 0 alone.
    let from = |first: usize, count: usize| Chain {
        n: count * h,
        factors: chain
            .factors
            .iter()
            .map(|g| Factor {
                h,
                d: count,
                blocks: (first..first + count)
                    .flat_map(|k| g.block(k).iter().copied())
                    .collect(),
                repeat: 0,
                perm: None,
            })
            .collect(),
        scale: chain.scale.clone(),
        ..*chain
    };
    let mut props = transform_properties(&from(r, d - r), probes, dense_max);
    let first = transform_properties(&from(0, 1), probes, dense_max);
    props.distance.value =
        (props.distance.value.powi(2) + r as f64 * first.distance.value.powi(2)).sqrt();
    Some(props)
}

/// Blocks of the last factor whose reach `connectivity` follows. Each costs a pass over the
/// axis per factor: following all D of them would take time quadratic in the axis.
pub const REACH_SAMPLE: usize = 256;

/// Structural reach of the outputs through the factor chain, assuming dense blocks: output i
/// of a factor depends on the inputs gathered into the same block. Followed from every block of
/// the last factor, or from `REACH_SAMPLE` of them evenly spaced when there are more.
pub fn connectivity(chain: &Chain) -> Reach {
    let n = chain.n;
    let nf = chain.factors.len();
    let h = chain.factors[0].h;
    let ratio = (n / h).max(1);
    let butterfly_reach = n.min(h.saturating_mul(1usize << (nf - 1).min(40)));
    let factors_for_full_density = (usize::BITS - (ratio - 1).leading_zeros()) as usize + 1;
    let d_last = chain.factors[nf - 1].d;
    if chain
        .factors
        .iter()
        .all(|f| f.perm.is_none() && f.h == h && f.h * f.d == n)
    {
        // No factor permutes, so every factor has the same blocks: each output reaches its own
        // block. Said without walking the axis, whose length (shared blocks) no bytes back.
        return Reach {
            min: h,
            max: h,
            mean: h as f64,
            dense: h == n,
            followed: d_last,
            blocks: d_last,
            butterfly_reach,
            factors_for_full_density,
        };
    }
    // The block of factor f that index i belongs to: index p[j] sits in block j / h. Only a
    // permuted factor needs a table (n entries, as many as its permutation stores); block k's
    // members are read straight from the permutation.
    let groups: Vec<Option<Vec<u32>>> = chain
        .factors
        .iter()
        .map(|f| {
            f.perm.as_ref().map(|p| {
                let mut g = vec![0u32; n];
                for (j, &pj) in p.iter().enumerate() {
                    g[pj as usize] = (j / f.h) as u32;
                }
                g
            })
        })
        .collect();
    let group = |f: usize, i: usize| match &groups[f] {
        Some(g) => g[i] as usize,
        None => i / chain.factors[f].h,
    };
    let members = |f: usize, k: usize| {
        let fac = &chain.factors[f];
        (k * fac.h..(k + 1) * fac.h).map(move |j| fac.perm.as_ref().map_or(j, |p| p[j] as usize))
    };
    let (mut lo, mut hi, mut total, mut outputs) = (usize::MAX, 0usize, 0usize, 0usize);
    let last = nf - 1;
    let mut seen = vec![false; n];
    let mut touched = vec![false; n];
    let followed = d_last.min(REACH_SAMPLE);
    for s in 0..followed {
        if crate::output::interrupted() {
            break; // the caller reports the signal, not this
        }
        let k_last = s * d_last / followed;
        seen.iter_mut().for_each(|s| *s = false);
        for i in members(last, k_last) {
            seen[i] = true;
        }
        for f in (0..last).rev() {
            touched.iter_mut().for_each(|s| *s = false);
            let mut marks = vec![false; chain.factors[f].d];
            for i in 0..n {
                if seen[i] {
                    marks[group(f, i)] = true;
                }
            }
            for (k, m) in marks.iter().enumerate() {
                if *m {
                    for i in members(f, k) {
                        touched[i] = true;
                    }
                }
            }
            std::mem::swap(&mut seen, &mut touched);
        }
        let count = seen.iter().filter(|&&s| s).count();
        let size = chain.factors[last].h;
        lo = lo.min(count);
        hi = hi.max(count);
        total += count * size;
        outputs += size;
    }
    Reach {
        min: lo,
        max: hi,
        mean: total as f64 / outputs.max(1) as f64,
        dense: lo == n,
        followed,
        blocks: d_last,
        butterfly_reach,
        factors_for_full_density,
    }
}

/// Degrees of freedom of a target against a dense orthogonal matrix and OFT.
pub fn degrees_of_freedom(t: &Target) -> Dof {
    let (h, d, n) = (t.block_size, t.blocks, t.n());
    let per_block = h * (h - 1) / 2;
    Dof {
        adapter: t.factors * t.stored() * per_block,
        scale: t.scale.as_ref().map_or(0, Vec::len),
        dense_orthogonal: n.saturating_mul(n.saturating_sub(1)) / 2,
        oft_same_block: d * per_block,
    }
}

/// The Euclidean norm of f32 values, summed in f64 in order.
fn norm_f64(x: &[f32]) -> f64 {
    x.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

/// Hyperspherical energy Σ_{i<j} 1/‖ŵ_i − ŵ_j‖ of a sample of neurons (rows), before and after.
pub(super) fn hyperspherical(chain: &Chain, dt: Dtype, shape: &[usize], data: &[u8]) -> Energy {
    let rows = shape[0];
    let n = chain.n;
    let esize = dt.float_size().expect("float");
    // 64 neurons: 2016 pairs (docs/VERIFY.md). The block-orthogonality checks measure the
    // transform exactly; this one only needs enough pairs to see angles change.
    let take = rows.min(64);
    let picks: Vec<usize> = (0..take).map(|i| i * rows / take).collect();
    let mut before = vec![0f32; take * n];
    for (k, &r) in picks.iter().enumerate() {
        dtype::decode_f32(
            dt,
            &data[r * n * esize..(r + 1) * n * esize],
            &mut before[k * n..(k + 1) * n],
        );
    }
    // All sampled neurons in one call (one pass over the blocks, not one per neuron), with
    // each neuron's own per-row scale.
    let mut after = before.clone();
    let picked;
    let chain = match (&chain.scale, chain.scale_on) {
        (Some(s), ScaleOn::Vector) => {
            picked = Chain {
                scale: Some(picks.iter().map(|&r| s[r]).collect()),
                ..chain.clone()
            };
            &picked
        }
        _ => chain,
    };
    chain.apply_rows(&mut after, 0, take, &mut Scratch::default());
    let energy = |w: &[f32]| -> f64 {
        let mut unit = vec![0f64; w.len()];
        for (u, r) in unit.chunks_exact_mut(n).zip(w.chunks_exact(n)) {
            let norm = norm_f64(r).max(1e-30);
            for (o, &x) in u.iter_mut().zip(r) {
                *o = x as f64 / norm;
            }
        }
        // Each pair's squared distance sums in eight lanes; the pairs of neuron i with the later
        // ones, four at a time (the last group padded with the last neuron, whose repeats are
        // not counted), keep their lanes here. The columns go by in slices that leave every
        // sampled neuron's slice in the core's L2 while all pairs use it (whole rows of 64
        // neurons are up to ~1.5 MB: each neuron streamed every later one from L3). Each lane
        // adds the same terms in the same order as one pass over whole rows would.
        let groups = |i: usize| (take - i - 1).div_ceil(4);
        let mut acc: Vec<Vec<[[f64; 8]; 4]>> =
            (0..take).map(|i| vec![[[0.0; 8]; 4]; groups(i)]).collect();
        let whole = n / 8 * 8;
        const SLICE: usize = 256;
        for c0 in (0..whole).step_by(SLICE) {
            let cols = c0..(c0 + SLICE).min(whole);
            // Neurons on the cores (the triangle balances by work stealing).
            acc.par_iter_mut().enumerate().for_each(|(i, acc)| {
                pair_lanes(acc, &unit, n, take, i, cols.clone());
            });
        }
        // Each neuron's pairs summed in order, the neurons in neuron order: the same result
        // whatever the thread count.
        let partial: Vec<f64> = acc
            .par_iter_mut()
            .enumerate()
            .map(|(i, acc)| {
                let mut e = 0.0;
                let a = &unit[i * n..][..n];
                for (g, lanes) in acc.iter_mut().enumerate() {
                    let j = i + 1 + 4 * g;
                    let rows = |k: usize| &unit[(j + k).min(take - 1) * n..][..n];
                    for (k, lanes) in lanes.iter_mut().enumerate().take(take - j) {
                        for (l, (x, y)) in a[whole..].iter().zip(&rows(k)[whole..]).enumerate() {
                            lanes[l] += (x - y) * (x - y);
                        }
                        let d = lanes.iter().sum::<f64>().sqrt();
                        if d > 1e-12 {
                            e += 1.0 / d;
                        }
                    }
                }
                e
            })
            .collect();
        partial.iter().sum()
    };
    let (b, a) = (energy(&before), energy(&after));
    Energy {
        before: b,
        after: a,
        rel_diff: (a - b).abs() / b.abs().max(1e-30),
        rows_sampled: take,
    }
}

crate::checkpoint::dtype::vectorised! {
/// Add columns `cols` (whole steps of eight) of the squared differences between neuron `i` and
/// each later one to the pairs' lanes (`acc`: groups of four later neurons, as `hyperspherical`
/// keeps them), the four of a group at once so that their sums do not wait on each other. Each
/// lane's sum is the same in the same order whatever the other pairs are; it vectorises.
fn pair_lanes(
    acc: &mut [[[f64; 8]; 4]],
    unit: &[f64],
    n: usize,
    take: usize,
    i: usize,
    cols: std::ops::Range<usize>,
) -> () {
    let a = &unit[i * n..][cols.clone()];
    for (g, lanes) in acc.iter_mut().enumerate() {
        let j = i + 1 + 4 * g;
        let bs: [&[f64]; 4] =
            std::array::from_fn(|k| &unit[(j + k).min(take - 1) * n..][cols.clone()]);
        // In registers for the slice, not through the reference.
        let mut s = *lanes;
        for (c, x) in a.chunks_exact(8).enumerate() {
            for (s, b) in s.iter_mut().zip(bs) {
                let y = &b[c * 8..c * 8 + 8];
                for l in 0..8 {
                    let d = x[l] - y[l];
                    s[l] += d * d;
                }
            }
        }
        *lanes = s;
    }
}
}

/// The `k` probes of length `n` and the Lanczos start vector: the first `(k + 1)·n`
/// normals of `Rng(0x5eed)`, the same for every transform of that size (reproducible reports).
/// Made once per size and kept: a model has a few sizes and hundreds of targets, and drawing
/// them (a logarithm and a cosine each) took longer than the probes' products.
fn probe_normals(n: usize, k: usize) -> std::sync::Arc<Vec<f32>> {
    use std::sync::{Arc, Mutex};
    /// (n, k) and its normals.
    type Made = Vec<((usize, usize), Arc<Vec<f32>>)>;
    static MADE: Mutex<Made> = Mutex::new(Vec::new());
    let mut made = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, v)) = made.iter().find(|(key, _)| *key == (n, k)) {
        return v.clone();
    }
    let mut rng = Rng(0x5eed);
    let v = Arc::new((0..(k + 1) * n).map(|_| rng.normal()).collect::<Vec<f32>>());
    made.push(((n, k), v.clone()));
    v
}

/// A small deterministic generator for probes (reproducible reports).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next(), self.next());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{BlockKind, Side};
    use crate::math::kernel::ScaleOn;
    use crate::math::{cayley, perm};

    fn chain(
        n: usize,
        h: usize,
        nf: usize,
        perms: impl FnMut(usize) -> Option<Vec<u32>>,
        seed: u64,
    ) -> Chain {
        chain_of_size(n, h, nf, perms, seed, 1.0)
    }

    /// `chain` with generators of standard deviation `amp`.
    fn chain_of_size(
        n: usize,
        h: usize,
        nf: usize,
        mut perms: impl FnMut(usize) -> Option<Vec<u32>>,
        seed: u64,
        amp: f64,
    ) -> Chain {
        let mut rng = Rng(seed);
        let d = n / h;
        Chain {
            n,
            factors: (0..nf)
                .map(|i| {
                    let mut blocks = Vec::new();
                    for _ in 0..d {
                        let a: Vec<f64> = (0..h * h).map(|_| rng.normal() as f64 * amp).collect();
                        let q = cayley::cayley_minus(h, &cayley::skew_half(h, &a));
                        blocks.extend(q.iter().map(|&x| x as f32));
                    }
                    Factor {
                        h,
                        d,
                        blocks,
                        repeat: 0,
                        perm: perms(i),
                    }
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        }
    }

    /// Brute force: count the non-zero entries of each row of the dense M.
    fn brute_reach(c: &Chain) -> (usize, usize, f64) {
        let n = c.n;
        let m = c.dense();
        let counts: Vec<usize> = (0..n)
            .map(|i| (0..n).filter(|&j| m[i * n + j].abs() > 1e-9).count())
            .collect();
        (
            *counts.iter().min().unwrap(),
            *counts.iter().max().unwrap(),
            counts.iter().sum::<usize>() as f64 / n as f64,
        )
    }

    #[test]
    fn connectivity_matches_brute_force() {
        let mut cases = Vec::new();
        for (n, h) in [(16usize, 2usize), (32, 4), (64, 8), (48, 6), (24, 6)] {
            let d = n / h;
            for nf in 1..=4usize {
                if nf > 1 && d % (1 << (nf - 1)) != 0 {
                    continue;
                }
                cases.push((n, h, nf));
            }
        }
        for (seed, (n, h, nf)) in cases.into_iter().enumerate() {
            // PEFT's butterfly permutations, stored inverted as the importer does.
            let c = chain(
                n,
                h,
                nf,
                |i| Some(perm::invert(&perm::peft_boft(n, h, i))),
                seed as u64,
            );
            let r = connectivity(&c);
            assert_eq!(
                (r.min, r.max, r.mean),
                brute_reach(&c),
                "n={n} h={h} N={nf}"
            );
            assert_eq!(
                r.min,
                n.min(h << (nf - 1)),
                "butterfly reach n={n} h={h} N={nf}"
            );
            assert_eq!(r.butterfly_reach, r.min);
            assert_eq!(r.dense, r.min == n);
            // Random permutations break the butterfly pattern but the count still matches.
            let mut rng = Rng(seed as u64 + 99);
            let c = chain(
                n,
                h,
                nf,
                |_| {
                    let mut p: Vec<u32> = (0..n as u32).collect();
                    for k in (1..n).rev() {
                        let j = (rng.next() * (k + 1) as f64) as usize;
                        p.swap(k, j.min(k));
                    }
                    Some(p)
                },
                seed as u64,
            );
            let r = connectivity(&c);
            assert_eq!(
                (r.min, r.max, r.mean),
                brute_reach(&c),
                "random perms n={n} h={h} N={nf}"
            );
        }
        // The paper's depth for full density: log2(n/b) + 1.
        let c = chain(
            64,
            8,
            4,
            |i| Some(perm::invert(&perm::peft_boft(64, 8, i))),
            5,
        );
        let r = connectivity(&c);
        assert!(r.dense);
        assert_eq!(r.factors_for_full_density, 4);
    }

    /// Rank of the Jacobian (central differences, f64) of raw parameters → materialised
    /// matrices: the number of independent directions the parametrisation really has.
    fn jacobian_rank(params: usize, f: impl Fn(&[f64]) -> Vec<f64>) -> usize {
        let mut rng = Rng(7);
        let x0: Vec<f64> = (0..params).map(|_| rng.normal() as f64 * 0.3).collect();
        let eps = 1e-6;
        let rows = f(&x0).len();
        let mut j = DMatrix::<f64>::zeros(rows, params);
        for p in 0..params {
            let (mut a, mut b) = (x0.clone(), x0.clone());
            a[p] += eps;
            b[p] -= eps;
            let (fa, fb) = (f(&a), f(&b));
            for r in 0..rows {
                j[(r, p)] = (fa[r] - fb[r]) / (2.0 * eps);
            }
        }
        j.svd(false, false)
            .singular_values
            .iter()
            .filter(|&&s| s > 1e-6)
            .count()
    }

    #[test]
    fn degrees_of_freedom_match_brute_force_rank() {
        // A PEFT-style target: raw blocks A → C−(½(A − Aᵀ)) per block, per factor.
        for (h, d, nf) in [(2usize, 4usize, 1usize), (4, 2, 2), (3, 3, 1), (4, 4, 3)] {
            let t = Target {
                name: "w".into(),
                module: "m".into(),
                side: Side::Input,
                shape: None,
                rows: None,
                factors: nf,
                blocks: d,
                block_size: h,
                data: vec![0.0; nf * d * h * h],
                deferred: None,
                perms: vec![None; nf],
                scale: None,
                kind: BlockKind::Cayley,
                ..Default::default()
            };
            let dof = degrees_of_freedom(&t);
            let raw = nf * d * h * h;
            let rank = jacobian_rank(raw, |x| {
                x.chunks(h * h)
                    .flat_map(|a| cayley::cayley_minus(h, &cayley::skew_half(h, a)))
                    .collect()
            });
            assert_eq!(dof.adapter, rank, "h={h} d={d} N={nf}");
            assert_eq!(dof.oft_same_block * nf, rank);
            // A dense orthogonal matrix of the same n: rank of the Cayley map on n×n.
            let n = h * d;
            if n <= 8 {
                let dense_rank =
                    jacobian_rank(n * n, |a| cayley::cayley_minus(n, &cayley::skew_half(n, a)));
                assert_eq!(dof.dense_orthogonal, dense_rank, "n={n}");
            }
        }
    }

    #[test]
    fn lanczos_finds_the_largest_angle_of_a_clustered_spectrum() {
        // 256 components in blocks of 16, three butterfly factors, generators as small as
        // trained ones (angles of tens of degrees, where the arccosine is well conditioned):
        // many close eigenvalues, where a power iteration converges slowly. Lanczos agrees with
        // the dense eigenvalues to well under a hundredth of a degree, from below.
        let n = 256;
        for seed in [3u64, 17] {
            let c = chain_of_size(
                n,
                16,
                3,
                |i| Some(perm::invert(&perm::peft_boft(n, 16, i))),
                seed,
                0.05,
            );
            let exact = transform_properties(&c, 8, DENSE_MAX).angle.value;
            let estimate = transform_properties(&c, 8, 0).angle.value;
            assert!(
                estimate <= exact + 1e-6 && exact - estimate < 0.01,
                "seed {seed}: {estimate} vs {exact}"
            );
        }
    }

    #[test]
    fn probe_measures_agree_with_exact_ones() {
        let n = 64;
        let c = chain(
            n,
            8,
            3,
            |i| Some(perm::invert(&perm::peft_boft(n, 8, i))),
            11,
        );
        let exact = transform_properties(&c, 8, DENSE_MAX);
        assert_eq!(exact.orth.method, "exact");
        assert!(exact.orth.value < 1e-5);
        let probe = transform_properties(&c, 64, 0);
        assert_eq!(probe.orth.method, "probe");
        assert!(probe.orth.value < 1e-5);
        // Hutchinson's estimate of ‖M − I‖_F with 64 probes: within 20%.
        let rel = (probe.distance.value - exact.distance.value).abs() / exact.distance.value;
        assert!(
            rel < 0.2,
            "{} vs {}",
            probe.distance.value,
            exact.distance.value
        );
        // Lanczos finds the largest rotation angle.
        assert!(
            (probe.angle.value - exact.angle.value).abs() < 2.0,
            "{} vs {}",
            probe.angle.value,
            exact.angle.value
        );
        // A non-orthogonal chain is caught by the probes too.
        let mut bad = c.clone();
        bad.factors[1].blocks[0] += 0.1;
        assert!(transform_properties(&bad, 8, 0).orth.value > 1e-3);
        // A single 2×2 rotation by θ: the largest rotation angle is θ.
        let theta = 0.3f64;
        let rot = Chain {
            n: 2,
            factors: vec![Factor {
                h: 2,
                d: 1,
                blocks: vec![
                    theta.cos() as f32,
                    -theta.sin() as f32,
                    theta.sin() as f32,
                    theta.cos() as f32,
                ],
                repeat: 0,
                perm: None,
            }],
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let p = transform_properties(&rot, 4, DENSE_MAX);
        assert!(
            (p.angle.value - theta.to_degrees()).abs() < 1e-3,
            "{}",
            p.angle.value
        );
        assert!((p.distance.value - (2.0 * (2.0 - 2.0 * theta.cos())).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn transposed_chain_is_the_inverse_of_an_orthogonal_chain() {
        let n = 32;
        let c = chain(
            n,
            4,
            3,
            |i| Some(perm::invert(&perm::peft_boft(n, 4, i))),
            3,
        );
        let t = c.transposed();
        let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.1 - 1.0).collect();
        let y = crate::math::kernel::apply_vec(&t, &crate::math::kernel::apply_vec(&c, &x));
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn shared_blocks_measure_as_the_whole_diagonal() {
        let (h, d) = (4usize, 6usize);
        let block = |s: f32| -> Vec<f32> {
            (0..h * h)
                .map(|i| if i % (h + 1) == 0 { 1.0 } else { 0.0 } + s * ((i * 7 % 5) as f32 - 2.0))
                .collect()
        };
        // Factors with their repeats; stored blocks differ from one another.
        let chain = |repeats: &[usize], perm: Option<Vec<u32>>| Chain {
            n: h * d,
            factors: repeats
                .iter()
                .enumerate()
                .map(|(i, &repeat)| Factor {
                    h,
                    d,
                    blocks: (0..d - repeat)
                        .flat_map(|k| block(0.05 * (i + 1) as f32 - 0.02 * k as f32))
                        .collect(),
                    repeat,
                    perm: perm.clone(),
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        // Measured whole and reduced, a chain gives the same three numbers.
        let same = |c: &Chain, what: &str| {
            let a = transform_properties(c, 8, DENSE_MAX);
            let b = shared_properties(c, 8, DENSE_MAX).expect("shared, not permuted");
            for (x, y) in [
                (a.orth.value, b.orth.value),
                (a.angle.value, b.angle.value),
                (a.distance.value, b.distance.value),
            ] {
                assert!(
                    (x - y).abs() <= 1e-9 * x.abs().max(1.0),
                    "{what}: {x} vs {y}"
                );
            }
        };
        for repeats in [
            vec![d - 1],
            vec![d - 1, d - 1],
            vec![d - 3],
            vec![d - 1, 2],
            vec![1, 3],
        ] {
            let c = chain(&repeats, None);
            // n = 24 is measured exactly, whole or reduced.
            same(&c, &format!("{repeats:?}"));
        }
        // The last positions identities in every factor.
        let mut c = chain(&[2, 2], None);
        for f in &mut c.factors {
            let hh = h * h;
            let len = f.blocks.len();
            for (i, x) in f.blocks[len - 2 * hh..].iter_mut().enumerate() {
                *x = if i % hh % (h + 1) == 0 { 1.0 } else { 0.0 };
            }
        }
        same(&c, "identity tail");
        let swap: Vec<u32> = (0..(h * d) as u32).rev().collect();
        assert!(shared_properties(&chain(&[d - 1], Some(swap)), 8, DENSE_MAX).is_none());
        assert!(shared_properties(&chain(&[0], None), 8, DENSE_MAX).is_none());
        assert!(shared_properties(&chain(&[d - 1, 0], None), 8, DENSE_MAX).is_none());
    }
}
