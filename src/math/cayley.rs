//! Cayley maps between skew-symmetric generators and rotations, computed in f64.
//!
//! Two sign conventions occur in the wild: `C−(S) = (I − S)(I + S)⁻¹` (PEFT) and
//! `C+(S) = (I + S)(I − S)⁻¹ = C−(S)ᵀ` (LyCORIS, kohya). Both are exactly orthogonal with
//! determinant +1 for skew S, and `I ± S` is always invertible for skew S.

use nalgebra::DMatrix;

fn mat(h: usize, a: &[f64]) -> DMatrix<f64> {
    DMatrix::from_row_slice(h, h, a)
}

fn rows(m: &DMatrix<f64>) -> Vec<f64> {
    m.transpose().as_slice().to_vec()
}

/// `½(A − Aᵀ)`, the skew part PEFT takes of its raw blocks.
pub fn skew_half(h: usize, a: &[f64]) -> Vec<f64> {
    let mut s = vec![0.0; h * h];
    for i in 0..h {
        for j in 0..h {
            s[i * h + j] = 0.5 * (a[i * h + j] - a[j * h + i]);
        }
    }
    s
}

/// `U − Uᵀ` where `U` holds `v` in its strict upper triangle, row by row (the order of
/// `torch.triu_indices(h, h, 1)`), as PEFT OFT ≥ 0.16 stores its blocks.
pub fn skew_from_triu(h: usize, v: &[f64]) -> Vec<f64> {
    let mut s = vec![0.0; h * h];
    let mut k = 0;
    for i in 0..h {
        for j in i + 1..h {
            s[i * h + j] = v[k];
            s[j * h + i] = -v[k];
            k += 1;
        }
    }
    s
}

/// Block size h with `h(h−1)/2 = len`, if there is one.
pub fn triu_size(len: usize) -> Option<usize> {
    let h = ((1.0 + (1.0 + 8.0 * len as f64).sqrt()) / 2.0).round() as usize;
    (h >= 2 && h * (h - 1) / 2 == len).then_some(h)
}

/// Scale `m` down to Frobenius norm `max` when it is larger (the COFT constraint).
pub fn clamp_frobenius(m: &mut [f64], max: f64) {
    let norm = m.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > max {
        m.iter_mut().for_each(|x| *x *= max / norm);
    }
}

fn matmul(h: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut c = vec![0.0; h * h];
    for i in 0..h {
        for k in 0..h {
            let aik = a[i * h + k];
            for j in 0..h {
                c[i * h + j] += aik * b[k * h + j];
            }
        }
    }
    c
}

/// PEFT OFT's truncated Neumann series for `C+(S) = (I + S)(I − S)⁻¹ = I + 2S + 2S² + …` with
/// `terms` terms, exactly as the writing PEFT version summed it:
/// * `legacy` (PEFT 0.16–0.17): `I + 2S + … + 2S^{T−1}`;
/// * otherwise (PEFT ≥ 0.18): `I + 2S + … + 2S^{T−2} + S^{T−1}` for T ≥ 4, `I` for T = 1,
///   `I + 2S` for T = 2, and T = 3 summed like T = 4 (PEFT's loop bound).
pub fn neumann_plus(h: usize, s: &[f64], terms: usize, legacy: bool) -> Vec<f64> {
    let mut r = vec![0.0; h * h];
    for i in 0..h {
        r[i * h + i] = 1.0;
    }
    let add = |r: &mut Vec<f64>, m: &[f64], w: f64| {
        r.iter_mut().zip(m).for_each(|(x, y)| *x += w * y);
    };
    if legacy {
        let mut p = s.to_vec();
        for k in 1..terms {
            if k > 1 {
                p = matmul(h, &p, s);
            }
            add(&mut r, &p, 2.0);
        }
        return r;
    }
    if terms > 1 {
        add(&mut r, s, 2.0);
    }
    if terms > 2 {
        let mut p = matmul(h, s, s);
        add(&mut r, &p, 2.0);
        for _ in 3..terms.saturating_sub(1) {
            p = matmul(h, &p, s);
            add(&mut r, &p, 2.0);
        }
        p = matmul(h, &p, s);
        add(&mut r, &p, 1.0);
    }
    r
}

