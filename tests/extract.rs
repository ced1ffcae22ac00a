//! boft-extract (docs/EXTRACT.md) against the real libraries: adapters extracted from a base and
//! a library's own merge reproduce that merge; on a real full fine-tune (fixtures/extract, made
//! by make_extract.py) the captured shares obey the orders the maths promises; and the adapters
//! it exports are the ones PEFT and LyCORIS loaded and merged in the generator.

mod common;

use std::path::Path;

use common::{assert_merge_matches, fails_with, fixtures, ok, run, tensors};
use serde_json::Value;

fn json(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Value {
    let mut a: Vec<&dyn AsRef<std::ffi::OsStr>> = args.to_vec();
    a.push(&"--json");
    serde_json::from_str(&ok(&run("boft-extract", &a))).expect("--json prints JSON")
}

fn f(v: &Value) -> f64 {
    v.as_f64().expect("a number")
}

/// Extract from (base, library merge) with the adapter's own structure, merge the result with
/// boft-merge, and compare with the library's merge tensor by tensor.
fn round_trip(base: &str, merged: &str, side: &str, h: &str, m: &str, scale: bool) -> Value {
    let fx = fixtures();
    let (base, merged) = (fx.join(base), fx.join(merged));
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("a.safetensors");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"--base",
        &base,
        &"--tuned",
        &merged,
        &"-o",
        &adapter,
        &"--side",
        &side,
        &"--block-size",
        &h,
        &"--factors",
        &m,
        &"--tol",
        &"1e-9",
        &"--max-sweeps",
        &"200",
    ];
    if scale {
        args.push(&"--row-scale");
    }
    let report = json(&args);
    let out = common::out_path(dir.path(), &base);
    ok(&run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
    ));
    if m == "1" {
        assert_merge_matches(&out, &merged, &base);
    }
    report
}

#[test]
fn one_factor_reproduces_peft_and_lycoris_merges() {
    // PEFT BOFT with one factor and a trained boft_s; PEFT OFT v2 (exact Cayley); LyCORIS
    // diag-oft with rescale on the output side, Conv2d layers included.
    for (base, merged, side, h, scale) in [
        (
            "peft_boft/bases/llama_f32",
            "peft_boft/merged/llama_f32_f1",
            "input",
            "8",
            true,
        ),
        (
            "peft_oft/bases/llama_f32",
            "peft_oft/merged/llama_f32_cayley",
            "input",
            "8",
            false,
        ),
        (
            "lycoris/bases/unet_f32",
            "lycoris/merged/diag_oft_f32_rescale_m1.0",
            "output",
            "4",
            true,
        ),
    ] {
        let r = round_trip(base, merged, side, h, "1", scale);
        let total = &r["total"];
        assert!(f(&total["captured"]) > 0.999_999, "{merged}: {total}");
        assert!(
            r["skipped"].as_array().unwrap().is_empty(),
            "{merged}: {}",
            r["skipped"]
        );
        for t in r["tensors"].as_array().unwrap() {
            assert_eq!(
                t["sweeps"],
                if scale { t["sweeps"].clone() } else { 1.into() }
            );
        }
    }
}

