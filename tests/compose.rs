//! Several adapters in one pass, task switching, composition into one adapter, and batches
//! (issue 13, docs/COMPOSE.md), on the committed PEFT fixtures. The comparisons with PEFT's and
//! LyCORIS's own sequential merges are in tests/multi.rs.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn fx(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

#[test]
fn one_pass_of_two_f32_adapters_is_bit_identical_to_two_merges() {
    // In f32 a merge rounds nothing between the adapters, so one pass and two sequential merges
    // do the same arithmetic: the files must be identical.
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_boft/bases/llama_f32");
    let (a, b) = (
        fx("peft_boft/adapters/llama_f32_f2"),
        fx("peft_boft/adapters/llama_f32_f3"),
    );
    let (one, first, two) = (
        d.path().join("one"),
        d.path().join("a"),
        d.path().join("ab"),
    );
    merge_adapters(&base, &[], &[&a, &b], &one);
    merge_adapters(&base, &[], &[&a], &first);
    merge_adapters(&first, &[], &[&b], &two);
    assert_eq!(snapshot(&one), snapshot(&two));
}

#[test]
fn switching_adapters_in_one_pass_equals_peft_merge_of_the_other() {
    // base ⊕ A, then --unmerge-adapter A --adapter B in one pass, against PEFT's own base ⊕ B.
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_oft/bases/llama_f32");
    let a = fx("peft_oft/adapters/llama_f32_cayley");
    let b = fx("peft_oft/adapters/llama_f32_coft_cayley");
    let (with_a, switched) = (d.path().join("a"), d.path().join("b"));
    merge_adapters(&base, &[], &[&a], &with_a);
    merge_adapters(&with_a, &[&a], &[&b], &switched);
    let theirs = fx("peft_oft/merged/llama_f32_coft_cayley");
    let worst = max_rel(&switched, &theirs);
    eprintln!("switch vs PEFT's base ⊕ B: {worst:.3e}");
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn unmerging_two_adapters_restores_the_base() {
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_oft/bases/llama_f32");
    let a = fx("peft_oft/adapters/llama_f32_cayley");
    let b = fx("peft_oft/adapters/llama_f32_coft_cayley");
    let (both, back) = (d.path().join("ab"), d.path().join("back"));
    merge_adapters(&base, &[], &[&a, &b], &both);
    // Listed in the order they were merged; taken out in reverse.
    merge_adapters(&both, &[&a, &b], &[], &back);
    let worst = max_rel(&back, &base);
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn a_batch_writes_each_output_as_its_own_merge_would() {
    // A sharded bf16 base (two shards, an index, configs): every file of every output is the
    // same bytes as the single merge of that job.
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_boft/bases/llama_bf16_sharded");
    let a = fx("peft_boft/adapters/llama_bf16_f2");
    let b = fx("peft_boft/adapters/llama_bf16_f3_adapter_f16");
    let geo = format!("{},strength=0.5,mode=geodesic", b.display());
    let jobs: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        ("j1", vec![a.display().to_string()], vec![]),
        (
            "j2",
            vec![a.display().to_string(), b.display().to_string()],
            vec![],
        ),
        ("j3", vec![geo.clone()], vec![]),
    ];
    let json = serde_json::json!({
        "jobs": jobs.iter().map(|(o, ad, un)| serde_json::json!({
            "output": d.path().join(o), "adapters": ad, "unmerge_adapters": un
        })).collect::<Vec<_>>()
    });
    let file = d.path().join("jobs.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let o = run(
        "boft-merge",
        &[&"--base", &base, &"--batch", &file, &"--threads", &"1"],
    );
    let err = stderr(&o);
    ok(&o);
    assert_eq!(err.lines().filter(|l| l.starts_with("merged ")).count(), 3);
    for (name, adapters, _) in &jobs {
        let single = d.path().join(format!("{name}-single"));
        let adapters: Vec<&dyn AsRef<std::ffi::OsStr>> = adapters.iter().map(|a| a as _).collect();
        merge_adapters(&base, &[], &adapters, &single);
        assert_eq!(
            snapshot(&d.path().join(name)),
            snapshot(&single),
            "job {name}"
        );
    }
}

#[test]
fn a_batch_with_a_bad_job_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_boft/bases/llama_f32");
    let a = fx("peft_boft/adapters/llama_f32_f2").display().to_string();
    let json = serde_json::json!({"jobs": [
        {"output": d.path().join("good"), "adapters": [a]},
        {"output": d.path().join("bad"), "unmerge_adapters": [format!("{a},strength=0.5")]},
    ]});
    let file = d.path().join("jobs.json");
    std::fs::write(&file, json.to_string()).unwrap();
    let o = run("boft-merge", &[&"--base", &base, &"--batch", &file]);
    let err = fails_with(&o, "usage");
    assert!(err.contains("no structured inverse"), "{err}");
    assert_eq!(dir_entries(d.path()), vec!["jobs.json".to_string()]);
}

