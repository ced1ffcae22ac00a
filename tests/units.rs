//! A merge split into units (issue 17, docs/SCALE.md): `--plan`, `--unit K/N`, `--finalize`.
//! Every split of a sharded fixture, run in any order and with units run twice, finalizes to the
//! bytes a single `boft-merge` writes; a unit killed mid-write and run again still finalizes;
//! finalize refuses a missing, stale or tampered unit with one line and moves nothing.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::scene::{copy_tree, tree, St};
use common::*;
use serde_json::Value;

const BASE: &str = "resharded/base_llama_bf16_resharded";
const ADAPTER: &str = "peft_boft/adapters/llama_bf16_f2";

fn merge(args: &[&dyn AsRef<OsStr>]) -> Output {
    run("boft-merge", args)
}

/// `boft-merge --base B --adapter A -o OUT` plus `extra`.
fn m(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut c = bin("boft-merge");
    c.arg("--base").arg(base).arg("--adapter").arg(adapter);
    c.arg("-o").arg(out).args(extra).arg("-q");
    c.output().unwrap()
}

fn staging(out: &Path) -> PathBuf {
    out.with_file_name(format!(
        ".{}.boft-units",
        out.file_name().unwrap().to_string_lossy()
    ))
}

/// Files of an output: names and bytes.
fn bytes_of(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if p.is_file() {
        return vec![(PathBuf::new(), std::fs::read(p).unwrap())];
    }
    file_list(p)
        .into_iter()
        .map(|r| {
            let b = std::fs::read(p.join(&r)).unwrap();
            (r, b)
        })
        .collect()
}

fn assert_same(got: &Path, want: &Path) {
    let (g, w) = (bytes_of(got), bytes_of(want));
    let names = |v: &[(PathBuf, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&g), names(&w), "{}", got.display());
    for ((n, a), (_, b)) in g.iter().zip(&w) {
        assert!(a == b, "{} differs from the single merge", n.display());
    }
}

/// `out` is what a single `boft-merge` of the same inputs (with `extra`) writes, byte for byte.
fn matches_single(dir: &Path, base: &Path, adapter: &Path, out: &Path, extra: &[&str]) {
    let want = dir.join("want");
    ok(&m(base, adapter, &want, extra));
    assert_same(out, &want);
}

/// Every worker run again (units already done are skipped), then finalize: the single merge.
fn rerun_and_finalize(dir: &Path, base: &Path, adapter: &Path, out: &Path) {
    ok(&m(base, adapter, out, &["--unit", "0/1"]));
    ok(&m(base, adapter, out, &["--finalize"]));
    matches_single(dir, base, adapter, out, &[]);
}

/// Flip `len` bytes of `path` in place at `at` (its size, name and inode unchanged).
fn flip(path: &Path, at: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, at).unwrap();
    v.iter_mut().for_each(|b| *b ^= 0x01);
    f.write_all_at(&v, at).unwrap();
}

fn plan(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--plan"];
    args.extend_from_slice(extra);
    let o = m(base, adapter, out, &args);
    serde_json::from_str(&ok(&o)).unwrap()
}

