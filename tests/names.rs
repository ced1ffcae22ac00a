//! Adapter names resolved against the base checkpoint: LyCORIS and kohya-prefixed files with
//! diffusers module names merged into a diffusers U-Net folder and into an SD 1.x single-file
//! checkpoint (original LDM names, through the diffusers→original table), on fixtures made by
//! fixtures/generate/make_sd_names.py (LyCORIS 4.1.3 merges, diffusers' own conversion script).

mod common;

use common::*;

#[test]
fn diffusers_names_resolve_in_both_layouts() {
    let cases = ref_cases("sd_names");
    assert!(cases.iter().any(|c| c.base.starts_with("base_single")));
    assert!(cases.iter().any(|c| c.adapter.contains("lora_unet_")));
    for c in &cases {
        merge_and_compare(c, &c.merged[0], &[]);
    }
}

/// A diffusers component folder is a base like any other: same files out, same layout.
#[test]
fn diffusers_component_folder_as_base() {
    let c = ref_cases("sd_names")
        .into_iter()
        .find(|c| c.base.starts_with("base_diffusers"))
        .unwrap();
    let base = c.dir.join("base_diffusers/unet");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("unet");
    ok(&run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &c.adapter_path(),
            &"-o",
            &out,
        ],
    ));
    assert_merge_matches(&out, &c.dir.join("merged_diffusers/unet"), &base);
    // A pipeline folder (unet/ inside) is refused with a pointer to the component.
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &c.dir.join("base_diffusers"),
            &"--adapter",
            &c.adapter_path(),
            &"-o",
            &tmp.path().join("x"),
        ],
    );
    let line = fails_with(&o, "not-found");
    assert!(line.contains("unet"), "{line}");
}

/// A module name that matches nothing is one clear line naming it; nothing is written.
#[test]
fn unresolvable_names_are_refused() {
    let c = &ref_cases("sd_names")[0];
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.safetensors");
    // The LyCORIS UNet adapter against the tiny Llama: no flattened name matches.
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &fixtures().join("peft_oft/bases/llama_f32"),
            &"--adapter",
            &c.adapter_path(),
            &"-o",
            &out,
        ],
    );
    let line = fails_with(&o, "missing-target");
    assert!(
        line.contains("lycoris_") || line.contains("lora_unet_"),
        "{line}"
    );
    assert!(!out.exists());
}

/// SDXL / SD 2.x text-encoder adapters (`lora_te1_`, `lora_te2_`, `lora_te_`, Hugging Face CLIP
/// names) into single files where OpenCLIP fuses q/k/v into `in_proj_weight`: q, k and v rotate
/// their own thirds of the fused rows; `lora_te1_`/`lora_te2_` choose between the two encoders
/// that share module names (fixtures/generate/make_openclip_fused.py: LyCORIS merges on the HF
/// encoders, converted with diffusers' own SDXL/SD2 scripts).
#[test]
fn openclip_fused_qkv_resolve_to_row_slices() {
    let cases = ref_cases("openclip_fused");
    assert!(cases.len() >= 2);
    for c in &cases {
        merge_and_compare(c, &c.merged[0], &[]);
        assert_unmerge_restores(c);
    }
}
