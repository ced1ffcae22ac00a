//! Merging real PEFT OFT adapters of all three on-disk generations (and what PEFT 0.13 wrote for
//! BOFT on Conv2d): our output against the writing PEFT version's own merge_and_unload(), tensor
//! by tensor, on fixtures made by fixtures/generate/make_peft_oft.py and make_peft_oft_old.py.

mod common;

use common::*;

fn cases() -> Vec<RefCase> {
    let mut v = ref_cases("peft_oft");
    v.extend(ref_cases("peft_oft_old"));
    v
}

#[test]
fn every_generation_matches_its_peft_version() {
    let cases: Vec<RefCase> = cases()
        .into_iter()
        .filter(|c| c.format.starts_with("peft_oft"))
        .collect();
    for gen in ["peft_oft_v0", "peft_oft_v1", "peft_oft_v2"] {
        assert!(
            cases.iter().filter(|c| c.format == gen).count() >= 5,
            "{gen}"
        );
    }
    for c in &cases {
        merge_and_compare(c, &c.merged[0], &[]);
    }
}

#[test]
fn unmerge_restores_the_base() {
    for c in cases().iter().filter(|c| c.base_dtype == "float32") {
        assert_unmerge_restores(c);
    }
}

/// PEFT ≤ 0.13 merged Conv2d BOFT layers through a reinterpretation of the kernel buffer; such
/// files (config without exclude_modules) are merged the way the PEFT that wrote them did.
#[test]
fn legacy_conv_boft_matches_peft_0_13() {
    let cases: Vec<RefCase> = cases()
        .into_iter()
        .filter(|c| c.format == "peft_boft_legacy_conv")
        .collect();
    assert_eq!(cases.len(), 2);
    for c in &cases {
        merge_and_compare(c, &c.merged[0], &[]);
    }
}

/// `--from peft` reads the same files with today's rule, as PEFT 0.21.2 merges them; a reader
/// that does not fit the files is refused in one line.
#[test]
fn from_forces_the_reader() {
    for c in cases()
        .iter()
        .filter(|c| c.format == "peft_boft_legacy_conv")
    {
        assert!(c.merged[1].path.ends_with("__peft0.21.2"));
        merge_and_compare(c, &c.merged[1], &["--from", "peft"]);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o.safetensors");
        let o = run(
            "boft-merge",
            &[
                &"--from",
                &"lycoris",
                &"--base",
                &c.base_path(),
                &"--adapter",
                &c.adapter_path(),
                &"-o",
                &out,
            ],
        );
        let line = fails_with(&o, "unknown-format");
        assert!(line.contains("PEFT adapter folder"), "{line}");
        assert!(!out.exists());
    }
}
