//! Export's shared gate: a canonical adapter goes back out in a library's own format exactly or
//! not at all (`formats::peft::export`, `formats::lycoris::export` write the files).
//!
//! Every block must be an exact Cayley transform (`block_kind: cayley`): the generator is found
//! with the inverse Cayley map, and the library's own map of the stored f32 generator is checked
//! to give the block back. Everything else (Neumann series, cropped or raw blocks, a block with an
//! eigenvalue −1, a geometry or permutation the library cannot express, the other rotated side)
//! is refused with one line saying why: nothing is approximated. docs/EXPORT.md has the details.

use std::collections::BTreeMap;

use crate::adapter::{Adapter, BlockKind, Target};
use crate::error::{Class, Error, Result};
use crate::math::cayley;

pub(super) use crate::checkpoint::OwnedTensor as Tensor;

/// Largest difference allowed between a block and the library's map of the exported generator.
const BLOCK_TOL: f64 = 1e-5;

/// What an export wrote, for the summary line.
#[derive(Debug, Clone)]
pub struct Exported {
    /// `PEFT BOFT`, `PEFT OFT`, `LyCORIS diag-oft`, `LyCORIS boft`, `LyCORIS diag-oft + boft`.
    pub kind: String,
    /// Targets written.
    pub targets: usize,
    /// Replaced tensors written.
    pub replaced: usize,
}

pub(super) fn refuse(t: &Target, why: impl std::fmt::Display) -> Error {
    let label = t.label();
    let from = if t.module.is_empty() || label.starts_with(&t.module) {
        String::new()
    } else {
        format!(" (from {})", t.module)
    };
    Error::bare(Class::NotExportable, format!("{label}{from}: {why}"))
}

/// The adapter with every block computed (shared blocks written out at every position, within
/// `MAX_EXPORT_EXPANSION`), every target checked to be an exact Cayley rotation that stands
/// alone.
pub(super) fn prepare(adapter: &Adapter) -> Result<Adapter> {
    check_views(adapter)?;
    check_stages(adapter)?;
    let mut a = adapter.clone();
    a.materialise()?;
    for t in &a.targets {
        if t.share && t.blocks == 0 {
            return Err(refuse(
                t,
                "shared blocks (block_share) need the base to know how many there are; pass --base",
            ));
        }
        match t.kind {
            BlockKind::Cayley => {}
            BlockKind::Neumann => {
                return Err(refuse(
                    t,
                    "blocks are a truncated Neumann series, not an exact Cayley transform: no \
                     generator reproduces them exactly, so there is no exact export",
                ))
            }
            BlockKind::Cropped => {
                return Err(refuse(
                    t,
                    "blocks are cropped to a non-multiple of the block size (not orthogonal): no \
                     exact export",
                ))
            }
            BlockKind::Raw => {
                return Err(refuse(
                    t,
                    "blocks are raw matrices with no known generator: no exact export",
                ))
            }
        }
        if t.crop.is_some() {
            return Err(refuse(t, "the rotation is cropped: no exact export"));
        }
        if t.croppable && t.shape.is_none() {
            return Err(refuse(
                t,
                "the source crops the rotation when the base is shorter than the blocks; pass \
                 --base so the export can check it is not cropped",
            ));
        }
    }
    if a.targets.is_empty() {
        return Err(Error::bare(
            Class::NotExportable,
            "the adapter transforms no tensor: nothing to export",
        ));
    }
    let mut budget = crate::adapter::MAX_EXPORT_EXPANSION;
    for t in &mut a.targets {
        t.expand_shared(&mut budget)?;
    }
    Ok(a)
}

/// A tensor transformed in several stages (a composed adapter whose parts did not fuse into one
/// chain): PEFT and LyCORIS hold one transform per module.
fn check_stages(adapter: &Adapter) -> Result<()> {
    let mut first: BTreeMap<&str, u32> = BTreeMap::new();
    for t in &adapter.targets {
        if *first.entry(t.name.as_str()).or_insert(t.stage) != t.stage {
            return Err(refuse(
                t,
                "the composed adapter transforms this tensor in several stages that do not make \
                 one chain (docs/COMPOSE.md); PEFT and LyCORIS hold one transform per module: \
                 no exact export (merge it, or keep it canonical)",
            ));
        }
    }
    Ok(())
}

