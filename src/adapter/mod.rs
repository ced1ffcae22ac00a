//! The canonical adapter model: what every importer produces and the only thing the merge engine
//! and the verifier see. docs/FORMAT.md specifies its on-disk form (`canonical.rs`).

pub mod canonical;
pub mod compose;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::checkpoint::Dtype;
use crate::error::{Class, Error, Result};
use crate::math::blocks;
use crate::math::kernel::{Chain, Factor, ScaleOn};

/// Which axis of the (2-D flattened) weight the transform mixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    #[default]
    /// Columns: every weight row x becomes `M x` (`W' = W · Mᵀ`). PEFT BOFT, PEFT OFT ≥ 0.14.
    Input,
    /// Rows: every weight column x becomes `M x` (`W' = M · W`). LyCORIS, kohya, PEFT OFT ≤ 0.13.
    Output,
}

/// How the blocks were made, which says how orthogonal they are expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockKind {
    #[default]
    /// An exact Cayley transform: orthogonal, determinant +1.
    Cayley,
    /// A truncated Neumann series of a Cayley transform: only approximately orthogonal.
    Neumann,
    /// A rotation cropped to a non-multiple of its block size: not orthogonal.
    Cropped,
    /// Stored as finished matrices by the source; nothing is promised.
    Raw,
}

/// Blocks an importer computes on demand. A merge holds one target's blocks at a time this way,
/// so its memory does not grow with the adapter; `Adapter::materialise` computes them all.
#[derive(Clone)]
pub struct Deferred {
    /// Called with the base tensor's dtype once the target is fitted to a base (some sources
    /// compute their blocks in the model's dtype), else None.
    pub compute: Arc<dyn Fn(Option<Dtype>) -> Result<Vec<f32>> + Send + Sync>,
    /// The file the blocks come from, for messages.
    pub path: std::path::PathBuf,
    /// The base tensor's dtype handed to `compute`, once the target is fitted to a base.
    pub base_dtype: Option<Dtype>,
}

impl std::fmt::Debug for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deferred(..)")
    }
}

/// One weight the adapter transforms. `Default` gives an input-side Cayley target with nothing
/// set, for importers to fill in.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// Name of the base tensor (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// The adapter module this came from, for messages.
    pub module: String,
    /// Which axis the transform rotates.
    pub side: Side,
    /// Expected base shape when known (always known after resolving against a base).
    pub shape: Option<Vec<usize>>,
    /// Output side only: transform rows `start..end` (a slice of a fused weight); None = all.
    pub rows: Option<(usize, usize)>,
    /// Number of factors in the chain (butterfly depth; 1 for OFT).
    pub factors: usize,
    /// Blocks per factor (0 until fitted, for shared blocks).
    pub blocks: usize,
    /// Size of each square block.
    pub block_size: usize,
    /// `factors × stored × block_size × block_size` (see `stored`), the materialised blocks,
    /// f32; empty while `deferred` is set.
    pub data: Vec<f32>,
    /// How to compute `data` when it is not materialised yet.
    pub deferred: Option<Deferred>,
    /// One gather permutation per factor; None for the identity.
    pub perms: Vec<Option<Vec<u32>>>,
    /// Per output row scale applied after the transform.
    pub scale: Option<Vec<f32>>,
    /// How the blocks were made, which decides how exactly they must be orthogonal.
    pub kind: BlockKind,
    /// `data` holds one block per factor, repeated over the whole diagonal (PEFT `block_share`).
    /// It is never expanded: the kernel applies the one block at every position. `blocks` is 0
    /// until the target is fitted to its base tensor.
    pub share: bool,
    /// The rotated axis is shorter than `blocks × block_size`: the block-diagonal matrix is
    /// cropped to this size (PEFT OFT ≤ 0.13 when r does not divide the output features).
    pub crop: Option<usize>,
    /// The source crops when the axis is shorter (set by importers; `fit` sets `crop`).
    pub croppable: bool,
    /// The base tensor's buffer read as a `(rows, cols)` matrix instead of `(out, rest)`, and the
    /// scale multiplying that matrix's columns (output side only). PEFT ≤ 0.13 merged Conv2d
    /// BOFT layers this way: the raw `(out, C, kh, kw)` buffer as `(C·kh·kw, out)`.
    pub view: Option<(usize, usize)>,
    /// Where this target sits in the sequence of transforms its tensor undergoes: targets of one
    /// tensor apply in increasing stage order, those of one stage together (one input-side target,
    /// or output-side row slices). Every reader but the canonical one writes stage 0; a composed
    /// adapter (`boft-convert --compose`) numbers its parts' stages after one another.
    pub stage: u32,
}

