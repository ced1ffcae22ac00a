//! A second, independent implementation of the kernel on candle-core's CPU device
//! (`--device candle-cpu`): gather by index_select, one batched matmul per factor over all
//! blocks, scatter by the inverse index. The test suite holds the native kernel to it; the GPU
//! path is `cuda.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use super::backend::Backend;
use super::device_plan::fingerprint;
use crate::error::{Class, Error, Result};
use crate::math::kernel::{Chain, ScaleOn, Scratch};

/// A chain's factors uploaded once and reused for every batch of its tensor.
struct Prepared {
    /// Per factor: blocks transposed, shape (d, h, h), and the gather/scatter indices.
    factors: Vec<(Tensor, Option<(Tensor, Tensor)>)>,
    scale: Option<Tensor>,
}

/// Device timings, collected when `BOFT_DEVICE_STATS` is set (scripts/device-check.sh reads them).
#[derive(Default)]
struct Stats {
    elements: u64,
    factor_elements: u64,
    upload_s: f64,
    compute_s: f64,
    download_s: f64,
}

/// The candle backend: the kernel's factors as candle tensors on one device.
pub struct CandleBackend {
    device: Device,
    label: String,
    stats: Option<Mutex<Stats>>,
    /// Uploaded chains by content hash: a tensor's batches share one upload.
    cache: Mutex<HashMap<u64, Arc<Prepared>>>,
}

fn stats_enabled() -> Option<Mutex<Stats>> {
    std::env::var_os("BOFT_DEVICE_STATS").map(|_| Mutex::new(Stats::default()))
}

fn ce(e: candle_core::Error) -> Error {
    // candle appends a backtrace to its messages; the contract is one line.
    let msg = e.to_string();
    Error::bare(
        Class::Io,
        format!("candle: {}", msg.lines().next().unwrap_or("")),
    )
}

