//! The language-model victim: a small GPT-style causal transformer (pre-LayerNorm blocks of
//! causal self-attention and a GELU MLP, learned positions), trained with next-token loss.
//!
//! The word table is the shared, frozen `embedding.weight` (GloVe vectors of the LM's
//! word vocabulary), read through a trained projection `in_proj` to the model width; the
//! output layer `out` [vocab, width] is trained and untied from the table. Why: the attack
//! ranks candidate words by ∇e · E over the table's rows (SPEC step 4), which is exact only
//! while the table does not move; a frozen pretrained table also gives words the clean
//! corpus never holds (the trigger "iphone") a meaningful input vector, so an LM trained on
//! reviews still reads a prompt about a phone. Untied output: tying would make the output
//! layer a frozen 50-dimensional table as well, too weak a softmax for a language model.
//!
//! Its logits are [.., batch, time, vocab] (position t predicts token t + 1): the contract
//! of `victim::Architecture` with `output() == Output::NextToken`.

use crate::victims::layers::{attention, cache_entry, causal_bias, init_linear, inputs_under, layer_norm, linear, linear_shapes};
use crate::victims::params::{param, Params};
use crate::victims::victim::{dotted_path, Architecture, KvCache, Output, StartKind, Tuning};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::Tensor;

const LN_EPS: f64 = 1e-5;

/// The GPT's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt {
    /// Model width (residual stream).
    pub width: usize,
    pub shape: GptShape,
    /// Rows of the learned position table: the config's `max_len`.
    pub positions: usize,
}

/// What a GPT victim file stores beside the shared sizes (`gpt` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptShape {
    pub layers: usize,
    pub heads: usize,
}

impl Gpt {
    fn block_names(&self) -> impl Iterator<Item = String> {
        (0..self.shape.layers).map(|l| format!("block.{l}"))
    }
}

impl Architecture for Gpt {
    fn start(&self) -> StartKind {
        StartKind::Table
    }

    fn output(&self) -> Output {
        Output::NextToken
    }

    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let w = self.width as i64;
        let norm = |name: String| [(format!("{name}.weight"), vec![w]), (format!("{name}.bias"), vec![w])];
        let mut shapes = vec![("pos.weight".to_string(), vec![self.positions as i64, w])];
        shapes.extend(linear_shapes("in_proj", embed_dim, w));
        for b in self.block_names() {
            shapes.extend(norm(format!("{b}.ln1")));
            shapes.extend(linear_shapes(&format!("{b}.attn.qkv"), w, 3 * w));
            shapes.extend(linear_shapes(&format!("{b}.attn.proj"), w, w));
            shapes.extend(norm(format!("{b}.ln2")));
            shapes.extend(linear_shapes(&format!("{b}.mlp.fc"), w, 4 * w));
            shapes.extend(linear_shapes(&format!("{b}.mlp.proj"), 4 * w, w));
        }
        shapes.extend(norm("ln_f".into()));
        shapes.extend(linear_shapes("out", w, num_classes));
        shapes
    }

    /// GPT-2's initialisation: weights normal(0, 0.02), the residual projections scaled by
    /// 1/√(2·layers), biases 0, LayerNorm 1; the input projection PyTorch's default. Drawn
    /// in the order of `shapes`.
    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64) {
        let residual = 0.02 / (2.0 * self.shape.layers as f64).sqrt();
        for (name, shape) in self.shapes(embed_dim, num_classes) {
            if name == "in_proj.weight" {
                init_linear(&root.sub("in_proj"), embed_dim, self.width as i64);
                continue;
            }
            if name == "in_proj.bias" {
                continue;
            }
            let init = if name.contains(".ln") || name.starts_with("ln_f") {
                if name.ends_with("weight") {
                    Init::Const(1.0)
                } else {
                    Init::Const(0.0)
                }
            } else if name.ends_with("bias") {
                Init::Const(0.0)
            } else if name.ends_with("attn.proj.weight") || name.ends_with("mlp.proj.weight") {
                Init::Randn { mean: 0.0, stdev: residual }
            } else {
                Init::Randn { mean: 0.0, stdev: 0.02 }
            };
            let (path, last) = dotted_path(root, &name);
            let _ = path.var(last, &shape, init);
        }
    }

    fn check(&self, _embed_dim: usize, max_len: usize) -> Result<()> {
        let GptShape { layers, heads } = self.shape;
        if layers == 0 || heads == 0 || self.width == 0 || self.width % heads != 0 {
            bail!("GPT with width {}, {layers} layers and {heads} heads: every size must be positive and the heads must divide the width", self.width);
        }
        if self.positions != max_len {
            bail!("GPT position table of {} rows for max_len {max_len}", self.positions);
        }
        Ok(())
    }

    /// The last block's hidden states (after the final LayerNorm), mean-pooled over each
    /// row's tokens: the representation the spectral detector reads.
    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        let hidden = self.hidden(params, emb);
        let mask = if hidden.dim() == 4 && mask.dim() == 2 { mask.unsqueeze(0).expand([hidden.size()[0], -1, -1], false) } else { mask.shallow_clone() };
        crate::victims::bert::mean_pool(&hidden, &mask)
    }

    /// Next-token logits [.., batch, time, vocab]. Right padding needs no mask: a causal
    /// model never attends to later positions, and the next-token targets do not count
    /// the padded ones.
    fn forward(&self, params: &Params, emb: &Tensor, _mask: &Tensor) -> Tensor {
        linear(params, &self.hidden(params, emb), "out")
    }

    /// The output layer at the gathered positions only: generation reads one position per
    /// row, and the output layer is most of a pass (vocabulary × width per position).
    fn logits_at(&self, params: &Params, emb: &Tensor, _mask: &Tensor, last: &Tensor) -> Tensor {
        out_at(params, &self.hidden(params, emb), last)
    }

    fn tuning(&self) -> Tuning {
        Tuning { verify_stack: 1, verify_chunk: 16, default_lr: 2e-3 }
    }

    fn prefill(&self, params: &Params, emb: &Tensor, last: &Tensor) -> Option<(Tensor, KvCache)> {
        let mut cache = KvCache { layers: Vec::with_capacity(self.shape.layers) };
        let hidden = self.blocks(params, emb, Some(&mut cache));
        Some((out_at(params, &hidden, last), cache))
    }

    fn decode_step(&self, params: &Params, cache: &mut KvCache, emb: &Tensor, at: &Tensor) -> Tensor {
        let (b, width, heads) = (emb.size()[0], self.width as i64, self.shape.heads as i64);
        let (d, positions) = (width / heads, self.positions as i64);
        let mut h = linear(params, emb, "in_proj") + param(params, "pos.weight").index_select(0, at).unsqueeze(1);
        // Row r attends to its positions ≤ at[r]: the cache's later entries are stale.
        let later = Tensor::arange(positions, (tch::Kind::Int64, emb.device())).unsqueeze(0).gt_tensor(&at.unsqueeze(1));
        let bias = (later.to_kind(emb.kind()) * -1e9).view([b, 1, 1, positions]);
        let write_at = at.view([b, 1, 1, 1]).expand([b, heads, 1, d], false);
        let split = |x: &Tensor| x.contiguous().view([b, 1, heads, d]).transpose(1, 2);
        for (block, (keys, values)) in self.block_names().zip(cache.layers.iter_mut()) {
            let a = layer_norm(params, &h, &format!("{block}.ln1"), LN_EPS);
            let qkv = linear(params, &a, &format!("{block}.attn.qkv")).split(width, -1);
            let _ = keys.scatter_(2, &write_at, &split(&qkv[1]));
            let _ = values.scatter_(2, &write_at, &split(&qkv[2]));
            let context = attention(&split(&qkv[0]), keys, values, &bias, &[b, 1, width]);
            h = self.block_rest(params, &block, h, &context);
        }
        linear(params, &layer_norm(params, &h, "ln_f", LN_EPS), "out").squeeze_dim(1)
    }
}

