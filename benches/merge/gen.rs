//! Synthetic Llama-shaped checkpoints and matching PEFT BOFT adapters, written the way Hugging
//! Face writes them (config.json, `model-0000i-of-0000n.safetensors` shards cut in state-dict
//! order at a maximum shard size, tensors sorted by name inside each shard, an index with
//! `total_size`), filled with deterministic pseudo-random values generated in parallel.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dt {
    Bf16,
    F16,
    F32,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::Bf16 | Dt::F16 => 2,
            Dt::F32 => 4,
        }
    }
    pub fn st_name(self) -> &'static str {
        match self {
            Dt::Bf16 => "BF16",
            Dt::F16 => "F16",
            Dt::F32 => "F32",
        }
    }
    pub fn torch_name(self) -> &'static str {
        match self {
            Dt::Bf16 => "bfloat16",
            Dt::F16 => "float16",
            Dt::F32 => "float32",
        }
    }
    pub fn cli_name(self) -> &'static str {
        match self {
            Dt::Bf16 => "bf16",
            Dt::F16 => "f16",
            Dt::F32 => "f32",
        }
    }
}

/// Model shape and adapter geometry, shared by `gen` and `run`.
#[derive(Args, Clone, Debug)]
pub struct ShapeArgs {
    /// Hidden size.
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// MLP intermediate size (default: Llama's rule, 8/3·hidden rounded up to a multiple of 256).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads (default: hidden / 64).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (default: same as heads).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Vocabulary size (embed_tokens and an untied lm_head; neither is targeted).
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    /// Base checkpoint dtype.
    #[arg(long, value_enum, default_value_t = Dt::Bf16)]
    pub dtype: Dt,
    /// BOFT block size (boft_block_size).
    #[arg(long, default_value_t = 32)]
    pub block_size: usize,
    /// BOFT butterfly factors (boft_n_butterfly_factor); 1 is plain block-diagonal OFT.
    #[arg(long, default_value_t = 2)]
    pub factors: usize,
    /// Maximum shard size in MB (Hugging Face's 5 GB default, scaled down).
    #[arg(long, default_value_t = 100)]
    pub max_shard_mb: u64,
    /// Seed of the pseudo-random data.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct GenArgs {
    /// Target base size in MB (10^6 bytes); picks the number of layers. Ignored with --layers.
    #[arg(long, default_value_t = 230)]
    pub size: u64,
    /// Number of decoder layers (default: from --size).
    #[arg(long)]
    pub layers: Option<usize>,
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Output folder: gets base/ (the checkpoint) and adapter/ (the PEFT BOFT adapter).
    #[arg(long)]
    pub out: PathBuf,
}

/// A fully resolved model geometry.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub vocab: usize,
    pub dtype: Dt,
    pub block_size: usize,
    pub factors: usize,
    pub max_shard_bytes: u64,
    pub seed: u64,
}

