//! With the `cuda` feature, compile kernels/boft.cu into a fatbin that src/merge/cuda.rs embeds:
//! SASS for each architecture in `CUDA_COMPUTE_CAP` (comma-separated, default 90: H100/H200),
//! so a GPU of those runs it with no JIT compile on first use, and PTX of the highest one for
//! newer GPUs. Needs `nvcc` (or `$NVCC`) on PATH; see README, "GPU build". Without the feature
//! nothing is built.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/boft.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let caps: Vec<String> = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .split(',')
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect();
    assert!(
        caps.iter().all(|c| c.chars().all(|x| x.is_ascii_digit())),
        "CUDA_COMPUTE_CAP must be numbers like 90 or 80,90, not {caps:?}"
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("boft_kernels.fatbin");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "-fmad=false"]);
    for c in &caps {
        cmd.arg("-gencode")
            .arg(format!("arch=compute_{c},code=sm_{c}"));
    }
    let top = caps
        .iter()
        .max_by_key(|c| c.parse::<u32>().unwrap())
        .unwrap();
    cmd.arg("-gencode")
        .arg(format!("arch=compute_{top},code=compute_{top}"));
    cmd.arg("kernels/boft.cu").arg("-o").arg(&out);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("the cuda feature needs nvcc ({nvcc}: {e}); see README, \"GPU build\"")
    });
    assert!(status.success(), "nvcc failed on kernels/boft.cu");
}
