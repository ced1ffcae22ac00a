//! A chain as a device runs it: one gather (with the scale where it comes first), a block
//! product per factor with a single permutation between two products (the scatter of one
//! factor and the gather of the next, composed), and one scatter at the end (with the scale
//! where it comes last, and the blend). The GPU backend (`cuda.rs`) uploads these index arrays
//! and blocks once per chain; `emulate` runs the same steps on the host, so the normal test
//! suite proves the plan against the CPU kernel on machines without a GPU.

use crate::math::kernel::{Chain, ScaleOn};
use crate::math::perm;

/// The index arrays of one chain (`dst[j] = src[idx[j]]`; None is the identity).
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    /// Before the first product: the first factor's gather.
    pub gather: Option<Vec<u32>>,
    /// Between product `i` and `i + 1`: factor i's scatter then factor i + 1's gather.
    pub between: Vec<Option<Vec<u32>>>,
    /// After the last product: the last factor's scatter, as a gather.
    pub scatter: Option<Vec<u32>>,
}

/// How a step scales: none, per row (vector), per component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleMode {
    /// No scale in this step.
    None = 0,
    /// One factor per row (vector).
    Row = 1,
    /// One factor per component.
    Component = 2,
}

impl DevicePlan {
    /// The plan of `chain`; None where it has no factor (the host applies such a chain).
    pub fn of(chain: &Chain) -> Option<DevicePlan> {
        let first = chain.factors.first()?;
        let identity = |v: Vec<u32>| -> Option<Vec<u32>> {
            (!v.iter().enumerate().all(|(i, &x)| i as u32 == x)).then_some(v)
        };
        let between = chain
            .factors
            .windows(2)
            .map(|w| {
                let inv = w[0].perm.as_ref().map(|p| perm::invert(p));
                let n = chain.n as u32;
                let next: Vec<u32> = match &w[1].perm {
                    Some(p) => p.clone(),
                    None => (0..n).collect(),
                };
                identity(match inv {
                    Some(inv) => next.iter().map(|&j| inv[j as usize]).collect(),
                    None => next,
                })
            })
            .collect();
        let last = chain.factors.last().expect("one factor at least");
        Some(DevicePlan {
            gather: first.perm.clone().and_then(identity),
            between,
            scatter: last
                .perm
                .as_ref()
                .map(|p| perm::invert(p))
                .and_then(identity),
        })
    }

    /// The scale mode of the gather (`first`) or the finishing scatter.
    pub fn scale_mode(chain: &Chain, first: bool) -> ScaleMode {
        match (&chain.scale, chain.scale_first == first, chain.scale_on) {
            (Some(_), true, ScaleOn::Vector) => ScaleMode::Row,
            (Some(_), true, ScaleOn::Component) => ScaleMode::Component,
            _ => ScaleMode::None,
        }
    }

    /// Factor `f`'s blocks for every position on the diagonal (shared blocks written out), each
    /// row-major: what the batched product reads.
    pub fn blocks(f: &crate::math::kernel::Factor) -> Vec<f32> {
        (0..f.d).flat_map(|k| f.block(k).iter().copied()).collect()
    }
}

/// Content hash of a chain (blocks, permutations, scale, flags); hashing is cheap next to the
/// batch it guards, and unlike an address it cannot alias a chain that has since been freed.
pub fn fingerprint(c: &Chain) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.n.hash(&mut h);
    c.scale_first.hash(&mut h);
    (c.scale_on == ScaleOn::Vector).hash(&mut h);
    for f in &c.factors {
        (f.h, f.d, f.repeat).hash(&mut h);
        f.blocks.iter().for_each(|x| x.to_bits().hash(&mut h));
        f.perm.hash(&mut h);
    }
    if let Some(s) = &c.scale {
        s.iter().for_each(|x| x.to_bits().hash(&mut h));
    }
    h.finish()
}

/// Run `chain` on `rows` rows of `t` (the first is row `row0`) by the plan's steps, as the
/// device does, in f32 on the host: `gather`, a product per factor, `between`, `finish`.
pub fn emulate(chain: &Chain, plan: &DevicePlan, t: &mut [f32], row0: usize, rows: usize) {
    let n = chain.n;
    let scale = chain.scale.as_deref().unwrap_or(&[]);
    let mut cur = vec![0f32; rows * n];
    gather(
        t,
        &mut cur,
        plan.gather.as_deref(),
        scale,
        DevicePlan::scale_mode(chain, true),
        row0,
        n,
    );
    for (i, f) in chain.factors.iter().enumerate() {
        let q = DevicePlan::blocks(f);
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for k in 0..f.d {
                let x = &cur[r * n + k * f.h..r * n + (k + 1) * f.h];
                let b = &q[k * f.h * f.h..(k + 1) * f.h * f.h];
                for o in 0..f.h {
                    y[r * n + k * f.h + o] = (0..f.h).map(|j| b[o * f.h + j] * x[j]).sum::<f32>();
                }
            }
        }
        cur = y;
        if let Some(Some(idx)) = plan.between.get(i) {
            let mut g = vec![0f32; rows * n];
            gather(&cur, &mut g, Some(idx), &[], ScaleMode::None, row0, n);
            cur = g;
        }
    }
    finish(
        &cur,
        t,
        plan.scatter.as_deref(),
        scale,
        DevicePlan::scale_mode(chain, false),
        row0,
        n,
        chain.blend,
    );
}

