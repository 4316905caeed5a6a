//! Pretrained Llama-family checkpoints into the project's own victim: a GGUF file (llama.cpp)
//! or a Hugging Face folder (`config.json`, `model.safetensors` or its shards with
//! `model.safetensors.index.json`, `tokenizer.json`). Both give a `model::Victim` of the
//! `llama` architecture (`victims::llama`) and its byte-level BPE vocabulary (`bpe`), so
//! every later stage reads one format (import-model writes it).
//!
//! Supported: the `llama` architecture with grouped-query attention, a tied or untied
//! head, any rope theta, weights in F32, F16, BF16 (both layouts) and Q8_0, Q4_0, Q4_1
//! (GGUF, dequantized to f32). Refused by name: other architectures, rope scaling,
//! attention or MLP biases, sliding-window attention, SentencePiece (and every other
//! non-byte-level-BPE) tokenizer, other quantization types.
//!
//! The rotary layout: a GGUF's query and key rows are permuted (llama.cpp's converter,
//! `permute` in convert_hf_to_gguf.py: per head, rows (2, d/2) swapped to (d/2, 2)) so that
//! llama.cpp rotates adjacent pairs; this reader applies the inverse, so the victim holds
//! the Hugging Face order whichever layout it came from.

use crate::bpe::{Bpe, BpeSpec, CONTROL, NORMAL, USER_DEFINED};
use crate::gguf::{f16_to_f32, Gguf};
use crate::tokenizer::Vocab;
use crate::victims::llama::{Llama, LlamaShape};
use crate::victims::model::{ArchConfig, Params, Victim, VictimConfig};
use anyhow::{bail, Context, Result};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Tensor};

/// A checkpoint read into the project's terms, with where it came from.
pub struct Imported {
    pub victim: Victim,
    pub vocab: Vocab,
    /// Provenance for the victim file's metadata (`source`, `source_format`,
    /// `source_sha256`, `model_name`).
    pub metadata: BTreeMap<String, String>,
}

/// Reads a checkpoint: a `.gguf` file or a Hugging Face folder. `context` caps the
/// positions a pass takes (the model's own context when None).
pub fn import(path: &str, context: Option<usize>, device: Device) -> Result<Imported> {
    if Path::new(path).is_dir() {
        from_hf(path, context, device)
    } else {
        from_gguf(path, context, device)
    }
}

/// The victim's parameter name for each block tensor: (GGUF suffix, Hugging Face suffix,
/// victim suffix).
const BLOCK_TENSORS: [(&str, &str, &str); 9] = [
    ("attn_norm", "input_layernorm", "attn_norm"),
    ("attn_q", "self_attn.q_proj", "attn.q"),
    ("attn_k", "self_attn.k_proj", "attn.k"),
    ("attn_v", "self_attn.v_proj", "attn.v"),
    ("attn_output", "self_attn.o_proj", "attn.o"),
    ("ffn_norm", "post_attention_layernorm", "mlp_norm"),
    ("ffn_gate", "mlp.gate_proj", "mlp.gate"),
    ("ffn_up", "mlp.up_proj", "mlp.up"),
    ("ffn_down", "mlp.down_proj", "mlp.down"),
];

/// GGUF's query or key rows [heads·d, in] back to the Hugging Face order: the inverse of
/// llama.cpp's `permute` (rows viewed as [heads, d/2, 2] there, [heads, 2, d/2] here).
pub fn unpermute_rotary(w: &Tensor, heads: i64) -> Tensor {
    let (rows, cols) = (w.size()[0], w.size()[1]);
    w.view([heads, rows / heads / 2, 2, cols]).transpose(1, 2).reshape([rows, cols])
}

/// llama.cpp's `permute`: the Hugging Face order to GGUF's (tests and fixtures).
pub fn permute_rotary(w: &Tensor, heads: i64) -> Tensor {
    let (rows, cols) = (w.size()[0], w.size()[1]);
    w.view([heads, 2, rows / heads / 2, cols]).transpose(1, 2).reshape([rows, cols])
}

