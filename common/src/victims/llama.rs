//! The Llama architecture: a pretrained causal language model read from a checkpoint
//! (`victims::checkpoint`: a GGUF file or a Hugging Face folder; SmolLM2-135M is the one
//! this project fetches). Pre-norm blocks of RMSNorm, grouped-query causal self-attention
//! with rotary position embeddings, and a SwiGLU feed-forward; a final RMSNorm and the
//! output head, tied to the word table (`embedding.weight`) or its own (`out.weight`).
//!
//! Supported: grouped-query attention (any number of key-value heads dividing the
//! heads), tied or untied head, any rope theta. Refused by name where a checkpoint asks
//! for them (`checkpoint`): rope scaling, attention or MLP biases, sliding windows.
//!
//! Rotary layout: the query and key rows are in the Hugging Face order, where rotation
//! pairs dimension i with i + d/2 of each head ("rotate half"). A GGUF stores them permuted
//! so that llama.cpp pairs (2i, 2i + 1); `checkpoint` undoes that permutation on reading,
//! so both layouts give the same victim (tested on fixtures/llama).
//!
//! Its logits are [.., batch, time, vocab] (position t predicts token t + 1); plain
//! differentiable ops only, so it is twice differentiable and takes stacked parameter sets.

use crate::victims::layers::{attention, cache_entry, causal_bias, fit, inputs_under, project};
use crate::victims::params::{param, Params};
use crate::victims::victim::{dotted_path, Architecture, KvCache, Output, StartKind, Tuning};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// The regime is a setting files record (victim configs, rollout settings), so it lives
/// with the formats.
pub use crate::formats::records::Regime;

/// What a Llama victim file stores beside the shared sizes (`llama` in the config): the
/// width is `embed_dim`, the vocabulary `vocab_size`, the context `max_len`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaShape {
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// The feed-forward's inner width.
    pub ffn: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// Whether the output head is the word table (`embedding.weight`).
    pub tied: bool,
    /// Which parameters fine-tuning trains (absent: all).
    #[serde(default, skip_serializing_if = "Regime::is_all")]
    pub regime: Regime,
}

/// The Llama architecture's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama {
    pub width: usize,
    pub shape: LlamaShape,
    /// The context: the most positions a pass takes (the config's `max_len`).
    pub positions: usize,
}

impl Llama {
    fn head_dim(&self) -> i64 {
        (self.width / self.shape.heads) as i64
    }

    fn block_names(&self) -> impl Iterator<Item = String> {
        (0..self.shape.layers).map(|l| format!("block.{l}"))
    }

    /// The rotary angles' cosines and sines [.., d] for positions `pos` (int64, any shape),
    /// in the kind of `like`: frequencies θ^(−2i/d) for i < d/2, each used twice (the
    /// halves of a head). Computed in f64, then rounded.
    fn rope_tables(&self, pos: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let d = self.head_dim();
        let i = Tensor::arange(d / 2, (Kind::Double, pos.device()));
        let inv_freq = (i * (-2.0 / d as f64) * self.shape.rope_theta.ln()).exp();
        let angles = pos.to_kind(Kind::Double).unsqueeze(-1) * inv_freq;
        let angles = Tensor::cat(&[&angles, &angles], -1);
        (angles.cos().to_kind(like.kind()), angles.sin().to_kind(like.kind()))
    }

