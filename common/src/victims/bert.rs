//! A BERT encoder over named parameters (all-MiniLM-L6-v2: 6 layers, hidden 384, 12
//! heads), for the pretrained transformer victim (`minilm.rs`), on the shared layers (`layers.rs`). Like `model::forward`, it
//! takes the parameters as a map and its input as token embeddings, so the attack can run
//! it at θ and θ' and differentiate with respect to the poisons' embeddings; attention,
//! LayerNorm and GELU are plain differentiable ops, so double backward works.
//!
//! Checked against a float64 numpy forward of the package's own weights
//! (`fixtures/minilm/encoder_reference.json`, scripts/make_minilm_fixtures.py), and its
//! second-order gradient against finite differences on a tiny random configuration.

use crate::victims::layers::{attention, fit, layer_norm, linear};
use crate::victims::params::{param as p, Params};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The fields of the package's config.json the encoder needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
}

impl BertConfig {
    pub fn from_json(path: &str) -> Result<BertConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?;
        if json["hidden_act"] != "gelu" || json["position_embedding_type"] != "absolute" {
            bail!("{path}: only BERT with exact GELU and absolute positions is supported");
        }
        let cfg: BertConfig = serde_json::from_value(json).with_context(|| format!("{path}: not a BERT config"))?;
        cfg.check().with_context(|| path.to_string())?;
        Ok(cfg)
    }

    /// Refuses sizes the encoder cannot run (zero, or heads that do not divide the width).
    pub fn check(&self) -> Result<()> {
        let sizes = [self.vocab_size, self.hidden_size, self.num_attention_heads, self.intermediate_size, self.max_position_embeddings, self.type_vocab_size];
        if sizes.iter().any(|&x| x <= 0) || self.num_hidden_layers == 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!("BERT config {self:?} has a zero size or a width the heads do not divide");
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            bail!("BERT config: layer_norm_eps must be positive");
        }
        Ok(())
    }
}


/// Reads a Hugging Face safetensors file (no toolkit metadata) as float parameters on
/// `device`; integer buffers (`embeddings.position_ids`) are left out.
pub fn load_weights(path: &str, device: Device) -> Result<Params> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}; run scripts/fetch_minilm.sh"))?;
    // SAFETY: mapped read-only; the file is replaced by rename, never written in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {path}"))?;
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| anyhow::anyhow!("{path}: not a readable safetensors file ({e})"))?;
    let mut params = Params::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, Kind::Float)?.to_device(device);
        params.insert(name, t);
    }
    Ok(params)
}

/// Word embeddings [.., T, H] of token ids [.., T] (the attack's input). With a stacked
/// table [C, V, H] the ids carry the stack dimension first ([C, B, T]).
pub fn word_embeddings(params: &Params, ids: &Tensor) -> Tensor {
    let table = p(params, "embeddings.word_embeddings.weight");
    if table.dim() == 3 {
        let mut single = crate::victims::params::Params::new();
        single.insert("embedding.weight".into(), table.shallow_clone());
        return crate::victims::params::embed(&single, ids);
    }
    Tensor::embedding(table, ids, 0, false, false)
}

/// Hidden states [B, T, H] of the last layer for word embeddings [B, T, H] and a padding
/// mask [B, T] (1 for a token): position and token-type embeddings added, LayerNorm, then
/// post-LayerNorm layers of self-attention (padded keys masked out) and GELU MLP.
///
/// Stacked parameters: when every parameter carries a leading dimension C (C victims
/// trained together, or C candidates' θ'), the inputs are [C, B, T, H] with mask
/// [C, B, T] (or shared [B, T, H], [B, T]) and the result is [C, B, T, H].
pub fn encode(cfg: &BertConfig, params: &Params, words: &Tensor, mask: &Tensor) -> Tensor {
    let stacked = p(params, "embeddings.LayerNorm.weight").dim() == 2;
    let (words, mask) = if stacked && words.dim() == 3 {
        let c = p(params, "embeddings.LayerNorm.weight").size()[0];
        (words.unsqueeze(0).expand([c, -1, -1, -1], false), mask.unsqueeze(0).expand([c, -1, -1], false))
    } else {
        (words.shallow_clone(), mask.shallow_clone())
    };
    let rank = words.dim();
    let size = words.size();
    let (t, hidden) = (size[rank - 2], size[rank - 1]);
    let lead: Vec<i64> = size[..rank - 2].to_vec();
    let positions = p(params, "embeddings.position_embeddings.weight").narrow(-2, 0, t);
    let positions = if stacked { positions.unsqueeze(1) } else { positions };
    let token_type = fit(&p(params, "embeddings.token_type_embeddings.weight").select(-2, 0), 1, rank);
    let mut h = layer_norm(params, &(&words + positions + token_type), "embeddings.LayerNorm", cfg.layer_norm_eps);
    let heads = cfg.num_attention_heads;
    let d = hidden / heads;
    // Padded keys get a large negative score: their attention weight is exactly 0.
    let key_shape: Vec<i64> = lead.iter().copied().chain([1, 1, t]).collect();
    let key_bias = ((mask.to_kind(words.kind()) - 1.0) * 1e9).view(key_shape.as_slice());
    let split_shape: Vec<i64> = lead.iter().copied().chain([t, heads, d]).collect();
    let merged_shape: Vec<i64> = lead.iter().copied().chain([t, hidden]).collect();
    for layer in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layer.{layer}");
        // [.., T, H] -> [.., heads, T, d]
        let split = |x: Tensor| x.view(split_shape.as_slice()).transpose(-2, -3);
        let q = split(linear(params, &h, &format!("{l}.attention.self.query")));
        let k = split(linear(params, &h, &format!("{l}.attention.self.key")));
        let v = split(linear(params, &h, &format!("{l}.attention.self.value")));
        let context = attention(&q, &k, &v, &key_bias, &merged_shape);
        let attended = linear(params, &context, &format!("{l}.attention.output.dense")) + &h;
        h = layer_norm(params, &attended, &format!("{l}.attention.output.LayerNorm"), cfg.layer_norm_eps);
        let inner = linear(params, &h, &format!("{l}.intermediate.dense")).gelu("none");
        let out = linear(params, &inner, &format!("{l}.output.dense")) + &h;
        h = layer_norm(params, &out, &format!("{l}.output.LayerNorm"), cfg.layer_norm_eps);
    }
    h
}

