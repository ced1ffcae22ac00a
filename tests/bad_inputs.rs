//! Hostile and broken inputs (docs/ERRORS.md, "Bad-input matrix"): every row builds its bad input
//! in a temporary folder from the fixtures, runs the real binary and checks the error contract —
//! exit 2, one stderr line with the expected `[class]` — and that nothing was lost or left behind:
//! no output, no temporary file beside it, inputs byte-identical. The harness (scenes, file
//! editors) is tests/common/scene.rs, so that this file reads as the matrix.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::scene::*;
use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Base checkpoint: one safetensors file
// ---------------------------------------------------------------------------------------------

#[test]
fn b01_empty_file() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::fs::write(&base, b"").unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "empty-file", &out);
}

#[test]
fn b02_shorter_than_length_prefix() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::fs::write(&base, [1u8, 2, 3, 4, 5]).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-too-small", &out);
}

#[test]
fn b03_header_length_past_end() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    let len = b.len() as u64;
    b[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-past-end", &out);
}

#[test]
fn b04_header_length_absurd() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-too-large", &out);
}

#[test]
fn b05_header_not_json() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    b[8..16].copy_from_slice(b"{garbage");
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-not-json", &out);
}

#[test]
fn b06_header_not_utf8() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    b[9] = 0xff;
    b[10] = 0xfe;
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-not-json", &out);
}

#[test]
fn b07_header_not_object() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut h = b"[1, 2, 3]".to_vec();
    h.resize(n, b' ');
    b[8..8 + n].copy_from_slice(&h);
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "header-not-object", &out);
}

#[test]
fn b08_offsets_overlap() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // conv1.weight moved 16 bytes back: it overlaps conv1.bias (and leaves a gap after it).
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.weight")["data_offsets"] = json!([16, 2320]);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn b09_offsets_out_of_order() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // End before start.
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.bias")["data_offsets"] = json!([32, 0]);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn b10_offsets_past_end() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // Truncated: the last tensor runs past the end of the file.
    let b = std::fs::read(&base).unwrap();
    std::fs::write(&base, &b[..b.len() - 100]).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn b11_offsets_not_matching_shape_and_dtype() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // 9 F32 values need 36 bytes; the offsets hold 32.
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.bias")["shape"] = json!([9]);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn b12_trailing_bytes() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut b = std::fs::read(&base).unwrap();
    b.extend_from_slice(&[0u8; 64]);
    std::fs::write(&base, b).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn b13_unknown_dtype() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.bias")["dtype"] = json!("F33");
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "unknown-dtype", &out);
}

#[test]
fn b14_malformed_tensor_entry() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.bias").remove("data_offsets");
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-tensor-info", &out);
}

#[test]
fn b15_shape_overflows() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    edit_header(&base, |h| {
        tensor_entry(h, "conv1.bias")["shape"] = json!([1u64 << 40, 1u64 << 40]);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-tensor-info", &out);
}

#[test]
fn b18_zero_dimension_beside_huge_ones() {
    // Empty (0 values, 0 bytes), but its columns (2^80) overflow whatever multiplies them.
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut st = St::read(&base);
    let t = st.tensor_mut("fc.weight");
    t.2 = vec![0, 1 << 40, 1 << 40];
    t.3.clear();
    st.write(&base);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-tensor-info", &out);
}

#[test]
fn b16_duplicate_tensor_in_header() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    patch_header_text(&base, "\"conv2.bias\"", "\"conv1.bias\"");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "duplicate-tensor", &out);
}

#[test]
fn b17_base_is_a_fifo() {
    let mut sc = Scene::new();
    let (_, adapter, out) = conv(&sc);
    let base = sc.path("in/pipe.safetensors");
    mkfifo(&base);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "io", &out);
}

// ---------------------------------------------------------------------------------------------
// Base checkpoint: a folder, sharded with an index
// ---------------------------------------------------------------------------------------------

#[test]
fn s01_shard_missing() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::remove_file(base.join(SHARD2)).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "missing-shard", &out);
}

#[test]
fn s02_index_shard_outside_with_dotdot() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    // The shard really is there, one folder up: still refused.
    std::fs::copy(base.join(SHARD2), sc.path("in").join(SHARD2)).unwrap();
    edit_json(&base.join(INDEX), |v| {
        v["weight_map"]["lm_head.weight"] = json!(format!("../{SHARD2}"));
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn s03_index_shard_absolute_path() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    // Absolute, even though it names the folder's own shard.
    let abs = base.join(SHARD2);
    edit_json(&base.join(INDEX), |v| {
        v["weight_map"]["lm_head.weight"] = json!(abs.to_str().unwrap());
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn s13_index_names_the_folder_itself() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    edit_json(&base.join(INDEX), |v| {
        v["weight_map"]["lm_head.weight"] = json!(".");
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    // Inside the folder, so not a path escape: an index entry naming no file.
    sc.assert_refused(&o, "bad-index", &out);
}

#[test]
fn s04_index_not_json() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::write(base.join(INDEX), b"{\"weight_map\": {").unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-index", &out);
}

#[test]
fn s05_index_without_weight_map() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::write(base.join(INDEX), b"[\"model-00001-of-00002.safetensors\"]").unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-index", &out);
}

#[test]
fn s06_index_names_wrong_shard() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    edit_json(&base.join(INDEX), |v| {
        v["weight_map"]["lm_head.weight"] = json!(SHARD1);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-index", &out);
}

#[test]
fn s07_duplicate_tensor_across_shards() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let lm = St::read(&base.join(SHARD2))
        .tensors
        .into_iter()
        .find(|t| t.0 == "lm_head.weight")
        .unwrap();
    let mut s1 = St::read(&base.join(SHARD1));
    s1.tensors.push(lm);
    s1.write(&base.join(SHARD1));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "duplicate-tensor", &out);
}

#[test]
fn s08_symlink_to_file_outside_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::write(sc.path("in/secret.txt"), b"not part of the model").unwrap();
    std::os::unix::fs::symlink(sc.path("in/secret.txt"), base.join("tokenizer.json")).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn s09_shard_is_symlink_outside_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let elsewhere = sc.path("in").join(SHARD2);
    std::fs::rename(base.join(SHARD2), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, base.join(SHARD2)).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn s10_index_is_symlink_outside_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let elsewhere = sc.path("in").join(INDEX);
    std::fs::rename(base.join(INDEX), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, base.join(INDEX)).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn s11_symlinked_folder_cycle() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::create_dir(base.join("extra")).unwrap();
    std::os::unix::fs::symlink("..", base.join("extra/loop")).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "symlink-loop", &out);
}

#[test]
fn s12_fifo_in_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    mkfifo(&base.join("notes.txt"));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "io", &out);
}

/// Not an error row: symlinks that stay inside the folder are followed, and the output holds
/// regular files with their contents.
#[test]
fn s14_symlinked_folder_dag() {
    // dag/d0 … dag/d25, each d_i holding two links `a` and `b` to d_{i+1}: walked naively that
    // is 2^25 copies of d25's file. A folder reached a second time is refused.
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let depth = 25;
    for i in 0..=depth {
        std::fs::create_dir_all(base.join(format!("dag/d{i}"))).unwrap();
    }
    std::fs::write(base.join(format!("dag/d{depth}/leaf.txt")), b"leaf").unwrap();
    for i in 0..depth {
        for l in ["a", "b"] {
            std::os::unix::fs::symlink(
                format!("../d{}", i + 1),
                base.join(format!("dag/d{i}/{l}")),
            )
            .unwrap();
        }
    }
    let start = Instant::now();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "symlink-loop", &out);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn symlinks_inside_folder_are_followed() {
    let sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::create_dir(base.join("extra")).unwrap();
    std::fs::rename(base.join("config.json"), base.join("extra/config.json")).unwrap();
    std::os::unix::fs::symlink("extra/config.json", base.join("config.json")).unwrap();
    std::fs::rename(base.join(SHARD2), base.join("extra").join(SHARD2)).unwrap();
    std::os::unix::fs::symlink(Path::new("extra").join(SHARD2), base.join(SHARD2)).unwrap();
    let before = tree(&base);
    let o = run_limited("boft-merge", &merge_args(&base, &adapter, &out));
    ok(&o);
    assert_eq!(tree(&base), before);
    let cfg = out.join("config.json");
    assert!(std::fs::symlink_metadata(&cfg).unwrap().is_file());
    assert_eq!(
        std::fs::read(&cfg).unwrap(),
        std::fs::read(fx("bases/llama_bf16_sharded/config.json")).unwrap()
    );
    assert!(std::fs::symlink_metadata(out.join(SHARD2))
        .unwrap()
        .is_file());
}

#[test]
fn symlinks_to_one_file_are_written_once() {
    // A Hugging Face snapshot may hold several names linking to one blob; 200 links to a 1 MB
    // file copied one by one made a 1 MB folder into a 200 MB output (issue 11, d07). Every name
    // is kept, each distinct file's bytes are written once (hard links inside the output).
    let sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let blob: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(base.join("tokenizer.json"), &blob).unwrap();
    std::fs::create_dir(base.join("sub")).unwrap();
    for i in 0..200 {
        let (dir, target) = if i % 2 == 0 {
            ("", "tokenizer.json")
        } else {
            ("sub/", "../tokenizer.json")
        };
        std::os::unix::fs::symlink(target, base.join(format!("{dir}tok{i}.json"))).unwrap();
    }
    let before = tree(&base);
    let mut args = merge_args(&base, &adapter, &out);
    args.extend([OsStr::new("--threads"), OsStr::new("1")]);
    let o = run_limited("boft-merge", &args);
    ok(&o);
    assert_eq!(tree(&base), before);
    // Allocated size of the output, each inode counted once.
    fn walk(p: &Path, seen: &mut std::collections::HashSet<(u64, u64)>, total: &mut u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(!m.file_type().is_symlink(), "{p:?} is a symlink");
        if m.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), seen, total);
            }
        } else if seen.insert((m.dev(), m.ino())) {
            *total += m.blocks() * 512;
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    walk(&out, &mut seen, &mut total);
    assert!(total < 3_000_000, "output allocates {total} bytes");
    for i in 0..200 {
        let dir = if i % 2 == 0 { "" } else { "sub/" };
        let p = out.join(format!("{dir}tok{i}.json"));
        assert!(std::fs::read(&p).unwrap() == blob, "{p:?} differs");
    }
    assert!(std::fs::read(out.join("tokenizer.json")).unwrap() == blob);
}

// ---------------------------------------------------------------------------------------------
// Adapters
// ---------------------------------------------------------------------------------------------

const CONV_W: &str = "adapter_model.safetensors";
const CONV_CFG: &str = "adapter_config.json";

#[test]
fn a01_adapter_nan() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut st = St::read(&adapter.join(CONV_W));
    st.tensor_mut("base_model.model.conv1.boft_R").3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "non-finite", &out);
}

#[test]
fn a02_adapter_inf_scale() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut st = St::read(&adapter.join(CONV_W));
    st.tensor_mut("base_model.model.fc.boft_s").3[4..8]
        .copy_from_slice(&f32::INFINITY.to_le_bytes());
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "non-finite", &out);
}

