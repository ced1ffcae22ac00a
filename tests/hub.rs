//! Models where users keep them: a Hugging Face hub cache (snapshot files are relative symlinks
//! into the repository's blobs/), named by snapshot path or by hub id, on the cache that
//! fixtures/generate/make_hf_cache.py built with huggingface_hub's own cache functions. Hostile
//! variants of that layout are built here, in temporary folders.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn cache() -> PathBuf {
    fixtures().join("hf_cache/hub")
}

/// Run a binary with the cache chosen by HF_HUB_CACHE, and no other cache variable leaking in.
fn run_hub(name: &str, cache: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = bin(name);
    for k in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
    ] {
        c.env_remove(k);
    }
    c.env("HF_HUB_CACHE", cache);
    for a in args {
        c.arg(a);
    }
    c.output().expect("binary runs")
}

/// Merge the cached adapter `boft-test/tiny-llama-boft` onto `base` (a path or hub id).
fn merge_onto(cache: &Path, base: &std::ffi::OsStr, out: &Path) -> Output {
    run_hub(
        "boft-merge",
        cache,
        &[
            &"--base",
            &base,
            &"--adapter",
            &"boft-test/tiny-llama-boft",
            &"-o",
            &out,
        ],
    )
}

fn snapshot_of(cache: &Path, repo: &str) -> PathBuf {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = std::fs::read_to_string(dir.join("refs/main")).unwrap();
    dir.join("snapshots").join(commit.trim())
}

fn expected() -> PathBuf {
    fixtures().join("peft_boft/merged/llama_bf16_f2")
}

/// The fixture really is a cache: every weight in the base snapshot is a relative symlink
/// into blobs/ (otherwise the tests below would prove nothing about symlinks).
#[test]
fn fixture_is_a_symlinked_cache() {
    let snap = snapshot_of(&cache(), "boft-test/tiny-llama");
    let mut links = 0;
    for rel in file_list(&snap) {
        let p = snap.join(&rel);
        let target =
            std::fs::read_link(&p).unwrap_or_else(|_| panic!("{} is no symlink", p.display()));
        assert!(target.is_relative(), "{}", target.display());
        assert!(target.to_string_lossy().contains("blobs/"));
        links += 1;
    }
    assert!(links >= 4, "{links}");
}

#[test]
fn merge_from_cache_by_path_and_by_id() {
    let c = cache();
    let snap = snapshot_of(&c, "boft-test/tiny-llama");
    let adapter = snapshot_of(&c, "boft-test/tiny-llama-boft");
    let tmp = tempfile::tempdir().unwrap();
    let by_path = tmp.path().join("by-path");
    ok(&run_hub(
        "boft-merge",
        &c,
        &[&"--base", &snap, &"--adapter", &adapter, &"-o", &by_path],
    ));
    assert_merge_matches(&by_path, &expected(), &snap);
    // Regular files out, not links back into someone's cache.
    for rel in file_list(&by_path) {
        let m = std::fs::symlink_metadata(by_path.join(&rel)).unwrap();
        assert!(m.file_type().is_file(), "{}", rel.display());
    }

    let by_id = tmp.path().join("by-id");
    ok(&run_hub(
        "boft-merge",
        &c,
        &[
            &"--base",
            &"boft-test/tiny-llama",
            &"--adapter",
            &"boft-test/tiny-llama-boft@main",
            &"-o",
            &by_id,
        ],
    ));
    assert_eq!(snapshot(&by_id), snapshot(&by_path));

    // verify and convert take snapshot paths and hub ids alike.
    let out = ok(&run_hub(
        "boft-verify",
        &c,
        &[&adapter, &"--base", &snap, &"--merged", &by_path],
    ));
    assert!(out.contains("PASS"), "{out}");
    let canon_by_path = tmp.path().join("p.safetensors");
    let out = ok(&run_hub(
        "boft-convert",
        &c,
        &[&adapter, &"-o", &canon_by_path, &"--base", &snap],
    ));
    assert!(out.contains("wrote"), "{out}");
    let out = ok(&run_hub(
        "boft-verify",
        &c,
        &[
            &"boft-test/tiny-llama-boft",
            &"--base",
            &"boft-test/tiny-llama",
            &"--merged",
            &by_id,
        ],
    ));
    assert!(out.contains("PASS"), "{out}");
    let canon = tmp.path().join("a.safetensors");
    let out = ok(&run_hub(
        "boft-convert",
        &c,
        &[
            &"boft-test/tiny-llama-boft",
            &"-o",
            &canon,
            &"--base",
            &"boft-test/tiny-llama",
        ],
    ));
    assert!(out.contains("wrote"), "{out}");

    let again = tmp.path().join("again");
    ok(&run_hub(
        "boft-merge",
        &c,
        &[
            &"--base",
            &"boft-test/tiny-llama",
            &"--adapter",
            &canon,
            &"-o",
            &again,
        ],
    ));
    assert_eq!(snapshot(&again), snapshot(&by_path));
}

/// HF_HOME/hub is used when HF_HUB_CACHE is not set, as huggingface_hub does.
#[test]
fn hf_home_is_searched() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hfhome");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::symlink(cache().canonicalize().unwrap(), home.join("hub")).unwrap();
    let mut c = bin("boft-verify");
    for k in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"] {
        c.env_remove(k);
    }
    let o = c
        .env("HF_HOME", &home)
        .args([
            "boft-test/tiny-llama-boft",
            "--base",
            "boft-test/tiny-llama",
        ])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains("PASS"), "{out}");
}