fn unit_indices(p: &Value) -> BTreeSet<u64> {
    p["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["unit"].as_u64().unwrap())
        .collect()
}

/// A deterministic shuffle of 0..n (a different order for each seed).
fn order(n: usize, seed: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

#[test]
fn every_split_in_any_order_finalizes_to_the_single_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let inputs = (snapshot(&base), snapshot(&adapter));
    let want = tmp.path().join("want");
    ok(&m(&base, &adapter, &want, &[]));
    let files = file_list(&base)
        .iter()
        .filter(|p| p.extension() == Some(OsStr::new("safetensors")))
        .count();
    assert_eq!(files, 4, "the fixture is sharded in four");
    let all = plan(&base, &adapter, &tmp.path().join("x"), &[]);
    assert_eq!(all["units_total"], 4);
    for n in 1..=files + 1 {
        let out = tmp.path().join(format!("split{n}"));
        // The shares of the N workers are disjoint and cover every unit.
        let mut seen = BTreeSet::new();
        for k in 0..n {
            let share = unit_indices(&plan(
                &base,
                &adapter,
                &out,
                &["--unit", &format!("{k}/{n}")],
            ));
            assert!(seen.is_disjoint(&share), "N={n}: units given twice");
            seen.extend(share);
        }
        assert_eq!(seen, unit_indices(&all), "N={n}");
        // Any order, and one worker's share run twice (the second time it has nothing to do).
        let mut runs = order(n, n);
        runs.push(runs[0]);
        for k in runs {
            ok(&m(&base, &adapter, &out, &["--unit", &format!("{k}/{n}")]));
        }
        assert!(!out.exists(), "a unit moved the output into place");
        ok(&m(&base, &adapter, &out, &["--finalize"]));
        assert_same(&out, &want);
        assert!(!staging(&out).exists(), "N={n}: staging folder left");
    }
    assert_eq!((snapshot(&base), snapshot(&adapter)), inputs);
}

#[test]
fn a_single_file_base_is_one_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("peft_boft/bases/llama_f32/model.safetensors");
    let adapter = fixtures().join("peft_boft/adapters/llama_f32_f2");
    let want = tmp.path().join("want.safetensors");
    ok(&m(&base, &adapter, &want, &[]));
    let out = tmp.path().join("out.safetensors");
    assert_eq!(plan(&base, &adapter, &out, &[])["units_total"], 1);
    // Worker 1 of 2 has nothing to do.
    let o = m(&base, &adapter, &out, &["--unit", "1/2"]);
    ok(&o);
    ok(&m(&base, &adapter, &out, &["--unit", "0/2"]));
    ok(&m(&base, &adapter, &out, &["--finalize", "--rehash"]));
    assert_same(&out, &want);
    assert_eq!(
        dir_entries(tmp.path()),
        ["out.safetensors", "want.safetensors"]
    );
}

#[test]
fn a_batch_is_split_per_job_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("peft_boft/bases/llama_bf16_sharded");
    let a1 = fixtures().join("peft_boft/adapters/llama_bf16_f2");
    let a2 = fixtures().join("peft_boft/adapters/llama_bf16_f3_adapter_f16");
    let jobs = |dir: &str| {
        let p = tmp.path().join(format!("{dir}.json"));
        let j = serde_json::json!({"jobs": [
            {"output": tmp.path().join(dir).join("one"), "adapters": [a1]},
            {"output": tmp.path().join(dir).join("two"), "adapters": [a2, format!("{},strength=0.5", a1.display())]},
        ]});
        std::fs::create_dir(tmp.path().join(dir)).unwrap();
        std::fs::write(&p, j.to_string()).unwrap();
        p
    };
    let (want, got) = (jobs("want"), jobs("got"));
    ok(&merge(&[&"--base", &base, &"--batch", &want, &"-q"]));
    let p: Value = serde_json::from_str(&ok(&merge(&[
        &"--base", &base, &"--batch", &got, &"--plan",
    ])))
    .unwrap();
    assert_eq!(p["units_total"], 4, "two jobs × two files");
    let plans: BTreeSet<&str> = p["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["plan"].as_str().unwrap())
        .collect();
    assert_eq!(plans.len(), 2, "one plan id per job");
    for k in [3, 1, 0, 2] {
        ok(&merge(&[
            &"--base",
            &base,
            &"--batch",
            &got,
            &"--unit",
            &format!("{k}/4"),
            &"-q",
        ]));
    }
    ok(&merge(&[
        &"--base",
        &base,
        &"--batch",
        &got,
        &"--finalize",
        &"-q",
    ]));
    for job in ["one", "two"] {
        assert_same(
            &tmp.path().join("got").join(job),
            &tmp.path().join("want").join(job),
        );
    }
}