/// Targets no library merges the way the canonical model says, whatever the side.
pub(super) fn check_views(adapter: &Adapter) -> Result<()> {
    match adapter.targets.iter().find(|t| t.view.is_some()) {
        Some(t) => Err(refuse(
            t,
            "PEFT ≤ 0.13 merged this Conv2d layer by reinterpreting the kernel buffer, which \
             PEFT 0.21 and LyCORIS do not do: no exact export",
        )),
        None => Ok(()),
    }
}

/// Which Cayley convention the library applies to the stored generator.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Map {
    /// `C−(S) = (I − S)(I + S)⁻¹` (PEFT; also LyCORIS diag-oft, whose merge uses `C+(Q)ᵀ`).
    Minus,
    /// `C+(S) = (I + S)(I − S)⁻¹` (LyCORIS boft multiplies by it directly).
    Plus,
}

/// `generator`, remembering the last block solved: shared blocks written out at every position
/// (`Target::expand_shared`) are solved once, not once per copy. Each block is also a point to
/// answer a signal at, since solving one costs b³.
#[derive(Default)]
pub(super) struct Generators {
    last: Option<(Map, Vec<f32>, Vec<f32>)>,
}

impl Generators {
    /// The generator of block `k` of factor `f` (see `generator`).
    pub(super) fn get(&mut self, t: &Target, f: usize, k: usize, map: Map) -> Result<Vec<f32>> {
        crate::output::check_interrupted()?;
        let q = t.block(f, k);
        if let Some((m, b, s)) = &self.last {
            let same = b.iter().zip(q).all(|(x, y)| x.to_bits() == y.to_bits());
            if *m == map && b.len() == q.len() && same {
                return Ok(s.clone());
            }
        }
        let s = generator(t, f, k, map)?;
        self.last = Some((map, q.to_vec(), s.clone()));
        Ok(s)
    }
}