/// A tensor that replaces a base tensor outright (PEFT `modules_to_save`, trained biases).
#[derive(Debug, Clone)]
pub struct Replacement {
    /// Name of the base tensor it replaces.
    pub name: String,
    /// Dtype of `data`.
    pub dtype: Dtype,
    /// Shape; must equal the base tensor's.
    pub shape: Vec<usize>,
    /// Little-endian element bytes.
    pub data: Vec<u8>,
}

/// An adapter in the canonical model: what every reader produces and everything else consumes.
#[derive(Debug, Clone, Default)]
pub struct Adapter {
    /// The weights it rotates.
    pub targets: Vec<Target>,
    /// The weights it replaces outright.
    pub replacements: Vec<Replacement>,
    /// Which reader made it (e.g. `peft-boft`, `lycoris-diag-oft`).
    pub source_format: String,
    /// The source library's version when the files say (empty otherwise).
    pub source_version: String,
    /// File name (relative to the source) → hex sha256.
    pub source_sha256: BTreeMap<String, String>,
}

impl Target {
    /// Length of the rotated axis.
    pub fn n(&self) -> usize {
        self.blocks * self.block_size
    }

    /// Blocks stored per factor: `blocks`, or 1 for shared blocks.
    pub fn stored(&self) -> usize {
        if self.share {
            1
        } else {
            self.blocks
        }
    }

    /// Block `k` of factor `f` (`k` a position on the diagonal; every position of shared blocks
    /// is the one stored block); the target must be materialised.
    pub fn block(&self, f: usize, k: usize) -> &[f32] {
        let hh = self.block_size * self.block_size;
        let i = (f * self.stored() + if self.share { 0 } else { k }) * hh;
        &self.data[i..i + hh]
    }

    /// A display name: the tensor plus its row slice, if any.
    pub fn label(&self) -> String {
        match self.rows {
            Some((a, b)) => format!("{}[{a}:{b}]", self.name),
            None => self.name.clone(),
        }
    }

