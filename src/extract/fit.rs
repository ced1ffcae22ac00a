//! Fitting one tensor pair: the block-coordinate descent over a chain's factors (docs/EXTRACT.md).
//!
//! The data are sample vectors: weight rows for an input-side fit, weight columns for an
//! output-side one, so that in both cases the model is `y ≈ scale ∘ M x` with M the chain
//! (`math::kernel::Chain`, factor 0 applied first). Every pass streams the pair in chunks of
//! samples, so memory does not grow with the tensor.

use rayon::prelude::*;

use crate::checkpoint::dtype::decode_f32;
use crate::checkpoint::Dtype;
use crate::error::{Class, Error, Result};
use crate::math::kernel::{Chain, Factor, ScaleOn, Scratch};
use crate::math::procrustes;

/// A 2-D view of one tensor's bytes (4-D weights flattened to `(out, rest)`).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    /// The tensor's little-endian bytes.
    pub bytes: &'a [u8],
    /// Their dtype.
    pub dtype: Dtype,
    /// Rows of the 2-D view.
    pub rows: usize,
    /// Columns of the 2-D view.
    pub cols: usize,
}

/// One base/tuned pair seen as sample vectors.
pub struct Data<'a> {
    /// The base tensor.
    pub base: Matrix<'a>,
    /// The fine-tuned tensor.
    pub tuned: Matrix<'a>,
    /// Samples are columns (output-side fit) instead of rows.
    pub columns: bool,
}

impl Data<'_> {
    /// Length of a sample vector: the rotated axis.
    pub fn n(&self) -> usize {
        if self.columns {
            self.base.rows
        } else {
            self.base.cols
        }
    }

    /// Number of sample vectors.
    pub fn samples(&self) -> usize {
        if self.columns {
            self.base.cols
        } else {
            self.base.rows
        }
    }

    /// What a per-output-row scale multiplies in sample terms.
    pub fn scale_on(&self) -> ScaleOn {
        if self.columns {
            ScaleOn::Component
        } else {
            ScaleOn::Vector
        }
    }

    /// Samples per chunk: about a megabyte of f32 per matrix.
    fn chunk(&self) -> usize {
        ((1 << 18) / self.n().max(1)).max(1)
    }

    fn read(m: &Matrix, columns: bool, s0: usize, count: usize, out: &mut Vec<f32>) {
        let es = m.dtype.float_size().unwrap_or(4);
        if !columns {
            out.resize(count * m.cols, 0.0);
            let a = s0 * m.cols * es;
            decode_f32(m.dtype, &m.bytes[a..a + count * m.cols * es], out);
            return;
        }
        // Column samples: each weight row gives `count` contiguous elements to scatter.
        let n = m.rows;
        out.resize(count * n, 0.0);
        let mut row = vec![0f32; count];
        for r in 0..n {
            let a = (r * m.cols + s0) * es;
            decode_f32(m.dtype, &m.bytes[a..a + count * es], &mut row);
            for (c, v) in row.iter().enumerate() {
                out[c * n + r] = *v;
            }
        }
    }

    /// Samples `s0..s0 + count` of both tensors, row-major `count × n`.
    fn pair(&self, s0: usize, count: usize, x: &mut Vec<f32>, y: &mut Vec<f32>) {
        Self::read(&self.base, self.columns, s0, count, x);
        Self::read(&self.tuned, self.columns, s0, count, y);
    }

    /// Run `f` over every chunk and combine the results with `join`, in parallel but in an order
    /// fixed by the tensor alone: the chunks are cut into at most `MAX_TASKS` runs of consecutive
    /// chunks, each folded in order, and the runs joined in order. Float sums then do not depend
    /// on the thread count or on scheduling, so one machine always fits the same adapter (a
    /// stopping decision near its threshold cannot flip between runs). `acc_bytes`, the size of
    /// one accumulator, caps the runs so their accumulators stay within `TASK_MEMORY`.
    fn pass<A: Send>(
        &self,
        acc_bytes: usize,
        init: impl Fn() -> A + Sync + Send,
        f: impl Fn(&mut A, usize, &[f32], &[f32]) -> Result<()> + Sync + Send,
        join: impl Fn(A, A) -> A + Sync + Send,
    ) -> Result<A> {
        let (s, c) = (self.samples(), self.chunk());
        let chunks = s.div_ceil(c);
        let tasks = chunks
            .min(MAX_TASKS)
            .min(TASK_MEMORY / acc_bytes.max(1))
            .max(1);
        let per = chunks.div_ceil(tasks);
        let parts: Vec<A> = (0..tasks)
            .into_par_iter()
            .map(|t| {
                let (mut acc, mut x, mut y) = (init(), Vec::new(), Vec::new());
                for k in t * per..((t + 1) * per).min(chunks) {
                    crate::output::check_interrupted()?;
                    let s0 = k * c;
                    self.pair(s0, c.min(s - s0), &mut x, &mut y);
                    f(&mut acc, s0, &x, &y)?;
                }
                Ok(acc)
            })
            .collect::<Result<_>>()?;
        Ok(parts.into_iter().reduce(join).unwrap_or_else(init))
    }
}

