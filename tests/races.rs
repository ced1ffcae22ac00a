//! Inputs changed by another process while a run holds them (issue 11, class 1): what was
//! checked is what is read. Files are opened once and checked on the opened handle; the merge
//! copies from the handles it mapped, never from whatever a path names by then; a folder's other
//! files are re-checked when they are opened to be copied.

use std::path::Path;

use boft::adapter::Strength;
use boft::checkpoint::Checkpoint;
use boft::merge::{self, CpuBackend, Direction, Options};
use boft::Class;

mod common;
use common::fixtures;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

const OPTS: Options = Options {
    direction: Direction::Merge,
    progress: &merge::NoProgress,
    strength: Strength::FULL,
};

/// Open the base and the adapter as `boft-merge` does, let `meddle` change the base folder,
/// then write the merge.
fn merge_after(base: &Path, out: &Path, meddle: impl FnOnce()) -> boft::Result<()> {
    let adapter_dir = fixtures().join("peft_boft/adapters/llama_bf16_f2");
    let mut a = boft::formats::load_deferred_as(&adapter_dir, boft::formats::Source::Auto).unwrap();
    let ck = Checkpoint::open(base)?;
    merge::fit_in(&ck, &mut a, true, None)?;
    meddle();
    merge::merge_to(
        &ck,
        &a,
        out,
        &[base, &adapter_dir],
        false,
        &CpuBackend,
        &OPTS,
    )
    .map(|_| ())
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_shard_replaced_after_opening_is_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(
        &fixtures().join("peft_boft/bases/llama_bf16_sharded"),
        &base,
    );
    let want = tmp.path().join("want");
    merge_after(&base, &want, || {}).unwrap();

    // Another process renames a different file of the same size over each shard (a new inode
    // at the old path) once the run has checked and mapped them.
    let got = tmp.path().join("got");
    merge_after(&base, &got, || {
        for name in [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ] {
            let p = base.join(name);
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            let other = tmp.path().join("other");
            std::fs::write(&other, vec![0x5a; len]).unwrap();
            std::fs::rename(&other, &p).unwrap();
        }
    })
    .unwrap();
    assert_eq!(
        tree(&got),
        tree(&want),
        "the merge read the replaced shards"
    );
}

#[test]
fn another_file_swapped_for_a_symlink_outside_is_refused_when_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(
        &fixtures().join("peft_boft/bases/llama_bf16_sharded"),
        &base,
    );
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, b"not for the output").unwrap();
    let out = tmp.path().join("out");
    let e = merge_after(&base, &out, || {
        let p = base.join("generation_config.json");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&secret, &p).unwrap();
    })
    .unwrap_err();
    assert_eq!(e.class, Class::PathEscape, "{}", e.message);
    assert!(!out.exists(), "a refused merge left {out:?}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("boft-partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn another_file_swapped_for_a_fifo_is_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(
        &fixtures().join("peft_boft/bases/llama_bf16_sharded"),
        &base,
    );
    let out = tmp.path().join("out");
    // Opening a FIFO for reading waits for a writer: the run would hang here.
    let e = merge_after(&base, &out, || {
        let p = base.join("generation_config.json");
        std::fs::remove_file(&p).unwrap();
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    })
    .unwrap_err();
    assert_eq!(e.class, Class::Io, "{}", e.message);
    assert!(e.message.contains("not a regular file"), "{}", e.message);
    assert!(!out.exists());
}