    /// Check that the target's fields fit together (docs/FORMAT.md, "Invariants"): everything
    /// that can be said without the base tensor. `Adapter::validate` adds the rules between the
    /// targets of one tensor; `check_base` the facts only the base knows.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Error::bare(Class::BadAdapter, format!("{}: {m}", self.label()));
        if self.factors == 0 || (self.blocks == 0 && !self.share) || self.block_size == 0 {
            return Err(bad(
                "empty transform (zero factors, blocks or block size)".into()
            ));
        }
        // Sizes come from files: every product used later must fit.
        let hh = self.block_size.checked_mul(self.block_size);
        let n = self.blocks.checked_mul(self.block_size);
        let len = hh.and_then(|hh| hh.checked_mul(self.stored())?.checked_mul(self.factors));
        if n.is_none() || len.is_none() {
            return Err(bad(format!(
                "geometry overflows ({} factors × {} blocks of {})",
                self.factors, self.blocks, self.block_size
            )));
        }
        // Shared blocks are stored once, so their count is a bare number (PEFT OFT ≤ 0.13 takes
        // it from the config's `r`): without a base to vouch for the axis, work along it for
        // every factor (verify's probes and reach, a crop's own blocks) would not be backed by
        // any bytes of the input.
        if self.share && self.n().saturating_mul(self.factors) > MAX_SHARED_AXIS {
            return Err(bad(format!(
                "{} factors of {} shared blocks of {} span {} features each, past the \
                 {MAX_SHARED_AXIS} limit on factors × features",
                self.factors,
                self.blocks,
                self.block_size,
                self.n()
            )));
        }
        if self.block_size > MAX_BLOCK_SIZE {
            // Computing, checking or inverting a block costs block_size³ operations against
            // block_size² stored values: without a cap, time per byte of input would grow
            // without bound.
            return Err(bad(format!(
                "block size {} exceeds the {MAX_BLOCK_SIZE} limit (the work per block grows \
                 with the cube of its size)",
                self.block_size
            )));
        }
        if self.factors > MAX_FACTORS {
            // Every factor is applied to every row of the base: the merge's work is the base
            // times the factor count, which must not be a number from a file alone.
            return Err(bad(format!(
                "{} factors exceed the {MAX_FACTORS} limit (each is applied to every row of the \
                 base)",
                self.factors
            )));
        }
        if let Some(c) = self.crop {
            // The engine pads the columns of an output-side transform with zeros; input-side
            // rows are read at the tensor's own length, so a crop there would misread them.
            if self.side != Side::Output {
                return Err(bad(format!(
                    "crop {c} on an input-side target (only output-side transforms are cropped)"
                )));
            }
            if c == 0 || c > self.n() || self.perms.iter().any(Option::is_some) {
                return Err(bad(format!("crop {c} does not fit n = {}", self.n())));
            }
            // The engine works along all n: a crop keeping less than half of it would let a
            // number in a file (shared blocks' count) multiply the work on a short axis. PEFT
            // crops fewer features than it has blocks, so n < 2·crop whenever the axis holds at
            // least one feature per block.
            if c.saturating_mul(2) <= self.n() {
                return Err(bad(format!(
                    "crop {c} keeps less than half of n = {}",
                    self.n()
                )));
            }
            if c < self.n() && self.kind == BlockKind::Cayley {
                return Err(bad(format!(
                    "crop {c} of n = {} with block_kind cayley: cropped blocks are not \
                     orthogonal (block_kind cropped)",
                    self.n()
                )));
            }
        }
        if let Some((r, c)) = self.view {
            if self.side != Side::Output {
                return Err(bad(format!(
                    "a ({r}, {c}) view on an input-side target (views are output-side only)"
                )));
            }
            if r == 0 || c == 0 || r.checked_mul(c).is_none() {
                return Err(bad(format!("a ({r}, {c}) view is empty or overflows")));
            }
        }
        if self.deferred.is_none() {
            self.check_data(&self.data)?;
        }
        if self.perms.len() != self.factors {
            return Err(bad(format!(
                "{} permutations for {} factors",
                self.perms.len(),
                self.factors
            )));
        }
        // No source permutes shared blocks (PEFT's block_share is plain OFT), and unpermuted
        // they are measured once instead of at every position (verify's `shared_properties`).
        let permuted = |p: &Vec<u32>| !crate::math::perm::is_identity(p);
        if self.share && self.perms.iter().flatten().any(permuted) {
            return Err(bad("shared blocks (block_share) with a permutation".into()));
        }
        for (i, p) in self.perms.iter().enumerate() {
            if let Some(p) = p {
                if p.len() != self.n() || !crate::math::perm::is_permutation(p) {
                    return Err(bad(format!(
                        "factor {i}: gather index is not a permutation of 0..{}",
                        self.n()
                    )));
                }
            }
        }
        if let Some(s) = &self.scale {
            if let Some(i) = s.iter().position(|x| !x.is_finite()) {
                return Err(Error::bare(
                    Class::NonFinite,
                    format!("{}: scale value #{i} is {} (NaN/Inf)", self.label(), s[i]),
                ));
            }
            // A view's scale multiplies its columns; otherwise an output-side scale multiplies
            // the rows the transform covers. An input-side one has the base's row count, which
            // `check_base` checks (as it checks the recorded `shape`).
            let want = match (self.side, self.view) {
                (_, Some((_, c))) => Some(c),
                (Side::Output, None) => Some(self.axis()),
                (Side::Input, None) => None,
            };
            if let Some(w) = want.filter(|&w| w != s.len()) {
                return Err(bad(format!("{} scale values for {w}", s.len())));
            }
        }
        if let Some((a, b)) = self.rows {
            if self.side != Side::Output {
                return Err(bad(format!(
                    "row slice {a}:{b} on an input-side target (slices are output-side only)"
                )));
            }
            if a >= b || b - a != self.axis() {
                return Err(bad(format!(
                    "row slice {a}:{b} does not fit n = {}",
                    self.axis()
                )));
            }
        }
        Ok(())
    }

    fn param_len(&self) -> usize {
        self.factors * self.stored() * self.block_size * self.block_size
    }

    /// Length of the axis the transform acts on (the crop, if any).
    pub fn axis(&self) -> usize {
        self.crop.unwrap_or_else(|| self.n())
    }

    /// Fit a target to its base tensor's shape: the block count of shared blocks and the crop of
    /// cropped ones follow from the length of the rotated axis.
    pub fn fit(&mut self, dtype: Dtype, shape: &[usize]) -> Result<()> {
        if let Some(d) = &mut self.deferred {
            d.base_dtype = Some(dtype);
        }
        if shape.len() < 2 {
            return Ok(()); // check_base reports it
        }
        // The axis as `check_base` will measure it (a view changes the rows and columns).
        let (rows, cols) = self
            .view
            .unwrap_or_else(|| (shape[0], shape[1..].iter().product()));
        let axis = match (self.side, self.rows) {
            (Side::Input, _) => cols,
            (Side::Output, None) => rows,
            (Side::Output, Some((a, b))) => b.saturating_sub(a),
        };
        if self.share && self.blocks == 0 {
            if axis == 0 || axis % self.block_size != 0 {
                return Err(Error::bare(
                    Class::ShapeMismatch,
                    format!(
                        "{} (from {}): a shared block of size {} does not tile the {axis} \
                         features of the base",
                        self.label(),
                        self.module,
                        self.block_size
                    ),
                ));
            }
            self.blocks = axis / self.block_size;
        }
        if self.croppable && axis < self.n() && axis + self.blocks > self.n() {
            self.crop = Some(axis);
            self.kind = BlockKind::Cropped;
        }
        Ok(())
    }

    /// Check block values: as many as the geometry needs, all finite.
    fn check_data(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.param_len() {
            return Err(Error::bare(
                Class::BadAdapter,
                format!(
                    "{}: {} block values, geometry needs {}",
                    self.label(),
                    data.len(),
                    self.param_len()
                ),
            ));
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::bare(
                Class::NonFinite,
                format!(
                    "{}: block value #{i} is {} (NaN/Inf)",
                    self.label(),
                    data[i]
                ),
            ));
        }
        Ok(())
    }

    /// The stored block values (one per factor for shared blocks), computing deferred ones
    /// (checked, not kept).
    pub fn blocks_data(&self) -> Result<Cow<'_, [f32]>> {
        Ok(match &self.deferred {
            None => Cow::Borrowed(&self.data[..]),
            Some(d) => {
                let v = (d.compute)(d.base_dtype).map_err(|e| e.at(&d.path))?;
                self.check_data(&v).map_err(|e| e.at(&d.path))?;
                Cow::Owned(v)
            }
        })
    }

    /// Compute deferred blocks and keep them (shared blocks stay one per factor).
    pub fn materialise(&mut self) -> Result<()> {
        // Computing blocks can take long (Cayley solves): a signal ends it between targets.
        crate::output::check_interrupted()?;
        if self.deferred.is_some() {
            self.data = self.blocks_data()?.into_owned();
            self.deferred = None;
        }
        Ok(())
    }

    /// Write shared blocks out at every position (for exports, whose formats cannot say that one
    /// block serves them all). `budget` is what may still be expanded, in values; it shrinks by
    /// what this target takes, and a target past it is refused.
    pub fn expand_shared(&mut self, budget: &mut usize) -> Result<()> {
        if !self.share || self.blocks == 0 {
            return Ok(());
        }
        self.materialise()?;
        let hh = self.block_size * self.block_size;
        let len = hh
            .checked_mul(self.blocks)
            .and_then(|v| v.checked_mul(self.factors))
            .filter(|&len| len <= *budget)
            .ok_or_else(|| {
                Error::bare(
                    Class::NotExportable,
                    format!(
                        "{}: {} shared blocks of {} written out at every position would take the \
                         export past {MAX_EXPORT_EXPANSION} values (the formats an export writes \
                         cannot say block_share; merge directly, or convert to canonical, which \
                         keeps them shared)",
                        self.label(),
                        self.blocks,
                        self.block_size
                    ),
                )
            })?;
        *budget -= len;
        let mut v = Vec::with_capacity(len);
        for f in 0..self.factors {
            for _ in 0..self.blocks {
                v.extend_from_slice(&self.data[f * hh..(f + 1) * hh]);
            }
        }
        self.data = v;
        self.share = false;
        Ok(())
    }

    /// Check against the base tensor's shape and dtype.
    pub fn check_base(&self, dtype: Dtype, shape: &[usize]) -> Result<()> {
        let mism = |m: String| {
            Error::bare(
                Class::ShapeMismatch,
                format!("{} (from {}): {m}", self.label(), self.module),
            )
        };
        if dtype.float_size().is_none() {
            return Err(Error::bare(
                Class::UnsupportedDtype,
                format!(
                    "{}: base tensor is {}, only F32, F16 and BF16 weights can be transformed",
                    self.name,
                    dtype.name()
                ),
            ));
        }
        if shape.len() < 2 {
            return Err(mism(format!(
                "base tensor has shape {shape:?}, expected a matrix or conv kernel"
            )));
        }
        if let Some(s) = &self.shape {
            if s.as_slice() != shape {
                return Err(mism(format!(
                    "adapter was made for shape {s:?}, base has {shape:?}"
                )));
            }
        }
        let (rows, cols) = match self.view {
            Some((r, c)) => {
                let numel: usize = shape.iter().product();
                if r.checked_mul(c) != Some(numel) {
                    return Err(mism(format!(
                        "a ({r}, {c}) view does not fit a base tensor of shape {shape:?}"
                    )));
                }
                (r, c)
            }
            None => (shape[0], shape[1..].iter().product()),
        };
        let n = match (self.side, self.rows) {
            (Side::Input, _) => cols,
            (Side::Output, None) => rows,
            (Side::Output, Some((a, b))) => {
                if b > rows {
                    return Err(mism(format!(
                        "row slice {a}:{b} past the {rows} rows of the base"
                    )));
                }
                b - a
            }
        };
        if n != self.axis() {
            return Err(mism(format!(
                "transform covers {} = {} blocks × {}, base {} side is {n}",
                self.axis(),
                self.blocks,
                self.block_size,
                if self.side == Side::Input {
                    "input"
                } else {
                    "output"
                }
            )));
        }
        if let Some(s) = &self.scale {
            let want = match (self.rows, self.view) {
                (_, Some(_)) => cols,
                (Some((a, b)), _) => b - a,
                (None, None) => rows,
            };
            if s.len() != want {
                return Err(mism(format!("{} scale values for {want}", s.len())));
            }
        }
        Ok(())
    }

    /// The kernel chain that merges (or, with `inverse`, un-merges) this target.
    pub fn chain(&self, inverse: bool) -> Result<Chain> {
        self.chain_at(inverse, Strength::FULL)
    }

    /// The chain at a strength (see `Strength`); with `inverse`, the chain that undoes it.
    pub fn chain_at(&self, inverse: bool, strength: Strength) -> Result<Chain> {
        let (h, d) = (self.block_size, self.blocks);
        let t = strength.t;
        let partial = t != 1.0;
        if partial && inverse && strength.mode == StrengthMode::Linear {
            return Err(Error::bare(
                Class::Usage,
                format!(
                    "{}: a linear-strength merge (W + t·(F(W) − W), t ≠ 1) has no structured \
                     inverse; un-merge with the strength mode it was merged with (per-factor or \
                     geodesic) or at strength 1",
                    self.label()
                ),
            ));
        }
        let hh = h * h;
        let mut data = self.blocks_data()?;
        // The positions the chain acts on: all D, or with a crop those the axis reaches.
        let mut d = d;
        // Shared blocks stay one per factor: the kernel's `repeat` serves every position.
        let mut repeat = if self.share { d.saturating_sub(1) } else { 0 };
        if let Some(axis) = self.crop.filter(|&a| a < self.n()) {
            // Cropping keeps the leading axis×axis part of the block diagonal, acting on vectors
            // padded with zeros whose entries past the axis are dropped. Blocks wholly past the
            // axis are left out (the chain ends at the last block the axis reaches, so its work
            // follows the axis, not D); in the block the axis ends inside, the cropped rows and
            // columns become the identity, which crops exactly and stays invertible for the
            // un-merge.
            let used = axis.div_ceil(h);
            let split = axis % h != 0;
            let stored = self.stored();
            // Per factor: the first `used` blocks, or the one shared block and a copy of it for
            // the block the axis ends inside.
            let keep = if self.share {
                1 + usize::from(split && used > 1)
            } else {
                used
            };
            let mut v = Vec::with_capacity(self.factors * keep * hh);
            for own in data.chunks_exact(stored * hh) {
                if self.share {
                    (0..keep).for_each(|_| v.extend_from_slice(&own[..hh]));
                } else {
                    v.extend_from_slice(&own[..used * hh]);
                }
            }
            if split {
                for f in 0..self.factors {
                    let b = &mut v[(f * keep + keep - 1) * hh..(f * keep + keep) * hh];
                    for li in axis % h..h {
                        for j in 0..h {
                            b[li * h + j] = 0.0;
                            b[j * h + li] = 0.0;
                        }
                        b[li * h + li] = 1.0;
                    }
                }
            }
            data = Cow::Owned(v);
            repeat = used - keep;
            d = used;
        }
        let per = d - repeat;
        // Where stored block `j` of a factor first sits on the diagonal (for messages).
        let position = |j: usize| if j == 0 { 0 } else { j + repeat };
        if partial && strength.mode != StrengthMode::Linear {
            self.strengthen(data.to_mut(), per, strength, &position)?;
        }
        // Transposing inverts exactly orthogonal blocks; interpolated ones need a solve.
        let orthogonal = self.kind == BlockKind::Cayley
            && !(partial && strength.mode == StrengthMode::PerFactor);
        let mut factors: Vec<Factor> = (0..self.factors)
            .map(|f| Factor {
                h,
                d,
                blocks: data[f * per * hh..(f + 1) * per * hh].to_vec(),
                repeat,
                perm: self.perms[f]
                    .clone()
                    .filter(|p| !crate::math::perm::is_identity(p)),
            })
            .collect();
        let mut scale = self.scale_at(strength)?;
        if inverse {
            factors.reverse();
            for (fi, f) in factors.iter_mut().enumerate() {
                let mut inv = Vec::with_capacity(f.blocks.len());
                for (j, q) in f.blocks.chunks_exact(hh).enumerate() {
                    // An exact Cayley block is orthogonal: its transpose is its inverse (to the
                    // f32 rounding of the stored values), at a fraction of the cost of a solve.
                    // `block_kind` is the file's word for it; the block itself decides.
                    if orthogonal && blocks::orth_error(h, q) <= TRANSPOSE_ORTH_TOL {
                        inv.extend(blocks::transpose(h, q));
                        continue;
                    }
                    let b = blocks::inverse(h, q).ok_or_else(|| {
                        Error::bare(
                            Class::BadAdapter,
                            format!(
                                "{}: block {} of factor {} is singular, cannot un-merge",
                                self.label(),
                                position(j),
                                self.factors - 1 - fi
                            ),
                        )
                    })?;
                    inv.extend_from_slice(&b);
                }
                f.blocks = inv;
            }
            if let Some(s) = &mut scale {
                if let Some(i) = s.iter().position(|&x| x == 0.0) {
                    return Err(Error::bare(
                        Class::BadAdapter,
                        format!("{}: scale of row {i} is 0, cannot un-merge", self.label()),
                    ));
                }
                s.iter_mut().for_each(|x| *x = 1.0 / *x);
            }
        }
        Ok(Chain {
            n: d * h,
            factors,
            scale,
            scale_on: match (self.side, self.view) {
                (Side::Input, _) | (Side::Output, Some(_)) => ScaleOn::Vector,
                (Side::Output, None) => ScaleOn::Component,
            },
            scale_first: inverse,
            blend: if strength.mode == StrengthMode::Linear {
                t as f32
            } else {
                1.0
            },
        })
    }

    /// Blocks `v` (factor-major, `per` stored a factor) at a per-factor or geodesic strength;
    /// `position(j)` is where stored block `j` first sits on the diagonal, for messages.
    fn strengthen(
        &self,
        v: &mut [f32],
        per: usize,
        strength: Strength,
        position: &dyn Fn(usize) -> usize,
    ) -> Result<()> {
        let (h, t) = (self.block_size, strength.t);
        for (k, b) in v.chunks_exact_mut(h * h).enumerate() {
            match strength.mode {
                StrengthMode::PerFactor => {
                    b.iter_mut().for_each(|x| *x *= t as f32);
                    for i in 0..h {
                        b[i * h + i] += (1.0 - t) as f32;
                    }
                }
                _ => {
                    if blocks::orth_error(h, b) > GEODESIC_ORTH_TOL {
                        return Err(Error::bare(
                            Class::BadAdapter,
                            format!(
                                "{}: block {} of factor {} is not orthogonal ({} blocks); \
                                 --strength-mode geodesic needs rotations",
                                self.label(),
                                position(k % per),
                                k / per,
                                self.kind_name()
                            ),
                        ));
                    }
                    let p = blocks::orthogonal_power(h, b, t).ok_or_else(|| {
                        Error::bare(
                            Class::BadAdapter,
                            format!(
                                "{}: block {} of factor {} turns some direction by 180°: no \
                                 unique geodesic to scale",
                                self.label(),
                                position(k % per),
                                k / per
                            ),
                        )
                    })?;
                    b.copy_from_slice(&p);
                }
            }
        }
        Ok(())
    }

    /// The per-row scale at a strength: `sᵗ` for a geodesic one, else as stored.
    fn scale_at(&self, strength: Strength) -> Result<Option<Vec<f32>>> {
        let mut scale = self.scale.clone();
        if let (Some(s), true) = (
            &mut scale,
            strength.t != 1.0 && strength.mode == StrengthMode::Geodesic,
        ) {
            if let Some(i) = s.iter().position(|&x| x <= 0.0) {
                return Err(Error::bare(
                    Class::BadAdapter,
                    format!(
                        "{}: scale of row {i} is {} (not positive): --strength-mode geodesic \
                         scales it to s^t",
                        self.label(),
                        s[i]
                    ),
                ));
            }
            let t = strength.t as f32;
            s.iter_mut().for_each(|x| *x = x.powf(t));
        }
        Ok(scale)
    }

    /// This target with a per-factor or geodesic strength baked into its blocks and scale, so
    /// that applying it at full strength equals applying this one at `strength`. A linear
    /// strength other than 1 is a blend, not a chain, and is refused; so is a geodesic one on a
    /// cropped target (the power of a cropped block is not the cropped power).
    pub fn at_strength(&self, strength: Strength) -> Result<Target> {
        let mut t = self.clone();
        if strength.t == 1.0 {
            return Ok(t);
        }
        let bad = |m: &str| Error::bare(Class::Usage, format!("{}: {m}", self.label()));
        match strength.mode {
            StrengthMode::Linear => {
                return Err(bad(
                    "a linear strength other than 1 (W + t·(F(W) − W)) blends the weight with \
                     its transform: it is not a chain of factors and cannot be composed (use \
                     mode=per-factor or mode=geodesic)",
                ))
            }
            StrengthMode::Geodesic if self.crop.is_some_and(|c| c < self.n()) => {
                return Err(bad(
                    "a geodesic strength of a cropped transform is not a chain of factors",
                ))
            }
            _ => {}
        }
        t.materialise()?;
        let per = t.stored();
        let share = t.share;
        self.strengthen(&mut t.data, per, strength, &|j| if share { 0 } else { j })?;
        t.scale = self.scale_at(strength)?;
        if strength.mode == StrengthMode::PerFactor {
            // t·B + (1 − t)·I is no longer orthogonal.
            t.kind = BlockKind::Raw;
        }
        Ok(t)
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            BlockKind::Cayley => "Cayley",
            BlockKind::Neumann => "truncated Neumann series",
            BlockKind::Cropped => "cropped",
            BlockKind::Raw => "raw",
        }
    }
}

