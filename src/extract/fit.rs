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
use crate::math::kernel::{self, Chain, Factor, ScaleOn, Scratch};
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
    /// one accumulator, caps the runs so their accumulators stay within `TASK_MEMORY`. `f` gets
    /// the thread's reusable buffers with the chunk's samples in `x` and `y`: buffers made
    /// afresh per run cost more in page faults than the arithmetic.
    fn pass<A: Send>(
        &self,
        acc_bytes: usize,
        init: impl Fn() -> A + Sync + Send,
        f: impl Fn(&mut A, &mut Work, usize) -> Result<()> + Sync + Send,
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
                let mut acc = init();
                WORK.with(|w| -> Result<()> {
                    let mut w = w.borrow_mut();
                    for k in t * per..((t + 1) * per).min(chunks) {
                        crate::output::check_interrupted()?;
                        let s0 = k * c;
                        let w = &mut *w;
                        self.pair(s0, c.min(s - s0), &mut w.x, &mut w.y);
                        f(&mut acc, w, s0)?;
                    }
                    Ok(())
                })?;
                Ok(acc)
            })
            .collect::<Result<_>>()?;
        Ok(parts.into_iter().reduce(join).unwrap_or_else(init))
    }
}

/// A worker thread's buffers, kept between chunks and passes.
#[derive(Default)]
pub struct Work {
    x: Vec<f32>,
    y: Vec<f32>,
    a: Vec<f32>,
    t: Vec<f32>,
    z: Vec<f32>,
    gathered: Vec<f32>,
    prod: Vec<f32>,
    scratch: Scratch,
}