/// `(I − S)(I + S)⁻¹`, row-major in and out. Exact arithmetic never fails for skew S, but f64
/// can: with huge entries (from a hostile file) elimination cancels to a zero pivot or overflows.
/// Then every entry is NaN, which the finite-value checks downstream reject; importers that want
/// to say why use `try_cayley_minus`.
pub fn cayley_minus(h: usize, s: &[f64]) -> Vec<f64> {
    try_cayley_minus(h, s).unwrap_or_else(|| vec![f64::NAN; h * h])
}

/// `(I − S)(I + S)⁻¹`, or None when it cannot be computed in f64 (a zero pivot or a non-finite
/// entry).
pub fn try_cayley_minus(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    cayley_minus_elimination(h, s).or_else(|| cayley_minus_lu(h, s))
}

/// `(I + S)⁻¹(I − S)` (equal to `(I − S)(I + S)⁻¹`: the factors commute) by Gaussian elimination
/// without pivoting, in row-major loops the compiler vectorises. A merge solves one of these per
/// block, thousands per model, and this is several times faster than a general pivoted LU.
/// Pivoting is not needed: `I + S` has the identity as its symmetric part, so every pivot has
/// magnitude at least 1 in exact arithmetic. Returns None (the caller then uses the pivoted LU)
/// when a pivot is not comfortably away from 0 or a value is not finite, which only hostile,
/// enormous entries cause.
fn cayley_minus_elimination(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    use crate::math::kernel::Isa;
    // SAFETY: `Isa::best` names a form only where the CPU has its features. The loops have no
    // fused multiply-adds (Rust does not contract `x -= f * y`), so every form gives the same
    // bits.
    #[cfg(target_arch = "x86_64")]
    match Isa::best() {
        Isa::Avx512 => return unsafe { elimination_avx512(h, s) },
        Isa::Avx2 => return unsafe { elimination_avx2(h, s) },
        Isa::Portable => {}
    }
    elimination(h, s)
}

/// The same loops compiled for AVX2 (4 f64 lanes instead of SSE2's 2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn elimination_avx2(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    elimination(h, s)
}

/// And for AVX-512 (8 lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn elimination_avx512(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    elimination(h, s)
}

#[inline(always)]
fn elimination(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    match h {
        8 => elimination_rows::<8>(s),
        16 => elimination_rows::<16>(s),
        32 => elimination_rows::<32>(s),
        _ => elimination_any(h, s),
    }
}

/// `elimination_any` for a block size known when compiling, row by row: each row takes the
/// updates of the rows above it in order (first on I + S, recording the multipliers, then the
/// same multipliers on I − S), then gives its pivot; back substitution likewise, a row at a
/// time. A row is a fixed array the compiler keeps in vector registers while the rows above it
/// stream past (updating I + S a row at a time in place went through memory twice per
/// multiply-subtract: a 32×32 block took ~40k cycles). Every element gets the same operations in
/// the same order as `elimination_any` gives it, so the bits are the same; the only extra work,
/// whole-row updates of `I + S` where that loop starts at column k, lands on entries below the
/// diagonal that nothing reads again.
#[inline(always)]
fn elimination_rows<const H: usize>(s: &[f64]) -> Option<Vec<f64>> {
    let mut a = vec![[0f64; H]; H];
    let mut b = vec![[0f64; H]; H];
    for (i, (ar, br)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
        for j in 0..H {
            ar[j] = s[i * H + j];
            br[j] = -s[i * H + j];
        }
        ar[i] += 1.0;
        br[i] += 1.0;
    }
    let mut inv = [0f64; H];
    let mut f = [0f64; H];
    for r in 0..H {
        let mut ar = a[r];
        for k in 0..r {
            f[k] = ar[k] * inv[k];
            if f[k] == 0.0 {
                continue;
            }
            sub_multiple(&mut ar, f[k], &a[k]);
        }
        a[r] = ar;
        let p = ar[r];
        // NaN fails this too.
        if p.is_nan() || p.abs() < 0.5 {
            return None;
        }
        inv[r] = 1.0 / p;
        let mut br = b[r];
        for k in 0..r {
            if f[k] == 0.0 {
                continue;
            }
            sub_multiple(&mut br, f[k], &b[k]);
        }
        b[r] = br;
    }
    for k in (0..H).rev() {
        let mut bk = b[k];
        for m in k + 1..H {
            let fm = a[k][m];
            if fm == 0.0 {
                continue;
            }
            sub_multiple(&mut bk, fm, &b[m]);
        }
        let inv = 1.0 / a[k][k];
        bk.iter_mut().for_each(|x| *x *= inv);
        b[k] = bk;
    }
    let out: Vec<f64> = b.into_iter().flatten().collect();
    out.iter().all(|x| x.is_finite()).then_some(out)
}

