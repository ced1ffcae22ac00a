//! boft-verify as a CI gate: honest inputs pass, each kind of broken input fails with the right
//! exit code and names the module and the check.

mod common;

use std::path::Path;

use boft::adapter::canonical;
use common::*;

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(o)))
}

#[test]
fn every_fixture_adapter_passes_with_its_base_and_peft_merge() {
    for c in peft_cases() {
        let fx = fixtures().join("peft_boft");
        let base = c.base_path();
        let merged = if base.is_dir() {
            fx.join(&c.merged)
        } else {
            fx.join(&c.merged).join("model.safetensors")
        };
        let o = run(
            "boft-verify",
            &[
                &fx.join(&c.adapter),
                &"--base",
                &base,
                &"--merged",
                &merged,
                &"--json",
            ],
        );
        let out = ok(&o);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["passed"], true, "{}: {}", c.name, out);
        let checks = v["checks"].as_array().unwrap();
        for id in [
            "block-orthogonality",
            "transform-orthogonality",
            "hyperspherical-energy",
            "merged-values",
            "merged-untouched",
            "merged-layout",
        ] {
            assert!(
                checks
                    .iter()
                    .any(|x| x["check"] == id && x["status"] == "pass"),
                "{}: no passing {id} check",
                c.name
            );
        }
    }
}

/// Load a fixture adapter, let `edit` break it, write it as a canonical file.
fn broken_canonical(
    dir: &Path,
    edit: impl FnOnce(&mut boft::adapter::Adapter),
) -> std::path::PathBuf {
    let mut a = boft::formats::load(&fixtures().join("peft_boft/adapters/llama_f32_f2")).unwrap();
    edit(&mut a);
    let p = dir.join("broken.safetensors");
    std::fs::write(&p, canonical::to_bytes(&a).unwrap()).unwrap();
    p
}

#[test]
fn non_orthogonal_block_fails_with_exit_1_naming_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let p = broken_canonical(tmp.path(), |a| {
        let t = &mut a.targets[3];
        t.data[5] += 0.05;
    });
    let o = run("boft-verify", &[&p, &"--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v = json(&o);
    let name = boft::formats::load(&fixtures().join("peft_boft/adapters/llama_f32_f2"))
        .unwrap()
        .targets[3]
        .name
        .clone();
    let failed: Vec<String> = v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert!(
        failed.contains(&format!("block-orthogonality:{name}")),
        "{failed:?}"
    );
    // The table names it too.
    let o = run("boft-verify", &[&p]);
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("FAIL block-orthogonality {name}")),
        "{text}"
    );
}

#[test]
fn nan_in_adapter_is_refused_naming_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let p = broken_canonical(tmp.path(), |a| a.targets[0].data[0] = f32::NAN);
    let err = fails_with(&run("boft-verify", &[&p]), "non-finite");
    assert!(err.contains("model.layers"), "{err}");
}

#[test]
fn broken_permutation_is_refused_naming_the_module() {
    let tmp = tempfile::tempdir().unwrap();
    let p = broken_canonical(tmp.path(), |a| {
        let t = &mut a.targets[1];
        let mut p = t.perms[1].clone().unwrap();
        p[0] = p[1];
        t.perms[1] = Some(p);
    });
    let err = fails_with(&run("boft-verify", &[&p]), "bad-adapter");
    assert!(
        err.contains("not a permutation") && err.contains("model.layers"),
        "{err}"
    );
}

