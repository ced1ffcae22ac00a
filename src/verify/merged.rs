//! The proof of a second checkpoint: a merged one against base ⊕ adapter, or a restored one
//! against the un-merge of the merge as stored. Tensors are compared by name, element by
//! element, with the values the merge engine itself computes (`merge::Plan::expected_f32`).

use crate::adapter::Adapter;
use crate::checkpoint::{dtype, Checkpoint, Dtype};
use crate::error::Result;
use crate::merge::{self, Fate};

use super::{Ctx, Element, MergedReport, Status};

/// One unit in the last place of `dt` at magnitude `mag` (the spacing just above it).
pub fn ulp(dt: Dtype, mag: f32) -> f64 {
    ulp32(dt, mag.abs()) as f64
}

/// Distance between two values in ulps of `dt` at the larger magnitude.
pub fn ulps(dt: Dtype, a: f32, b: f32) -> f64 {
    let d = (a as f64 - b as f64).abs();
    if d == 0.0 {
        return 0.0;
    }
    d / ulp(dt, a.abs().max(b.abs())).max(f64::MIN_POSITIVE)
}

/// Largest difference allowed between a found value and the f32 value recomputed here: f32
/// relative to the tensor's largest magnitude; 16-bit types one ulp of the element (`u`, at the
/// larger of the two magnitudes), or the f32 summation noise (2e-6 of the largest magnitude) for
/// elements that cancel to near zero.
fn allowed_with(dt: Dtype, u: f64, scale: f32, f32_tol: f64) -> f64 {
    match dt {
        Dtype::F32 => f32_tol * scale as f64,
        Dtype::BF16 | Dtype::F16 => (u * 1.0001).max(2e-6 * scale as f64),
        _ => 0.0,
    }
}

/// What one piece of a comparison found, in f32 (the element with the largest ratio is
/// measured again in f64 by the caller).
struct Scan {
    /// Largest |found − expected|.
    max_d: f32,
    /// Largest distance in ulps of the dtype.
    max_ulps: f32,
    /// Index of the first element with the largest ratio to what is allowed.
    worst: usize,
    /// That ratio, in f32.
    worst_r: f32,
}

dtype::vectorised! {
/// Compare a piece of found values with the values recomputed here, branch-light and in f32:
/// this runs once per element of every transformed tensor (it was most of a verify's time in
/// f64 with a 16-bit conversion per element).
fn scan(dt: Dtype, got: &[f32], want: &[f32], scale: f32, f32_tol: f64) -> Scan {
    let f32_allowed = (f32_tol * scale as f64) as f32;
    let noise = 2e-6 * scale;
    // One loop per dtype, so that each is free of the dtype's branches and vectorises.
    match dt {
        Dtype::BF16 => scan_with(
            got,
            want,
            |m| ulp32(Dtype::BF16, m),
            |u| (u * 1.0001).max(noise),
        ),
        Dtype::F16 => scan_with(
            got,
            want,
            |m| ulp32(Dtype::F16, m),
            |u| (u * 1.0001).max(noise),
        ),
        _ => scan_with(got, want, |m| ulp32(Dtype::F32, m), |_| f32_allowed),
    }
}
}