#[test]
fn two_butterfly_factors_capture_a_peft_boft_merge() {
    let r = round_trip(
        "peft_boft/bases/llama_f32",
        "peft_boft/merged/llama_f32_f2",
        "input",
        "8",
        "2",
        true,
    );
    let total = &r["total"];
    let sweeps: Vec<u64> = r["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["sweeps"].as_u64().unwrap())
        .collect();
    eprintln!(
        "PEFT BOFT m=2: captured {} after at most {} sweeps",
        total["captured"],
        sweeps.iter().max().unwrap()
    );
    assert!(f(&total["captured"]) >= 0.999, "{total}");
    for t in r["tensors"].as_array().unwrap() {
        let h: Vec<f64> = t["history"].as_array().unwrap().iter().map(f).collect();
        assert!(h.windows(2).all(|w| w[1] <= w[0]), "{}: {h:?}", t["name"]);
    }
}

#[test]
fn output_side_butterflies_capture_a_lycoris_boft_merge() {
    // LyCORIS boft uses log2(blocks) + 1 stages of blocks of 4 (with rescale and a constraint):
    // 4 stages on 32 rows, 3 on 16 rows. With LyCORIS's row orders, the same structure takes the
    // whole change of every tensor it fits; 3 stages on 32 rows cannot.
    for (m, rows) in [("3", 16), ("4", 32)] {
        let r = round_trip(
            "lycoris/bases/unet_f32",
            "lycoris/merged/boft_f32_constraint_rescale_m1.0",
            "output",
            "4",
            m,
            true,
        );
        let mut exact = 0;
        for t in r["tensors"].as_array().unwrap() {
            if t["n"] == rows {
                assert!(f(&t["captured"]) >= 0.999, "m={m}: {t}");
                exact += 1;
            }
        }
        assert!(exact >= 3, "m={m}: {exact} tensors of {rows} rows");
    }
}

fn tiny() -> (std::path::PathBuf, std::path::PathBuf) {
    let fx = fixtures().join("extract");
    (fx.join("base"), fx.join("tuned"))
}

fn sweep(side: &str, scale: bool) -> Value {
    let (base, tuned) = tiny();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"--base",
        &base,
        &"--tuned",
        &tuned,
        &"--side",
        &side,
        &"--sweep",
        &"b=2,4,8,16,32,m=1,2,3",
        &"--exclude",
        &"embed_tokens",
        &"--exclude",
        &"lm_head",
    ];
    if scale {
        args.push(&"--row-scale");
    }
    json(&args)
}

#[test]
fn captured_shares_nest_on_a_real_fine_tune() {
    for side in ["input", "output"] {
        for scale in [false, true] {
            let r = sweep(side, scale);
            let what = format!("side {side}, row scale {scale}");
            let rows = r["rows"].as_array().unwrap();
            let ceiling = f(&r["ceiling"]["captured"]);
            let share = |b: u64, m: u64| {
                rows.iter()
                    .find(|x| x["block_size"] == b && x["factors"] == m)
                    .filter(|x| x["unfit"].as_array().unwrap().is_empty())
                    .map(|x| f(&x["total"]["captured"]))
            };
            let mut checked = 0;
            for b in [2u64, 4, 8, 16, 32] {
                for m in [1u64, 2, 3] {
                    let Some(s) = share(b, m) else { continue };
                    assert!(
                        s > 0.0 && s <= ceiling + 1e-12,
                        "{what}: b={b} m={m}: {s} vs ceiling {ceiling}"
                    );
                    // More factors at the same block size never capture less.
                    if let Some(s1) = share(b, m + 1) {
                        assert!(s1 >= s, "{what}: b={b}: m={} {s1} < m={m} {s}", m + 1);
                        checked += 1;
                    }
                    // Twice the block size, one factor: the class holds the smaller one.
                    if m == 1 && !scale {
                        if let Some(s2) = share(2 * b, 1) {
                            assert!(s2 >= s, "{what}: b={} {s2} < b={b} {s}", 2 * b);
                            checked += 1;
                        }
                    }
                }
            }
            // m: b = 2, 4, 8 (1→2, 2→3), 16 (1→2); b at m = 1: 2→4→8→16→32 without a scale.
            let want = if scale { 7 } else { 11 };
            assert_eq!(checked, want, "{what}: {checked} comparisons");
            // The whole-axis Procrustes fit is the ceiling, and the largest block reaches it
            // where the block is the whole axis (every tensor here is 32 or 64 wide).
            assert!(
                ceiling < 1.0 && ceiling > share(32, 1).unwrap() - 1e-9,
                "{what}"
            );
        }
    }
}

