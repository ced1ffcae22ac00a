//! Helpers shared by the integration tests: run the real binaries, read safetensors files and
//! compare tensors against the reference libraries' outputs.
#![allow(dead_code)]

pub mod scene;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use boft::checkpoint::{dtype, Checkpoint, Dtype};

/// The fixtures folder; `BOFT_FIXTURES` points the suite at another set made by the same
/// generators (e.g. with another `--seed`, to check against files the repository never saw).
pub fn fixtures() -> PathBuf {
    if let Some(p) = std::env::var_os("BOFT_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn bin(name: &str) -> Command {
    let path = match name {
        "boft-merge" => env!("CARGO_BIN_EXE_boft-merge"),
        "boft-convert" => env!("CARGO_BIN_EXE_boft-convert"),
        "boft-verify" => env!("CARGO_BIN_EXE_boft-verify"),
        "boft-extract" => env!("CARGO_BIN_EXE_boft-extract"),
        other => panic!("unknown binary {other}"),
    };
    Command::new(path)
}

pub fn run(name: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = bin(name);
    for a in args {
        c.arg(a);
    }
    c.output().expect("binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert success and return stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        stderr(o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Assert the error contract: exit 2, exactly one stderr line, carrying `[class]`.
pub fn fails_with(o: &Output, class: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "expected one line, got: {err}"
    );
    assert!(
        err.contains(&format!("[{class}]")),
        "expected class [{class}], got: {err}"
    );
    err
}

#[derive(Debug, Clone)]
pub struct Tensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn f32(&self) -> Vec<f32> {
        dtype::decode_any_f32(self.dtype, &self.bytes).expect("float tensor")
    }
}

/// Every tensor of a checkpoint (file or folder), with the file it lives in.
pub fn tensors(path: &Path) -> BTreeMap<String, (PathBuf, Tensor)> {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut out = BTreeMap::new();
    for (rel, f) in &ck.files {
        for t in &f.tensors {
            out.insert(
                t.name.clone(),
                (
                    rel.clone(),
                    Tensor {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        bytes: f.data(t).to_vec(),
                    },
                ),
            );
        }
    }
    out
}

/// Largest |a − b| over the largest |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max((x as f64).abs()))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

/// Distance in units in the last place of a 16-bit float type, at the larger magnitude.
pub fn ulps(dt: Dtype, a: f32, b: f32) -> f64 {
    let mag = a.abs().max(b.abs());
    let ulp = match dt {
        Dtype::BF16 => {
            let bits = half::bf16::from_f32(mag).to_bits();
            (half::bf16::from_bits(bits + 1).to_f32() - half::bf16::from_bits(bits).to_f32()) as f64
        }
        Dtype::F16 => {
            let bits = half::f16::from_f32(mag).to_bits();
            (half::f16::from_bits(bits + 1).to_f32() - half::f16::from_bits(bits).to_f32()) as f64
        }
        _ => panic!("ulps on {dt:?}"),
    };
    ((a - b).abs() as f64) / ulp
}

/// Sorted list of files under a folder (relative paths), or the file name for a file.
pub fn file_list(path: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(root.join(rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                walk(root, &r, out);
            } else {
                out.push(r);
            }
        }
    }
    let mut out = Vec::new();
    if path.is_dir() {
        walk(path, Path::new(""), &mut out);
    } else {
        out.push(PathBuf::from(path.file_name().unwrap()));
    }
    out.sort();
    out
}

/// Hash of every file under a path, to prove inputs are left untouched.
pub fn snapshot(path: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    use sha2::{Digest, Sha256};
    let mut out = BTreeMap::new();
    for rel in file_list(path) {
        let full = if path.is_dir() {
            path.join(&rel)
        } else {
            path.to_path_buf()
        };
        out.insert(rel, Sha256::digest(std::fs::read(full).unwrap()).to_vec());
    }
    out
}

/// Names of every entry in a folder (to check no temporary file is left behind).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[derive(serde::Deserialize, Debug, Clone)]
pub struct Case {
    pub name: String,
    pub base: String,
    pub adapter: String,
    pub merged: String,
    pub base_dtype: String,
    pub factors: usize,
}