/// An older revision by commit hash; a single-file adapter repository names its one file; a
/// path inside a snapshot (a diffusers component folder whose files link ../../../blobs).
#[test]
fn revisions_files_and_subfolders() {
    let c = cache();
    let tmp = tempfile::tempdir().unwrap();
    let repo = c.join("models--boft-test--tiny-llama");
    let main = std::fs::read_to_string(repo.join("refs/main")).unwrap();
    let older: Vec<String> = std::fs::read_dir(repo.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != main.trim())
        .collect();
    assert_eq!(older.len(), 1, "{older:?}");
    let o = run_hub(
        "boft-verify",
        &c,
        &[
            &"boft-test/tiny-llama-boft",
            &"--base",
            &format!("boft-test/tiny-llama@{}", older[0]),
            &"--checks",
            &"target-present",
        ],
    );
    assert!(o.status.code() == Some(0), "{}", stderr(&o));

    let unet = tmp.path().join("unet");
    ok(&run_hub(
        "boft-merge",
        &c,
        &[
            &"--base",
            &"boft-test/tiny-unet/unet",
            &"--adapter",
            &"boft-test/tiny-unet-lycoris",
            &"-o",
            &unet,
        ],
    ));
    let sd = fixtures().join("sd_names");
    assert_merge_matches(
        &unet,
        &sd.join("merged_diffusers/unet"),
        &sd.join("base_diffusers/unet"),
    );
}

#[test]
fn missing_repo_revision_or_file_is_one_line() {
    let c = cache();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    for (base, what) in [
        (
            "boft-test/no-such-model",
            "boft-test/no-such-model is not in the cache",
        ),
        ("boft-test/tiny-llama@v9", "revision \"v9\""),
        (
            "boft-test/tiny-llama/no/such/dir",
            "no/such/dir is not in the cached snapshot",
        ),
    ] {
        let o = merge_onto(&c, base.as_ref(), &out);
        let line = fails_with(&o, "not-found");
        assert!(line.contains(what), "{line}");
        assert!(
            line.contains(&c.display().to_string()),
            "names the cache: {line}"
        );
        assert!(!out.exists());
    }
}

/// Copy the real cache into a temporary folder, so it can be tampered with.
fn copy_cache(to: &Path) {
    fn walk(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let (f, t) = (e.path(), to.join(e.file_name()));
            let ty = e.file_type().unwrap();
            if ty.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(&f).unwrap(), &t).unwrap();
            } else if ty.is_dir() {
                walk(&f, &t);
            } else {
                std::fs::copy(&f, &t).unwrap();
            }
        }
    }
    walk(&cache(), to);
}

/// Changes a copied cache, given its snapshot and repository folders.
type Tamper<'a> = dyn Fn(&Path, &Path) + 'a;

/// The cache layout opens blobs/ of the snapshot's own repository, and nothing else: a link to
/// a file outside, to another repository's blob, or through a blobs/ that is itself a symlink
/// is refused as before.
#[test]
fn escapes_from_a_snapshot_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, "id_rsa").unwrap();

    let tamper: &[(&str, &Tamper)] = &[
        ("outside", &|snap: &Path, _repo: &Path| {
            std::os::unix::fs::symlink(&secret, snap.join("notes.txt")).unwrap();
        }),
        ("other repository's blob", &|snap: &Path, repo: &Path| {
            let other = repo
                .parent()
                .unwrap()
                .join("models--boft-test--tiny-llama-boft/blobs");
            let blob = std::fs::read_dir(&other)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            std::os::unix::fs::symlink(blob, snap.join("notes.txt")).unwrap();
        }),
        ("blobs is a symlink", &|_snap: &Path, repo: &Path| {
            let blobs = repo.join("blobs");
            let moved = repo.parent().unwrap().join("elsewhere");
            std::fs::rename(&blobs, &moved).unwrap();
            std::os::unix::fs::symlink(&moved, &blobs).unwrap();
        }),
    ];
    for (i, (what, f)) in tamper.iter().enumerate() {
        let c = tmp.path().join(format!("cache{i}"));
        copy_cache(&c);
        let snap = snapshot_of(&c, "boft-test/tiny-llama");
        f(&snap, &c.join("models--boft-test--tiny-llama"));
        let out = tmp.path().join(format!("out{i}"));
        for base in [snap.as_os_str(), "boft-test/tiny-llama".as_ref()] {
            let o = merge_onto(&c, base, &out);
            let line = fails_with(&o, "path-escape");
            assert!(!out.exists(), "{what}");
            assert!(
                line.contains("outside the checkpoint folder"),
                "{what}: {line}"
            );
        }
    }

    // A ref that does not hold a commit hash cannot steer the lookup out of snapshots/.
    let c = tmp.path().join("cache-ref");
    copy_cache(&c);
    std::fs::write(
        c.join("models--boft-test--tiny-llama/refs/main"),
        "../../../../etc",
    )
    .unwrap();
    let o = merge_onto(&c, "boft-test/tiny-llama".as_ref(), &tmp.path().join("o"));
    let line = fails_with(&o, "bad-index");
    assert!(line.contains("commit hash"), "{line}");
}
