//! Whole models as users have them: a diffusers SDXL pipeline folder merged in one run (U-Net and
//! both text encoders from one kohya-style LyCORIS file), and a LyCORIS `lycoris_` U-Net file
//! merged into a full SD1.5 single-file checkpoint (U-Net, VAE and text encoder, whose VAE shares
//! module names such as `conv_in` with the U-Net). References: LyCORIS 4.1.3's own merges
//! (fixtures/generate/make_sdxl_pipeline.py, make_sd_single.py).

mod common;

use std::path::Path;

use common::*;

#[test]
fn sdxl_pipeline_in_one_run() {
    let cases = ref_cases("sdxl_pipeline");
    assert!(!cases.is_empty());
    for c in &cases {
        merge_and_compare(c, &c.merged[0], &[]);
    }
}

#[test]
fn pipeline_verify_and_unmerge() {
    let c = &ref_cases("sdxl_pipeline")[0];
    let out = ok(&run(
        "boft-verify",
        &[
            &c.adapter_path(),
            &"--base",
            &c.base_path(),
            &"--merged",
            &c.expected(&c.merged[0]),
        ],
    ));
    assert!(out.contains("PASS"), "{out}");
    assert_unmerge_restores(c);
}

#[test]
fn lycoris_unet_file_into_sd_single_file() {
    let cases = ref_cases("sd_single");
    assert!(!cases.is_empty());
    for c in &cases {
        // The bug this guards: `lycoris_conv_in` also names the VAE's encoder and decoder conv_in.
        let names = tensors(&c.base_path());
        assert!(names.contains_key("first_stage_model.decoder.conv_in.weight"));
        merge_and_compare(c, &c.merged[0], &[]);
    }
}

/// Write a safetensors file holding `keep`'s tensors of `src`, renamed by `rename`.
fn rewrite(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>) -> usize {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(n) = rename(&name) {
            kept.push((n, view));
        }
    }
    let n = kept.len();
    safetensors::serialize_to_file(kept, None, dst).unwrap();
    n
}

/// A name that two components really share (SDXL's two text encoders are both CLIP text
/// models) is refused with a pointer to --component, which then decides.
#[test]
fn component_flag_decides_shared_names() {
    let c = &ref_cases("sdxl_pipeline")[0];
    let tmp = tempfile::tempdir().unwrap();
    let te2 = tmp.path().join("te2.safetensors");
    let kept = rewrite(&c.adapter_path(), &te2, |n| {
        n.strip_prefix("lora_te2_")
            .map(|rest| format!("lycoris_{rest}"))
    });
    assert!(kept > 0);
    let base = c.base_path();
    let out = tmp.path().join("out");
    let o = run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &te2, &"-o", &out],
    );
    let line = fails_with(&o, "missing-target");
    assert!(line.contains("--component"), "{line}");
    assert!(!out.exists());

    ok(&run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &te2,
            &"-o",
            &out,
            &"--component",
            &"text_encoder_2",
        ],
    ));
    // text_encoder_2 as LyCORIS merged it, every other component as it was.
    let (ours, merged, orig) = (
        tensors(&out),
        tensors(&c.expected(&c.merged[0])),
        tensors(&base),
    );
    let mut changed = 0;
    for (name, (_, t)) in &ours {
        if name.starts_with("text_encoder_2.") {
            let e = &merged[name].1;
            if e.bytes != orig[name].1.bytes {
                changed += 1;
            }
            assert_close(name, t.dtype, &t.f32(), &e.f32());
        } else {
            assert_eq!(t.bytes, orig[name].1.bytes, "{name}");
        }
    }
    assert!(changed > 0);

    // A component that does not exist is a usage error, not a silent no-op.
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &te2,
            &"-o",
            &tmp.path().join("x"),
            &"--component",
            &"text_encoder_3",
        ],
    );
    fails_with(&o, "usage");
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Other copies of a merged model's weights (a `fp16` variant, a PyTorch pickle, Meta's
/// `original/` files) would be stale next to merged weights: they are left out and named, while
/// other files — and another component's only weights — are copied.
#[test]
fn stale_weight_copies_are_left_out() {
    let c = &ref_cases("sdxl_pipeline")[0];
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("pipe");
    copy_tree(&c.base_path(), &base);
    let unet = base.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::copy(
        &unet,
        base.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::write(base.join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    std::fs::create_dir(base.join("safety_checker")).unwrap();
    std::fs::write(base.join("safety_checker/pytorch_model.bin"), b"pickle").unwrap();
    std::fs::write(base.join("safety_checker/config.json"), b"{}").unwrap();
    let out = tmp.path().join("out");
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &c.adapter_path(),
            &"-o",
            &out,
        ],
    );
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("left out 2 weight file(s)"), "{err}");
    let files = file_list(&out);
    assert!(!files.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".into()));
    assert!(!files.contains(&"unet/diffusion_pytorch_model.bin".into()));
    assert!(files.contains(&"safety_checker/pytorch_model.bin".into()));
    assert!(files.contains(&"unet/config.json".into()));

    // The same for a transformers folder.
    let llama = fixtures().join("peft_boft/bases/llama_f32");
    let base = tmp.path().join("llama");
    copy_tree(&llama, &base);
    std::fs::write(base.join("pytorch_model.bin"), b"pickle").unwrap();
    std::fs::write(base.join("training_args.bin"), b"pickle").unwrap();
    std::fs::create_dir(base.join("original")).unwrap();
    std::fs::write(base.join("original/consolidated.00.pth"), b"pickle").unwrap();
    let out = tmp.path().join("llama-out");
    let adapter = fixtures().join("peft_boft/adapters/llama_f32_f2");
    let o = run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
    );
    ok(&o);
    assert!(
        stderr(&o).contains("left out 2 weight file(s)"),
        "{}",
        stderr(&o)
    );
    let files = file_list(&out);
    assert!(files.contains(&"training_args.bin".into()));
    assert!(!files.contains(&"pytorch_model.bin".into()));
    assert!(!files.iter().any(|f| f.starts_with("original")));
}
