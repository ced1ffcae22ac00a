//! `boft-convert --to peft|lycoris`: exports read back by our importer merge like the original;
//! the target library's merge of each export (fixtures/export, made by
//! fixtures/generate/make_export.py with PEFT 0.21.2 / LyCORIS 4.1.3) equals our merge
//! of the original; what cannot be exported exactly is refused with one line and no output.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

fn fx(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// `boft-convert <src> --to <to> -o <out> [--base <base>]`, asserting success.
fn export(src: &Path, to: &str, out: &Path, base: Option<&Path>) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&src, &"--to", &to, &"-o", &out];
    if let Some(b) = &base {
        args.push(&"--base");
        args.push(b);
    }
    let o = run("boft-convert", &args);
    let stdout = ok(&o);
    assert!(stdout.contains("wrote"), "{stdout}");
}

/// Merge `adapter` into `base` with boft-merge; returns the output path.
fn merge(base: &Path, adapter: &Path, dir: &Path, tag: &str) -> PathBuf {
    let out = if base.is_dir() {
        dir.join(tag)
    } else {
        dir.join(format!("{tag}.safetensors"))
    };
    ok(&run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
    ));
    out
}

/// Two merges of one base hold the same tensors (f32 within 2e-5 of the tensor's scale, 16-bit
/// within one ulp), and at least one tensor changed.
fn assert_same_merge(what: &str, a: &Path, b: &Path, base: &Path) {
    let (ta, tb, orig) = (tensors(a), tensors(b), tensors(base));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut changed = 0;
    for (name, (_, x)) in &ta {
        let y = &tb[name].1;
        assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{what}: {name}");
        if x.bytes != y.bytes {
            assert_close(&format!("{what}: {name}"), x.dtype, &x.f32(), &y.f32());
        }
        changed += usize::from(x.bytes != orig[name].1.bytes);
    }
    assert!(changed > 0, "{what}: the merge changed nothing");
}

/// (source relative to fixtures/, base relative to fixtures/, --to, needs --base). No bf16 base
/// for LyCORIS exports: LyCORIS (and our reading of its files) forms `A − Aᵀ` in the model's dtype,
/// so on a bf16 model its merge is not the f32 merge of the source.
const SOURCES: &[(&str, &str, &str, bool)] = &[
    (
        "peft_boft/adapters/llama_f32_f1",
        "peft_boft/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_boft/adapters/llama_f32_f3",
        "peft_boft/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_boft/adapters/llama_bf16_f2",
        "peft_boft/bases/llama_bf16_sharded",
        "peft",
        true,
    ),
    (
        "peft_boft/adapters/llama_f32_f2_adapter_bf16",
        "peft_boft/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_boft/adapters/conv_f1",
        "peft_boft/bases/conv/model.safetensors",
        "peft",
        true,
    ),
    (
        "peft_boft/adapters/conv_f2",
        "peft_boft/bases/conv/model.safetensors",
        "peft",
        true,
    ),
    (
        "peft_oft/adapters/llama_f32_cayley",
        "peft_oft/bases/llama_f32",
        "peft",
        false,
    ),
    (
        "peft_oft/adapters/llama_bf16_cayley",
        "peft_oft/bases/llama_bf16",
        "peft",
        false,
    ),
    (
        "peft_oft/adapters/llama_f32_coft_cayley",
        "peft_oft/bases/llama_f32",
        "peft",
        false,
    ),
    (
        "peft_oft/adapters/conv_cayley",
        "peft_oft/bases/conv/model.safetensors",
        "peft",
        false,
    ),
    (
        "peft_oft/adapters/llama_f32_embedding_cayley",
        "peft_oft/bases/llama_f32",
        "peft",
        false,
    ),
    (
        "peft_oft_old/adapters/v1_llama_f32_b8",
        "peft_oft_old/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_oft_old/adapters/v1_llama_f32_r4",
        "peft_oft_old/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_oft_old/adapters/v1_llama_f32_coft",
        "peft_oft_old/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_oft_old/adapters/v1_llama_f32_block_share",
        "peft_oft_old/bases/llama_f32",
        "peft",
        true,
    ),
    (
        "peft_oft_old/adapters/v1_conv",
        "peft_oft_old/bases/conv/model.safetensors",
        "peft",
        true,
    ),
    (
        "peft_oft_old/adapters/v0_llama_f32_r4",
        "peft_oft_old/bases/llama_f32",
        "lycoris",
        true,
    ),
    (
        "peft_oft_old/adapters/v0_llama_f32_block_share",
        "peft_oft_old/bases/llama_f32",
        "lycoris",
        true,
    ),
    (
        "lycoris/adapters/diag_oft_f32_constraint.safetensors",
        "lycoris/bases/unet_f32/model.safetensors",
        "lycoris",
        false,
    ),
    (
        "lycoris/adapters/diag_oft_f32_rescale.safetensors",
        "lycoris/bases/unet_f32/model.safetensors",
        "lycoris",
        true,
    ),
    (
        "lycoris/adapters/boft_f32_constraint_rescale.safetensors",
        "lycoris/bases/unet_f32/model.safetensors",
        "lycoris",
        true,
    ),
    (
        "kohya_oft/adapters/oft_attn_f32.safetensors",
        "kohya_oft/bases/unet_f32/model.safetensors",
        "lycoris",
        false,
    ),
];