impl CandleBackend {
    /// candle's CPU device.
    pub fn cpu() -> Self {
        CandleBackend {
            device: Device::Cpu,
            label: "candle-cpu".into(),
            stats: stats_enabled(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn prepare(&self, chain: &Chain) -> Result<Arc<Prepared>> {
        let key = fingerprint(chain);
        if let Some(p) = self.cache.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let dev = &self.device;
        let mut factors = Vec::with_capacity(chain.factors.len());
        for f in &chain.factors {
            let hh = f.h * f.h;
            let mut qt = Vec::with_capacity(f.blocks.len());
            for q in f.blocks.chunks_exact(hh) {
                qt.extend(crate::math::blocks::transpose(f.h, q));
            }
            let stored = f.blocks.len() / hh;
            let mut blocks = Tensor::from_vec(qt, (stored, f.h, f.h), dev).map_err(ce)?;
            if stored != f.d {
                // Shared blocks: the device writes them out for its batched product; the host
                // never does.
                let at: Vec<u32> = (0..f.d)
                    .map(|k| k.saturating_sub(f.repeat) as u32)
                    .collect();
                let at = Tensor::from_vec(at, f.d, dev).map_err(ce)?;
                blocks = blocks.index_select(&at, 0).map_err(ce)?;
            }
            let idx = match &f.perm {
                Some(p) => {
                    let inv = crate::math::perm::invert(p);
                    Some((
                        Tensor::from_vec(p.clone(), p.len(), dev).map_err(ce)?,
                        Tensor::from_vec(inv, p.len(), dev).map_err(ce)?,
                    ))
                }
                None => None,
            };
            factors.push((blocks, idx));
        }
        let scale = match &chain.scale {
            Some(s) => Some(Tensor::from_slice(s, s.len(), dev).map_err(ce)?),
            None => None,
        };
        let p = Arc::new(Prepared { factors, scale });
        self.cache.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }

    fn run(
        &self,
        chain: &Chain,
        x: &[f32],
        row0: usize,
        rows: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let prep = self
            .prepare(chain)
            .map_err(|e| candle_core::Error::Msg(e.message))?;
        let n = chain.n;
        let timing = self.stats.is_some();
        let clock = std::time::Instant::now();
        let orig = Tensor::from_slice(x, (rows, n), &self.device)?;
        if timing {
            self.device.synchronize()?;
        }
        let uploaded = clock.elapsed().as_secs_f64();
        let apply_scale = |t: Tensor| -> candle_core::Result<Tensor> {
            match &prep.scale {
                None => Ok(t),
                Some(s) => match chain.scale_on {
                    ScaleOn::Vector => {
                        t.broadcast_mul(&s.narrow(0, row0, rows)?.reshape((rows, 1))?)
                    }
                    ScaleOn::Component => t.broadcast_mul(&s.reshape((1, n))?),
                },
            }
        };
        let mut t = orig.clone();
        if chain.scale_first {
            t = apply_scale(t)?;
        }
        for (f, (blocks, idx)) in chain.factors.iter().zip(&prep.factors) {
            let g = match idx {
                Some((gather, _)) => t.index_select(gather, 1)?,
                None => t,
            };
            // (rows, d·h) → (d, rows, h) so each block is one matmul of the batch.
            let g = g.reshape((rows, f.d, f.h))?.transpose(0, 1)?.contiguous()?;
            let y = g.matmul(blocks)?;
            let y = y.transpose(0, 1)?.contiguous()?.reshape((rows, n))?;
            t = match idx {
                Some((_, scatter)) => y.index_select(scatter, 1)?,
                None => y,
            };
        }
        if !chain.scale_first {
            t = apply_scale(t)?;
        }
        if chain.blend != 1.0 {
            t = ((&t - &orig)?.affine(chain.blend as f64, 0.0)? + &orig)?;
        }
        if timing {
            self.device.synchronize()?;
        }
        let computed = clock.elapsed().as_secs_f64();
        let out = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(st) = &self.stats {
            let mut st = st.lock().unwrap();
            st.elements += (rows * n) as u64;
            st.factor_elements += (rows * n * chain.factors.len()) as u64;
            st.upload_s += uploaded;
            st.compute_s += computed - uploaded;
            st.download_s += clock.elapsed().as_secs_f64() - computed;
        }
        Ok(out)
    }
}

impl Drop for CandleBackend {
    fn drop(&mut self) {
        // Summed over threads, so with overlapping batches these are busy times, not wall time.
        if let Some(st) = &self.stats {
            let st = st.lock().unwrap();
            let gb = st.elements as f64 * 8.0 / 1e9;
            eprintln!(
                "device-stats: device={} elements={} factor_elements={} upload_s={:.4} compute_s={:.4} download_s={:.4} min_traffic_gb={:.3} min_traffic_gbps={:.1}",
                self.label,
                st.elements,
                st.factor_elements,
                st.upload_s,
                st.compute_s,
                st.download_s,
                gb,
                gb / st.compute_s.max(1e-12)
            );
        }
    }
}

impl Backend for CandleBackend {
    fn apply(
        &self,
        chain: &Chain,
        x: &mut Vec<f32>,
        row0: usize,
        rows: usize,
        _s: &mut Scratch,
    ) -> Result<()> {
        let out = self.run(chain, x, row0, rows).map_err(ce)?;
        x.copy_from_slice(&out);
        Ok(())
    }

    fn chunk_elems(&self) -> usize {
        if self.device.is_cpu() {
            0
        } else {
            1 << 22
        }
    }

    fn name(&self) -> String {
        self.label.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::kernel::Factor;
    use crate::math::perm;

    fn rnd(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn candle_cpu_matches_native_kernel() {
        let mut seed = 17u64;
        let backend = CandleBackend::cpu();
        for (n, h, nf) in [(64usize, 8usize, 3usize), (48, 6, 2), (12, 12, 1)] {
            for (scale_on, scale_first, blend) in [
                (ScaleOn::Vector, false, 1.0f32),
                (ScaleOn::Component, true, 1.0),
                (ScaleOn::Vector, false, 0.5),
            ] {
                let d = n / h;
                let rows = 40;
                let slen = if scale_on == ScaleOn::Vector { rows } else { n };
                let chain = Chain {
                    n,
                    factors: (0..nf)
                        .map(|i| {
                            // The last factor shares its first block over half the diagonal.
                            let repeat = if i + 1 == nf { d / 2 } else { 0 };
                            Factor {
                                h,
                                d,
                                blocks: (0..(d - repeat) * h * h).map(|_| rnd(&mut seed)).collect(),
                                repeat,
                                perm: (i > 0).then(|| perm::invert(&perm::peft_boft(n, h, i))),
                            }
                        })
                        .collect(),
                    scale: Some((0..slen).map(|_| 1.0 + rnd(&mut seed)).collect()),
                    scale_on,
                    scale_first,
                    blend,
                };
                let x0: Vec<f32> = (0..rows * n).map(|_| rnd(&mut seed)).collect();
                let mut a = x0.clone();
                chain.apply_rows(&mut a, 0, rows, &mut Scratch::default());
                let mut b = x0.clone();
                backend
                    .apply(&chain, &mut b, 0, rows, &mut Scratch::default())
                    .unwrap();
                let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * scale,
                        "{x} vs {y} (n={n}, h={h}, N={nf})"
                    );
                }
            }
        }
    }
}
