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
                // PEFT's merges are written in the layout of their base.
                &"--same-layout",
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

/// The transformed tensor the element tests below change.
const CHANGED: &str = "model.layers.1.self_attn.v_proj.weight";

/// A PEFT BOFT fixture case merged by boft-merge into `dir`/case and proven by boft-verify:
/// (adapter, base, merged output, the file holding `CHANGED`, the byte where its data starts).
fn merged_and_proven(
    dir: &Path,
    case: &str,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    usize,
) {
    let c = peft_cases().into_iter().find(|c| c.name == case).unwrap();
    let (adapter, base) = (fixtures().join("peft_boft").join(&c.adapter), c.base_path());
    let out = dir.join(case);
    ok(&run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
    ));
    // Our honest output passes.
    ok(&run(
        "boft-verify",
        &[&adapter, &"--base", &base, &"--merged", &out],
    ));
    let ck = boft::checkpoint::Checkpoint::open(&out).unwrap();
    let (f, t) = ck.get(CHANGED).unwrap();
    let (path, start) = (f.path.clone(), f.data_offset + t.start);
    (adapter, base, out, path, start)
}

/// boft-verify of `out` (whose file `path` now holds `bytes`) fails, on `merged-values` of
/// `CHANGED` alone.
fn fails_on_the_changed_tensor(
    (adapter, base, out): (&Path, &Path, &Path),
    path: &Path,
    bytes: Vec<u8>,
    what: &str,
) {
    std::fs::write(path, bytes).unwrap();
    let o = run(
        "boft-verify",
        &[&adapter, &"--base", &base, &"--merged", &out, &"--json"],
    );
    assert_eq!(o.status.code(), Some(1), "{what}: {}", stderr(&o));
    let v = json(&o);
    let failed = v["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{what}: {failed:?}");
    assert_eq!(failed[0], format!("merged-values:{CHANGED}"), "{what}");
}

#[test]
fn merged_checkpoint_with_one_changed_element_fails_and_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for (case, dtype_size) in [("llama_f32_f2", 4usize), ("llama_bf16_f2", 2)] {
        let (adapter, base, out, path, start) = merged_and_proven(tmp.path(), case);
        // Change one element of a transformed tensor by a few units in the last place.
        let at = start + 37 * dtype_size;
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
        fails_on_the_changed_tensor((&adapter, &base, &out), &path, bytes, case);
    }
}

#[test]
fn a_merged_tensor_holding_inf_or_nan_fails() {
    // A non-finite value where base ⊕ adapter is finite fails, whatever else the tensor holds:
    // an infinity makes the tensor's largest magnitude (and so the allowance near zero)
    // infinite, which must not turn into a pass.
    let tmp = tempfile::tempdir().unwrap();
    for (case, dtype_size) in [("llama_f32_f2", 4usize), ("llama_bf16_f2", 2)] {
        let (adapter, base, out, path, start) = merged_and_proven(tmp.path(), case);
        let clean = std::fs::read(&path).unwrap();
        let put = |bytes: &mut Vec<u8>, i: usize, v: f32| {
            let at = start + i * dtype_size;
            if dtype_size == 4 {
                bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
            } else {
                let b = (v.to_bits() >> 16) as u16;
                bytes[at..at + 2].copy_from_slice(&b.to_le_bytes());
            }
        };
        let kinds: [&[(usize, f32)]; 4] = [
            &[(37, f32::INFINITY)],
            &[(37, f32::NEG_INFINITY)],
            &[(37, f32::NAN)],
            &[(5, f32::NAN), (37, f32::INFINITY)],
        ];
        for kind in kinds {
            let mut bytes = clean.clone();
            for &(i, v) in kind {
                put(&mut bytes, i, v);
            }
            let what = format!("{case} {kind:?}");
            fails_on_the_changed_tensor((&adapter, &base, &out), &path, bytes, &what);
        }
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
        // Shared blocks whose count only a base gives, measured alone (row A42).
        vec![
            "--json".into(),
            fixtures()
                .join("peft_oft/adapters/llama_f32_block_share")
                .into_os_string(),
        ],
    ];
    for args in runs {
        let o = bin("boft-verify").args(&args).output().unwrap();
        let v = json(&o);
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}");
    }
}