/// The rules between the targets of one base tensor. They apply stage by stage (`Target::stage`);
/// within a stage, one input-side target alone, or output-side transforms of disjoint row ranges
/// that all read the tensor through the same view (the engine transposes the tensor once, with
/// one column count). A target without `rows` covers every row, so it stands alone in its stage
/// too. The factors applied to a row, summed over the stages, are at most `MAX_FACTORS`: every
/// stage is applied to the whole tensor, and their number is a number from a file.
pub fn check_tensor(name: &str, targets: &[&Target]) -> Result<()> {
    let bad = |m: String| Error::bare(Class::BadAdapter, format!("{name}: {m}"));
    if targets.len() < 2 {
        return Ok(());
    }
    let mut by_stage: BTreeMap<u32, Vec<&Target>> = BTreeMap::new();
    for t in targets {
        by_stage.entry(t.stage).or_default().push(t);
    }
    let mut depth = 0usize;
    for stage in by_stage.values() {
        check_stage(name, stage)?;
        depth += stage.iter().map(|t| t.factors).max().unwrap_or(0);
    }
    if depth > MAX_FACTORS {
        return Err(bad(format!(
            "{} stages chain {depth} factors, past the {MAX_FACTORS} limit (each is applied to \
             every row of the base)",
            by_stage.len()
        )));
    }
    Ok(())
}

