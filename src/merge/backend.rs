//! Where the arithmetic runs. The planner and the streaming writer are shared; a backend only
//! transforms a batch of f32 vectors in place.

use std::sync::Arc;

use crate::checkpoint::{dtype, Dtype};
use crate::error::{Class, Error, Result};
use crate::math::kernel::{Chain, Scratch};

/// Where `apply_stored` gets a batch's stored bytes: it fills the buffer it is handed.
pub type Fill<'a> = &'a mut dyn FnMut(&mut [u8]) -> Result<()>;

/// Where `apply_stored` hands a finished batch: its stored input bytes, the result's bytes,
/// and whether a value the input held finite may have become NaN or ±Inf there.
pub type Emit<'a> = &'a mut dyn FnMut(&[u8], &[u8], bool) -> Result<()>;

/// Where the arithmetic runs (`--device`).
pub trait Backend: Send + Sync {
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

    /// `apply`, given the chain's transpose `mt` (`chain.transposed()`), with the same result: a
    /// backend that can read each block's operand from it skips transposing every block on
    /// every call. By default `mt` is not used.
    fn apply_given_transpose(
        &self,
        chain: &Chain,
        mt: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let _ = mt;
        self.apply(chain, x, row0, rows, scratch)
    }

    /// Transform the `t` columns of `x`, an `n × t` row-major tile (`n = chain.n`); column `c`
    /// is vector `col0 + c`. By default the tile is transposed into rows for `apply`.
    fn apply_cols(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        col0: usize,
        t: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let n = chain.n;
        let mut v = vec![0f32; n * t];
        for (i, row) in x.chunks_exact(t).enumerate() {
            for (c, &e) in row.iter().enumerate() {
                v[c * n + i] = e;
            }
        }
        self.apply(chain, &mut v, col0, t, scratch)?;
        for (i, row) in x.chunks_exact_mut(t).enumerate() {
            for (c, e) in row.iter_mut().enumerate() {
                *e = v[c * n + i];
            }
        }
        Ok(())
    }

    /// Preferred number of elements per batch (devices want larger batches than caches do).
    fn chunk_elems(&self) -> usize {
        0
    }

    /// Whether `apply_stored` should take rows stored as `dtype` through `chains`: a device
    /// that converts on its own side moves 16-bit data across the bus at half the bytes of f32,
    /// and leaves the host no conversion to do. By default, no.
    fn takes_stored(&self, chains: &[&Arc<Chain>], dtype: Dtype) -> bool {
        let _ = (chains, dtype);
        false
    }

    /// Rows `row0..row0 + rows` of vectors of length `chains[0].n`, stored as `dtype`, through
    /// every chain in turn in f32 and rounded to `dtype` once: `fill` writes the stored bytes
    /// into the buffer it is handed, and `emit` gets them back with the result's bytes. By
    /// default on the host through `apply` (and `emit` is told to check every value).
    fn apply_stored(
        &self,
        chains: &[&Arc<Chain>],
        dtype: Dtype,
        row0: usize,
        rows: usize,
        fill: Fill,
        emit: Emit,
    ) -> Result<()> {
        let esize = dtype.float_size().expect("a float dtype");
        let n = chains.first().map_or(0, |c| c.n);
        let mut stored = vec![0u8; rows * n * esize];
        fill(&mut stored)?;
        let mut x = vec![0f32; rows * n];
        dtype::decode_f32(dtype, &stored, &mut x);
        let mut scratch = Scratch::default();
        for c in chains {
            self.apply(c, &mut x, row0, rows, &mut scratch)?;
        }
        let mut out = vec![0u8; stored.len()];
        dtype::encode_f32(dtype, &x, &mut out);
        emit(&stored, &out, true)
    }

    /// The name the summary line prints.
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

    fn apply_given_transpose(
        &self,
        chain: &Chain,
        mt: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        chain.apply_rows_given_transpose(mt, x, row0, rows, scratch);
        Ok(())
    }

    fn apply_cols(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        col0: usize,
        t: usize,
        scratch: &mut Scratch,
    ) -> Result<()> {
        chain.apply_cols(x, col0, t, scratch);
        Ok(())
    }

    fn name(&self) -> String {
        "cpu".into()
    }
}

/// Where `--device` says to compute: `cpu`, `cuda[:N]`, or (feature `candle`) `candle-cpu`,
/// candle's CPU device, which runs the GPU code path in the normal test suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// The native CPU kernel.
    Cpu,
    /// `cuda` or `cuda:N`, as given (the ordinal is read when the device is opened).
    Cuda(String),
    /// candle's CPU device (the GPU code path, for tests).
    #[cfg(feature = "candle")]
    CandleCpu,
}

impl Device {
    /// The device a `--device` value names.
    pub fn parse(device: &str) -> Result<Device> {
        match device {
            "cpu" => Ok(Device::Cpu),
            d if d == "cuda" || d.starts_with("cuda:") => Ok(Device::Cuda(d.to_string())),
            #[cfg(feature = "candle")]
            "candle-cpu" => Ok(Device::CandleCpu),
            other => Err(Error::bare(
                Class::Usage,
                format!("unknown --device {other:?} (expected cpu or cuda[:N])"),
            )),
        }
    }

    /// Open the device: its backend.
    pub fn backend(&self) -> Result<Box<dyn Backend>> {
        match self {
            Device::Cpu => Ok(Box::new(CpuBackend)),
            Device::Cuda(d) => cuda_backend(d),
            #[cfg(feature = "candle")]
            Device::CandleCpu => Ok(Box::new(super::candle::CandleBackend::cpu())),
        }
    }
}

/// The CUDA backend when built with the `cuda` feature.
pub fn cuda_backend(device: &str) -> Result<Box<dyn Backend>> {
    #[cfg(feature = "cuda")]
    let opened: Result<Box<dyn Backend>> = Ok(Box::new(super::cuda::CudaBackend::open(device)?));
    #[cfg(not(feature = "cuda"))]
    let opened = Err(Error::bare(
        Class::NoDevice,
        format!(
            "--device {device}: this binary was built without CUDA support; rebuild with \
             `cargo build --release --features cuda` (see README)"
        ),
    ));
    opened
}