#[test]
fn a_composed_adapter_merges_as_its_parts_in_one_pass() {
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_boft/bases/llama_f32");
    let (a, b) = (
        fx("peft_boft/adapters/llama_f32_f2"),
        fx("peft_boft/adapters/llama_f32_f3"),
    );
    let c = d.path().join("c.safetensors");
    let out = ok(&run(
        "boft-convert",
        &[&"--compose", &a, &b, &"-o", &c, &"--base", &base],
    ));
    // Two butterflies of one geometry fuse into one chain of 2 + 3 factors.
    assert!(out.contains("factors 5"), "{out}");
    let (one, merged_c) = (d.path().join("one"), d.path().join("c"));
    merge_adapters(&base, &[], &[&a, &b], &one);
    merge_adapters(&base, &[], &[&c], &merged_c);
    let worst = max_rel(&merged_c, &one);
    eprintln!("compose(A, B) vs one pass [A, B]: {worst:.3e}");
    assert!(worst <= 1e-6, "{worst}");
    // The composed file round-trips through canonical: read and written again, it merges to
    // the same bytes.
    let c2 = d.path().join("c2.safetensors");
    ok(&run("boft-convert", &[&c, &"-o", &c2]));
    let merged_c2 = d.path().join("c2");
    merge_adapters(&base, &[], &[&c2], &merged_c2);
    assert_eq!(snapshot(&merged_c), snapshot(&merged_c2));
    // boft-verify proves the one-pass merge against the composed adapter.
    let o = run(
        "boft-verify",
        &[&c, &"--base", &base, &"--merged", &one, &"--json"],
    );
    let report: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(report["passed"], true, "{}", report["failed"]);
    // PEFT BOFT holds its own butterfly permutations only: the fused chain is refused.
    let o = run(
        "boft-convert",
        &[&c, &"--to", &"peft", &"-o", &d.path().join("peft")],
    );
    let err = fails_with(&o, "not-exportable");
    assert!(err.contains("butterfly"), "{err}");
    assert!(!d.path().join("peft").exists());
}

#[test]
fn two_oft_adapters_compose_into_one_that_peft_can_hold() {
    // Block-diagonal factors of one geometry meeting without a permutation multiply into one:
    // the composition of two PEFT OFT adapters is a PEFT OFT adapter.
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_oft/bases/llama_f32");
    let a = fx("peft_oft/adapters/llama_f32_cayley");
    let b = fx("peft_oft/adapters/llama_f32_coft_cayley");
    let exported = d.path().join("peft");
    let out = ok(&run(
        "boft-convert",
        &[
            &"--compose",
            &a,
            &b,
            &"--to",
            &"peft",
            &"-o",
            &exported,
            &"--base",
            &base,
        ],
    ));
    assert!(out.contains("PEFT OFT"), "{out}");
    let (one, via_export) = (d.path().join("one"), d.path().join("exp"));
    merge_adapters(&base, &[], &[&a, &b], &one);
    merge_adapters(&base, &[], &[&exported], &via_export);
    let worst = max_rel(&via_export, &one);
    eprintln!("exported compose(A, B) vs one pass: {worst:.3e}");
    assert!(worst <= 1e-5, "{worst}");
}

#[test]
fn linear_blends_are_not_chains() {
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_oft/bases/llama_f32");
    let a = fx("peft_oft/adapters/llama_f32_cayley");
    let half = format!("{},strength=0.5", a.display());
    let c = d.path().join("c.safetensors");
    let o = run("boft-convert", &[&"--compose", &half, &a, &"-o", &c]);
    let err = fails_with(&o, "usage");
    assert!(err.contains("not a chain"), "{err}");
    let out = d.path().join("o");
    let o = run(
        "boft-merge",
        &[&"--base", &base, &"--unmerge-adapter", &half, &"-o", &out],
    );
    let err = fails_with(&o, "usage");
    assert!(err.contains("no structured inverse"), "{err}");
    assert_eq!(dir_entries(d.path()), Vec::<String>::new());
    // The same strength per factor is a chain: composed, it merges as the one-pass merge.
    let pf = format!("{},strength=0.5,mode=per-factor", a.display());
    ok(&run("boft-convert", &[&"--compose", &pf, &a, &"-o", &c]));
    let (one, merged_c) = (d.path().join("one"), d.path().join("c"));
    merge_adapters(&base, &[], &[&pf, &a], &one);
    merge_adapters(&base, &[], &[&c], &merged_c);
    let worst = max_rel(&merged_c, &one);
    assert!(worst <= 1e-6, "{worst}");
}

