//! The structured kernel: apply a chain of block-diagonal factors, each conjugated by a gather
//! permutation, to many vectors at once. Cost is O(factors · b) per element; no n×n matrix is
//! ever formed.
//!
//! A factor with gather permutation `p` and blocks `Q_0..Q_{D−1}` maps a vector x to y with
//! `g[j] = x[p[j]]`, `h = blockdiag(Q) g`, `y[p[j]] = h[j]` (i.e. `y = Pᵀ · blockdiag(Q) · P · x`).
//! The chain applies factor 0 first.

/// One butterfly (or plain block-diagonal) factor.
#[derive(Debug, Clone)]
pub struct Factor {
    /// Block size.
    pub h: usize,
    /// Number of blocks; `h * d` is the vector length.
    pub d: usize,
    /// Row-major h×h blocks: `d − repeat` of them (see `repeat`).
    pub blocks: Vec<f32>,
    /// The first stored block also serves the next `repeat` positions: shared blocks (PEFT
    /// `block_share`) are stored once and never expanded over the diagonal. 0 for `d` distinct
    /// blocks.
    pub repeat: usize,
    /// Gather permutation, None for the identity.
    pub perm: Option<Vec<u32>>,
}

impl Factor {
    /// Vector length: `h × d`.
    pub fn n(&self) -> usize {
        self.h * self.d
    }

    /// Block `k` (a position on the diagonal, `0..d`), row-major.
    pub fn block(&self, k: usize) -> &[f32] {
        let (hh, i) = (self.h * self.h, k.saturating_sub(self.repeat));
        &self.blocks[i * hh..(i + 1) * hh]
    }
}

/// What a per-row scale multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleOn {
    /// One factor per vector (input-side adapters: a vector is a weight row, scaled whole).
    Vector,
    /// One factor per vector component (output-side adapters: a vector is a weight column).
    Component,
}

/// A full transform of vectors of length n: optional scale, factors, optional scale.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Vector length.
    pub n: usize,
    /// The factors, applied first to last.
    pub factors: Vec<Factor>,
    /// Per-vector (or per-component) scale, if any.
    pub scale: Option<Vec<f32>>,
    /// What the scale multiplies.
    pub scale_on: ScaleOn,
    /// Apply the scale before the factors (un-merge) instead of after (merge).
    pub scale_first: bool,
    /// Linear strength `x + t·(F(x) − x)`; 1.0 applies F itself.
    pub blend: f32,
}

/// Reusable buffers for `apply_rows`, one set per worker thread.
#[derive(Default)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
    orig: Vec<f32>,
    runs: Vec<(usize, usize, usize)>,
}

impl Chain {
    fn scale_rows(&self, x: &mut [f32], row0: usize, rows: usize) {
        let Some(s) = &self.scale else { return };
        let n = self.n;
        match self.scale_on {
            ScaleOn::Vector => {
                for r in 0..rows {
                    let f = s[row0 + r];
                    for v in &mut x[r * n..(r + 1) * n] {
                        *v *= f;
                    }
                }
            }
            ScaleOn::Component => {
                for r in 0..rows {
                    for (v, f) in x[r * n..(r + 1) * n].iter_mut().zip(s) {
                        *v *= f;
                    }
                }
            }
        }
    }

