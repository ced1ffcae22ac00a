//! `boft-merge --strength t --strength-mode linear|per-factor|geodesic`: against LyCORIS's and
//! kohya's own merges at multiplier 0.5, and the geodesic mode's defining properties.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn case(folder: &str, name: &str) -> RefCase {
    ref_cases(folder)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{folder}/{name}"))
}

fn merge(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"--base", &base, &"--adapter", &adapter, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    ok(&run("boft-merge", &args));
}

#[test]
fn lycoris_multiplier_is_per_factor() {
    for c in ref_cases("lycoris") {
        let m = c.merged.iter().find(|m| m.multiplier == 0.5).unwrap();
        merge_and_compare(
            &c,
            m,
            &["--strength", "0.5", "--strength-mode", "per-factor"],
        );
    }
}

#[test]
fn kohya_multiplier_is_linear() {
    for c in ref_cases("kohya_oft") {
        let m = c.merged.iter().find(|m| m.multiplier == 0.5).unwrap();
        merge_and_compare(&c, m, &["--strength", "0.5"]);
    }
}

/// With rescale, LyCORIS's per-factor multiplier is not the linear one: the modes differ.
#[test]
fn per_factor_and_linear_differ_where_the_libraries_do() {
    let c = case("lycoris", "diag_oft_f32_rescale");
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.st"), tmp.path().join("b.st"));
    let base = c.base_path();
    merge(&base, &c.adapter_path(), &a, &["--strength", "0.5"]);
    merge(
        &base,
        &c.adapter_path(),
        &b,
        &["--strength", "0.5", "--strength-mode", "per-factor"],
    );
    let (ta, tb) = (tensors(&a), tensors(&b));
    assert!(ta
        .iter()
        .any(|(k, (_, t))| rel_err(&t.f32(), &tb[k].1.f32()) > 1e-4));
}

/// Gram matrix of the rows (input side: `W Wᵀ` is invariant under `W Mᵀ`) or of the columns
/// (output side: `Wᵀ W` is invariant under `M W`).
fn gram(t: &Tensor, rows: bool) -> Vec<f64> {
    let w = t.f32();
    let r = t.shape[0];
    let c = w.len() / r;
    // Vectors as rows of the matrix: W itself, or Wᵀ for column Gram matrices.
    let (n, len) = if rows { (r, c) } else { (c, r) };
    let at = |i: usize, k: usize| -> f64 {
        if rows {
            w[i * c + k] as f64
        } else {
            w[k * c + i] as f64
        }
    };
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = (0..len).map(|k| at(i, k) * at(j, k)).sum();
        }
    }
    g
}

fn geodesic_cases() -> Vec<(RefCase, bool)> {
    vec![
        (case("peft_oft", "llama_f32_cayley"), true),
        (case("lycoris", "diag_oft_f32_constraint"), false),
        (case("lycoris", "boft_f32_constraint_rescale"), false),
        (case("kohya_oft", "oft_attn_f32"), false),
    ]
}

#[test]
fn geodesic_is_orthogonal_at_every_strength() {
    for (c, input_side) in geodesic_cases() {
        if c.name.contains("rescale") {
            continue; // rescale changes the Gram matrix by design
        }
        let base = c.base_path();
        let orig = tensors(&base);
        for t in ["0.25", "0.5", "0.8", "1.7"] {
            let tmp = tempfile::tempdir().unwrap();
            let out = out_path(tmp.path(), &base);
            merge(
                &base,
                &c.adapter_path(),
                &out,
                &["--strength", t, "--strength-mode", "geodesic"],
            );
            let mut changed = 0;
            for (name, (_, m)) in &tensors(&out) {
                let o = &orig[name].1;
                if m.bytes == o.bytes || m.shape.len() < 2 {
                    continue;
                }
                changed += 1;
                let (gm, go) = (gram(m, input_side), gram(o, input_side));
                let scale = go.iter().fold(0f64, |a, x| a.max(x.abs()));
                let worst = gm
                    .iter()
                    .zip(&go)
                    .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
                assert!(
                    worst <= 1e-5 * scale,
                    "{} t={t} {name}: Gram changed by {worst:e}",
                    c.name
                );
            }
            assert!(changed > 0, "{} t={t}: nothing changed", c.name);
        }
    }
}

#[test]
fn geodesic_halves_compose_to_the_whole() {
    for (c, _) in geodesic_cases() {
        if c.format == "lycoris_boft" {
            continue; // several non-commuting factors: see docs/STRENGTH.md
        }
        let tmp = tempfile::tempdir().unwrap();
        let base = c.base_path();
        let p = |n: &str| -> PathBuf { out_path(&tmp.path().join(n), &base) };
        let (once, half, twice) = (p("once"), p("half"), p("twice"));
        for d in ["once", "half", "twice"] {
            std::fs::create_dir(tmp.path().join(d)).unwrap();
        }
        let a = c.adapter_path();
        merge(&base, &a, &once, &[]);
        merge(
            &base,
            &a,
            &half,
            &["--strength", "0.5", "--strength-mode", "geodesic"],
        );
        merge(
            &half,
            &a,
            &twice,
            &["--strength", "0.5", "--strength-mode", "geodesic"],
        );
        let (t1, t2) = (tensors(&once), tensors(&twice));
        for (name, (_, t)) in &t1 {
            let e = rel_err(&t2[name].1.f32(), &t.f32());
            assert!(e <= 1e-5, "{}: {name}: two halves vs whole {e:e}", c.name);
        }
    }
}

#[test]
fn partial_strengths_unmerge_in_their_own_mode() {
    for (c, _) in geodesic_cases() {
        let base = c.base_path();
        let a = c.adapter_path();
        for mode in ["per-factor", "geodesic"] {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir(tmp.path().join("m")).unwrap();
            std::fs::create_dir(tmp.path().join("b")).unwrap();
            let m = out_path(&tmp.path().join("m"), &base);
            let b = out_path(&tmp.path().join("b"), &base);
            let flags = ["--strength", "0.6", "--strength-mode", mode];
            merge(&base, &a, &m, &flags);
            let mut un = flags.to_vec();
            un.push("--unmerge");
            merge(&m, &a, &b, &un);
            let (orig, back) = (tensors(&base), tensors(&b));
            for (name, (_, t)) in &orig {
                let e = rel_err(&back[name].1.f32(), &t.f32());
                assert!(e <= 1e-5, "{} {mode}: {name}: un-merge error {e:e}", c.name);
            }
        }
        // A linear blend at t ≠ 1 has no structured inverse: refused, nothing written.
        let tmp = tempfile::tempdir().unwrap();
        let out = out_path(tmp.path(), &base);
        let o = run(
            "boft-merge",
            &[
                &"--base",
                &base,
                &"--adapter",
                &a,
                &"-o",
                &out,
                &"--unmerge",
                &"--strength",
                &"0.5",
            ],
        );
        fails_with(&o, "usage");
        assert!(!out.exists());
    }
}