/// `scan` for one dtype's `ulp` and allowed deviation. The maxima are kept lane by lane in
/// registers as the elements go by (a running maximum with its index does not vectorise; storing
/// every element's three measures to take their maxima afterwards cost as much as computing
/// them); the index of the first largest ratio is looked for again only in a run of elements
/// whose largest ratio beats the worst so far. Maxima ignore NaN whatever the order, so the
/// result is the same as element by element.
#[inline(always)]
fn scan_with(
    got: &[f32],
    want: &[f32],
    ulp: impl Fn(f32) -> f32,
    allowed: impl Fn(f32) -> f32,
) -> Scan {
    const RUN: usize = 256;
    const L: usize = 16;
    // Per element: the ratio to what is allowed, the distance in ulps, the absolute difference.
    let measure = |g: f32, v: f32| -> (f32, f32, f32) {
        let d = (g - v).abs();
        let u = ulp(g.abs().max(v.abs()));
        let x = d / allowed(u);
        // 0/0 (equal, nothing allowed) is 0; a NaN anywhere else is the worst.
        let r = if x.is_nan() {
            if d == 0.0 {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            x
        };
        let q = if d != 0.0 {
            d / u.max(f32::from_bits(1))
        } else {
            0.0
        };
        (r, q, d)
    };
    let fold = |m: &[f32; L]| m.iter().fold(-1f32, |a, &x| a.max(x));
    let (mut md, mut mq) = ([-1f32; L], [-1f32; L]);
    let (mut worst, mut worst_r) = (0usize, -1f32);
    for (k, (gs, vs)) in got.chunks(RUN).zip(want.chunks(RUN)).enumerate() {
        let mut mr = [-1f32; L];
        let (gc, vc) = (gs.chunks_exact(L), vs.chunks_exact(L));
        let (gt, vt) = (gc.remainder(), vc.remainder());
        for (g, v) in gc.zip(vc) {
            for l in 0..L {
                let (r, q, d) = measure(g[l], v[l]);
                mr[l] = mr[l].max(r);
                mq[l] = mq[l].max(q);
                md[l] = md[l].max(d);
            }
        }
        for (l, (&g, &v)) in gt.iter().zip(vt).enumerate() {
            let (r, q, d) = measure(g, v);
            mr[l] = mr[l].max(r);
            mq[l] = mq[l].max(q);
            md[l] = md[l].max(d);
        }
        let run_r = fold(&mr);
        if run_r > worst_r {
            worst_r = run_r;
            worst = k * RUN
                + gs.iter()
                    .zip(vs)
                    .position(|(&g, &v)| measure(g, v).0 == run_r)
                    .expect("the maximum");
        }
    }
    Scan {
        max_d: fold(&md).max(0.0),
        max_ulps: fold(&mq).max(0.0),
        worst,
        worst_r,
    }
}

/// `ulp` of a magnitude, in f32 (exact: neighbouring floats differ by a power of two).
#[inline(always)]
fn ulp32(dt: Dtype, mag: f32) -> f32 {
    match dt {
        Dtype::BF16 => {
            let b = dtype::bf16_bits(mag) as u32;
            f32::from_bits((b + 1) << 16) - f32::from_bits(b << 16)
        }
        Dtype::F16 => f16_ulp(mag),
        _ if mag.is_finite() => f32::from_bits(mag.to_bits() + 1) - mag,
        _ => f32::INFINITY,
    }
}

/// The f16 ulp at a magnitude once rounded to f16, from the f32 bits (no conversion per
/// element): `mag` rounded to 11 significant bits, nearest-even, gives the exponent e, and the
/// ulp is 2^(e − 10); below 2^−14 (subnormal) it is 2^−24; at the largest finite value it is
/// infinite, past the range (rounding to infinity) and for NaN it is NaN, as stepping from there
/// gives. Tested against `half`.
#[inline(always)]
fn f16_ulp(mag: f32) -> f32 {
    let b = mag.to_bits();
    let r = b.wrapping_add(0xfff + ((b >> 13) & 1)) & !0x1fff;
    let e = (r >> 23) as i32 - 127;
    if mag.is_nan() || e >= 16 {
        f32::NAN
    } else if r == 65504f32.to_bits() {
        // The largest finite f16: the next step is infinity.
        f32::INFINITY
    } else if e < -14 {
        f32::from_bits(((-24 + 127) as u32) << 23)
    } else {
        f32::from_bits(((e - 10 + 127) as u32) << 23)
    }
}

/// The largest magnitude of a float tensor's bytes, in parallel pieces.
fn max_abs(dt: Dtype, bytes: &[u8]) -> f32 {
    use rayon::prelude::*;
    let esize = dt.float_size().expect("float");
    bytes
        .par_chunks(esize << 16)
        .map(|c| dtype::max_magnitude(dt, c))
        .reduce(|| 0f32, f32::max)
}

/// Which second checkpoint is being proven against base ⊕ adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// `--merged`: base ⊕ adapter.
    Merged,
    /// `--restored`: an un-merge of base ⊕ adapter, i.e. the base back, up to what rounding the
    /// merged tensor to the base's dtype allows.
    Restored,
}