    /// Hidden states [.., B, T, width] after the final norm, for input embeddings [B, T, E]
    /// (or [C, B, T, E] under C stacked parameter sets); with `cache`, each block's keys and
    /// values are written to a fresh cache of `room` positions per row. With `mask` (right
    /// padding) the frozen lower blocks of a `Regime::Top` model are read from the
    /// process's cache of them when the inputs need no gradient (`frozen_prefix`).
    fn hidden(&self, params: &Params, emb: &Tensor, mut cache: Option<(&mut KvCache, i64)>, mask: Option<&Tensor>) -> Tensor {
        let emb = inputs_under(params, emb, "norm.weight");
        let rank = emb.dim();
        let t = emb.size()[rank - 2];
        if t > self.positions as i64 {
            panic!("{t} tokens, more than the model's context of {} (encoding checks prompts against max_len)", self.positions);
        }
        let (cos, sin) = self.rope_tables(&Tensor::arange(t, (Kind::Int64, emb.device())), &emb);
        let causal = causal_bias(t, &emb);
        let lower = match (self.cached_blocks(&emb), mask) {
            (Some(blocks), Some(mask)) => frozen_prefix::states(self, params, &emb, mask, blocks, cache.is_some()).map(|found| (found, blocks)),
            _ => None,
        };
        let (mut h, first) = match lower {
            Some(((h, keys_values), blocks)) => {
                if let Some((cache, room)) = cache.as_mut() {
                    cache.layers.extend(keys_values.iter().map(|(k, v)| cache_entry(k, v, *room)));
                }
                (h, blocks)
            }
            None => (emb, 0),
        };
        for l in first..self.shape.layers {
            let (k, v);
            (h, k, v) = self.block(params, l, h, &cos, &sin, &causal);
            if let Some((cache, room)) = cache.as_mut() {
                cache.layers.push(cache_entry(&k, &v, *room));
            }
        }
        rms_norm(params, &h, "norm", self.shape.rms_eps)
    }

    /// Block `l` over the residual stream `h`: the new stream and the block's keys and
    /// values (what a generation's cache holds).
    fn block(&self, params: &Params, l: usize, h: Tensor, cos: &Tensor, sin: &Tensor, causal: &Tensor) -> (Tensor, Tensor, Tensor) {
        let b = format!("block.{l}");
        let a = rms_norm(params, &h, &format!("{b}.attn_norm"), self.shape.rms_eps);
        let (q, k, v) = self.qkv(params, &b, &a, cos, sin);
        let h = self.block_rest(params, &b, h, &q, &k, &v, causal);
        (h, k, v)
    }

    /// How many lower blocks a pass over `emb` reads from the frozen blocks' cache: those a
    /// `Regime::Top` leaves frozen, when the inputs need no gradient (plain, not stacked).
    fn cached_blocks(&self, emb: &Tensor) -> Option<usize> {
        match self.shape.regime {
            Regime::Top(n) if n < self.shape.layers && emb.dim() == 3 && !emb.requires_grad() => Some(self.shape.layers - n),
            _ => None,
        }
    }

    /// The residual stream after the first `blocks` blocks for one unpadded row [1, T, E],
    /// and with `keys_values` each of those blocks' keys and values [1, kv_heads, T, d]
    /// (what generation's cache holds), as [state, k0, v0, k1, v1, ...] without the row
    /// dimension.
    fn lower_blocks(&self, params: &Params, row: &Tensor, blocks: usize, keys_values: bool) -> Vec<Tensor> {
        let t = row.size()[1];
        let (cos, sin) = self.rope_tables(&Tensor::arange(t, (Kind::Int64, row.device())), row);
        let causal = causal_bias(t, row);
        let mut h = row.shallow_clone();
        let mut kept = Vec::new();
        for l in 0..blocks {
            let (k, v);
            (h, k, v) = self.block(params, l, h, &cos, &sin, &causal);
            if keys_values {
                kept.extend([k.squeeze_dim(0), v.squeeze_dim(0)]);
            }
        }
        std::iter::once(h.squeeze_dim(0)).chain(kept).collect()
    }

    /// A block's queries [.., heads, T, d] and keys and values [.., kv_heads, T, d], the
    /// queries and keys rotated by the tables `cos`, `sin` (broadcasting over [.., T, d]).
    fn qkv(&self, params: &Params, b: &str, a: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let d = self.head_dim();
        let split = |x: Tensor, heads: usize| {
            let mut shape = x.size();
            shape.pop();
            shape.extend([heads as i64, d]);
            x.view(shape.as_slice()).transpose(-2, -3)
        };
        let rotate = |x: Tensor| {
            let halves = x.split(d / 2, -1);
            let turned = Tensor::cat(&[-&halves[1], halves[0].shallow_clone()], -1);
            &x * cos + turned * sin
        };
        let q = rotate(split(project(params, a, &format!("{b}.attn.q")), self.shape.heads));
        let k = rotate(split(project(params, a, &format!("{b}.attn.k")), self.shape.kv_heads));
        let v = split(project(params, a, &format!("{b}.attn.v")), self.shape.kv_heads);
        (q, k, v)
    }

