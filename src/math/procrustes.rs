//! The orthogonal Procrustes problem restricted to rotations: the block R with det R = +1 that
//! maximises `tr(Rᵀ K)` for a cross product `K = Σ t gᵀ`, which is the R minimising
//! `Σ ‖t − R g‖²` (‖R g‖ does not depend on R). Extraction (`crate::extract`) solves one per block
//! of every factor it fits.

use nalgebra::DMatrix;

/// The rotation maximising `tr(Rᵀ K)` over SO(h) (row-major h×h in and out), and that maximum.
///
/// With `K = U Σ Vᵀ`, the unconstrained optimum over O(h) is `U Vᵀ` with value `Σ σ_i`. When that
/// is a reflection (det −1) the best rotation flips the direction of the smallest singular value
/// (Kabsch): `U diag(1, …, 1, −1) Vᵀ`, value `Σ σ_i − 2 σ_min`. A rotation is what a Cayley
/// generator (and so every library's file) can hold.
pub fn rotation(h: usize, k: &[f64]) -> (Vec<f64>, f64) {
    assert_eq!(k.len(), h * h, "cross product of {h}×{h}");
    if h == 1 {
        // SO(1) = {1}.
        return (vec![1.0], k[0]);
    }
    let m = DMatrix::from_row_slice(h, h, k);
    // A non-finite cross product has no meaningful optimum; the identity keeps callers' chains
    // orthogonal, and they check the data for finiteness themselves.
    if !m.iter().all(|x| x.is_finite()) {
        return (identity(h), (0..h).map(|i| k[i * h + i]).sum());
    }
    let svd = m.svd(true, true);
    let (Some(u), Some(vt)) = (svd.u, svd.v_t) else {
        return (identity(h), (0..h).map(|i| k[i * h + i]).sum());
    };
    let sigma = svd.singular_values;
    let mut u = u;
    let mut value: f64 = sigma.iter().sum();
    if (&u * &vt).determinant() < 0.0 {
        let (j, smallest) =
            sigma.iter().enumerate().fold(
                (0, f64::INFINITY),
                |b, (i, &s)| if s < b.1 { (i, s) } else { b },
            );
        for r in 0..h {
            u[(r, j)] = -u[(r, j)];
        }
        value -= 2.0 * smallest;
    }
    let r = u * vt;
    let mut out = vec![0.0; h * h];
    for i in 0..h {
        for j in 0..h {
            out[i * h + j] = r[(i, j)];
        }
    }
    (out, value)
}

fn identity(h: usize) -> Vec<f64> {
    let mut r = vec![0.0; h * h];
    for i in 0..h {
        r[i * h + i] = 1.0;
    }
    r
}

