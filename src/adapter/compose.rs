//! Several adapters applied in order, as one adapter (`boft-convert --compose`, docs/COMPOSE.md).
//!
//! Orthogonal adapters compose exactly: each part's targets become later stages of the tensors
//! they transform (`Target::stage`), and two consecutive whole-tensor targets of one tensor that
//! share a geometry become one target whose chain is the first's factors followed by the
//! second's, scales multiplied. A linear blend at a strength other than 1 is not a chain and is
//! refused; so is a tensor one part replaces outright and a later one transforms.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Adapter, BlockKind, Side, Strength, Target, MAX_FACTORS};
use crate::error::{Class, Error, Result};
use crate::math::{blocks, perm};

/// `parts` (each adapter with the strength it is applied at and the file it came from, which
/// messages name) as one adapter: merging the result equals merging the parts in order. Target
/// names are matched as they are: resolve them against a base first (`merge::fit_in`) when the
/// parts name tensors differently.
pub fn compose(parts: &[(Adapter, Strength, PathBuf)]) -> Result<Adapter> {
    let at = |e: Error, p: &Path| if e.path.is_some() { e } else { e.at(p) };
    let last = parts.last().map(|p| p.2.as_path()).unwrap_or(Path::new(""));
    let mut out = compose_parts(parts, &at)?;
    fuse_stages(&mut out.targets).map_err(|e| at(e, last))?;
    out.validate().map_err(|e| at(e, last))?;
    Ok(out)
}

fn compose_parts(
    parts: &[(Adapter, Strength, PathBuf)],
    at: &dyn Fn(Error, &Path) -> Error,
) -> Result<Adapter> {
    let mut out = Adapter {
        source_format: "composed".into(),
        ..Adapter::default()
    };
    let mut formats = Vec::new();
    let mut offset: u32 = 0;
    for (i, (a, strength, path)) in parts.iter().enumerate() {
        formats.push(a.source_format.clone());
        for (name, hash) in &a.source_sha256 {
            out.source_sha256
                .insert(format!("{}/{name}", i + 1), hash.clone());
        }
        // A later transform of a tensor an earlier part replaced would need "replace, then
        // transform", which one adapter cannot say; a later replacement overwrites whatever
        // came before.
        if let Some(t) = a
            .targets
            .iter()
            .find(|t| out.replacements.iter().any(|r| r.name == t.name))
        {
            return Err(at(
                Error::bare(
                    Class::Usage,
                    format!(
                        "{}: replaced outright by an earlier adapter and transformed by adapter \
                         {}: one adapter cannot say both (merge them in one pass with boft-merge \
                         --adapter … --adapter … instead)",
                        t.name,
                        i + 1
                    ),
                ),
                path,
            ));
        }
        for r in &a.replacements {
            out.targets.retain(|t| t.name != r.name);
            out.replacements.retain(|x| x.name != r.name);
            out.replacements.push(r.clone());
        }
        let mut last = 0u32;
        for t in &a.targets {
            let mut t = t.at_strength(*strength).map_err(|e| at(e, path))?;
            t.stage = offset.checked_add(t.stage).ok_or_else(|| {
                let e = Error::bare(Class::BadAdapter, format!("{}: too many stages", t.label()));
                at(e, path)
            })?;
            last = last.max(t.stage);
            out.targets.push(t);
        }
        offset = last.checked_add(1).ok_or_else(|| {
            at(
                Error::bare(Class::BadAdapter, "too many stages to compose".to_string()),
                path,
            )
        })?;
    }
    out.source_format = format!("composed({})", formats.join(", "));
    Ok(out)
}

