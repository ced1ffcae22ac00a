//! What every reader shares: checked float tensors, blocks solved in parallel, source hashes.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::checkpoint::{dtype, SafeFile, TensorInfo};
use crate::error::{err, Class, Result};
use crate::math::cayley;

/// Refuse a tensor that is not F32, F16 or BF16, or that holds NaN or ±Inf.
pub(crate) fn check_floats(path: &Path, f: &SafeFile, t: &TensorInfo) -> Result<()> {
    if t.dtype.float_size().is_none() {
        return Err(err(
            Class::UnsupportedDtype,
            path,
            format!(
                "{} is {}, expected F32, F16 or BF16",
                t.name,
                t.dtype.name()
            ),
        ));
    }
    if let Some((i, x)) = dtype::first_non_finite(t.dtype, f.data(t)) {
        return Err(err(
            Class::NonFinite,
            path,
            format!("{} holds {x} at element {i}", t.name),
        ));
    }
    Ok(())
}

/// A checked float tensor's values in f32.
pub(crate) fn floats(path: &Path, f: &SafeFile, t: &TensorInfo) -> Result<Vec<f32>> {
    check_floats(path, f, t)?;
    Ok(dtype::decode_any_f32(t.dtype, f.data(t)).expect("float"))
}

/// Compute every stored block of a tensor in parallel: `solve` maps one block's `per` source
/// values (f64) to its h×h block in f64, or None when that cannot be done in f64 (huge values from
/// a hostile file). Results are rounded once to f32.
pub(crate) fn solve_blocks(
    path: &Path,
    tensor: &str,
    input: &[f64],
    per: usize,
    solve: impl Fn(&[f64]) -> Option<Vec<f64>> + Sync,
) -> Result<Vec<f32>> {
    solve_groups(path, tensor, input, per, 1, |g| vec![solve(g)])
}

/// `solve_blocks` for blocks that are `C−(S)` of a generator: `skew` maps a block's `per` source
/// values to its h×h generator S, and the Cayley maps are solved `cayley::LANES` blocks at a
/// time (`try_cayley_minus_many`: the same bits as one at a time).
pub(crate) fn cayley_blocks(
    path: &Path,
    tensor: &str,
    input: &[f64],
    (per, h): (usize, usize),
    skew: impl Fn(&[f64]) -> Vec<f64> + Sync,
) -> Result<Vec<f32>> {
    solve_groups(path, tensor, input, per, cayley::LANES, |g| {
        let s: Vec<Vec<f64>> = g.chunks_exact(per).map(&skew).collect();
        let refs: Vec<&[f64]> = s.iter().map(Vec::as_slice).collect();
        cayley::try_cayley_minus_many(h, &refs)
    })
}

/// Groups of up to `group` blocks in parallel, each group's blocks solved by `solve` (one
/// result per block, in order).
fn solve_groups(
    path: &Path,
    tensor: &str,
    input: &[f64],
    per: usize,
    group: usize,
    solve: impl Fn(&[f64]) -> Vec<Option<Vec<f64>>> + Sync,
) -> Result<Vec<f32>> {
    use rayon::prelude::*;
    let input = &input[..input.len() / per * per];
    let solved: Vec<Option<Vec<f64>>> = input
        .par_chunks(per * group)
        .flat_map_iter(|g| {
            solve(g)
                .into_iter()
                .map(|q| q.filter(|q| q.iter().all(|x| x.is_finite())))
        })
        .collect();
    let mut data = Vec::with_capacity(solved.iter().map(|q| q.as_ref().map_or(0, Vec::len)).sum());
    for (k, q) in solved.into_iter().enumerate() {
        let q = q.ok_or_else(|| {
            let big = input[k * per..(k + 1) * per]
                .iter()
                .fold(0f64, |m, x| m.max(x.abs()));
            err(
                Class::BadAdapter,
                path,
                format!(
                    "{tensor}: the Cayley transform of block {k} cannot be computed in f64 \
                     (values too large; largest magnitude {big:e})"
                ),
            )
        })?;
        data.extend(q.iter().map(|&x| x as f32));
    }
    Ok(data)
}

/// The hash of bytes already read (never of the path again: it may name another file by now).
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}
