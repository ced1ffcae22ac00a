//! Element types: the dtypes safetensors names, their sizes, and the f32 conversions the merge
//! and the checks use (decode, encode, rounding, finiteness).

use crate::error::{Class, Error, Result};

/// A function compiled for the widest vector features the CPU has (AVX-512 with BW, else AVX2,
/// else the baseline), chosen at each call. For loops too large to sit in a closure given to
/// `simd`: such a closure is compiled on its own, for the baseline, and does not vectorise.
/// Only for exact integer and IEEE operations, so that every form gives the same bits.
macro_rules! vectorised {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) -> $r:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) -> $r {
            #[inline(always)]
            fn inner($($a: $t),*) -> $r $body
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx2") {
                    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2")]
                    unsafe fn wide($($a: $t),*) -> $r {
                        inner($($a),*)
                    }
                    // SAFETY: the CPU has these features (checked above).
                    return unsafe { wide($($a),*) };
                }
                if has!("avx2") {
                    #[target_feature(enable = "avx2")]
                    unsafe fn narrow($($a: $t),*) -> $r {
                        inner($($a),*)
                    }
                    // SAFETY: as above.
                    return unsafe { narrow($($a),*) };
                }
            }
            inner($($a),*)
        }
    };
}
pub(crate) use vectorised;

/// Every element type the safetensors format names. Only F32/F16/BF16 can be transformed; the
/// rest pass through byte for byte, so they only need a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Booleans, one byte each.
    Bool,
    /// 8-bit unsigned integers.
    U8,
    /// 8-bit signed integers.
    I8,
    /// 8-bit floats, 5 exponent bits.
    F8E5M2,
    /// 8-bit floats, 4 exponent bits.
    F8E4M3,
    /// 8-bit scale factors (exponent only).
    F8E8M0,
    /// 4-bit floats, two per byte.
    F4,
    /// 6-bit floats, 2 exponent bits.
    F6E2M3,
    /// 6-bit floats, 3 exponent bits.
    F6E3M2,
    /// 16-bit signed integers.
    I16,
    /// 16-bit unsigned integers.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integers.
    I32,
    /// 32-bit unsigned integers.
    U32,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// 64-bit signed integers.
    I64,
    /// 64-bit unsigned integers.
    U64,
    /// Complex numbers, two f32.
    C64,
}

impl Dtype {
    /// The dtype a safetensors header names (`F32`, `BF16`, ...).
    pub fn parse(s: &str) -> Result<Dtype> {
        Ok(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "F4" => Dtype::F4,
            "F6_E2M3" => Dtype::F6E2M3,
            "F6_E3M2" => Dtype::F6E3M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "C64" => Dtype::C64,
            other => {
                return Err(Error::bare(
                    Class::UnknownDtype,
                    format!("unknown dtype {other:?}"),
                ))
            }
        })
    }

    /// The safetensors dtype a float dtype is written as: the one mapping between the two, used
    /// wherever this crate serialises tensors (adapter files only: F32, F16 and BF16 are all it
    /// writes). None for every other dtype.
    pub fn to_safetensors(self) -> Option<safetensors::Dtype> {
        Some(match self {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::F16 => safetensors::Dtype::F16,
            Dtype::BF16 => safetensors::Dtype::BF16,
            _ => return None,
        })
    }

    /// The name a safetensors header uses.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::C64 => "C64",
        }
    }

    /// Bits per element.
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 8,
            Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
        }
    }

    /// Bytes per element for the types the engine computes on.
    pub fn float_size(self) -> Option<usize> {
        match self {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            _ => None,
        }
    }

    /// Byte length of `numel` elements, or None when it overflows or is not a whole byte count.
    pub fn byte_len(self, numel: u64) -> Option<u64> {
        let bits = numel.checked_mul(self.bits())?;
        if bits % 8 != 0 {
            return None;
        }
        Some(bits / 8)
    }
}

/// Decode little-endian `dtype` bytes into f32. `dst.len()` elements are read.
pub fn decode_f32(dtype: Dtype, src: &[u8], dst: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::BF16 => simd(|| decode_bf16(src, dst)),
        Dtype::F16 => decode_f16(src, dst),
        _ => unreachable!("decode_f32 called on non-float dtype {:?}", dtype),
    }
}