/// Make consecutive single-target stages of one tensor one target where the algebra allows
/// (`fusable`), in place; the order of everything else is kept.
fn fuse_stages(targets: &mut Vec<Target>) -> Result<()> {
    // Per tensor: its stages in order, each the indices of its targets.
    let mut by_tensor: BTreeMap<String, BTreeMap<u32, Vec<usize>>> = BTreeMap::new();
    for (i, t) in targets.iter().enumerate() {
        by_tensor
            .entry(t.name.clone())
            .or_default()
            .entry(t.stage)
            .or_default()
            .push(i);
    }
    let mut gone = vec![false; targets.len()];
    for stages in by_tensor.values() {
        let mut into: Option<usize> = None;
        for members in stages.values() {
            let &[j] = members.as_slice() else {
                into = None;
                continue;
            };
            match into {
                Some(i) if fusable(&targets[i], &targets[j]) => {
                    let next = std::mem::take(&mut targets[j]);
                    fuse(&mut targets[i], next)?;
                    gone[j] = true;
                }
                _ => into = Some(j),
            }
        }
    }
    let mut k = 0;
    targets.retain(|_| {
        k += 1;
        !gone[k - 1]
    });
    Ok(())
}

/// Whether `b` applied after `a` is one target: the same geometry on the same axis, whole
/// tensors (no row slices or crops, which do not compose as chains), and scales that commute
/// with the second chain (per vector; an output-side scale of the first multiplies components
/// the second chain then mixes).
fn fusable(a: &Target, b: &Target) -> bool {
    let geometry = a.side == b.side
        && a.block_size == b.block_size
        && a.blocks == b.blocks
        && a.share == b.share
        && a.view == b.view
        && a.rows.is_none()
        && b.rows.is_none()
        && a.factors + b.factors <= MAX_FACTORS;
    // A crop found only once the base is known would apply to the fused chain as a whole.
    let uncropped = |t: &Target| t.crop.is_none() && !(t.croppable && t.shape.is_none());
    let shapes = match (&a.shape, &b.shape) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    let scales = a.scale.is_none() || a.side == Side::Input || a.view.is_some();
    geometry && uncropped(a) && uncropped(b) && shapes && scales
}