    /// Transform `rows` vectors stored row-major in `x` (`rows × n`). `row0` is the index of the
    /// first vector, for per-vector scales.
    pub fn apply_rows(&self, x: &mut Vec<f32>, row0: usize, rows: usize, scratch: &mut Scratch) {
        let n = self.n;
        debug_assert_eq!(x.len(), rows * n);
        if self.blend != 1.0 {
            scratch.orig.clear();
            scratch.orig.extend_from_slice(x);
        }
        if self.scale_first {
            self.scale_rows(x, row0, rows);
        }
        scratch.a.resize(rows * n, 0.0);
        scratch.b.resize(rows * n, 0.0);
        for f in &self.factors {
            debug_assert_eq!(f.n(), n);
            match &f.perm {
                Some(p) => {
                    runs(p, &mut scratch.runs);
                    gather(x, &mut scratch.a, &scratch.runs, rows, n);
                    blocks_times(f, &scratch.a, &mut scratch.b, rows);
                    scatter(&scratch.b, x, &scratch.runs, rows, n);
                }
                None => {
                    blocks_times(f, x, &mut scratch.a, rows);
                    std::mem::swap(x, &mut scratch.a);
                }
            }
        }
        if !self.scale_first {
            self.scale_rows(x, row0, rows);
        }
        if self.blend != 1.0 {
            let t = self.blend;
            for (v, o) in x.iter_mut().zip(&scratch.orig) {
                *v = o + t * (*v - o);
            }
        }
    }

    /// The chain's `Mᵀ` without its scale: factors in reverse order with transposed blocks
    /// (`(PᵀQP)ᵀ = PᵀQᵀP`). For an orthogonal chain this is its inverse.
    pub fn transposed(&self) -> Chain {
        let mut t = self.clone();
        t.factors.reverse();
        for f in &mut t.factors {
            let mut b = Vec::with_capacity(f.blocks.len());
            for q in f.blocks.chunks_exact(f.h * f.h) {
                b.extend(super::blocks::transpose(f.h, q));
            }
            f.blocks = b;
        }
        t.scale = None;
        t
    }

    /// The dense n×n matrix M (row-major, f64), found by pushing the identity through the chain:
    /// row j of the result is `M e_j`, i.e. the result is Mᵀ, transposed back. O(n²) memory:
    /// for measuring small transforms, never for merging.
    pub fn dense(&self) -> Vec<f64> {
        let n = self.n;
        let mut x = vec![0f32; n * n];
        for j in 0..n {
            x[j * n + j] = 1.0;
        }
        self.apply_rows(&mut x, 0, n, &mut Scratch::default());
        let mut m = vec![0f64; n * n];
        for j in 0..n {
            for i in 0..n {
                m[i * n + j] = x[j * n + i] as f64;
            }
        }
        m
    }
}

/// A permutation as maximal runs `(j, p[j], len)` with `p[j + k] = p[j] + k`: butterfly
/// permutations move half-blocks, so gathers and scatters become a few memcpys per row.
pub(crate) fn runs(p: &[u32], out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let mut j = 0;
    while j < p.len() {
        let start = j;
        while j + 1 < p.len() && p[j + 1] == p[j] + 1 {
            j += 1;
        }
        out.push((start, p[start] as usize, j + 1 - start));
        j += 1;
    }
}

/// `out[r, j] = x[r, p[j]]` for every row r, `p` given as its `runs`.
pub(crate) fn gather(
    x: &[f32],
    out: &mut [f32],
    runs: &[(usize, usize, usize)],
    rows: usize,
    n: usize,
) {
    for r in 0..rows {
        let (src, dst) = (&x[r * n..(r + 1) * n], &mut out[r * n..(r + 1) * n]);
        for &(j, pj, len) in runs {
            dst[j..j + len].copy_from_slice(&src[pj..pj + len]);
        }
    }
}

fn scatter(h: &[f32], x: &mut [f32], runs: &[(usize, usize, usize)], rows: usize, n: usize) {
    for r in 0..rows {
        let (src, dst) = (&h[r * n..(r + 1) * n], &mut x[r * n..(r + 1) * n]);
        for &(j, pj, len) in runs {
            dst[pj..pj + len].copy_from_slice(&src[j..j + len]);
        }
    }
}