#[test]
fn adapter_for_another_base_fails() {
    // A 64-wide llama adapter against the conv model: its targets are absent.
    let o = run(
        "boft-verify",
        &[
            &fixtures().join("peft_boft/adapters/llama_f32_f1"),
            &"--base",
            &fixtures().join("peft_boft/bases/conv/model.safetensors"),
            &"--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    let failed = v["failed"].as_array().unwrap();
    assert!(failed.iter().any(|f| f
        .as_str()
        .unwrap()
        .starts_with("target-present:model.layers.0")));
    // Same names, wrong shapes: the bf16 base has the same architecture, so build a mismatch
    // by checking a conv adapter (fc is 48 wide) against a canonical file edited to 96 blocks.
    let tmp = tempfile::tempdir().unwrap();
    let p = broken_canonical(tmp.path(), |a| {
        for t in &mut a.targets {
            t.shape = Some(vec![7, 7]);
        }
    });
    let o = run(
        "boft-verify",
        &[
            &p,
            &"--base",
            &fixtures().join("peft_boft/bases/llama_f32"),
            &"--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert!(v["failed"].as_array().unwrap().iter().any(|f| f
        .as_str()
        .unwrap()
        .starts_with("base-compatible:model.layers")));
}

#[test]
fn merged_checkpoint_with_one_changed_element_fails_and_names_the_tensor() {
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    for (case, dtype_size) in [("llama_f32_f2", 4usize), ("llama_bf16_f2", 2)] {
        let c = peft_cases().into_iter().find(|c| c.name == case).unwrap();
        let base = c.base_path();
        let out = tmp.path().join(case);
        ok(&run(
            "boft-merge",
            &[
                &"--base",
                &base,
                &"--adapter",
                &fx.join(&c.adapter),
                &"-o",
                &out,
            ],
        ));
        // Our honest output passes.
        ok(&run(
            "boft-verify",
            &[&fx.join(&c.adapter), &"--base", &base, &"--merged", &out],
        ));
        // Change one element of a transformed tensor by a few units in the last place.
        let ck = boft::checkpoint::Checkpoint::open(&out).unwrap();
        let target = "model.layers.1.self_attn.v_proj.weight";
        let (f, t) = ck.get(target).unwrap();
        let at = f.data_offset + t.start + 37 * dtype_size;
        let path = f.path.clone();
        drop(ck);
        let mut bytes = std::fs::read(&path).unwrap();
        if dtype_size == 4 {
            let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let changed = v + 1e-3 * v.abs().max(0.01);
            bytes[at..at + 4].copy_from_slice(&changed.to_le_bytes());
        } else {
            // three bf16 ulps
            let v = u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
            bytes[at..at + 2].copy_from_slice(&(v + 3).to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let o = run(
            "boft-verify",
            &[
                &fx.join(&c.adapter),
                &"--base",
                &base,
                &"--merged",
                &out,
                &"--json",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{case}: {}", stderr(&o));
        let v = json(&o);
        let failed = v["failed"].as_array().unwrap();
        assert_eq!(failed.len(), 1, "{case}: {failed:?}");
        assert_eq!(failed[0], format!("merged-values:{target}"));
    }
}

#[test]
fn changed_untouched_tensor_fails_merged_untouched() {
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let base = fx.join("bases/llama_f32");
    ok(&run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &fx.join("adapters/llama_f32_f1"),
            &"-o",
            &out,
        ],
    ));
    let ck = boft::checkpoint::Checkpoint::open(&out).unwrap();
    let (f, t) = ck.get("model.norm.weight").unwrap();
    let at = f.data_offset + t.start;
    drop(ck);
    let p = out.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[at] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let o = run(
        "boft-verify",
        &[
            &fx.join("adapters/llama_f32_f1"),
            &"--base",
            &base,
            &"--merged",
            &out,
            &"--json",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(json(&o)["failed"][0], "merged-untouched:model.norm.weight");
}

#[test]
fn usage_errors_exit_2() {
    let a = fixtures().join("peft_boft/adapters/llama_f32_f1");
    fails_with(&run("boft-verify", &[&a, &"--checks", &"bogus"]), "usage");
    fails_with(&run("boft-verify", &[&a, &"--merged", &a]), "usage");
    fails_with(&run("boft-verify", &[&"/nonexistent/adapter"]), "not-found");
    fails_with(&run("boft-verify", &[&a, &"--bogus"]), "usage");
    fails_with(&run("boft-verify", &[]), "usage");
}

#[test]
fn checks_can_be_selected() {
    let a = fixtures().join("peft_boft/adapters/llama_f32_f1");
    let v: serde_json::Value = serde_json::from_str(&ok(&run(
        "boft-verify",
        &[&a, &"--json", &"--checks", &"block-orthogonality"],
    )))
    .unwrap();
    let checks = v["checks"].as_array().unwrap();
    assert!(!checks.is_empty());
    assert!(checks.iter().all(|c| c["check"] == "block-orthogonality"));
}

#[test]
fn json_output_validates_against_the_documented_schema() {
    let schema: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/verify-schema.json"))
            .unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema is valid");
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    let broken = broken_canonical(tmp.path(), |a| a.targets[0].data[3] += 0.1);
    let p = |s: &str| fx.join(s).into_os_string();
    let runs: Vec<Vec<std::ffi::OsString>> = vec![
        vec![
            "--json".into(),
            p("adapters/llama_f32_f3"),
            "--base".into(),
            p("bases/llama_f32"),
            "--merged".into(),
            p("merged/llama_f32_f3"),
        ],
        vec![
            "--json".into(),
            p("adapters/conv_f2"),
            p("adapters/llama_bf16_f2"),
        ],
        vec!["--json".into(), broken.into_os_string()],
    ];
    for args in runs {
        let o = bin("boft-verify").args(&args).output().unwrap();
        let v = json(&o);
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
    }
}