/// `row ← row − f·other`, element by element (a multiply, then a subtract: never fused).
#[inline(always)]
fn sub_multiple<const H: usize>(row: &mut [f64; H], f: f64, other: &[f64; H]) {
    for j in 0..H {
        row[j] -= f * other[j];
    }
}

/// Gaussian elimination on I + S with I − S as the right-hand side, for any block size.
#[inline(always)]
fn elimination_any(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    let mut a = vec![0.0; h * h];
    let mut b = vec![0.0; h * h];
    for i in 0..h * h {
        a[i] = s[i];
        b[i] = -s[i];
    }
    for i in 0..h {
        a[i * h + i] += 1.0;
        b[i * h + i] += 1.0;
    }
    for k in 0..h {
        let p = a[k * h + k];
        // NaN fails this too.
        if p.is_nan() || p.abs() < 0.5 {
            return None;
        }
        let inv = 1.0 / p;
        let (top, rest) = a.split_at_mut((k + 1) * h);
        let (btop, brest) = b.split_at_mut((k + 1) * h);
        let arow = &top[k * h..];
        let brow = &btop[k * h..];
        for (ar, br) in rest.chunks_exact_mut(h).zip(brest.chunks_exact_mut(h)) {
            let f = ar[k] * inv;
            if f == 0.0 {
                continue;
            }
            for (x, y) in ar[k..h].iter_mut().zip(&arow[k..h]) {
                *x -= f * y;
            }
            for (x, y) in br.iter_mut().zip(&brow[..h]) {
                *x -= f * y;
            }
        }
    }
    for k in (0..h).rev() {
        let (top, rest) = b.split_at_mut((k + 1) * h);
        let row = &mut top[k * h..];
        for (m, later) in rest.chunks_exact(h).enumerate() {
            let f = a[k * h + k + 1 + m];
            if f != 0.0 {
                for (x, y) in row[..h].iter_mut().zip(later) {
                    *x -= f * y;
                }
            }
        }
        let inv = 1.0 / a[k * h + k];
        row.iter_mut().for_each(|x| *x *= inv);
    }
    b.iter().all(|x| x.is_finite()).then_some(b)
}

/// Blocks `try_cayley_minus_many` solves side by side.
pub const LANES: usize = 8;

/// `try_cayley_minus` of up to `LANES` blocks, bit for bit: on AVX-512 the elimination's steps
/// run side by side, one block per f64 lane, so every step is one vector operation however
/// short its row (one block at a time spends most of its time on rows of a few elements). A
/// lane whose pivot is not comfortably away from 0, or whose result is not finite, is solved
/// again alone, as `try_cayley_minus` does it.
pub fn try_cayley_minus_many(h: usize, blocks: &[&[f64]]) -> Vec<Option<Vec<f64>>> {
    assert!(blocks.len() <= LANES && blocks.iter().all(|b| b.len() == h * h));
    #[cfg(target_arch = "x86_64")]
    if crate::math::kernel::Isa::best() == crate::math::kernel::Isa::Avx512 && blocks.len() > 1 {
        // SAFETY: the CPU has AVX-512F (`Isa::best` checked it).
        let (q, ok) = unsafe { lanes_avx512(h, blocks) };
        return (0..blocks.len())
            .map(|l| {
                let out: Vec<f64> = q.iter().map(|v| v[l]).collect();
                if ok[l] && out.iter().all(|x| x.is_finite()) {
                    Some(out)
                } else {
                    try_cayley_minus(h, blocks[l])
                }
            })
            .collect();
    }
    blocks.iter().map(|b| try_cayley_minus(h, b)).collect()
}