/// `out[r, block k] = Q_k · src[r, block k]` for every row r.
fn blocks_times(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features these functions are compiled for (checked above).
        unsafe {
            match f.h {
                2 => return blocks_times_fixed_avx2::<2>(f, src, out, rows),
                4 => return blocks_times_fixed_avx2::<4>(f, src, out, rows),
                8 => return blocks_times_fixed_avx2::<8>(f, src, out, rows),
                16 => return blocks_times_fixed_avx2::<16>(f, src, out, rows),
                32 => return blocks_times_fixed_avx2::<32>(f, src, out, rows),
                _ => {}
            }
        }
    }
    if f.h < 8 {
        return blocks_times_small(f, src, out, rows);
    }
    blocks_times_gemm(f, src, out, rows)
}

/// Blocks narrower than 8 on any CPU: a GEMM call per block costs far more than its few
/// multiplications (a verify probe of 2^17 blocks of 2 spent 19 s in matrixmultiply's setup).
fn blocks_times_small(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let (h, n) = (f.h, f.n());
    for k in 0..f.d {
        let q = f.block(k);
        for r in 0..rows {
            let x = &src[r * n + k * h..][..h];
            let y = &mut out[r * n + k * h..][..h];
            for (i, yi) in y.iter_mut().enumerate() {
                let row = &q[i * h..(i + 1) * h];
                *yi = row
                    .iter()
                    .zip(x)
                    .fold(0.0, |a, (&qij, &xj)| xj.mul_add(qij, a));
            }
        }
    }
}

/// The common block sizes, compiled for AVX2+FMA: the accumulators of one output row piece stay
/// in registers and the transposed block stays in L1, which beats a general GEMM's packing at
/// these tiny sizes by a wide margin.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn blocks_times_fixed_avx2<const H: usize>(
    f: &Factor,
    src: &[f32],
    out: &mut [f32],
    rows: usize,
) {
    blocks_times_fixed::<H>(f, src, out, rows)
}

#[inline(always)]
fn blocks_times_fixed<const H: usize>(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let n = f.n();
    let mut qt = vec![[0f32; H]; H];
    for k in 0..f.d {
        let q = f.block(k);
        for (i, row) in q.chunks_exact(H).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                qt[j][i] = v;
            }
        }
        let mut r = 0;
        // Two rows at a time share every load of the block.
        while r + 1 < rows {
            let x0: &[f32; H] = src[r * n + k * H..][..H].try_into().unwrap();
            let x1: &[f32; H] = src[(r + 1) * n + k * H..][..H].try_into().unwrap();
            let (mut a0, mut a1) = ([0f32; H], [0f32; H]);
            for j in 0..H {
                let (b0, b1) = (x0[j], x1[j]);
                let qj = &qt[j];
                for i in 0..H {
                    a0[i] = b0.mul_add(qj[i], a0[i]);
                    a1[i] = b1.mul_add(qj[i], a1[i]);
                }
            }
            out[r * n + k * H..][..H].copy_from_slice(&a0);
            out[(r + 1) * n + k * H..][..H].copy_from_slice(&a1);
            r += 2;
        }
        if r < rows {
            let x0: &[f32; H] = src[r * n + k * H..][..H].try_into().unwrap();
            let mut a0 = [0f32; H];
            for j in 0..H {
                for i in 0..H {
                    a0[i] = x0[j].mul_add(qt[j][i], a0[i]);
                }
            }
            out[r * n + k * H..][..H].copy_from_slice(&a0);
        }
    }
}

/// Any other block size, and every block of 64 or more: one GEMM per block, `src_k · Q_kᵀ`
/// (matrixmultiply's packed kernels; from 64 on a block no longer fits the registers of the
/// fixed-size kernels above).
fn blocks_times_gemm(f: &Factor, src: &[f32], out: &mut [f32], rows: usize) {
    let (h, n) = (f.h, f.n());
    for k in 0..f.d {
        let q = f.block(k);
        // SAFETY: every pointer and stride addresses inside `src`, `q` and `out`: rows × h
        // entries starting at column k·h with row stride n, and the h×h block read transposed.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                h,
                h,
                1.0,
                src.as_ptr().add(k * h),
                n as isize,
                1,
                q.as_ptr(),
                1,
                h as isize,
                0.0,
                out.as_mut_ptr().add(k * h),
                n as isize,
                1,
            );
        }
    }
}