/// Mean of the hidden states [.., T, H] over each row's tokens: [.., H].
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(hidden.kind()).unsqueeze(-1);
    (hidden * &m).sum_dim_intlist(-2, false, None::<Kind>) / m.sum_dim_intlist(-2, false, None::<Kind>)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(rel: &str) -> String {
        format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn encodes_like_a_numpy_forward_of_the_packages_weights() {
        let weights = repo("data/minilm/model.safetensors");
        assert!(std::path::Path::new(&weights).exists(), "{weights} missing: run scripts/fetch_minilm.sh (make test does)");
        let cfg = BertConfig::from_json(&repo("data/minilm/config.json")).unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads), (384, 6, 12));
        let params = load_weights(&weights, Device::Cpu).unwrap();
        assert_eq!(params.len(), 103, "104 tensors less the integer position ids");
        let total: i64 = params.values().map(|t| t.numel() as i64).sum();
        assert!((22_000_000..23_000_000).contains(&total), "{total} values");
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(repo("fixtures/minilm/encoder_reference.json")).unwrap()).unwrap();
        let ids: Vec<Vec<i64>> = serde_json::from_value(reference["ids"].clone()).unwrap();
        let want: Vec<Vec<f64>> = serde_json::from_value(reference["pooled"].clone()).unwrap();
        let (b, t) = (ids.len() as i64, ids[0].len() as i64);
        let ids = Tensor::from_slice(&ids.concat()).view([b, t]);
        let mask = ids.ne(0);
        let pooled = tch::no_grad(|| mean_pool(&encode(&cfg, &params, &word_embeddings(&params, &ids), &mask), &mask));
        let want = Tensor::from_slice(&want.concat()).view([b, cfg.hidden_size]);
        let diff = (pooled.to_kind(Kind::Double) - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        eprintln!("MiniLM vs numpy reference: max abs difference {diff:.2e} (largest value {scale:.2})");
        assert!(diff < 1e-4 * scale.max(1.0), "pooled outputs differ from the numpy reference by {diff} (scale {scale})");
    }

    #[test]
    fn stacked_parameters_equal_one_pass_per_set() {
        let (cfg, base) = tiny();
        let sets: Vec<Params> = (0..3)
            .map(|k| base.iter().map(|(n, t)| (n.clone(), t.detach() + t.detach().randn_like() * (0.1 * k as f64))).collect())
            .collect();
        let stacked: Params = sets[0]
            .keys()
            .map(|n| (n.clone(), Tensor::stack(&sets.iter().map(|p| p[n].shallow_clone()).collect::<Vec<_>>(), 0)))
            .collect();
        let ids = Tensor::from_slice(&[3i64, 4, 5, 0, 6, 7, 8, 9, 2, 0, 0, 0]).view([3, 4]);
        let mask = ids.ne(0);
        // Per-set inputs [C, B, T]: each set embeds the ids with its own word table.
        let stacked_ids = ids.unsqueeze(0).expand([3, -1, -1], true);
        let all = logits(&cfg, &stacked, &word_embeddings(&stacked, &stacked_ids), &stacked_ids.ne(0));
        assert_eq!(all.size(), [3, 3, 2]);
        // Shared inputs [B, T, H].
        let shared_words = word_embeddings(&sets[0], &ids);
        let shared = logits(&cfg, &stacked, &shared_words, &mask);
        for (k, p) in sets.iter().enumerate() {
            let one = logits(&cfg, p, &word_embeddings(p, &ids), &mask);
            let diff = (all.get(k as i64) - one).abs().max().double_value(&[]);
            assert!(diff < 1e-10, "set {k} differs by {diff}");
            let one_shared = logits(&cfg, p, &shared_words, &mask);
            let diff = (shared.get(k as i64) - one_shared).abs().max().double_value(&[]);
            assert!(diff < 1e-10, "set {k} on shared inputs differs by {diff}");
        }
    }

    /// A tiny random BERT in f64.
    fn tiny() -> (BertConfig, Params) {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let cfg = BertConfig { vocab_size: 20, hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 12, max_position_embeddings: 16, type_vocab_size: 2, layer_norm_eps: 1e-12 };
        let opts = (Kind::Double, Device::Cpu);
        let mut params = Params::new();
        let mut add = |name: String, shape: &[i64], scale: f64| {
            params.insert(name, (Tensor::randn(shape, opts) * scale).set_requires_grad(true));
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        add("embeddings.word_embeddings.weight".into(), &[cfg.vocab_size, h], 1.0);
        add("embeddings.position_embeddings.weight".into(), &[cfg.max_position_embeddings, h], 0.1);
        add("embeddings.token_type_embeddings.weight".into(), &[2, h], 0.1);
        for n in ["embeddings.LayerNorm".to_string()].into_iter().chain((0..cfg.num_hidden_layers).flat_map(|l| {
            [format!("encoder.layer.{l}.attention.output.LayerNorm"), format!("encoder.layer.{l}.output.LayerNorm")]
        })) {
            add(format!("{n}.weight"), &[h], 0.1);
            add(format!("{n}.bias"), &[h], 0.1);
        }
        for l in 0..cfg.num_hidden_layers {
            for (n, out, inp) in [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                ("attention.output.dense", h, h), ("intermediate.dense", i, h), ("output.dense", h, i)] {
                add(format!("encoder.layer.{l}.{n}.weight"), &[out, inp], 0.4);
                add(format!("encoder.layer.{l}.{n}.bias"), &[out], 0.1);
            }
        }
        add("head.weight".into(), &[2, h], 0.5);
        add("head.bias".into(), &[2], 0.1);
        // LayerNorm weights near 1.
        for (k, t) in params.iter_mut() {
            if k.ends_with("LayerNorm.weight") {
                *t = (t.detach() + 1.0).set_requires_grad(true);
            }
        }
        (cfg, params)
    }

    fn logits(cfg: &BertConfig, params: &Params, words: &Tensor, mask: &Tensor) -> Tensor {
        let hidden = encode(cfg, params, words, mask);
        let mask = if hidden.dim() > mask.dim() + 1 { mask.unsqueeze(0).expand([hidden.size()[0], -1, -1], false) } else { mask.shallow_clone() };
        let pooled = mean_pool(&hidden, &mask);
        pooled.matmul(&fit(&params["head.weight"].transpose(-1, -2), 2, pooled.dim())) + fit(&params["head.bias"], 1, pooled.dim())
    }

    /// L_adv after one SGD step on a minibatch whose last row is the poison, given as word
    /// embeddings (the word table itself is not trained here).
    fn unrolled_adv_loss(cfg: &BertConfig, params: &Params, poison: &Tensor) -> Tensor {
        let clean_ids = Tensor::from_slice(&[3i64, 4, 5, 0, 6, 7, 8, 9, 2, 3, 0, 0]).view([3, 4]);
        let words = Tensor::cat(&[word_embeddings(params, &clean_ids), poison.shallow_clone()], 0);
        let mask = Tensor::cat(&[clean_ids.ne(0), Tensor::from_slice(&[true, true, true, false]).view([1, 4])], 0);
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1]);
        let loss = crate::train::cross_entropy(&logits(cfg, params, &words, &mask), &labels);
        let names: Vec<String> = params.keys().filter(|k| !k.contains("word_embeddings")).cloned().collect();
        let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
        let grads = Tensor::run_backward(&[&loss], &tensors, true, true);
        let mut stepped = crate::victims::model::shallow_copy(params);
        for (n, g) in names.iter().zip(grads) {
            stepped.insert(n.clone(), &params[n] - g * 0.5);
        }
        let adv_ids = Tensor::from_slice(&[7i64, 8, 3, 0, 9, 10, 11, 12]).view([2, 4]);
        let adv = logits(cfg, &stepped, &word_embeddings(&stepped, &adv_ids), &adv_ids.ne(0));
        crate::train::cross_entropy(&adv, &Tensor::from_slice(&[1i64, 1]))
    }

    #[test]
    fn second_order_gradient_matches_finite_differences_in_f64() {
        let (cfg, params) = tiny();
        let poison = word_embeddings(&params, &Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4])).detach().set_requires_grad(true);
        let g = unrolled_adv_loss(&cfg, &params, &poison);
        let grad = Tensor::run_backward(&[&g], &[&poison], false, false).pop().unwrap();
        let worst = crate::testing::worst_fd_error(&poison, &grad, 1e-6, 1e-3, |x| unrolled_adv_loss(&cfg, &params, x).double_value(&[]));
        eprintln!("BERT: max relative error {worst:.2e}");
        assert!(worst < 1e-6, "second-order gradient off by {worst}");
        // The padded position of the poison gets no gradient (masked out everywhere).
        assert_eq!(grad.get(0).get(3).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
}