#[test]
fn a_butterfly_built_by_hand_from_two_block_diagonal_adapters() {
    // Two OFT adapters of 8 blocks of 8 on a 64-wide weight, the second with PEFT's butterfly
    // permutation of factor 1: each alone mixes 8 features per output, their composition 16,
    // with the degrees of freedom of both.
    use boft::adapter::{canonical, Adapter, BlockKind, Side, Target};
    let d = tempfile::tempdir().unwrap();
    let (h, blocks, n) = (8usize, 8usize, 64usize);
    let base = d.path().join("base.safetensors");
    let w: Vec<u8> = (0..n * n)
        .flat_map(|i| (((i * 37) % 101) as f32 / 50.0 - 1.0).to_le_bytes())
        .collect();
    scene::St {
        metadata: None,
        tensors: vec![("w.weight".into(), "F32".into(), vec![n, n], w)],
    }
    .write(&base);
    let oft = |perm: Option<Vec<u32>>, seed: f64| {
        // Exact rotations: Cayley transforms of small skew blocks.
        let data: Vec<f32> = (0..blocks)
            .flat_map(|k| {
                let s: Vec<f64> = (0..h * h)
                    .map(|ij| {
                        let (i, j) = (ij / h, ij % h);
                        let v = ((i * 7 + j * 3 + k) as f64 * seed).sin() * 0.2;
                        match i.cmp(&j) {
                            std::cmp::Ordering::Less => v,
                            std::cmp::Ordering::Greater => {
                                -(((j * 7 + i * 3 + k) as f64 * seed).sin() * 0.2)
                            }
                            std::cmp::Ordering::Equal => 0.0,
                        }
                    })
                    .collect();
                boft::math::cayley::cayley_minus(h, &s)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect::<Vec<f32>>()
            })
            .collect();
        let t = Target {
            name: "w.weight".into(),
            module: "w".into(),
            side: Side::Input,
            factors: 1,
            blocks,
            block_size: h,
            data,
            perms: vec![perm],
            kind: BlockKind::Cayley,
            ..Default::default()
        };
        Adapter {
            targets: vec![t],
            source_format: "test".into(),
            ..Default::default()
        }
    };
    let (pa, pb) = (
        d.path().join("a.safetensors"),
        d.path().join("b.safetensors"),
    );
    canonical::write(&oft(None, 0.7), &pa).unwrap();
    let butterfly = boft::math::perm::peft_boft(n, h, 1);
    canonical::write(&oft(Some(butterfly), 1.3), &pb).unwrap();
    let c = d.path().join("c.safetensors");
    ok(&run("boft-convert", &[&"--compose", &pa, &pb, &"-o", &c]));
    let reach = |p: &Path| {
        let o = run("boft-verify", &[&p, &"--base", &base, &"--json"]);
        let r: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        let t = &r["adapters"][0]["targets"][0];
        (
            t["factors"].as_u64().unwrap(),
            t["reach"]["min"].as_u64().unwrap(),
            t["dof"]["adapter"].as_u64().unwrap(),
        )
    };
    let (fa, ra, da) = reach(&pa);
    let (fc, rc, dc) = reach(&c);
    eprintln!(
        "OFT: {fa} factor, reach {ra}, dof {da}; composed: {fc} factors, reach {rc}, dof {dc}"
    );
    assert_eq!((fa, ra), (1, 8));
    assert_eq!((fc, rc), (2, 16));
    assert_eq!(dc, 2 * da);
    // And it merges as the two adapters do in one pass.
    let (one, merged_c) = (d.path().join("one.safetensors"), d.path().join("c.st"));
    merge_adapters(&base, &[], &[&pa, &pb], &one);
    merge_adapters(&base, &[], &[&c], &merged_c);
    let (x, y) = (tensors(&one), tensors(&merged_c));
    let worst = rel_err(&x["w.weight"].1.f32(), &y["w.weight"].1.f32());
    assert!(worst <= 1e-6, "{worst}");
}

#[test]
fn a_composed_embedding_stays_an_embedding_in_a_peft_export() {
    // PEFT OFT stores an nn.Embedding's rotation as oft_embedding_R; a composition of PEFT
    // folders finds the embeddings in every part, as a single input does.
    let d = tempfile::tempdir().unwrap();
    let base = fx("peft_oft/bases/llama_f32");
    let a = fx("peft_oft/adapters/llama_f32_embedding_cayley");
    let b = fx("peft_oft/adapters/llama_f32_cayley");
    let exported = d.path().join("peft");
    ok(&run(
        "boft-convert",
        &[
            &"--compose",
            &a,
            &b,
            &"--to",
            &"peft",
            &"-o",
            &exported,
            &"--base",
            &base,
        ],
    ));
    let names: Vec<String> = tensors(&exported.join("adapter_model.safetensors"))
        .into_keys()
        .filter(|k| k.contains("embed_tokens"))
        .collect();
    assert!(
        !names.is_empty() && names.iter().all(|k| k.contains("oft_embedding_R")),
        "{names:?}"
    );
    let (one, via_export) = (d.path().join("one"), d.path().join("exp"));
    merge_adapters(&base, &[], &[&a, &b], &one);
    merge_adapters(&base, &[], &[&exported], &via_export);
    let worst = max_rel(&via_export, &one);
    assert!(worst <= 1e-5, "{worst}");
}