/// Apply the chain to one vector (for verification probes and tests).
pub fn apply_vec(chain: &Chain, v: &[f32]) -> Vec<f32> {
    let mut x = v.to_vec();
    chain.apply_rows(&mut x, 0, 1, &mut Scratch::default());
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense reference: build each factor as an n×n matrix and multiply, in f64.
    fn dense(f: &Factor) -> Vec<f64> {
        let n = f.n();
        let mut bd = vec![0f64; n * n];
        for k in 0..f.d {
            for i in 0..f.h {
                for j in 0..f.h {
                    bd[(k * f.h + i) * n + k * f.h + j] = f.block(k)[i * f.h + j] as f64;
                }
            }
        }
        let p: Vec<usize> = match &f.perm {
            Some(p) => p.iter().map(|&x| x as usize).collect(),
            None => (0..n).collect(),
        };
        // Pᵀ · BD · P with P[j, p[j]] = 1  =>  entry (a, b) = BD[p⁻¹(a), p⁻¹(b)].
        let mut inv = vec![0usize; n];
        for (j, &x) in p.iter().enumerate() {
            inv[x] = j;
        }
        let mut m = vec![0f64; n * n];
        for a in 0..n {
            for b in 0..n {
                m[a * n + b] = bd[inv[a] * n + inv[b]];
            }
        }
        m
    }

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn fixed_size_kernels_match_the_gemm() {
        let mut seed = 9u64;
        for h in [2usize, 3, 4, 5, 7, 8, 16, 32] {
            let d = 3;
            let f = Factor {
                h,
                d,
                blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: None,
            };
            for rows in [1usize, 2, 7] {
                let src: Vec<f32> = (0..rows * h * d).map(|_| rnd(&mut seed)).collect();
                let mut a = vec![0f32; src.len()];
                let mut b = vec![0f32; src.len()];
                blocks_times(&f, &src, &mut a, rows);
                blocks_times_gemm(&f, &src, &mut b, rows);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-5, "h={h} rows={rows}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn shared_blocks_apply_as_their_expansion() {
        // A factor storing one block for the first `repeat + 1` positions gives bit for bit
        // what the same blocks written out at every position give, on every kernel.
        let mut seed = 5u64;
        for (h, d) in [(8usize, 5usize), (16, 3), (5, 4), (64, 2)] {
            for repeat in 1..d {
                let stored: Vec<f32> = (0..(d - repeat) * h * h).map(|_| rnd(&mut seed)).collect();
                let shared = Factor {
                    h,
                    d,
                    blocks: stored.clone(),
                    repeat,
                    perm: None,
                };
                let mut expanded = shared.clone();
                expanded.repeat = 0;
                expanded.blocks = (0..d).flat_map(|k| shared.block(k).to_vec()).collect();
                assert_eq!(expanded.blocks.len(), d * h * h);
                let chain = |f: Factor| Chain {
                    n: h * d,
                    factors: vec![f],
                    scale: None,
                    scale_on: ScaleOn::Vector,
                    scale_first: false,
                    blend: 1.0,
                };
                let (a, b) = (chain(shared.clone()), chain(expanded));
                let x0: Vec<f32> = (0..3 * h * d).map(|_| rnd(&mut seed)).collect();
                let (mut x, mut y) = (x0.clone(), x0);
                a.apply_rows(&mut x, 0, 3, &mut Scratch::default());
                b.apply_rows(&mut y, 0, 3, &mut Scratch::default());
                assert_eq!(x, y, "h={h} d={d} repeat={repeat}");
                let (mut x, mut y) = (x.clone(), x);
                a.transposed()
                    .apply_rows(&mut x, 0, 3, &mut Scratch::default());
                b.transposed()
                    .apply_rows(&mut y, 0, 3, &mut Scratch::default());
                assert_eq!(x, y, "transposed, h={h} d={d} repeat={repeat}");
            }
        }
    }

    #[test]
    fn matches_dense_product() {
        let mut seed = 3u64;
        let (h, d) = (4, 4);
        let n = h * d;
        let factors: Vec<Factor> = (0..3)
            .map(|i| Factor {
                h,
                d,
                blocks: (0..d * h * h).map(|_| rnd(&mut seed)).collect(),
                repeat: 0,
                perm: if i == 0 {
                    None
                } else {
                    Some(crate::math::perm::peft_boft(n, h, i))
                },
            })
            .collect();
        let rows = 3;
        let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
        let scale: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 * 0.1).collect();
        let chain = Chain {
            n,
            factors: factors.clone(),
            scale: Some(scale.clone()),
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let mut x = x0.clone();
        chain.apply_rows(&mut x, 0, rows, &mut Scratch::default());

        // M = F2 · F1 · F0; each row r ↦ s_r · M r.
        let mut m: Vec<f64> = (0..n * n)
            .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        for f in &factors {
            let fd = dense(f);
            let mut next = vec![0f64; n * n];
            for a in 0..n {
                for b in 0..n {
                    next[a * n + b] = (0..n).map(|k| fd[a * n + k] * m[k * n + b]).sum();
                }
            }
            m = next;
        }
        for r in 0..rows {
            for a in 0..n {
                let want: f64 = scale[r] as f64
                    * (0..n)
                        .map(|b| m[a * n + b] * x0[r * n + b] as f64)
                        .sum::<f64>();
                assert!(
                    (x[r * n + a] as f64 - want).abs() < 1e-5,
                    "{} vs {}",
                    x[r * n + a],
                    want
                );
            }
        }
    }

    /// Block sizes from 2 to 256 (fixed-size kernels and the GEMM path) and 1 to 6 factors with
    /// arbitrary permutations, against the dense product of the factors.
    #[test]
    fn every_block_size_and_factor_count() {
        let mut seed = 11u64;
        for (h, d) in [
            (2, 8),
            (3, 4),
            (8, 2),
            (16, 2),
            (32, 2),
            (64, 2),
            (128, 2),
            (256, 2),
        ] {
            let n = h * d;
            for nf in 1..=6 {
                let factors: Vec<Factor> = (0..nf)
                    .map(|i| {
                        let mut p: Vec<u32> = (0..n as u32).collect();
                        for j in (1..n).rev() {
                            let k = (rnd(&mut seed).abs() * 1e6) as usize % (j + 1);
                            p.swap(j, k);
                        }
                        Factor {
                            h,
                            d,
                            blocks: (0..d * h * h)
                                .map(|_| rnd(&mut seed) * 2.0 / (h as f32).sqrt())
                                .collect(),
                            repeat: 0,
                            perm: (i > 0).then_some(p),
                        }
                    })
                    .collect();
                let rows = 3;
                let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                let chain = Chain {
                    n,
                    factors: factors.clone(),
                    scale: None,
                    scale_on: ScaleOn::Vector,
                    scale_first: false,
                    blend: 1.0,
                };
                let mut x = x0.clone();
                chain.apply_rows(&mut x, 0, rows, &mut Scratch::default());
                for r in 0..rows {
                    let mut want: Vec<f64> =
                        x0[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
                    for f in &factors {
                        let fd = dense(f);
                        want = (0..n)
                            .map(|a| (0..n).map(|b| fd[a * n + b] * want[b]).sum())
                            .collect();
                    }
                    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                    for a in 0..n {
                        let e = (x[r * n + a] as f64 - want[a]).abs() / scale;
                        assert!(e < 1e-5, "h={h} factors={nf}: relative error {e:e}");
                    }
                }
            }
        }
    }
}