/// `a` followed by `b` as one chain in `a` (`fusable` holds).
fn fuse(a: &mut Target, mut b: Target) -> Result<()> {
    a.materialise()?;
    b.materialise()?;
    let unpermuted = |p: &Option<Vec<u32>>| p.as_ref().is_none_or(|p| perm::is_identity(p));
    let (h, fa) = (a.block_size, a.factors);
    let per = a.stored() * h * h;
    if unpermuted(&a.perms[fa - 1]) && unpermuted(&b.perms[0]) {
        // Two block-diagonal factors of one geometry meeting without a permutation are one:
        // a's last folds into b's first. Two OFT adapters compose into one OFT adapter, which
        // an export can write.
        let keep = (fa - 1) * per;
        blocks::fold_after(h, &a.data[keep..], &mut b.data[..per]);
        a.data.truncate(keep);
        a.perms.pop();
        a.factors -= 1;
    }
    a.data.extend_from_slice(&b.data);
    a.perms.extend(b.perms);
    a.factors += b.factors;
    a.scale = match (a.scale.take(), b.scale) {
        (Some(x), Some(y)) => Some(x.iter().zip(&y).map(|(p, q)| p * q).collect()),
        (x, y) => x.or(y),
    };
    a.kind = match (a.kind, b.kind) {
        (BlockKind::Cayley, BlockKind::Cayley) => BlockKind::Cayley,
        (BlockKind::Raw, _) | (_, BlockKind::Raw) => BlockKind::Raw,
        _ => BlockKind::Neumann,
    };
    if a.shape.is_none() {
        a.shape = b.shape;
    }
    if a.module != b.module {
        a.module = format!("{} + {}", a.module, b.module);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::StrengthMode;
    use crate::math::kernel::apply_vec;

    /// A random orthogonal-ish target (raw blocks; what matters here is the algebra).
    fn target(side: Side, h: usize, d: usize, seed: u32, scale: bool) -> Target {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) - 0.5
        };
        let n = h * d;
        Target {
            name: "w".into(),
            module: format!("m{seed}"),
            side,
            factors: 1,
            blocks: d,
            block_size: h,
            data: (0..d * h * h).map(|_| next()).collect(),
            perms: vec![Some((0..n as u32).rev().collect())],
            scale: scale.then(|| (0..n).map(|_| 1.0 + next()).collect()),
            kind: BlockKind::Raw,
            ..Default::default()
        }
    }

    fn adapter(t: Target) -> Adapter {
        Adapter {
            targets: vec![t],
            source_format: "test".into(),
            ..Default::default()
        }
    }

    fn apply(targets: &[Target], v: &[f32]) -> Vec<f32> {
        let mut t: Vec<&Target> = targets.iter().collect();
        t.sort_by_key(|t| t.stage);
        t.iter().fold(v.to_vec(), |v, t| {
            let chain = t.chain(false).unwrap();
            // An output-side chain's scale is per component of the (column) vector: the same
            // vector arithmetic as `apply_vec` for one vector.
            apply_vec(&chain, &v)
        })
    }

    #[test]
    fn input_side_chains_fuse_with_scales_multiplied() {
        let (a, b) = (
            target(Side::Input, 2, 3, 1, false),
            target(Side::Input, 2, 3, 2, false),
        );
        let c = compose(&[
            (adapter(a.clone()), Strength::FULL, PathBuf::new()),
            (adapter(b.clone()), Strength::FULL, PathBuf::new()),
        ])
        .unwrap();
        assert_eq!(c.targets.len(), 1, "one fused target");
        assert_eq!(c.targets[0].factors, 2);
        let v: Vec<f32> = (0..6).map(|i| i as f32 * 0.3 - 0.7).collect();
        let want = apply(&[a, b], &v);
        let got = apply(&c.targets, &v);
        for (x, y) in want.iter().zip(&got) {
            assert!((x - y).abs() < 1e-6, "{want:?} vs {got:?}");
        }
    }

    #[test]
    fn unpermuted_block_diagonals_multiply_into_one_factor() {
        let mut a = target(Side::Output, 3, 2, 6, false);
        let mut b = target(Side::Output, 3, 2, 7, true);
        a.perms = vec![None];
        b.perms = vec![None];
        let c = compose(&[
            (adapter(a.clone()), Strength::FULL, PathBuf::new()),
            (adapter(b.clone()), Strength::FULL, PathBuf::new()),
        ])
        .unwrap();
        assert_eq!((c.targets.len(), c.targets[0].factors), (1, 1));
        let v: Vec<f32> = (0..6).map(|i| 0.5 - i as f32 * 0.2).collect();
        let (want, got) = (apply(&[a, b], &v), apply(&c.targets, &v));
        for (x, y) in want.iter().zip(&got) {
            assert!((x - y).abs() < 1e-6, "{want:?} vs {got:?}");
        }
    }

    #[test]
    fn output_side_scaled_first_stays_two_stages() {
        let (a, b) = (
            target(Side::Output, 2, 2, 3, true),
            target(Side::Output, 2, 2, 4, false),
        );
        let c = compose(&[
            (adapter(a), Strength::FULL, PathBuf::new()),
            (adapter(b), Strength::FULL, PathBuf::new()),
        ])
        .unwrap();
        assert_eq!(c.targets.len(), 2, "a per-component scale does not commute");
        assert_eq!((c.targets[0].stage, c.targets[1].stage), (0, 1));
    }

    #[test]
    fn linear_blend_is_refused_geodesic_is_baked() {
        let a = target(Side::Input, 2, 2, 5, false);
        let half = |mode| Strength { t: 0.5, mode };
        let e = compose(&[(
            adapter(a.clone()),
            half(StrengthMode::Linear),
            PathBuf::new(),
        )])
        .unwrap_err();
        assert_eq!(e.class, Class::Usage);
        assert!(e.message.contains("not a chain"), "{}", e.message);
        let c = compose(&[(adapter(a), half(StrengthMode::PerFactor), PathBuf::new())]).unwrap();
        assert_eq!(c.targets[0].kind, BlockKind::Raw);
    }
}
