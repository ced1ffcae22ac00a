//! The bad-input matrix's harness (tests/bad_inputs.rs): scenes that copy fixtures into a scratch
//! folder, run a binary under a deadline, and check the refusal contract (exit 2, one `[class]`
//! line, no output, nothing left behind, inputs byte-identical); and editors for the broken
//! safetensors files and JSON the rows build.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::*;

pub fn fx(rel: &str) -> PathBuf {
    fixtures().join("peft_boft").join(rel)
}

pub fn copy_tree(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &dst.join(e.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap();
    }
}

/// Every entry under a path without following symlinks or opening special files: regular files
/// by content hash, symlinks by target, folders and special files by kind.
pub fn tree(path: &Path) -> BTreeMap<PathBuf, String> {
    use sha2::{Digest, Sha256};
    fn walk(full: &Path, rel: PathBuf, out: &mut BTreeMap<PathBuf, String>) {
        let m = std::fs::symlink_metadata(full).unwrap();
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = std::fs::read_link(full).unwrap();
            out.insert(rel, format!("link:{}", t.display()));
        } else if ft.is_dir() {
            out.insert(rel.clone(), "dir".into());
            let mut names: Vec<_> = std::fs::read_dir(full)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(&full.join(&n), rel.join(&n), out);
            }
        } else if ft.is_file() {
            let h = Sha256::digest(std::fs::read(full).unwrap());
            out.insert(rel, format!("file:{h:x}"));
        } else {
            out.insert(rel, format!("special:{:?}", ft));
        }
    }
    let mut out = BTreeMap::new();
    walk(path, PathBuf::new(), &mut out);
    out
}