/// (a) Our importer reads every export back and merges it like the original adapter.
#[test]
fn exports_read_back_and_merge_like_the_original() {
    for &(src, base, to, needs_base) in SOURCES {
        let tmp = tempfile::tempdir().unwrap();
        let (src, base) = (fx(src), fx(base));
        let out = tmp.path().join(if to == "peft" {
            "export"
        } else {
            "export.safetensors"
        });
        export(&src, to, &out, needs_base.then_some(base.as_path()));
        let ours = merge(&base, &out, tmp.path(), "from_export");
        let orig = merge(&base, &src, tmp.path(), "from_source");
        assert_same_merge(&format!("{} --to {to}", src.display()), &ours, &orig, &base);
    }
}

#[derive(serde::Deserialize, Debug)]
struct ExportCase {
    name: String,
    base: String,
    source: String,
    adapter: String,
    convert_args: Vec<String>,
    merged: Vec<RefMerged>,
}

fn export_cases() -> Vec<ExportCase> {
    let dir = fx("export");
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// The base as the binaries take it: a Hugging Face folder, or its single safetensors file.
fn base_arg(p: &Path) -> PathBuf {
    if p.is_dir() && !p.join("config.json").exists() {
        p.join("model.safetensors")
    } else {
        p.to_path_buf()
    }
}

/// Every tensor of a safetensors file or adapter folder, by name.
fn adapter_tensors(p: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let file = if p.is_dir() {
        p.join("adapter_model.safetensors")
    } else {
        p.to_path_buf()
    };
    let f = boft::checkpoint::SafeFile::open(&file).unwrap();
    f.tensors
        .iter()
        .map(|t| (t.name.clone(), (t.shape.clone(), f.data(t).to_vec())))
        .collect()
}

/// (b) The library's merge of each committed export equals our merge of the original adapter,
/// and the binary still writes that export.
#[test]
fn library_merges_of_exports_equal_our_merges_of_the_originals() {
    let cases = export_cases();
    assert!(cases.len() >= 8, "{} export cases", cases.len());
    let dir = fx("export");
    for to in ["peft", "lycoris"] {
        assert!(
            cases.iter().any(|c| c.convert_args[1] == to),
            "no {to} export case"
        );
    }
    for c in &cases {
        let tmp = tempfile::tempdir().unwrap();
        let base = dir.join(&c.base);
        let src = dir.join(&c.source);
        let committed = dir.join(&c.adapter);
        // The binary writes the committed export again (same tensors, same config).
        let out = tmp.path().join(committed.file_name().unwrap());
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&src, &"-o", &out];
        let extra: Vec<PathBuf> = c
            .convert_args
            .iter()
            .map(|a| {
                if a.contains('/') {
                    dir.join(a)
                } else {
                    PathBuf::from(a)
                }
            })
            .collect();
        for a in &extra {
            args.push(a);
        }
        ok(&run("boft-convert", &args));
        assert_eq!(
            adapter_tensors(&out),
            adapter_tensors(&committed),
            "{}: export changed",
            c.name
        );
        if committed.is_dir() {
            let cfg = |p: &Path| -> serde_json::Value {
                serde_json::from_slice(&std::fs::read(p.join("adapter_config.json")).unwrap())
                    .unwrap()
            };
            assert_eq!(cfg(&out), cfg(&committed), "{}: config changed", c.name);
        }
        // Our merge of the original against the library's merge of the export: recorded are the
        // tensors the library changed, every other one must be the base's.
        let base_arg = base_arg(&base);
        let ours = tensors(&merge(&base_arg, &src, tmp.path(), "ours"));
        let orig = tensors(&base_arg);
        let m = &c.merged[0];
        assert_eq!(m.multiplier, 1.0);
        let theirs = tensors(&dir.join(&m.path));
        for (name, (_, e)) in &theirs {
            let (_, t) = &ours[name];
            assert_eq!(
                (t.dtype, &t.shape),
                (e.dtype, &e.shape),
                "{}: {name}",
                c.name
            );
            assert_close(&format!("{}: {name}", c.name), t.dtype, &t.f32(), &e.f32());
        }
        for (name, (_, t)) in &ours {
            if !theirs.contains_key(name) {
                assert_eq!(
                    t.bytes, orig[name].1.bytes,
                    "{}: {name} changed by us, not by the library",
                    c.name
                );
            }
        }
        // And our importer reads the committed export like the library does.
        let back = tensors(&merge(&base_arg, &committed, tmp.path(), "back"));
        for (name, (_, e)) in &theirs {
            let t = &back[name].1;
            assert_close(
                &format!("{} (read back): {name}", c.name),
                t.dtype,
                &t.f32(),
                &e.f32(),
            );
        }
    }
}

