//! Small dense block operations (blocks are tens of elements wide, so f64 and plain LU suffice).

use nalgebra::DMatrix;

/// Largest `|BᵀB − I|` entry of a row-major h×h block. The product goes through a blocked
/// GEMM: a plain triple loop walks B by columns and, past a few hundred, spends minutes on cache
/// misses (92 s at h = 2048 against ~1 s).
pub fn orth_error_f64(h: usize, b: &[f64]) -> f64 {
    assert_eq!(b.len(), h * h, "block of {h}×{h}");
    let mut g = vec![0.0f64; h * h];
    // SAFETY: `b` holds h×h values (checked above) and `g` is h×h; the strides describe Bᵀ
    // (column-major view of b), B and G row-major, all in bounds.
    unsafe {
        matrixmultiply::dgemm(
            h,
            h,
            h,
            1.0,
            b.as_ptr(),
            1,
            h as isize,
            b.as_ptr(),
            h as isize,
            1,
            0.0,
            g.as_mut_ptr(),
            h as isize,
            1,
        );
    }
    let mut worst = 0.0f64;
    for i in 0..h {
        for j in 0..h {
            let target = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((g[i * h + j] - target).abs());
        }
    }
    worst
}

/// Largest |BᵀB − I| entry of an h×h block, in f64.
pub fn orth_error(h: usize, b: &[f32]) -> f64 {
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    orth_error_f64(h, &b)
}

/// Determinant of an h×h block. Common block sizes go through nalgebra's fixed-size matrices:
/// the same LU (same operations in the same order, so the same bits) without the dynamic
/// matrix's heap and generic loops, which made it a few percent of a verify.
pub fn determinant(h: usize, b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    macro_rules! fixed {
        ($($n:literal),*) => {
            match h {
                $($n => return nalgebra::SMatrix::<f64, $n, $n>::from_row_slice(&b64).determinant(),)*
                _ => {}
            }
        };
    }
    fixed!(4, 8, 16, 20, 32);
    DMatrix::from_row_slice(h, h, &b64).determinant()
}

/// Two block-diagonal factors of one geometry, `first` applied before `second`, as one: every
/// h×h block of `second` becomes its product with the matching block of `first` (second ·
/// first), summed in f64 and rounded once.
pub fn fold_after(h: usize, first: &[f32], second: &mut [f32]) {
    for (q1, q0) in second
        .chunks_exact_mut(h * h)
        .zip(first.chunks_exact(h * h))
    {
        let p = product(h, q1, q0);
        q1.copy_from_slice(&p);
    }
}

/// The product `a · b` of two h×h row-major blocks, summed in f64 and rounded once.
fn product(h: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; h * h];
    for i in 0..h {
        for j in 0..h {
            let s: f64 = (0..h)
                .map(|k| f64::from(a[i * h + k]) * f64::from(b[k * h + j]))
                .sum();
            out[i * h + j] = s as f32;
        }
    }
    out
}

/// An h×h block transposed.
pub fn transpose(h: usize, b: &[f32]) -> Vec<f32> {
    let mut t = vec![0f32; h * h];
    for i in 0..h {
        for j in 0..h {
            t[j * h + i] = b[i * h + j];
        }
    }
    t
}

/// Blocks whose `|BᵀB − I|` stays below this are inverted by transposition: for them the
/// transpose is the inverse to f32 working precision, and it is exact where LU would round.
pub const ORTHOGONAL_TOL: f64 = 1e-6;

/// Inverse of a row-major h×h block: its transpose when orthogonal to working precision, else
/// an LU inverse in f64. None when the block is singular.
pub fn inverse(h: usize, b: &[f32]) -> Option<Vec<f32>> {
    if orth_error(h, b) <= ORTHOGONAL_TOL {
        return Some(transpose(h, b));
    }
    let m = DMatrix::from_row_slice(h, h, &b.iter().map(|&x| x as f64).collect::<Vec<_>>());
    let inv = m.try_inverse()?;
    if inv.iter().any(|x| !x.is_finite()) {
        return None;
    }
    Some(inv.transpose().iter().map(|&x| x as f32).collect())
}

