//! Checks shared by the adapter targets, on an adapter an importer accepted.

use boft::adapter::{canonical, Adapter, Side};
use boft::checkpoint::{Dtype, SafeFile};
use boft::math::kernel::Scratch;

/// Largest vector the targets transform (keeps one execution cheap).
const MAX_N: usize = 1 << 14;

pub fn exercise(adapter: &Adapter) {
    adapter.validate().expect("importers return valid adapters");
    // Round trip through the canonical file.
    let bytes = canonical::to_bytes(adapter).expect("an accepted adapter serialises");
    let f = SafeFile::from_bytes("roundtrip.safetensors", bytes).expect("our own file parses");
    let back = canonical::from_file(f).expect("our own file reads back");
    assert_eq!(back.targets.len(), adapter.targets.len());
    assert_eq!(back.replacements.len(), adapter.replacements.len());
    for (a, b) in adapter.targets.iter().zip(&back.targets) {
        assert_eq!(a.label(), b.label());
        assert_eq!(a.data.len(), b.data.len());
        assert!(a
            .data
            .iter()
            .zip(&b.data)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        assert_eq!(a.perms, b.perms);
        assert_eq!(a.scale, b.scale);
    }
    // Build and run every transform on the smallest base tensor it fits, as the merge does after
    // `check_base`.
    for t in &adapter.targets {
        let n = t.n();
        if n > MAX_N {
            continue;
        }
        let (shape, vectors) = match (t.side, t.rows) {
            (Side::Input, _) => {
                let rows = t.scale.as_ref().map_or(1, Vec::len);
                (vec![rows, n], rows.min(4))
            }
            (Side::Output, None) => (vec![n, 1], 1),
            (Side::Output, Some((_, b))) => (vec![b, 1], 1),
        };
        let shape = t.shape.clone().unwrap_or(shape);
        if t.check_base(Dtype::F32, &shape).is_err() {
            continue;
        }
        for inverse in [false, true] {
            let Ok(chain) = t.chain(inverse) else {
                continue;
            };
            // A cropped chain ends at the last block the axis reaches: its own length.
            let mut x = vec![1.0f32; vectors * chain.n];
            chain.apply_rows(&mut x, 0, vectors, &mut Scratch::default());
        }
    }
}