#[test]
fn a03_adapter_geometry_does_not_fit_base() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // fc has 48 inputs = 4 blocks of 12; keep only 2 blocks (24).
    let mut st = St::read(&adapter.join(CONV_W));
    let t = st.tensor_mut("base_model.model.fc.boft_R");
    t.2 = vec![1, 2, 12, 12];
    t.3.truncate(2 * 12 * 12 * 4);
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "shape-mismatch", &out);
}

#[test]
fn a04_adapter_bad_butterfly_geometry() {
    let mut sc = Scene::new();
    let base = sc.copy("bases/conv/model.safetensors", "in/model.safetensors");
    let adapter = sc.copy("adapters/conv_f2", "in/adapter");
    let out = sc.out_dir().join("merged.safetensors");
    // Two butterfly factors over 8 blocks of 6 → 7 blocks of 6 (not divisible by 2).
    let mut st = St::read(&adapter.join(CONV_W));
    let t = st.tensor_mut("base_model.model.fc.boft_R");
    assert_eq!(t.2, vec![2, 8, 6, 6]);
    t.2 = vec![2, 7, 6, 6];
    t.3.truncate(2 * 7 * 6 * 6 * 4);
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

#[test]
fn a05_adapter_for_a_different_base() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // The same tensor names with other shapes: fc is 48 → 16 here, the adapter expects 16 → 48.
    edit_header(&base, |h| {
        tensor_entry(h, "fc.weight")["shape"] = json!([48, 16]);
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "shape-mismatch", &out);
}

#[test]
fn a06_adapter_targets_missing_from_base() {
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    let adapter = sc.copy("adapters/llama_f32_f1", "in/llama-adapter");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "missing-target", &out);
}

#[test]
fn a07_peft_config_contradicts_tensors() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    edit_json(&adapter.join(CONV_CFG), |v| v["boft_block_size"] = json!(6));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

#[test]
fn a08_peft_config_not_json() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::fs::write(adapter.join(CONV_CFG), b"{\"peft_type\": \"BOFT\",").unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

#[test]
fn a09_peft_type_not_orthogonal() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    edit_json(&adapter.join(CONV_CFG), |v| v["peft_type"] = json!("LORA"));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "unknown-format", &out);
}

#[test]
fn a10_peft_weights_missing() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::fs::remove_file(adapter.join(CONV_W)).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "not-found", &out);
}

#[test]
fn a11_peft_weights_truncated() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let b = std::fs::read(adapter.join(CONV_W)).unwrap();
    std::fs::write(adapter.join(CONV_W), &b[..b.len() - 1]).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-offsets", &out);
}

#[test]
fn a12_peft_boft_r_without_boft_s() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut st = St::read(&adapter.join(CONV_W));
    st.tensors
        .retain(|t| t.0 != "base_model.model.conv2.boft_s");
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

#[test]
fn a13_adapter_cayley_not_computable() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // Finite but absurd generators: blocks of 3 whose skew part is ±2^100. I + S is invertible
    // in exact arithmetic, not in f64 (the 1s vanish and an odd skew matrix is singular).
    let mut st = St::read(&adapter.join(CONV_W));
    st.tensors.retain(|t| t.0.contains(".conv1."));
    let r = st.tensor_mut("base_model.model.conv1.boft_R");
    let mut vals = vec![0f32; 24 * 9];
    for k in [1, 2, 5] {
        // The upper triangle of the first block: S = ½(A − Aᵀ) has entries ±2^100.
        vals[k] = 2f32.powi(101);
    }
    r.2 = vec![1, 24, 3, 3];
    r.3 = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
    st.write(&adapter.join(CONV_W));
    edit_json(&adapter.join(CONV_CFG), |v| v["boft_block_size"] = json!(3));
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("Cayley"), "{}", stderr(&o));
}

#[test]
fn a14_canonical_from_a_newer_version() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let canon = sc.path("in/conv_f1.safetensors");
    ok(&run("boft-convert", &[&adapter, &"-o", &canon]));
    edit_header(&canon, |h| {
        h.get_mut("__metadata__").unwrap()["format_version"] = json!("99");
    });
    let o = sc.merge(&base, &canon, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

#[test]
fn a15_not_an_adapter() {
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // A checkpoint passed where the adapter goes.
    let other = sc.copy("bases/conv/model.safetensors", "in/other.safetensors");
    let o = sc.merge(&base, &other, &out, &[]);
    sc.assert_refused(&o, "unknown-format", &out);
}

/// A LyCORIS file and its unet base, copied into the scene.
fn lycoris(sc: &Scene) -> (PathBuf, PathBuf, PathBuf) {
    let base = sc.path("in/unet.safetensors");
    std::fs::create_dir_all(base.parent().unwrap()).unwrap();
    copy_tree(
        &fixtures().join("lycoris/bases/unet_f32/model.safetensors"),
        &base,
    );
    let adapter = sc.path("in/oft.safetensors");
    copy_tree(
        &fixtures().join("lycoris/adapters/diag_oft_f32_constraint.safetensors"),
        &adapter,
    );
    (base, adapter, sc.out_dir().join("merged.safetensors"))
}

#[test]
fn a16_kohya_and_lycoris_names_mixed() {
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    let mut st = St::read(&adapter);
    for t in st.tensors.iter_mut().take(2) {
        t.0 = t.0.replacen("lycoris_", "oft_unet_", 1);
    }
    st.write(&adapter);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "unknown-format", &out);
}

#[test]
fn a17_peft_oft_generations_mixed() {
    let mut sc = Scene::new();
    let base = sc.copy("bases/llama_f32", "in/base");
    let adapter = sc.path("in/oft");
    copy_tree(
        &fixtures().join("peft_oft/adapters/llama_f32_cayley"),
        &adapter,
    );
    let w = adapter.join("adapter_model.safetensors");
    let mut st = St::read(&w);
    let t = st
        .tensors
        .iter_mut()
        .find(|t| t.0.ends_with(".oft_R.weight"))
        .unwrap();
    t.0 = t.0.replace(".oft_R.weight", ".oft_r");
    st.write(&w);
    let out = sc.out_dir().join("merged");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "unknown-format", &out);
}

#[test]
fn a18_adapter_name_resolves_to_nothing() {
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    let mut st = St::read(&adapter);
    let module = st.tensors[0].0.rsplit_once('.').unwrap().0.to_string();
    for t in st.tensors.iter_mut().filter(|t| t.0.starts_with(&module)) {
        t.0 = t.0.replacen("lycoris_", "lycoris_no_such_", 1);
    }
    st.write(&adapter);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "missing-target", &out);
    let line = fails_with(&o, "missing-target");
    assert!(line.contains("no_such"), "{line}");
}

#[test]
fn a32_name_resolution_over_a_name_with_50000_dots() {
    // As A18, with an empty base tensor whose name has 50 000 dots (a 100 KB header entry):
    // indexing every dotted suffix of it would take 2.5 GB.
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    let mut st = St::read(&base);
    st.tensors.push((
        format!("{}weight", "a.".repeat(50_000)),
        "F32".into(),
        vec![0],
        vec![],
    ));
    st.write(&base);
    let mut st = St::read(&adapter);
    let module = st.tensors[0].0.rsplit_once('.').unwrap().0.to_string();
    for t in st.tensors.iter_mut().filter(|t| t.0.starts_with(&module)) {
        t.0 = t.0.replacen("lycoris_", "lycoris_no_such_", 1);
    }
    st.write(&adapter);
    sc.freeze(&[&base, &adapter], &out);
    let start = Instant::now();
    let mut args = merge_args(&base, &adapter, &out);
    args.extend([OsStr::new("--threads"), OsStr::new("1")]);
    let (o, peak_kib) = run_measured("boft-merge", &args);
    sc.assert_refused(&o, "missing-target", &out);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert!(peak_kib < 1 << 20, "peak RSS {peak_kib} KiB");
}

/// `boft-merge --base base --adapter adapter -o out`, measured (`run_measured`).
fn merge_measured(base: &Path, adapter: &Path, out: &Path) -> (Output, i64) {
    run_measured("boft-merge", &merge_args(base, adapter, out))
}

/// Run a binary (its output must be small: it is read once the binary has ended) and return
/// its output with its peak resident set size in KiB: the largest `VmHWM` of the running binary,
/// sampled every millisecond. Not `wait4`'s `ru_maxrss`: a child spawned with vfork records the
/// high-water mark of the test process (whose other tests build large inputs) when it execs.
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's wait cannot see
fn run_measured(name: &str, args: &[&OsStr]) -> (Output, i64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = bin(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let status_file = format!("/proc/{pid}/status");
    let mut peak = 0i64;
    let status = loop {
        // Only once the child runs the binary (its name is the program's): before exec it shares
        // the test process's memory.
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
            };
            if field("Name:").is_some_and(|n| name.starts_with(&n)) {
                if let Some(kb) = field("VmHWM:")
                    .and_then(|v| v.trim_end_matches("kB").trim().parse::<i64>().ok())
                {
                    peak = peak.max(kb);
                }
            }
        }
        let mut status = 0;
        // SAFETY: wait4 on our own child, with valid out-pointers.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        assert!(r >= 0, "wait4 failed");
        if r == pid {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after 120 s (a hang?)");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // No sample means the binary ended within about a millisecond of starting: too soon to have
    // touched more than a few megabytes (faulting in memory runs at a few GB/s at best), so 0
    // stands for "small", not for "unknown".
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    let status = std::process::ExitStatus::from_raw(status);
    (
        Output {
            status,
            stdout,
            stderr,
        },
        peak,
    )
}

#[test]
fn a19_adapter_name_matches_two_tensors() {
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    // Give the base a second tensor whose flattened name equals an adapter module's.
    let mut st = St::read(&base);
    let t = st
        .tensors
        .iter()
        .find(|t| t.0.ends_with("attn1.to_q.weight"))
        .unwrap()
        .clone();
    let twin = t.0.replace("attn1.to_q", "attn1_to.q");
    st.tensors.push((twin, t.1, t.2, t.3));
    st.write(&base);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "missing-target", &out);
    let line = fails_with(&o, "missing-target");
    assert!(line.contains("matches 2 base tensors"), "{line}");
}

#[test]
fn a20_lycoris_geometry_does_not_fit_the_base() {
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    // One module's blocks cover fewer rows than its base weight has.
    let mut st = St::read(&adapter);
    let t = st
        .tensors
        .iter_mut()
        .find(|t| t.0.ends_with(".oft_blocks") && t.2[0] > 1)
        .unwrap();
    let hh = t.2[1] * t.2[2] * 4;
    t.2[0] -= 1;
    t.3.truncate(t.3.len() - hh);
    st.write(&adapter);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "shape-mismatch", &out);
}

#[test]
fn a21_from_does_not_fit_the_files() {
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    let o = sc.merge(&base, &adapter, &out, &["--from", "peft"]);
    sc.assert_refused(&o, "unknown-format", &out);
}

