//! Register-tiled forms of the row kernel for the block sizes that fill whole vector registers
//! (16 and 32 wide blocks): several rows' accumulators held in registers at once, so that each
//! load of a block row serves all of them and enough independent fused multiply-adds are in
//! flight to cover their latency (two rows at a time left the FMA units idle three quarters of
//! the time). A factor's permutation is folded into the addressing: inputs are read from, and
//! results stored to, their permuted places in the row itself, in place — a block reads exactly
//! the components it writes, so no gather or scatter copy is made.
//!
//! Every output is the same chain of fused multiply-adds, in the same order, as the portable
//! fixed-size kernel gives it (`acc = fma(x_j, Qᵀ[j], acc)` for j = 0…h−1 from 0), so results are
//! bit for bit the same.

use std::mem::MaybeUninit;

use super::kernel::{Factor, Isa};

/// Apply factor `f` to `rows` rows of `x` (`rows × n`, row-major) in place, with the factor's
/// permutation folded in (component j of block k is at `p[k·h + j]`), and each result times
/// `scale[r]` where a per-row scale is given (the same single rounding as scaling afterwards).
/// With `transposed`, each block's transpose `Qᵀ` applies instead of `Q` (the factor's `Fᵀ`,
/// with no copy of the blocks made). Returns false, touching nothing, where this form has no
/// tile for the factor: another block size, the portable form, or a permutation whose runs do
/// not cover whole 8-lane pieces.
pub(super) fn rows_in_place(
    isa: Isa,
    f: &Factor,
    x: &mut [f32],
    rows: usize,
    scale: Option<&[f32]>,
    transposed: bool,
) -> bool {
    if !has_tile(isa, f) {
        return false;
    }
    // The tiles address `x` through raw pointers: these two make every address inside it.
    assert!(
        x.len() >= rows * f.n(),
        "{rows} rows of {} in {}",
        f.n(),
        x.len()
    );
    assert!(
        isa as u8 >= Isa::best() as u8,
        "{isa:?} is not available on this CPU"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `isa` is a form the CPU runs, and every address the tiles form is below
    // `rows · n ≤ x.len()` (both asserted above; `has_tile` checked that the permutation's
    // pieces of 8 lie inside a row of length n).
    unsafe {
        match (isa, f.h) {
            (Isa::Avx512, 16) => return avx512::rows::<16, 1, 6>(f, x, rows, scale, transposed),
            (Isa::Avx512, 32) => return avx512::rows::<32, 2, 4>(f, x, rows, scale, transposed),
            (Isa::Avx2, 16) => return avx2::rows::<16, 2, 6>(f, x, rows, scale, transposed),
            (Isa::Avx2, 32) => return avx2::rows::<32, 4, 3>(f, x, rows, scale, transposed),
            _ => {}
        }
    }
    let _ = (isa, x, rows, scale, transposed);
    false
}

/// Whether `rows_in_place` runs factor `f` on form `isa`.
pub(super) fn has_tile(isa: Isa, f: &Factor) -> bool {
    cfg!(target_arch = "x86_64")
        && matches!(isa, Isa::Avx512 | Isa::Avx2)
        && matches!(f.h, 16 | 32)
        && pieces_contiguous(f)
}

/// Every aligned piece of 8 components of the factor's permutation maps to 8 consecutive places
/// (so a piece of results is one vector store), and every place is inside the vector.
fn pieces_contiguous(f: &Factor) -> bool {
    let Some(p) = &f.perm else { return true };
    let n = f.n();
    p.len() == n
        && p.chunks_exact(8)
            .all(|c| (c[0] as usize) + 8 <= n && c.windows(2).all(|w| w[1] == w[0].wrapping_add(1)))
}

/// Where component `k·h + j` of the factor's vector lies in a row.
#[inline(always)]
fn place(f: &Factor, i: usize) -> usize {
    match &f.perm {
        Some(p) => p[i] as usize,
        None => i,
    }
}

/// Block `k`'s operand rows (row j: what multiplies component j) and its components' places in a
/// row. A block applied transposed is its own operand, rows as stored: no copy; otherwise its
/// transpose is written to `qt`.
#[inline(always)]
fn operand<const H: usize>(
    f: &Factor,
    k: usize,
    transposed: bool,
    qt: &mut MaybeUninit<Transposed<H>>,
    at: &mut [usize; H],
) -> *const f32 {
    for (j, a) in at.iter_mut().enumerate() {
        *a = place(f, k * H + j);
    }
    if transposed {
        f.block(k).as_ptr()
    } else {
        Transposed::fill(qt, f.block(k)).0.as_ptr() as *const f32
    }
}

/// A block, transposed, aligned for vector loads: row j holds column j of `Q`. Left
/// uninitialised until a block is written to it: zeroing one (five per call where a call has
/// fewer rows than a tile) cost more than the product of one vector (verify's Lanczos steps).
#[repr(C, align(64))]
struct Transposed<const H: usize>([[f32; H]; H]);

impl<const H: usize> Transposed<H> {
    #[inline(always)]
    fn fill<'a>(dst: &'a mut MaybeUninit<Self>, q: &[f32]) -> &'a Self {
        assert_eq!(q.len(), H * H);
        let p = dst.as_mut_ptr() as *mut f32;
        for (i, row) in q.chunks_exact(H).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                // SAFETY: j·H + i < H·H, inside `dst`.
                unsafe { p.add(j * H + i).write(v) };
            }
        }
        // SAFETY: every one of the H·H elements was written above (q holds H·H values).
        unsafe { dst.assume_init_ref() }
    }
}

