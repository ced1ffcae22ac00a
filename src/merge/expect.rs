//! The two questions a checker asks of a plan, answered with the same code the merge runs: what
//! happens to a base tensor, and the f32 values a transformed tensor gets before they are
//! rounded to its dtype. boft-verify proves merged and restored checkpoints with these alone.

use crate::adapter::Replacement;
use crate::checkpoint::{dtype, TensorInfo};
use crate::error::Result;
use crate::math::kernel::Scratch;

use super::{columns_f32, rows_chunked, Action, Backend, Built, CpuBackend, Plan};

/// What a plan does to one base tensor.
pub enum Fate<'a> {
    /// Copied byte for byte.
    Untouched,
    /// Transformed by the adapter's rotations (`Plan::expected_f32` gives the values).
    Transformed,
    /// Overwritten by the adapter's own tensor (`modules_to_save`, a trained bias).
    Replaced(&'a Replacement),
}

impl Plan<'_> {
    /// What this plan does to the base tensor called `name`.
    pub fn fate(&self, name: &str) -> Fate<'_> {
        match self.action(name) {
            None => Fate::Untouched,
            Some(Action::Replace(r)) => Fate::Replaced(r),
            Some(_) => Fate::Transformed,
        }
    }

    /// The f32 values this plan gives the transformed tensor `t` (whose bytes are `src`), before
    /// rounding to its dtype, on the CPU backend. With `then`, instead: `then`'s values for the
    /// tensor as this plan writes it (rounded to its dtype), which is what an `--unmerge` of the
    /// merged checkpoint computes. The values reach `sink` as pieces `(first flat index, values)`,
    /// in parallel and in no particular order, so that memory stays bounded for input-side
    /// tensors. `t` must be `Fate::Transformed` in both plans.
    pub fn expected_f32(
        &self,
        t: &TensorInfo,
        src: &[u8],
        then: Option<&Plan>,
        sink: impl Fn(usize, &[f32]) + Sync,
    ) -> Result<()> {
        let action = self.action(&t.name).expect("a transformed tensor");
        let dt = t.dtype;
        let never = || false;
        let inv = then.map(|p| p.build(p.action(&t.name).expect("same targets")));
        match (self.build(action)?, inv.transpose()?) {
            (Built::Rows(chain), None) => {
                let n = chain.n;
                rows_chunked(t, src, &chain, &CpuBackend, &never, |r0, x, _| {
                    sink(r0 * n, x);
                    Ok(())
                })?;
            }
            (Built::Rows(chain), Some(Built::Rows(back))) => {
                // Round F(W) to the dtype, then apply F⁻¹, as boft-merge --unmerge does.
                let n = chain.n;
                rows_chunked(t, src, &chain, &CpuBackend, &never, |r0, x, _| {
                    let mut y: Vec<f32> = x.iter().map(|&v| dtype::round_f32(dt, v)).collect();
                    let rows = y.len() / n;
                    CpuBackend.apply(&back, &mut y, r0, rows, &mut Scratch::default())?;
                    sink(r0 * n, &y);
                    Ok(())
                })?;
            }
            (Built::Columns(slices, cols), None) => {
                let w = columns_f32(t, src, &slices, cols, &CpuBackend)?;
                sink(0, &w);
            }
            (Built::Columns(slices, cols), Some(Built::Columns(back, bcols))) => {
                let w = columns_f32(t, src, &slices, cols, &CpuBackend)?;
                let mut bytes = vec![0u8; src.len()];
                dtype::encode_f32(dt, &w, &mut bytes);
                let y = columns_f32(t, &bytes, &back, bcols, &CpuBackend)?;
                sink(0, &y);
            }
            _ => unreachable!("merge and un-merge plans build the same kinds"),
        }
        Ok(())
    }
}
