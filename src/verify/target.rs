//! The checks of one adapter target: its blocks, its composed transform, and (with a base) the
//! tensor it rotates.

use crate::adapter::{BlockKind, Side, Target};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::math::blocks;

use super::measure::{
    connectivity, degrees_of_freedom, hyperspherical, shared_properties, transform_properties,
};
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
    // Shared blocks are measured once, so that the work follows the bytes stored.
    let props = shared_properties(&m_chain, ctx.settings.probes, DENSE_MAX)
        .unwrap_or_else(|| transform_properties(&m_chain, ctx.settings.probes, DENSE_MAX));
    // The measures stop early on a signal; what they return then is not reported.
    crate::output::check_interrupted()?;
    ctx.bound(
        "transform-orthogonality",
        &label,
        props.orth.value,
        orth_tol * (nf as f64).max(1.0),
        &format!("composed M: max |MᵀM − I| ({})", props.orth.method),
    );

    crate::output::check_interrupted()?;
    let reach = connectivity(&m_chain);
    crate::output::check_interrupted()?;
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