/// How far a rotation turns, as one angle in radians: the angle θ such that turning each of the
/// h/2 planes by θ moves as far in Frobenius norm (`‖R − I‖² = 8 Σ sin²(θ_k / 2)` over the
/// planes). O(h²), where the individual angles would need an eigen-decomposition.
pub fn mean_angle(h: usize, r: &[f32]) -> f64 {
    let planes = (h / 2).max(1) as f64;
    let mut d2 = 0.0f64;
    for i in 0..h {
        for j in 0..h {
            let id = if i == j { 1.0 } else { 0.0 };
            d2 += (r[i * h + j] as f64 - id).powi(2);
        }
    }
    2.0 * (d2 / (8.0 * planes)).sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::cayley;

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed;
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        }
    }

    fn random_rotation(h: usize, seed: u64, amp: f64) -> Vec<f64> {
        let mut r = lcg(seed);
        let a: Vec<f64> = (0..h * h).map(|_| r() * amp).collect();
        cayley::cayley_minus(h, &cayley::skew_half(h, &a))
    }

    fn matmul(h: usize, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; h * h];
        for i in 0..h {
            for k in 0..h {
                for j in 0..h {
                    c[i * h + j] += a[i * h + k] * b[k * h + j];
                }
            }
        }
        c
    }

    fn trace_t(h: usize, r: &[f64], k: &[f64]) -> f64 {
        (0..h * h).map(|i| r[i] * k[i]).sum()
    }

    fn det(h: usize, r: &[f64]) -> f64 {
        DMatrix::from_row_slice(h, h, r).determinant()
    }

    #[test]
    fn recovers_a_rotation_from_exact_data() {
        // K = Σ t gᵀ with t = R g: K = R G Gᵀ, whose best rotation is R itself.
        for h in [2, 3, 8, 17] {
            let r0 = random_rotation(h, h as u64, 2.0);
            let mut rnd = lcg(99);
            let g: Vec<f64> = (0..h * 3 * h).map(|_| rnd()).collect();
            let mut k = vec![0.0; h * h];
            for s in 0..3 * h {
                let gs = &g[s * h..(s + 1) * h];
                let ts: Vec<f64> = (0..h)
                    .map(|i| (0..h).map(|j| r0[i * h + j] * gs[j]).sum())
                    .collect();
                for i in 0..h {
                    for j in 0..h {
                        k[i * h + j] += ts[i] * gs[j];
                    }
                }
            }
            let (r, _) = rotation(h, &k);
            let worst = r
                .iter()
                .zip(&r0)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-9, "h={h}: {worst:e}");
        }
    }

    #[test]
    fn the_closed_form_beats_random_perturbations_and_is_a_rotation() {
        for (h, seed) in [(2, 1), (4, 2), (8, 3), (16, 4), (5, 5)] {
            let mut rnd = lcg(seed);
            let k: Vec<f64> = (0..h * h).map(|_| rnd()).collect();
            let (r, value) = rotation(h, &k);
            assert!((det(h, &r) - 1.0).abs() < 1e-9, "det {}", det(h, &r));
            assert!((trace_t(h, &r, &k) - value).abs() < 1e-9);
            for p in 0..50 {
                for amp in [1e-3, 1e-1, 3.0] {
                    let q = random_rotation(h, 1000 + p, amp);
                    let other = matmul(h, &r, &q);
                    assert!(
                        trace_t(h, &other, &k) <= value + 1e-12,
                        "h={h} p={p} amp={amp}"
                    );
                }
            }
        }
    }

    #[test]
    fn reflections_become_the_best_rotation() {
        // K a reflection: the unconstrained optimum has det −1, the answer must not.
        let h = 3;
        let k = vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, -0.5];
        let (r, value) = rotation(h, &k);
        assert!((det(h, &r) - 1.0).abs() < 1e-12);
        // Best rotation: flip the smallest singular direction (0.5), value 1 + 2 − 0.5.
        assert!((value - 2.5).abs() < 1e-12, "{value}");
        assert!((trace_t(h, &r, &k) - 2.5).abs() < 1e-12);
        // Random reflected data: still a rotation, still no worse than nearby rotations.
        for seed in 0..20 {
            let mut rnd = lcg(seed + 7);
            let mut k: Vec<f64> = (0..16).map(|_| rnd()).collect();
            if DMatrix::from_row_slice(4, 4, &k).determinant() > 0.0 {
                for v in &mut k[..4] {
                    *v = -*v;
                }
            }
            let (r, value) = rotation(4, &k);
            assert!((det(4, &r) - 1.0).abs() < 1e-9);
            for p in 0..20 {
                let q = random_rotation(4, 500 + p, 0.05);
                assert!(trace_t(4, &matmul(4, &r, &q), &k) <= value + 1e-12);
            }
        }
    }

    #[test]
    fn degenerate_inputs_give_a_rotation() {
        for k in [
            vec![0.0; 4],
            vec![f64::NAN, 0.0, 0.0, 1.0],
            vec![1.0, 0.0, 0.0, 0.0],
        ] {
            let (r, _) = rotation(2, &k);
            assert!((det(2, &r) - 1.0).abs() < 1e-12, "{k:?} → {r:?}");
        }
        assert_eq!(rotation(1, &[-3.0]).0, vec![1.0]);
    }

    #[test]
    fn mean_angle_of_a_plane_rotation() {
        let t: f64 = 0.3;
        let r = [
            t.cos() as f32,
            -t.sin() as f32,
            t.sin() as f32,
            t.cos() as f32,
        ];
        assert!((mean_angle(2, &r) - t).abs() < 1e-6);
        assert_eq!(mean_angle(2, &[1.0, 0.0, 0.0, 1.0]), 0.0);
    }
}
