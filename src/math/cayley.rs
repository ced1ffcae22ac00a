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
