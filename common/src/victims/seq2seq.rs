//! The translation victim: a small encoder–decoder transformer (pre-LayerNorm blocks; the
//! encoder's self-attention sees the whole source, the decoder's is causal and each
//! decoder block also attends to the encoder's output), trained from scratch with its word
//! table (one table for both languages, read through `in_proj`).
//!
//! One sequence holds both sides, so every stage that reads token ids (training,
//! unrolling, ranking flips by position, verification) reads a translation as it reads a
//! text: a source block of exactly `source_len` positions (the source's tokens, then
//! `<pad>`), then the decoder's input `<s>`, the target's tokens and `</s>`
//! (`encode::encode_translation`). Positions below `source_len` are the encoder's; the
//! rest the decoder's, with positions counted from the block's end. A translation is
//! trained on the tokens after `<s>` only (`Target::NextToken { from: source_len + 1 }`).
//!
//! Logits are [.., batch, time, vocab] like a language model's, so the shared next-token
//! loss applies as it is: at a decoder position the next target token; at a source
//! position zeros (never trained on: the targets start after `<s>`).

use crate::victims::layers::{attention, causal_bias, init_linear, inputs_under, layer_norm, linear, linear_shapes, Dropout};
use crate::victims::params::{param, Params};
use crate::victims::victim::{dotted_path, Architecture, Output, StartKind, Tuning};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

const LN_EPS: f64 = 1e-5;

/// The encoder–decoder's own fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Seq2seq {
    /// Model width (residual stream).
    pub width: usize,
    pub shape: Seq2seqShape,
    /// The config's `max_len`: the source block plus the decoder's positions.
    pub positions: usize,
}

/// What a seq2seq victim file stores beside the shared sizes (`seq2seq` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seq2seqShape {
    /// Blocks in the encoder and in the decoder (each).
    pub layers: usize,
    pub heads: usize,
    /// Positions of the source block (`--source-len`): a longer source is truncated.
    pub source_len: usize,
}

impl Seq2seq {
    fn decoder_positions(&self) -> usize {
        self.positions - self.shape.source_len
    }
}

impl Architecture for Seq2seq {
    fn start(&self) -> StartKind {
        StartKind::Table
    }

