//! LyCORIS diag-oft/boft and kohya OFT files: our merge against the writing library's own merge,
//! on fixtures made by fixtures/generate/make_lycoris.py and make_kohya_oft.py. Module names
//! are diffusers-style, flattened the way those libraries flatten them.

mod common;

use common::*;

fn cases() -> Vec<RefCase> {
    let mut v = ref_cases("lycoris");
    v.extend(ref_cases("kohya_oft"));
    v
}

#[test]
fn full_strength_matches_the_library() {
    let cases = cases();
    for f in ["lycoris_diag_oft", "lycoris_boft", "kohya_oft"] {
        assert!(cases.iter().any(|c| c.format == f), "{f}");
    }
    for c in &cases {
        let m = c.merged.iter().find(|m| m.multiplier == 1.0).unwrap();
        merge_and_compare(c, m, &[]);
    }
}

/// kohya FLUX OFT: one `oft_blocks.<j>` per row split of fused `qkv` / `linear1` weights, each
/// rotated on its own rows with its own constraint; sd-scripts' own merge of these files crashes,
/// so the reference is its module's forward pass (see the fixture's manifest).
#[test]
fn kohya_flux_splits_match_sd_scripts() {
    let cases = ref_cases("kohya_flux");
    assert!(!cases.is_empty());
    for c in &cases {
        for m in &c.merged {
            let t = m.multiplier.to_string();
            merge_and_compare(c, m, &["--strength", &t]);
        }
    }
}

#[test]
fn unmerge_restores_the_base() {
    let mut cases = ref_cases("lycoris");
    cases.extend(ref_cases("kohya_oft"));
    cases.extend(ref_cases("kohya_flux"));
    for c in cases.iter().filter(|c| c.base_dtype == "float32") {
        assert_unmerge_restores(c);
    }
}

/// Old LyCORIS files: 2.0.x stores the finished rotation (`oft_diag`, rescale already in it);
/// 2.1.0–2.1.0.post2 have no `alpha`, the constraint is only in `ss_network_args`, and post1's
/// `rescale` is 1-D. Each against that version's own merge (fixtures/generate/make_lycoris_old.py).
#[test]
fn old_lycoris_files_match_their_versions() {
    let cases = ref_cases("lycoris_old");
    assert!(cases.iter().any(|c| c.format.contains("oft_diag")));
    assert!(cases.iter().any(|c| c.format.contains("no_alpha")));
    for c in &cases {
        for m in &c.merged {
            let t = m.multiplier.to_string();
            merge_and_compare(c, m, &["--strength", &t, "--strength-mode", "per-factor"]);
        }
        assert_unmerge_restores(c);
    }
}
