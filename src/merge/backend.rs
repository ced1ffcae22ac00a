//! Where the arithmetic runs. The planner and the streaming writer are shared; a backend only
//! transforms a batch of f32 vectors in place.

use crate::error::Result;
use crate::math::kernel::{Chain, Scratch};

pub trait Backend: Sync {
    /// Transform `rows` vectors of length `chain.n`, stored row-major in `x`; `row0` is the index
    /// of the first one (for per-vector scales).
    fn apply(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) -> Result<()>;

    /// Preferred number of elements per batch (devices want larger batches than caches do).
    fn chunk_elems(&self) -> usize {
        0
    }

    fn name(&self) -> String;
}

/// The native CPU kernel (structured block GEMMs), parallel over batches with rayon.
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn apply(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        chain.apply_rows(x, row0, rows, scratch);
        Ok(())
    }

    fn name(&self) -> String {
        "cpu".into()
    }
}