pub const MODULES: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Targeted by the adapter (a linear layer's weight).
    pub target: bool,
    /// RMSNorm weight (values around 1).
    pub norm: bool,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Spec {
    pub fn resolve(shape: &ShapeArgs, size_mb: u64, layers: Option<usize>) -> Result<Spec> {
        let h = shape.hidden;
        let intermediate = shape
            .intermediate
            .unwrap_or_else(|| (8 * h / 3).div_ceil(256) * 256);
        let heads = shape.heads.unwrap_or((h / 64).max(1));
        if !h.is_multiple_of(heads) {
            bail!("hidden {h} is not divisible by {heads} heads");
        }
        let kv_heads = shape.kv_heads.unwrap_or(heads);
        if !heads.is_multiple_of(kv_heads) {
            bail!("{heads} heads are not divisible by {kv_heads} key/value heads");
        }
        let mut spec = Spec {
            hidden: h,
            intermediate,
            heads,
            kv_heads,
            head_dim: h / heads,
            layers: 1,
            vocab: shape.vocab,
            dtype: shape.dtype,
            block_size: shape.block_size,
            factors: shape.factors,
            max_shard_bytes: shape.max_shard_mb * 1_000_000,
            seed: shape.seed,
        };
        spec.layers = match layers {
            Some(l) => l.max(1),
            None => {
                let fixed = spec.fixed_bytes() as f64;
                let per = spec.layer_bytes() as f64;
                (((size_mb as f64 * 1e6 - fixed) / per).round() as i64).max(1) as usize
            }
        };
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<()> {
        let (b, f) = (self.block_size, self.factors);
        if b == 0 || f == 0 {
            bail!("block size and factors must be positive");
        }
        for (m, n_in, _) in self.linear_shapes() {
            if n_in % b != 0 {
                bail!("{m}: {n_in} input features are not a multiple of block size {b}");
            }
            let blocks = n_in / b;
            let need = 1usize << (f - 1);
            if f > 1 && (b % 2 != 0 || blocks % need != 0) {
                bail!(
                    "{m}: {f} butterfly factors need an even block size and a block count \
                     divisible by {need}; {n_in} features give {blocks} blocks of {b}"
                );
            }
        }
        Ok(())
    }

    /// (module, in_features, out_features) of each targeted linear layer.
    pub fn linear_shapes(&self) -> Vec<(&'static str, usize, usize)> {
        let (h, i) = (self.hidden, self.intermediate);
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        vec![
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]
    }

    fn layer_bytes(&self) -> u64 {
        let lin: usize = self.linear_shapes().iter().map(|(_, a, b)| a * b).sum();
        ((lin + 2 * self.hidden) * self.dtype.size()) as u64
    }

    fn fixed_bytes(&self) -> u64 {
        ((2 * self.vocab * self.hidden + self.hidden) * self.dtype.size()) as u64
    }

    pub fn total_bytes(&self) -> u64 {
        self.fixed_bytes() + self.layers as u64 * self.layer_bytes()
    }

    /// Folder name that identifies this geometry (generated data is reused when it matches).
    pub fn tag(&self) -> String {
        format!(
            "{}-h{}-i{}-l{}-v{}-b{}-f{}-s{}-shard{}",
            self.dtype.cli_name(),
            self.hidden,
            self.intermediate,
            self.layers,
            self.vocab,
            self.block_size,
            self.factors,
            self.seed,
            self.max_shard_bytes / 1_000_000
        )
    }

    /// Base tensors in `state_dict()` order.
    pub fn tensors(&self) -> Vec<Tensor> {
        let h = self.hidden;
        let mut v = vec![Tensor {
            name: "model.embed_tokens.weight".into(),
            shape: vec![self.vocab, h],
            target: false,
            norm: false,
        }];
        let shapes = self.linear_shapes();
        for l in 0..self.layers {
            for ((block, m), (_, n_in, n_out)) in MODULES.iter().zip(&shapes) {
                v.push(Tensor {
                    name: format!("model.layers.{l}.{block}.{m}.weight"),
                    shape: vec![*n_out, *n_in],
                    target: true,
                    norm: false,
                });
            }
            for n in ["input_layernorm", "post_attention_layernorm"] {
                v.push(Tensor {
                    name: format!("model.layers.{l}.{n}.weight"),
                    shape: vec![h],
                    target: false,
                    norm: true,
                });
            }
        }
        v.push(Tensor {
            name: "model.norm.weight".into(),
            shape: vec![h],
            target: false,
            norm: true,
        });
        v.push(Tensor {
            name: "lm_head.weight".into(),
            shape: vec![self.vocab, h],
            target: false,
            norm: false,
        });
        v
    }

    pub fn largest_tensor_bytes(&self, targeted_only: bool) -> u64 {
        self.tensors()
            .iter()
            .filter(|t| t.target || !targeted_only)
            .map(|t| (t.numel() * self.dtype.size()) as u64)
            .max()
            .unwrap_or(0)
    }

    pub fn config_json(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "dtype": self.dtype.torch_name(),
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": null,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "transformers_version": "4.57.6",
            "use_cache": true,
            "vocab_size": self.vocab
        })
    }

    pub fn adapter_config_json(&self, base: &Path) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": base.to_string_lossy(),
            "bias": "none",
            "boft_block_num": 0,
            "boft_block_size": self.block_size,
            "boft_dropout": 0.0,
            "boft_n_butterfly_factor": self.factors,
            "exclude_modules": null,
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_weights": false,
            "layers_pattern": null,
            "layers_to_transform": null,
            "modules_to_save": null,
            "peft_type": "BOFT",
            "peft_version": "0.21.2",
            "revision": null,
            "target_modules": MODULES.iter().map(|(_, m)| *m).collect::<Vec<_>>(),
            "task_type": null
        })
    }
}