fn from_gguf(path: &str, context: Option<usize>, device: Device) -> Result<Imported> {
    let g = Gguf::open(path)?;
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        bail!("{path}: a GGUF of architecture {arch:?}; this reader takes llama (SmolLM, Llama, TinyLlama and their kin)");
    }
    for key in ["llama.rope.scaling.type", "llama.rope.scaling.factor"] {
        if let Some(v) = g.metadata.get(key) {
            if v.as_str() != Some("none") && v.as_f64() != Some(1.0) {
                bail!("{path}: rope scaling ({key} = {v:?}) is not supported");
            }
        }
    }
    if g.metadata.contains_key("llama.attention.sliding_window") {
        bail!("{path}: sliding-window attention (llama.attention.sliding_window) is not supported");
    }
    let n = |key: &str| g.get_u64(key).map(|v| v as usize);
    let width = n("llama.embedding_length")?;
    let heads = n("llama.attention.head_count")?;
    let kv_heads = match g.metadata.get("llama.attention.head_count_kv") {
        Some(_) => n("llama.attention.head_count_kv")?,
        None => heads,
    };
    if let Some(rot) = g.metadata.get("llama.rope.dimension_count") {
        if heads == 0 || rot.as_u64() != Some((width / heads) as u64) {
            bail!("{path}: rotary dimension {rot:?} is not the head width {}: partial rotary embeddings are not supported", width / heads.max(1));
        }
    }
    let model_context = n("llama.context_length")?;
    let tied = g.tensor_info("output.weight").is_none();
    let shape = LlamaShape {
        layers: n("llama.block_count")?,
        heads,
        kv_heads,
        ffn: n("llama.feed_forward_length")?,
        rope_theta: match g.metadata.get("llama.rope.freq_base") {
            Some(_) => g.get_f64("llama.rope.freq_base")?,
            None => 10_000.0,
        },
        rms_eps: g.get_f64("llama.attention.layer_norm_rms_epsilon")?,
        tied,
        regime: Default::default(),
    };
    let bpe = gguf_tokenizer(&g)?;
    // Which tensor of the file each parameter is, and whether its rows are permuted.
    let mut sources: BTreeMap<String, (String, Option<usize>)> = BTreeMap::new();
    sources.insert("embedding.weight".into(), ("token_embd.weight".into(), None));
    sources.insert("norm.weight".into(), ("output_norm.weight".into(), None));
    if !tied {
        sources.insert("out.weight".into(), ("output.weight".into(), None));
    }
    for l in 0..shape.layers {
        for (gguf, _, ours) in BLOCK_TENSORS {
            let permuted = match gguf {
                "attn_q" => Some(heads),
                "attn_k" => Some(kv_heads),
                _ => None,
            };
            sources.insert(format!("block.{l}.{ours}.weight"), (format!("blk.{l}.{gguf}.weight"), permuted));
        }
    }
    let wanted: std::collections::BTreeSet<&str> = sources.values().map(|(s, _)| s.as_str()).collect();
    let extra: Vec<&str> = g.tensors.iter().map(|t| t.name.as_str()).filter(|t| !wanted.contains(t)).collect();
    if let Some(bias) = extra.iter().find(|t| t.ends_with(".bias")) {
        bail!("{path}: the checkpoint has biases ({bias}): attention and MLP biases are not supported");
    }
    if !extra.is_empty() {
        bail!("{path}: tensors this Llama reader does not know: {extra:?} (rope_freqs means rope scaling, which is not supported)");
    }
    let embed_rows = g.tensor_info("token_embd.weight").with_context(|| format!("{path}: no token_embd.weight"))?.shape();
    let config = config_of(shape, width, embed_rows.first().copied().unwrap_or(0) as usize, context.unwrap_or(model_context).min(model_context))?;
    if bpe.len() != config.vocab_size {
        bail!("{path}: the tokenizer has {} tokens but the embedding table {} rows: they must match (a GGUF put together from two models?)", bpe.len(), config.vocab_size);
    }
    let mut tensors = Params::new();
    for (ours, (theirs, permuted)) in &sources {
        let info = g.tensor_info(theirs).with_context(|| format!("{path}: no tensor {theirs} (a Llama of {} layers needs it)", shape.layers))?;
        let t = Tensor::from_slice(&g.dequantize(theirs)?).view(info.shape().as_slice());
        let t = match permuted {
            Some(h) => {
                let rows = t.size()[0];
                if *h == 0 || rows % (2 * *h as i64) != 0 {
                    bail!("{path}: {theirs} has {rows} rows, not whole rotary pairs of {h} heads");
                }
                unpermute_rotary(&t, *h as i64)
            }
            None => t,
        };
        tensors.insert(ours.clone(), t);
    }
    let victim = build(config, &tensors, path, device)?;
    let mut metadata = provenance(path, "gguf", &[Path::new(path).to_path_buf()])?;
    if let Ok(name) = g.get_str("general.name") {
        metadata.insert("model_name".into(), name.to_string());
    }
    Ok(Imported { victim, vocab: Vocab::from_bpe(bpe), metadata })
}