#[test]
fn butterfly_residuals_never_rise_across_sweeps() {
    let (base, tuned) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.safetensors");
    for side in ["input", "output"] {
        let r = json(&[
            &"--base",
            &base,
            &"--tuned",
            &tuned,
            &"-o",
            &out,
            &"--force",
            &"--side",
            &side,
            &"--block-size",
            &"4",
            &"--factors",
            &"3",
            &"--row-scale",
            &"--tol",
            &"1e-7",
        ]);
        let mut multi = 0;
        for t in r["tensors"].as_array().unwrap() {
            let h: Vec<f64> = t["history"].as_array().unwrap().iter().map(f).collect();
            assert!(
                h.windows(2).all(|w| w[1] <= w[0]),
                "{side} {}: {h:?}",
                t["name"]
            );
            assert!(h[0] < f(&t["diff_sq"]), "{side} {}", t["name"]);
            multi += usize::from(h.len() > 2);
        }
        assert!(
            multi > 0,
            "{side}: no tensor took several sweeps, nothing was tested"
        );
    }
}

/// The generator's phase B: PEFT and LyCORIS loaded adapters this binary exported from the
/// fine-tune (committed under fixtures/extract/adapters) and merged them. boft-merge must merge
/// each the way the library did; and extracting again with the same arguments must give the same
/// adapter where the fit is one exact step (iterative fits can stop a sweep apart on a CPU whose
/// kernels round differently, so those are compared through their merges above only).
#[test]
fn exports_are_what_peft_and_lycoris_merged() {
    let fx = fixtures().join("extract");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(fx.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["roundtrip"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    let base = fx.join("base");
    let mut again = 0;
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let committed = fx.join(c["adapter"].as_str().unwrap());
        let theirs = tensors(&fx.join(c["merged"][0]["path"].as_str().unwrap()));
        assert_eq!(theirs.len(), 14, "{name}");
        let merge = |adapter: &Path, out: &Path| {
            ok(&run(
                "boft-merge",
                &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
            ));
            tensors(out)
        };
        let ours = merge(&committed, &dir.path().join("m"));
        for (t, (_, lib)) in &theirs {
            let e = common::rel_err(&ours[t].1.f32(), &lib.f32());
            assert!(e <= 2e-5, "{name} {t}: {e:e}");
        }
        let args: Vec<String> = c["extract_args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        if args.iter().any(|a| a == "--factors" || a == "--row-scale") {
            continue;
        }
        // The same command, run from fixtures/extract, writing into the temporary folder.
        let o = args.iter().position(|a| a == "-o").unwrap();
        let mut args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let adapter = dir
            .path()
            .join(Path::new(&args[o + 1]).file_name().unwrap());
        args[o + 1] = adapter.clone().into();
        for a in args.iter_mut() {
            if a == "base" || a == "tuned" {
                *a = fx.join(&*a).into();
            }
        }
        let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        ok(&run("boft-extract", &refs));
        let fresh = merge(&adapter, &dir.path().join("m2"));
        for (t, (_, x)) in &ours {
            let e = common::rel_err(&fresh[t].1.f32(), &x.f32());
            assert!(e <= 2e-5, "{name} {t} extracted again: {e:e}");
        }
        again += 1;
    }
    assert_eq!(again, 2, "the two one-factor cases are extracted again");
}

#[test]
fn bad_pairs_are_one_line() {
    let fx = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.safetensors");
    // Different models: shapes differ.
    let o = run(
        "boft-extract",
        &[
            &"--base",
            &fx.join("extract/base"),
            &"--tuned",
            &fx.join("peft_boft/bases/llama_f32"),
            &"-o",
            &out,
            &"--side",
            &"input",
            &"--block-size",
            &"8",
        ],
    );
    let e = fails_with(&o, "shape-mismatch");
    assert!(e.contains("in the base"), "{e}");
    assert!(!out.exists());
    // --to peft on the output side.
    let (base, tuned) = tiny();
    let o = run(
        "boft-extract",
        &[
            &"--base",
            &base,
            &"--tuned",
            &tuned,
            &"-o",
            &out,
            &"--side",
            &"output",
            &"--block-size",
            &"8",
            &"--to",
            &"peft",
        ],
    );
    fails_with(&o, "usage");
    assert!(!out.exists());
}
