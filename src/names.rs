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

/// Prefixes of flattened names (kohya, LyCORIS, A1111), longest first where one extends another,
/// with the containers their modules live in within single-file and diffusers checkpoints (used
/// only to choose between several matches: SDXL's two text encoders share HF module names).
const PREFIXES: &[(&str, &[&str])] = &[
    (
        "lora_unet_",
        &["model.diffusion_model.", "unet.", "transformer."],
    ),
    ("lora_te1_", &["conditioner.embedders.0.", "text_encoder."]),
    (
        "lora_te2_",
        &["conditioner.embedders.1.", "text_encoder_2."],
    ),
    (
        "lora_te_",
        &[
            "cond_stage_model.",
            "conditioner.embedders.0.",
            "text_encoder.",
        ],
    ),
    // LyCORIS builds its networks on a U-Net/transformer or a text encoder, never on the VAE
    // (whose encoder and decoder have a `conv_in` too).
    (
        "lycoris_",
        &[
            "model.diffusion_model.",
            "unet.",
            "transformer.",
            "cond_stage_model.",
            "conditioner.embedders.",
            "text_encoder.",
            "text_encoder_2.",
        ],
    ),
    (
        "oft_unet_",
        &["model.diffusion_model.", "unet.", "transformer."],
    ),
];

/// The longest dotted suffix of a base tensor's module path an adapter name is matched against
/// (besides the whole path). Real module paths have a few dozen components at most; a name with
/// more (a hostile header) is still matched whole and by its last 64 components, and indexing
/// it costs at most 65 times its length.
pub const MAX_SUFFIX_PARTS: usize = 64;

/// A flattened module name without its kohya/LyCORIS/A1111 prefix, if it has one.
pub fn strip_flat_prefix(name: &str) -> Option<&str> {
    PREFIXES.iter().find_map(|(p, _)| name.strip_prefix(p))
}

/// A base tensor an adapter name can denote: the whole tensor, or part k of p equal row slices
/// of a fused weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Hit<'a> {
    name: &'a str,
    part: Option<(usize, usize)>,
}

/// Rename every target whose name is not a base tensor to the one base tensor it denotes (and,
/// for q/k/v of a fused `in_proj_weight`, its row slice). With `strict` a name that resolves to
/// none or to several is an error; otherwise it is left as it is (for `boft-verify`, which
/// reports it as a failed check).
pub fn resolve(base: &Checkpoint, adapter: &mut Adapter, strict: bool) -> Result<()> {
    resolve_in(base, adapter, strict, None)
}

/// Where a component's tensors live: in a pipeline, its folder (`<component>.`); in a
/// single-file checkpoint, the containers the original (LDM / SGM) layouts use for it.
pub fn component_prefixes(base: &Checkpoint, component: &str) -> Vec<String> {
    let own = format!("{component}.");
    if matches!(base.layout, crate::checkpoint::Layout::Pipeline) {
        return vec![own];
    }
    let known: &[&str] = match component {
        "unet" => &["model.diffusion_model.", "unet."],
        "transformer" => &["model.diffusion_model.", "transformer."],
        "text_encoder" => &[
            "cond_stage_model.",
            "conditioner.embedders.0.",
            "text_encoder.",
        ],
        "text_encoder_2" => &["conditioner.embedders.1.", "text_encoder_2."],
        "vae" => &["first_stage_model.", "vae."],
        _ => &[],
    };
    let mut out: Vec<String> = known.iter().map(|p| p.to_string()).collect();
    if !out.contains(&own) {
        out.push(own);
    }
    out
}