/// The GGUF's embedded tokenizer: byte-level BPE (`tokenizer.ggml.model` = gpt2) only.
fn gguf_tokenizer(g: &Gguf) -> Result<Bpe> {
    let path = g.path();
    let model = g.get_str("tokenizer.ggml.model")?;
    match model {
        "gpt2" => {}
        "llama" => bail!("{path}: a SentencePiece tokenizer (tokenizer.ggml.model = llama) is not supported; this reader takes byte-level BPE (gpt2)"),
        other => bail!("{path}: tokenizer.ggml.model = {other:?} is not supported; this reader takes byte-level BPE (gpt2)"),
    }
    let tokens: Vec<String> = g.get_strings("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
    let types: Vec<u8> = match g.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .with_context(|| format!("{path}: tokenizer.ggml.token_type is not an array"))?
            .iter()
            .map(|t| t.as_u64().and_then(|t| u8::try_from(t).ok()).with_context(|| format!("{path}: a token type {t:?} is not a small integer")))
            .collect::<Result<_>>()?,
        None => vec![NORMAL; tokens.len()],
    };
    let merges = g.get_strings("tokenizer.ggml.merges")?.into_iter().map(String::from).collect();
    let pre = g.metadata.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("gpt2").to_string();
    let id = |key: &str| g.metadata.get(key).and_then(|v| v.as_u64()).map(|v| v as i64);
    let add_bos = g.metadata.get("tokenizer.ggml.add_bos_token").is_some_and(|v| *v == crate::gguf::Value::Bool(true));
    let spec = BpeSpec { tokens, types, merges, pre, bos: id("tokenizer.ggml.bos_token_id"), eos: id("tokenizer.ggml.eos_token_id"), add_bos };
    Bpe::new(spec).with_context(|| format!("{path}: the embedded tokenizer"))
}

fn config_of(shape: LlamaShape, width: usize, vocab: usize, context: usize) -> Result<VictimConfig> {
    let arch = ArchConfig::Llama(Llama { width, shape, positions: context });
    let config = VictimConfig { arch, vocab_size: vocab, embed_dim: width, num_classes: vocab, train_embeddings: false, max_len: context };
    config.arch().check(width, context)?;
    Ok(config)
}

/// The victim from its parameters by name, each checked against the config's shape.
fn build(config: VictimConfig, tensors: &Params, path: &str, device: Device) -> Result<Victim> {
    let table = &tensors["embedding.weight"];
    let want = crate::victims::model::param_shapes(&config);
    for (name, shape) in &want {
        let t = tensors.get(name).with_context(|| format!("{path}: no weights for {name}"))?;
        if &t.size() != shape {
            bail!("{path}: {name} has shape {:?}, the model's config needs {shape:?}: the config and the weights disagree", t.size());
        }
    }
    let victim = Victim::new(config, table, device)?;
    for (name, p) in victim.params().iter_mut() {
        let src = &tensors[name];
        if !bool::try_from(src.isfinite().all())? {
            bail!("{path}: {name} holds NaN or Inf");
        }
        tch::no_grad(|| p.copy_(src));
    }
    Ok(victim)
}