    /// The rest of a block from its queries, keys and values: grouped-query attention
    /// (query head h reads key-value head h / (heads / kv_heads)), the output projection
    /// into the residual stream, then the SwiGLU feed-forward.
    #[allow(clippy::too_many_arguments)]
    fn block_rest(&self, params: &Params, b: &str, h: Tensor, q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Tensor {
        let group = (self.shape.heads / self.shape.kv_heads) as i64;
        let (k, v) = if group > 1 { (k.repeat_interleave_self_int(group, -3, None), v.repeat_interleave_self_int(group, -3, None)) } else { (k.shallow_clone(), v.shallow_clone()) };
        let mut merged = h.size();
        let tq = q.size()[q.dim() - 2];
        let at = merged.len() - 2;
        merged[at] = tq;
        let context = attention(q, &k, &v, bias, &merged);
        let h = h + project(params, &context, &format!("{b}.attn.o"));
        let m = rms_norm(params, &h, &format!("{b}.mlp_norm"), self.shape.rms_eps);
        let gate = project(params, &m, &format!("{b}.mlp.gate"));
        let up = project(params, &m, &format!("{b}.mlp.up"));
        h + project(params, &(gate.silu() * up), &format!("{b}.mlp.down"))
    }

    /// The output head over hidden states [.., width]: the word table's rows when tied.
    fn head(&self, params: &Params, hidden: &Tensor) -> Tensor {
        if !self.shape.tied {
            return project(params, hidden, "out");
        }
        let table = param(params, "embedding.weight");
        if table.dim() == 3 {
            // Stacked tables [C, V, D] against hidden [C, .., D].
            let lead = hidden.size();
            let flat = hidden.reshape([lead[0], -1, *lead.last().expect("rank > 0")]);
            let mut shape = lead.clone();
            *shape.last_mut().expect("rank > 0") = table.size()[1];
            return flat.matmul(&table.transpose(-1, -2)).view(shape.as_slice());
        }
        hidden.matmul(&table.transpose(0, 1))
    }
}

/// RMSNorm over the last dimension: x / √(mean(x²) + eps) · weight, plain or stacked.
pub fn rms_norm(params: &Params, x: &Tensor, name: &str, eps: f64) -> Tensor {
    let ms = x.square().mean_dim([-1].as_slice(), true, None::<Kind>);
    x * (ms + eps).rsqrt() * fit(param(params, &format!("{name}.weight")), 1, x.dim())
}

impl Architecture for Llama {
    fn start(&self) -> StartKind {
        StartKind::Checkpoint
    }

    fn output(&self) -> Output {
        Output::NextToken
    }

    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let (w, d) = (embed_dim, self.head_dim());
        let (q, kv, f) = (self.shape.heads as i64 * d, self.shape.kv_heads as i64 * d, self.shape.ffn as i64);
        let mut shapes = Vec::new();
        for b in self.block_names() {
            shapes.push((format!("{b}.attn_norm.weight"), vec![w]));
            shapes.push((format!("{b}.attn.q.weight"), vec![q, w]));
            shapes.push((format!("{b}.attn.k.weight"), vec![kv, w]));
            shapes.push((format!("{b}.attn.v.weight"), vec![kv, w]));
            shapes.push((format!("{b}.attn.o.weight"), vec![w, q]));
            shapes.push((format!("{b}.mlp_norm.weight"), vec![w]));
            shapes.push((format!("{b}.mlp.gate.weight"), vec![f, w]));
            shapes.push((format!("{b}.mlp.up.weight"), vec![f, w]));
            shapes.push((format!("{b}.mlp.down.weight"), vec![w, f]));
        }
        shapes.push(("norm.weight".into(), vec![w]));
        if !self.shape.tied {
            shapes.push(("out.weight".into(), vec![num_classes, w]));
        }
        shapes
    }