impl Proof {
    fn values_check(self) -> &'static str {
        match self {
            Proof::Merged => "merged-values",
            Proof::Restored => "restored-values",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Proof::Merged => "merged",
            Proof::Restored => "restored",
        }
    }
}

/// Whether two checkpoints have the same files with the same headers (what boft-merge
/// writes), or the first difference.
fn layout_difference(base: &Checkpoint, other: &Checkpoint) -> Option<String> {
    if base.is_folder() != other.is_folder() {
        return Some(format!(
            "one is a {} and the other a {}",
            if base.is_folder() { "folder" } else { "file" },
            if other.is_folder() { "folder" } else { "file" }
        ));
    }
    let names = |c: &Checkpoint| -> Vec<String> {
        c.files
            .iter()
            .map(|(r, _)| r.display().to_string())
            .collect()
    };
    if base.is_folder() && names(base) != names(other) {
        return Some(format!(
            "files {:?}, the base's {:?}",
            names(other),
            names(base)
        ));
    }
    for ((rel, b), (_, o)) in base.files.iter().zip(&other.files) {
        // The same header: tensors (names, dtypes, shapes, offsets) and __metadata__; the
        // JSON's spelling (key order, padding) is the writer's and not compared.
        let same_tensors = b.tensors.len() == o.tensors.len()
            && b.tensors.iter().zip(&o.tensors).all(|(x, y)| {
                (&x.name, x.dtype, &x.shape, x.start, x.end)
                    == (&y.name, y.dtype, &y.shape, y.start, y.end)
            });
        if !same_tensors {
            return Some(format!(
                "{} holds other tensors or the same at other offsets",
                rel.display()
            ));
        }
        if b.metadata != o.metadata {
            return Some(format!("the __metadata__ of {} differs", rel.display()));
        }
    }
    None
}

/// Flat index → index per dimension.
fn coords(shape: &[usize], mut flat: usize) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for (i, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            c[i] = flat % d;
            flat /= d;
        }
    }
    c
}

/// Worst element of a comparison: the largest deviation relative to what is allowed.
#[derive(Default)]
struct Worst {
    /// (ratio to the allowed deviation, flat index, found, expected)
    element: Option<(f64, usize, f32, f32)>,
    /// Largest |found − expected| relative to the tensor's largest magnitude.
    dev: f64,
    /// Largest distance in ulps of the tensor's dtype.
    ulps: f64,
}