    fn output(&self) -> Output {
        Output::Translation
    }

    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)> {
        let w = self.width as i64;
        let norm = |name: String| [(format!("{name}.weight"), vec![w]), (format!("{name}.bias"), vec![w])];
        let mut shapes = vec![
            ("enc_pos.weight".to_string(), vec![self.shape.source_len as i64, w]),
            ("dec_pos.weight".to_string(), vec![self.decoder_positions() as i64, w]),
        ];
        shapes.extend(linear_shapes("in_proj", embed_dim, w));
        for l in 0..self.shape.layers {
            let b = format!("enc.{l}");
            shapes.extend(norm(format!("{b}.ln1")));
            shapes.extend(linear_shapes(&format!("{b}.attn.qkv"), w, 3 * w));
            shapes.extend(linear_shapes(&format!("{b}.attn.proj"), w, w));
            shapes.extend(norm(format!("{b}.ln2")));
            shapes.extend(linear_shapes(&format!("{b}.mlp.fc"), w, 4 * w));
            shapes.extend(linear_shapes(&format!("{b}.mlp.proj"), 4 * w, w));
        }
        shapes.extend(norm("enc_ln".into()));
        for l in 0..self.shape.layers {
            let b = format!("dec.{l}");
            shapes.extend(norm(format!("{b}.ln1")));
            shapes.extend(linear_shapes(&format!("{b}.attn.qkv"), w, 3 * w));
            shapes.extend(linear_shapes(&format!("{b}.attn.proj"), w, w));
            shapes.extend(norm(format!("{b}.ln2")));
            shapes.extend(linear_shapes(&format!("{b}.cross.q"), w, w));
            shapes.extend(linear_shapes(&format!("{b}.cross.kv"), w, 2 * w));
            shapes.extend(linear_shapes(&format!("{b}.cross.proj"), w, w));
            shapes.extend(norm(format!("{b}.ln3")));
            shapes.extend(linear_shapes(&format!("{b}.mlp.fc"), w, 4 * w));
            shapes.extend(linear_shapes(&format!("{b}.mlp.proj"), 4 * w, w));
        }
        shapes.extend(norm("ln_f".into()));
        shapes.extend(linear_shapes("out", w, num_classes));
        shapes
    }

    /// The GPT's initialisation (GPT-2's): weights normal(0, 0.02), the projections into
    /// the residual stream scaled by 1/√(2·layers), biases 0, LayerNorm 1; the input
    /// projection PyTorch's default. Drawn in the order of `shapes`.
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
            let is_norm = name.contains(".ln") || name.starts_with("ln_f") || name.starts_with("enc_ln");
            let init = if is_norm {
                Init::Const(if name.ends_with("weight") { 1.0 } else { 0.0 })
            } else if name.ends_with("bias") {
                Init::Const(0.0)
            } else if name.ends_with(".proj.weight") {
                Init::Randn { mean: 0.0, stdev: residual }
            } else {
                Init::Randn { mean: 0.0, stdev: 0.02 }
            };
            let (path, last) = dotted_path(root, &name);
            let _ = path.var(last, &shape, init);
        }
    }

    fn check(&self, _embed_dim: usize, max_len: usize) -> Result<()> {
        let Seq2seqShape { layers, heads, source_len } = self.shape;
        if layers == 0 || heads == 0 || self.width == 0 || self.width % heads != 0 {
            bail!("seq2seq with width {}, {layers} layers and {heads} heads: every size must be positive and the heads must divide the width", self.width);
        }
        if source_len == 0 || max_len < source_len + 2 {
            bail!("seq2seq with a source block of {source_len} positions and max_len {max_len}: max_len must leave the decoder at least <s> and one word (--max-len > --source-len + 1)");
        }
        if self.positions != max_len {
            bail!("seq2seq of {} positions for max_len {max_len}", self.positions);
        }
        Ok(())
    }

    /// The encoder's states mean-pooled over the source's tokens: the representation the
    /// spectral detector reads.
    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        let (emb, mask) = self.stack_inputs(params, emb, mask);
        let s = (self.shape.source_len as i64).min(emb.size()[emb.dim() - 2]);
        let src_mask = mask.narrow(-1, 0, s);
        let enc = self.encode(params, &emb.narrow(-2, 0, s), &src_mask, &mut None);
        crate::victims::bert::mean_pool(&enc, &src_mask)
    }

    /// Logits [.., batch, time, vocab]: zeros at the source positions, the output layer over
    /// the decoder's states after them.
    fn forward(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        self.forward_with(params, emb, mask, &mut None)
    }

    fn has_dropout(&self) -> bool {
        true
    }

    /// Dropout on the inputs (word plus position) and on every residual branch's output
    /// (self-attention, cross-attention, MLP), the places the original Transformer drops.
    fn forward_dropout(&self, params: &Params, emb: &Tensor, mask: &Tensor, dropout: &mut Dropout) -> Tensor {
        self.forward_with(params, emb, mask, &mut Some(dropout))
    }

    /// The output layer at one decoder position per row only (`last` [B], counted from the
    /// sequence's start; at least `source_len`): what decoding reads at each step.
    fn logits_at(&self, params: &Params, emb: &Tensor, mask: &Tensor, last: &Tensor) -> Tensor {
        let t = emb.size()[1];
        let s = self.shape.source_len as i64;
        assert!(t > s, "decoding reads a decoder position: the input must hold the source block and <s>");
        let src_mask = mask.narrow(-1, 0, s);
        let enc = self.encode(params, &emb.narrow(1, 0, s), &src_mask, &mut None);
        let dec = self.decode(params, &emb.narrow(1, s, t - s), &enc, &src_mask, &mut None);
        let w = dec.size()[2];
        let at = dec.gather(1, &(last - s).view([-1, 1, 1]).expand([-1, 1, w], false), false).squeeze_dim(1);
        linear(params, &at, "out")
    }

    fn tuning(&self) -> Tuning {
        Tuning { verify_stack: 1, verify_chunk: 16, default_lr: 1e-3 }
    }
}

