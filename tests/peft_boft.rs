//! Merging real PEFT BOFT adapters: our output against PEFT's own merge_and_unload(), tensor by
//! tensor, on the fixtures made by fixtures/generate/make_peft_boft.py.

mod common;

use std::path::Path;

use boft::checkpoint::Dtype;
use common::*;

/// f32: within 2e-5 of the tensor's largest magnitude. 16-bit: within one ulp of the element,
/// unless the element is so small that f32 summation order alone (2e-6 of the tensor's largest
/// magnitude) moves it by more — PEFT builds M densely and sums in another order, so elements
/// that cancel to near zero cannot be matched to their own ulp by any implementation.
fn assert_close(name: &str, dt: Dtype, ours: &[f32], theirs: &[f32]) {
    match dt {
        Dtype::F32 => {
            let e = rel_err(ours, theirs);
            assert!(e <= 2e-5, "{name}: relative error {e:e} > 2e-5");
        }
        Dtype::BF16 | Dtype::F16 => {
            let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                let u = ulps(dt, a, b);
                assert!(
                    u <= 1.0 || (a - b).abs() <= 2e-6 * scale,
                    "{name}[{i}]: ours {a} vs PEFT {b}: {u} ulp"
                );
            }
        }
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// Same files, same shard membership, untouched tensors byte-identical, targeted ones close.
fn assert_merge_matches(out: &Path, expected: &Path, base: &Path) {
    if base.is_dir() {
        assert_eq!(
            file_list(out),
            file_list(base),
            "output layout differs from the base"
        );
    }
    let ours = tensors(out);
    let theirs = tensors(expected);
    let orig = tensors(base);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut changed = 0;
    for (name, (file, t)) in &ours {
        let (efile, e) = &theirs[name];
        let (_, b) = &orig[name];
        if base.is_dir() {
            assert_eq!(file, efile, "{name} moved to another shard");
        }
        assert_eq!(
            (t.dtype, &t.shape),
            (e.dtype, &e.shape),
            "{name}: dtype/shape"
        );
        if e.bytes == b.bytes {
            assert_eq!(
                t.bytes, b.bytes,
                "{name}: untouched tensor not byte-identical"
            );
        } else {
            changed += 1;
            assert_close(name, t.dtype, &t.f32(), &e.f32());
        }
    }
    assert!(
        changed > 0,
        "the fixture changed nothing: it proves nothing"
    );
    // Non-tensor files are copied verbatim.
    if base.is_dir() {
        for rel in file_list(base) {
            if rel.extension().is_some_and(|e| e == "safetensors") {
                continue;
            }
            assert_eq!(
                std::fs::read(out.join(&rel)).unwrap(),
                std::fs::read(base.join(&rel)).unwrap(),
                "{} differs",
                rel.display()
            );
        }
        // Header bytes (metadata included) are kept as they were.
        for rel in file_list(base) {
            if rel.extension().is_some_and(|e| e == "safetensors") {
                let a = std::fs::read(out.join(&rel)).unwrap();
                let b = std::fs::read(base.join(&rel)).unwrap();
                let n = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                assert_eq!(a[..n], b[..n], "{}: header changed", rel.display());
            }
        }
    }
}

fn out_path(dir: &Path, base: &Path) -> std::path::PathBuf {
    if base.is_dir() {
        dir.join("out")
    } else {
        dir.join("out.safetensors")
    }
}

#[test]
fn merges_match_peft_merge_and_unload() {
    let fx = fixtures().join("peft_boft");
    let cases = peft_cases();
    assert!(cases.len() >= 8);
    for c in &cases {
        let tmp = tempfile::tempdir().unwrap();
        let base_path = c.base_path();
        let out = out_path(tmp.path(), &base_path);
        let before = snapshot(&base_path);
        ok(&run(
            "boft-merge",
            &[
                &"--base",
                &base_path,
                &"--adapter",
                &fx.join(&c.adapter),
                &"-o",
                &out,
            ],
        ));
        assert_eq!(snapshot(&base_path), before, "{}: base modified", c.name);
        let expected = if base_path.is_dir() {
            fx.join(&c.merged)
        } else {
            fx.join(&c.merged).join("model.safetensors")
        };
        assert_merge_matches(&out, &expected, &base_path);
    }
}

#[test]
fn unmerge_restores_the_base() {
    let fx = fixtures().join("peft_boft");
    for c in peft_cases().iter().filter(|c| c.base_dtype == "float32") {
        let tmp = tempfile::tempdir().unwrap();
        let base_path = c.base_path();
        let merged = out_path(tmp.path(), &base_path);
        ok(&run(
            "boft-merge",
            &[
                &"--base",
                &base_path,
                &"--adapter",
                &fx.join(&c.adapter),
                &"-o",
                &merged,
            ],
        ));
        let cfg = std::fs::read_to_string(fx.join(&c.adapter).join("adapter_config.json")).unwrap();
        let back = tmp.path().join(if base_path.is_dir() {
            "back"
        } else {
            "back.safetensors"
        });
        let o = run(
            "boft-merge",
            &[
                &"--base",
                &merged,
                &"--adapter",
                &fx.join(&c.adapter),
                &"-o",
                &back,
                &"--unmerge",
            ],
        );
        let mut replaced = std::collections::BTreeSet::new();
        if cfg.contains("modules_to_save\": [") || cfg.contains("\"bias\": \"boft_only\"") {
            // Replaced tensors cannot be restored: refused, not silently wrong...
            fails_with(&o, "bad-adapter");
            assert!(!back.exists());
            // ...unless asked to leave them as they are; everything else comes back.
            ok(&run(
                "boft-merge",
                &[
                    &"--base",
                    &merged,
                    &"--adapter",
                    &fx.join(&c.adapter),
                    &"-o",
                    &back,
                    &"--unmerge",
                    &"--keep-replaced",
                ],
            ));
            let m = tensors(&merged);
            let adapter = boft::formats::load(&fx.join(&c.adapter)).unwrap();
            for r in &adapter.replacements {
                assert_eq!(
                    tensors(&back)[&r.name].1.bytes,
                    m[&r.name].1.bytes,
                    "{}",
                    r.name
                );
                replaced.insert(r.name.clone());
            }
            assert!(!replaced.is_empty());
        } else {
            ok(&o);
        }
        let orig = tensors(&base_path);
        for (name, (_, t)) in tensors(&back) {
            if replaced.contains(&name) {
                continue;
            }
            let b = &orig[&name].1;
            let e = rel_err(&t.f32(), &b.f32());
            assert!(e <= 1e-5, "{}: {name}: un-merge error {e:e}", c.name);
        }
    }
}

#[test]
fn convert_then_merge_equals_merging_the_folder() {
    let fx = fixtures().join("peft_boft");
    for c in peft_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let base_path = c.base_path();
        let canon = tmp.path().join("adapter.safetensors");
        let summary = ok(&run(
            "boft-convert",
            &[&fx.join(&c.adapter), &"-o", &canon, &"--base", &base_path],
        ));
        assert!(summary.contains("targets"), "{summary}");
        std::fs::create_dir(tmp.path().join("a")).unwrap();
        std::fs::create_dir(tmp.path().join("b")).unwrap();
        let a = out_path(&tmp.path().join("a"), &base_path);
        let b = out_path(&tmp.path().join("b"), &base_path);
        ok(&run(
            "boft-merge",
            &[
                &"--base",
                &base_path,
                &"--adapter",
                &fx.join(&c.adapter),
                &"-o",
                &a,
            ],
        ));
        ok(&run(
            "boft-merge",
            &[&"--base", &base_path, &"--adapter", &canon, &"-o", &b],
        ));
        assert_eq!(
            snapshot(&a),
            snapshot(&b),
            "{}: canonical merge differs",
            c.name
        );
    }
}
