//! The checks of one adapter target: its blocks, its composed transform, and (with a base) the
//! tensor it rotates.

use crate::adapter::{BlockKind, Side, Target};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::math::blocks;
use crate::math::kernel::Chain;

use super::measure::{connectivity, degrees_of_freedom, hyperspherical, transform_properties};
use super::{Ctx, Status, TargetReport, DENSE_MAX};

pub(super) fn check_target(
    ctx: &mut Ctx,
    t: &Target,
    base: Option<&Checkpoint>,
) -> Result<TargetReport> {
    let label = t.label();
    // Shared blocks whose count only the base knows, with no base given: what can be measured
    // is the one stored block (a diagonal of one).
    let unfitted = t.share && t.blocks == 0;
    let one;
    let t = if unfitted {
        one = Target {
            blocks: 1,
            ..t.clone()
        };
        &one
    } else {
        t
    };
    let (h, d, nf, n) = (t.block_size, t.blocks, t.factors, t.n());
    // Loading already refused non-finite values and broken geometry; record that they held.
    ctx.push(
        "finite",
        &label,
        Status::Pass,
        None,
        None,
        "all block and scale values finite",
    );
    ctx.push(
        "geometry",
        &label,
        Status::Pass,
        Some(n as f64),
        None,
        if unfitted {
            format!(
                "{nf} factors × one shared block × {h}, measured alone (their count follows \
                 from the base, not given); permutations valid"
            )
        } else {
            format!("{nf} factors × {d} blocks × {h}; permutations valid")
        },
    );

    let mut worst = 0f64;
    let mut negative = 0usize;
    // A shared block is checked once and counts at every position it serves.
    let serves = d / t.stored().max(1);
    for f in 0..nf {
        for k in 0..t.stored() {
            crate::output::check_interrupted()?;
            let b = t.block(f, k);
            worst = worst.max(blocks::orth_error(h, b));
            if blocks::determinant(h, b) < 0.0 {
                negative += serves;
            }
        }
    }
    let exact = t.kind == BlockKind::Cayley;
    let orth_tol = if exact {
        ctx.settings.tolerance
    } else {
        ctx.settings.approx_tolerance
    };
    let what = match t.kind {
        BlockKind::Cayley => "worst |BᵀB − I| over blocks",
        BlockKind::Neumann => "worst |BᵀB − I| (expected: truncated Neumann series)",
        BlockKind::Cropped => "worst |BᵀB − I| (expected: cropped blocks)",
        BlockKind::Raw => "worst |BᵀB − I| (stored finished blocks)",
    };
    ctx.bound("block-orthogonality", &label, worst, orth_tol, what);
    if exact {
        ctx.push(
            "determinant",
            &label,
            if negative == 0 {
                Status::Pass
            } else {
                Status::Fail
            },
            Some(negative as f64),
            Some(0.0),
            format!("{negative} of {} Cayley blocks with determinant −1", nf * d),
        );
    } else {
        ctx.push(
            "determinant",
            &label,
            Status::Info,
            Some(negative as f64),
            None,
            format!("{negative} blocks with negative determinant"),
        );
    }

    let m_chain = {
        let mut c = t.chain(false)?;
        c.scale = None;
        c
    };
    crate::output::check_interrupted()?;
    let props = if let Some(one) = one_shared_block(&m_chain) {
        // M is D copies of one block down the diagonal: its orthogonality and largest angle are
        // the block's, its distance from I √D times the block's. Measured on the block, the
        // work follows the bytes stored instead of D times them.
        let mut p = transform_properties(&one, ctx.settings.probes, DENSE_MAX);
        p.distance.value *= (d as f64).sqrt();
        p
    } else {
        transform_properties(&m_chain, ctx.settings.probes, DENSE_MAX)
    };
    ctx.bound(
        "transform-orthogonality",
        &label,
        props.orth.value,
        orth_tol * (nf as f64).max(1.0),
        &format!("composed M: max |MᵀM − I| ({})", props.orth.method),
    );

    crate::output::check_interrupted()?;
    let reach = connectivity(&m_chain);
    ctx.push(
        "connectivity",
        &label,
        Status::Info,
        Some(reach.min as f64),
        Some(reach.butterfly_reach as f64),
        format!(
            "each output reaches {}–{} of {n} inputs (butterfly depth {nf} gives {}; dense needs {} factors){}{}",
            reach.min,
            reach.max,
            reach.butterfly_reach,
            reach.factors_for_full_density,
            if reach.dense { "; M is dense" } else { "" },
            if reach.followed < reach.blocks {
                format!(
                    "; followed from {} of the last factor's {} blocks",
                    reach.followed, reach.blocks
                )
            } else {
                String::new()
            }
        ),
    );
    let dof = degrees_of_freedom(t);
    ctx.push(
        "degrees-of-freedom",
        &label,
        Status::Info,
        Some(dof.adapter as f64),
        None,
        format!(
            "{} generator parameters (+{} scale) vs {} for a dense orthogonal n={n} and {} for OFT with b={h}",
            dof.adapter, dof.scale, dof.dense_orthogonal, dof.oft_same_block
        ),
    );
    ctx.push(
        "distance-from-identity",
        &label,
        Status::Info,
        Some(props.distance.value),
        None,
        format!(
            "‖M − I‖_F = {:.4} ({}), largest rotation angle {:.3}° ({})",
            props.distance.value, props.distance.method, props.angle.value, props.angle.method
        ),
    );
    let (smin, smax) = match &t.scale {
        Some(s) if !s.is_empty() => {
            let lo = s.iter().fold(f32::INFINITY, |a, &b| a.min(b)) as f64;
            let hi = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            ctx.push(
                "scale-range",
                &label,
                Status::Info,
                Some(hi),
                None,
                format!("per-row scale in [{lo:.4}, {hi:.4}]"),
            );
            (Some(lo), Some(hi))
        }
        _ => (None, None),
    };

    let mut energy = None;
    if let Some(base) = base {
        match base.get(&t.name) {
            None => ctx.push(
                "target-present",
                &label,
                Status::Fail,
                None,
                None,
                format!(
                    "module {} targets {} which the base lacks",
                    t.module, t.name
                ),
            ),
            Some((file, info)) => {
                ctx.push(
                    "target-present",
                    &label,
                    Status::Pass,
                    None,
                    None,
                    "present in the base",
                );
                match t.check_base(info.dtype, &info.shape) {
                    Err(e) => ctx.push(
                        "base-compatible",
                        &label,
                        Status::Fail,
                        None,
                        None,
                        e.message,
                    ),
                    Ok(()) => {
                        ctx.push(
                            "base-compatible",
                            &label,
                            Status::Pass,
                            None,
                            None,
                            format!("{} {:?}", info.dtype.name(), info.shape),
                        );
                        if t.side == Side::Input && ctx.settings.wants("hyperspherical-energy") {
                            let chain = t.chain(false)?;
                            let e =
                                hyperspherical(&chain, info.dtype, &info.shape, file.data(info));
                            ctx.bound(
                                "hyperspherical-energy",
                                &label,
                                e.rel_diff,
                                1e-4,
                                &format!(
                                    "relative change of the energy of {} sampled neurons",
                                    e.rows_sampled
                                ),
                            );
                            energy = Some(e);
                        }
                    }
                }
            }
        }
    }

    Ok(TargetReport {
        target: t.name.clone(),
        module: t.module.clone(),
        side: t.side,
        factors: nf,
        blocks: d,
        block_size: h,
        n,
        block_kind: t.kind,
        block_orthogonality: worst,
        negative_determinants: negative,
        transform_orthogonality: props.orth,
        reach,
        dof,
        distance_from_identity: props.distance,
        max_angle_deg: props.angle,
        scale_min: smin,
        scale_max: smax,
        hyperspherical_energy: energy,
    })
}