/// Most runs of chunks a pass cuts a tensor into (enough to keep every core of a large machine
/// busy on a large tensor).
const MAX_TASKS: usize = 64;

/// Memory all runs' accumulators of one pass may take together.
const TASK_MEMORY: usize = 512 << 20;

/// A chain being fitted: its factors (each with an identity flag, so untouched factors cost
/// nothing) and the per-output-row scale.
#[derive(Clone)]
pub struct State {
    /// The chain's factors, factor 0 applied first.
    pub factors: Vec<Factor>,
    /// Which factors are still the identity (skipped when applying).
    pub identity: Vec<bool>,
    /// The per-output-row scale, when fitted.
    pub scale: Option<Vec<f32>>,
}

impl State {
    /// `perms.len()` identity factors of `n / h` blocks of `h`; a scale of ones if `scaled`.
    pub fn identity(
        n: usize,
        h: usize,
        perms: Vec<Option<Vec<u32>>>,
        scale_len: Option<usize>,
    ) -> State {
        let d = n / h;
        let mut eye = vec![0f32; d * h * h];
        for k in 0..d {
            for i in 0..h {
                eye[k * h * h + i * h + i] = 1.0;
            }
        }
        let identity = vec![true; perms.len()];
        let factors = perms
            .into_iter()
            .map(|perm| Factor {
                h,
                d,
                blocks: eye.clone(),
                repeat: 0,
                perm,
            })
            .collect();
        State {
            factors,
            identity,
            scale: scale_len.map(|l| vec![1.0; l]),
        }
    }

    fn chain(&self, n: usize, range: std::ops::Range<usize>) -> Option<Chain> {
        let factors: Vec<Factor> = range
            .filter(|&i| !self.identity[i])
            .map(|i| self.factors[i].clone())
            .collect();
        (!factors.is_empty()).then_some(Chain {
            n,
            factors,
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        })
    }
}

/// The outcome of fitting one structure to one pair.
pub struct Fitted {
    /// The fitted chain.
    pub state: State,
    /// ‖T − scale ∘ M(B)‖² after each accepted sweep (the first entry is after sweep 1).
    pub history: Vec<f64>,
    /// Residual of the returned state.
    pub residual: f64,
}

/// Sums every fit needs once per pair.
pub struct Norms {
    /// ‖T − B‖².
    pub diff: f64,
    /// ‖T‖².
    pub tuned: f64,
}