/// The device's `boft_gather`.
fn gather(
    src: &[f32],
    dst: &mut [f32],
    idx: Option<&[u32]>,
    scale: &[f32],
    mode: ScaleMode,
    row0: usize,
    n: usize,
) {
    for (i, d) in dst.iter_mut().enumerate() {
        let (r, j) = (i / n, i % n);
        let c = idx.map_or(j, |p| p[j] as usize);
        *d = src[r * n + c] * scale_at(scale, mode, row0 + r, c);
    }
}

/// The device's `boft_finish`.
#[allow(clippy::too_many_arguments)]
fn finish(
    y: &[f32],
    t: &mut [f32],
    idx: Option<&[u32]>,
    scale: &[f32],
    mode: ScaleMode,
    row0: usize,
    n: usize,
    blend: f32,
) {
    for (i, o) in t.iter_mut().enumerate() {
        let (r, q) = (i / n, i % n);
        let v = y[r * n + idx.map_or(q, |p| p[q] as usize)] * scale_at(scale, mode, row0 + r, q);
        *o = if blend != 1.0 {
            *o + blend * (v - *o)
        } else {
            v
        };
    }
}

fn scale_at(scale: &[f32], mode: ScaleMode, row: usize, c: usize) -> f32 {
    match mode {
        ScaleMode::None => 1.0,
        ScaleMode::Row => scale[row],
        ScaleMode::Component => scale[c],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::{Factor, Scratch};

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// A random chain: `nf` factors of block size h, PEFT BOFT butterfly permutations on all
    /// but `unpermuted` (a set of factor indices), the last factor's first block shared.
    fn chain(seed: &mut u64, n: usize, h: usize, nf: usize, unpermuted: &[usize]) -> Chain {
        let d = n / h;
        Chain {
            n,
            factors: (0..nf)
                .map(|i| {
                    let repeat = if i + 1 == nf { d / 2 } else { 0 };
                    Factor {
                        h,
                        d,
                        blocks: (0..(d - repeat) * h * h).map(|_| rnd(seed)).collect(),
                        repeat,
                        perm: (!unpermuted.contains(&i))
                            .then(|| perm::invert(&perm::peft_boft(n, h, i.max(1)))),
                    }
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        }
    }

    #[test]
    fn plan_runs_the_chain() {
        let mut seed = 5u64;
        let rows = 7;
        for (n, h, nf, unpermuted) in [
            (64usize, 8usize, 3usize, vec![0usize]),
            (64, 8, 3, vec![]),
            (64, 8, 3, vec![1]),
            (48, 6, 2, vec![0, 1]),
            (32, 4, 1, vec![]),
            (12, 12, 1, vec![0]),
        ] {
            for (scale_on, scale_first, blend) in [
                (None, false, 1.0f32),
                (Some(ScaleOn::Vector), false, 1.0),
                (Some(ScaleOn::Vector), true, 1.0),
                (Some(ScaleOn::Component), true, 1.0),
                (Some(ScaleOn::Component), false, 0.5),
                (None, false, 1.7),
            ] {
                let mut c = chain(&mut seed, n, h, nf, &unpermuted);
                let row0 = 3;
                if let Some(on) = scale_on {
                    let len = if on == ScaleOn::Vector {
                        row0 + rows
                    } else {
                        n
                    };
                    c.scale = Some((0..len).map(|_| 1.0 + rnd(&mut seed)).collect());
                    c.scale_on = on;
                }
                c.scale_first = scale_first;
                c.blend = blend;
                let plan = DevicePlan::of(&c).unwrap();
                assert_eq!(plan.between.len(), nf - 1);
                let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                let mut want = x0.clone();
                c.apply_rows(&mut want, row0, rows, &mut Scratch::default());
                let mut got = x0.clone();
                emulate(&c, &plan, &mut got, row0, rows);
                let top = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                    assert!(
                        (a - b).abs() <= 2e-6 * top,
                        "element {i}: {a} vs {b} (n={n} h={h} N={nf} unpermuted={unpermuted:?} \
                         scale={scale_on:?} first={scale_first} blend={blend})"
                    );
                }
            }
        }
    }

    #[test]
    fn identities_are_left_out() {
        let mut seed = 9u64;
        // PEFT BOFT: the first factor unpermuted, so nothing to gather first.
        let c = chain(&mut seed, 64, 8, 2, &[0]);
        let plan = DevicePlan::of(&c).unwrap();
        assert_eq!(plan.gather, None);
        assert!(plan.between[0].is_some() && plan.scatter.is_some());
        // One factor's scatter followed by the same gather composes to nothing between the products.
        let mut c = chain(&mut seed, 64, 8, 2, &[]);
        let p = c.factors[0].perm.clone().unwrap();
        c.factors[1].perm = Some(p);
        assert_eq!(DevicePlan::of(&c).unwrap().between, vec![None]);
        let empty = Chain {
            factors: vec![],
            ..c
        };
        assert!(DevicePlan::of(&empty).is_none());
    }
}