/// `Bᵗ` of an orthogonal block with determinant +1 (the point at t along the geodesic from I to
/// B in SO(h)), or None when B has an eigenvalue −1 (no unique geodesic). Computed through the
/// Cayley generator: `B = C−(S)`, S's eigenvalues ±iσ become ±i·tan(t·atan σ), so that
/// `C−(S_t)` has B's eigenvectors and t times its rotation angles. (Scaling S by t alone is not
/// a geodesic: `C−(S/2)² ≠ C−(S)`.)
pub fn orthogonal_power(h: usize, b: &[f32], t: f64) -> Option<Vec<f32>> {
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let s = crate::math::cayley::inverse_cayley_minus(h, &b64)?;
    let s = DMatrix::from_row_slice(h, h, &s);
    let s = (&s - s.transpose()) * 0.5;
    let eig = (&s * &s).symmetric_eigen();
    let g: Vec<f64> = eig
        .eigenvalues
        .iter()
        .map(|&mu| {
            let sigma = (-mu).max(0.0).sqrt();
            if sigma < 1e-12 {
                t
            } else {
                (t * sigma.atan()).tan() / sigma
            }
        })
        .collect();
    let v = &eig.eigenvectors;
    let gm = v * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(g)) * v.transpose();
    let st = &s * gm;
    let st = (&st - st.transpose()) * 0.5;
    let rows: Vec<f64> = st.transpose().as_slice().to_vec();
    let q = crate::math::cayley::try_cayley_minus(h, &rows)?;
    Some(q.iter().map(|&x| x as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_determinants_give_the_bits_of_the_dynamic_ones() {
        let mut seed = 11u64;
        for h in [4usize, 8, 16, 20, 32] {
            for _ in 0..4 {
                let b: Vec<f32> = (0..h * h)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                    })
                    .collect();
                let dynamic =
                    DMatrix::from_row_slice(h, h, &b.iter().map(|&x| x as f64).collect::<Vec<_>>())
                        .determinant();
                assert_eq!(determinant(h, &b).to_bits(), dynamic.to_bits(), "h={h}");
            }
        }
    }

    #[test]
    fn orthogonal_power_is_a_geodesic() {
        use crate::math::cayley;
        let h = 6;
        let mut seed = 7u64;
        let a: Vec<f64> = (0..h * h)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 3.0
            })
            .collect();
        let b: Vec<f32> = cayley::cayley_minus(h, &cayley::skew_half(h, &a))
            .iter()
            .map(|&x| x as f32)
            .collect();
        let half = super::orthogonal_power(h, &b, 0.5).unwrap();
        assert!(super::orth_error(h, &half) < 1e-6);
        let mut sq = vec![0f32; h * h];
        for i in 0..h {
            for j in 0..h {
                sq[i * h + j] = (0..h).map(|k| half[i * h + k] * half[k * h + j]).sum();
            }
        }
        let worst = sq
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "B^½·B^½ differs from B by {worst}");
        let one = super::orthogonal_power(h, &b, 1.0).unwrap();
        assert!(one.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
        let zero = super::orthogonal_power(h, &b, 0.0).unwrap();
        assert!(super::orth_error(h, &zero) < 1e-6 && (zero[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn inverse_of_non_orthogonal_block() {
        let b = [2.0f32, 1.0, 0.5, 3.0];
        let inv = inverse(2, &b).unwrap();
        // b · inv = I
        for i in 0..2 {
            for j in 0..2 {
                let v: f32 = (0..2).map(|k| b[i * 2 + k] * inv[k * 2 + j]).sum();
                assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-6);
            }
        }
        assert!(inverse(2, &[1.0, 2.0, 2.0, 4.0]).is_none());
    }

    #[test]
    fn orthogonal_block_inverts_by_transpose() {
        let (c, s) = (0.6f32, 0.8f32);
        let b = [c, -s, s, c];
        assert!(orth_error(2, &b) < 1e-7);
        assert_eq!(inverse(2, &b).unwrap(), transpose(2, &b));
        assert!((determinant(2, &b) - 1.0).abs() < 1e-6);
    }
}