/// The resharded base with a 96 MiB tensor of zeros added to its first shard, so that writing
/// that unit takes long enough to be caught in the middle.
fn padded_base(dir: &Path) -> (PathBuf, String) {
    let base = dir.join("base");
    copy_tree(&fixtures().join(BASE), &base);
    let index_path = base.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let shard = index["weight_map"]["model.embed_tokens.weight"]
        .as_str()
        .unwrap()
        .to_string();
    let mut st = St::read(&base.join(&shard));
    let n = 48 << 20;
    st.tensors
        .push(("pad".into(), "BF16".into(), vec![n], vec![0u8; 2 * n]));
    st.write(&base.join(&shard));
    index["weight_map"]["pad"] = Value::String(shard.clone());
    std::fs::write(&index_path, index.to_string()).unwrap();
    (base, shard)
}

fn spawn_unit(base: &Path, adapter: &Path, out: &Path, share: &str) -> std::process::Child {
    bin("boft-merge")
        .arg("--base")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("-o")
        .arg(out)
        .args(["--unit", share, "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default()
}

#[test]
fn a_unit_killed_mid_write_runs_again_and_finalizes() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = padded_base(tmp.path());
    let adapter = fixtures().join(ADAPTER);
    let want = tmp.path().join("want");
    ok(&m(&base, &adapter, &want, &[]));
    let out = tmp.path().join("out");
    // The padded shard is the largest unit, so worker 0 of 4 gets it alone.
    let p = plan(&base, &adapter, &out, &["--unit", "0/4"]);
    assert_eq!(p["units"].as_array().unwrap().len(), 1);
    assert!(p["units"][0]["bytes"].as_u64().unwrap() > 96 << 20);
    for k in 1..4 {
        ok(&m(&base, &adapter, &out, &["--unit", &format!("{k}/4")]));
    }
    let (data, records) = (staging(&out).join("data"), staging(&out).join("records"));
    let before = entries(&records);
    assert_eq!(before.len(), 3);
    // Killed once its file exists and before its record does: mid-write.
    let mut child = spawn_unit(&base, &adapter, &out, "0/4");
    let start = Instant::now();
    while entries(&data).len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "no data file");
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        entries(&records),
        before,
        "the killed unit published a record"
    );
    assert_eq!(entries(&data).len(), 4, "the killed unit's file is left");
    // Finalize refuses the set without it, naming it.
    let o = m(&base, &adapter, &out, &["--finalize"]);
    let e = fails_with(&o, "units-incomplete");
    assert!(e.contains("has not run"), "{e}");
    assert!(!out.exists());
    // Run again: a new file and a record; the dead run's file is left (it was written less
    // than SWEEP_AFTER ago) until finalize removes the folder.
    ok(&m(&base, &adapter, &out, &["--unit", "0/4"]));
    assert_eq!(entries(&records).len(), 4);
    assert_eq!(entries(&data).len(), 5);
    ok(&m(&base, &adapter, &out, &["--finalize"]));
    assert_same(&out, &want);
    assert!(!staging(&out).exists());
}

#[test]
fn two_workers_on_one_unit_at_once_do_not_corrupt_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = padded_base(tmp.path());
    let adapter = fixtures().join(ADAPTER);
    let want = tmp.path().join("want");
    ok(&m(&base, &adapter, &want, &[]));
    let out = tmp.path().join("out");
    let a = spawn_unit(&base, &adapter, &out, "0/1");
    let b = spawn_unit(&base, &adapter, &out, "0/1");
    // Both ran it (each takes far longer than starting the other): neither found a record.
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        ok(&o);
        assert!(
            stderr(&o).contains("4 of the merge's 4 units written"),
            "{}",
            stderr(&o)
        );
    }
    ok(&m(&base, &adapter, &out, &["--finalize", "--rehash"]));
    assert_same(&out, &want);
}

/// A split merge of the fixture with every unit run, into `dir/out`.
fn all_units(dir: &Path, extra: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let out = dir.join("out");
    for k in 0..2 {
        let share = format!("{k}/2");
        let mut args = vec!["--unit", share.as_str()];
        args.extend_from_slice(extra);
        ok(&m(&base, &adapter, &out, &args));
    }
    (base, adapter, out)
}