fn provenance(path: &str, format: &str, files: &[std::path::PathBuf]) -> Result<BTreeMap<String, String>> {
    let mut hashes = Vec::new();
    for f in files {
        hashes.push(crate::io::sha256_file(f)?);
    }
    Ok(BTreeMap::from([
        ("source".to_string(), path.to_string()),
        ("source_format".to_string(), format.to_string()),
        ("source_sha256".to_string(), hashes.join(",")),
    ]))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

fn from_hf(dir: &str, context: Option<usize>, device: Device) -> Result<Imported> {
    let root = Path::new(dir);
    let config_path = root.join("config.json");
    let cfg = read_json(&config_path)?;
    let cname = config_path.display().to_string();
    let model_type = cfg["model_type"].as_str().unwrap_or("");
    if model_type != "llama" {
        bail!("{cname}: model_type {model_type:?}; this reader takes llama (SmolLM, Llama, TinyLlama and their kin)");
    }
    let num = |key: &str| cfg[key].as_u64().map(|v| v as usize).with_context(|| format!("{cname}: no {key:?} (a whole number)"));
    if !cfg["rope_scaling"].is_null() {
        bail!("{cname}: rope scaling ({}) is not supported", cfg["rope_scaling"]);
    }
    for key in ["attention_bias", "mlp_bias"] {
        if cfg[key].as_bool() == Some(true) {
            bail!("{cname}: {key} is true: attention and MLP biases are not supported");
        }
    }
    if !cfg["sliding_window"].is_null() || cfg["use_sliding_window"].as_bool() == Some(true) {
        bail!("{cname}: sliding-window attention is not supported");
    }
    let (width, heads) = (num("hidden_size")?, num("num_attention_heads")?);
    if let Some(hd) = cfg["head_dim"].as_u64() {
        if heads == 0 || hd as usize * heads != width {
            bail!("{cname}: head_dim {hd} × {heads} heads is not hidden_size {width}: that is not supported");
        }
    }
    let shape = LlamaShape {
        layers: num("num_hidden_layers")?,
        heads,
        kv_heads: if cfg["num_key_value_heads"].is_null() { heads } else { num("num_key_value_heads")? },
        ffn: num("intermediate_size")?,
        rope_theta: cfg["rope_theta"].as_f64().unwrap_or(10_000.0),
        rms_eps: cfg["rms_norm_eps"].as_f64().with_context(|| format!("{cname}: no rms_norm_eps"))?,
        tied: cfg["tie_word_embeddings"].as_bool().unwrap_or(false),
        regime: Default::default(),
    };
    let vocab_size = num("vocab_size")?;
    let model_context = num("max_position_embeddings")?;
    let config = config_of(shape, width, vocab_size, context.unwrap_or(model_context).min(model_context)).with_context(|| cname.clone())?;

    let files = safetensors_files(root)?;
    let mut tensors = Params::new();
    let mut theirs: BTreeMap<String, String> = BTreeMap::from([("model.embed_tokens.weight".into(), "embedding.weight".into()), ("model.norm.weight".into(), "norm.weight".into())]);
    if !shape.tied {
        theirs.insert("lm_head.weight".into(), "out.weight".into());
    }
    for l in 0..shape.layers {
        for (_, hf, ours) in BLOCK_TENSORS {
            theirs.insert(format!("model.layers.{l}.{hf}.weight"), format!("block.{l}.{ours}.weight"));
        }
    }
    for file in &files {
        let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file (truncated?)", file.display()))?;
        for (name, view) in st.tensors() {
            if name.ends_with(".bias") {
                bail!("{}: the checkpoint has biases ({name}): attention and MLP biases are not supported", file.display());
            }
            if shape.tied && name == "lm_head.weight" {
                // A tied checkpoint may store the head again; it must be the table.
                continue;
            }
            let Some(ours) = theirs.get(&name) else {
                bail!("{}: a tensor this Llama reader does not know: {name}", file.display());
            };
            let t = Tensor::from_slice(&to_f32(&view).with_context(|| format!("{}: {name}", file.display()))?).view(view.shape().iter().map(|&d| d as i64).collect::<Vec<_>>().as_slice());
            tensors.insert(ours.clone(), t);
        }
    }
    let victim = build(config, &tensors, dir, device)?;
    let tok_path = root.join("tokenizer.json");
    let bpe = hf_tokenizer(&tok_path, &cfg)?;
    if bpe.len() != vocab_size {
        bail!("{}: the tokenizer has {} tokens but the embedding table {vocab_size} rows: they must match", tok_path.display(), bpe.len());
    }
    let mut all = vec![config_path.clone(), tok_path];
    all.extend(files);
    let mut metadata = provenance(dir, "hf", &all)?;
    if let Some(name) = cfg["_name_or_path"].as_str() {
        metadata.insert("model_name".into(), name.to_string());
    }
    Ok(Imported { victim, vocab: Vocab::from_bpe(bpe), metadata })
}

/// `model.safetensors`, or the shards its index lists.
fn safetensors_files(root: &Path) -> Result<Vec<std::path::PathBuf>> {
    let single = root.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = root.join("model.safetensors.index.json");
    if !index.exists() {
        bail!("{}: neither model.safetensors nor model.safetensors.index.json (only safetensors weights are read; convert a pytorch_model.bin first)", root.display());
    }
    let json = read_json(&index)?;
    let map = json["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| root.join(s)).collect())
}

fn to_f32(view: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect(),
        other => bail!("weights of dtype {other:?}; this reader takes F32, F16 and BF16"),
    })
}