/// Run boft-convert expecting a one-line `[not-exportable]` refusal (or `class`) and nothing
/// written: the output folder holds what it held before.
fn refused(args: &[&dyn AsRef<std::ffi::OsStr>], out: &Path, class: &str, says: &str) {
    let parent = out.parent().unwrap();
    let before = dir_entries(parent);
    let o = run("boft-convert", args);
    let err = fails_with(&o, class);
    assert!(err.contains(says), "expected {says:?} in: {err}");
    assert!(!out.exists(), "output left behind: {err}");
    assert_eq!(dir_entries(parent), before, "partial output left behind");
}

/// (c) What cannot be exported exactly is refused, one line, no output.
#[test]
fn inexact_exports_are_refused_without_output() {
    let tmp = tempfile::tempdir().unwrap();
    let lyco = tmp.path().join("x.safetensors");
    let peft = tmp.path().join("x");
    // Input side → LyCORIS.
    let src = fx("peft_oft/adapters/llama_f32_cayley");
    refused(
        &[&src, &"--to", &"lycoris", &"-o", &lyco],
        &lyco,
        "not-exportable",
        "input-side",
    );
    // Neumann → PEFT (and → LyCORIS: the side is checked after the blocks).
    let src = fx("peft_oft/adapters/llama_f32_neumann5");
    refused(
        &[&src, &"--to", &"peft", &"-o", &peft],
        &peft,
        "not-exportable",
        "Neumann",
    );
    // Output side → PEFT: PEFT OFT v0 and LyCORIS.
    for src in [
        fx("peft_oft_old/adapters/v0_llama_f32_r4"),
        fx("lycoris/adapters/diag_oft_f32_rescale.safetensors"),
    ] {
        refused(
            &[&src, &"--to", &"peft", &"-o", &peft],
            &peft,
            "not-exportable",
            "output-side",
        );
    }
    // Cropped blocks; and a source that may crop, without --base.
    let src = fx("peft_oft_old/adapters/v0_llama_f32_r3_cropped");
    let base = fx("peft_oft_old/bases/llama_f32");
    refused(
        &[&src, &"--to", &"lycoris", &"-o", &lyco, &"--base", &base],
        &lyco,
        "not-exportable",
        "cropped",
    );
    refused(
        &[&src, &"--to", &"lycoris", &"-o", &lyco],
        &lyco,
        "not-exportable",
        "pass --base",
    );
    // A layout that depends on the layer type, without --base.
    let src = fx("peft_boft/adapters/conv_f2");
    refused(
        &[&src, &"--to", &"peft", &"-o", &peft],
        &peft,
        "not-exportable",
        "pass --base",
    );
    // PEFT ≤ 0.13 Conv2d BOFT (kernel buffer reinterpreted): no library merges it that way now.
    let src = fx("peft_oft_old/adapters/boft_legacy_conv_f2");
    let base = fx("peft_oft_old/bases/conv/model.safetensors");
    refused(
        &[&src, &"--to", &"peft", &"-o", &peft, &"--base", &base],
        &peft,
        "not-exportable",
        "reinterpreting",
    );
    // An unknown --to is a usage error.
    let src = fx("peft_boft/adapters/conv_f2");
    refused(
        &[&src, &"--to", &"kohya", &"-o", &lyco],
        &lyco,
        "usage",
        "kohya",
    );
    // An existing output is kept without --force.
    std::fs::create_dir(&peft).unwrap();
    let src = fx("peft_oft/adapters/llama_f32_cayley");
    let o = run("boft-convert", &[&src, &"--to", &"peft", &"-o", &peft]);
    fails_with(&o, "output-exists");
    assert_eq!(dir_entries(&peft), Vec::<String>::new());
    ok(&run(
        "boft-convert",
        &[&src, &"--to", &"peft", &"-o", &peft, &"--force"],
    ));
    assert!(peft.join("adapter_config.json").is_file());
}

