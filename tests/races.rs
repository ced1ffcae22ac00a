//! Inputs changed by another process while a run holds them (issue 11, class 1): what was
//! checked is what is read. Files are opened once and checked on the opened handle; the merge
//! copies from the handles it mapped, never from whatever a path names by then; a folder's other
//! files are re-checked when they are opened to be copied.

use std::path::Path;

use boft::checkpoint::Checkpoint;
use boft::merge::{self, CpuBackend, Direction, Layer};
use boft::output::Staged;
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
        &[Layer::full(&a)],
        out,
        &[base, &adapter_dir],
        false,
        &CpuBackend,
        &merge::NoProgress,
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

/// Merge `base` into the folder `out` by the library's steps, letting `before_files` act on the
/// staged folder once it is made and `before_commit` once it is written.
fn merge_staged(
    base: &Path,
    out: &Path,
    before_files: impl FnOnce(&Path),
    before_commit: impl FnOnce(&Path),
) -> boft::Result<()> {
    let adapter_dir = fixtures().join("peft_boft/adapters/llama_bf16_f2");
    let mut a = boft::formats::load_deferred_as(&adapter_dir, boft::formats::Source::Auto).unwrap();
    let ck = Checkpoint::open(base)?;
    merge::fit_in(&ck, &mut a, true, None)?;
    let plan = merge::plan(&ck, &a, Direction::Merge)?;
    let staged = Staged::dir(out)?;
    before_files(staged.path());
    plan.execute(&staged, &CpuBackend, &merge::NoProgress)
        .map_err(|e| staged.blame_dest(e))?;
    before_commit(staged.path());
    staged.commit()
}

/// Another process that can write the output's parent renames the staged folder away and puts a
/// symlink to a folder of its choice at the staged name (issue 11, d09).
fn swap_for_symlink(staged: &Path, moved: &Path, victim: &Path) {
    std::fs::rename(staged, moved).unwrap();
    std::os::unix::fs::symlink(victim, staged).unwrap();
}

fn swap_scene() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_dir(
        &fixtures().join("peft_boft/bases/llama_bf16_sharded"),
        &base,
    );
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    (tmp, base, victim)
}

#[test]
fn a_staged_folder_swapped_for_a_symlink_before_its_files_is_refused() {
    let (tmp, base, victim) = swap_scene();
    let out = tmp.path().join("out");
    let moved = tmp.path().join("moved-away");
    let e = merge_staged(
        &base,
        &out,
        |s| swap_for_symlink(s, &moved, &victim),
        |_| {},
    )
    .unwrap_err();
    assert_eq!(e.class, Class::Io, "{}", e.message);
    assert!(e.message.contains("replaced"), "{}", e.message);
    assert_eq!(e.path.as_deref(), Some(out.as_path()));
    let written: Vec<_> = std::fs::read_dir(&victim).unwrap().collect();
    assert!(
        written.is_empty(),
        "written outside the output: {written:?}"
    );
    assert!(std::fs::symlink_metadata(&out).is_err(), "{out:?} exists");
}

#[test]
fn a_staged_folder_swapped_for_a_symlink_before_commit_is_refused() {
    let (tmp, base, victim) = swap_scene();
    let out = tmp.path().join("out");
    let moved = tmp.path().join("moved-away");
    let e = merge_staged(
        &base,
        &out,
        |_| {},
        |s| swap_for_symlink(s, &moved, &victim),
    )
    .unwrap_err();
    assert_eq!(e.class, Class::Io, "{}", e.message);
    assert!(e.message.contains("replaced"), "{}", e.message);
    assert!(std::fs::symlink_metadata(&out).is_err(), "{out:?} exists");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
    // The planted symlink is not ours to remove.
    let staged: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("boft-partial"))
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    assert!(std::fs::symlink_metadata(&staged[0])
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn an_existing_output_is_kept_when_the_staged_folder_is_swapped() {
    let (tmp, base, victim) = swap_scene();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), b"old").unwrap();
    let moved = tmp.path().join("moved-away");
    let adapter_dir = fixtures().join("peft_boft/adapters/llama_bf16_f2");
    let mut a = boft::formats::load_deferred_as(&adapter_dir, boft::formats::Source::Auto).unwrap();
    let ck = Checkpoint::open(&base).unwrap();
    merge::fit_in(&ck, &mut a, true, None).unwrap();
    let plan = merge::plan(&ck, &a, Direction::Merge).unwrap();
    let staged = Staged::dir(&out).unwrap();
    plan.execute(&staged, &CpuBackend, &merge::NoProgress)
        .unwrap();
    swap_for_symlink(staged.path(), &moved, &victim);
    let e = staged.commit().unwrap_err();
    assert_eq!(e.class, Class::Io, "{}", e.message);
    assert!(std::fs::symlink_metadata(&out).unwrap().is_dir());
    assert_eq!(std::fs::read(out.join("old.txt")).unwrap(), b"old");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
}

#[test]
fn a_staged_file_swapped_before_commit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, b"victim").unwrap();
    let staged = Staged::file(&out).unwrap();
    use std::io::Write;
    staged.file_handle().write_all(b"ours").unwrap();
    std::fs::rename(staged.path(), tmp.path().join("moved-away")).unwrap();
    std::os::unix::fs::symlink(&victim, staged.path()).unwrap();
    let e = staged.commit().unwrap_err();
    assert_eq!(e.class, Class::Io, "{}", e.message);
    assert!(e.message.contains("replaced"), "{}", e.message);
    assert!(std::fs::symlink_metadata(&out).is_err(), "{out:?} exists");
    assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
}