/// The chain of one diagonal block when every factor of `chain` repeats one shared block over
/// the whole diagonal without permuting (PEFT OFT `block_share`).
fn one_shared_block(chain: &Chain) -> Option<Chain> {
    let f0 = chain.factors.first()?;
    let shared = chain
        .factors
        .iter()
        .all(|f| f.d > 1 && f.d == f0.d && f.repeat + 1 == f.d && f.perm.is_none());
    shared.then(|| {
        let mut one = chain.clone();
        one.n = f0.h;
        for f in &mut one.factors {
            f.d = 1;
            f.repeat = 0;
        }
        one
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::{Factor, ScaleOn};

    #[test]
    fn one_shared_block_measures_as_the_whole_diagonal() {
        let (h, d) = (4usize, 5usize);
        let block = |s: f32| -> Vec<f32> {
            (0..h * h)
                .map(|i| if i % (h + 1) == 0 { 1.0 } else { 0.0 } + s * ((i * 7 % 5) as f32 - 2.0))
                .collect()
        };
        let chain = |repeat: usize, perm: Option<Vec<u32>>| Chain {
            n: h * d,
            factors: [0.05f32, -0.03]
                .iter()
                .map(|&s| Factor {
                    h,
                    d,
                    blocks: (0..d - repeat).flat_map(|_| block(s)).collect(),
                    repeat,
                    perm: perm.clone(),
                })
                .collect(),
            scale: None,
            scale_on: ScaleOn::Vector,
            scale_first: false,
            blend: 1.0,
        };
        let full = chain(d - 1, None);
        let one = one_shared_block(&full).expect("shared without permutations");
        assert_eq!(one.n, h);
        // n = 20 is measured exactly, as is the block.
        let a = transform_properties(&full, 8, DENSE_MAX);
        let b = transform_properties(&one, 8, DENSE_MAX);
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(1.0);
        assert!(
            close(a.orth.value, b.orth.value),
            "{} {}",
            a.orth.value,
            b.orth.value
        );
        assert!(
            close(a.angle.value, b.angle.value),
            "{} {}",
            a.angle.value,
            b.angle.value
        );
        let scaled = b.distance.value * (d as f64).sqrt();
        assert!(
            close(a.distance.value, scaled),
            "{} {scaled}",
            a.distance.value
        );
        // A permutation or blocks of their own (a crop's tail) keep the whole chain.
        let swap: Vec<u32> = (0..(h * d) as u32).rev().collect();
        assert!(one_shared_block(&chain(d - 1, Some(swap))).is_none());
        assert!(one_shared_block(&chain(d - 2, None)).is_none());
        assert!(one_shared_block(&chain(0, None)).is_none());
    }
}