// ------------------------------------------------------------------------------------------
// Pseudo-random data
// ------------------------------------------------------------------------------------------

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn name_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values elements per independently seeded chunk: generation is parallel and deterministic.
const GEN_CHUNK: usize = 1 << 16;

/// Fill `out` (little-endian `dt` elements) with `center + uniform(-half, half)`.
fn fill(out: &mut [u8], dt: Dt, seed: u64, center: f32, half: f32) {
    let es = dt.size();
    out.par_chunks_mut(GEN_CHUNK * es)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let mut s = splitmix(seed ^ (ci as u64).wrapping_mul(0xA076_1D64_78BD_642F));
            let mut next = || {
                // xorshift64*: fast, good enough for weights nobody trains on.
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                s.wrapping_mul(0x2545_F491_4F6C_DD1D)
            };
            let val = |bits: u32| -> f32 {
                // 23 random mantissa bits give a float in [1, 2).
                let x = f32::from_bits(0x3F80_0000 | (bits >> 9));
                center + (x - 1.5) * 2.0 * half
            };
            for pair in chunk.chunks_mut(2 * es) {
                let r = next();
                for (k, e) in pair.chunks_mut(es).enumerate() {
                    let v = val((r >> (32 * k)) as u32);
                    match dt {
                        Dt::F32 => e.copy_from_slice(&v.to_le_bytes()),
                        Dt::Bf16 => {
                            let b = v.to_bits();
                            let r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16;
                            e.copy_from_slice(&(r as u16).to_le_bytes());
                        }
                        Dt::F16 => {
                            e.copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
                        }
                    }
                }
            }
        });
}

// ------------------------------------------------------------------------------------------
// safetensors writing
// ------------------------------------------------------------------------------------------

/// One tensor to write: name, dtype, shape, and how to fill it.
struct Entry {
    name: String,
    dt: Dt,
    shape: Vec<usize>,
    center: f32,
    half: f32,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dt.size()
    }
}

/// Write a safetensors file the way the reference writer does: tensors sorted by name (all of
/// one dtype here), metadata `{"format": "pt"}`, header padded with spaces to 8 bytes.
fn write_safetensors(
    path: &Path,
    mut entries: Vec<Entry>,
    seed: u64,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for e in &entries {
        let n = e.bytes();
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dt.st_name(), "shape": e.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    for e in &entries {
        buf.resize(e.bytes(), 0);
        fill(buf, e.dt, seed ^ name_hash(&e.name), e.center, e.half);
        w.write_all(buf)?;
    }
    w.flush()?;
    Ok((8 + h.len() + off) as u64)
}

/// Seed of the `k`-th adapter of a geometry (1: the adapter `generate` writes; 2, 3, …: the
/// extra ones the multi-adapter runs use, made exactly like it from another seed).
fn adapter_seed(spec: &Spec, k: u64) -> u64 {
    if k <= 1 {
        spec.seed ^ 0xADA7
    } else {
        splitmix((spec.seed ^ 0xADA7).wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }
}

/// Write a PEFT BOFT adapter folder for `base` into `dir` (which must exist): PEFT key names,
/// boft_R (N, D, b, b) and boft_s (out, 1), all f32, targeting every linear layer. Returns the
/// bytes of adapter_model.safetensors.
fn write_adapter(
    spec: &Spec,
    base: &Path,
    dir: &Path,
    seed: u64,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let (b, f) = (spec.block_size, spec.factors);
    let mut entries = Vec::new();
    for l in 0..spec.layers {
        for ((block, m), (_, n_in, n_out)) in MODULES.iter().zip(spec.linear_shapes()) {
            let key = format!("base_model.model.model.layers.{l}.{block}.{m}");
            entries.push(Entry {
                name: format!("{key}.boft_R"),
                dt: Dt::F32,
                shape: vec![f, n_in / b, b, b],
                center: 0.0,
                half: 0.05,
            });
            entries.push(Entry {
                name: format!("{key}.boft_s"),
                dt: Dt::F32,
                shape: vec![n_out, 1],
                center: 1.0,
                half: 0.05,
            });
        }
    }
    let bytes = write_safetensors(&dir.join("adapter_model.safetensors"), entries, seed, buf)?;
    let base_abs = base.canonicalize().unwrap_or(base.to_path_buf());
    fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&spec.adapter_config_json(&base_abs))? + "\n",
    )?;
    Ok(bytes)
}