#[test]
fn a22_peft_weights_symlinked_outside_the_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let elsewhere = sc.path("in").join("elsewhere.safetensors");
    std::fs::rename(adapter.join(CONV_W), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, adapter.join(CONV_W)).unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
    assert!(
        stderr(&o).contains("outside the adapter folder"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a23_peft_config_symlinked_outside_the_folder() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let elsewhere = sc.path("in").join("elsewhere.json");
    std::fs::rename(adapter.join(CONV_CFG), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, adapter.join(CONV_CFG)).unwrap();
    // Given as the weights file, the folder's config is still confined.
    let o = sc.merge(&base, &adapter.join(CONV_W), &out, &[]);
    sc.assert_refused(&o, "path-escape", &out);
}

#[test]
fn a24_verify_shared_blocks_of_a_target_not_in_the_base() {
    let mut sc = Scene::new();
    let adapter = sc.path("in/adapter");
    copy_tree(
        &fixtures().join("peft_oft/adapters/llama_f32_block_share"),
        &adapter,
    );
    let base = sc.copy("bases/conv/model.safetensors", "in/model.safetensors");
    let out = sc.out_dir().join("none");
    sc.freeze(&[&base, &adapter], &out);
    let o = run_limited(
        "boft-verify",
        &[adapter.as_os_str(), "--base".as_ref(), base.as_os_str()],
    );
    sc.assert_refused(&o, "missing-target", &out);
    // --base was given: the line must not ask for it.
    assert!(!stderr(&o).contains("pass --base"), "{}", stderr(&o));
}

/// A canonical target on a base tensor, built with the library: `blocks` blocks of `bs` per
/// factor, each the identity plus a small off-diagonal term (finite, invertible), no permutation.
fn canon_target(
    name: &str,
    side: boft::adapter::Side,
    factors: usize,
    blocks: usize,
    bs: usize,
) -> boft::adapter::Target {
    let mut data = Vec::with_capacity(factors * blocks * bs * bs);
    for k in 0..factors * blocks {
        for i in 0..bs {
            for j in 0..bs {
                data.push(if i == j {
                    1.0
                } else {
                    0.01 * ((i + 2 * j + k) % 5) as f32
                });
            }
        }
    }
    boft::adapter::Target {
        name: name.into(),
        module: name.trim_end_matches(".weight").into(),
        side,
        factors,
        blocks,
        block_size: bs,
        data,
        perms: vec![None; factors],
        kind: boft::adapter::BlockKind::Raw,
        ..Default::default()
    }
}

/// Write targets as a canonical file with the library's writer.
fn canon_file(sc: &Scene, targets: Vec<boft::adapter::Target>) -> PathBuf {
    let a = boft::adapter::Adapter {
        targets,
        source_format: "test".into(),
        ..Default::default()
    };
    let p = sc.path("in/canonical.safetensors");
    boft::adapter::canonical::write(&a, &p).unwrap();
    p
}

#[test]
fn a25_canonical_crop_on_an_input_side_target() {
    use boft::adapter::{BlockKind, Side};
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // fc.weight is (16, 48): five blocks of 12 cropped to the 48 inputs. The engine pads only
    // columns of output-side targets; an input-side crop read whole rows of 60.
    let mut t = canon_target("fc.weight", Side::Input, 1, 5, 12);
    t.crop = Some(48);
    t.kind = BlockKind::Cropped;
    let adapter = canon_file(&sc, vec![t]);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("crop"), "{}", stderr(&o));
    assert!(stderr(&o).contains("fc.weight"), "{}", stderr(&o));
}

#[test]
fn a26_canonical_row_slices_disagree_on_view() {
    use boft::adapter::Side;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // Two output-side slices of fc.weight (16, 48): one reads the buffer as (32, 24), the other
    // as the tensor's own (16, 48). The merge read both through the first one's view.
    let mut a = canon_target("fc.weight", Side::Output, 1, 1, 8);
    a.rows = Some((0, 8));
    a.view = Some((32, 24));
    let mut b = canon_target("fc.weight", Side::Output, 1, 1, 8);
    b.rows = Some((8, 16));
    let adapter = canon_file(&sc, vec![a, b]);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("view"), "{}", stderr(&o));
}

#[test]
fn a27_canonical_cropped_blocks_declared_cayley() {
    use boft::adapter::{BlockKind, Side};
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // Output side of fc.weight (16 rows): three blocks of 6 cropped to 16. A cropped block is not
    // orthogonal, yet `cayley` promised it was: --unmerge inverted it by its transpose.
    let mut t = canon_target("fc.weight", Side::Output, 1, 3, 6);
    t.crop = Some(16);
    t.kind = BlockKind::Cayley;
    let adapter = canon_file(&sc, vec![t]);
    let o = sc.merge(&base, &adapter, &out, &["--unmerge"]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("cayley"), "{}", stderr(&o));
}

#[test]
fn a28_canonical_whole_target_and_a_slice_disagree_on_view() {
    use boft::adapter::Side;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // fc.weight (16, 48): a whole-tensor output-side target read through an (8, 96) view and a
    // slice of rows 8..16 of the tensor's own (16, 48): their ranges looked disjoint, and the
    // slice was merged through the other target's view.
    let mut a = canon_target("fc.weight", Side::Output, 1, 1, 8);
    a.view = Some((8, 96));
    let mut b = canon_target("fc.weight", Side::Output, 1, 1, 8);
    b.rows = Some((8, 16));
    let adapter = canon_file(&sc, vec![a, b]);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
}

/// A PEFT adapter folder written from scratch: a config and one F32 tensor per (name, shape).
fn tiny_peft(dir: &Path, config: Value, tensors: &[(&str, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let tensors = tensors
        .iter()
        .map(|(n, shape)| {
            let len: usize = shape.iter().product();
            let bytes = (0..len).flat_map(|_| 0.0f32.to_le_bytes()).collect();
            (n.to_string(), "F32".to_string(), shape.clone(), bytes)
        })
        .collect();
    St {
        metadata: None,
        tensors,
    }
    .write(&dir.join("adapter_model.safetensors"));
}

#[test]
fn a29_shared_block_repeated_past_any_size() {
    // PEFT OFT ≤ 0.13 block_share: one stored 2×2 block repeated r = 2^40 times (a 100-byte
    // file asking for 16 TiB), and r = 2^63 (r × block size overflows).
    for r in [1u64 << 40, 1 << 63] {
        let mut sc = Scene::new();
        let adapter = sc.path("in/adapter");
        tiny_peft(
            &adapter,
            json!({"peft_type": "OFT", "block_share": true, "r": r}),
            &[("base_model.model.fc.oft_r", vec![1, 2, 2])],
        );
        let out = sc.out_dir().join("canonical.safetensors");
        let o = sc.convert(&adapter, &out, &[]);
        sc.assert_refused(&o, "bad-adapter", &out);
    }
}

#[test]
fn a30_butterfly_factor_count_past_the_word_size() {
    // A canonical file whose only target has 64 factors (the most a target may have) of one 2×2
    // block: PEFT BOFT would need a block count divisible by 2^63, at the edge of a 64-bit shift
    // (100 factors went past it; A47 refuses those on reading).
    let mut sc = Scene::new();
    let (_, adapter, _) = conv(&sc);
    let canon = sc.path("in/conv_f1.safetensors");
    ok(&run("boft-convert", &[&adapter, &"-o", &canon]));
    let mut st = St::read(&canon);
    let meta = st.metadata.as_mut().unwrap();
    let targets: Vec<Value> = serde_json::from_str(meta["targets"].as_str().unwrap()).unwrap();
    let mut fc = targets
        .into_iter()
        .find(|t| t["key"] == "fc.weight")
        .unwrap();
    fc["factors"] = json!(64);
    fc["blocks"] = json!(1);
    fc["block_size"] = json!(2);
    fc["permuted"] = json!(false);
    fc["scaled"] = json!(false);
    meta["targets"] = json!(serde_json::to_string(&[fc]).unwrap());
    let identity: Vec<u8> = [1f32, 0.0, 0.0, 1.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    st.tensors = vec![(
        "fc.weight::blocks".into(),
        "F32".into(),
        vec![64, 1, 2, 2],
        identity.repeat(64),
    )];
    st.write(&canon);
    let out = sc.out_dir().join("peft");
    let o = sc.convert(&canon, &out, &["--to", "peft"]);
    sc.assert_refused(&o, "not-exportable", &out);
}

#[test]
fn a31_peft_config_larger_than_the_limit() {
    // The config grown (sparsely) to one byte past the 16 MiB limit: refused by its size, not
    // read whole (a gigabyte would be refused the same way; the snapshot of the inputs hashes
    // every byte, so the test stays near the limit).
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let cfg = adapter.join("adapter_config.json");
    let f = std::fs::OpenOptions::new().write(true).open(&cfg).unwrap();
    f.set_len(boft::formats::peft::MAX_CONFIG + 1).unwrap();
    drop(f);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("limit"), "{}", stderr(&o));
}

#[test]
fn a33_many_targets_are_not_looked_up_one_by_one() {
    // A canonical file of 200 000 targets of one 2×2 block (a 60 MB header), the last given 0
    // factors: refused after every other target was read. Looking each target's tensors up by a
    // linear search took minutes here (2·10^10 name comparisons); by name, a few seconds.
    let mut sc = Scene::new();
    let (_, adapter, _) = conv(&sc);
    let canon = sc.path("in/conv_f1.safetensors");
    ok(&run("boft-convert", &[&adapter, &"-o", &canon]));
    let mut st = St::read(&canon);
    let meta = st.metadata.as_mut().unwrap();
    let targets: Vec<Value> = serde_json::from_str(meta["targets"].as_str().unwrap()).unwrap();
    let fc = targets
        .into_iter()
        .find(|t| t["key"] == "fc.weight")
        .unwrap();
    let identity: Vec<u8> = [1f32, 0.0, 0.0, 1.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let n = 200_000;
    let mut many = Vec::new();
    st.tensors.clear();
    for i in 0..n {
        let mut t = fc.clone();
        let name = format!("l{i}.weight");
        t["key"] = json!(name);
        t["target"] = json!(name);
        t["module"] = json!(format!("l{i}"));
        t["factors"] = json!(if i == n - 1 { 0 } else { 1 });
        t["blocks"] = json!(1);
        t["block_size"] = json!(2);
        t["permuted"] = json!(false);
        t["scaled"] = json!(false);
        many.push(t);
        st.tensors.push((
            format!("{name}::blocks"),
            "F32".into(),
            vec![1, 1, 2, 2],
            identity.clone(),
        ));
    }
    meta["targets"] = json!(serde_json::to_string(&many).unwrap());
    st.write(&canon);
    let out = sc.out_dir().join("again.safetensors");
    let start = Instant::now();
    let o = sc.convert(&canon, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("l199999"), "{}", stderr(&o));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Numbers: a finite adapter and a finite strength whose merge overflows (safe merge)
// ---------------------------------------------------------------------------------------------

#[test]
fn n01_strength_overflows_f32() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    // Finite as f64, not as f32.
    let o = sc.merge(&base, &adapter, &out, &["--strength", "1e39"]);
    sc.assert_refused(&o, "non-finite", &out);
}

#[test]
fn n02_unmerge_by_a_denormal_scale() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let mut st = St::read(&adapter.join(CONV_W));
    let s = &mut st.tensor_mut("base_model.model.fc.boft_s").3;
    for c in s.chunks_exact_mut(4) {
        c.copy_from_slice(&1e-40f32.to_le_bytes());
    }
    st.write(&adapter.join(CONV_W));
    let o = sc.merge(&base, &adapter, &out, &["--unmerge"]);
    let err = stderr(&o);
    assert!(err.contains("fc.weight"), "names the tensor: {err}");
    sc.assert_refused(&o, "non-finite", &out);
}

#[test]
fn o01_output_is_the_base_folder() {
    let mut sc = Scene::new();
    let (base, adapter, _) = sharded(&sc);
    // --force does not make it acceptable.
    let o = sc.merge(&base, &adapter, &base, &["--force"]);
    sc.assert_refused_keep(&o, "output-is-input", &base, true);
}

#[test]
fn o02_output_inside_the_base_folder() {
    let mut sc = Scene::new();
    let (base, adapter, _) = sharded(&sc);
    let out = base.join("merged");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "output-is-input", &out);
}

#[test]
fn o03_output_is_the_base_file_through_a_symlink() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::os::unix::fs::symlink(&base, &out).unwrap();
    let o = sc.merge(&base, &adapter, &out, &["--force"]);
    sc.assert_refused_keep(&o, "output-is-input", &out, true);
}