/// The elements of every tensor of a checkpoint.
fn total_elements(path: &Path) -> u64 {
    tensors(path)
        .values()
        .map(|(_, t)| t.shape.iter().product::<usize>() as u64)
        .sum()
}

/// Copy a checkpoint folder (file modes as usual) to `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Change element `index` of tensor `name` in a checkpoint (file or folder) in place: f32 by
/// 1e-3 of its magnitude, 16-bit types by three units in the last place.
fn tamper(ck_path: &Path, name: &str, index: usize) {
    let ck = boft::checkpoint::Checkpoint::open(ck_path).unwrap();
    let (f, t) = ck.get(name).unwrap();
    let size = t.dtype.float_size().unwrap();
    let at = f.data_offset + t.start + index * size;
    let path = f.path.clone();
    drop(ck);
    let mut bytes = std::fs::read(&path).unwrap();
    if size == 4 {
        let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let changed = v + 1e-3 * v.abs().max(0.01);
        bytes[at..at + 4].copy_from_slice(&changed.to_le_bytes());
    } else {
        let v = u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        bytes[at..at + 2].copy_from_slice(&(v + 3).to_le_bytes());
    }
    std::fs::write(&path, bytes).unwrap();
}

/// A single safetensors file holding the tensors of `src` that `keep` selects (all of them
/// byte for byte), or none.
fn write_subset(src: &Path, keep: impl Fn(&str) -> bool, out: &Path) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    if src.exists() {
        for (name, (_, t)) in tensors(src) {
            if !keep(&name) {
                continue;
            }
            let start = data.len();
            data.extend_from_slice(&t.bytes);
            header.insert(
                name,
                serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [start, data.len()]}),
            );
        }
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(out, bytes).unwrap();
}

fn failed(v: &serde_json::Value) -> Vec<String> {
    v["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[derive(serde::Deserialize)]
struct Resharded {
    name: String,
    base: String,
    adapter: Option<String>,
    checkpoint: String,
    kind: String,
    shards: std::collections::BTreeMap<String, usize>,
    base_shards: std::collections::BTreeMap<String, usize>,
}

fn resharded() -> Vec<Resharded> {
    serde_json::from_slice(&std::fs::read(fixtures().join("resharded/manifest.json")).unwrap())
        .unwrap()
}

#[test]
fn peft_merge_saved_by_transformers_with_other_shards_is_proven_and_one_changed_element_fails() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<Resharded> = resharded()
        .into_iter()
        .filter(|c| c.kind == "merged")
        .collect();
    assert_eq!(cases.len(), 2);
    for c in cases {
        let (base, adapter, merged) = (
            fx.join(&c.base),
            fx.join(c.adapter.as_ref().unwrap()),
            fx.join(&c.checkpoint),
        );
        assert_ne!(
            c.shards.len(),
            c.base_shards.len(),
            "{}: not re-sharded",
            c.name
        );
        let o = run(
            "boft-verify",
            &[&adapter, &"--base", &base, &"--merged", &merged, &"--json"],
        );
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        assert_eq!(v["passed"], true, "{}", c.name);
        // Every tensor of the base compared by name, every element counted.
        let m = &v["merged"];
        let n = tensors(&base).len();
        assert_eq!(m["tensors"], n, "{}", c.name);
        assert_eq!(m["elements"], total_elements(&base), "{}", c.name);
        assert_eq!(
            (m["transformed"].as_u64(), m["untouched"].as_u64()),
            (Some(14), Some(15))
        );
        assert_eq!(
            (m["missing"].as_u64(), m["extra"].as_u64()),
            (Some(0), Some(0))
        );
        assert_eq!(m["same_layout"], false);
        let checks = v["checks"].as_array().unwrap();
        for id in ["merged-tensors", "merged-values", "merged-untouched"] {
            assert!(
                checks
                    .iter()
                    .any(|x| x["check"] == id && x["status"] == "pass"),
                "{}: no passing {id}",
                c.name
            );
        }
        // The layout differs: reported, not a failure...
        let layout: Vec<_> = checks
            .iter()
            .filter(|x| x["check"] == "merged-layout")
            .collect();
        assert_eq!(layout.len(), 1);
        assert_eq!(layout[0]["status"], "info");
        // ...unless --same-layout asks for it.
        let o = run(
            "boft-verify",
            &[
                &adapter,
                &"--base",
                &base,
                &"--merged",
                &merged,
                &"--json",
                &"--same-layout",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{}", c.name);
        assert_eq!(
            failed(&json(&o)),
            vec![format!("merged-layout:{}", merged.display())]
        );

        // One element changed: fails, naming the tensor and the element.
        let copy = tmp.path().join(&c.name);
        copy_dir(&merged, &copy);
        let target = "model.layers.1.self_attn.v_proj.weight";
        tamper(&copy, target, 37);
        let o = run(
            "boft-verify",
            &[&adapter, &"--base", &base, &"--merged", &copy, &"--json"],
        );
        assert_eq!(o.status.code(), Some(1), "{}: {}", c.name, stderr(&o));
        let v = json(&o);
        assert_eq!(
            failed(&v),
            vec![format!("merged-values:{target}")],
            "{}",
            c.name
        );
        let bad = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["status"] == "fail")
            .unwrap();
        assert_eq!(bad["element"]["index"], 37);
        assert_eq!(bad["element"]["coords"], serde_json::json!([0, 37]));
        assert!(bad["element"]["ulps"].as_f64().unwrap() > 1.0, "{bad}");
        assert_ne!(bad["element"]["expected"], bad["element"]["found"]);
        // The table says the same.
        let o = run(
            "boft-verify",
            &[&adapter, &"--base", &base, &"--merged", &copy],
        );
        assert_eq!(o.status.code(), Some(1));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!(
                "FAIL merged-values {target}: element 37 [0, 37]: found"
            )) && text.contains("ulp apart"),
            "{text}"
        );
    }
}