    /// Llama's initialisation (normal 0.02, norms 1), in the order of `shapes`: what a
    /// tiny random config in tests starts from; a checkpoint overwrites it.
    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64) {
        for (name, shape) in self.shapes(embed_dim, num_classes) {
            let init = if name.contains("norm") { Init::Const(1.0) } else { Init::Randn { mean: 0.0, stdev: 0.02 } };
            let (path, last) = dotted_path(root, &name);
            let _ = path.var(last, &shape, init);
        }
    }

    fn warm(&self, params: &Params, emb: &Tensor, mask: &Tensor) {
        if let Some(blocks) = self.cached_blocks(emb) {
            tch::no_grad(|| frozen_prefix::states(self, params, emb, mask, blocks, false));
        }
    }

    /// The lower blocks under `Regime::Top`.
    fn frozen(&self, name: &str) -> bool {
        let Regime::Top(n) = self.shape.regime else { return false };
        block_of(name).is_some_and(|l| l + n < self.shape.layers)
    }

    fn check(&self, embed_dim: usize, max_len: usize) -> Result<()> {
        let LlamaShape { layers, heads, kv_heads, ffn, rope_theta, rms_eps, regime, .. } = self.shape;
        if let Regime::Top(n) = regime {
            if n == 0 || n > layers {
                bail!("regime {regime} names no layers of a {layers}-layer model: give top:1 to top:{layers}, or all");
            }
        }
        if layers == 0 || heads == 0 || kv_heads == 0 || ffn == 0 || self.width == 0 {
            bail!("a Llama with {layers} layers, {heads} heads, {kv_heads} key-value heads, feed-forward {ffn} and width {}: every size must be positive", self.width);
        }
        if self.width != embed_dim {
            bail!("a Llama of width {} over a word table of width {embed_dim}: they must be equal", self.width);
        }
        if self.width % heads != 0 || (self.width / heads) % 2 != 0 {
            bail!("width {} over {heads} heads: the head width must be a whole even number (rotary pairs)", self.width);
        }
        if heads % kv_heads != 0 {
            bail!("{heads} query heads are not whole groups of the {kv_heads} key-value heads");
        }
        if !(rope_theta > 0.0 && rms_eps > 0.0 && rope_theta.is_finite() && rms_eps.is_finite()) {
            bail!("rope theta {rope_theta} and RMSNorm eps {rms_eps} must be positive");
        }
        if self.positions != max_len {
            bail!("a Llama context of {} positions for max_len {max_len}", self.positions);
        }
        Ok(())
    }

    /// The final hidden states (after the final norm), mean-pooled over each row's tokens.
    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        let hidden = self.hidden(params, emb, None, Some(mask));
        let mask = if hidden.dim() == 4 && mask.dim() == 2 { mask.unsqueeze(0).expand([hidden.size()[0], -1, -1], false) } else { mask.shallow_clone() };
        crate::victims::bert::mean_pool(&hidden, &mask)
    }

    /// Next-token logits [.., batch, time, vocab]. Right padding needs no mask: a causal
    /// model never attends to later positions.
    fn forward(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        self.head(params, &self.hidden(params, emb, None, Some(mask)))
    }

    /// The head at the gathered positions only: at 49,152 pieces it is the largest matrix.
    fn logits_at(&self, params: &Params, emb: &Tensor, mask: &Tensor, last: &Tensor) -> Tensor {
        self.head(params, &gather_rows(&self.hidden(params, emb, None, Some(mask)), last))
    }

    fn tuning(&self) -> Tuning {
        Tuning { verify_stack: 1, verify_chunk: 4, default_lr: 1e-4 }
    }

    /// The cache holds the prompt and `PREFILL_ROOM` more positions; `decode_step` grows
    /// it (doubling) when a row reaches its end, so a short generation from a model with
    /// a long context does not hold the whole context's keys.
    fn prefill(&self, params: &Params, emb: &Tensor, last: &Tensor) -> Option<(Tensor, KvCache)> {
        let t = emb.size()[1];
        let room = (t + PREFILL_ROOM).min(self.positions as i64).max(t);
        let mut cache = KvCache { layers: Vec::with_capacity(self.shape.layers) };
        // Right padding: each row's tokens are its positions up to its last.
        let mask = Tensor::arange(t, (Kind::Int64, emb.device())).unsqueeze(0).le_tensor(&last.unsqueeze(1)).to_kind(emb.kind());
        let hidden = self.hidden(params, emb, Some((&mut cache, room)), Some(&mask));
        Some((self.head(params, &gather_rows(&hidden, last)), cache))
    }

    fn decode_step(&self, params: &Params, cache: &mut KvCache, emb: &Tensor, at: &Tensor) -> Tensor {
        let b = emb.size()[0];
        let need = at.max().int64_value(&[]) + 1;
        if need > self.positions as i64 {
            panic!("decoding position {} beyond the model's context of {}", need - 1, self.positions);
        }
        let room = cache.layers[0].0.size()[2];
        if need > room {
            let grown = (room * 2).max(need).min(self.positions as i64);
            for (keys, values) in cache.layers.iter_mut() {
                let pad = |x: &Tensor| {
                    let mut s = x.size();
                    s[2] = grown - room;
                    Tensor::cat(&[x.shallow_clone(), x.new_zeros(s.as_slice(), (x.kind(), x.device()))], 2)
                };
                (*keys, *values) = (pad(keys), pad(values));
            }
        }
        let room = cache.layers[0].0.size()[2];
        let (cos, sin) = self.rope_tables(&at.view([b, 1, 1]), emb);
        // Row r attends to its positions ≤ at[r]: the cache's later entries are stale.
        let later = Tensor::arange(room, (Kind::Int64, emb.device())).unsqueeze(0).gt_tensor(&at.unsqueeze(1));
        let bias = (later.to_kind(emb.kind()) * -1e9).view([b, 1, 1, room]);
        let d = self.head_dim();
        let write_at = at.view([b, 1, 1, 1]).expand([b, self.shape.kv_heads as i64, 1, d], false);
        let mut h = emb.shallow_clone();
        for (block, (keys, values)) in self.block_names().zip(cache.layers.iter_mut()) {
            let a = rms_norm(params, &h, &format!("{block}.attn_norm"), self.shape.rms_eps);
            let (q, k, v) = self.qkv(params, &block, &a, &cos, &sin);
            let _ = keys.scatter_(2, &write_at, &k);
            let _ = values.scatter_(2, &write_at, &v);
            h = self.block_rest(params, &block, h, &q, keys, values, &bias);
        }
        self.head(params, &rms_norm(params, &h, "norm", self.shape.rms_eps)).squeeze_dim(1)
    }
}