/// Finalize is refused with one `[units-incomplete]` line containing `says`; nothing moves and
/// the staging folder is as it was.
fn refused(base: &Path, adapter: &Path, out: &Path, extra: &[&str], says: &str) {
    let before = tree(&staging(out));
    let mut args = vec!["--finalize"];
    args.extend_from_slice(extra);
    let e = fails_with(&m(base, adapter, out, &args), "units-incomplete");
    assert!(e.contains(says), "expected {says:?} in: {e}");
    assert!(e.contains(&out.display().to_string()), "{e}");
    assert!(!out.exists(), "something was moved into place");
    assert_eq!(tree(&staging(out)), before, "the staging folder changed");
    let parent: Vec<String> = entries(out.parent().unwrap())
        .into_iter()
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(parent.is_empty(), "left: {parent:?}");
}

/// The record of the unit that wrote base file `file` (`f<i>.json`), and the path of its data.
fn record(out: &Path, i: usize) -> (PathBuf, Value, PathBuf) {
    let p = staging(out).join("records").join(format!("f{i}.json"));
    let r: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let data = staging(out).join("data").join(r["data"].as_str().unwrap());
    (p, r, data)
}

#[test]
fn finalize_refuses_a_missing_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let out = tmp.path().join("out");
    // Nothing ran at all: no staging folder.
    let e = fails_with(
        &m(&base, &adapter, &out, &["--finalize"]),
        "units-incomplete",
    );
    assert!(
        e.contains("unit 0 of 4") && e.contains("units 1, 2, 3"),
        "{e}"
    );
    ok(&m(&base, &adapter, &out, &["--unit", "1/2"]));
    refused(&base, &adapter, &out, &[], "has not run (no record)");
    ok(&m(&base, &adapter, &out, &["--unit", "0/2"]));
    ok(&m(&base, &adapter, &out, &["--finalize"]));
}

#[test]
fn finalize_refuses_units_of_another_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = all_units(tmp.path(), &["--strength", "0.5"]);
    refused(&base, &adapter, &out, &[], "ran for another merge");
    // Another adapter: the same.
    let other = fixtures().join("peft_boft/adapters/llama_bf16_f3_adapter_f16");
    refused(
        &base,
        &other,
        &out,
        &["--strength", "0.5"],
        "ran for another merge",
    );
    // What they ran for finalizes.
    ok(&m(
        &base,
        &adapter,
        &out,
        &["--finalize", "--strength", "0.5"],
    ));
    matches_single(tmp.path(), &base, &adapter, &out, &["--strength", "0.5"]);
}

#[test]
fn finalize_refuses_a_tampered_unit() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = all_units(tmp.path(), &[]);
    let (_, _, data) = record(&out, 2);
    // Timestamps have a coarse clock on some filesystems: leave a tick between the unit's
    // record and the change.
    std::thread::sleep(Duration::from_millis(50));
    flip(&data, 1000, 1);
    refused(&base, &adapter, &out, &[], "unit 2 of 4");
    refused(&base, &adapter, &out, &[], "changed or replaced");
    // Run again, it is rewritten.
    rerun_and_finalize(tmp.path(), &base, &adapter, &out);
}

#[test]
fn finalize_refuses_a_replaced_unit_file_and_a_forged_record() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = all_units(tmp.path(), &[]);
    // Another file (another inode) renamed over a unit's file.
    let (_, _, data) = record(&out, 1);
    let copy = tmp.path().join("copy");
    std::fs::copy(&data, &copy).unwrap();
    std::fs::rename(&copy, &data).unwrap();
    refused(&base, &adapter, &out, &[], "changed or replaced");
    ok(&m(&base, &adapter, &out, &["--unit", "0/1"]));
    // A record whose hash was edited: --rehash reads the file again and catches it.
    let (p, mut r, _) = record(&out, 3);
    r["sha256"] = Value::String("0".repeat(64));
    std::fs::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
    refused(&base, &adapter, &out, &["--rehash"], "SHA-256 differs");
    // A record that is not one.
    std::fs::write(&p, b"{\"format\": 1}").unwrap();
    refused(&base, &adapter, &out, &[], "bad record");
    // A record naming a file outside data/.
    r["data"] = Value::String("../records/f0.json".into());
    std::fs::write(&p, serde_json::to_string(&r).unwrap()).unwrap();
    refused(&base, &adapter, &out, &[], "bad record");
}