vectorised! {
/// The largest magnitude of F32/F16/BF16 bytes as f32, NaN ignored (0 when there is none): what
/// decoding and folding `f32::max` over `|x|` gives, found on the bits (magnitudes of one float
/// type order as their bit patterns do), with no conversion per element.
pub fn max_magnitude(dtype: Dtype, src: &[u8]) -> f32 {
    {
        match dtype {
            Dtype::F32 => {
                f32::from_bits(lanes_max::<u32, 16>(src, 4, |c| {
                    let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7fff_ffff;
                    if b > 0x7f80_0000 {
                        0
                    } else {
                        b
                    }
                }))
            }
            Dtype::BF16 | Dtype::F16 => {
                let inf: u16 = if dtype == Dtype::BF16 { 0x7f80 } else { 0x7c00 };
                let m = lanes_max::<u16, 32>(src, 2, |c| {
                    let b = u16::from_le_bytes([c[0], c[1]]) & 0x7fff;
                    if b > inf {
                        0
                    } else {
                        b
                    }
                });
                let mut v = [0f32];
                decode_f32(dtype, &m.to_le_bytes(), &mut v);
                v[0]
            }
            _ => unreachable!("max_magnitude called on non-float dtype {:?}", dtype),
        }
    }
}
}

/// The largest `mag` of the `size`-byte elements of `src`: lane by lane over whole 64-byte
/// pieces (`L` lanes; a running maximum does not vectorise), then the lanes and the tail.
#[inline(always)]
fn lanes_max<T: Copy + Ord + Default, const L: usize>(
    src: &[u8],
    size: usize,
    mag: impl Fn(&[u8]) -> T,
) -> T {
    let pieces = src.chunks_exact(64);
    let tail = pieces
        .remainder()
        .chunks_exact(size)
        .map(&mag)
        .fold(T::default(), T::max);
    let mut lanes = [T::default(); L];
    for p in pieces {
        for (l, c) in lanes.iter_mut().zip(p.chunks_exact(size)) {
            *l = (*l).max(mag(c));
        }
    }
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// Encode f32 into little-endian `dtype` bytes, rounding to nearest-even once.
pub fn encode_f32(dtype: Dtype, src: &[f32], dst: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for (s, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
                c.copy_from_slice(&s.to_le_bytes());
            }
        }
        Dtype::BF16 => simd(|| encode_bf16(src, dst)),
        Dtype::F16 => encode_f16(src, dst),
        _ => unreachable!("encode_f32 called on non-float dtype {:?}", dtype),
    }
}

/// f16 → f32, eight at a time with F16C where the CPU has it (the `half` crate converts one
/// element per call: a third of an fp16 merge's CPU time). Exact either way.
fn decode_f16(src: &[u8], dst: &mut [f32]) {
    let len = dst.len().min(src.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX (checked above).
        done = unsafe { f16c::decode(&src[..len * 2], &mut dst[..len]) };
    }
    for (d, c) in dst[done..len]
        .iter_mut()
        .zip(src[done * 2..].chunks_exact(2))
    {
        *d = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

/// f32 → f16 with round-to-nearest-even, eight at a time with F16C where the CPU has it; the
/// same instruction `half` uses one element at a time, so the same bits.
fn encode_f16(src: &[f32], dst: &mut [u8]) {
    let len = src.len().min(dst.len() / 2);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX (checked above).
        done = unsafe { f16c::encode(&src[..len], &mut dst[..len * 2]) };
    }
    for (s, c) in src[done..len]
        .iter()
        .zip(dst[done * 2..].chunks_exact_mut(2))
    {
        c.copy_from_slice(&half::f16::from_f32(*s).to_bits().to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    /// Converts whole groups of eight; returns how many elements it converted.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn decode(src: &[u8], dst: &mut [f32]) -> usize {
        let groups = dst.len() / 8;
        for g in 0..groups {
            // Unaligned loads and stores: tensor data has no alignment guarantee.
            let h = _mm_loadu_si128(src.as_ptr().add(g * 16) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(g * 8), _mm256_cvtph_ps(h));
        }
        groups * 8
    }

    /// Converts whole groups of eight; returns how many elements it converted.
    #[target_feature(enable = "avx,f16c")]
    pub(super) unsafe fn encode(src: &[f32], dst: &mut [u8]) -> usize {
        let groups = src.len() / 8;
        for g in 0..groups {
            let v = _mm256_loadu_ps(src.as_ptr().add(g * 8));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(g * 16) as *mut __m128i, h);
        }
        groups * 8
    }
}

#[inline(always)]
fn decode_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
    }
}