/// `elimination` on eight blocks at once (unused lanes: zero generators). Each step is the
/// scalar step's IEEE operation on every lane; a row update skipped for a zero multiplier keeps
/// the old value by a masked operation. Returns the results and which lanes' pivots were sound.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512(h: usize, blocks: &[&[f64]]) -> (Vec<[f64; LANES]>, [bool; LANES]) {
    use std::arch::x86_64::*;
    let mut a = vec![_mm512_setzero_pd(); h * h];
    let mut b = vec![_mm512_setzero_pd(); h * h];
    let mut lane = [0f64; LANES];
    // `-s` as the scalar code has it: a sign flip (0 − s would turn −0 into +0).
    let sign = _mm512_set1_epi64(i64::MIN);
    for i in 0..h * h {
        for (l, s) in blocks.iter().enumerate() {
            lane[l] = s[i];
        }
        let v = _mm512_loadu_pd(lane.as_ptr());
        a[i] = v;
        b[i] = _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(v), sign));
    }
    let one = _mm512_set1_pd(1.0);
    for i in 0..h {
        a[i * h + i] = _mm512_add_pd(a[i * h + i], one);
        b[i * h + i] = _mm512_add_pd(b[i * h + i], one);
    }
    let half = _mm512_set1_pd(0.5);
    let mut bad: __mmask8 = 0;
    let mut inv = vec![_mm512_setzero_pd(); h];
    // Row by row (each row takes the updates of the rows above it, in order, then gives its
    // pivot): every element gets the scalar elimination's updates in the scalar order, while
    // only the row being reduced is written (eight blocks' matrices do not fit the L1 cache).
    for r in 0..h {
        for k in 0..r {
            let f = _mm512_mul_pd(a[r * h + k], inv[k]);
            let nz = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(f, _mm512_setzero_pd());
            if nz == 0 {
                continue;
            }
            for j in k..h {
                let x = a[r * h + j];
                a[r * h + j] = _mm512_mask_sub_pd(x, nz, x, _mm512_mul_pd(f, a[k * h + j]));
            }
            for j in 0..h {
                let x = b[r * h + j];
                b[r * h + j] = _mm512_mask_sub_pd(x, nz, x, _mm512_mul_pd(f, b[k * h + j]));
            }
        }
        let p = a[r * h + r];
        bad |= _mm512_cmp_pd_mask::<_CMP_UNORD_Q>(p, p)
            | _mm512_cmp_pd_mask::<_CMP_LT_OQ>(_mm512_abs_pd(p), half);
        inv[r] = _mm512_div_pd(one, p);
    }
    for k in (0..h).rev() {
        for m in k + 1..h {
            let f = a[k * h + m];
            let nz = _mm512_cmp_pd_mask::<_CMP_NEQ_UQ>(f, _mm512_setzero_pd());
            if nz == 0 {
                continue;
            }
            for j in 0..h {
                let x = b[k * h + j];
                b[k * h + j] = _mm512_mask_sub_pd(x, nz, x, _mm512_mul_pd(f, b[m * h + j]));
            }
        }
        let inv = _mm512_div_pd(one, a[k * h + k]);
        for j in 0..h {
            b[k * h + j] = _mm512_mul_pd(b[k * h + j], inv);
        }
    }
    let mut ok = [false; LANES];
    for (l, o) in ok.iter_mut().enumerate().take(blocks.len()) {
        *o = bad & (1 << l) == 0;
    }
    let out = b
        .iter()
        .map(|v| {
            let mut x = [0f64; LANES];
            _mm512_storeu_pd(x.as_mut_ptr(), *v);
            x
        })
        .collect();
    (out, ok)
}

fn cayley_minus_lu(h: usize, s: &[f64]) -> Option<Vec<f64>> {
    let s = mat(h, s);
    let id = DMatrix::<f64>::identity(h, h);
    // (I − S) and (I + S)⁻¹ commute, so this is a single solve.
    let q = (&id + &s).lu().solve(&(&id - &s))?;
    let q = rows(&q);
    q.iter().all(|x| x.is_finite()).then_some(q)
}

/// `(I + S)(I − S)⁻¹ = C−(S)ᵀ`.
pub fn cayley_plus(h: usize, s: &[f64]) -> Vec<f64> {
    let neg: Vec<f64> = s.iter().map(|x| -x).collect();
    cayley_minus(h, &neg)
}