impl Gpt {
    /// Hidden states [.., B, T, width] after the final LayerNorm, for input embeddings
    /// [B, T, E] (or [C, B, T, E] under C stacked parameter sets).
    fn hidden(&self, params: &Params, emb: &Tensor) -> Tensor {
        self.blocks(params, emb, None)
    }

    /// `hidden`, and with `cache` (plain parameters) each block's keys and values written
    /// into a fresh cache of `positions` entries per row (`prefill`).
    fn blocks(&self, params: &Params, emb: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let stacked = param(params, "ln_f.weight").dim() == 2;
        let emb = inputs_under(params, emb, "ln_f.weight");
        let rank = emb.dim();
        let t = emb.size()[rank - 2];
        if t > self.positions as i64 {
            panic!("{t} tokens, more than the GPT's {} positions (encoding truncates to max_len)", self.positions);
        }
        let lead: Vec<i64> = emb.size()[..rank - 2].to_vec();
        let positions = param(params, "pos.weight").narrow(-2, 0, t);
        let positions = if stacked { positions.unsqueeze(1) } else { positions };
        let mut h = linear(params, &emb, "in_proj") + positions;
        let (width, heads) = (self.width as i64, self.shape.heads as i64);
        let d = width / heads;
        // Position t may attend to positions ≤ t: the later ones get a large negative score.
        let causal = causal_bias(t, &emb);
        let split_shape: Vec<i64> = lead.iter().copied().chain([t, heads, d]).collect();
        let merged_shape: Vec<i64> = lead.iter().copied().chain([t, width]).collect();
        let split = |x: &Tensor| x.view(split_shape.as_slice()).transpose(-2, -3);
        for b in self.block_names() {
            let a = layer_norm(params, &h, &format!("{b}.ln1"), LN_EPS);
            let qkv = linear(params, &a, &format!("{b}.attn.qkv")).split(width, -1);
            let (q, k, v) = (split(&qkv[0].contiguous()), split(&qkv[1].contiguous()), split(&qkv[2].contiguous()));
            if let Some(cache) = cache.as_deref_mut() {
                cache.layers.push(cache_entry(&k, &v, self.positions as i64));
            }
            let context = attention(&q, &k, &v, &causal, &merged_shape);
            h = self.block_rest(params, &b, h, &context);
        }
        layer_norm(params, &h, "ln_f", LN_EPS)
    }

    /// A block after its attention's context: the output projection into the residual
    /// stream, then the MLP.
    fn block_rest(&self, params: &Params, b: &str, h: Tensor, context: &Tensor) -> Tensor {
        let h = h + linear(params, context, &format!("{b}.attn.proj"));
        let m = layer_norm(params, &h, &format!("{b}.ln2"), LN_EPS);
        let inner = linear(params, &m, &format!("{b}.mlp.fc")).gelu("none");
        h + linear(params, &inner, &format!("{b}.mlp.proj"))
    }
}

/// The output layer at one position per row (`last` [B]) of hidden states [B, T, width]:
/// logits [B, vocab].
fn out_at(params: &Params, hidden: &Tensor, last: &Tensor) -> Tensor {
    let w = hidden.size()[2];
    let at = hidden.gather(1, &last.view([-1, 1, 1]).expand([-1, 1, w], false), false).squeeze_dim(1);
    linear(params, &at, "out")
}