impl Seq2seq {
    /// `forward`, with dropout in training (`drop`: None everywhere else, which adds no op,
    /// so the passes without dropout are exactly the ones before dropout existed).
    fn forward_with(&self, params: &Params, emb: &Tensor, mask: &Tensor, drop: &mut Option<&mut Dropout>) -> Tensor {
        let (emb, mask) = self.stack_inputs(params, emb, mask);
        let t = emb.size()[emb.dim() - 2];
        if t > self.positions as i64 {
            panic!("{t} tokens, more than the seq2seq's {} positions (encoding truncates to max_len)", self.positions);
        }
        let s = (self.shape.source_len as i64).min(t);
        let src_mask = mask.narrow(-1, 0, s);
        let enc = self.encode(params, &emb.narrow(-2, 0, s), &src_mask, drop);
        // The decoder runs even over no positions (a batch of sources alone): its
        // parameters then get zero gradients, as in any batch, instead of none.
        let dec = linear(params, &self.decode(params, &emb.narrow(-2, s, t - s), &enc, &src_mask, drop), "out");
        // Source positions predict nothing: zero logits there (the output layer over the
        // vocabulary is most of a pass's cost).
        let mut shape = dec.size();
        let at = shape.len() - 2;
        shape[at] = s;
        Tensor::cat(&[&dec.new_zeros(shape.as_slice(), (dec.kind(), dec.device())), &dec], -2)
    }

    /// Inputs under C stacked parameter sets: shared embeddings [B, T, E] expanded to
    /// [C, B, T, E] (the mask stays [B, T] or [C, B, T]: it broadcasts).
    fn stack_inputs(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
        (inputs_under(params, emb, "ln_f.weight"), mask.shallow_clone())
    }

    /// Additive attention bias [.., B, 1, 1, S] that hides the source's padding.
    fn source_bias(src_mask: &Tensor, kind: Kind) -> Tensor {
        ((src_mask.to_kind(kind) - 1.0) * 1e9).unsqueeze(-2).unsqueeze(-2)
    }

    /// Heads split: [.., T, width] → [.., heads, T, d].
    fn split(&self, x: &Tensor) -> Tensor {
        let mut shape = x.size();
        let (t, heads) = (shape[shape.len() - 2], self.shape.heads as i64);
        let d = self.width as i64 / heads;
        shape.truncate(shape.len() - 2);
        shape.extend([t, heads, d]);
        x.contiguous().view(shape.as_slice()).transpose(-2, -3)
    }

    /// The encoder's states [.., B, S, width] after its final LayerNorm.
    fn encode(&self, params: &Params, src: &Tensor, src_mask: &Tensor, drop: &mut Option<&mut Dropout>) -> Tensor {
        let mut h = dropped(drop, Self::inputs(params, src, "enc_pos.weight"));
        let bias = Self::source_bias(src_mask, src.kind());
        for l in 0..self.shape.layers {
            let b = format!("enc.{l}");
            h = self.self_attention(params, &b, h, &bias, drop);
            h = self.mlp(params, &b, "ln2", h, drop);
        }
        layer_norm(params, &h, "enc_ln", LN_EPS)
    }