/// `resolve`, with names that do not match a base tensor exactly looked up only among the
/// tensors of `component` (`--component`), for names that several components share.
pub fn resolve_in(
    base: &Checkpoint,
    adapter: &mut Adapter,
    strict: bool,
    component: Option<&str>,
) -> Result<()> {
    let scope: Option<Vec<String>> = component.map(|c| component_prefixes(base, c));
    let in_scope = |name: &str| {
        scope
            .as_ref()
            .is_none_or(|s| s.iter().any(|p| name.starts_with(p.as_str())))
    };
    if let Some(c) = component {
        if !base.tensor_names().any(in_scope) {
            return Err(err(
                Class::Usage,
                &base.root,
                format!(
                    "--component {c}: no tensor of the base lies in it (looked for names starting \
                     with {})",
                    scope.as_deref().unwrap_or_default().join(", ")
                ),
            ));
        }
    }
    if adapter.targets.iter().all(|t| base.get(&t.name).is_some()) {
        return Ok(());
    }
    // Only the keys the adapter looks up are indexed: indexing every dotted suffix of every base
    // name would hold many times the header in memory (a million tensors of five components:
    // five million keys) to answer a few hundred questions.
    let mut index: HashMap<String, BTreeSet<Hit>> = HashMap::new();
    for t in adapter
        .targets
        .iter()
        .filter(|t| base.get(&t.name).is_none())
    {
        for (key, _) in lookup_keys(&t.name) {
            index.entry(key).or_default();
        }
    }
    let mut add = |key: String, name, part| {
        if let Some(hits) = index.get_mut(&key) {
            hits.insert(Hit { name, part });
        }
    };
    for name in base.tensor_names() {
        if let Some(stem) = name.strip_suffix(".in_proj_weight") {
            // OpenCLIP (SD 2.x, SDXL's second text encoder) fuses q, k and v; adapters name them
            // as the Hugging Face CLIP modules they were trained on.
            if let Some(layer) = stem.strip_suffix(".attn").and_then(openclip_layer) {
                for (k, x) in ["q", "k", "v"].iter().enumerate() {
                    let key = format!("text_model_encoder_layers_{layer}_self_attn_{x}_proj");
                    add(key, name, Some((k, 3)));
                }
            }
            continue;
        }
        let Some(stem) = name.strip_suffix(".weight") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('.').collect();
        // The whole path and its suffixes of at most MAX_SUFFIX_PARTS components: indexing every
        // suffix of a name with thousands of dots would cost the square of its length.
        let tail = parts.len().saturating_sub(MAX_SUFFIX_PARTS).max(1);
        add(parts.join("_"), name, None);
        for i in tail..parts.len() {
            add(parts[i..].join("_"), name, None);
        }
        // Original (LDM) U-Net names are also known by their diffusers names, which kohya and
        // LyCORIS use for SD 1.x/2.x.
        if let Some(alias) = parts
            .iter()
            .position(|p| {
                matches!(
                    *p,
                    "input_blocks" | "middle_block" | "output_blocks" | "time_embed" | "out"
                )
            })
            .filter(|&i| i == 0 || parts[i - 1] == "diffusion_model")
            .and_then(|i| ldm_to_diffusers(&parts[i..]))
        {
            add(alias.replace('.', "_"), name, None);
        }
        for (openclip, hf) in [
            ("attn.out_proj", "self_attn_out_proj"),
            ("mlp.c_fc", "mlp_fc1"),
            ("mlp.c_proj", "mlp_fc2"),
        ] {
            if let Some(layer) = stem
                .strip_suffix(openclip)
                .and_then(|s| s.strip_suffix('.'))
                .and_then(openclip_layer)
            {
                add(
                    format!("text_model_encoder_layers_{layer}_{hf}"),
                    name,
                    None,
                );
            }
        }
    }
    for t in &mut adapter.targets {
        if base.get(&t.name).is_some() {
            continue;
        }
        let hits: Option<Vec<Hit>> = lookup_keys(&t.name).iter().find_map(|(c, hint)| {
            let set: Vec<Hit> = index
                .get(c)?
                .iter()
                .copied()
                .filter(|h| in_scope(h.name))
                .collect();
            if set.is_empty() {
                return None;
            }
            let within: Vec<Hit> = set
                .iter()
                .copied()
                .filter(|h| hint.iter().any(|p| h.name.starts_with(p)))
                .collect();
            Some(if set.len() > 1 && within.len() == 1 {
                within
            } else {
                set
            })
        });
        match hits.as_deref() {
            Some([hit]) => {
                if let Some((k, p)) = hit.part {
                    let rows = base.get(hit.name).map_or(0, |(_, i)| i.shape[0]);
                    if t.side != crate::adapter::Side::Output
                        || t.rows.is_some()
                        || !rows.is_multiple_of(p)
                    {
                        return Err(err(
                            Class::ShapeMismatch,
                            &base.root,
                            format!(
                                "adapter module {:?} denotes part {} of {} of the fused {}; only \
                                 an output-side transform of the whole module can rotate it",
                                t.module,
                                k + 1,
                                p,
                                hit.name
                            ),
                        ));
                    }
                    t.rows = Some((k * rows / p, (k + 1) * rows / p));
                }
                t.name = hit.name.to_string();
            }
            _ if !strict => {}
            Some(set) => {
                let names: Vec<&str> = set.iter().map(|h| h.name).take(4).collect();
                return Err(err(
                    Class::MissingTarget,
                    &base.root,
                    format!(
                        "adapter module {:?} matches {} base tensors ({}{}); it cannot be resolved \
                         unambiguously (--component names the model it belongs to)",
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
                        "adapter module {:?} is not in the base checkpoint (no tensor {:?}, and no \
                         base weight whose flattened name matches)",
                        t.module, t.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The keys an adapter name is looked up by, in order: its flattened form, then that form
/// without each kohya/LyCORIS/A1111 prefix it carries (with the containers the prefix hints at).
fn lookup_keys(name: &str) -> Vec<(String, &'static [&'static str])> {
    let flat = name
        .strip_suffix(".weight")
        .unwrap_or(name)
        .replace('.', "_");
    let mut keys: Vec<(String, &'static [&'static str])> = PREFIXES
        .iter()
        .filter_map(|(p, hint)| flat.strip_prefix(p).map(|rest| (rest.to_string(), *hint)))
        .collect();
    keys.insert(0, (flat, &[]));
    keys
}

/// The layer number of an OpenCLIP `…transformer.resblocks.<N>` path.
fn openclip_layer(path: &str) -> Option<usize> {
    let (head, n) = path.rsplit_once('.')?;
    head.ends_with("transformer.resblocks")
        .then(|| n.parse().ok())
        .flatten()
}

/// The diffusers name of an SD 1.x/2.x U-Net module given by its original (LDM) path, following
/// the layout both use (two resnets per down level, three per up level): `input_blocks.k` is
/// level `(k−1)/3`, item `(k−1)%3` (item 2 being the downsampler), `output_blocks.k` is level
/// `k/3`, item `k%3`, and resnets rename their layers.
pub fn ldm_to_diffusers(parts: &[&str]) -> Option<String> {
    let num = |s: &str| s.parse::<usize>().ok();
    let resnet = |rest: &[&str]| -> Option<String> {
        let (head, tail) = match rest {
            ["in_layers", "0", t @ ..] => ("norm1", t),
            ["in_layers", "2", t @ ..] => ("conv1", t),
            ["emb_layers", "1", t @ ..] => ("time_emb_proj", t),
            ["out_layers", "0", t @ ..] => ("norm2", t),
            ["out_layers", "3", t @ ..] => ("conv2", t),
            ["skip_connection", t @ ..] => ("conv_shortcut", t),
            _ => return None,
        };
        Some(
            std::iter::once(head)
                .chain(tail.iter().copied())
                .collect::<Vec<_>>()
                .join("."),
        )
    };
    let join = |head: String, rest: &[&str]| {
        std::iter::once(head.as_str())
            .chain(rest.iter().copied())
            .collect::<Vec<_>>()
            .join(".")
    };
    match parts {
        ["time_embed", "0", rest @ ..] => Some(join("time_embedding.linear_1".into(), rest)),
        ["time_embed", "2", rest @ ..] => Some(join("time_embedding.linear_2".into(), rest)),
        ["out", "0", rest @ ..] => Some(join("conv_norm_out".into(), rest)),
        ["out", "2", rest @ ..] => Some(join("conv_out".into(), rest)),
        ["input_blocks", "0", "0", rest @ ..] => Some(join("conv_in".into(), rest)),
        ["input_blocks", k, "0", "op", rest @ ..] => {
            let k = num(k)?;
            (k % 3 == 0).then(|| {
                join(
                    format!("down_blocks.{}.downsamplers.0.conv", k / 3 - 1),
                    rest,
                )
            })
        }
        ["input_blocks", k, "0", rest @ ..] => {
            let k = num(k)?.checked_sub(1)?;
            Some(format!(
                "down_blocks.{}.resnets.{}.{}",
                k / 3,
                k % 3,
                resnet(rest)?
            ))
        }
        ["input_blocks", k, "1", rest @ ..] => {
            let k = num(k)?.checked_sub(1)?;
            Some(join(
                format!("down_blocks.{}.attentions.{}", k / 3, k % 3),
                rest,
            ))
        }
        ["middle_block", "1", rest @ ..] => Some(join("mid_block.attentions.0".into(), rest)),
        ["middle_block", j @ ("0" | "2"), rest @ ..] => Some(format!(
            "mid_block.resnets.{}.{}",
            num(j)? / 2,
            resnet(rest)?
        )),
        ["output_blocks", k, "0", rest @ ..] => {
            let k = num(k)?;
            Some(format!(
                "up_blocks.{}.resnets.{}.{}",
                k / 3,
                k % 3,
                resnet(rest)?
            ))
        }
        ["output_blocks", k, _, "conv", rest @ ..] => {
            let k = num(k)?;
            (k % 3 == 2).then(|| join(format!("up_blocks.{}.upsamplers.0.conv", k / 3), rest))
        }
        ["output_blocks", k, "1", rest @ ..] => {
            let k = num(k)?;
            Some(join(
                format!("up_blocks.{}.attentions.{}", k / 3, k % 3),
                rest,
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::ldm_to_diffusers;

    fn map(s: &str) -> Option<String> {
        ldm_to_diffusers(&s.split('.').collect::<Vec<_>>())
    }

    #[test]
    fn sd_unet_table() {
        let cases = [
            ("input_blocks.0.0", "conv_in"),
            (
                "input_blocks.1.0.in_layers.2",
                "down_blocks.0.resnets.0.conv1",
            ),
            (
                "input_blocks.2.1.proj_in",
                "down_blocks.0.attentions.1.proj_in",
            ),
            ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
            (
                "input_blocks.4.0.skip_connection",
                "down_blocks.1.resnets.0.conv_shortcut",
            ),
            (
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            ),
            (
                "input_blocks.11.0.emb_layers.1",
                "down_blocks.3.resnets.1.time_emb_proj",
            ),
            ("middle_block.0.out_layers.3", "mid_block.resnets.0.conv2"),
            ("middle_block.1.proj_out", "mid_block.attentions.0.proj_out"),
            ("middle_block.2.in_layers.0", "mid_block.resnets.1.norm1"),
            ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
            ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
            (
                "output_blocks.4.1.proj_in",
                "up_blocks.1.attentions.1.proj_in",
            ),
            (
                "output_blocks.8.0.out_layers.0",
                "up_blocks.2.resnets.2.norm2",
            ),
            ("time_embed.2", "time_embedding.linear_2"),
            ("out.2", "conv_out"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(map(ldm).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(map("input_blocks.2.0.op"), None);
    }
}