/// The rules between the targets of one stage of a tensor (`check_tensor`).
fn check_stage(name: &str, targets: &[&Target]) -> Result<()> {
    let bad = |m: String| Error::bare(Class::BadAdapter, format!("{name}: {m}"));
    if targets.len() < 2 {
        return Ok(());
    }
    if let Some(t) = targets.iter().find(|t| t.side == Side::Input) {
        return Err(bad(format!(
            "targeted {} times, with an input-side transform ({}): an input-side target must be \
             the tensor's only one",
            targets.len(),
            t.label()
        )));
    }
    if let Some(t) = targets.iter().find(|t| t.rows.is_none()) {
        return Err(bad(format!(
            "targeted {} times, and {} (from {}) covers every row: the other row slices overlap it",
            targets.len(),
            t.label(),
            t.module
        )));
    }
    let v0 = targets[0].view;
    if let Some(t) = targets.iter().find(|t| t.view != v0) {
        let show = |v: Option<(usize, usize)>| match v {
            Some((r, c)) => format!("a ({r}, {c}) view"),
            None => "no view".to_string(),
        };
        return Err(bad(format!(
            "row slices disagree on view: {} has {}, {} has {}",
            targets[0].label(),
            show(v0),
            t.label(),
            show(t.view)
        )));
    }
    let mut ranges: Vec<(usize, usize)> = targets.iter().filter_map(|t| t.rows).collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "row slices {}:{} and {}:{} overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
    }
    Ok(())
}