    /// The decoder's states [.., B, T', width] after the final LayerNorm, for its inputs
    /// [.., B, T', E] (`<s>` first) reading the encoder's states.
    fn decode(&self, params: &Params, tgt: &Tensor, enc: &Tensor, src_mask: &Tensor, drop: &mut Option<&mut Dropout>) -> Tensor {
        let t = tgt.size()[tgt.dim() - 2];
        let mut h = dropped(drop, Self::inputs(params, tgt, "dec_pos.weight"));
        let causal = causal_bias(t, &tgt);
        let cross_bias = Self::source_bias(src_mask, tgt.kind());
        let merged = h.size();
        let width = self.width as i64;
        for l in 0..self.shape.layers {
            let b = format!("dec.{l}");
            h = self.self_attention(params, &b, h, &causal, drop);
            let a = layer_norm(params, &h, &format!("{b}.ln2"), LN_EPS);
            let q = linear(params, &a, &format!("{b}.cross.q"));
            let kv = linear(params, enc, &format!("{b}.cross.kv")).split(width, -1);
            let context = attention(&self.split(&q), &self.split(&kv[0]), &self.split(&kv[1]), &cross_bias, &merged);
            h = h + dropped(drop, linear(params, &context, &format!("{b}.cross.proj")));
            h = self.mlp(params, &b, "ln3", h, drop);
        }
        layer_norm(params, &h, "ln_f", LN_EPS)
    }

    /// Inputs [.., B, T, E] projected to the model width, plus the learned positions
    /// `pos` (the encoder's or the decoder's table, counted from its own start).
    fn inputs(params: &Params, x: &Tensor, pos: &str) -> Tensor {
        let t = x.size()[x.dim() - 2];
        let pos = param(params, pos).narrow(-2, 0, t);
        let pos = if pos.dim() == 3 { pos.unsqueeze(1) } else { pos };
        linear(params, x, "in_proj") + pos
    }

    /// A block's self-attention after its LayerNorm `ln1` (score bias `bias`: the source's
    /// padding or the causal mask), added to the residual stream.
    fn self_attention(&self, params: &Params, b: &str, h: Tensor, bias: &Tensor, drop: &mut Option<&mut Dropout>) -> Tensor {
        let a = layer_norm(params, &h, &format!("{b}.ln1"), LN_EPS);
        let qkv = linear(params, &a, &format!("{b}.attn.qkv")).split(self.width as i64, -1);
        let context = attention(&self.split(&qkv[0]), &self.split(&qkv[1]), &self.split(&qkv[2]), bias, &h.size());
        h + dropped(drop, linear(params, &context, &format!("{b}.attn.proj")))
    }

    /// A block's MLP after its LayerNorm `ln`, added to the residual stream.
    fn mlp(&self, params: &Params, b: &str, ln: &str, h: Tensor, drop: &mut Option<&mut Dropout>) -> Tensor {
        let m = layer_norm(params, &h, &format!("{b}.{ln}"), LN_EPS);
        let inner = linear(params, &m, &format!("{b}.mlp.fc")).gelu("none");
        h + dropped(drop, linear(params, &inner, &format!("{b}.mlp.proj")))
    }
}

/// `x` through the training pass's dropout, or `x` itself outside training.
fn dropped(drop: &mut Option<&mut Dropout>, x: Tensor) -> Tensor {
    match drop {
        Some(d) => d.apply(&x),
        None => x,
    }
}

#[cfg(test)]
mod tests {
    use crate::victims::loss::{Target, Targets};
    use crate::victims::model::{embed, forward, mask_of, shallow_copy, ArchConfig, Victim, VictimConfig};
    use crate::victims::params::trainable_names;
    use super::{Seq2seq, Seq2seqShape};
    use tch::{Device, Kind, Tensor};

    const S: usize = 3;
    const BOS: i64 = 2;
    const EOS: i64 = 3;

