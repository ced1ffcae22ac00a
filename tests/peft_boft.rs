//! Merging real PEFT BOFT adapters: our output against PEFT's own merge_and_unload(), tensor by
//! tensor, on the fixtures made by fixtures/generate/make_peft_boft.py.

mod common;

use common::*;

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