/// The skew generator S (f32, row-major) with `map(S) = q`, checked by mapping the rounded S back.
pub(super) fn generator(t: &Target, f: usize, k: usize, map: Map) -> Result<Vec<f32>> {
    let h = t.block_size;
    let q: Vec<f64> = t.block(f, k).iter().map(|&x| x as f64).collect();
    let s = cayley::inverse_cayley_minus(h, &q).ok_or_else(|| {
        refuse(
            t,
            format!(
                "block {k} of factor {f} has an eigenvalue −1 (a rotation by π), which no Cayley \
                 generator reaches: no exact export"
            ),
        )
    })?;
    // The stored block is orthogonal to f32 rounding: keep the skew part of its generator.
    let sign = if map == Map::Minus { 1.0 } else { -1.0 };
    let s32: Vec<f32> = (0..h * h)
        .map(|i| (sign * 0.5 * (s[i] - s[(i % h) * h + i / h])) as f32)
        .collect();
    let s64: Vec<f64> = s32.iter().map(|&x| x as f64).collect();
    let back = match map {
        Map::Minus => cayley::cayley_minus(h, &s64),
        Map::Plus => cayley::cayley_plus(h, &s64),
    };
    let err = back
        .iter()
        .zip(&q)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    if err.is_nan() || err > BLOCK_TOL {
        return Err(refuse(
            t,
            format!(
                "block {k} of factor {f} is too close to a rotation by π: its generator does not \
                 reproduce it in f32 (error {err:.1e}), no exact export"
            ),
        ));
    }
    Ok(s32)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(super) fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> Tensor {
    Tensor {
        dtype: safetensors::Dtype::F32,
        shape,
        data: f32_bytes(v),
    }
}

pub(super) fn serialize(
    tensors: &BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    crate::checkpoint::serialize(tensors, meta.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::adapter::Side;
    use crate::checkpoint::{Dtype, SafeFile};
    use crate::formats::lycoris::export::lycoris_bytes;
    use crate::formats::peft::export::peft_bytes;

    fn rot(h: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        let a: Vec<f64> = (0..h * h)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.4
            })
            .collect();
        cayley::cayley_minus(h, &cayley::skew_half(h, &a))
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    /// A one-target adapter read from canonical bytes (independent of `Target`'s fields).
    fn target(h: usize, d: usize, kind: BlockKind, side: Side) -> Target {
        let mut data = Vec::new();
        for k in 0..d {
            data.extend(rot(h, k as u64 + 1));
        }
        let meta = json!([{
            "key": "m.weight", "target": "m.weight", "module": "m", "side": side,
            "shape": null, "rows": null, "factors": 1, "blocks": d, "block_size": h,
            "block_kind": kind, "permuted": false, "scaled": false,
        }]);
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "m.weight::blocks".to_string(),
            f32_tensor(vec![1, d, h, h], &data),
        );
        let md = BTreeMap::from([
            ("format".to_string(), "boft-canonical".to_string()),
            ("format_version".to_string(), "1".to_string()),
            ("source_format".to_string(), "test".to_string()),
            ("source_version".to_string(), String::new()),
            ("source_sha256".to_string(), "{}".to_string()),
            ("targets".to_string(), meta.to_string()),
            ("replacements".to_string(), "[]".to_string()),
            ("writer".to_string(), "test".to_string()),
        ]);
        let bytes = serialize(&tensors, md).unwrap();
        let f = SafeFile::from_bytes("test.safetensors", bytes).unwrap();
        let mut a = crate::adapter::canonical::from_file(f).unwrap();
        a.targets.remove(0)
    }

    #[test]
    fn generators_reproduce_their_blocks_in_both_conventions() {
        let t = target(4, 2, BlockKind::Cayley, Side::Input);
        for k in 0..2 {
            let s = generator(&t, 0, k, Map::Minus).unwrap();
            let q = cayley::cayley_minus(4, &s.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(q
                .iter()
                .zip(t.block(0, k))
                .all(|(a, &b)| (a - b as f64).abs() < 1e-6));
            let s = generator(&t, 0, k, Map::Plus).unwrap();
            let q = cayley::cayley_plus(4, &s.iter().map(|&x| x as f64).collect::<Vec<_>>());
            assert!(q
                .iter()
                .zip(t.block(0, k))
                .all(|(a, &b)| (a - b as f64).abs() < 1e-6));
        }
    }

    #[test]
    fn rotation_by_pi_is_refused() {
        let mut t = target(2, 1, BlockKind::Cayley, Side::Input);
        t.data = vec![-1.0, 0.0, 0.0, -1.0];
        let e = generator(&t, 0, 0, Map::Minus).unwrap_err();
        assert_eq!(e.class, Class::NotExportable);
    }

    #[test]
    fn sides_and_kinds_are_refused() {
        let a = |t: Target| Adapter {
            targets: vec![t],
            ..Default::default()
        };
        let none = BTreeSet::new();
        let e = peft_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Output)), &none).unwrap_err();
        assert!(e.message.contains("output-side"), "{e}");
        let e = peft_bytes(&a(target(4, 2, BlockKind::Neumann, Side::Input)), &none).unwrap_err();
        assert!(e.message.contains("Neumann"), "{e}");
        let e = lycoris_bytes(&a(target(4, 4, BlockKind::Cayley, Side::Input))).unwrap_err();
        assert!(e.message.contains("input-side"), "{e}");
        // diag-oft: LyCORIS needs at least as many blocks as the block size.
        let e = lycoris_bytes(&a(target(3, 2, BlockKind::Cayley, Side::Output))).unwrap_err();
        assert!(e.message.contains("fit neither"), "{e}");
        // 2 blocks of 4: LyCORIS boft, stage 0 conjugated, stage 1 the identity.
        assert!(
            lycoris_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Output)))
                .unwrap()
                .1
                .contains("boft")
        );
        assert!(lycoris_bytes(&a(target(4, 4, BlockKind::Cayley, Side::Output))).is_ok());
        assert!(peft_bytes(&a(target(4, 2, BlockKind::Cayley, Side::Input)), &none).is_ok());
    }

    #[test]
    fn replacements_cannot_go_into_a_lycoris_file() {
        let a = Adapter {
            targets: vec![target(4, 4, BlockKind::Cayley, Side::Output)],
            replacements: vec![crate::adapter::Replacement {
                name: "m.bias".into(),
                dtype: Dtype::F32,
                shape: vec![1],
                data: vec![0; 4],
            }],
            ..Default::default()
        };
        let e = lycoris_bytes(&a).unwrap_err();
        assert!(e.message.contains("outright"), "{e}");
    }

    #[test]
    fn lycoris_perm_matches_the_reference_example() {
        assert_eq!(crate::math::perm::lycoris_boft(4, 4, 0), vec![0, 2, 1, 3]);
    }
}