/// The `k`-th adapter (k ≥ 2) for the data `generate` wrote into `out`: `out/adapter-k`, the
/// same geometry as `out/adapter` with other pseudo-random values (another seed). Reused when a
/// complete one of the same geometry is there. Returns its folder and the bytes of its
/// adapter_model.safetensors.
pub fn extra_adapter(spec: &Spec, out: &Path, k: u64) -> Result<(PathBuf, u64)> {
    let dir = out.join(format!("adapter-{k}"));
    let stamp_path = out.join(format!("bench-gen-adapter-{k}.json"));
    let want = json!({ "version": 1, "tag": spec.tag(), "seed": adapter_seed(spec, k) });
    let file = dir.join("adapter_model.safetensors");
    if let Ok(s) = fs::read(&stamp_path) {
        if serde_json::from_slice::<Value>(&s).ok() == Some(want.clone()) {
            if let Ok(m) = fs::metadata(&file) {
                return Ok((dir, m.len()));
            }
        }
    }
    let _ = fs::remove_file(&stamp_path);
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    let bytes = write_adapter(
        spec,
        &out.join("base"),
        &dir,
        adapter_seed(spec, k),
        &mut Vec::new(),
    )?;
    fs::write(&stamp_path, serde_json::to_vec(&want)?)?;
    Ok((dir, bytes))
}

/// What `gen` wrote, for the runner's report.
#[derive(Clone, Debug)]
pub struct Generated {
    pub base: PathBuf,
    pub adapter: PathBuf,
    pub shards: usize,
    pub base_file_bytes: u64,
    pub adapter_bytes: u64,
    pub seconds: f64,
}

const STAMP: &str = "bench-gen.json";

fn stamp(spec: &Spec) -> Value {
    json!({ "version": 1, "tag": spec.tag(), "tensor_bytes": spec.total_bytes() })
}

fn dir_file_bytes(dir: &Path) -> Result<(u64, usize)> {
    let mut total = 0;
    let mut shards = 0;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = e.metadata()?;
        if md.is_file() {
            total += md.len();
            if e.file_name().to_string_lossy().ends_with(".safetensors") {
                shards += 1;
            }
        }
    }
    Ok((total, shards))
}

