//! The two questions a checker asks of a plan, answered with the same code the merge runs: what
//! happens to a base tensor, and the f32 values a transformed tensor gets before they are
//! rounded to its dtype. boft-verify proves merged and restored checkpoints with these alone.

use crate::adapter::Replacement;
use crate::checkpoint::{dtype, SafeFile, TensorInfo};
use crate::error::Result;
use crate::math::kernel::Scratch;

use super::apply::{apply_rows, rows_chunked, whole_f32, Source};
use super::{CpuBackend, Plan};

/// What a plan does to one base tensor.
pub enum Fate<'a> {
    /// Copied byte for byte.
    Untouched,
    /// Transformed by the adapters' rotations (`Plan::expected_f32` gives the values).
    Transformed,
    /// Overwritten by an adapter's own tensor (`modules_to_save`, a trained bias) and not
    /// transformed after that.
    Replaced(&'a Replacement),
}

impl Plan<'_> {
    /// What this plan does to the base tensor called `name`.
    pub fn fate(&self, name: &str) -> Fate<'_> {
        match self.action(name) {
            None => Fate::Untouched,
            Some(a) => match (a.start, a.groups.is_empty()) {
                (Some(r), true) => Fate::Replaced(r),
                _ => Fate::Transformed,
            },
        }
    }

    /// The f32 values this plan gives the transformed tensor `t` of file `f`, before
    /// rounding to its dtype, on the CPU backend. With `then`, instead: `then`'s values for the
    /// tensor as this plan writes it (rounded to its dtype), which is what an `--unmerge` of the
    /// merged checkpoint computes. The values reach `sink` as pieces `(first flat index, values)`,
    /// in parallel and in no particular order, so that memory stays bounded for input-side
    /// tensors. `t` must be `Fate::Transformed` in both plans.
    pub fn expected_f32(
        &self,
        f: &SafeFile,
        t: &TensorInfo,
        then: Option<&Plan>,
        sink: impl Fn(usize, &[f32]) + Sync,
    ) -> Result<()> {
        let built = self.build(self.action(&t.name).expect("a transformed tensor"))?;
        let back = then
            .map(|p| p.build(p.action(&t.name).expect("same targets")))
            .transpose()?;
        let dt = t.dtype;
        let never = || false;
        let src = f.data(t);
        if built.rows_only() && back.as_ref().is_none_or(|b| b.rows_only()) {
            let n: usize = t.shape[1..].iter().product();
            // Row chunks read as the merge reads them.
            rows_chunked(
                t,
                Source::of(f, t),
                built.groups(),
                &CpuBackend,
                &never,
                |r0, _, x, _| {
                    let Some(back) = &back else {
                        sink(r0 * n, x);
                        return Ok(());
                    };
                    // Round F(W) to the dtype, then apply F⁻¹, as boft-merge --unmerge does.
                    let mut y = x.to_vec();
                    dtype::round_slice(dt, &mut y);
                    let rows = y.len() / n;
                    let (mut scratch, mut orig) = (Scratch::default(), Vec::new());
                    apply_rows(
                        back.groups(),
                        &CpuBackend,
                        &mut y,
                        r0,
                        rows,
                        &mut scratch,
                        &mut orig,
                    )?;
                    sink(r0 * n, &y);
                    Ok(())
                },
            )?;
            return Ok(());
        }
        let w = whole_f32(t, src, &built, &CpuBackend)?;
        match back {
            None => sink(0, &w),
            Some(back) => {
                let mut bytes = vec![0u8; src.len()];
                dtype::encode_f32(dt, &w, &mut bytes);
                sink(0, &whole_f32(t, &bytes, &back, &CpuBackend)?);
            }
        }
        Ok(())
    }
}