/// Prove `other` (a merged or restored checkpoint) against base ⊕ adapter, tensor by tensor and
/// by name: whatever the sharding, tensor order or header metadata.
pub(super) fn check_second(
    ctx: &mut Ctx,
    base: &Checkpoint,
    other: &Checkpoint,
    adapter: &Adapter,
    proof: Proof,
) -> Result<MergedReport> {
    let plan = merge::plan(base, adapter, merge::Direction::Merge)?;
    let inverse = match proof {
        Proof::Merged => None,
        Proof::Restored => Some(merge::plan(
            base,
            adapter,
            merge::Direction::UnmergeKeepReplaced,
        )?),
    };
    let subject = other.root.display().to_string();
    let values = proof.values_check();
    let noun = proof.noun();

    // Layout: reported; a failure only when --same-layout asks for it.
    let difference = layout_difference(base, other);
    let same_layout = difference.is_none();
    ctx.push(
        "merged-layout",
        &subject,
        match (ctx.settings.same_layout, same_layout) {
            (false, _) => Status::Info,
            (true, true) => Status::Pass,
            (true, false) => Status::Fail,
        },
        None,
        None,
        match &difference {
            None => {
                "same files and headers (tensors, offsets, __metadata__) as the base".to_string()
            }
            Some(d) => format!("layout differs from the base: {d}"),
        },
    );

    let mut report = MergedReport {
        path: subject.clone(),
        proof: noun,
        same_layout,
        tensors: 0,
        elements: 0,
        transformed: 0,
        replaced: 0,
        untouched: 0,
        missing: 0,
        extra: 0,
    };

    // Names: every base tensor present with its dtype and shape, nothing extra.
    let mut names = 0usize;
    let mut comparable = Vec::new();
    for (_, f) in &base.files {
        for t in &f.tensors {
            names += 1;
            match other.get(&t.name) {
                None => {
                    report.missing += 1;
                    ctx.push(
                        "merged-tensors",
                        &t.name,
                        Status::Fail,
                        None,
                        None,
                        format!("in the base but missing from the {noun} checkpoint"),
                    );
                }
                Some((_, mt)) if mt.dtype != t.dtype || mt.shape != t.shape => {
                    report.missing += 1;
                    ctx.push(
                        "merged-tensors",
                        &t.name,
                        Status::Fail,
                        None,
                        None,
                        format!(
                            "{noun} tensor is {} {:?}, the base's {} {:?}",
                            mt.dtype.name(),
                            mt.shape,
                            t.dtype.name(),
                            t.shape
                        ),
                    );
                }
                Some((mf, mt)) => comparable.push((f, t, mf, mt)),
            }
        }
    }
    for name in other.tensor_names() {
        if base.get(name).is_none() {
            names += 1;
            report.extra += 1;
            ctx.push(
                "merged-tensors",
                name,
                Status::Fail,
                None,
                None,
                format!("in the {noun} checkpoint but not in the base"),
            );
        }
    }
    if names > 0 && report.missing == 0 && report.extra == 0 {
        ctx.push(
            "merged-tensors",
            &subject,
            Status::Pass,
            Some(names as f64),
            None,
            format!("all {names} tensors of the base present by name with their dtype and shape, none extra"),
        );
    }

    let mut untouched_bad = 0usize;
    for (f, t, mf, mt) in comparable {
        crate::output::check_interrupted()?;
        let got = mf.data(mt);
        let src = f.data(t);
        match plan.fate(&t.name) {
            Fate::Untouched => {
                if !ctx.settings.wants("merged-untouched") {
                    continue;
                }
                report.tensors += 1;
                report.untouched += 1;
                report.elements += t.numel() as u64;
                if got != src {
                    untouched_bad += 1;
                    let at = got.iter().zip(src).position(|(a, b)| a != b).unwrap_or(0);
                    ctx.push(
                        "merged-untouched",
                        &t.name,
                        Status::Fail,
                        None,
                        None,
                        format!(
                            "not targeted by the adapter but differs from the base (byte {at})"
                        ),
                    );
                }
            }
            Fate::Replaced(r) => {
                if !ctx.settings.wants(values) {
                    continue;
                }
                report.tensors += 1;
                report.replaced += 1;
                report.elements += t.numel() as u64;
                let want = if r.dtype == t.dtype {
                    r.data.clone()
                } else {
                    let v = dtype::decode_any_f32(r.dtype, &r.data).expect("float");
                    let mut bytes = vec![0u8; v.len() * t.dtype.float_size().unwrap_or(4)];
                    dtype::encode_f32(t.dtype, &v, &mut bytes);
                    bytes
                };
                let (status, message) = match proof {
                    Proof::Merged if got == want.as_slice() => {
                        (Status::Pass, "equals the adapter's replacement")
                    }
                    Proof::Merged => (Status::Fail, "differs from the adapter's replacement"),
                    Proof::Restored if got == src => (Status::Pass, "byte-identical to the base"),
                    Proof::Restored if got == want.as_slice() => (
                        Status::Pass,
                        "kept as merged (--keep-replaced): equals the adapter's replacement; the \
                         original is not in the adapter",
                    ),
                    Proof::Restored => (
                        Status::Fail,
                        "neither the base's tensor nor the adapter's replacement",
                    ),
                };
                ctx.push(values, &t.name, status, None, None, message);
            }
            Fate::Transformed => {
                if !ctx.settings.wants(values) {
                    continue;
                }
                report.tensors += 1;
                report.transformed += 1;
                report.elements += t.numel() as u64;
                let dt = t.dtype;
                let esize = dt.float_size().expect("float");
                let numel = t.numel();
                // The found values are decoded piece by piece where they are compared (memory
                // stays at a few pieces, not a whole tensor in f32), after one parallel pass for
                // the largest magnitude.
                let scale = max_abs(dt, got);
                let tol = ctx.settings.merged_tolerance;
                let worst = std::sync::Mutex::new(Worst::default());
                let compare_piece = |offset: usize, want: &[f32], got_f: &mut Vec<f32>| {
                    // Grown (and zeroed) once per buffer; the decode writes every element.
                    got_f.resize(want.len(), 0.0);
                    dtype::decode_f32(
                        dt,
                        &got[offset * esize..(offset + want.len()) * esize],
                        got_f,
                    );
                    let got_f = &got_f[..];
                    let s = scan(dt, got_f, want, scale, tol);
                    // The piece's worst element, measured again exactly as reported; where any
                    // element comes near what is allowed in f32, every element of the piece is,
                    // so that f32 rounding never decides a pass.
                    let exact = |i: usize| {
                        let (g, v) = (got_f[i], want[i]);
                        let d = (g as f64 - v as f64).abs();
                        let a = allowed_with(dt, ulp(dt, g.abs().max(v.abs())), scale, tol);
                        let ratio = if d == 0.0 {
                            0.0
                        } else if a > 0.0 {
                            d / a
                        } else {
                            f64::INFINITY
                        };
                        // NaN (a NaN found or expected, or ∞/∞) never compares greater: count
                        // it as the worst.
                        (if ratio.is_nan() { f64::INFINITY } else { ratio }, i)
                    };
                    // The f32 ratio is within a few f32 roundings (relative 1e-6) of the f64
                    // one, so below this no element of the piece can fail; an element exactly
                    // one ulp off (ratio 1/1.0001 = 0.9999, common in 16-bit outputs whose
                    // rounding order differs) is not near enough to need the f64 pass (which
                    // took a quarter of a U-Net verify when the threshold was 0.99).
                    let (ratio, i) = if s.worst_r >= 0.99995 {
                        (0..want.len())
                            .map(exact)
                            .fold((-1.0, 0), |b, x| if x.0 > b.0 { x } else { b })
                    } else {
                        exact(s.worst)
                    };
                    let e = (ratio, offset + i, got_f[i], want[i]);
                    let mut w = worst.lock().unwrap();
                    w.dev = w.dev.max(s.max_d as f64 / scale.max(1e-30) as f64);
                    w.ulps = w.ulps.max(s.max_ulps as f64);
                    if w.element
                        .is_none_or(|x| e.0 > x.0 || (e.0 == x.0 && e.1 < x.1))
                    {
                        w.element = Some(e);
                    }
                };
                // Output-side tensors arrive whole: their comparison is split across the cores.
                let compare = |offset: usize, want: &[f32]| {
                    use rayon::prelude::*;
                    const PIECE: usize = 1 << 16;
                    want.par_chunks(PIECE).enumerate().for_each_init(
                        // One decode buffer per worker, not a fresh (zeroed) one per piece.
                        Vec::new,
                        |got_f, (k, w)| compare_piece(offset + k * PIECE, w, got_f),
                    );
                };
                plan.expected_f32(f, t, inverse.as_ref(), compare)?;
                let w = worst.into_inner().unwrap();
                // How far the restored tensor is from the base itself (the rounding of the
                // merged tensor, carried back).
                let from_base = (proof == Proof::Restored).then(|| {
                    let got_f = dtype::decode_any_f32(dt, got).expect("float");
                    let base_f = dtype::decode_any_f32(dt, src).expect("float");
                    let (mut differ, mut one_ulp, mut max_dev) = (0usize, 0usize, 0f64);
                    for (&a, &b) in got_f.iter().zip(&base_f) {
                        if a.to_bits() != b.to_bits() {
                            differ += 1;
                            if ulps(dt, a, b) <= 1.0 {
                                one_ulp += 1;
                            }
                            max_dev = max_dev.max((a as f64 - b as f64).abs());
                        }
                    }
                    format!(
                        "; {differ} of {} elements differ from the base ({one_ulp} by one ulp; largest difference {:.2e} of the largest magnitude): the rounding of the merged tensor, carried back",
                        got_f.len(),
                        max_dev / scale.max(1e-30) as f64
                    )
                });
                let from_base = from_base.unwrap_or_default();
                let expected = match proof {
                    Proof::Merged => "base ⊕ adapter",
                    Proof::Restored => "the un-merge of round(base ⊕ adapter)",
                };
                let within = if dt == Dtype::F32 {
                    format!("{tol:.0e} of the largest magnitude")
                } else {
                    format!(
                        "one {} ulp (or 2e-6 of the largest magnitude near zero)",
                        dt.name()
                    )
                };
                match w.element {
                    Some((ratio, i, g, v)) if ratio > 1.0 => {
                        let c = coords(&t.shape, i);
                        let u = ulps(dt, g, v);
                        let rv = dtype::round_f32(dt, v);
                        ctx.push_element(
                            values,
                            &t.name,
                            Some(w.dev),
                            (dt == Dtype::F32).then_some(tol),
                            format!(
                                "element {i} {c:?}: found {g:e}, {expected} gives {v:e}{}: {u:.1} {} ulp apart (allowed: {within}){from_base}",
                                if rv != v { format!(" (rounds to {rv:e})") } else { String::new() },
                                dt.name()
                            ),
                            Element {
                                index: i,
                                coords: c,
                                expected: v as f64,
                                found: g as f64,
                                ulps: u,
                            },
                        );
                    }
                    _ => ctx.push(
                        values,
                        &t.name,
                        Status::Pass,
                        Some(w.dev),
                        (dt == Dtype::F32).then_some(tol),
                        format!(
                            "{} elements equal {expected} within {within} (worst {:.2e} of the largest magnitude, {:.2} ulp){from_base}",
                            numel,
                            w.dev,
                            w.ulps
                        ),
                    ),
                }
            }
        }
    }
    if untouched_bad == 0 && report.untouched > 0 {
        ctx.push(
            "merged-untouched",
            &subject,
            Status::Pass,
            Some(report.untouched as f64),
            None,
            format!(
                "{} tensors not targeted are byte-identical to the base",
                report.untouched
            ),
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f16_ulp_from_bits_is_what_half_gives() {
        let half_ulp = |m: f32| {
            let b = half::f16::from_f32(m).to_bits();
            half::f16::from_bits(b.saturating_add(1)).to_f32() - half::f16::from_bits(b).to_f32()
        };
        let mut vals = vec![
            0.0f32,
            1.0,
            2.0f32.powi(-14),
            2.0f32.powi(-15),
            65504.0,
            65519.0,
            65520.0,
            70000.0,
            f32::INFINITY,
            f32::NAN,
            6.1e-5,
            1e-8,
            2047.5,
            2048.0,
            2049.0,
        ];
        let mut seed = 3u64;
        for _ in 0..200_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Non-negative bit patterns, tiny values and values spread over f16's range.
            let x = f32::from_bits((seed >> 33) as u32);
            vals.push(x);
            vals.push(x * 1e-30);
            vals.push(((seed >> 40) as f32) * 2.0f32.powi((seed & 63) as i32 - 40));
        }
        for m in vals {
            let (a, b) = (f16_ulp(m), half_ulp(m));
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{m:e}: {a:e} vs {b:e}"
            );
        }
    }
}