fn rotation(h: usize, angle: f32) -> Vec<f32> {
    let mut b = vec![0f32; h * h];
    for i in 0..h {
        b[i * h + i] = 1.0;
    }
    let (c, s) = (angle.cos(), angle.sin());
    b[0] = c;
    b[1] = -s;
    b[h] = s;
    b[h + 1] = c;
    b
}

/// One target of a hand-made canonical file: D copies of a plane rotation by `angle`.
struct Spec {
    name: &'static str,
    side: &'static str,
    d: usize,
    h: usize,
    angle: f32,
    kind: &'static str,
}

fn target(name: &'static str, side: &'static str, d: usize, h: usize, angle: f32) -> Spec {
    Spec {
        name,
        side,
        d,
        h,
        angle,
        kind: "cayley",
    }
}

/// A canonical file (docs/FORMAT.md) written directly, tensors and metadata.
fn canonical_file(dir: &Path, targets: Vec<Spec>) -> PathBuf {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut metas = Vec::new();
    for t in &targets {
        let key = format!("{}.weight", t.name);
        let v: Vec<u8> = (0..t.d)
            .flat_map(|_| rotation(t.h, t.angle))
            .flat_map(|x| x.to_le_bytes())
            .collect();
        data.push((format!("{key}::blocks"), vec![1, t.d, t.h, t.h], v));
        metas.push(serde_json::json!({
            "key": key, "target": key, "module": t.name, "side": t.side, "shape": null,
            "rows": null, "factors": 1, "blocks": t.d, "block_size": t.h,
            "block_kind": t.kind, "permuted": false, "scaled": false,
        }));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, shape, v)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), v);
            (k.clone(), view.unwrap())
        })
        .collect();
    let meta: std::collections::HashMap<String, String> = [
        ("format", "boft-canonical".to_string()),
        ("format_version", "1".to_string()),
        ("source_format", "test".to_string()),
        ("source_version", String::new()),
        ("source_sha256", "{}".to_string()),
        ("targets", serde_json::Value::from(metas).to_string()),
        ("replacements", "[]".to_string()),
        ("writer", "tests/export.rs".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let bytes = safetensors::tensor::serialize(views, Some(meta)).unwrap();
    let p = dir.join("in.safetensors");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Canonical inputs: a rotation by π, a geometry one PEFT config cannot hold, raw blocks.
#[test]
fn canonical_inputs_that_have_no_exact_export_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = tmp.path().join("out");
    let lyco = tmp.path().join("out.safetensors");
    let pi = std::f32::consts::PI;
    let src = canonical_file(tmp.path(), vec![target("a", "input", 2, 4, pi)]);
    refused(
        &[&src, &"--to", &"peft", &"-o", &peft],
        &peft,
        "not-exportable",
        "eigenvalue −1",
    );
    let src = canonical_file(
        tmp.path(),
        vec![
            target("a", "input", 2, 4, 0.3),
            target("b", "input", 4, 8, 0.3),
        ],
    );
    refused(
        &[&src, &"--to", &"peft", &"-o", &peft],
        &peft,
        "not-exportable",
        "one PEFT config",
    );
    let mut raw = target("a", "output", 4, 4, 0.3);
    raw.kind = "raw";
    let src = canonical_file(tmp.path(), vec![raw]);
    refused(
        &[&src, &"--to", &"lycoris", &"-o", &lyco],
        &lyco,
        "not-exportable",
        "raw",
    );
    // Odd block size and too few blocks: neither diag-oft nor boft.
    let src = canonical_file(tmp.path(), vec![target("a", "output", 2, 3, 0.3)]);
    refused(
        &[&src, &"--to", &"lycoris", &"-o", &lyco],
        &lyco,
        "not-exportable",
        "fit neither",
    );
    // The same shapes with a uniform block count export (r mode), and read back.
    let src = canonical_file(
        tmp.path(),
        vec![
            target("a", "input", 2, 4, 0.3),
            target("b", "input", 2, 8, -0.7),
        ],
    );
    ok(&run(
        "boft-convert",
        &[&src, &"--to", &"peft", &"-o", &peft],
    ));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["r"].as_u64(), cfg["oft_block_size"].as_u64()),
        (Some(2), Some(0))
    );
    let back = boft::formats::load(&peft).unwrap();
    let orig = boft::formats::load(&src).unwrap();
    for (x, y) in back.targets.iter().zip(&orig.targets) {
        assert_eq!(x.name, y.name);
        for (a, b) in x.data.iter().zip(&y.data) {
            assert!((a - b).abs() < 1e-6, "{}: {a} vs {b}", x.name);
        }
    }
}