#[test]
fn units_refuse_what_a_merge_refuses_and_bad_shares() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let out = tmp.path().join("out");
    for share in ["2/2", "x", "1", "-1/2", "0/0", "0/2x"] {
        let flag = format!("--unit={share}");
        let e = fails_with(&m(&base, &adapter, &out, &[&flag]), "usage");
        assert!(e.contains("--unit"), "{e}");
    }
    fails_with(&m(&base, &adapter, &out, &["--rehash"]), "usage");
    fails_with(
        &m(&base, &adapter, &out, &["--unit", "0/1", "--finalize"]),
        "usage",
    );
    assert!(!staging(&out).exists());
    // An existing output without --force: refused before anything is staged.
    std::fs::create_dir(&out).unwrap();
    fails_with(
        &m(&base, &adapter, &out, &["--unit", "0/1"]),
        "output-exists",
    );
    assert!(!staging(&out).exists());
    // With it, the units run and finalize replaces it.
    ok(&m(&base, &adapter, &out, &["--unit", "0/1", "--force"]));
    ok(&m(&base, &adapter, &out, &["--finalize", "--force"]));
    assert!(out.join("model.safetensors.index.json").is_file());
}

#[test]
fn a_symlink_at_the_staging_folder_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let out = tmp.path().join("out");
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, staging(&out)).unwrap();
    let e = fails_with(&m(&base, &adapter, &out, &["--unit", "0/1"]), "io");
    assert!(e.contains("not a units folder"), "{e}");
    fails_with(&m(&base, &adapter, &out, &["--finalize"]), "io");
    assert!(entries(&victim).is_empty());
    assert!(!out.exists());
}

#[test]
fn the_plan_says_what_each_unit_reads_and_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (fixtures().join(BASE), fixtures().join(ADAPTER));
    let out = tmp.path().join("out");
    let p = plan(&base, &adapter, &out, &[]);
    assert_eq!(p["format"], "boft-merge-plan");
    let ck = boft::checkpoint::Checkpoint::open(&base).unwrap();
    let mut tensors = 0;
    for u in p["units"].as_array().unwrap() {
        let file = u["file"].as_str().unwrap();
        let (_, sf) = ck.files.iter().find(|(r, _)| r == Path::new(file)).unwrap();
        assert_eq!(u["bytes"].as_u64().unwrap(), sf.len() as u64);
        assert_eq!(
            u["writes"].as_str().unwrap(),
            out.join(file).to_str().unwrap()
        );
        // The whole base file, then the adapter's files when something is transformed.
        let reads = u["reads"].as_array().unwrap();
        assert_eq!(
            reads[0]["path"].as_str().unwrap(),
            sf.path.to_str().unwrap()
        );
        assert_eq!(
            (reads[0]["start"].as_u64(), reads[0]["end"].as_u64()),
            (Some(0), Some(sf.len() as u64))
        );
        let n = u["tensors"].as_array().unwrap().len();
        assert_eq!(n, sf.tensors.len());
        let counted = ["transformed", "replaced", "copied"]
            .iter()
            .map(|k| u[k].as_u64().unwrap() as usize)
            .sum::<usize>();
        assert_eq!(counted, n);
        assert_eq!(reads.len() > 1, u["transformed"].as_u64() > Some(0));
        tensors += n;
    }
    assert_eq!(tensors, ck.tensor_names().count());
    assert_eq!(
        p["finalize"][0]["copies"],
        serde_json::json!([
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json"
        ])
    );
    // Nothing was written.
    assert_eq!(dir_entries(tmp.path()), Vec::<String>::new());
}