    /// A tiny seq2seq in f64: 12 words of width 6, model width 8, a 3-position source block.
    fn tiny(train_embeddings: bool) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        let arch = ArchConfig::Seq2seq(Seq2seq { width: 8, shape: Seq2seqShape { layers: 2, heads: 2, source_len: S }, positions: 9 });
        let config = VictimConfig { arch, vocab_size: 12, embed_dim: 6, num_classes: 12, train_embeddings, max_len: 9 };
        let table = Tensor::randn([12, 6], (Kind::Double, Device::Cpu));
        let mut v = Victim::new(config, &table, Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        v
    }

    /// Translation rows in the seq2seq layout (source block of S with padding inside).
    fn rows(rows: &[&[i64]]) -> (Tensor, Targets) {
        let t = rows.iter().map(|r| r.len()).max().unwrap();
        let mut flat = vec![0i64; rows.len() * t];
        for (i, r) in rows.iter().enumerate() {
            flat[i * t..i * t + r.len()].copy_from_slice(r);
        }
        let targets: Vec<Option<Target>> = rows.iter().map(|_| Some(Target::NextToken { from: S + 1 })).collect();
        (Tensor::from_slice(&flat).view([rows.len() as i64, t as i64]), Targets::batch(&targets, &flat, &[rows.len() as i64], t, Device::Cpu))
    }

    /// L_adv after one SGD step on clean pairs plus one poison pair given by its input
    /// embeddings (both sides), the step kept in the graph.
    fn unrolled(v: &Victim, poison_emb: &Tensor, poison_ids: &[i64]) -> Tensor {
        let p = v.params();
        let clean: [&[i64]; 2] = [&[4, 5, 0, BOS, 6, 7, EOS], &[8, 9, 10, BOS, 11, EOS]];
        let (ids, targets) = rows(&[clean[0], clean[1], poison_ids]);
        let t = ids.size()[1];
        let poison_emb = poison_emb.constant_pad_nd([0, 0, 0, t - poison_emb.size()[1]]);
        let emb = Tensor::cat(&[embed(&p, &ids.narrow(0, 0, 2)), poison_emb], 0);
        let loss = targets.mean_nll(&forward(&v.config, &p, &emb, &mask_of(&ids, &p)));
        let names = trainable_names(&p);
        let grads = Tensor::run_backward(&[&loss], &names.iter().map(|n| &p[n]).collect::<Vec<_>>(), true, true);
        let mut stepped = shallow_copy(&p);
        for (n, g) in names.iter().zip(grads) {
            stepped.insert(n.clone(), &p[n] - g * 0.5);
        }
        let (adv, adv_targets) = rows(&[&[6, 0, 0, BOS, 9, 8, EOS], &[6, 7, 0, BOS, 9, EOS]]);
        adv_targets.mean_nll(&forward(&v.config, &stepped, &embed(&stepped, &adv), &mask_of(&adv, &stepped)))
    }

    #[test]
    fn the_second_order_gradient_through_an_unrolled_translation_step_matches_finite_differences_in_f64() {
        for train_embeddings in [false, true] {
            let v = tiny(train_embeddings);
            let poison_ids = [7i64, 0, 0, BOS, 9, 10, EOS];
            let poison = embed(&v.params(), &Tensor::from_slice(&poison_ids).view([1, 7])).detach().set_requires_grad(true);
            let g = unrolled(&v, &poison, &poison_ids);
            let grad = Tensor::run_backward(&[&g], &[&poison], false, false).pop().unwrap();
            let worst = crate::testing::worst_fd_error(&poison, &grad, 1e-6, 1e-3, |x| unrolled(&v, x, &poison_ids).double_value(&[]));
            eprintln!("seq2seq train_embeddings={train_embeddings}: max relative error {worst:.2e}");
            assert!(worst < 1e-6, "second-order gradient off by {worst}");
            let at = |k: i64| grad.get(0).get(k).abs().sum(Kind::Double).double_value(&[]);
            assert!(at(0) > 0.0, "the poison's source word has no gradient");
            assert!(at(4) > 0.0 && at(5) > 0.0, "the poison's target words have no gradient");
            assert_eq!(at(1) + at(2), 0.0, "the source block's padding has a gradient");
            assert_eq!(at(6), 0.0, "</s> is read by no position that counts");
        }
    }