/// The block a parameter belongs to ("block.3.attn.q.weight" → 3).
fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("block.").and_then(|rest| rest.split('.').next()).and_then(|l| l.parse().ok())
}

/// Positions a fresh cache holds beyond its prompt.
const PREFILL_ROOM: i64 = 64;

/// The frozen lower blocks' output per text, kept for the life of the process: under
/// `Regime::Top(n)` the lower blocks never change, so a text's residual stream after them
/// is computed once and read by every epoch, every fine-tuned copy of the same checkpoint
/// (the evaluation's clean twins and poisoned models) and every measurement. The step then
/// runs the top blocks and the head only.
///
/// Each row is computed alone, unpadded, so its bits do not depend on which batch or
/// thread asked first: a run gives the same bits whatever its batches and workers, and
/// equal to a run without the cache
/// (`cached_lower_blocks_give_the_uncached_logits_and_the_same_bits_every_time`)
/// up to the batch-shape differences of the matrix products (the cached path is the only
/// one a `Top` model uses once its inputs need no gradient, so its results are
/// reproducible). The key is the row's input vectors and a fingerprint of the lower
/// blocks: their names, shapes, kind, device and 256 values spread over each tensor.
/// Inputs that need a gradient (the poisons' words in an unrolled step) always run every
/// block, so the gradient to them flows through the frozen ones.
mod frozen_prefix {
    use super::{block_of, Llama};
    use crate::victims::params::Params;
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tch::{Kind, Tensor};

    /// Rows kept at most (bytes of their states); beyond, rows are computed and not kept.
    const LIMIT_BYTES: usize = 4 << 30;