/// Run a binary with a deadline, so that a hang (a FIFO opened, a symlink cycle walked) fails
/// the test instead of stalling the suite.
pub fn run_limited(name: &str, args: &[&OsStr]) -> Output {
    let child = bin(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    wait_limited(child, Duration::from_secs(120))
}

pub fn wait_limited(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?} (a hang?); stderr: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A parsed safetensors file that tests can edit and write back with fresh, contiguous offsets.
pub struct St {
    pub metadata: Option<Value>,
    /// name, dtype, shape, bytes
    pub tensors: Vec<(String, String, Vec<usize>, Vec<u8>)>,
}

pub fn split_st(bytes: &[u8]) -> (Map<String, Value>, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    match header {
        Value::Object(m) => (m, &bytes[8 + n..]),
        _ => panic!("header is not an object"),
    }
}

pub fn join_st(header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

impl St {
    pub fn read(path: &Path) -> St {
        let bytes = std::fs::read(path).unwrap();
        let (header, data) = split_st(&bytes);
        let mut metadata = None;
        let mut tensors = Vec::new();
        for (k, v) in header {
            if k == "__metadata__" {
                metadata = Some(v);
                continue;
            }
            let dtype = v["dtype"].as_str().unwrap().to_string();
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let a = v["data_offsets"][0].as_u64().unwrap() as usize;
            let b = v["data_offsets"][1].as_u64().unwrap() as usize;
            tensors.push((k, dtype, shape, data[a..b].to_vec()));
        }
        St { metadata, tensors }
    }

    pub fn write(&self, path: &Path) {
        let mut header = Map::new();
        if let Some(m) = &self.metadata {
            header.insert("__metadata__".into(), m.clone());
        }
        let mut data = Vec::new();
        for (name, dtype, shape, bytes) in &self.tensors {
            let a = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [a, data.len()]}),
            );
        }
        std::fs::write(path, join_st(&header, &data)).unwrap();
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut (String, String, Vec<usize>, Vec<u8>) {
        self.tensors
            .iter_mut()
            .find(|t| t.0 == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }
}

/// Edit a safetensors header as JSON, keeping the data section as it is.
pub fn edit_header(path: &Path, f: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let (mut header, data) = split_st(&bytes);
    f(&mut header);
    let out = join_st(&header, data);
    std::fs::write(path, out).unwrap();
}

/// Replace text inside a header by text of the same length (keeps every offset valid).
pub fn patch_header_text(path: &Path, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let n = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &mut bytes[8..n];
    let at = header
        .windows(from.len())
        .position(|w| w == from.as_bytes())
        .unwrap_or_else(|| panic!("{from:?} not in header"));
    header[at..at + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(path, bytes).unwrap();
}

pub fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// One row of the matrix: a scratch folder, the inputs it snapshots, the output it must not get.
pub struct Scene {
    pub tmp: tempfile::TempDir,
    pub inputs: Vec<(PathBuf, BTreeMap<PathBuf, String>)>,
    /// The output's parent folder and its entries before the run.
    pub parent: Option<(PathBuf, Vec<String>)>,
}

impl Scene {
    pub fn new() -> Scene {
        Scene {
            tmp: tempfile::tempdir().unwrap(),
            inputs: Vec::new(),
            parent: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Copy a fixture (file or folder) into the scene.
    pub fn copy(&self, fixture: &str, rel: &str) -> PathBuf {
        let dst = self.path(rel);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        copy_tree(&fx(fixture), &dst);
        dst
    }

    /// An empty folder for outputs.
    pub fn out_dir(&self) -> PathBuf {
        let d = self.path("out");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Snapshot the inputs and the output's parent just before running.
    pub fn freeze(&mut self, inputs: &[&Path], out: &Path) {
        self.inputs = inputs.iter().map(|p| (p.to_path_buf(), tree(p))).collect();
        self.parent = out
            .parent()
            .filter(|p| p.is_dir())
            .map(|p| (p.to_path_buf(), dir_entries(p)));
    }

    pub fn merge(&mut self, base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> Output {
        self.freeze(&[base, adapter], out);
        let mut args = merge_args(base, adapter, out);
        if !extra.contains(&"--threads") {
            args.extend([OsStr::new("--threads"), OsStr::new("1")]);
        }
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        run_limited("boft-merge", &args)
    }

    pub fn convert(&mut self, input: &Path, out: &Path, extra: &[&str]) -> Output {
        self.freeze(&[input], out);
        let mut args: Vec<&OsStr> = vec![input.as_os_str(), "-o".as_ref(), out.as_os_str()];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        run_limited("boft-convert", &args)
    }

    /// The whole contract for a refused run. `out_existed`: the output path was there before (and
    /// must still be there, unchanged, as one of the inputs or a pre-existing file).
    pub fn assert_refused_keep(&self, o: &Output, class: &str, out: &Path, out_existed: bool) {
        let err = fails_with(o, class);
        eprint!("{err}");
        assert!(!err.contains("panicked"), "panic: {err}");
        if !out_existed {
            assert!(
                std::fs::symlink_metadata(out).is_err(),
                "output {} was created",
                out.display()
            );
        }
        if let Some((parent, before)) = &self.parent {
            let after = dir_entries(parent);
            assert_eq!(&after, before, "leftovers in {}", parent.display());
            assert!(
                !after.iter().any(|n| n.contains(".boft-")),
                "temporary file left in {}: {after:?}",
                parent.display()
            );
        }
        for (p, before) in &self.inputs {
            assert_eq!(&tree(p), before, "input {} changed", p.display());
        }
    }

    pub fn assert_refused(&self, o: &Output, class: &str, out: &Path) {
        self.assert_refused_keep(o, class, out, false)
    }
}

/// The bare-file base (`bases/conv/model.safetensors`) and its adapter, copied into a scene.
pub fn conv(sc: &Scene) -> (PathBuf, PathBuf, PathBuf) {
    let base = sc.copy("bases/conv/model.safetensors", "in/model.safetensors");
    let adapter = sc.copy("adapters/conv_f1", "in/adapter");
    let out = sc.out_dir().join("merged.safetensors");
    (base, adapter, out)
}

/// The sharded base and its adapter, copied into a scene.
/// `boft-merge`'s arguments for one base, adapter and output.
pub fn merge_args<'a>(base: &'a Path, adapter: &'a Path, out: &'a Path) -> Vec<&'a OsStr> {
    vec![
        "--base".as_ref(),
        base.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
    ]
}

pub fn sharded(sc: &Scene) -> (PathBuf, PathBuf, PathBuf) {
    let base = sc.copy("bases/llama_bf16_sharded", "in/base");
    let adapter = sc.copy("adapters/llama_bf16_f2", "in/adapter");
    let out = sc.out_dir().join("merged");
    (base, adapter, out)
}

pub const SHARD1: &str = "model-00001-of-00002.safetensors";
pub const SHARD2: &str = "model-00002-of-00002.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";

pub fn tensor_entry<'a>(h: &'a mut Map<String, Value>, name: &str) -> &'a mut Map<String, Value> {
    h.get_mut(name).unwrap().as_object_mut().unwrap()
}

pub fn mkfifo(p: &Path) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscall on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A tmpfs mounted for one test, unmounted when dropped. None when this process may not mount.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(dir: &Path, flags: libc::c_ulong, options: &str) -> Option<Mount> {
        std::fs::create_dir_all(dir).unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(options).unwrap();
        // SAFETY: plain syscall with NUL-terminated strings that outlive it.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then(|| Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: plain syscall; lazy detach so a failing test cannot leave it busy.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}