/// Generator of `R = C−(S)`: `S = (I − R)(I + R)⁻¹`. None when `R` has an eigenvalue −1.
pub fn inverse_cayley_minus(h: usize, r: &[f64]) -> Option<Vec<f64>> {
    let r = mat(h, r);
    let id = DMatrix::<f64>::identity(h, h);
    let lu = (&id + &r).lu();
    if lu.determinant().abs() < 1e-12 {
        return None;
    }
    lu.solve(&(&id - &r)).map(|s| rows(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_side_by_side_give_the_bits_of_one_at_a_time() {
        // Random generators, a zero one (every multiplier 0), one with signed zeros, one with
        // a huge entry (its pivot fails: solved again alone), and fewer blocks than lanes.
        for h in [2usize, 5, 16, 32] {
            let mut blocks: Vec<Vec<f64>> =
                (0..5).map(|i| skew_half(h, &random(h, 40 + i))).collect();
            blocks.push(vec![0.0; h * h]);
            let mut zeros = skew_half(h, &random(h, 9));
            for (i, x) in zeros.iter_mut().enumerate() {
                if i % 3 == 0 {
                    *x = if i % 2 == 0 { 0.0 } else { -0.0 };
                }
            }
            blocks.push(zeros);
            let mut huge = skew_half(h, &random(h, 7));
            huge[1] = 1e300;
            huge[h] = -1e300;
            blocks.push(huge);
            for count in [8usize, 3] {
                let refs: Vec<&[f64]> = blocks[8 - count..].iter().map(|b| b.as_slice()).collect();
                let many = try_cayley_minus_many(h, &refs);
                for (b, got) in refs.iter().zip(&many) {
                    let bits = |v: &Option<Vec<f64>>| {
                        v.as_ref()
                            .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                    };
                    assert_eq!(bits(got), bits(&try_cayley_minus(h, b)), "h={h}");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if crate::math::kernel::Isa::best() == crate::math::kernel::Isa::Avx512 {
                // Sound lanes are solved side by side, not again alone.
                let refs: Vec<&[f64]> = blocks[..7].iter().map(|b| b.as_slice()).collect();
                // SAFETY: AVX-512F checked above.
                let ok = unsafe { lanes_avx512(h, &refs) }.1;
                assert!(ok[..7].iter().all(|&o| o), "h={h}");
            }
        }
    }

    #[test]
    fn fixed_size_rows_give_the_bits_of_the_general_elimination() {
        for h in [8usize, 16, 32] {
            for seed in 0..6u64 {
                let mut s = skew_half(h, &random(h, 100 + seed));
                // Zero multipliers (skipped updates) and signed zeros.
                if seed % 2 == 1 {
                    for (i, x) in s.iter_mut().enumerate() {
                        if i % 5 == 0 {
                            *x = if i % 2 == 0 { 0.0 } else { -0.0 };
                        }
                    }
                }
                if seed == 4 {
                    s.iter_mut().for_each(|x| *x *= 40.0);
                }
                let bits = |v: Option<Vec<f64>>| {
                    v.map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                };
                let general = elimination_any(h, &s);
                assert!(general.is_some(), "h={h} seed={seed}");
                assert_eq!(bits(elimination(h, &s)), bits(general), "h={h} seed={seed}");
            }
            // A pivot that fails fails both.
            let mut huge = skew_half(h, &random(h, 7));
            huge[1] = 1e300;
            huge[h] = -1e300;
            assert_eq!(elimination(h, &huge), elimination_any(h, &huge), "h={h}");
        }
    }

    #[test]
    fn elimination_matches_pivoted_lu() {
        for (h, seed, amp) in [(2, 1, 1.0), (8, 2, 3.0), (32, 3, 0.5), (17, 4, 40.0)] {
            let a = random(h, seed);
            let s: Vec<f64> = skew_half(h, &a).iter().map(|x| x * amp).collect();
            let fast = cayley_minus_elimination(h, &s).unwrap();
            let lu = cayley_minus_lu(h, &s).unwrap();
            let worst = fast
                .iter()
                .zip(&lu)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(worst < 1e-12, "h={h}: {worst:e}");
            assert!(orth_error_f64(h, &fast) < 1e-12);
        }
    }

    #[test]
    fn neumann_series_match_peft_term_rules() {
        let h = 4;
        let v: Vec<f64> = (0..6).map(|i| 0.01 * (i as f64 + 1.0)).collect();
        let s = skew_from_triu(h, &v);
        assert_eq!(triu_size(6), Some(4));
        assert_eq!(triu_size(7), None);
        let s2 = matmul(h, &s, &s);
        let s3 = matmul(h, &s2, &s);
        let id: Vec<f64> = (0..16)
            .map(|k| if k % 5 == 0 { 1.0 } else { 0.0 })
            .collect();
        let comb = |w: &[f64]| -> Vec<f64> {
            let pw = [&id, &s, &s2, &s3];
            (0..16)
                .map(|k| w.iter().zip(pw).map(|(a, m)| a * m[k]).sum())
                .collect()
        };
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-15);
        assert!(close(&neumann_plus(h, &s, 1, false), &id));
        assert!(close(&neumann_plus(h, &s, 2, false), &comb(&[1.0, 2.0])));
        // T = 3 and T = 4 are the same sum in PEFT ≥ 0.18.
        assert!(close(
            &neumann_plus(h, &s, 3, false),
            &comb(&[1.0, 2.0, 2.0, 1.0])
        ));
        assert!(close(
            &neumann_plus(h, &s, 4, false),
            &comb(&[1.0, 2.0, 2.0, 1.0])
        ));
        assert!(close(
            &neumann_plus(h, &s, 4, true),
            &comb(&[1.0, 2.0, 2.0, 2.0])
        ));
        // Many terms converge to the exact C+(S) for a small generator.
        let exact = cayley_plus(h, &s);
        assert!(close_to(&neumann_plus(h, &s, 30, false), &exact, 1e-12));
    }

    fn close_to(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < tol)
    }
    use crate::math::blocks::orth_error_f64;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    fn random(h: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..h * h).map(|_| lcg(&mut s)).collect()
    }

    #[test]
    fn cayley_is_orthogonal_and_inverts() {
        for h in [1, 2, 5, 8] {
            let s = skew_half(h, &random(h, h as u64));
            let q = cayley_minus(h, &s);
            assert!(orth_error_f64(h, &q) < 1e-12);
            let back = inverse_cayley_minus(h, &q).unwrap();
            for (a, b) in back.iter().zip(&s) {
                assert!((a - b).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn plus_is_transpose_of_minus() {
        let h = 4;
        let s = skew_half(h, &random(h, 7));
        let m = cayley_minus(h, &s);
        let p = cayley_plus(h, &s);
        for i in 0..h {
            for j in 0..h {
                assert!((m[i * h + j] - p[j * h + i]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn cayley_of_zero_is_identity_and_matches_closed_form_2x2() {
        // For S = [[0, a], [-a, 0]], C−(S) = 1/(1+a²) [[1 − a², −2a], [2a, 1 − a²]].
        let a = 0.3;
        let q = cayley_minus(2, &[0.0, a, -a, 0.0]);
        let d = 1.0 + a * a;
        let want = [
            (1.0 - a * a) / d,
            -2.0 * a / d,
            2.0 * a / d,
            (1.0 - a * a) / d,
        ];
        for (x, y) in q.iter().zip(want) {
            assert!((x - y).abs() < 1e-15);
        }
        assert_eq!(
            cayley_minus(3, &[0.0; 9]),
            vec![1., 0., 0., 0., 1., 0., 0., 0., 1.]
        );
    }

    #[test]
    fn huge_generators_fail_cleanly() {
        // Exactly invertible, numerically singular: the identity vanishes next to 1e30 and a
        // skew matrix of odd size is singular.
        // With every entry ±2^100 the elimination is exact and meets a zero pivot.
        let big = 2f64.powi(101);
        let mut a = vec![0.0; 9];
        a[1] = big;
        a[2] = big;
        a[5] = big;
        let s = skew_half(3, &a);
        assert!(try_cayley_minus(3, &s).is_none());
        assert!(cayley_minus(3, &s).iter().all(|x| x.is_nan()));
    }
}