/// A block this close to orthogonal (`max |BᵀB − I|`) is inverted by its transpose on un-merging
/// (docs/FORMAT.md, "Semantics"); any other by an LU solve.
const TRANSPOSE_ORTH_TOL: f64 = 1e-6;

/// Shared blocks (`block_share`) span at most this many features, summed over their factors
/// (PEFT's have one factor, and the widest real Linear layers, a 256K-token vocabulary's head,
/// reach it): one stored block repeated `r` times, `r` from a config, is not bounded by the
/// file's bytes, and verify's probes take 128 bytes a feature (32 MiB here).
pub const MAX_SHARED_AXIS: usize = 1 << 18;

/// An export writes shared blocks out at every position, at most this many values in all
/// (256 MiB of f32): the formats it writes cannot say `block_share`.
pub const MAX_EXPORT_EXPANSION: usize = 1 << 26;

/// The largest block size an adapter may use. Real files use 2 to a few hundred (PEFT OFT ≤ 0.13
/// with its default `r = 8` blocks reaches 3584 on a 70B model's widest layer); the cap bounds
/// the cubic per-block work (docs/ERRORS.md, `bad-adapter`).
pub const MAX_BLOCK_SIZE: usize = 4096;

/// The most factors a target may chain. A butterfly needs log2(D) + 1 (PEFT BOFT and LyCORIS
/// use a handful); the cap bounds the work per row of the base, which every factor is applied
/// to, and leaves room for chains composed from several adapters.
pub const MAX_FACTORS: usize = 64;

