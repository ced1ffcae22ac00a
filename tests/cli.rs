//! The command-line contract of the three binaries: help, version, and the foundation's error
//! cases (one line, exit 2, nothing written).

mod common;

use common::*;

#[test]
fn help_has_an_example_and_version_prints() {
    for b in ["boft-merge", "boft-convert", "boft-verify"] {
        let help = ok(&run(b, &[&"--help"]));
        assert!(help.contains("Example"), "{b}: {help}");
        let v = ok(&run(b, &[&"--version"]));
        assert!(v.contains(env!("CARGO_PKG_VERSION")), "{b}: {v}");
    }
}

#[test]
fn no_progress_bar_when_stderr_is_not_a_terminal() {
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    let o = run(
        "boft-merge",
        &[
            &"--base",
            &fx.join("bases/llama_f32"),
            &"--adapter",
            &fx.join("adapters/llama_f32_f1"),
            &"-o",
            &tmp.path().join("o"),
        ],
    );
    ok(&o);
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "only the summary line: {err}");
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
}

/// Run a merge that must fail; check class, one line, exit 2, nothing left in the output folder.
fn merge_fails(base: &std::path::Path, adapter: &std::path::Path, class: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let before_b = snapshot(base);
    let before_a = if adapter.exists() {
        Some(snapshot(adapter))
    } else {
        None
    };
    let err = fails_with(
        &run(
            "boft-merge",
            &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
        ),
        class,
    );
    assert!(
        dir_entries(tmp.path()).is_empty(),
        "left behind: {:?}",
        dir_entries(tmp.path())
    );
    assert_eq!(snapshot(base), before_b);
    if let Some(b) = before_a {
        assert_eq!(snapshot(adapter), b);
    }
    err
}

#[test]
fn truncated_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read(fixtures().join("peft_boft/bases/conv/model.safetensors")).unwrap();
    let p = tmp.path().join("model.safetensors");
    std::fs::write(&p, &src[..src.len() - 100]).unwrap();
    let err = merge_fails(
        &p,
        &fixtures().join("peft_boft/adapters/conv_f1"),
        "bad-offsets",
    );
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn non_safetensors_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("model.safetensors");
    std::fs::write(
        &p,
        b"PK\x03\x04 this is a zip file, as torch.save writes them",
    )
    .unwrap();
    let err = merge_fails(
        &p,
        &fixtures().join("peft_boft/adapters/conv_f1"),
        "header-too-large",
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_adapter_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("adapter");
    std::fs::create_dir(&a).unwrap();
    std::fs::copy(
        fixtures().join("peft_boft/adapters/conv_f1/adapter_config.json"),
        a.join("adapter_config.json"),
    )
    .unwrap();
    let err = merge_fails(
        &fixtures().join("peft_boft/bases/conv/model.safetensors"),
        &a,
        "not-found",
    );
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    let err = merge_fails(
        &fixtures().join("peft_boft/bases/conv/model.safetensors"),
        &tmp.path().join("no-such-adapter"),
        "not-found",
    );
    assert!(err.contains("no-such-adapter"), "{err}");
}

#[test]
fn adapter_aimed_at_tensors_the_base_lacks_is_refused() {
    let err = merge_fails(
        &fixtures().join("peft_boft/bases/conv/model.safetensors"),
        &fixtures().join("peft_boft/adapters/llama_f32_f1"),
        "missing-target",
    );
    assert!(
        err.contains("model.layers.") && err.contains("not in the base"),
        "{err}"
    );
}

#[test]
fn existing_output_needs_force_and_output_equal_to_base_is_always_refused() {
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    let base = fx.join("bases/conv/model.safetensors");
    let adapter = fx.join("adapters/conv_f1");
    let out = tmp.path().join("o.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    fails_with(
        &run(
            "boft-merge",
            &[&"--base", &base, &"--adapter", &adapter, &"-o", &out],
        ),
        "output-exists",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    ok(&run(
        "boft-merge",
        &[
            &"--base",
            &base,
            &"--adapter",
            &adapter,
            &"-o",
            &out,
            &"--force",
        ],
    ));
    assert_ne!(std::fs::read(&out).unwrap(), b"keep me");
    // The base itself, with or without --force.
    let copy = tmp.path().join("base.safetensors");
    std::fs::copy(&base, &copy).unwrap();
    let before = snapshot(&copy);
    for extra in [&[][..], &[&"--force" as &dyn AsRef<std::ffi::OsStr>][..]] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"--base", &copy, &"--adapter", &adapter, &"-o", &copy];
        args.extend_from_slice(extra);
        fails_with(&run("boft-merge", &args), "output-is-input");
        assert_eq!(snapshot(&copy), before);
    }
    assert_eq!(
        dir_entries(tmp.path()),
        vec!["base.safetensors", "o.safetensors"]
    );
}

#[test]
fn device_cuda_without_the_feature_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        return;
    }
    let fx = fixtures().join("peft_boft");
    let tmp = tempfile::tempdir().unwrap();
    let err = fails_with(
        &run(
            "boft-merge",
            &[
                &"--base",
                &fx.join("bases/conv/model.safetensors"),
                &"--adapter",
                &fx.join("adapters/conv_f1"),
                &"-o",
                &tmp.path().join("o"),
                &"--device",
                &"cuda",
            ],
        ),
        "no-device",
    );
    assert!(err.contains("--features cuda"), "{err}");
    assert!(dir_entries(tmp.path()).is_empty());
}