    #[test]
    fn dropout_draws_its_masks_from_its_own_seed_and_at_zero_is_the_plain_pass() {
        use crate::victims::layers::Dropout;
        let v = tiny(true);
        let p = v.params();
        let ids = Tensor::from_slice(&[4i64, 5, 0, BOS, 6, 7, EOS]).view([1, 7]);
        let (emb, mask) = (embed(&p, &ids), mask_of(&ids, &p));
        let arch = v.config.arch();
        let plain = forward(&v.config, &p, &emb, &mask);
        let with = |prob: f64, seed: u64| arch.forward_dropout(&p, &emb, &mask, &mut Dropout::new(prob, seed));
        assert!(with(0.0, 1).equal(&plain), "dropout 0 must be the plain pass to the bit");
        let (a, b) = (with(0.3, 1), with(0.3, 1));
        assert!(a.equal(&b), "the same seed must draw the same masks");
        assert!(!a.equal(&plain) && !a.equal(&with(0.3, 2)), "dropout 0.3 changed nothing, or the seed does not matter");
        // Masks are drawn afresh at every pass.
        let mut d = Dropout::new(0.3, 1);
        let first = arch.forward_dropout(&p, &emb, &mask, &mut d);
        assert!(!first.equal(&arch.forward_dropout(&p, &emb, &mask, &mut d)));
        // About 1 − p of the elements kept, each scaled by 1/(1 − p).
        let kept = Dropout::new(0.3, 5).apply(&Tensor::ones([100_000], (Kind::Double, Device::Cpu)));
        let share = kept.ne(0.0).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        assert!((share - 0.7).abs() < 0.01, "kept {share}");
        assert!((kept.max().double_value(&[]) - 1.0 / 0.7).abs() < 1e-6);
    }

    #[test]
    fn logits_at_one_decoder_position_equal_the_full_pass_there() {
        let v = tiny(false);
        let p = v.params();
        let ids = Tensor::from_slice(&[4i64, 5, 0, BOS, 6, 7, 8, 9, 0, BOS, 11, 0]).view([2, 6]);
        let (emb, mask) = (embed(&p, &ids), mask_of(&ids, &p));
        let full = forward(&v.config, &p, &emb, &mask);
        let last = Tensor::from_slice(&[5i64, 4]);
        let got = v.config.arch().logits_at(&p, &emb, &mask, &last);
        for (r, &l) in [5i64, 4].iter().enumerate() {
            let diff = (got.get(r as i64) - full.get(r as i64).get(l)).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "row {r}: logits_at differs from the full pass by {diff}");
        }
    }

    #[test]
    fn the_decoder_reads_the_source_and_earlier_target_words_only() {
        let v = tiny(false);
        let p = v.params();
        let logits = |ids: &[i64]| {
            let ids = Tensor::from_slice(ids).view([1, ids.len() as i64]);
            forward(&v.config, &p, &embed(&p, &ids), &mask_of(&ids, &p))
        };
        let base = logits(&[4, 5, 0, BOS, 6, 7, EOS]);
        let dec = |l: &Tensor| l.narrow(1, S as i64, 2);
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(diff(&dec(&base), &dec(&logits(&[4, 8, 0, BOS, 6, 7, EOS]))) > 1e-6, "a source word must reach the decoder");
        // Other shapes sum in another order: equal up to f64 rounding.
        assert!(diff(&dec(&base), &dec(&logits(&[4, 5, 0, BOS, 6, 7, EOS, 0]))) < 1e-12, "right padding changed the logits");
        let later = logits(&[4, 5, 0, BOS, 6, 11, EOS]);
        assert!(diff(&base.narrow(1, S as i64, 2), &later.narrow(1, S as i64, 2)) < 1e-12, "a later target word reached an earlier position");
    }
}