pub fn peft_cases() -> Vec<Case> {
    let p = fixtures().join("peft_boft/manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

impl Case {
    /// The base checkpoint to pass to the binaries: the folder for Hugging Face-style bases,
    /// the bare `model.safetensors` file for the conv base (which has no config.json).
    pub fn base_path(&self) -> PathBuf {
        let b = fixtures().join("peft_boft").join(&self.base);
        if b.join("config.json").exists() {
            b
        } else {
            b.join("model.safetensors")
        }
    }
}

/// f32: within 2e-5 of the tensor's largest magnitude. 16-bit: within one ulp of the element,
/// unless the element is so small that f32 summation order alone (2e-6 of the tensor's largest
/// magnitude) moves it by more — PEFT builds M densely and sums in another order, so elements
/// that cancel to near zero cannot be matched to their own ulp by any implementation.
pub fn assert_close(name: &str, dt: Dtype, ours: &[f32], theirs: &[f32]) {
    match dt {
        Dtype::F32 => {
            let e = rel_err(ours, theirs);
            assert!(e <= 2e-5, "{name}: relative error {e:e} > 2e-5");
        }
        Dtype::BF16 | Dtype::F16 => {
            let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                let u = ulps(dt, a, b);
                assert!(
                    u <= 1.0 || (a - b).abs() <= 2e-6 * scale,
                    "{name}[{i}]: ours {a} vs PEFT {b}: {u} ulp"
                );
            }
        }
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// Same files, same shard membership, untouched tensors byte-identical, targeted ones close.
pub fn assert_merge_matches(out: &Path, expected: &Path, base: &Path) {
    if base.is_dir() {
        assert_eq!(
            file_list(out),
            file_list(base),
            "output layout differs from the base"
        );
    }
    let ours = tensors(out);
    let theirs = tensors(expected);
    let orig = tensors(base);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let mut changed = 0;
    for (name, (file, t)) in &ours {
        let (efile, e) = &theirs[name];
        let (_, b) = &orig[name];
        if base.is_dir() {
            assert_eq!(file, efile, "{name} moved to another shard");
        }
        assert_eq!(
            (t.dtype, &t.shape),
            (e.dtype, &e.shape),
            "{name}: dtype/shape"
        );
        if e.bytes == b.bytes {
            assert_eq!(
                t.bytes, b.bytes,
                "{name}: untouched tensor not byte-identical"
            );
        } else {
            changed += 1;
            assert_close(name, t.dtype, &t.f32(), &e.f32());
        }
    }
    assert!(
        changed > 0,
        "the fixture changed nothing: it proves nothing"
    );
    // Non-tensor files are copied verbatim.
    if base.is_dir() {
        for rel in file_list(base) {
            if rel.extension().is_some_and(|e| e == "safetensors") {
                continue;
            }
            assert_eq!(
                std::fs::read(out.join(&rel)).unwrap(),
                std::fs::read(base.join(&rel)).unwrap(),
                "{} differs",
                rel.display()
            );
        }
        // Header bytes (metadata included) are kept as they were.
        for rel in file_list(base) {
            if rel.extension().is_some_and(|e| e == "safetensors") {
                let a = std::fs::read(out.join(&rel)).unwrap();
                let b = std::fs::read(base.join(&rel)).unwrap();
                let n = 8 + u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                assert_eq!(a[..n], b[..n], "{}: header changed", rel.display());
            }
        }
    }
}

pub fn out_path(dir: &Path, base: &Path) -> std::path::PathBuf {
    if base.is_dir() {
        dir.join("out")
    } else {
        dir.join("out.safetensors")
    }
}

/// One case of a fixture folder's manifest.json (the fields every generator writes).
#[derive(serde::Deserialize, Debug)]
pub struct RefCase {
    pub name: String,
    pub format: String,
    pub base: String,
    pub base_dtype: String,
    pub adapter: String,
    pub merged: Vec<RefMerged>,
    #[serde(skip)]
    pub dir: PathBuf,
}

#[derive(serde::Deserialize, Debug)]
pub struct RefMerged {
    pub path: String,
    pub multiplier: f64,
}

pub fn ref_cases(folder: &str) -> Vec<RefCase> {
    let dir = fixtures().join(folder);
    let mut v: Vec<RefCase> =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    for c in &mut v {
        c.dir = dir.clone();
    }
    v
}

impl RefCase {
    /// The base as the binaries take it: a folder when it is a Hugging Face-style folder, else
    /// its single safetensors file.
    pub fn base_path(&self) -> PathBuf {
        let b = self.dir.join(&self.base);
        if b.join("config.json").exists() || b.join("model_index.json").exists() || !b.is_dir() {
            b
        } else {
            single_file(&b)
        }
    }

    pub fn adapter_path(&self) -> PathBuf {
        self.dir.join(&self.adapter)
    }

    /// The reference output in the same form as `base_path`.
    pub fn expected(&self, m: &RefMerged) -> PathBuf {
        let e = self.dir.join(&m.path);
        if self.base_path().is_dir() || !e.is_dir() {
            e
        } else {
            single_file(&e)
        }
    }
}

fn single_file(dir: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert_eq!(
        files.len(),
        1,
        "{}: expected one safetensors file",
        dir.display()
    );
    files[0].clone()
}

/// Merge `c` with the binary (extra flags appended), check the base is untouched and the output
/// equals the reference `m`.
pub fn merge_and_compare(c: &RefCase, m: &RefMerged, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let base = c.base_path();
    let out = out_path(tmp.path(), &base);
    let before = snapshot(&base);
    let adapter = c.adapter_path();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"--base", &base, &"--adapter", &adapter, &"-o", &out];
    for e in extra {
        args.push(e);
    }
    let o = run("boft-merge", &args);
    assert!(
        o.status.success(),
        "{} ({}): {}",
        c.name,
        c.format,
        stderr(&o)
    );
    assert_eq!(snapshot(&base), before, "{}: base modified", c.name);
    eprintln!("comparing {} at multiplier {}", c.name, m.multiplier);
    assert_merge_matches(&out, &c.expected(m), &base);
}

/// Merge `adapter` into `base` as `merged` and un-merge that as `restored`, with the binary.
pub fn merge_then_unmerge(base: &Path, adapter: &Path, merged: &Path, restored: &Path) {
    ok(&run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &merged],
    ));
    ok(&run(
        "boft-merge",
        &[
            &"--base",
            &merged,
            &"--adapter",
            &adapter,
            &"-o",
            &restored,
            &"--unmerge",
        ],
    ));
}