/// Split `base` + `adapter` into `n` workers (environment `env` for every run) and finalize;
/// the output must be the single merge's, byte for byte.
fn split_equals_single(dir: &Path, base: &OsStr, adapter: &OsStr, n: usize, env: &[(&str, &Path)]) {
    let run = |out: &Path, extra: &[String]| {
        let mut c = bin("boft-merge");
        for (k, v) in env {
            c.env(k, v);
        }
        c.arg("--base").arg(base).arg("--adapter").arg(adapter);
        c.arg("-o").arg(out).args(extra).arg("-q");
        ok(&c.output().unwrap());
    };
    let (want, got) = (dir.join("want"), dir.join("got"));
    run(&want, &[]);
    for k in order(n, 7) {
        run(&got, &["--unit".into(), format!("{k}/{n}")]);
    }
    run(&got, &["--finalize".into()]);
    assert_same(&got, &want);
    assert_eq!(dir_entries(dir), ["got", "want"]);
}

#[test]
fn a_diffusers_pipeline_splits_per_component_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("sdxl_pipeline/base");
    let adapter = fixtures().join("sdxl_pipeline/adapters/sdxl_lycoris_diag_oft.safetensors");
    let p = plan(&base, &adapter, &tmp.path().join("x"), &[]);
    let n = p["units_total"].as_u64().unwrap() as usize;
    assert!(n >= 3, "unet, text encoders, vae: {n} units");
    split_equals_single(tmp.path(), base.as_os_str(), adapter.as_os_str(), n, &[]);
}

#[test]
fn hub_ids_in_the_cache_split_and_keep_the_snapshot_links() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = fixtures().join("hf_cache/hub");
    split_equals_single(
        tmp.path(),
        OsStr::new("boft-test/tiny-llama"),
        OsStr::new("boft-test/tiny-llama-boft"),
        2,
        &[("HF_HUB_CACHE", &cache)],
    );
}

#[test]
fn units_of_a_base_whose_values_changed_are_stale() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    copy_tree(&fixtures().join(BASE), &base);
    let adapter = fixtures().join(ADAPTER);
    let out = tmp.path().join("out");
    for k in 0..2 {
        ok(&m(&base, &adapter, &out, &["--unit", &format!("{k}/2")]));
    }
    // The same architecture with other values in one tensor (a norm-only fine-tune, say): same
    // names, sizes and headers.
    let name = "model.norm.weight";
    let (shard, at, len) = {
        let ck = boft::checkpoint::Checkpoint::open(&base).unwrap();
        let (f, t) = ck.get(name).unwrap();
        (
            f.path.clone(),
            (f.data_offset + t.start) as u64,
            t.end - t.start,
        )
    };
    flip(&shard, at, len);
    refused(&base, &adapter, &out, &[], "ran for another merge");
    // Running every worker again rewrites that unit (the others are still this base's).
    rerun_and_finalize(tmp.path(), &base, &adapter, &out);
}

#[test]
fn a_unit_file_with_another_name_is_copied_not_linked() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, out) = all_units(tmp.path(), &[]);
    // Another name for one unit's file, kept outside: whoever holds it could rewrite the
    // output later if finalize linked that inode into it.
    let (_, r, data) = record(&out, 0);
    let other = tmp.path().join("other-name");
    std::fs::hard_link(&data, &other).unwrap();
    ok(&m(&base, &adapter, &out, &["--finalize"]));
    let file = r["file"].as_str().unwrap();
    let (a, b) = (
        std::fs::metadata(out.join(file)).unwrap(),
        std::fs::metadata(&other).unwrap(),
    );
    assert_ne!(a.ino(), b.ino(), "linked an inode with another name");
    matches_single(tmp.path(), &base, &adapter, &out, &[]);
}