    #[derive(Default)]
    struct Store {
        rows: HashMap<[u8; 32], Vec<Tensor>>,
        bytes: usize,
    }

    static STORE: Mutex<Option<Store>> = Mutex::new(None);

    fn fingerprint(model: &Llama, params: &Params, blocks: usize) -> Sha256 {
        let mut h = Sha256::new();
        h.update(format!("{:?} {} {blocks}", model.shape, model.width).as_bytes());
        for (name, p) in params.iter().filter(|(name, _)| block_of(name).is_some_and(|l| l < blocks)) {
            h.update(format!("{name} {:?} {:?} {:?}", p.size(), p.kind(), p.device()).as_bytes());
            let flat = p.detach().flatten(0, -1);
            let n = flat.size()[0];
            let sample = flat.slice(0, 0, n, (n / 256).max(1)).to_kind(Kind::Double).to_device(tch::Device::Cpu);
            for x in Vec::<f64>::try_from(sample).expect("f64 values") {
                h.update(x.to_le_bytes());
            }
        }
        h
    }

    /// The residual stream after the first `blocks` blocks for right-padded inputs
    /// [B, T, E] (padding positions zero: no real position reads them), and with
    /// `keys_values` (a generation's prefill) each of those blocks' keys and values
    /// [B, kv_heads, T, d] (zero past each row's end: decoding overwrites or never reads
    /// them); None when a lower block needs a gradient.
    #[allow(clippy::type_complexity)]
    pub fn states(model: &Llama, params: &Params, emb: &Tensor, mask: &Tensor, blocks: usize, keys_values: bool) -> Option<(Tensor, Vec<(Tensor, Tensor)>)> {
        if params.iter().any(|(name, p)| block_of(name).is_some_and(|l| l < blocks) && p.requires_grad()) {
            return None;
        }
        let t = emb.size()[1];
        let lengths = Vec::<i64>::try_from(mask.sum_dim_intlist(-1, false, Kind::Int64).to_device(tch::Device::Cpu)).expect("row lengths");
        let mut base = fingerprint(model, params, blocks);
        base.update([keys_values as u8]);
        // Per row: [state, k0, v0, ...], each padded to T along its time dimension.
        let mut rows: Vec<Vec<Tensor>> = Vec::with_capacity(lengths.len());
        for (r, &len) in lengths.iter().enumerate() {
            let row = emb.get(r as i64).narrow(0, 0, len.max(1)).unsqueeze(0);
            let mut key = base.clone();
            for x in Vec::<f64>::try_from(row.to_kind(Kind::Double).to_device(tch::Device::Cpu).flatten(0, -1)).expect("f64 inputs") {
                key.update(x.to_le_bytes());
            }
            let key: [u8; 32] = key.finalize().into();
            let found = STORE.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|s| s.rows.get(&key).map(|ts| ts.iter().map(Tensor::shallow_clone).collect::<Vec<_>>()));
            let parts = match found {
                Some(parts) => parts,
                None => {
                    let parts = tch::no_grad(|| model.lower_blocks(params, &row, blocks, keys_values));
                    let mut store = STORE.lock().unwrap_or_else(|e| e.into_inner());
                    let store = store.get_or_insert_with(Store::default);
                    let size: usize = parts.iter().map(|p| p.numel() * p.kind().elt_size_in_bytes()).sum();
                    if store.bytes + size <= LIMIT_BYTES {
                        store.bytes += size;
                        store.rows.insert(key, parts.iter().map(Tensor::shallow_clone).collect());
                    }
                    parts
                }
            };
            // The time dimension: the state's first, a key's or value's second.
            let padded = parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    let dim = if i == 0 { 0 } else { 1 };
                    let pad = t - p.size()[dim];
                    if pad == 0 {
                        return p;
                    }
                    let mut shape = p.size();
                    shape[dim] = pad;
                    Tensor::cat(&[&p, &p.new_zeros(shape.as_slice(), (p.kind(), p.device()))], dim as i64)
                })
                .collect();
            rows.push(padded);
        }
        let column = |i: usize| Tensor::stack(&rows.iter().map(|r| r[i].shallow_clone()).collect::<Vec<_>>(), 0);
        let keys_values = (0..if keys_values { blocks } else { 0 }).map(|l| (column(1 + 2 * l), column(2 + 2 * l))).collect();
        Some((column(0), keys_values))
    }
}