#[inline(always)]
fn encode_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
        c.copy_from_slice(&bf16_bits(*s).to_le_bytes());
    }
}

/// Run a conversion loop compiled for AVX2 where the CPU has it (twice the lanes of the SSE2
/// baseline; conversions are a tenth of a merge's CPU time).
/// AVX-512 (with BW, for 16-bit lanes) where the CPU has it: these loops are exact integer and
/// IEEE operations, so every form gives the same bits.
#[inline(always)]
pub(crate) fn simd(f: impl FnOnce()) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx2") {
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2")]
            unsafe fn with_avx512(f: impl FnOnce()) {
                f()
            }
            // SAFETY: the CPU supports these features (checked above).
            return unsafe { with_avx512(f) };
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn with_avx2(f: impl FnOnce()) {
            f()
        }
        // SAFETY: the CPU supports AVX2 (checked above).
        return unsafe { with_avx2(f) };
    }
    f()
}

/// f32 → bf16 with round-to-nearest-even, branch-free so the loop vectorises; NaN stays a
/// (quiet) NaN with its sign. Same results as `half::bf16::from_f32` (tested).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    (if x.is_nan() { nan } else { rounded }) as u16
}

/// Round an f32 to the nearest value of a float dtype (nearest-even), as f32.
pub fn round_f32(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::BF16 => f32::from_bits((bf16_bits(x) as u32) << 16),
        Dtype::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `round_f32` of every element, in place: through the vectorised encoder and decoder a piece
/// at a time (the same conversions, so the same bits; one call per element was a tenth of a
/// 16-bit LyCORIS merge's block preparation).
pub fn round_slice(dtype: Dtype, x: &mut [f32]) {
    let es = match dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        _ => return,
    };
    let mut bytes = [0u8; 2048];
    for piece in x.chunks_mut(bytes.len() / es) {
        let b = &mut bytes[..piece.len() * es];
        encode_f32(dtype, piece, b);
        decode_f32(dtype, b, piece);
    }
}

/// Decode any float tensor (including F64) into f32; None for non-float types.
pub fn decode_any_f32(dtype: Dtype, src: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F64 => Some(
            src.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        ),
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => {
            let n = src.len() / dtype.float_size().unwrap();
            let mut v = vec![0f32; n];
            decode_f32(dtype, src, &mut v);
            Some(v)
        }
        _ => None,
    }
}

/// Whether any element of an encoded F32/F16/BF16 tensor is NaN or infinite: the exponent bits
/// all set. Branch-free over the raw bits, so it vectorises (a pass over a chunk still in cache).
#[inline]
fn any_non_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).fold(false, |acc, c| {
            let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            acc | (b & 0x7f80_0000 == 0x7f80_0000)
        }),
        Dtype::F16 | Dtype::BF16 => {
            let m: u16 = if dtype == Dtype::F16 { 0x7c00 } else { 0x7f80 };
            bytes.chunks_exact(2).fold(false, |acc, c| {
                acc | (u16::from_le_bytes([c[0], c[1]]) & m == m)
            })
        }
        _ => false,
    }
}

/// The safe-merge check: the first element (index, base value, output value) of an encoded
/// F32/F16/BF16 tensor `out` that is NaN or infinite where `base` (same dtype and length) holds a
/// finite value. Costs one vectorised pass over `out` when every element is finite.
pub fn first_new_non_finite(dtype: Dtype, base: &[u8], out: &[u8]) -> Option<(usize, f32, f32)> {
    if !any_non_finite(dtype, out) {
        return None;
    }
    let size = dtype.float_size()?;
    let (mut b, mut o) = ([0f32; 1], [0f32; 1]);
    for (i, (bc, oc)) in base
        .chunks_exact(size)
        .zip(out.chunks_exact(size))
        .enumerate()
    {
        decode_f32(dtype, oc, &mut o);
        if o[0].is_finite() {
            continue;
        }
        decode_f32(dtype, bc, &mut b);
        if b[0].is_finite() {
            return Some((i, b[0], o[0]));
        }
    }
    None
}

