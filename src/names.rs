//! Resolving adapter module names against the base checkpoint. Importers keep names as their
//! files spell them; a name that is not a base tensor is looked up here, never by splitting on
//! underscores (`to_q`, `proj_in` and `mid_block` contain them): every base weight's module path
//! and each of its dotted suffixes (which drop container prefixes such as
//! `model.diffusion_model.`) is flattened the way LyCORIS and kohya flatten names, and the
//! adapter's flattened name must match exactly one base tensor.

use std::collections::{BTreeSet, HashMap};

use crate::adapter::Adapter;
use crate::checkpoint::Checkpoint;
use crate::error::{err, Class, Result};

/// Prefixes of flattened names (kohya, LyCORIS, A1111), longest first where one extends another.
const PREFIXES: &[&str] = &[
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "lycoris_",
    "oft_unet_",
];

/// Rename every target whose name is not a base tensor to the one base tensor it denotes.
pub fn resolve(base: &Checkpoint, adapter: &mut Adapter) -> Result<()> {
    if adapter.targets.iter().all(|t| base.get(&t.name).is_some()) {
        return Ok(());
    }
    let mut index: HashMap<String, BTreeSet<&str>> = HashMap::new();
    for name in base.tensor_names() {
        let Some(stem) = name.strip_suffix(".weight") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('.').collect();
        for i in 0..parts.len() {
            index.entry(parts[i..].join("_")).or_default().insert(name);
        }
    }
    for t in &mut adapter.targets {
        if base.get(&t.name).is_some() {
            continue;
        }
        let flat = t
            .name
            .strip_suffix(".weight")
            .unwrap_or(&t.name)
            .replace('.', "_");
        let mut candidates = vec![flat.as_str()];
        candidates.extend(PREFIXES.iter().filter_map(|p| flat.strip_prefix(p)));
        let hit = candidates.iter().find_map(|c| index.get(*c));
        match hit {
            Some(set) if set.len() == 1 => {
                t.name = set.iter().next().unwrap().to_string();
            }
            Some(set) => {
                let names: Vec<&str> = set.iter().copied().take(4).collect();
                return Err(err(
                    Class::MissingTarget,
                    &base.root,
                    format!(
                        "adapter module {:?} matches {} base tensors ({}{}); it cannot be resolved \
                         unambiguously",
                        t.module,
                        set.len(),
                        names.join(", "),
                        if set.len() > 4 { ", …" } else { "" }
                    ),
                ));
            }
            None => {
                return Err(err(
                    Class::MissingTarget,
                    &base.root,
                    format!(
                        "adapter module {:?} resolves to no tensor of the base checkpoint",
                        t.module
                    ),
                ));
            }
        }
    }
    Ok(())
}