#[test]
fn o04_convert_output_inside_the_adapter_folder() {
    let mut sc = Scene::new();
    let adapter = sc.copy("adapters/conv_f1", "in/adapter");
    let out = adapter.join(CONV_W);
    let o = sc.convert(&adapter, &out, &["--force"]);
    sc.assert_refused_keep(&o, "output-is-input", &out, true);
}

#[test]
fn o05_output_exists_without_force() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    std::fs::write(&out, b"precious").unwrap();
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused_keep(&o, "output-exists", &out, true);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn o06_output_folder_missing() {
    let mut sc = Scene::new();
    let (base, adapter, _) = conv(&sc);
    let out = sc.path("no/such/folder/merged.safetensors");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "not-found", &out);
}

#[test]
fn o07_output_on_read_only_location() {
    let mut sc = Scene::new();
    let (base, adapter, _) = conv(&sc);
    let ro = sc.path("ro");
    let mount = Mount::tmpfs(&ro, libc::MS_RDONLY, "size=64k");
    let parent = if mount.is_some() {
        ro
    } else if Path::new("/sys").is_dir() {
        // sysfs refuses new files even to root.
        eprintln!("note: cannot mount a read-only tmpfs here; using /sys instead");
        PathBuf::from("/sys")
    } else {
        eprintln!("skipped: cannot mount a read-only tmpfs and /sys is absent");
        return;
    };
    let out = parent.join("boft-merged.safetensors");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "io", &out);
    assert!(stderr(&o).to_lowercase().contains("read-only") || parent == Path::new("/sys"));
}

#[test]
fn o08_disk_full() {
    let mut sc = Scene::new();
    let base = sc.copy("bases/llama_f32", "in/base");
    let adapter = sc.copy("adapters/llama_f32_f2", "in/adapter");
    let model = std::fs::metadata(base.join("model.safetensors"))
        .unwrap()
        .len();
    // Half the model's size: the space reservation (or the first writes) fail.
    let small = sc.path("small");
    let Some(_m) = Mount::tmpfs(&small, 0, &format!("size={}", model / 2)) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)");
        return;
    };
    let out = small.join("merged");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "io", &out);
    assert!(
        stderr(&o).contains("no space left on device"),
        "{}",
        stderr(&o)
    );
    assert!(dir_entries(&small).is_empty());
}

#[test]
fn o09_disk_full_after_the_tensors() {
    let mut sc = Scene::new();
    let base = sc.copy("bases/llama_f32", "in/base");
    let adapter = sc.copy("adapters/llama_f32_f2", "in/adapter");
    let model = std::fs::metadata(base.join("model.safetensors"))
        .unwrap()
        .len();
    // Room for the tensors, in whole pages, and nothing more: copying config.json fails.
    let pages = model.div_ceil(4096) * 4096;
    let small = sc.path("small");
    let Some(_m) = Mount::tmpfs(&small, 0, &format!("size={pages}")) else {
        eprintln!("skipped: cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)");
        return;
    };
    let out = small.join("merged");
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "io", &out);
    let err = stderr(&o);
    assert!(err.contains("no space left on device"), "{err}");
    assert!(
        !err.contains(base.to_str().unwrap()),
        "blames the input: {err}"
    );
    assert!(dir_entries(&small).is_empty());
}

#[test]
fn o10_force_does_not_replace_a_fifo() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    mkfifo(&out);
    let o = sc.merge(&base, &adapter, &out, &["--force"]);
    sc.assert_refused_keep(&o, "output-exists", &out, true);
    let ft = std::fs::symlink_metadata(&out).unwrap().file_type();
    assert!(
        std::os::unix::fs::FileTypeExt::is_fifo(&ft),
        "FIFO replaced"
    );
}

#[test]
fn o11_convert_output_is_the_config_beside_the_adapter_file() {
    let mut sc = Scene::new();
    let adapter = sc.copy("adapters/conv_f1", "in/adapter");
    // The reader opens adapter_config.json beside the file it was given.
    let out = adapter.join(CONV_CFG);
    sc.freeze(&[&adapter], &out);
    let o = run_limited(
        "boft-convert",
        &[
            adapter.join(CONV_W).as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--force".as_ref(),
        ],
    );
    sc.assert_refused_keep(&o, "output-is-input", &out, true);
}

#[test]
fn o12_output_is_a_blob_behind_the_base_in_a_hub_cache() {
    let mut sc = Scene::new();
    let repo = sc.path("hub/models--org--tiny");
    let snap = repo.join("snapshots").join("0".repeat(40));
    let blob = repo.join("blobs").join("b".repeat(64));
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::copy(fx("bases/conv/model.safetensors"), &blob).unwrap();
    let link = Path::new("../../blobs").join(blob.file_name().unwrap());
    std::os::unix::fs::symlink(&link, snap.join("model.safetensors")).unwrap();
    let adapter = sc.copy("adapters/conv_f1", "in/adapter");
    // The base folder is the snapshot; the file it really reads is the blob.
    let o = sc.merge(&snap, &adapter, &blob, &["--force"]);
    sc.assert_refused_keep(&o, "output-is-input", &blob, true);
    assert_eq!(tree(&repo.join("blobs")).len(), 2);
}

/// Run `program args…` from a shell that first plants a symlink to `target` at the name the
/// binary will stage `out` under (the shell `exec`s it, so its pid is the binary's).
fn run_with_planted_link(program: &str, args: &[&OsStr], out: &Path, target: &Path) -> Output {
    let name = out.file_name().unwrap().to_str().unwrap();
    let staged = format!(
        "{}/.{name}.boft-partial-$$",
        out.parent().unwrap().display()
    );
    let script = format!("ln -s \"$1\" \"{staged}\" || exit 99; shift; exec \"$@\"");
    let exe = bin(program).get_program().to_owned();
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(target)
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_limited(child, Duration::from_secs(120))
}

#[test]
fn o13_symlink_planted_at_the_staged_name() {
    let sc = Scene::new();
    let peft = sc.copy("adapters/conv_f1", "in/adapter");
    let (_, lyco, _) = lycoris(&sc);
    let victim = sc.path("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let out_dir = sc.out_dir();
    for (adapter, to) in [(&peft, "canonical"), (&lyco, "lycoris")] {
        let before = tree(adapter);
        for e in dir_entries(&out_dir) {
            std::fs::remove_file(out_dir.join(e)).unwrap();
        }
        let out = out_dir.join(format!("{to}.safetensors"));
        let args = [
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
            "--to".as_ref(),
            to.as_ref(),
        ];
        let o = run_with_planted_link("boft-convert", &args, &out, &victim);
        let err = fails_with(&o, "io");
        assert!(!err.contains("panicked"), "{err}");
        assert!(std::fs::symlink_metadata(&out).is_err(), "output written");
        // The planted link is neither followed nor removed.
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let entries = dir_entries(&out_dir);
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert!(std::fs::symlink_metadata(out_dir.join(&entries[0]))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(tree(adapter), before, "input changed");
    }
}

/// Not an error: the longest output names (252 bytes here) work, though the staged name adds to
/// them (it is shortened with a hash to fit NAME_MAX), for a file and for a folder.
#[test]
fn o14_longest_output_names_are_accepted() {
    let sc = Scene::new();
    let (base, adapter, _) = conv(&sc);
    let sbase = sc.copy("bases/llama_bf16_sharded", "in2/base");
    let sadapter = sc.copy("adapters/llama_bf16_f2", "in2/adapter");
    let out_dir = sc.out_dir();
    let file = out_dir.join("m".repeat(240) + ".safetensors");
    let folder = out_dir.join("f".repeat(255));
    for (b, a, out) in [(&base, &adapter, &file), (&sbase, &sadapter, &folder)] {
        let o = run_limited("boft-merge", &merge_args(b, a, out));
        ok(&o);
        assert!(out.exists());
    }
    let mut want = vec![
        file.file_name().unwrap().to_str().unwrap().to_string(),
        folder.file_name().unwrap().to_str().unwrap().to_string(),
    ];
    want.sort();
    assert_eq!(dir_entries(&out_dir), want);
}

#[test]
fn u01_unknown_flag() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let o = sc.merge(&base, &adapter, &out, &["--bogus"]);
    sc.assert_refused(&o, "usage", &out);
}

#[test]
fn u02_zero_threads() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let o = sc.merge(&base, &adapter, &out, &["--threads", "0"]);
    sc.assert_refused(&o, "usage", &out);
}

#[test]
fn u03_too_many_threads() {
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let o = sc.merge(&base, &adapter, &out, &["--threads", "1000000"]);
    sc.assert_refused(&o, "usage", &out);
    assert!(stderr(&o).contains("limit of 1024"), "{}", stderr(&o));
    // One past the limit (the limit itself is not run: a container's process limit may be
    // lower).
    let o = sc.merge(&base, &adapter, &out, &["--threads", "1025"]);
    sc.assert_refused(&o, "usage", &out);
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// A base whose one tensor takes a while to transform: `rows` × 1024 F32, and a canonical
/// adapter with 4 factors of 16 blocks of 64 on it.
fn slow_case(dir: &Path, rows: usize) -> (PathBuf, PathBuf) {
    use boft::adapter::{canonical, Adapter, BlockKind, Side, Target};
    let (n, h, d, nf) = (1024usize, 64usize, 16usize, 4usize);
    let base = dir.join(format!("big-{rows}.safetensors"));
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{rows},{n}],"data_offsets":[0,{}]}}}}"#,
        rows * n * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..rows * n).flat_map(|i| ((i % 251) as f32 * 0.01).to_le_bytes()));
    std::fs::write(&base, bytes).unwrap();
    let mut data = vec![0f32; nf * d * h * h];
    for b in 0..nf * d {
        for i in 0..h {
            data[b * h * h + i * h + i] = 1.0;
        }
    }
    let adapter = Adapter {
        targets: vec![Target {
            name: "w".into(),
            module: "w".into(),
            side: Side::Input,
            shape: None,
            rows: None,
            factors: nf,
            blocks: d,
            block_size: h,
            data,
            deferred: None,
            perms: vec![None; nf],
            scale: None,
            kind: BlockKind::Cayley,
            ..Default::default()
        }],
        source_format: "test".into(),
        ..Default::default()
    };
    let apath = dir.join(format!("big-{rows}-adapter.safetensors"));
    std::fs::write(&apath, canonical::to_bytes(&adapter).unwrap()).unwrap();
    (base, apath)
}