/// Blocks must be this close to orthogonal (`max |BᵀB − I|`) for a geodesic strength.
const GEODESIC_ORTH_TOL: f64 = 1e-5;

/// How `--strength t` scales an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrengthMode {
    /// `W + t·(F(W) − W)`, F the whole adapter (A1111, kohya, sd-scripts).
    Linear,
    /// Every block B becomes `t·B + (1 − t)·I` before it is applied; per-row scales apply in
    /// full (LyCORIS's multiplier; for diag-oft without rescale the same as linear).
    PerFactor,
    /// Every block becomes `Bᵗ` (exactly orthogonal at every t, `B^½·B^½ = B`), scales `sᵗ`.
    Geodesic,
}

/// How strongly to apply an adapter: `--strength` and `--strength-mode`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strength {
    /// The strength; 1 applies the adapter as trained.
    pub t: f64,
    /// How a strength other than 1 is applied.
    pub mode: StrengthMode,
}

impl Strength {
    /// The adapter as trained.
    pub const FULL: Strength = Strength {
        t: 1.0,
        mode: StrengthMode::Linear,
    };
}

impl Adapter {
    /// Check that the adapter's fields fit together (docs/FORMAT.md, "Invariants"): every
    /// target (`Target::validate`), the targets of each tensor together (`check_tensor`), and
    /// replacements against targets. Every reader's output passes here (`formats::open`), and
    /// again once names are resolved against a base (`merge::fit_in`), where two source names may
    /// have become one tensor.
    pub fn validate(&self) -> Result<()> {
        let mut by_tensor: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
        for t in &self.targets {
            t.validate()?;
            by_tensor.entry(t.name.as_str()).or_default().push(t);
        }
        for (name, targets) in &by_tensor {
            check_tensor(name, targets)?;
        }
        let mut replaced = std::collections::BTreeSet::new();
        for r in &self.replacements {
            if !replaced.insert(r.name.as_str()) {
                return Err(Error::bare(
                    Class::BadAdapter,
                    format!("{} is replaced twice", r.name),
                ));
            }
            if by_tensor.contains_key(r.name.as_str()) {
                return Err(Error::bare(
                    Class::BadAdapter,
                    format!("{} is both transformed and replaced", r.name),
                ));
            }
        }
        Ok(())
    }

    /// Total number of stored block parameters (what the summary calls "parameters").
    pub fn parameter_count(&self) -> usize {
        self.targets
            .iter()
            .map(|t| t.param_len() + t.scale.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Compute every deferred target's blocks (in parallel) and check them.
    pub fn materialise(&mut self) -> Result<()> {
        use rayon::prelude::*;
        self.targets
            .par_iter_mut()
            .try_for_each(Target::materialise)
    }
}