/// Hidden states [B, T, W] at one position per row (`last` [B]): [B, W].
fn gather_rows(hidden: &Tensor, last: &Tensor) -> Tensor {
    let w = hidden.size()[2];
    hidden.gather(1, &last.view([-1, 1, 1]).expand([-1, 1, w], false), false).squeeze_dim(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::victims::model::{embed, tiny_config, Arch, Victim};
    use tch::Device;

    fn tiny_tied(tied: bool) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let mut config = tiny_config(Arch::Llama, 12, 8, 8, 2, false, 16);
        if let crate::victims::model::ArchConfig::Llama(l) = &mut config.arch {
            l.shape.tied = tied;
            l.shape.heads = 2;
            l.shape.kv_heads = 1;
        }
        let mut v = Victim::new(config, &(Tensor::randn([12, 8], (Kind::Float, Device::Cpu)) * 0.5), Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        v
    }

    #[test]
    fn cached_decoding_equals_the_full_forward_and_the_cache_grows() {
        // Under top:1 the prefill reads the frozen block's keys and values from the
        // process's cache of them (filled by the first pass, read by the second).
        for (tied, regime, pass) in [(true, Regime::All, 0), (false, Regime::All, 0), (false, Regime::Top(1), 0), (false, Regime::Top(1), 1)] {
            let v = tiny_tied(tied);
            let p = v.params();
            let mut config = v.config.clone();
            if let crate::victims::model::ArchConfig::Llama(l) = &mut config.arch {
                l.shape.regime = regime;
            }
            let arch = config.arch();
            let tied = format!("{tied} {regime} pass {pass}");
            let rows: Vec<Vec<i64>> = vec![vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9, 10]];
            // Prefill the first 3 tokens of each row, then decode the rest one by one.
            let ids = Tensor::from_slice(&rows.iter().flat_map(|r| r[..3].to_vec()).collect::<Vec<_>>()).view([2, 3]);
            let (first, mut cache) = arch.prefill(&p, &embed(&p, &ids), &Tensor::from_slice(&[2i64, 2])).unwrap();
            let full_ids = Tensor::from_slice(&rows.concat()).view([2, 14]);
            let full = arch.forward(&p, &embed(&p, &full_ids), &Tensor::ones([2, 14], (Kind::Double, Device::Cpu)));
            let diff = (&first - full.select(1, 2)).abs().max().double_value(&[]);
            assert!(diff < 1e-10, "prefill differs by {diff}");
            for t in 3..14 {
                let words = Tensor::from_slice(&[rows[0][t], rows[1][t]]).view([2, 1]);
                let logits = arch.decode_step(&p, &mut cache, &embed(&p, &words), &Tensor::from_slice(&[t as i64, t as i64]));
                let diff = (&logits - full.select(1, t as i64)).abs().max().double_value(&[]);
                assert!(diff < 1e-10, "tied={tied}: position {t} differs by {diff}");
            }
            assert_eq!(cache.layers[0].0.size()[2], 16, "the cache grew to the context, no further");
        }
    }

    #[test]
    fn a_top_regime_trains_the_top_blocks_and_the_words_still_get_a_gradient_through_the_frozen_ones() {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(9);
        let mut config = tiny_config(Arch::Llama, 12, 8, 8, 2, false, 16);
        if let crate::victims::model::ArchConfig::Llama(l) = &mut config.arch {
            l.shape.regime = Regime::Top(1);
        }
        let v = Victim::new(config, &Tensor::randn([12, 8], (Kind::Float, Device::Cpu)), Device::Cpu).unwrap();
        let p = v.params();
        let trained = crate::victims::params::trainable_names(&p);
        assert!(trained.iter().all(|n| n.starts_with("block.1.") || n == "norm.weight" || n == "out.weight"), "{trained:?}");
        assert_eq!(trained.len(), 11);
        let emb = embed(&p, &Tensor::from_slice(&[3i64, 4, 5]).view([1, 3])).detach().set_requires_grad(true);
        let loss = v.config.arch().forward(&p, &emb, &Tensor::ones([1, 3], (Kind::Float, Device::Cpu))).select(1, 2).logsumexp([-1].as_slice(), false).sum(Kind::Float);
        let g = Tensor::run_backward(&[&loss], &[&emb], false, false).pop().unwrap();
        // Position 0 reaches position 2's output only through attention in both blocks.
        assert!(g.get(0).get(0).abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert_eq!("top:3".parse::<Regime>(), Ok(Regime::Top(3)));
        assert!("top:x".parse::<Regime>().is_err() && "none".parse::<Regime>().is_err());
    }

    /// Under a top regime the frozen lower block is read from the cache for inputs that
    /// need no gradient: the logits of right-padded rows of unequal lengths equal the
    /// whole model's (f64), a second pass (every row from the cache) gives the same bits,
    /// and a row's logits do not depend on the batch it came in.
    #[test]
    fn cached_lower_blocks_give_the_uncached_logits_and_the_same_bits_every_time() {
        let whole = tiny_tied(false);
        let mut config = whole.config.clone();
        if let crate::victims::model::ArchConfig::Llama(l) = &mut config.arch {
            l.shape.regime = Regime::Top(1);
        }
        let p = whole.params();
        let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8, 9, 0, 10, 11, 0, 0]).view([3, 4]);
        let (emb, mask) = (embed(&p, &ids), crate::victims::model::mask_of(&ids, &p));
        let uncached = whole.config.arch().forward(&p, &emb, &mask);
        let first = config.arch().forward(&p, &emb, &mask);
        let again = config.arch().forward(&p, &emb, &mask);
        for (r, len) in [(0, 4), (1, 3), (2, 2)] {
            let (a, b) = (uncached.get(r).narrow(0, 0, len), first.get(r).narrow(0, 0, len));
            assert!((a - &b).abs().max().double_value(&[]) < 1e-12, "row {r}");
        }
        assert!(first.equal(&again), "the cached pass repeats its bits");
        let alone = config.arch().forward(&p, &emb.narrow(0, 1, 1).narrow(1, 0, 3), &mask.narrow(0, 1, 1).narrow(1, 0, 3));
        let in_batch = first.get(1).narrow(0, 0, 3);
        assert!((alone.get(0) - in_batch).abs().max().double_value(&[]) < 1e-12);
        // A model whose lower block differs does not read the other's rows.
        let other = tiny_tied(true);
        let q = other.params();
        let mut other_config = other.config.clone();
        if let crate::victims::model::ArchConfig::Llama(l) = &mut other_config.arch {
            l.shape.regime = Regime::Top(1);
        }
        let (oemb, omask) = (embed(&q, &ids), crate::victims::model::mask_of(&ids, &q));
        let _ = tch::no_grad(|| q["block.0.attn.q.weight"].shallow_clone().g_add_scalar_(0.25));
        let cached = other_config.arch().forward(&q, &oemb, &omask);
        let plain = other.config.arch().forward(&q, &oemb, &omask);
        assert!((cached.get(0) - plain.get(0)).abs().max().double_value(&[]) < 1e-12);
    }

    #[test]
    fn rotary_embedding_rotates_each_half_pair_by_position_times_frequency() {
        let v = tiny_tied(true);
        let crate::victims::model::ArchConfig::Llama(l) = &v.config.arch else { panic!() };
        let (cos, sin) = l.rope_tables(&Tensor::from_slice(&[3i64]), &Tensor::zeros([1], (Kind::Double, Device::Cpu)));
        // Head width 4: frequencies θ^0 and θ^(-1/2), each twice.
        let theta = l.shape.rope_theta;
        for (i, f) in [1.0, theta.powf(-0.5), 1.0, theta.powf(-0.5)].iter().enumerate() {
            assert!((cos.double_value(&[0, i as i64]) - (3.0 * f).cos()).abs() < 1e-12);
            assert!((sin.double_value(&[0, i as i64]) - (3.0 * f).sin()).abs() < 1e-12);
        }
    }
}