/// Start `boft-merge` of a slow case into `out` (a file in its own folder) with one thread, and
/// wait until its staged file appears (true) or it ends first (false).
fn merge_until_staged(base: &Path, adapter: &Path, out: &Path) -> (std::process::Child, bool) {
    let mut args = merge_args(base, adapter, out);
    args.extend([OsStr::new("--threads"), OsStr::new("1")]);
    let mut child = bin("boft-merge")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let name = out.file_name().unwrap().to_string_lossy();
    let temp = out.with_file_name(format!(".{name}.boft-partial-{}", child.id()));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if temp.exists() {
            return (child, true);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    (child, false)
}

/// Start a merge, wait for its temporary output to appear, signal it, and check it stops with
/// [interrupted], leaving no output and no temporary file. When the merge is so fast that it
/// finishes before the signal lands, retry with a larger base.
fn interrupt_mid_write(signal: libc::c_int) {
    let sc = Scene::new();
    let out_dir = sc.out_dir();
    let out = out_dir.join("merged.safetensors");
    for rows in [8192usize, 32768, 131072] {
        let (base, adapter) = slow_case(sc.tmp.path(), rows);
        let before = (tree(&base), tree(&adapter));
        let (child, seen) = merge_until_staged(&base, &adapter, &out);
        if seen {
            // SAFETY: signalling our own child, which has not been reaped yet.
            assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        }
        let o = wait_limited(child, Duration::from_secs(120));
        if o.status.success() {
            eprintln!("merge of {rows} rows finished before the signal; retrying larger");
            std::fs::remove_file(&out).unwrap();
            std::fs::remove_file(&base).unwrap();
            continue;
        }
        let err = fails_with(&o, "interrupted");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "output written despite the signal");
        assert!(
            dir_entries(&out_dir).is_empty(),
            "leftovers: {:?}",
            dir_entries(&out_dir)
        );
        assert_eq!((tree(&base), tree(&adapter)), before, "inputs changed");
        return;
    }
    panic!("every merge finished before the signal arrived");
}

#[test]
fn i01_sigint_mid_write() {
    interrupt_mid_write(libc::SIGINT);
}

#[test]
fn i02_sigterm_mid_write() {
    interrupt_mid_write(libc::SIGTERM);
}