#[test]
fn resharded_base_given_as_the_merged_checkpoint_fails() {
    let fx = fixtures();
    let c = resharded().into_iter().find(|c| c.kind == "base").unwrap();
    let base = fx.join(&c.base);
    let adapter = fx.join("peft_boft/adapters/llama_bf16_f2");
    let resharded = fx.join(&c.checkpoint);
    for only in [None, Some("merged-values")] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &adapter,
            &"--base",
            &base,
            &"--merged",
            &resharded,
            &"--json",
        ];
        if let Some(o) = &only {
            args.push(&"--checks");
            args.push(o);
        }
        let o = run("boft-verify", &args);
        assert_eq!(o.status.code(), Some(1), "{only:?}: {}", stderr(&o));
        let v = json(&o);
        let f = failed(&v);
        assert_eq!(f.len(), 14, "{f:?}");
        assert!(
            f.iter()
                .all(|x| x.starts_with("merged-values:model.layers.")),
            "{f:?}"
        );
        assert_eq!(v["merged"]["transformed"], 14);
    }
}

#[test]
fn every_check_selected_alone_with_nothing_to_examine_fails() {
    let fx = fixtures();
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // An adapter with no targets: only llama_f32_f3's replaced tensors (lm_head, q/k/v/o biases).
    let mut a = boft::formats::load(&fx.join("peft_boft/adapters/llama_f32_f3")).unwrap();
    a.targets.clear();
    assert!(!a.replacements.is_empty());
    let replaced: Vec<String> = a.replacements.iter().map(|r| r.name.clone()).collect();
    let no_targets = t.join("no-targets.safetensors");
    std::fs::write(&no_targets, canonical::to_bytes(&a).unwrap()).unwrap();
    // An adapter with nothing at all, a checkpoint with no tensors.
    a.replacements.clear();
    let nothing = t.join("nothing.safetensors");
    std::fs::write(&nothing, canonical::to_bytes(&a).unwrap()).unwrap();
    let empty = t.join("empty.safetensors");
    write_subset(Path::new("/nonexistent"), |_| true, &empty);
    // Targets without a per-row scale.
    let unscaled = broken_canonical(t, |a| {
        for x in &mut a.targets {
            x.scale = None;
        }
    });
    // Output-side targets only (LyCORIS), with their base.
    let ly = ref_cases("lycoris").into_iter().next().unwrap();
    // The llama_f32_f2 merge split in two: only the targeted tensors, only the others.
    let base = fx.join("peft_boft/bases/llama_f32");
    let f2 = fx.join("peft_boft/adapters/llama_f32_f2");
    let merged = fx.join("peft_boft/merged/llama_f32_f2");
    let is_target = |n: &str| n.starts_with("model.layers.") && n.ends_with("proj.weight");
    let only_targets = t.join("only-targets.safetensors");
    write_subset(&merged, is_target, &only_targets);
    let only_others = t.join("only-others.safetensors");
    write_subset(&merged, |n| !is_target(n), &only_others);

    type Args = Vec<std::ffi::OsString>;
    let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| -> Args {
        v.iter().map(|x| x.as_ref().to_os_string()).collect()
    };
    let b = fx.join("peft_boft/bases/llama_f32");
    let cases: Vec<(&str, Args)> = boft::verify::CHECKS
        .iter()
        .map(|&id| {
            let args = match id {
                "scale-range" => os(&[&unscaled]),
                "target-present" | "base-compatible" => os(&[&nothing, &"--base", &b]),
                "hyperspherical-energy" => os(&[&ly.adapter_path(), &"--base", &ly.base_path()]),
                "merged-tensors" => os(&[&nothing, &"--base", &empty, &"--merged", &empty]),
                "merged-untouched" => os(&[&f2, &"--base", &base, &"--merged", &only_targets]),
                "merged-values" => os(&[&f2, &"--base", &base, &"--merged", &only_others]),
                "restored-values" => os(&[&f2, &"--base", &base, &"--restored", &only_others]),
                // A layout is always there to report: its subject is the checkpoint itself.
                "merged-layout" => return (id, vec![]),
                _ => os(&[&no_targets]),
            };
            (id, args)
        })
        .collect();
    assert_eq!(cases.len(), boft::verify::CHECKS.len());
    for (id, args) in cases {
        if args.is_empty() {
            continue;
        }
        let o = bin("boft-verify")
            .args(&args)
            .args(["--json", "--checks", id])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{id}: {}", stderr(&o));
        let v = json(&o);
        assert_eq!(failed(&v), vec![format!("{id}:(nothing)")], "{id}");
        let c = &v["checks"][0];
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .starts_with("nothing to examine"),
            "{id}: {c}"
        );
        // The table says so too.
        let o = bin("boft-verify")
            .args(&args)
            .args(["--checks", id])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!("FAIL {id} (nothing): nothing to examine")),
            "{text}"
        );
    }
    // The same inputs without --checks: the gate fails too (conditional checks aside).
    let o = run("boft-verify", &[&no_targets, &"--json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(failed(&json(&o)).contains(&"block-orthogonality:(nothing)".to_string()));
    let o = run(
        "boft-verify",
        &[&f2, &"--base", &base, &"--merged", &only_others, &"--json"],
    );
    assert_eq!(o.status.code(), Some(1));
    let f = failed(&json(&o));
    assert!(f.contains(&"merged-values:(nothing)".to_string()), "{f:?}");
    assert!(
        f.iter()
            .any(|x| x.starts_with("merged-tensors:model.layers.")),
        "{f:?}"
    );
    // The replaced tensors of no_targets are looked up: target-present has subjects there.
    let o = run(
        "boft-verify",
        &[
            &no_targets,
            &"--base",
            &b,
            &"--json",
            &"--checks",
            &"target-present",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["checks"].as_array().unwrap().len(), replaced.len());
    // A check whose input is missing is a usage error, not a pass.
    for (id, needs) in [
        ("target-present", "--base"),
        ("base-compatible", "--base"),
        ("hyperspherical-energy", "--base"),
        ("merged-layout", "--merged"),
        ("merged-tensors", "--merged"),
        ("merged-untouched", "--merged"),
        ("merged-values", "--merged"),
        ("restored-values", "--restored"),
    ] {
        let err = fails_with(&run("boft-verify", &[&f2, &"--checks", &id]), "usage");
        assert!(
            err.contains(&format!("check {id} needs")) && err.contains(needs),
            "{err}"
        );
    }
    let err = fails_with(
        &run(
            "boft-verify",
            &[
                &f2,
                &"--base",
                &base,
                &"--merged",
                &merged,
                &"--checks",
                &"restored-values",
            ],
        ),
        "usage",
    );
    assert!(err.contains("--restored"), "{err}");
    fails_with(&run("boft-verify", &[&f2, &"--checks", &","]), "usage");
    fails_with(&run("boft-verify", &[&f2, &"--same-layout"]), "usage");
}

#[test]
fn unmerge_is_proven_against_the_base_within_its_rounding_and_a_tampered_one_fails() {
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    for case in ["llama_bf16_f2", "llama_f32_f2"] {
        let c = peft_cases().into_iter().find(|c| c.name == case).unwrap();
        let (base, adapter) = (c.base_path(), fx.join(&c.adapter));
        let merged = tmp.path().join(format!("{case}-merged"));
        let restored = tmp.path().join(format!("{case}-restored"));
        merge_then_unmerge(&base, &adapter, &merged, &restored);
        // boft-merge's own outputs keep the layout: --same-layout holds for both.
        ok(&run(
            "boft-verify",
            &[
                &adapter,
                &"--base",
                &base,
                &"--merged",
                &merged,
                &"--same-layout",
            ],
        ));
        let v: serde_json::Value = serde_json::from_str(&ok(&run(
            "boft-verify",
            &[
                &adapter,
                &"--base",
                &base,
                &"--restored",
                &restored,
                &"--same-layout",
                &"--json",
            ],
        )))
        .unwrap();
        assert_eq!(v["merged"]["proof"], "restored");
        assert_eq!(v["merged"]["tensors"], tensors(&base).len());
        let values: Vec<_> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["check"] == "restored-values")
            .collect();
        assert_eq!(values.len(), 14);
        assert!(values.iter().all(|x| x["status"] == "pass"));
        if case == "llama_bf16_f2" {
            // Not bit-identical to the base: the merged tensors were rounded to bf16.
            let b = tensors(&base);
            let r = tensors(&restored);
            let name = "model.layers.0.mlp.up_proj.weight";
            let (bb, rb) = (&b[name].1.bytes, &r[name].1.bytes);
            let differ = bb
                .chunks(2)
                .zip(rb.chunks(2))
                .filter(|(x, y)| x != y)
                .count();
            assert!(differ > 0, "un-merge of a bf16 merge came back bit-exact");
            // The merged checkpoint is not a restored base.
            let o = run(
                "boft-verify",
                &[
                    &adapter,
                    &"--base",
                    &base,
                    &"--restored",
                    &merged,
                    &"--json",
                ],
            );
            assert_eq!(o.status.code(), Some(1));
            assert_eq!(failed(&json(&o)).len(), 14);
        }
        // One element changed: fails naming it.
        let target = "model.layers.0.self_attn.k_proj.weight";
        tamper(&restored, target, 100);
        let o = run(
            "boft-verify",
            &[
                &adapter,
                &"--base",
                &base,
                &"--restored",
                &restored,
                &"--json",
            ],
        );
        assert_eq!(o.status.code(), Some(1), "{case}");
        let v = json(&o);
        assert_eq!(
            failed(&v),
            vec![format!("restored-values:{target}")],
            "{case}"
        );
        let bad = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["status"] == "fail")
            .unwrap();
        assert_eq!(bad["element"]["index"], 100);
        assert_eq!(bad["element"]["coords"], serde_json::json!([1, 36]));
    }
}

#[test]
fn summaries_say_only_what_is_true() {
    let tmp = tempfile::tempdir().unwrap();
    // A LyCORIS file carries no version: no empty "()".
    let ly = ref_cases("lycoris").into_iter().next().unwrap();
    let out = ok(&run(
        "boft-convert",
        &[&ly.adapter_path(), &"-o", &tmp.path().join("c.safetensors")],
    ));
    assert!(!out.contains("()"), "{out}");
    // The byte count is every tensor byte written, not just the copied ones.
    let fx = fixtures().join("peft_boft");
    let base = fx.join("bases/llama_f32");
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &fx.join("adapters/llama_f32_f1"),
            &"-o",
            &tmp.path().join("m"),
        ],
    );
    ok(&o);
    let bytes: usize = tensors(&base).values().map(|(_, t)| t.bytes.len()).sum();
    let err = stderr(&o);
    assert!(
        err.contains(&format!("copied; {bytes} bytes of tensor data written")),
        "{err}"
    );
}