/// ‖T − B‖² and ‖T‖², refusing non-finite values (they would poison every cross product).
pub fn norms(data: &Data, name: &str) -> Result<Norms> {
    let (d, t) = data.pass(
        16,
        || (0f64, 0f64),
        |acc, s0, x, y| {
            if let Some(i) = x.iter().chain(y).position(|v| !v.is_finite()) {
                let (which, i) = if i < x.len() {
                    ("base", i)
                } else {
                    ("tuned", i - x.len())
                };
                let v = if which == "base" { x[i] } else { y[i] };
                return Err(Error::bare(
                    Class::NonFinite,
                    format!(
                        "{name}: the {which} tensor holds {v} (sample {}), nothing to fit",
                        s0 + i / data.n()
                    ),
                ));
            }
            for (a, b) in x.iter().zip(y) {
                let (a, b) = (*a as f64, *b as f64);
                acc.0 += (b - a) * (b - a);
                acc.1 += b * b;
            }
            Ok(())
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    )?;
    Ok(Norms { diff: d, tuned: t })
}

/// Stopping rule and limits of the descent.
#[derive(Clone, Copy)]
pub struct Stop {
    /// Stop when a sweep lowers the residual by less than this fraction of `reference`.
    pub tol: f64,
    /// ‖T − B‖²: a gain below `tol` of it raises the captured share by less than `tol`.
    pub reference: f64,
    /// Most sweeps.
    pub max_sweeps: usize,
}

/// Fit `start` (identity factors for a cold start) to the pair by block-coordinate descent,
/// `start_residual` being its residual. Every accepted sweep lowers the residual: a sweep that
/// would raise it (rounding near convergence) is undone and ends the descent, so the history is
/// non-increasing by construction.
pub fn fit(data: &Data, start: State, start_residual: f64, stop: Stop) -> Result<Fitted> {
    let mut state = start;
    let mut residual = start_residual;
    let mut history = Vec::new();
    let exact = state.factors.len() == 1 && state.scale.is_none();
    for _ in 0..stop.max_sweeps.max(1) {
        if residual == 0.0 {
            break;
        }
        let before = state.clone();
        for k in 0..state.factors.len() {
            let blocks = factor_step(data, &state, k)?;
            state.factors[k].blocks = blocks;
            state.identity[k] = false;
        }
        let (r, scale) = residual_pass(data, &state)?;
        if state.scale.is_some() {
            state.scale = Some(scale);
        }
        // NaN (a poisoned sum) counts as a rise.
        if r.is_nan() || r > residual {
            state = before;
            break;
        }
        let gain = residual - r;
        residual = r;
        history.push(r);
        if exact || gain <= stop.tol * stop.reference {
            break;
        }
    }
    Ok(Fitted {
        state,
        history,
        residual,
    })
}

/// The best blocks of factor `k` with every other factor (and the scale) fixed: per block, a
/// Procrustes rotation of a b×b cross product accumulated over every sample.
///
/// With `M = C · F_k · A` (A the factors before k, C those after), `‖y − σ M x‖ = ‖Cᵀ y − F_k (σ A
/// x)‖` for a per-sample scale σ, so the targets are `Cᵀ y` and the inputs `σ A x`. A per-component
/// scale S does not commute with C; there the step minimises a majorizer of the residual at the
/// current chain (`‖S z‖² ≤ ‖S z₀‖² + 2⟨S² z₀, z − z₀⟩ + λ‖z − z₀‖²`, λ = max s²), whose optimum is
/// again a Procrustes problem with targets `Cᵀ (S y + (λ − S²) z₀)` and never raises the residual.
fn factor_step(data: &Data, state: &State, k: usize) -> Result<Vec<f32>> {
    let n = data.n();
    let f = &state.factors[k];
    let (h, d) = (f.h, f.d);
    let before = state.chain(n, 0..k);
    let after = state
        .chain(n, k + 1..state.factors.len())
        .map(|c| c.transposed());
    let whole = state.chain(n, 0..state.factors.len());
    let on = data.scale_on();
    let lambda = state
        .scale
        .as_ref()
        .map(|s| s.iter().fold(0f32, |m, v| m.max(v * v)))
        .unwrap_or(1.0);
    let perm = f.perm.as_deref();
    let k_sum = data.pass(
        d * h * h * 8,
        || {
            (
                vec![0f64; d * h * h],
                Scratch::default(),
                Vec::new(),
                Vec::new(),
                vec![0f32; h * h],
            )
        },
        |(acc, scratch, a, t, prod), s0, x, y| {
            let rows = x.len() / n;
            a.clear();
            a.extend_from_slice(x);
            if let Some(c) = &before {
                c.apply_rows(a, s0, rows, scratch);
            }
            t.clear();
            t.extend_from_slice(y);
            match (&state.scale, on) {
                (Some(s), ScaleOn::Vector) => {
                    for (r, row) in a.chunks_exact_mut(n).enumerate() {
                        let sigma = s[s0 + r];
                        row.iter_mut().for_each(|v| *v *= sigma);
                    }
                }
                (Some(s), ScaleOn::Component) => {
                    let mut z = x.to_vec();
                    if let Some(c) = &whole {
                        c.apply_rows(&mut z, s0, rows, scratch);
                    }
                    for (tr, zr) in t.chunks_exact_mut(n).zip(z.chunks_exact(n)) {
                        for ((tv, zv), sc) in tr.iter_mut().zip(zr).zip(s) {
                            *tv = sc * *tv + (lambda - sc * sc) * zv;
                        }
                    }
                }
                (None, _) => {}
            }
            if let Some(c) = &after {
                c.apply_rows(t, s0, rows, scratch);
            }
            if let Some(p) = perm {
                gather(a, p, n);
                gather(t, p, n);
            }
            for j in 0..d {
                // K_j += T_jᵀ A_j: (h × rows) · (rows × h), both read in place with strides.
                // SAFETY: the views stay inside `t`/`a` (rows × n, block columns j·h..j·h+h)
                // and `prod` is h×h.
                unsafe {
                    matrixmultiply::sgemm(
                        h,
                        rows,
                        h,
                        1.0,
                        t.as_ptr().add(j * h),
                        1,
                        n as isize,
                        a.as_ptr().add(j * h),
                        n as isize,
                        1,
                        0.0,
                        prod.as_mut_ptr(),
                        h as isize,
                        1,
                    );
                }
                for (o, v) in acc[j * h * h..(j + 1) * h * h].iter_mut().zip(prod.iter()) {
                    *o += *v as f64;
                }
            }
            Ok(())
        },
        |mut a, b| {
            a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
            a
        },
    )?;
    let blocks: Vec<Vec<f32>> = k_sum
        .0
        .par_chunks_exact(h * h)
        .map(|kj| {
            procrustes::rotation(h, kj)
                .0
                .into_iter()
                .map(|v| v as f32)
                .collect()
        })
        .collect();
    Ok(blocks.concat())
}

/// `v[j] = v[p[j]]` on every row.
fn gather(v: &mut [f32], p: &[u32], n: usize) {
    let mut tmp = vec![0f32; n];
    for row in v.chunks_exact_mut(n) {
        for (o, &i) in tmp.iter_mut().zip(p) {
            *o = row[i as usize];
        }
        row.copy_from_slice(&tmp);
    }
}

/// The residual `‖y − scale ∘ M x‖²` summed in f64, with the scale re-fitted in closed form
/// first when the state has one (returned; empty otherwise).
pub fn residual_pass(data: &Data, state: &State) -> Result<(f64, Vec<f32>)> {
    let n = data.n();
    let whole = state.chain(n, 0..state.factors.len());
    let scaled = state.scale.is_some();
    let component = scaled && data.scale_on() == ScaleOn::Component;
    struct Acc {
        residual: f64,
        // Per-sample scales as (first sample, values), chunk by chunk.
        sigma: Vec<(usize, Vec<f32>)>,
        // Per-component Σ y², Σ y z, Σ z².
        yy: Vec<f64>,
        yz: Vec<f64>,
        zz: Vec<f64>,
        scratch: Scratch,
        z: Vec<f32>,
    }
    let init = || Acc {
        residual: 0.0,
        sigma: Vec::new(),
        yy: vec![0.0; if component { n } else { 0 }],
        yz: vec![0.0; if component { n } else { 0 }],
        zz: vec![0.0; if component { n } else { 0 }],
        scratch: Scratch::default(),
        z: Vec::new(),
    };
    let acc = data.pass(
        if component { 3 * n * 8 } else { 64 },
        init,
        |acc, s0, x, y| {
            let rows = x.len() / n;
            acc.z.clear();
            acc.z.extend_from_slice(x);
            if let Some(c) = &whole {
                c.apply_rows(&mut acc.z, s0, rows, &mut acc.scratch);
            }
            if component {
                for (yr, zr) in y.chunks_exact(n).zip(acc.z.chunks_exact(n)) {
                    for c in 0..n {
                        let (yv, zv) = (yr[c] as f64, zr[c] as f64);
                        acc.yy[c] += yv * yv;
                        acc.yz[c] += yv * zv;
                        acc.zz[c] += zv * zv;
                    }
                }
            } else if scaled {
                let mut sig = Vec::with_capacity(rows);
                for (yr, zr) in y.chunks_exact(n).zip(acc.z.chunks_exact(n)) {
                    let (mut yz, mut zz) = (0f64, 0f64);
                    for (yv, zv) in yr.iter().zip(zr) {
                        yz += *yv as f64 * *zv as f64;
                        zz += *zv as f64 * *zv as f64;
                    }
                    let s = if zz > 0.0 { (yz / zz) as f32 } else { 1.0 };
                    sig.push(s);
                    for (yv, zv) in yr.iter().zip(zr) {
                        let e = *yv as f64 - s as f64 * *zv as f64;
                        acc.residual += e * e;
                    }
                }
                acc.sigma.push((s0, sig));
            } else {
                for (yv, zv) in y.iter().zip(acc.z.iter()) {
                    let e = *yv as f64 - *zv as f64;
                    acc.residual += e * e;
                }
            }
            Ok(())
        },
        |mut a, b| {
            a.residual += b.residual;
            a.sigma.extend(b.sigma);
            for (v, w) in [(&mut a.yy, &b.yy), (&mut a.yz, &b.yz), (&mut a.zz, &b.zz)] {
                v.iter_mut().zip(w).for_each(|(p, q)| *p += q);
            }
            a
        },
    )?;
    if component {
        let mut residual = 0.0;
        let mut scale = Vec::with_capacity(n);
        for c in 0..n {
            let s = if acc.zz[c] > 0.0 {
                acc.yz[c] / acc.zz[c]
            } else {
                1.0
            };
            let s = s as f32 as f64;
            // Σ (y − s z)², from sums of exact f32 products in f64.
            residual += (acc.yy[c] - 2.0 * s * acc.yz[c] + s * s * acc.zz[c]).max(0.0);
            scale.push(s as f32);
        }
        return Ok((residual, scale));
    }
    let mut sigma = acc.sigma;
    sigma.sort_by_key(|(s0, _)| *s0);
    Ok((
        acc.residual,
        sigma.into_iter().flat_map(|(_, v)| v).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::{cayley, perm};

    fn lcg(seed: u64) -> impl FnMut() -> f32 {
        let mut x = seed;
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        }
    }

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn random_blocks(h: usize, d: usize, seed: u64, amp: f64) -> Vec<f32> {
        let mut r = lcg(seed);
        let mut out = Vec::new();
        for _ in 0..d {
            let a: Vec<f64> = (0..h * h).map(|_| r() as f64 * amp).collect();
            out.extend(
                cayley::cayley_minus(h, &cayley::skew_half(h, &a))
                    .iter()
                    .map(|&v| v as f32),
            );
        }
        out
    }

    /// A (rows × cols) base and its image under a random structured chain plus noise.
    fn case(
        rows: usize,
        cols: usize,
        h: usize,
        m: usize,
        columns: bool,
        noise: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<Option<Vec<u32>>>) {
        let n = if columns { rows } else { cols };
        let mut r = lcg(7);
        let base: Vec<f32> = (0..rows * cols).map(|_| r()).collect();
        let perms: Vec<Option<Vec<u32>>> = (0..m)
            .map(|i| (i > 0).then(|| perm::invert(&perm::peft_boft(n, h, i))))
            .collect();
        let chain = Chain {
            n,
            factors: perms
                .iter()
                .enumerate()
                .map(|(i, p)| Factor {
                    h,
                    d: n / h,
                    blocks: random_blocks(h, n / h, 100 + i as u64, 0.6),
                    repeat: 0,
                    perm: p.clone(),
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let mut samples = if columns {
            transpose(&base, rows, cols)
        } else {
            base.clone()
        };
        let count = samples.len() / n;
        chain.apply_rows(&mut samples, 0, count, &mut Scratch::default());
        let mut tuned = if columns {
            transpose(&samples, cols, rows)
        } else {
            samples
        };
        for v in &mut tuned {
            *v += noise * r();
        }
        (base, tuned, perms)
    }

    fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; v.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = v[r * cols + c];
            }
        }
        t
    }

    fn run(
        base: &[f32],
        tuned: &[f32],
        (rows, cols): (usize, usize),
        columns: bool,
        h: usize,
        perms: Vec<Option<Vec<u32>>>,
        scaled: bool,
    ) -> (Fitted, f64) {
        let (b, t) = (bytes(base), bytes(tuned));
        let m = |bytes| Matrix {
            bytes,
            dtype: Dtype::F32,
            rows,
            cols,
        };
        let data = Data {
            base: m(&b),
            tuned: m(&t),
            columns,
        };
        let norms = norms(&data, "t").unwrap();
        // One scale per output row on either side.
        let scale_len = scaled.then_some(rows);
        let start = State::identity(data.n(), h, perms, scale_len);
        let stop = Stop {
            tol: 1e-10,
            reference: norms.diff,
            max_sweeps: 200,
        };
        (fit(&data, start, norms.diff, stop).unwrap(), norms.diff)
    }

    #[test]
    fn one_factor_recovers_an_exact_rotation_on_both_sides() {
        for columns in [false, true] {
            let (rows, cols, h) = (48, 32, 8);
            let (base, tuned, perms) = case(rows, cols, h, 1, columns, 0.0);
            let (f, diff) = run(&base, &tuned, (rows, cols), columns, h, perms, false);
            assert_eq!(f.history.len(), 1, "one exact step");
            assert!(
                f.residual < 1e-9 * diff,
                "columns={columns}: {} of {diff}",
                f.residual
            );
        }
    }

    #[test]
    fn butterfly_descent_is_monotone_and_reaches_an_exact_chain() {
        for columns in [false, true] {
            let (rows, cols, h) = (64, 32, 4);
            let (base, tuned, perms) = case(rows, cols, h, 2, columns, 0.0);
            let (f, diff) = run(&base, &tuned, (rows, cols), columns, h, perms, false);
            assert!(
                f.history.windows(2).all(|w| w[1] <= w[0]),
                "{:?}",
                f.history
            );
            let share = 1.0 - f.residual / diff;
            assert!(
                share > 0.999,
                "columns={columns}: captured {share} in {} sweeps",
                f.history.len()
            );
        }
    }

    #[test]
    fn scales_are_fitted_and_never_raise_the_residual() {
        for columns in [false, true] {
            let (rows, cols, h) = (32, 32, 4);
            let (base, mut tuned, perms) = case(rows, cols, h, 2, columns, 0.01);
            // Scale every output row.
            for r in 0..rows {
                for c in 0..cols {
                    tuned[r * cols + c] *= 1.0 + 0.1 * ((r % 5) as f32 - 2.0);
                }
            }
            let (plain, _) = run(
                &base,
                &tuned,
                (rows, cols),
                columns,
                h,
                perms.clone(),
                false,
            );
            let (scaled, diff) = run(&base, &tuned, (rows, cols), columns, h, perms, true);
            assert!(
                scaled.history.windows(2).all(|w| w[1] <= w[0]),
                "{:?}",
                scaled.history
            );
            assert!(
                scaled.residual < 0.5 * plain.residual,
                "{} vs {}",
                scaled.residual,
                plain.residual
            );
            assert!(scaled.residual < 0.05 * diff);
        }
    }
}