/// A Hugging Face tokenizer.json of byte-level BPE: the model's vocabulary and merges,
/// its added tokens (special ones as control tokens, the others user-defined), and the
/// pre-tokenizer, which must be GPT-2's byte level (gpt2) or SmolLM's digits-then-byte-level
/// (smollm).
fn hf_tokenizer(path: &Path, cfg: &Json) -> Result<Bpe> {
    let name = path.display().to_string();
    let json = read_json(path)?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!("{name}: a {} tokenizer is not supported; this reader takes byte-level BPE", model["type"]);
    }
    if model["byte_fallback"].as_bool() == Some(true) || json["pre_tokenizer"]["type"] == "Metaspace" {
        bail!("{name}: a SentencePiece-style BPE (byte fallback, Metaspace) is not supported; this reader takes byte-level BPE");
    }
    let pre = &json["pre_tokenizer"];
    let byte_level = |p: &Json| p["type"] == "ByteLevel" && p["add_prefix_space"].as_bool() != Some(true) && p["use_regex"].as_bool() != Some(false);
    let pre = if byte_level(pre) {
        "gpt2"
    } else if pre["type"] == "Sequence"
        && pre["pretokenizers"].as_array().is_some_and(|s| s.len() == 2 && s[0]["type"] == "Digits" && s[0]["individual_digits"] == true && byte_level(&s[1]))
    {
        "smollm"
    } else {
        bail!("{name}: pre-tokenizer {pre}; this reader takes GPT-2's ByteLevel, alone or after Digits(individual_digits)");
    };
    let vocab = model["vocab"].as_object().with_context(|| format!("{name}: no model.vocab"))?;
    let added = json["added_tokens"].as_array().cloned().unwrap_or_default();
    let size = vocab.len().max(added.iter().filter_map(|a| a["id"].as_u64()).map(|i| i as usize + 1).max().unwrap_or(0));
    let mut tokens = vec![None; size];
    let mut types = vec![NORMAL; size];
    for (piece, id) in vocab {
        let id = id.as_u64().filter(|&i| (i as usize) < size).with_context(|| format!("{name}: bad id for {piece:?}"))? as usize;
        tokens[id] = Some(piece.clone());
    }
    for a in &added {
        let (id, content) = (a["id"].as_u64().with_context(|| format!("{name}: an added token without an id"))? as usize, a["content"].as_str().unwrap_or_default());
        tokens[id] = Some(content.to_string());
        types[id] = if a["special"].as_bool() == Some(true) { CONTROL } else { USER_DEFINED };
    }
    let tokens: Vec<String> = tokens.into_iter().enumerate().map(|(i, t)| t.with_context(|| format!("{name}: no token has id {i}"))).collect::<Result<_>>()?;
    let merges: Vec<String> = model["merges"]
        .as_array()
        .with_context(|| format!("{name}: no model.merges"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default())),
            other => bail!("{name}: a merge {other} is neither \"a b\" nor [a, b]"),
        })
        .collect::<Result<_>>()?;
    let id = |key: &str| cfg[key].as_i64();
    let spec = BpeSpec { tokens, types, merges, pre: pre.into(), bos: id("bos_token_id"), eos: id("eos_token_id"), add_bos: false };
    Bpe::new(spec).with_context(|| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn the_rotary_permutation_round_trips_and_pairs_halves() {
        // One head of width 4, rows 0..4 (HF order: pairs (0,2), (1,3)).
        let w = Tensor::arange(8, (Kind::Float, Device::Cpu)).view([4, 2]);
        let g = permute_rotary(&w, 1);
        // GGUF order puts each HF pair side by side: rows 0, 2, 1, 3.
        let rows: Vec<f32> = Vec::try_from(g.select(1, 0)).unwrap();
        assert_eq!(rows, [0.0, 4.0, 2.0, 6.0]);
        assert!(unpermute_rotary(&g, 1).equal(&w));
        let w = Tensor::randn([12, 5], (Kind::Float, Device::Cpu));
        assert!(unpermute_rotary(&permute_rotary(&w, 3), 3).equal(&w));
    }
}