/// Write `out/base` and `out/adapter`, unless a complete copy of the same geometry is there.
pub fn generate(spec: &Spec, out: &Path, verbose: bool) -> Result<Generated> {
    let base = out.join("base");
    let adapter = out.join("adapter");
    let stamp_path = out.join(STAMP);
    if let Ok(s) = fs::read(&stamp_path) {
        if serde_json::from_slice::<Value>(&s).ok() == Some(stamp(spec)) {
            let (base_file_bytes, shards) = dir_file_bytes(&base)?;
            return Ok(Generated {
                adapter_bytes: fs::metadata(adapter.join("adapter_model.safetensors"))?.len(),
                base,
                adapter,
                shards,
                base_file_bytes,
                seconds: 0.0,
            });
        }
    }
    let t0 = Instant::now();
    let _ = fs::remove_file(&stamp_path);
    for d in [&base, &adapter] {
        if d.exists() {
            fs::remove_dir_all(d)?;
        }
        fs::create_dir_all(d)?;
    }
    let dt = spec.dtype;
    let tensors = spec.tensors();

    // Shards: Hugging Face's rule (split_torch_state_dict_into_shards): walk the state dict in
    // order, start a new shard when the next tensor would overflow the current one.
    let mut shards: Vec<Vec<&Tensor>> = vec![vec![]];
    let mut cur = 0u64;
    for t in &tensors {
        let n = (t.numel() * dt.size()) as u64;
        if cur > 0 && cur + n > spec.max_shard_bytes {
            shards.push(vec![]);
            cur = 0;
        }
        shards.last_mut().unwrap().push(t);
        cur += n;
    }
    let ns = shards.len();
    let mut buf = Vec::new();
    let mut weight_map = serde_json::Map::new();
    let mut written = 0u64;
    // Weights ~ uniform with std 0.02; norms ~ 1 ± 0.1.
    let w_half = 0.02 * 3f32.sqrt();
    for (i, shard) in shards.iter().enumerate() {
        let file = if ns == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, ns)
        };
        let entries = shard
            .iter()
            .map(|t| {
                weight_map.insert(t.name.clone(), json!(file));
                Entry {
                    name: t.name.clone(),
                    dt,
                    shape: t.shape.clone(),
                    center: if t.norm { 1.0 } else { 0.0 },
                    half: if t.norm { 0.1 } else { w_half },
                }
            })
            .collect();
        written += write_safetensors(&base.join(&file), entries, spec.seed, &mut buf)?;
        if verbose {
            eprint!(
                "\r  gen: shard {}/{ns} ({:.0} MB)   ",
                i + 1,
                written as f64 / 1e6
            );
        }
    }
    if verbose {
        eprintln!();
    }
    let params: usize = tensors.iter().map(Tensor::numel).sum();
    if ns > 1 {
        let mut wm: Vec<_> = weight_map.into_iter().collect();
        wm.sort_by(|a, b| a.0.cmp(&b.0));
        let index = json!({
            "metadata": {"total_parameters": params, "total_size": spec.total_bytes()},
            "weight_map": Value::Object(wm.into_iter().collect()),
        });
        fs::write(
            base.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)? + "\n",
        )?;
    }
    fs::write(
        base.join("config.json"),
        serde_json::to_string_pretty(&spec.config_json())? + "\n",
    )?;

    let adapter_bytes = write_adapter(spec, &base, &adapter, adapter_seed(spec, 1), &mut buf)?;
    fs::write(&stamp_path, serde_json::to_vec(&stamp(spec))?)?;
    let (base_file_bytes, shards) = dir_file_bytes(&base)?;
    Ok(Generated {
        base,
        adapter,
        shards,
        base_file_bytes,
        adapter_bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

pub fn main(args: GenArgs) -> Result<()> {
    let spec = Spec::resolve(&args.shape, args.size, args.layers)?;
    fs::create_dir_all(&args.out)?;
    let g = generate(&spec, &args.out, true)?;
    println!(
        "{}: {} layers, hidden {}, intermediate {}, {} {}; base {:.1} MB in {} shard(s); adapter {:.1} MB \
         (BOFT b={}, {} factors, {} targets) in {:.1} s",
        args.out.display(),
        spec.layers,
        spec.hidden,
        spec.intermediate,
        spec.dtype.cli_name(),
        spec.tag(),
        g.base_file_bytes as f64 / 1e6,
        g.shards,
        g.adapter_bytes as f64 / 1e6,
        spec.block_size,
        spec.factors,
        spec.layers * MODULES.len(),
        g.seconds
    );
    Ok(())
}
