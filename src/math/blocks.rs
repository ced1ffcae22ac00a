//! Small dense block operations (blocks are tens of elements wide, so f64 and plain LU suffice).

use nalgebra::DMatrix;

/// Largest `|BᵀB − I|` entry of a row-major h×h block.
pub fn orth_error_f64(h: usize, b: &[f64]) -> f64 {
    let mut worst = 0.0f64;
    for i in 0..h {
        for j in 0..h {
            let mut acc = 0.0;
            for k in 0..h {
                acc += b[k * h + i] * b[k * h + j];
            }
            let target = if i == j { 1.0 } else { 0.0 };
            worst = worst.max((acc - target).abs());
        }
    }
    worst
}

pub fn orth_error(h: usize, b: &[f32]) -> f64 {
    let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    orth_error_f64(h, &b)
}

pub fn determinant(h: usize, b: &[f32]) -> f64 {
    let m = DMatrix::from_row_slice(h, h, &b.iter().map(|&x| x as f64).collect::<Vec<_>>());
    m.determinant()
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