/// Merge `c` and un-merge the result: every tensor comes back within 1e-5 relative (f32 bases).
pub fn assert_unmerge_restores(c: &RefCase) {
    let tmp = tempfile::tempdir().unwrap();
    let base = c.base_path();
    let merged = out_path(&tmp.path().join("m"), &base);
    let back = out_path(&tmp.path().join("b"), &base);
    std::fs::create_dir_all(tmp.path().join("m")).unwrap();
    std::fs::create_dir_all(tmp.path().join("b")).unwrap();
    merge_then_unmerge(&base, &c.adapter_path(), &merged, &back);
    let (orig, restored) = (tensors(&base), tensors(&back));
    for (name, (_, t)) in &orig {
        let e = rel_err(&restored[name].1.f32(), &t.f32());
        assert!(e <= 1e-5, "{}: {name}: un-merge error {e:e}", c.name);
    }
}

/// `boft-merge --base BASE [--unmerge-adapter U]… [--adapter A]… -o OUT` on one thread; asserts
/// success. Adapters may carry their own options (`PATH,strength=T,mode=M`).
pub fn merge_adapters(
    base: &Path,
    unmerge: &[&dyn AsRef<std::ffi::OsStr>],
    adapters: &[&dyn AsRef<std::ffi::OsStr>],
    out: &Path,
) {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"--base", &base, &"-o", &out, &"-q", &"--threads", &"1"];
    for a in unmerge {
        args.extend([&"--unmerge-adapter" as &dyn AsRef<std::ffi::OsStr>, *a]);
    }
    for a in adapters {
        args.extend([&"--adapter" as &dyn AsRef<std::ffi::OsStr>, *a]);
    }
    ok(&run("boft-merge", &args));
}

/// Largest relative difference (`rel_err`) over every tensor of two checkpoints, by name; they
/// must hold the same names.
pub fn max_rel(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    ta.iter()
        .map(|(name, (_, x))| rel_err(&x.f32(), &tb[name].1.f32()))
        .fold(0.0, f64::max)
}