thread_local! {
    static WORK: std::cell::RefCell<Work> = std::cell::RefCell::default();
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

/// ‖T − B‖², refusing non-finite values (they would poison every cross product); with
/// `first`, also the cross products of factor 0's step from `first` (a cold start's first step
/// then costs no pass of its own).
pub fn norms(data: &Data, name: &str, first: Option<&State>) -> Result<(Norms, Option<Vec<f64>>)> {
    let want = Want {
        norms: Some(name),
        residual: false,
        step: first.map(|_| 0),
    };
    let none = State {
        factors: Vec::new(),
        identity: Vec::new(),
        scale: None,
    };
    let state = first.unwrap_or(&none);
    let sums = sweep_pass(data, state, want)?;
    let k = first.map(|_| sums.k);
    Ok((
        Norms {
            diff: sums.diff,
            tuned: sums.tuned,
        },
        k,
    ))
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
/// `start_residual` being its residual and `first`, when given, the cross products of its factor
/// 0 step (from `norms`). Every accepted sweep lowers the residual: a sweep that would raise it
/// (rounding near convergence) is undone and ends the descent, so the history is non-increasing
/// by construction.
///
/// Where the scale is per sample (input side) or absent, the residual pass of a sweep also
/// gathers the next sweep's factor 0 cross products (the scale it re-fits is known per sample
/// as the pass reaches it), so a sweep of m factors reads the data m times.
pub fn fit(
    data: &Data,
    start: State,
    start_residual: f64,
    stop: Stop,
    first: Option<Vec<f64>>,
) -> Result<Fitted> {
    let mut state = start;
    let mut residual = start_residual;
    let mut history = Vec::new();
    let m = state.factors.len();
    let exact = m == 1 && state.scale.is_none();
    let component = state.scale.is_some() && data.scale_on() == ScaleOn::Component;
    let fuse = !exact && !component;
    let mut pending = first;
    for _ in 0..stop.max_sweeps.max(1) {
        if residual == 0.0 {
            break;
        }
        let before = state.clone();
        // One factor with a per-sample scale: the residual pass gathered the next rotation
        // step's cross products K, and that step lowers the residual by exactly
        // 2 Σ tr((R' − R)ᵀ K). Below the tolerance the scale, fitted to R, is as good as
        // settled (its own gain is of second order in R' − R): stop without another pass.
        let predicted = (m == 1 && !history.is_empty())
            .then_some(pending.as_ref())
            .flatten()
            .map(|sums| {
                let (blocks, best) = solve(&state.factors[0], sums);
                let now = value(&state.factors[0], sums);
                (blocks, 2.0 * (best - now))
            });
        if let Some((_, gain)) = &predicted {
            if *gain <= stop.tol * stop.reference {
                break;
            }
        }
        let mut predicted = predicted.map(|(blocks, _)| blocks);
        for k in 0..m {
            let blocks = match predicted.take() {
                Some(blocks) => blocks,
                None => {
                    let sums = match pending.take().filter(|_| k == 0) {
                        Some(sum) => sum,
                        None => sweep_pass(data, &state, Want::step(k))?.k,
                    };
                    solve(&state.factors[k], &sums).0
                }
            };
            state.factors[k].blocks = blocks;
            state.identity[k] = false;
        }
        let sums = sweep_pass(
            data,
            &state,
            Want {
                norms: None,
                residual: true,
                step: fuse.then_some(0),
            },
        )?;
        let r = sums.residual;
        if let Some(scale) = sums.scale {
            state.scale = Some(scale);
        }
        // NaN (a poisoned sum) counts as a rise.
        if r.is_nan() || r > residual {
            state = before;
            break;
        }
        pending = fuse.then_some(sums.k);
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

/// The best blocks of a factor for its cross products (one Procrustes rotation per block) and
/// their value `Σ_j tr(Q_jᵀ K_j)`.
fn solve(f: &Factor, sums: &[f64]) -> (Vec<f32>, f64) {
    let h = f.h;
    let blocks: Vec<(Vec<f32>, f64)> = sums
        .par_chunks_exact(h * h)
        .map(|kj| {
            let (r, v) = procrustes::rotation(h, kj);
            (r.into_iter().map(|v| v as f32).collect(), v)
        })
        .collect();
    let total = blocks.iter().map(|b| b.1).sum();
    (blocks.into_iter().flat_map(|b| b.0).collect(), total)
}

/// `Σ_j tr(Q_jᵀ K_j)` of a factor's blocks against cross products.
fn value(f: &Factor, sums: &[f64]) -> f64 {
    f.blocks.iter().zip(sums).map(|(q, k)| *q as f64 * k).sum()
}

/// What one pass over a pair computes.
#[derive(Clone, Copy)]
struct Want<'a> {
    /// ‖T − B‖² and ‖T‖², refusing non-finite values of the tensor named.
    norms: Option<&'a str>,
    /// The residual of the state, with its scale re-fitted in closed form first.
    residual: bool,
    /// The cross products of this factor's step (with the re-fitted per-sample scale when the
    /// residual is computed too).
    step: Option<usize>,
}

impl Want<'_> {
    fn step(k: usize) -> Self {
        Want {
            norms: None,
            residual: false,
            step: Some(k),
        }
    }
}

/// A pass's sums.
struct Sums {
    diff: f64,
    tuned: f64,
    residual: f64,
    /// The re-fitted scale (when the residual was computed for a scaled state).
    scale: Option<Vec<f32>>,
    /// The step's cross products, `blocks × h × h`.
    k: Vec<f64>,
}

/// One pass over the pair: any of the norms, the residual (re-fitting the scale) and one
/// factor's cross products.
///
/// A factor step: with `M = C · F_k · A` (A the factors before k, C those after),
/// `‖y − σ M x‖ = ‖Cᵀ y − F_k (σ A x)‖` for a per-sample scale σ, so the targets are `Cᵀ y`
/// and the inputs `σ A x`, and each block's best rotation is a Procrustes solution of the cross
/// product `K_j = Σ t_j a_jᵀ`. A per-component scale S does not commute with C; there the step
/// minimises a majorizer of the residual at the current chain (`‖S z‖² ≤ ‖S z₀‖² + 2⟨S² z₀,
/// z − z₀⟩ + λ‖z − z₀‖²`, λ = max s²), whose optimum is again a Procrustes problem with targets
/// `Cᵀ (S y + (λ − S²) z₀)` and never raises the residual.
fn sweep_pass(data: &Data, state: &State, want: Want) -> Result<Sums> {
    let n = data.n();
    let m = state.factors.len();
    let whole = state.chain(n, 0..m);
    let scaled = state.scale.is_some();
    let component = scaled && data.scale_on() == ScaleOn::Component;
    let (before, after, h, d, runs) = match want.step {
        Some(k) => {
            let f = &state.factors[k];
            (
                state.chain(n, 0..k),
                state.chain(n, k + 1..m).map(|c| c.transposed()),
                f.h,
                f.d,
                // The permutation as runs of consecutive indices, copied a run at a time (the
                // kernel's own gather).
                f.perm.as_deref().map(|p| {
                    let mut r = Vec::new();
                    kernel::runs(p, &mut r);
                    r
                }),
            )
        }
        None => (None, None, 0, 0, None),
    };
    let lambda = state
        .scale
        .as_ref()
        .map(|s| s.iter().fold(0f32, |a, v| a.max(v * v)))
        .unwrap_or(1.0);
    let cn = if component && want.residual { n } else { 0 };
    struct Acc {
        diff: f64,
        tuned: f64,
        residual: f64,
        sigma: Vec<(usize, Vec<f32>)>,
        yy: Vec<f64>,
        yz: Vec<f64>,
        zz: Vec<f64>,
        k: Vec<f64>,
    }
    let init = || Acc {
        diff: 0.0,
        tuned: 0.0,
        residual: 0.0,
        sigma: Vec::new(),
        yy: vec![0.0; cn],
        yz: vec![0.0; cn],
        zz: vec![0.0; cn],
        k: vec![0.0; d * h * h],
    };
    let acc = data.pass(
        (d * h * h + 3 * cn) * 8 + 64,
        init,
        |acc, w, s0| {
            let Work {
                x,
                y,
                a,
                t,
                z,
                gathered,
                prod,
                scratch,
            } = w;
            let rows = x.len() / n;
            if let Some(name) = want.norms {
                check_finite(x, y, n, s0, name)?;
                let (dd, yy, _) = sums3(y, x, true);
                acc.diff += dd;
                acc.tuned += yy;
            }
            let mut sigma: Option<Vec<f32>> = None;
            if want.residual || (component && want.step.is_some()) {
                z.clear();
                z.extend_from_slice(x);
                if let Some(c) = &whole {
                    c.apply_rows(z, s0, rows, scratch);
                }
            }
            if want.residual {
                if component {
                    for (yr, zr) in y.chunks_exact(n).zip(z.chunks_exact(n)) {
                        for c in 0..n {
                            let (yv, zv) = (yr[c] as f64, zr[c] as f64);
                            acc.yy[c] += yv * yv;
                            acc.yz[c] += yv * zv;
                            acc.zz[c] += zv * zv;
                        }
                    }
                } else if scaled {
                    let mut sig = Vec::with_capacity(rows);
                    for (yr, zr) in y.chunks_exact(n).zip(z.chunks_exact(n)) {
                        let (yy, yz, zz) = sums3(yr, zr, false);
                        let s = if zz > 0.0 { (yz / zz) as f32 } else { 1.0 };
                        sig.push(s);
                        // Σ (y − s z)², from sums of exact f32 products in f64.
                        let s = s as f64;
                        acc.residual += (yy - 2.0 * s * yz + s * s * zz).max(0.0);
                    }
                    acc.sigma.push((s0, sig.clone()));
                    sigma = Some(sig);
                } else {
                    acc.residual += sums3(y, z, true).0;
                }
            }
            if want.step.is_none() {
                return Ok(());
            }
            a.clear();
            match (&state.scale, component) {
                // The scale this pass re-fitted, else the state's, applied while copying.
                (Some(s), false) => {
                    let sig = sigma.as_deref().unwrap_or(&s[s0..s0 + rows]);
                    for (xr, f) in x.chunks_exact(n).zip(sig) {
                        a.extend(xr.iter().map(|v| v * f));
                    }
                }
                _ => a.extend_from_slice(x),
            }
            if let Some(c) = &before {
                // σ A x = A (σ x): a per-sample scale commutes with the chain.
                c.apply_rows(a, s0, rows, scratch);
            }
            t.clear();
            t.extend_from_slice(y);
            match (&state.scale, component) {
                (Some(_), false) => {}
                (Some(s), true) => {
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
            if let Some(r) = &runs {
                for v in [&mut *a, &mut *t] {
                    gathered.resize(v.len(), 0.0);
                    kernel::gather(v, gathered, r, rows, n);
                    std::mem::swap(v, gathered);
                }
            }
            prod.resize(h * h, 0.0);
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
                for (o, v) in acc.k[j * h * h..(j + 1) * h * h]
                    .iter_mut()
                    .zip(prod.iter())
                {
                    *o += *v as f64;
                }
            }
            Ok(())
        },
        |mut a, b| {
            a.diff += b.diff;
            a.tuned += b.tuned;
            a.residual += b.residual;
            a.sigma.extend(b.sigma);
            for (v, w) in [
                (&mut a.yy, &b.yy),
                (&mut a.yz, &b.yz),
                (&mut a.zz, &b.zz),
                (&mut a.k, &b.k),
            ] {
                v.iter_mut().zip(w).for_each(|(p, q)| *p += q);
            }
            a
        },
    )?;
    let mut out = Sums {
        diff: acc.diff,
        tuned: acc.tuned,
        residual: acc.residual,
        scale: None,
        k: acc.k,
    };
    if want.residual && component {
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
        out.residual = residual;
        out.scale = Some(scale);
    } else if want.residual && scaled {
        let mut sigma = acc.sigma;
        sigma.sort_by_key(|(s0, _)| *s0);
        out.scale = Some(sigma.into_iter().flat_map(|(_, v)| v).collect());
    }
    Ok(out)
}

/// `(Σ (y − z)², Σ y², Σ y z)` when `diff`, else `(Σ y², Σ y z, Σ z²)`: products of f32 values
/// (exact in f64) summed in f64 over four lanes, compiled for AVX2 where the CPU has it (these
/// sums are a large part of every pass).
fn sums3(y: &[f32], z: &[f32], diff: bool) -> (f64, f64, f64) {
    #[inline(always)]
    fn run(y: &[f32], z: &[f32], diff: bool) -> (f64, f64, f64) {
        let (mut a, mut b, mut c) = ([0f64; 4], [0f64; 4], [0f64; 4]);
        let (yc, zc) = (y.chunks_exact(4), z.chunks_exact(4));
        let (yr, zr) = (yc.remainder(), zc.remainder());
        for (yv, zv) in yc.zip(zc) {
            for l in 0..4 {
                let (p, q) = (yv[l] as f64, zv[l] as f64);
                if diff {
                    a[l] += (p - q) * (p - q);
                    b[l] += p * p;
                    c[l] += p * q;
                } else {
                    a[l] += p * p;
                    b[l] += p * q;
                    c[l] += q * q;
                }
            }
        }
        let mut out = (
            a.iter().sum::<f64>(),
            b.iter().sum::<f64>(),
            c.iter().sum::<f64>(),
        );
        for (p, q) in yr.iter().zip(zr) {
            let (p, q) = (*p as f64, *q as f64);
            if diff {
                out.0 += (p - q) * (p - q);
                out.1 += p * p;
                out.2 += p * q;
            } else {
                out.0 += p * p;
                out.1 += p * q;
                out.2 += q * q;
            }
        }
        out
    }
    let mut out = (0.0, 0.0, 0.0);
    crate::checkpoint::dtype::simd(|| out = run(y, z, diff));
    out
}

fn check_finite(x: &[f32], y: &[f32], n: usize, s0: usize, name: &str) -> Result<()> {
    let Some(i) = x.iter().chain(y).position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let (which, i, v) = if i < x.len() {
        ("base", i, x[i])
    } else {
        ("tuned", i - x.len(), y[i - x.len()])
    };
    Err(Error::bare(
        Class::NonFinite,
        format!(
            "{name}: the {which} tensor holds {v} (sample {}), nothing to fit",
            s0 + i / n
        ),
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
        let (norms, _) = norms(&data, "t", None).unwrap();
        // One scale per output row on either side.
        let scale_len = scaled.then_some(rows);
        let start = State::identity(data.n(), h, perms, scale_len);
        let stop = Stop {
            tol: 1e-10,
            reference: norms.diff,
            max_sweeps: 200,
        };
        (
            fit(&data, start, norms.diff, stop, None).unwrap(),
            norms.diff,
        )
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