/// Index and value of the first element of a float tensor that is NaN or infinite (as f32),
/// scanning in small pieces so a large tensor is checked without decoding it whole.
pub fn first_non_finite(dtype: Dtype, src: &[u8]) -> Option<(usize, f32)> {
    let size = match dtype {
        Dtype::F64 => 8,
        d => d.float_size()?,
    };
    let mut buf = [0f32; 1024];
    if dtype != Dtype::F64 {
        // Whole pieces checked on the bits in one vectorised pass each; only a piece that
        // holds a NaN or ±Inf is decoded to find which element.
        const PIECE: usize = 1 << 16;
        let at = PIECE * src.chunks(PIECE).position(|p| any_non_finite(dtype, p))?;
        let found = &src[at..(at + PIECE).min(src.len())];
        return scan(dtype, size, found, &mut buf).map(|(i, x)| (at / size + i, x));
    }
    scan(dtype, size, src, &mut buf)
}

/// `first_non_finite` by decoding `src` in pieces of `buf`'s length.
fn scan(dtype: Dtype, size: usize, src: &[u8], buf: &mut [f32; 1024]) -> Option<(usize, f32)> {
    for (ci, piece) in src.chunks(buf.len() * size).enumerate() {
        let n = piece.len() / size;
        if dtype == Dtype::F64 {
            for (d, c) in buf.iter_mut().zip(piece.chunks_exact(8)) {
                *d = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        } else {
            decode_f32(dtype, piece, &mut buf[..n]);
        }
        if let Some(i) = buf[..n].iter().position(|x| !x.is_finite()) {
            return Some((ci * buf.len() + i, buf[i]));
        }
    }
    None
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_largest_magnitude_from_the_bits_is_the_decoded_one() {
        let vals = [
            0.0f32,
            -0.0,
            1.5,
            -3.25,
            1e-40,
            -65504.0,
            3.0e38,
            f32::NAN,
            -f32::NAN,
            7.0,
        ];
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for k in 0..vals.len() {
                let v: Vec<f32> = vals[..=k].to_vec();
                let mut b = vec![0u8; v.len() * dt.float_size().unwrap()];
                encode_f32(dt, &v, &mut b);
                let mut back = vec![0f32; v.len()];
                decode_f32(dt, &b, &mut back);
                let want = back.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert_eq!(
                    max_magnitude(dt, &b).to_bits(),
                    want.to_bits(),
                    "{dt:?} {k}"
                );
            }
            let mut b = vec![0u8; 2 * dt.float_size().unwrap()];
            encode_f32(dt, &[f32::NEG_INFINITY, f32::NAN], &mut b);
            assert_eq!(max_magnitude(dt, &b), f32::INFINITY, "{dt:?}");
        }
    }

    #[test]
    fn the_first_non_finite_element_is_found_in_any_piece() {
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            for (at, bad) in [
                (0usize, f32::NAN),
                (20_000, f32::INFINITY),
                (70_001, -f32::INFINITY),
            ] {
                let mut v = vec![1.5f32; 80_000];
                v[at] = bad;
                // A second one later: the first must be reported.
                v[79_999] = f32::NAN;
                let b = if dt == Dtype::F64 {
                    v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect()
                } else {
                    let mut b = vec![0u8; v.len() * dt.float_size().unwrap()];
                    encode_f32(dt, &v, &mut b);
                    b
                };
                let (i, x) = first_non_finite(dt, &b).expect("found");
                assert_eq!(i, at, "{dt:?}");
                assert_eq!(x.is_nan(), bad.is_nan(), "{dt:?}");
            }
            let mut b = vec![
                0u8;
                1000 * if dt == Dtype::F64 {
                    8
                } else {
                    dt.float_size().unwrap()
                }
            ];
            if dt != Dtype::F64 {
                encode_f32(dt, &[2.0; 1000], &mut b);
            }
            assert_eq!(first_non_finite(dt, &b), None, "{dt:?}");
        }
    }

    #[test]
    fn safe_merge_finds_new_non_finite_values_only() {
        let enc = |dt: Dtype, v: &[f32]| {
            let mut b = vec![0u8; v.len() * dt.float_size().unwrap()];
            encode_f32(dt, v, &mut b);
            b
        };
        for dt in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let base = enc(dt, &[1.0, f32::NAN, 2.0, 3.0]);
            // NaN where the base already had NaN is not new.
            let same = enc(dt, &[1.5, f32::NAN, -2.0, 0.0]);
            assert_eq!(first_new_non_finite(dt, &base, &same), None, "{dt:?}");
            let bad = enc(dt, &[1.5, f32::NAN, f32::INFINITY, 0.0]);
            let (i, b, v) = first_new_non_finite(dt, &base, &bad).unwrap();
            assert_eq!((i, b, v), (2, 2.0, f32::INFINITY), "{dt:?}");
        }
        // Finite in f32, infinite once rounded to F16.
        let base = enc(Dtype::F16, &[60000.0]);
        let out = enc(Dtype::F16, &[70000.0]);
        assert_eq!(
            first_new_non_finite(Dtype::F16, &base, &out),
            Some((0, 60000.0, f32::INFINITY))
        );
    }

    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is exactly halfway between two bf16 values; ties go to the even mantissa (1.0).
        let mut out = [0u8; 2];
        encode_f32(Dtype::BF16, &[1.0 + 2f32.powi(-8)], &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f80);
        encode_f32(Dtype::BF16, &[1.0 + 3.0 * 2f32.powi(-8)], &mut out);
        assert_eq!(u16::from_le_bytes(out), 0x3f82);
    }

    #[test]
    fn fast_bf16_matches_half() {
        let mut seed = 1u64;
        let mut vals = vec![
            0.0f32,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            -3.3e38,
        ];
        for _ in 0..100_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            vals.push(f32::from_bits((seed >> 32) as u32));
        }
        for v in vals {
            let want = half::bf16::from_f32(v);
            let got = half::bf16::from_bits(bf16_bits(v));
            if v.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn vector_f16_conversions_match_half() {
        // Every f16 bit pattern decoded, and random f32 bit patterns encoded, through the F16C
        // path (groups of eight) and its scalar tail, from unaligned byte offsets.
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        for skip in [0usize, 1, 3] {
            let src = [vec![0u8; skip], all.clone()].concat();
            let n = 65536 - 5;
            let mut got = vec![0f32; n];
            decode_f32(Dtype::F16, &src[skip..skip + 2 * n], &mut got);
            for (i, g) in got.iter().enumerate() {
                let want = half::f16::from_bits(i as u16).to_f32();
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{i:#x}"
                );
            }
        }
        let mut seed = 7u64;
        let vals: Vec<f32> = (0..100_003)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Half the draws near f16's range, where rounding and subnormals happen.
                let bits = (seed >> 32) as u32;
                if seed & 1 == 0 {
                    f32::from_bits(bits)
                } else {
                    (bits as f32 / u32::MAX as f32 - 0.5)
                        * 2.0f32.powi((seed >> 8) as i32 % 40 - 26)
                }
            })
            .collect();
        let mut out = vec![0u8; 2 * vals.len() + 1];
        encode_f32(Dtype::F16, &vals, &mut out[1..]);
        for (i, v) in vals.iter().enumerate() {
            let got = half::f16::from_bits(u16::from_le_bytes([out[1 + 2 * i], out[2 + 2 * i]]));
            let want = half::f16::from_f32(*v);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{v:e}"
            );
        }
    }

    #[test]
    fn roundtrip_f16_bf16() {
        for dt in [Dtype::F16, Dtype::BF16, Dtype::F32] {
            let vals = [0.5f32, -2.0, 0.125, 3.0];
            let mut bytes = vec![0u8; vals.len() * dt.float_size().unwrap()];
            encode_f32(dt, &vals, &mut bytes);
            let mut back = [0f32; 4];
            decode_f32(dt, &bytes, &mut back);
            assert_eq!(back, vals);
        }
    }
}
