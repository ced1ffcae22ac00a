//! The candle backend (on candle's CPU device) gives the native CPU path's results through the
//! real binary: f32 within 1e-6 relative, 16-bit within one ulp.
#![cfg(feature = "candle")]

mod common;

use boft::checkpoint::Dtype;
use common::*;

#[test]
fn candle_backend_matches_native_merge() {
    let fx = fixtures().join("peft_boft");
    for c in peft_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let base = c.base_path();
        let name = |s: &str| {
            if base.is_dir() {
                tmp.path().join(s)
            } else {
                tmp.path().join(format!("{s}.safetensors"))
            }
        };
        let (native, dev) = (name("native"), name("candle"));
        let adapter = fx.join(&c.adapter);
        ok(&run(
            "boft-merge",
            &[&"--base", &base, &"--adapter", &adapter, &"-o", &native],
        ));
        ok(&run(
            "boft-merge",
            &[
                &"--base",
                &base,
                &"--adapter",
                &adapter,
                &"-o",
                &dev,
                &"--device",
                &"candle-cpu",
            ],
        ));
        let (a, b) = (tensors(&native), tensors(&dev));
        for (k, (_, x)) in &a {
            let y = &b[k].1;
            let (xf, yf) = (x.f32(), y.f32());
            match x.dtype {
                Dtype::F32 => {
                    let e = rel_err(&yf, &xf);
                    assert!(e <= 1e-6, "{}: {k}: {e:e}", c.name);
                }
                Dtype::BF16 | Dtype::F16 => {
                    for (p, q) in xf.iter().zip(&yf) {
                        assert!(ulps(x.dtype, *p, *q) <= 1.0, "{}: {k}: {p} vs {q}", c.name);
                    }
                }
                _ => assert_eq!(x.bytes, y.bytes),
            }
        }
    }
}