/// One compiled form of the tiled kernel: `$lanes` f32 per register; `V` registers per block row
/// (`H = V · $lanes`), `R` rows per tile.
macro_rules! tiled {
    ($module:ident, $features:literal, $reg:ty, $lanes:expr,
     $zero:ident, $set1:ident, $load:ident, $fma:ident, $mul:ident, $store:ident, $store8:ident) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{operand, place, $store8, Factor, MaybeUninit, Transposed};
            use std::arch::x86_64::*;

            /// # Safety
            /// The CPU has `$features`; `x` holds `rows` rows of `f.n()`; the permutation's
            /// pieces of 8 are contiguous and inside a row (`pieces_contiguous`).
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows<const H: usize, const V: usize, const R: usize>(
                f: &Factor,
                x: &mut [f32],
                rows: usize,
                scale: Option<&[f32]>,
                transposed: bool,
            ) -> bool {
                debug_assert_eq!(H, V * $lanes);
                let n = f.n();
                let mut qt = MaybeUninit::<Transposed<H>>::uninit();
                let mut at = [0usize; H];
                // Each vector of results goes whole to one place where the permutation keeps
                // a register's lanes together, else in pieces of 8.
                let whole = (0..n)
                    .step_by($lanes)
                    .all(|v| (0..$lanes).all(|l| place(f, v + l) == place(f, v) + l));
                let xp = x.as_mut_ptr();
                // Fewer rows than a tile (a Lanczos step's one vector): four blocks of each
                // row at once instead, so that their sums do not wait on each other.
                let mut k = 0;
                if rows < R {
                    let mut qts = [const { MaybeUninit::<Transposed<H>>::uninit() }; 4];
                    let mut ats = [[0usize; H]; 4];
                    while k + 4 <= f.d {
                        let mut qs = [std::ptr::null::<f32>(); 4];
                        for (b, (qt, at)) in qts.iter_mut().zip(ats.iter_mut()).enumerate() {
                            qs[b] = operand(f, k + b, transposed, qt, at);
                        }
                        for r in 0..rows {
                            let s = scale.map(|s| s[r]);
                            blocks4::<H, V>(qs, &ats, xp.add(r * n), s, whole);
                        }
                        k += 4;
                    }
                }
                for k in k..f.d {
                    let q = operand(f, k, transposed, &mut qt, &mut at);
                    let mut r = 0;
                    while r + R <= rows {
                        tile::<H, V, R>(
                            q,
                            &at,
                            xp.add(r * n),
                            n,
                            scale.map(|s| &s[r..r + R]),
                            whole,
                        );
                        r += R;
                    }
                    while r < rows {
                        tile::<H, V, 1>(
                            q,
                            &at,
                            xp.add(r * n),
                            n,
                            scale.map(|s| &s[r..r + 1]),
                            whole,
                        );
                        r += 1;
                    }
                }
                true
            }

            /// Four blocks of one row (`q[b]`, `at[b]`), in place: four independent sets of
            /// sums, each the same chain of fused multiply-adds as `tile` gives it.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn blocks4<const H: usize, const V: usize>(
                q: [*const f32; 4],
                at: &[[usize; H]; 4],
                row: *mut f32,
                scale: Option<f32>,
                whole: bool,
            ) {
                let mut acc = [[$zero(); V]; 4];
                for j in 0..H {
                    for b in 0..4 {
                        let x = $set1(*row.add(at[b][j]));
                        let q = q[b].add(j * H);
                        for v in 0..V {
                            acc[b][v] = $fma(x, $load(q.add(v * $lanes)), acc[b][v]);
                        }
                    }
                }
                for b in 0..4 {
                    put(acc[b], row, &at[b], scale, whole);
                }
            }

            /// One row's results of one block to their places in `row`, scaled first where a
            /// scale is given.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn put<const H: usize, const V: usize>(
                acc: [$reg; V],
                row: *mut f32,
                at: &[usize; H],
                scale: Option<f32>,
                whole: bool,
            ) {
                for (v, &y) in acc.iter().enumerate() {
                    let y = match scale {
                        Some(s) => $mul(y, $set1(s)),
                        None => y,
                    };
                    if whole {
                        $store(row.add(at[v * $lanes]), y);
                    } else {
                        $store8(row, at, v * $lanes, y);
                    }
                }
            }

            /// `R` rows from `x` (row stride `n`): one block's results for each, in place.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn tile<const H: usize, const V: usize, const R: usize>(
                q: *const f32,
                at: &[usize; H],
                x: *mut f32,
                n: usize,
                scale: Option<&[f32]>,
                whole: bool,
            ) {
                let mut acc = [[$zero(); V]; R];
                for j in 0..H {
                    let mut b = [$zero(); R];
                    for (rr, b) in b.iter_mut().enumerate() {
                        *b = $set1(*x.add(rr * n + at[j]));
                    }
                    let q = q.add(j * H);
                    for v in 0..V {
                        let qv = $load(q.add(v * $lanes));
                        for rr in 0..R {
                            acc[rr][v] = $fma(b[rr], qv, acc[rr][v]);
                        }
                    }
                }
                for (rr, acc) in acc.into_iter().enumerate() {
                    put(acc, x.add(rr * n), at, scale.map(|s| s[rr]), whole);
                }
            }
        }
    };
}

/// A register of 16 results to two places of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,fma")]
#[inline]
unsafe fn halves_avx512(row: *mut f32, at: &[usize], i: usize, y: std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let lo = _mm512_castps512_ps256(y);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(y)));
    _mm256_storeu_ps(row.add(at[i]), lo);
    _mm256_storeu_ps(row.add(at[i + 8]), hi);
}

/// A register of 8 results is one piece: every store is whole.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn whole_avx2(row: *mut f32, at: &[usize], i: usize, y: std::arch::x86_64::__m256) {
    std::arch::x86_64::_mm256_storeu_ps(row.add(at[i]), y)
}

tiled!(
    avx512,
    "avx512f,avx512vl,fma",
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_mul_ps,
    _mm512_storeu_ps,
    halves_avx512
);

tiled!(
    avx2,
    "avx2,fma",
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    _mm256_mul_ps,
    _mm256_storeu_ps,
    whole_avx2
);
