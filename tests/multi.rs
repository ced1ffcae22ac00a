//! Several adapters against the libraries' own sequential merges (fixtures/multi/, made by
//! fixtures/generate/make_multi.py with PEFT 0.21.2 and LyCORIS 4.1.3): one pass equals them,
//! switching equals the library's merge of the other adapter, and a composed adapter merges as
//! its parts do (docs/COMPOSE.md).

mod common;

use std::path::{Path, PathBuf};

use boft::checkpoint::Dtype;
use common::*;
use serde_json::Value;

fn root() -> PathBuf {
    fixtures().join("multi")
}

fn manifest() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn case(name: &str) -> Value {
    manifest()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

fn at(rel: &Value) -> PathBuf {
    root().join(rel.as_str().unwrap())
}

/// The case's base and its adapters in application order.
fn inputs(c: &Value) -> (PathBuf, Vec<PathBuf>) {
    let adapters = c["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| at(&a["path"]))
        .collect();
    (at(&c["base"]), adapters)
}

/// Every tensor of `ours` within the tolerance of `theirs` (`assert_close`: f32 2e-5 relative,
/// 16-bit one ulp), by name; returns the worst relative difference.
fn compare(ours: &Path, theirs: &Path) -> f64 {
    let (a, b) = (tensors(ours), tensors(theirs));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (name, (_, x)) in &a {
        let y = &b[name].1;
        let (xv, yv) = (x.f32(), y.f32());
        // A 16-bit output against an f32 reference is judged in the output's ulps.
        let dt = if x.dtype == Dtype::F32 {
            y.dtype
        } else {
            x.dtype
        };
        assert_close(name, dt, &xv, &yv);
        worst = worst.max(rel_err(&xv, &yv));
    }
    worst
}

fn one_pass_equals_the_library(name: &str) {
    let c = case(name);
    let (base, adapters) = inputs(&c);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = adapters.iter().map(|a| a as _).collect();
    merge_adapters(&base, &[], &refs, &out);
    let worst = compare(&out, &at(&c["references"]["merged"]["path"]));
    eprintln!("{name}: one pass vs the library's sequential merge: {worst:.3e}");
}

#[test]
fn two_peft_boft_adapters_in_one_pass_equal_peft() {
    one_pass_equals_the_library("peft_two_f32");
}

#[test]
fn peft_boft_then_oft_in_one_pass_equal_peft() {
    one_pass_equals_the_library("peft_boft_then_oft_f32");
}

#[test]
fn two_lycoris_networks_in_one_pass_equal_lycoris() {
    one_pass_equals_the_library("lycoris_two");
}

#[test]
fn peft_and_lycoris_on_one_weight_in_one_pass_equal_both_libraries() {
    // PEFT BOFT rotates the inputs and LyCORIS diag-oft the outputs of the same Linear weights.
    one_pass_equals_the_library("mixed");
}

#[test]
fn bf16_one_pass_rounds_once() {
    // PEFT rounds to bf16 after each adapter; one pass rounds once, so it is held to one ulp of
    // the same sequence computed in f32 by PEFT.
    let c = case("peft_two_bf16");
    let (base, adapters) = inputs(&c);
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    merge_adapters(&base, &[], &[&adapters[0], &adapters[1]], &out);
    let f32ref = at(&c["references"]["merged_f32ref"]["path"]);
    compare(&out, &f32ref);
    // And the sequential bf16 merge is further from that f32 run than one pass is.
    let (ours, seq, exact) = (
        tensors(&out),
        tensors(&at(&c["references"]["merged"]["path"])),
        tensors(&f32ref),
    );
    let far = |m: &std::collections::BTreeMap<String, (PathBuf, Tensor)>| {
        m.iter()
            .flat_map(|(n, (_, t))| {
                let e = exact[n].1.f32();
                t.f32()
                    .into_iter()
                    .zip(e)
                    .map(|(a, b)| ulps(Dtype::BF16, a, b))
                    .collect::<Vec<_>>()
            })
            .fold(0f64, f64::max)
    };
    let (o, s) = (far(&ours), far(&seq));
    eprintln!("worst ulps from the f32 run: one pass {o}, PEFT sequential {s}");
    assert!(o <= 1.0 && o <= s, "one pass {o} ulp, sequential {s} ulp");
}

fn switching_equals_the_library(name: &str) {
    let c = case(name);
    let (base, adapters) = inputs(&c);
    let d = tempfile::tempdir().unwrap();
    let (with_a, with_b) = (d.path().join("a"), d.path().join("b"));
    merge_adapters(&base, &[], &[&adapters[0]], &with_a);
    merge_adapters(&with_a, &[&adapters[0]], &[&adapters[1]], &with_b);
    let theirs = at(&c["references"]["merged_b"]["path"]);
    let worst = max_rel(&with_b, &theirs);
    eprintln!("{name}: base ⊕ A, switched to B, vs the library's base ⊕ B: {worst:.3e}");
    assert!(worst <= 1e-5, "{name}: {worst}");
}

#[test]
fn switching_peft_adapters_equals_peft_merge_of_the_other() {
    switching_equals_the_library("peft_two_f32");
}

#[test]
fn switching_lycoris_networks_equals_lycoris_merge_of_the_other() {
    switching_equals_the_library("lycoris_two");
}

#[test]
fn switching_from_peft_to_lycoris_equals_lycoris() {
    switching_equals_the_library("mixed");
}

fn composed_equals_one_pass(name: &str, export: &str) {
    let c = case(name);
    let (base, adapters) = inputs(&c);
    let d = tempfile::tempdir().unwrap();
    let composed = d.path().join("c.safetensors");
    ok(&run(
        "boft-convert",
        &[
            &"--compose",
            &adapters[0],
            &adapters[1],
            &"-o",
            &composed,
            &"--base",
            &base,
        ],
    ));
    let (one, via_c) = (d.path().join("one"), d.path().join("c"));
    merge_adapters(&base, &[], &[&adapters[0], &adapters[1]], &one);
    merge_adapters(&base, &[], &[&composed], &via_c);
    let worst = max_rel(&via_c, &one);
    eprintln!("{name}: compose(A, B) vs one pass [A, B]: {worst:.3e}");
    assert!(worst <= 1e-6, "{name}: {worst}");
    // These libraries cannot hold what the composition is (a longer chain with permutations
    // that are not the library's butterfly, or two stages on one weight): one line, nothing
    // written.
    let o = run(
        "boft-convert",
        &[
            &composed,
            &"--to",
            &export,
            &"-o",
            &d.path().join("export"),
            &"--base",
            &base,
        ],
    );
    fails_with(&o, "not-exportable");
    assert!(!d.path().join("export").exists());
}

#[test]
fn composed_peft_adapters_merge_as_one_pass() {
    composed_equals_one_pass("peft_two_f32", "peft");
}

#[test]
fn composed_peft_boft_and_oft_merge_as_one_pass() {
    composed_equals_one_pass("peft_boft_then_oft_f32", "peft");
}

#[test]
fn composed_lycoris_networks_merge_as_one_pass() {
    composed_equals_one_pass("lycoris_two", "lycoris");
}

#[test]
fn composed_peft_and_lycoris_merge_as_one_pass() {
    composed_equals_one_pass("mixed", "lycoris");
}