/// SIGINT and SIGTERM end boft-verify as they end boft-merge: `[interrupted]`, exit 2, never a
/// report (a check cut short must not read as a pass).
#[test]
fn i05_verify_interrupted() {
    let sc = Scene::new();
    let out_dir = sc.out_dir();
    let merged = out_dir.join("merged.safetensors");
    // Large enough that verify runs well past the signal: at 32768 rows it finished in ~0.3 s,
    // as the signal arrived.
    let (base, adapter) = slow_case(sc.tmp.path(), 65536);
    ok(&run(
        "boft-merge",
        &[&"--base", &base, &"--adapter", &adapter, &"-o", &merged],
    ));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let child = bin("boft-verify")
            .args([
                adapter.as_os_str(),
                "--base".as_ref(),
                base.as_os_str(),
                "--merged".as_ref(),
                merged.as_os_str(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
        let o = wait_limited(child, Duration::from_secs(120));
        if o.status.code() == Some(0) || o.status.code() == Some(1) {
            panic!(
                "boft-verify finished with a report despite the signal: {}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        let err = fails_with(&o, "interrupted");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Another process truncates the base while the merge reads it through its map: the next read
/// past the new end faults (SIGBUS). The binaries turn that into one `[io]` line naming the
/// file, remove the staged output and exit 2 (docs/ERRORS.md, "Inputs changed during a run").
#[test]
fn i04_base_truncated_mid_merge() {
    let sc = Scene::new();
    let out_dir = sc.out_dir();
    let out = out_dir.join("merged.safetensors");
    for rows in [8192usize, 32768, 131072] {
        let (base, adapter) = slow_case(sc.tmp.path(), rows);
        let (child, seen) = merge_until_staged(&base, &adapter, &out);
        if seen {
            let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
            f.set_len(std::fs::metadata(&base).unwrap().len() / 8)
                .unwrap();
        }
        let o = wait_limited(child, Duration::from_secs(120));
        if o.status.success() {
            eprintln!("merge of {rows} rows finished before the truncation; retrying larger");
            std::fs::remove_file(&out).unwrap();
            std::fs::remove_file(&base).unwrap();
            continue;
        }
        let err = fails_with(&o, "io");
        eprint!("{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains(&*base.to_string_lossy()), "{err}");
        assert!(!out.exists(), "output written from a truncated base");
        assert!(
            dir_entries(&out_dir).is_empty(),
            "leftovers: {:?}",
            dir_entries(&out_dir)
        );
        return;
    }
    panic!("every merge finished before the truncation");
}

/// SIGKILL (or the OOM killer) gives no chance to clean up: the staged file stays. The next run
/// for the same destination reclaims it, since its owner is gone (docs/ERRORS.md, "Hard kills").
#[test]
fn i03_sigkill_leftover_is_reclaimed_by_the_next_run() {
    let sc = Scene::new();
    let out_dir = sc.out_dir();
    let out = out_dir.join("merged.safetensors");
    let (base, adapter) = slow_case(sc.tmp.path(), 32768);
    let mut args = merge_args(&base, &adapter, &out);
    args.extend([OsStr::new("--threads"), OsStr::new("1")]);
    let mut child = bin("boft-merge")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let temp = out_dir.join(format!(".merged.safetensors.boft-partial-{}", child.id()));
    let start = Instant::now();
    while !temp.exists() && start.elapsed() < Duration::from_secs(60) {
        assert!(child.try_wait().unwrap().is_none(), "merge ended early");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    if out.exists() {
        eprintln!("skipped: the merge finished before SIGKILL landed");
        return;
    }
    assert!(temp.exists(), "a hard kill leaves the staged file");
    let o = run_limited("boft-merge", &args);
    ok(&o);
    assert_eq!(
        dir_entries(&out_dir),
        vec!["merged.safetensors".to_string()],
        "leftover not reclaimed"
    );
}

#[test]
fn a34_block_size_past_the_limit() {
    use boft::adapter::{Side, MAX_BLOCK_SIZE};
    let mut sc = Scene::new();
    let (_, _, out) = conv(&sc);
    // One block of 4097×4097 (67 MB): checking its orthogonality costs 4097³ operations
    // (about a minute here); every block-wise computation is cubic in the block size, so the size
    // is capped and the file refused before any of it.
    let bs = MAX_BLOCK_SIZE + 1;
    let t = canon_target("fc.weight", Side::Input, 1, 1, bs);
    let adapter = canon_file(&sc, vec![t]);
    sc.freeze(&[&adapter], &out);
    let start = Instant::now();
    let o = run_limited("boft-verify", &[adapter.as_os_str()]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("limit"), "{}", stderr(&o));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "refused after {:?}",
        start.elapsed()
    );
}

#[test]
fn a35_canonical_tensor_replaced_twice() {
    use boft::adapter::{Adapter, Replacement};
    use boft::checkpoint::Dtype;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    // Two replacements of fc.bias under two keys: the merge kept the last one without a word and
    // boft-convert panicked writing the duplicate.
    let bias = |v: f32| Replacement {
        name: "fc.bias".into(),
        dtype: Dtype::F32,
        shape: vec![16],
        data: (0..16).flat_map(|_| v.to_le_bytes()).collect(),
    };
    let p = sc.path("in/canonical.safetensors");
    let a = Adapter {
        replacements: vec![bias(1.0)],
        source_format: "test".into(),
        ..Default::default()
    };
    boft::adapter::canonical::write(&a, &p).unwrap();
    let mut st = St::read(&p);
    let meta = st.metadata.as_mut().unwrap();
    let mut reps: Vec<Value> =
        serde_json::from_str(meta["replacements"].as_str().unwrap()).unwrap();
    let mut second = reps[0].clone();
    second["key"] = json!("fc.bias::replace-again");
    reps.push(second);
    meta["replacements"] = json!(serde_json::to_string(&reps).unwrap());
    let again = st.tensors[0].clone();
    st.tensors.push((
        "fc.bias::replace-again".into(),
        again.1,
        again.2,
        (0..16).flat_map(|_| 2f32.to_le_bytes()).collect(),
    ));
    st.write(&p);
    sc.freeze(&[&base, &p], &out);
    let o = sc.merge(&base, &p, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("replaced twice"), "{}", stderr(&o));
    let conv_out = sc.out_dir().join("converted.safetensors");
    let o = sc.convert(&p, &conv_out, &[]);
    sc.assert_refused(&o, "bad-adapter", &conv_out);
}

#[test]
fn a36_peft_config_values_of_another_type() {
    // PEFT reads `coft: 1` as true (Python truthiness); a reader taking it as false merged other
    // weights than PEFT without a word. Every typed field of another type is refused.
    for (key, value) in [
        ("coft", json!(1)),
        ("use_cayley_neumann", json!("false")),
        ("eps", json!("0.01")),
        ("num_cayley_neumann_terms", json!(-1)),
        ("r", json!(1.5)),
        ("eps", json!(null)),
        ("rank_pattern", json!(["q_proj"])),
    ] {
        let mut sc = Scene::new();
        let base = sc.path("in/base");
        copy_tree(&fixtures().join("peft_oft/bases/llama_f32"), &base);
        let adapter = sc.path("in/adapter");
        copy_tree(
            &fixtures().join("peft_oft/adapters/llama_f32_coft_cayley"),
            &adapter,
        );
        let cfg = adapter.join("adapter_config.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        c[key] = value.clone();
        std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
        let out = sc.out_dir().join("merged");
        let o = sc.merge(&base, &adapter, &out, &[]);
        sc.assert_refused(&o, "bad-adapter", &out);
        assert!(stderr(&o).contains(key), "{key}={value}: {}", stderr(&o));
    }
}

#[test]
fn a37_index_padded_with_empty_objects() {
    // An index whose metadata holds a list of 2.5 million empty objects (7.5 MB): read as a JSON
    // tree that took ~24 times the file; only weight_map's strings are kept now.
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let index = base.join("model.safetensors.index.json");
    let mut text = std::fs::read_to_string(&index).unwrap();
    let pad = format!("\"padding\": [{}{{}}], ", "{},".repeat(2_500_000));
    text = text.replacen('{', &format!("{{{pad}"), 1);
    std::fs::write(&index, &text).unwrap();
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak_kib) = merge_measured(&base, &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("peak RSS {peak_kib} KiB");
    // The JSON tree alone took ~180 MB; 64 MiB leaves room for the merge itself.
    assert!(peak_kib < 64 << 10, "peak RSS {peak_kib} KiB");
}

#[test]
fn a38_header_of_many_zero_size_tensors() {
    // A base holding, besides its tensors, 300 000 empty ones (a 17 MB header). Each entry was
    // kept as a JSON tree and every dotted suffix of its name indexed: ~25 times the header.
    let mut sc = Scene::new();
    let (base, adapter, out) = lycoris(&sc);
    let mut st = St::read(&base);
    for i in 0..300_000 {
        st.tensors.push((
            format!("extra.layers.{i}.zz.weight"),
            "F32".into(),
            vec![0],
            vec![],
        ));
    }
    st.write(&base);
    let header = std::fs::metadata(&base).unwrap().len() as i64;
    // Names resolved through the suffix index (as in A18/A32): the flattened LyCORIS names.
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak_kib) = merge_measured(&base, &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("peak RSS {peak_kib} KiB for a {header}-byte base");
    let limit = (64 << 10) + 8 * header / 1024;
    assert!(
        peak_kib < limit,
        "peak RSS {peak_kib} KiB for a {header}-byte base (limit {limit} KiB)"
    );
}

#[test]
fn p01_newline_in_a_path_stays_on_one_line() {
    let mut sc = Scene::new();
    let (_, adapter, _) = conv(&sc);
    // An empty base whose name holds a newline: the line names it with the newline escaped.
    let odd = sc.path("in/em\npty.safetensors");
    std::fs::write(&odd, b"").unwrap();
    let out = sc.out_dir().join("merged.safetensors");
    let o = sc.merge(&odd, &adapter, &out, &[]);
    sc.assert_refused(&o, "empty-file", &out);
    assert!(stderr(&o).contains("em\\npty"), "{}", stderr(&o));
}

#[test]
fn a39_peft_config_null_boolean_is_false() {
    // PEFT tests `if self.use_cayley_neumann:` on the config it loaded: null is false, so the
    // exact Cayley transform is used. Read as the default (true), the Neumann series was merged.
    let mut sc = Scene::new();
    let base = sc.path("in/base");
    copy_tree(&fixtures().join("peft_oft/bases/llama_f32"), &base);
    let run_with = |sc: &mut Scene, value: Value, name: &str| {
        let adapter = sc.path(&format!("in/{name}"));
        copy_tree(
            &fixtures().join("peft_oft/adapters/llama_f32_neumann5"),
            &adapter,
        );
        let cfg = adapter.join("adapter_config.json");
        let mut c: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
        c["use_cayley_neumann"] = value;
        std::fs::write(&cfg, serde_json::to_vec(&c).unwrap()).unwrap();
        let out = sc.out_dir().join(name);
        let o = sc.merge(&base, &adapter, &out, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        tree(&out)
    };
    let null = run_with(&mut sc, Value::Null, "null");
    let exact = run_with(&mut sc, json!(false), "false");
    let series = run_with(&mut sc, json!(true), "true");
    assert_eq!(null, exact, "null merged differently from false");
    assert_ne!(null, series, "null merged as the Neumann series");
}

#[test]
fn a40_shared_blocks_are_never_written_out() {
    // PEFT OFT ≤ 0.13 block_share: each of 4 targets stores one 128×128 block (64 KB) that the
    // config's r = 2048 repeats over 262 144 features (the most shared blocks may span).
    // Expanded when read, this 262 KB adapter took ~3 GB to convert into a 1 GB file at
    // r = 4096, and verify checked the same block 4096 times (> 9 min). The one block is kept:
    // memory and output follow the bytes given.
    let (k, h, r) = (4usize, 128usize, 2048usize);
    let n = h * r;
    let mut sc = Scene::new();
    let adapter = sc.path("in/adapter");
    let modules: Vec<String> = (0..k).map(|i| format!("m{i}")).collect();
    let names: Vec<String> = modules
        .iter()
        .map(|m| format!("base_model.model.{m}.oft_r"))
        .collect();
    let tensors: Vec<(&str, Vec<usize>)> =
        names.iter().map(|s| (s.as_str(), vec![1, h, h])).collect();
    tiny_peft(
        &adapter,
        json!({"peft_type": "OFT", "block_share": true, "r": r, "target_modules": modules}),
        &tensors,
    );
    let base = sc.path("in/base.safetensors");
    St {
        metadata: None,
        tensors: modules
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let bytes = (0..n)
                    .flat_map(|j| (((i * n + j) % 97) as f32 * 0.01).to_le_bytes())
                    .collect();
                (format!("{m}.weight"), "F32".to_string(), vec![n, 1], bytes)
            })
            .collect(),
    }
    .write(&base);
    let size = |p: &Path| -> i64 {
        match std::fs::read_dir(p) {
            Ok(d) => d.map(|e| e.unwrap().metadata().unwrap().len() as i64).sum(),
            Err(_) => std::fs::metadata(p).unwrap().len() as i64,
        }
    };
    let (adapter_bytes, base_bytes) = (size(&adapter), size(&base));
    let limit = |inputs: i64| (64 << 10) + 8 * inputs / 1024;

    // Canonical: the one block per target, written once.
    let out = sc.out_dir().join("canonical.safetensors");
    sc.freeze(&[&adapter], &out);
    let (o, peak) = run_measured(
        "boft-convert",
        &[adapter.as_os_str(), "-o".as_ref(), out.as_os_str()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let written = std::fs::metadata(&out).unwrap().len() as i64;
    eprintln!("convert: peak {peak} KiB, {written} bytes from {adapter_bytes}");
    assert!(peak < limit(adapter_bytes), "convert: peak RSS {peak} KiB");
    assert!(
        written < 2 * adapter_bytes,
        "{written} bytes from {adapter_bytes}"
    );

    // Merge and verify against the base: the blocks are identities (a zero generator), so the
    // merged base is the base; the work is the base's, not r times the adapter's.
    let merged = sc.out_dir().join("merged.safetensors");
    sc.freeze(&[&base, &adapter], &merged);
    let (o, peak) = merge_measured(&base, &adapter, &merged);
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("merge: peak {peak} KiB for {base_bytes} + {adapter_bytes} bytes");
    assert!(
        peak < limit(base_bytes + adapter_bytes),
        "merge: peak RSS {peak} KiB"
    );
    let sorted = |p: &Path| {
        let mut t = St::read(p).tensors;
        t.sort();
        t
    };
    assert!(
        sorted(&merged) == sorted(&base),
        "identity blocks changed the base"
    );
    let start = std::time::Instant::now();
    let (o, peak) = run_measured(
        "boft-verify",
        &[
            adapter.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
            "--merged".as_ref(),
            merged.as_os_str(),
        ],
    );
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    eprintln!("verify: peak {peak} KiB, {:?}", start.elapsed());
    assert!(
        peak < limit(2 * base_bytes + adapter_bytes),
        "verify: peak RSS {peak} KiB"
    );

    // An export must write every position out (LyCORIS cannot say block_share): 2^27 values
    // here, past the 2^26 an export may write out.
    let lyco = sc.out_dir().join("lycoris.safetensors");
    let o = sc.convert(
        &adapter,
        &lyco,
        &["--to", "lycoris", "--base", base.to_str().unwrap()],
    );
    sc.assert_refused(&o, "not-exportable", &lyco);
    assert!(stderr(&o).contains("block_share"), "{}", stderr(&o));
}

#[test]
fn a41_verify_time_follows_the_blocks_not_the_axis_squared() {
    // One permuted target of 2^18 blocks of 2 (a 6 MB canonical file, n = 2^19). Verify
    // followed the reach of every block through the whole axis (2^18 × 2^19 steps) and called
    // a GEMM per 2×2 block for every probe: 21.8 s for half as many blocks, unpermuted. It
    // follows an even sample of the blocks now, and small blocks skip the GEMM.
    use boft::adapter::Side;
    let sc = Scene::new();
    std::fs::create_dir_all(sc.path("in")).unwrap();
    let mut t = canon_target("fc.weight", Side::Input, 1, 1 << 18, 2);
    t.kind = boft::adapter::BlockKind::Raw;
    // Permuted (a shift by one), so that the reach is walked, not said.
    let n = 1u32 << 19;
    t.perms = vec![Some((0..n).map(|j| (j + 1) % n).collect())];
    let adapter = canon_file(&sc, vec![t]);
    let start = std::time::Instant::now();
    let (o, peak) = run_measured("boft-verify", &[adapter.as_os_str(), "--json".as_ref()]);
    let took = start.elapsed();
    let bytes = std::fs::metadata(&adapter).unwrap().len() as i64;
    eprintln!("verify: {took:?}, peak {peak} KiB for {bytes} bytes");
    assert!(
        o.status.success() || o.status.code() == Some(1),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("followed from 256 of the last factor's 262144 blocks"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        took < std::time::Duration::from_secs(15),
        "verify took {took:?}"
    );
    assert!(peak < (64 << 10) + 8 * bytes / 1024, "peak RSS {peak} KiB");
}

#[test]
fn a42_verify_of_shared_blocks_without_a_base() {
    // A real PEFT OFT block_share adapter (PEFT ≥ 0.14 fills the input axis, whose length only
    // the base knows), verified alone: the transform of zero blocks was measured and nalgebra
    // panicked on the empty matrix. The one stored block is measured, and the report says so.
    let a = fixtures().join("peft_oft/adapters/llama_f32_block_share");
    let o = run("boft-verify", &[&a]);
    let out = ok(&o);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let json = run("boft-verify", &[&a, &"--json"]);
    let v: Value = serde_json::from_str(&ok(&json)).unwrap();
    let geometry: Vec<&Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "geometry")
        .collect();
    assert!(!geometry.is_empty(), "{out}");
    for g in geometry {
        let detail = g.to_string();
        assert!(detail.contains("one shared block"), "{detail}");
    }
}

#[test]
fn a43_index_of_millions_of_short_names() {
    // The sharded base's first shard renamed `1` and its index given 7 million more short
    // names in it ("xab":"1", 11 bytes an entry), none of them in the shard: one String each, a
    // set of them and the shard's list held ~9× the file (845 MB for 95 MB). The names share
    // one buffer now; the index is refused as it must be.
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    std::fs::rename(base.join(SHARD1), base.join("1")).unwrap();
    let index = base.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index)
        .unwrap()
        .replace(SHARD1, "1");
    let digits: Vec<char> = ('a'..='z').chain('0'..='9').collect();
    let mut extra = String::with_capacity(90_000_000);
    for i in 0..7_000_000usize {
        let mut k = i;
        extra.push_str("\"x");
        loop {
            extra.push(digits[k % 36]);
            k /= 36;
            if k == 0 {
                break;
            }
        }
        extra.push_str("\":\"1\",");
    }
    let text = text.replacen(
        "\"weight_map\": {",
        &format!("\"weight_map\": {{{extra}"),
        1,
    );
    assert!(text.len() > 80_000_000, "the names were not added");
    std::fs::write(&index, &text).unwrap();
    let bytes = text.len() as i64;
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak_kib) = merge_measured(&base, &adapter, &out);
    sc.assert_refused(&o, "bad-index", &out);
    assert!(stderr(&o).contains("does not hold"), "{}", stderr(&o));
    eprintln!("peak RSS {peak_kib} KiB for a {bytes}-byte index");
    let limit = (64 << 10) + 3 * bytes / 1024;
    assert!(
        peak_kib < limit,
        "peak RSS {peak_kib} KiB (limit {limit} KiB)"
    );
}

/// A canonical target of shared blocks: one stored block per factor over `blocks` positions.
fn shared_target(
    side: boft::adapter::Side,
    factors: usize,
    blocks: usize,
    bs: usize,
) -> boft::adapter::Target {
    let mut t = canon_target("w.weight", side, factors, 1, bs);
    t.blocks = blocks;
    t.share = true;
    t.kind = boft::adapter::BlockKind::Raw;
    t
}

#[test]
fn a44_shared_blocks_cropped_to_a_sliver() {
    // Shared 1×1 blocks over 2^18 positions cropped to 1 feature: the crop's own blocks were
    // written out over the whole axis for every factor (533 MB for an 816-byte adapter of 64
    // factors), and verify walked the axis for a 1-row base. A crop keeps more than half of n.
    use boft::adapter::Side;
    let mut sc = Scene::new();
    std::fs::create_dir_all(sc.path("in")).unwrap();
    let n = 1usize << 18;
    let base = sc.path("in/base.safetensors");
    let out = sc.out_dir().join("merged.safetensors");
    let write_base = |rows: usize| {
        St {
            metadata: None,
            tensors: vec![(
                "w.weight".into(),
                "F32".into(),
                vec![rows, 1],
                (0..rows)
                    .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
                    .collect(),
            )],
        }
        .write(&base)
    };
    write_base(1);
    let mut t = shared_target(Side::Output, 1, n, 1);
    t.crop = Some(1);
    let adapter = canon_file(&sc, vec![t]);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("less than half"), "{}", stderr(&o));
    let o = run("boft-verify", &[&adapter]);
    fails_with(&o, "bad-adapter");

    // Cropped to just over half, against a base of that many rows: it merges, within the
    // usual bound, and the cropped identity tail leaves the rows as they were (blocks of 1).
    let crop = n / 2 + 1;
    write_base(crop);
    let mut t = shared_target(Side::Output, 1, n, 1);
    t.crop = Some(crop);
    let adapter = canon_file(&sc, vec![t]);
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak) = merge_measured(&base, &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let inputs = (std::fs::metadata(&base).unwrap().len()
        + std::fs::metadata(&adapter).unwrap().len()) as i64;
    assert!(
        peak < (64 << 10) + 8 * inputs / 1024,
        "merge: peak RSS {peak} KiB"
    );
    let start = std::time::Instant::now();
    ok(&run(
        "boft-verify",
        &[&adapter, &"--base", &base, &"--merged", &out],
    ));
    assert!(
        start.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a45_many_shared_targets_of_one_scalar_block() {
    // A PEFT OFT ≤ 0.13 folder of 64 modules, each one 1×1 `oft_r` (4 bytes) that the config's
    // r = 2^18 repeats. Verify walked the 2^18-long axis 256 times per target (seconds each for
    // 4 stored bytes); the reach of an unpermuted chain is said without walking it, and the
    // block is measured once.
    let mut sc = Scene::new();
    let adapter = sc.path("in/adapter");
    let modules: Vec<String> = (0..64).map(|i| format!("m{i}")).collect();
    let names: Vec<String> = modules
        .iter()
        .map(|m| format!("base_model.model.{m}.oft_r"))
        .collect();
    let tensors: Vec<(&str, Vec<usize>)> =
        names.iter().map(|s| (s.as_str(), vec![1, 1, 1])).collect();
    tiny_peft(
        &adapter,
        json!({"peft_type": "OFT", "block_share": true, "r": 1 << 18, "target_modules": modules}),
        &tensors,
    );
    sc.freeze(&[&adapter], &sc.out_dir().join("none"));
    let start = std::time::Instant::now();
    let (o, peak) = run_measured("boft-verify", &[adapter.as_os_str()]);
    let took = start.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    eprintln!("verify: {took:?}, peak {peak} KiB");
    assert!(
        took < std::time::Duration::from_secs(10),
        "verify took {took:?}"
    );
    assert!(peak < 64 << 10, "peak RSS {peak} KiB");
}

#[test]
fn a46_shared_blocks_unbacked_by_bytes() {
    // Shared blocks whose work no bytes back: 32 factors of 2×2 blocks shared over 2^20
    // features (1 KB; verify took 132 s and 1 GB), and shared blocks with a permutation (no
    // source writes them; they would be measured at every position).
    use boft::adapter::Side;
    let sc = Scene::new();
    std::fs::create_dir_all(sc.path("in")).unwrap();
    let adapter = canon_file(&sc, vec![shared_target(Side::Input, 32, 1 << 19, 2)]);
    let o = run("boft-verify", &[&adapter]);
    let e = fails_with(&o, "bad-adapter");
    assert!(e.contains("factors × features"), "{e}");
    let mut t = shared_target(Side::Input, 1, 8, 2);
    t.perms = vec![Some((0..16u32).rev().collect())];
    let adapter = canon_file(&sc, vec![t]);
    let e = fails_with(&run("boft-verify", &[&adapter]), "bad-adapter");
    assert!(e.contains("permutation"), "{e}");
}

#[test]
fn a47_factor_count_past_the_limit() {
    // 10 000 factors of one 1×1 block (40 KB) on a base of 262 144 rows: every factor was
    // applied to every row (205 s). More than 64 factors are refused.
    use boft::adapter::Side;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    let adapter = canon_file(
        &sc,
        vec![canon_target("fc.weight", Side::Input, 10_000, 48, 1)],
    );
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("64"), "{}", stderr(&o));
}

#[test]
fn a48_export_solves_a_shared_block_once() {
    // A PEFT OFT ≤ 0.13 block_share module: one 256×256 `oft_r` (256 KB) that r = 1024 repeats
    // over 262 144 features, exported to LyCORIS, which cannot say block_share: the export
    // writes it 1024 times (256 MB, the most an export writes out), and solved the inverse
    // Cayley map for every copy (b³ each) without answering signals: 12.5 s here, against
    // 2.6 s now that the block is solved once (both beside a running fuzzer).
    let (h, r) = (256usize, 1024usize);
    let n = h * r;
    let mut sc = Scene::new();
    let adapter = sc.path("in/adapter");
    tiny_peft(
        &adapter,
        json!({"peft_type": "OFT", "block_share": true, "r": r, "target_modules": ["m"]}),
        &[("base_model.model.m.oft_r", vec![1, h, h])],
    );
    // A generator that is not zero, so that solving it is real work.
    let mut st = St::read(&adapter.join("adapter_model.safetensors"));
    st.tensors[0].3 = (0..h * h)
        .flat_map(|i| (((i * 7919) % 13) as f32 * 0.001 - 0.006).to_le_bytes())
        .collect();
    st.write(&adapter.join("adapter_model.safetensors"));
    let base = sc.path("in/base.safetensors");
    St {
        metadata: None,
        tensors: vec![(
            "m.weight".into(),
            "F32".into(),
            vec![n, 1],
            (0..n)
                .flat_map(|i| (i as f32 * 1e-6).to_le_bytes())
                .collect(),
        )],
    }
    .write(&base);
    let out = sc.out_dir().join("lycoris.safetensors");
    sc.freeze(&[&adapter, &base], &out);
    let start = std::time::Instant::now();
    let o = run(
        "boft-convert",
        &[&adapter, &"--to", &"lycoris", &"--base", &base, &"-o", &out],
    );
    let took = start.elapsed();
    ok(&o);
    eprintln!("export: {took:?}");
    assert!(
        took < std::time::Duration::from_secs(8),
        "export took {took:?}"
    );
    let written = St::read(&out);
    let blocks = written
        .tensors
        .iter()
        .find(|t| t.0.ends_with("oft_blocks"))
        .expect("an oft_blocks tensor");
    assert_eq!(blocks.2, vec![r, h, h]);
    // Every position holds the one generator.
    let first = &blocks.3[..h * h * 4];
    assert!(blocks.3.chunks(h * h * 4).all(|c| c == first));
}

#[test]
fn a49_index_of_one_shard_file_per_tensor() {
    // The sharded base's index given 2 million more names, each in a shard of its own name
    // (`"xab":"xab"`, 24 MB): every distinct shard string cost a string, a path and lookup
    // entries before any shard was checked to exist (1.1 GB for 60 MB). At most 65 536 shard
    // files an index.
    let mut sc = Scene::new();
    let (base, adapter, out) = sharded(&sc);
    let index = base.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    let digits: Vec<char> = ('a'..='z').chain('0'..='9').collect();
    let mut extra = String::new();
    for i in 0..2_000_000usize {
        let (mut k, mut name) = (i, String::from("x"));
        loop {
            name.push(digits[k % 36]);
            k /= 36;
            if k == 0 {
                break;
            }
        }
        extra.push_str(&format!("\"{name}\":\"{name}\","));
    }
    let text = text.replacen(
        "\"weight_map\": {",
        &format!("\"weight_map\": {{{extra}"),
        1,
    );
    std::fs::write(&index, &text).unwrap();
    let bytes = text.len() as i64;
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak) = merge_measured(&base, &adapter, &out);
    sc.assert_refused(&o, "bad-index", &out);
    assert!(stderr(&o).contains("65536 shard files"), "{}", stderr(&o));
    eprintln!("peak RSS {peak} KiB for a {bytes}-byte index");
    assert!(peak < (64 << 10) + 3 * bytes / 1024, "peak RSS {peak} KiB");
}

#[test]
fn a50_shared_block_cropped_in_half() {
    // One shared 512×512 block over 512 positions (n = 2^18), cropped to 2^17 + 1 (a 1 MB
    // adapter, a 0.5 MB base): the blocks past the crop were written out, ~D/2 copies of the
    // block (537 MB). The chain now ends at the last block the axis reaches.
    use boft::adapter::Side;
    let mut sc = Scene::new();
    std::fs::create_dir_all(sc.path("in")).unwrap();
    let (h, d) = (512usize, 512usize);
    let crop = h * d / 2 + 1;
    let base = sc.path("in/base.safetensors");
    St {
        metadata: None,
        tensors: vec![(
            "w.weight".into(),
            "F32".into(),
            vec![crop, 1],
            (0..crop)
                .flat_map(|i| ((i % 7) as f32).to_le_bytes())
                .collect(),
        )],
    }
    .write(&base);
    let mut t = shared_target(Side::Output, 1, d, h);
    t.crop = Some(crop);
    let adapter = canon_file(&sc, vec![t]);
    let out = sc.out_dir().join("merged.safetensors");
    sc.freeze(&[&base, &adapter], &out);
    let (o, peak) = merge_measured(&base, &adapter, &out);
    assert!(o.status.success(), "{}", stderr(&o));
    let inputs = (std::fs::metadata(&base).unwrap().len()
        + std::fs::metadata(&adapter).unwrap().len()) as i64;
    eprintln!("merge: peak {peak} KiB for {inputs} bytes");
    assert!(
        peak < (64 << 10) + 8 * inputs / 1024,
        "merge: peak RSS {peak} KiB"
    );
    let (o, peak) = run_measured(
        "boft-verify",
        &[
            adapter.as_os_str(),
            "--base".as_ref(),
            base.as_os_str(),
            "--merged".as_ref(),
            out.as_os_str(),
            "--json".as_ref(),
        ],
    );
    // The raw blocks are not orthogonal (exit 1 names that check); the merged values must pass.
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let merged: Vec<&Value> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "merged-values")
        .collect();
    assert!(
        !merged.is_empty() && merged.iter().all(|c| c["status"] == "pass"),
        "{v}"
    );
    assert!(
        peak < (64 << 10) + 8 * 2 * inputs / 1024,
        "verify: peak RSS {peak} KiB"
    );
}

#[test]
fn a51_stages_past_the_factor_limit() {
    // A canonical file of 65 one-factor targets on one tensor, each its own stage (a composed
    // adapter's sequence): every stage is applied to the whole tensor, so the stages of a tensor
    // share the factor limit.
    use boft::adapter::Side;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    let targets = (0..65u32)
        .map(|k| {
            let mut t = canon_target("fc.weight", Side::Input, 1, 4, 12);
            t.stage = k;
            t
        })
        .collect();
    let adapter = canon_file(&sc, targets);
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("65 factors"), "{}", stderr(&o));
}

/// `boft-merge --base BASE --batch JOBS [extra]`, with the base, the jobs file and `also`
/// frozen first.
fn batch(
    sc: &mut Scene,
    base: &Path,
    jobs: &Path,
    out: &Path,
    also: &[&Path],
    extra: &[&str],
) -> std::process::Output {
    let mut frozen = vec![base, jobs];
    frozen.extend(also);
    sc.freeze(&frozen, out);
    let mut args: Vec<&OsStr> = vec![
        "--base".as_ref(),
        base.as_os_str(),
        "--batch".as_ref(),
        jobs.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    run_limited("boft-merge", &args)
}

#[test]
fn a52_hostile_jobs_file() {
    // A jobs file is a list of outputs and adapters from whoever wrote it: malformed JSON,
    // unknown keys, 257 jobs, 17 MiB of padding, a FIFO, two jobs writing one output under two
    // spellings, an output that is an input, and an adapter option that does not exist are each
    // one line, nothing written.
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let jobs = sc.path("in/jobs.json");
    let job = |o: &Path| serde_json::json!({"output": o, "adapters": [adapter]});
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "{\"jobs\": [".into(), "not a jobs file"),
        (
            "unknown key",
            serde_json::json!({"jobs": [{"output": out, "adapter": adapter}]}).to_string(),
            "unknown field",
        ),
        (
            "too many",
            serde_json::json!({"jobs": (0..257).map(|i| job(&out.with_extension(i.to_string()))).collect::<Vec<_>>()}).to_string(),
            "257 jobs",
        ),
        (
            "huge",
            format!("{}{}", " ".repeat(17 << 20), serde_json::json!({"jobs": [job(&out)]})),
            "not a jobs file",
        ),
        (
            "same output twice",
            serde_json::json!({"jobs": [job(&out), job(&out.parent().unwrap().join(".").join(out.file_name().unwrap()))]}).to_string(),
            "write the same output",
        ),
        (
            "output is the base",
            serde_json::json!({"jobs": [job(&base)]}).to_string(),
            "",
        ),
        (
            "bad option",
            serde_json::json!({"jobs": [{"output": out, "adapters": [format!("{},strenght=2", adapter.display())]}]}).to_string(),
            "unknown adapter option",
        ),
        (
            "no adapters",
            serde_json::json!({"jobs": [{"output": out}]}).to_string(),
            "no adapters",
        ),
    ];
    for (what, text, says) in cases {
        std::fs::write(&jobs, &text).unwrap();
        let o = batch(&mut sc, &base, &jobs, &out, &[&adapter], &[]);
        eprintln!("{what}:");
        let existed = what == "output is the base";
        let class = if existed { "output-is-input" } else { "usage" };
        let target = if existed { base.clone() } else { out.clone() };
        sc.assert_refused_keep(&o, class, &target, existed);
        assert!(stderr(&o).contains(says), "{what}: {}", stderr(&o));
    }
    std::fs::remove_file(&jobs).unwrap();
    mkfifo(&jobs);
    let o = batch(&mut sc, &base, &jobs, &out, &[&adapter], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn a53_switch_with_a_linear_unmerge() {
    // `--unmerge-adapter A,strength=0.5 --adapter B`: a linear blend has no structured inverse;
    // refused before any output exists, as `--unmerge` at a linear strength is.
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let half = format!("{},strength=0.5", adapter.display());
    sc.freeze(&[&base, &adapter], &out);
    let o = run_limited(
        "boft-merge",
        &[
            "--base".as_ref(),
            base.as_os_str(),
            "--unmerge-adapter".as_ref(),
            half.as_ref(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "-o".as_ref(),
            out.as_os_str(),
        ],
    );
    sc.assert_refused(&o, "usage", &out);
    assert!(
        stderr(&o).contains("no structured inverse"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a54_batch_outputs_checked_before_any_is_moved() {
    // A batch on a file base with --force: job 2's output is an existing folder (a file is
    // expected), job 3's lies inside job 1's, or one job writes over the jobs file. Each is
    // refused before any output is moved into place: job 1's output does not appear and what
    // was there is untouched.
    let mut sc = Scene::new();
    let (base, adapter, out) = conv(&sc);
    let folder = sc.path("out/existing");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("keep"), b"keep").unwrap();
    let jobs = sc.path("in/jobs.json");
    let job = |o: &Path| json!({"output": o, "adapters": [adapter]});
    // An existing folder the first job replaces (--force), which the second job writes into.
    let nested = sc.path("out/dir");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(nested.join("keep"), b"keep").unwrap();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "existing folder",
            json!({"jobs": [job(&out), job(&folder)]}),
            "output-exists",
            "expected a file",
        ),
        (
            "nested",
            json!({"jobs": [job(&nested), job(&nested.join("inner.safetensors"))]}),
            "usage",
            "one inside the other",
        ),
        (
            "jobs file",
            json!({"jobs": [job(&out), job(&jobs)]}),
            "output-is-input",
            "output is the input",
        ),
    ];
    for (what, spec, class, says) in cases {
        std::fs::write(&jobs, spec.to_string()).unwrap();
        let also = [adapter.as_path(), &folder, &nested];
        let o = batch(&mut sc, &base, &jobs, &out, &also, &["--force"]);
        eprintln!("{what}:");
        sc.assert_refused(&o, class, &out);
        assert!(stderr(&o).contains(says), "{what}: {}", stderr(&o));
    }
}

#[test]
fn a55_canonical_records_sharing_a_key() {
    // 200 target records naming one key (one blocks tensor): each record decoded the same bytes
    // again (the report's 8 MB file became 1.7 GB). A key belongs to one record.
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    let adapter = canon_file(
        &sc,
        vec![canon_target(
            "fc.weight",
            boft::adapter::Side::Input,
            1,
            4,
            12,
        )],
    );
    edit_header(&adapter, |h| {
        let meta = h["__metadata__"].as_object_mut().unwrap();
        let targets: Vec<Value> = serde_json::from_str(meta["targets"].as_str().unwrap()).unwrap();
        let many: Vec<Value> = (0..200).map(|_| targets[0].clone()).collect();
        meta["targets"] = Value::String(serde_json::to_string(&many).unwrap());
    });
    let o = sc.merge(&base, &adapter, &out, &[]);
    sc.assert_refused(&o, "bad-adapter", &out);
    assert!(stderr(&o).contains("used by two records"), "{}", stderr(&o));
}

#[test]
fn a56_one_adapter_named_many_times() {
    // A 64-factor adapter named five times on the command line: every factor is applied to
    // every row, so one pass applies at most 256 factors to a tensor; an adapter named again
    // builds its chains once (four times still merges, in the memory of one).
    use boft::adapter::Side;
    let mut sc = Scene::new();
    let (base, _, out) = conv(&sc);
    let adapter = canon_file(&sc, vec![canon_target("fc.weight", Side::Input, 64, 4, 12)]);
    sc.freeze(&[&base, &adapter], &out);
    let times = |n: usize| {
        let mut args: Vec<&OsStr> = vec!["--base".as_ref(), base.as_os_str(), "-o".as_ref()];
        args.push(out.as_os_str());
        for _ in 0..n {
            args.extend(["--adapter".as_ref(), adapter.as_os_str()]);
        }
        run_limited("boft-merge", &args)
    };
    let o = times(5);
    sc.assert_refused(&o, "usage", &out);
    assert!(stderr(&o).contains("320 factors"), "{}", stderr(&o));
    let o = times(4);
    assert!(o.status.success(), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------
// boft-extract: a base and a fine-tuned checkpoint
// ---------------------------------------------------------------------------------------------

/// The tiny fine-tune (fixtures/extract) copied into a scene: base, tuned, output.
fn extract_scene(sc: &Scene) -> (PathBuf, PathBuf, PathBuf) {
    let copy = |rel: &str| {
        let dst = sc.path(&format!("in/{rel}"));
        copy_tree(&fixtures().join("extract").join(rel), &dst);
        dst.join("model.safetensors")
    };
    (
        copy("base"),
        copy("tuned"),
        sc.out_dir().join("a.safetensors"),
    )
}

fn extract(sc: &mut Scene, base: &Path, tuned: &Path, out: &Path, extra: &[&str]) -> Output {
    sc.freeze(&[base, tuned], out);
    let mut args: Vec<&OsStr> = vec![
        "--base".as_ref(),
        base.as_os_str(),
        "--tuned".as_ref(),
        tuned.as_os_str(),
        "-o".as_ref(),
        out.as_os_str(),
        "--side".as_ref(),
        "input".as_ref(),
    ];
    args.extend(extra.iter().map(|s| OsStr::new(*s)));
    run_limited("boft-extract", &args)
}

#[test]
fn a57_checkpoints_that_do_not_pair() {
    // A tensor only one side holds, or held with another shape: not the same model.
    let q = "model.layers.0.self_attn.q_proj.weight";
    let mut sc = Scene::new();
    let (base, tuned, out) = extract_scene(&sc);
    let mut st = St::read(&tuned);
    st.tensors.retain(|t| t.0 != q);
    st.write(&tuned);
    let o = extract(&mut sc, &base, &tuned, &out, &["--block-size", "8"]);
    sc.assert_refused(&o, "missing-target", &out);
    assert!(stderr(&o).contains(q), "{}", stderr(&o));
    let o = extract(&mut sc, &tuned, &base, &out, &["--block-size", "8"]);
    sc.assert_refused(&o, "missing-target", &out);

    let mut sc = Scene::new();
    let (base, tuned, out) = extract_scene(&sc);
    let mut st = St::read(&tuned);
    st.tensor_mut(q).2 = vec![16, 64];
    st.write(&tuned);
    let o = extract(&mut sc, &base, &tuned, &out, &["--block-size", "8"]);
    sc.assert_refused(&o, "shape-mismatch", &out);
}

#[test]
fn a58_a_non_finite_weight_to_fit() {
    // One NaN would make every cross product of its tensor NaN and the fit meaningless.
    let mut sc = Scene::new();
    let (base, tuned, out) = extract_scene(&sc);
    let mut st = St::read(&tuned);
    st.tensor_mut("model.layers.1.mlp.up_proj.weight").3[40..44]
        .copy_from_slice(&f32::NAN.to_le_bytes());
    st.write(&tuned);
    let o = extract(&mut sc, &base, &tuned, &out, &["--block-size", "8"]);
    sc.assert_refused(&o, "non-finite", &out);
    assert!(stderr(&o).contains("up_proj"), "{}", stderr(&o));
}

#[test]
fn a59_a_block_past_the_extraction_limit() {
    // Cross products of n × b f64 per thread and b³ per block: a 2^20-wide block, or a sweep or
    // ceiling that asks for one, is refused before anything is read.
    let mut sc = Scene::new();
    let (base, tuned, out) = extract_scene(&sc);
    for extra in [
        &["--block-size", "1048576"][..],
        &["--sweep", "b=8,1048576"][..],
        &["--sweep", "b=8", "--ceiling-max", "1048576"][..],
        &["--sweep", "m=2"][..],
        &["--block-size", "8", "--tol", "nan"][..],
    ] {
        let o = extract(&mut sc, &base, &tuned, &out, extra);
        sc.assert_refused(&o, "usage", &out);
    }
}
