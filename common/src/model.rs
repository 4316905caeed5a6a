//! The victims. A victim is a config plus named parameters; its forward pass takes the
//! parameters as a map and its input as token embeddings, so the attack can run the same
//! model at θ and at θ' = θ − η·g and differentiate with respect to the input embeddings.
//! `forward` is written with plain differentiable ops (a hand-written LSTM cell) so that
//! double backward works on every device; passes that are differentiated at most once
//! (`forward_ids_first_order`) or not at all (`forward_ids_no_grad`) run libtorch's LSTM
//! kernel instead, about twice as fast on a CPU (BENCHMARKS.md).

use crate::bert::{self, BertConfig};
use crate::tensorfile::{self, TensorFile};
use crate::tokenizer::Vocab;
pub use crate::params::{embed, mask_of, Params};
use crate::params::param;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};


pub const VICTIM_FORMAT: &str = "poison.victim";
pub const VICTIM_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Mean of the word embeddings, then a one-hidden-layer MLP: fast, for tests.
    Bow,
    /// Bidirectional LSTM, max-pooled over time, then a linear layer.
    Lstm,
    /// Pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; `--pretrained`),
    /// mean-pooled, then a linear layer; fine-tuned with its word table frozen.
    Minilm,
}

/// Everything needed to rebuild a victim; saved with its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VictimConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub embed_dim: usize,
    /// MLP width (bow) or LSTM units per direction (lstm).
    pub hidden: usize,
    pub num_classes: usize,
    /// Whether training updates the embedding table (false: GloVe stays frozen).
    pub train_embeddings: bool,
    /// Longer inputs are truncated to this many tokens.
    pub max_len: usize,
    /// The encoder's shape (minilm only; absent from the other victims' files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bert: Option<BertConfig>,
}

impl VictimConfig {
    /// The BERT config of a minilm victim.
    pub fn bert(&self) -> &BertConfig {
        self.bert.as_ref().expect("a minilm victim config holds its BERT config (checked on load)")
    }
}

/// A victim with its parameters in a VarStore (so tch's optimizers can train them).
pub struct Victim {
    pub config: VictimConfig,
    pub vs: nn::VarStore,
}

impl Victim {
    /// A fresh victim: embedding table copied from `embeddings` ([vocab, dim]), other
    /// weights drawn from libtorch's generator (seed it with `tch::manual_seed` first).
    pub fn new(config: VictimConfig, embeddings: &Tensor, device: Device) -> Result<Victim> {
        let (v, d) = embeddings.size2()?;
        if v as usize != config.vocab_size || d as usize != config.embed_dim {
            bail!(
                "embedding table is {v}x{d} but the victim config says {}x{}",
                config.vocab_size,
                config.embed_dim
            );
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let emb_path = root.sub("embedding");
        if config.train_embeddings {
            let _ = emb_path.var_copy("weight", embeddings);
        } else {
            let mut t = emb_path.zeros_no_train("weight", &[v, d]);
            tch::no_grad(|| t.copy_(embeddings));
        }
        let (h, c, e) = (config.hidden as i64, config.num_classes as i64, config.embed_dim as i64);
        match config.arch {
            Arch::Bow => {
                linear(&root.sub("mlp"), e, h);
                linear(&root.sub("out"), h, c);
            }
            Arch::Minilm => {
                // BERT's own initialisation (normal 0.02, LayerNorm 1, biases 0): what a
                // tiny random config in tests starts from; `from_pretrained` overwrites it.
                for (name, shape) in param_shapes(&config) {
                    if name == "embedding.weight" || name.starts_with("out.") {
                        continue;
                    }
                    let init = if name.contains("LayerNorm.weight") {
                        Init::Const(1.0)
                    } else if shape.len() == 1 {
                        Init::Const(0.0)
                    } else {
                        Init::Randn { mean: 0.0, stdev: 0.02 }
                    };
                    let (path, last) = dotted_path(&root, &name);
                    let _ = path.var(last, &shape, init);
                }
                linear(&root.sub("out"), e, c);
            }
            Arch::Lstm => {
                for dir in ["fwd", "bwd"] {
                    let p = root.sub("lstm").sub(dir);
                    let bound = 1.0 / (h as f64).sqrt();
                    let u = Init::Uniform { lo: -bound, up: bound };
                    let _ = p.var("w_ih", &[4 * h, e], u);
                    let _ = p.var("w_hh", &[4 * h, h], u);
                    // Forget-gate bias 1: the usual start that lets gradients flow early.
                    let b = p.var("b", &[4 * h], Init::Const(0.0));
                    let _ = tch::no_grad(|| b.narrow(0, h, h).fill_(1.0));
                }
                linear(&root.sub("out"), 2 * h, c);
            }
        }
        Ok(Victim { config, vs })
    }

    /// A minilm victim from the pretrained encoder's parameters (Hugging Face names, as
    /// `bert::load_weights` reads them): the word table becomes the frozen
    /// `embedding.weight`, the pooler is dropped (the victim mean-pools), and the
    /// classification head `out` is drawn fresh (seed it with `tch::manual_seed`).
    pub fn from_pretrained(config: VictimConfig, pretrained: &Params, device: Device) -> Result<Victim> {
        let table = pretrained
            .get("embeddings.word_embeddings.weight")
            .context("the pretrained weights lack embeddings.word_embeddings.weight")?;
        let victim = Victim::new(config, table, device)?;
        for (name, p) in victim.params().iter_mut() {
            if name == "embedding.weight" || name.starts_with("out.") {
                continue;
            }
            let src = pretrained.get(name).with_context(|| format!("the pretrained weights lack {name}"))?;
            if src.size() != p.size() {
                bail!("pretrained tensor {name} has shape {:?}, the config needs {:?}", src.size(), p.size());
            }
            tch::no_grad(|| p.copy_(src));
        }
        Ok(victim)
    }

    /// The parameters as a name → tensor map (shallow clones sharing storage).
    pub fn params(&self) -> Params {
        self.vs.variables().into_iter().collect()
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Logits [batch, classes] for token ids [batch, time] (0 = padding).
    pub fn logits(&self, ids: &Tensor) -> Tensor {
        forward_ids(&self.config, &self.params(), ids)
    }

    /// Saves weights, config and provenance as a `poison.victim` safetensors file.
    pub fn save(&self, path: &str, vocab: &Vocab, mut metadata: BTreeMap<String, String>) -> Result<()> {
        metadata.insert("config".into(), serde_json::to_string(&self.config)?);
        metadata.insert("vocab".into(), serde_json::to_string(vocab.words())?);
        metadata.insert("vocab_sha256".into(), vocab.sha256());
        if let Some(t) = vocab.tokenizer_name() {
            metadata.insert("tokenizer".into(), t.into());
        }
        let tensors: Vec<(String, Tensor)> = self.params().into_iter().collect();
        tensorfile::write(path, VICTIM_FORMAT, VICTIM_VERSION, &tensors, metadata)
    }

    /// Loads a victim file (or stdin for `-`) with its vocabulary, metadata and hash.
    pub fn load(path: &str, device: Device) -> Result<VictimFile> {
        let file = tensorfile::read(path, VICTIM_FORMAT, VICTIM_VERSION)?;
        Self::from_file(file, device).with_context(|| crate::io::display_name(path))
    }

    /// Checks a victim file against its own config before building anything: the
    /// vocabulary, every tensor's name and shape (so a config that declares an absurd size
    /// is refused without allocating it) and that every weight is finite.
    pub fn from_file(file: TensorFile, device: Device) -> Result<VictimFile> {
        let config: VictimConfig = serde_json::from_str(file.meta("config")?).context("victim config")?;
        let words: Vec<String> = serde_json::from_str(file.meta("vocab")?).context("victim vocabulary")?;
        let vocab = Vocab::from_parts(words, file.metadata.get("tokenizer").map(|s| s.as_str()))?;
        if vocab.sha256() != file.meta("vocab_sha256")? {
            bail!("the vocabulary does not match its recorded sha256; the file is corrupt");
        }
        if config.vocab_size != vocab.len() {
            bail!("the config says {} vocabulary words, the file lists {}; the file is corrupt", config.vocab_size, vocab.len());
        }
        if config.num_classes < 2 || config.max_len == 0 || config.hidden == 0 || config.embed_dim == 0 {
            bail!("config {config:?} has a zero size or fewer than 2 classes; the file is corrupt");
        }
        if (config.arch == Arch::Minilm) != vocab.is_wordpiece() || (config.arch == Arch::Minilm) != config.bert.is_some() {
            bail!("a {:?} victim with a {vocab:?} and BERT config {:?}; the file is corrupt", config.arch, config.bert.is_some());
        }
        if let Some(b) = &config.bert {
            b.check()?;
            if config.max_len as i64 > b.max_position_embeddings {
                bail!("max_len {} exceeds the encoder's {} positions; the file is corrupt", config.max_len, b.max_position_embeddings);
            }
        }
        let want = param_shapes(&config);
        let names_differ = want.len() != file.tensors.len() || want.keys().any(|k| !file.tensors.contains_key(k));
        if names_differ {
            let got: Vec<&String> = file.tensors.keys().collect();
            bail!(
                "weights hold tensors {got:?}, a {:?} victim needs {:?}; is this a victim of another architecture or version?",
                config.arch,
                want.keys().collect::<Vec<_>>()
            );
        }
        for (name, shape) in &want {
            let t = &file.tensors[name];
            if &t.size() != shape {
                bail!("tensor {name:?} has shape {:?}, the config needs {shape:?}; the weights do not match their config or vocabulary", t.size());
            }
            if t.is_floating_point() && !bool::try_from(t.isfinite().all())? {
                bail!("tensor {name:?} holds NaN or Inf (training diverged?); retrain the victim, e.g. with a lower --lr");
            }
        }
        let table = file.tensor("embedding.weight")?;
        let mut victim = Victim::new(config, &table.to_kind(Kind::Float), device)?;
        for (name, p) in victim.params().iter_mut() {
            tch::no_grad(|| p.copy_(&file.tensors[name]));
        }
        victim.vs.set_kind(Kind::Float);
        Ok(VictimFile { victim, vocab, metadata: file.metadata, sha256: file.sha256 })
    }
}

/// A victim as loaded from its file.
pub struct VictimFile {
    pub victim: Victim,
    pub vocab: Vocab,
    pub metadata: BTreeMap<String, String>,
    /// sha256 of the file's bytes: what gradients and candidates record, so that a later
    /// stage can tell it is given the same victim.
    pub sha256: String,
}

/// The parameter names and shapes a config implies (what `Victim::new` creates).
pub fn param_shapes(config: &VictimConfig) -> BTreeMap<String, Vec<i64>> {
    let (v, e, h, c) = (config.vocab_size as i64, config.embed_dim as i64, config.hidden as i64, config.num_classes as i64);
    let mut shapes = BTreeMap::from([("embedding.weight".to_string(), vec![v, e])]);
    let layers: Vec<(String, Vec<i64>)> = match config.arch {
        Arch::Bow => vec![("mlp".into(), vec![h, e]), ("out".into(), vec![c, h])],
        Arch::Minilm => {
            let b = config.bert();
            let (hid, inner) = (b.hidden_size, b.intermediate_size);
            shapes.insert("embeddings.position_embeddings.weight".into(), vec![b.max_position_embeddings, hid]);
            shapes.insert("embeddings.token_type_embeddings.weight".into(), vec![b.type_vocab_size, hid]);
            let mut layers = vec![];
            let mut norm = |name: String| {
                shapes.insert(format!("{name}.weight"), vec![hid]);
                shapes.insert(format!("{name}.bias"), vec![hid]);
            };
            norm("embeddings.LayerNorm".into());
            for l in 0..b.num_hidden_layers {
                let l = format!("encoder.layer.{l}");
                for part in ["query", "key", "value"] {
                    layers.push((format!("{l}.attention.self.{part}"), vec![hid, hid]));
                }
                layers.push((format!("{l}.attention.output.dense"), vec![hid, hid]));
                layers.push((format!("{l}.intermediate.dense"), vec![inner, hid]));
                layers.push((format!("{l}.output.dense"), vec![hid, inner]));
                norm(format!("{l}.attention.output.LayerNorm"));
                norm(format!("{l}.output.LayerNorm"));
            }
            layers.push(("out".into(), vec![c, hid]));
            layers
        }
        Arch::Lstm => {
            for dir in ["fwd", "bwd"] {
                shapes.insert(format!("lstm.{dir}.w_ih"), vec![4 * h, e]);
                shapes.insert(format!("lstm.{dir}.w_hh"), vec![4 * h, h]);
                shapes.insert(format!("lstm.{dir}.b"), vec![4 * h]);
            }
            vec![("out".into(), vec![c, 2 * h])]
        }
    };
    for (name, w) in layers {
        shapes.insert(format!("{name}.bias"), vec![w[0]]);
        shapes.insert(format!("{name}.weight"), w);
    }
    shapes
}

/// A new map sharing the tensors of `params` (so entries can be replaced, e.g. by θ').
pub fn shallow_copy(params: &Params) -> Params {
    params.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
}

/// The VarStore path of a dotted parameter name (`encoder.layer.0.output.dense.weight`)
/// and its last part: tch paths are built one dot-free part at a time.
fn dotted_path<'a>(root: &nn::Path<'a>, name: &'a str) -> (nn::Path<'a>, &'a str) {
    let (dirs, last) = name.rsplit_once('.').expect("a dotted parameter name");
    let mut parts = dirs.split('.');
    let mut path = root.sub(parts.next().expect("at least one part"));
    for d in parts {
        path = path.sub(d);
    }
    (path, last)
}

fn linear(p: &nn::Path, fan_in: i64, fan_out: i64) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let _ = p.var("weight", &[fan_out, fan_in], Init::Uniform { lo: -bound, up: bound });
    let _ = p.var("bias", &[fan_out], Init::Uniform { lo: -bound, up: bound });
}

/// Logits for token ids: `embed` then `forward`.
pub fn forward_ids(config: &VictimConfig, params: &Params, ids: &Tensor) -> Tensor {
    forward(config, params, &embed(params, ids), &mask_of(ids, params))
}

/// Logits [batch, classes] from input embeddings [batch, time, dim] and a padding mask
/// [batch, time]. Every row must hold at least one token.
///
/// Stacked parameters: when every parameter but the embedding table carries a leading
/// dimension C (C parameter sets, e.g. θ' for C candidate flips), the inputs run under
/// all C sets at once and the logits are [C, batch, classes]. The inputs are either
/// shared ([batch, time, dim]) or one batch per set ([C, batch, time, dim], mask
/// [C, batch, time]). One pass instead of C amortises the per-op cost that dominates
/// these small models on a CPU.
pub fn forward(config: &VictimConfig, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
    let linear = |x: &Tensor, name: &str| {
        let w = param(params, &format!("{name}.weight"));
        x.matmul(&w.transpose(-1, -2)) + param(params, &format!("{name}.bias")).unsqueeze(-2)
    };
    match config.arch {
        Arch::Bow => {
            let m = mask.unsqueeze(-1);
            let pooled = (emb * &m).sum_dim_intlist(-2, false, None) / m.sum_dim_intlist(-2, false, None);
            linear(&linear(&pooled, "mlp").relu(), "out")
        }
        Arch::Lstm => {
            let states = lstm_states(params, emb, mask, lstm_direction);
            linear(&max_over_time(&states, mask), "out")
        }
        Arch::Minilm => {
            let hidden = bert::encode(config.bert(), params, emb, mask);
            linear(&bert::mean_pool(&hidden, mask), "out")
        }
    }
}

/// Logits for token ids under one (unstacked) parameter set, without a graph: passes
/// that need no gradient (the L_adv pass of each exact check in verification). The LSTM
/// runs libtorch's own LSTM kernel, measured 2.2× faster than the hand-written cell on
/// this CPU (`make bench`); the hand-written cell stays for everything differentiated,
/// where double backward must work on every device. Equal to `forward_ids` up to float
/// rounding (tested).
pub fn forward_ids_no_grad(config: &VictimConfig, params: &Params, ids: &Tensor) -> Tensor {
    forward_frozen_no_grad(config, params, &FrozenInput::new(params, ids))
}

/// Token ids with what does not depend on the trainable weights: their embeddings under
/// the frozen table, the padding mask and the row reversal of the backward direction.
/// Verification runs thousands of no-grad passes over the same D_adv inputs.
pub struct FrozenInput {
    pub ids: Tensor,
    emb: Tensor,
    mask: Tensor,
    reversal: Tensor,
    emb_reversed: Tensor,
}

impl FrozenInput {
    pub fn new(params: &Params, ids: &Tensor) -> FrozenInput {
        tch::no_grad(|| {
            let (emb, mask) = (embed(params, ids), mask_of(ids, params));
            let reversal = reversal_index(&mask);
            let emb_reversed = reverse_rows(&emb, &reversal);
            FrozenInput { ids: ids.shallow_clone(), emb, mask, reversal, emb_reversed }
        })
    }
}

/// `forward_ids_no_grad` on a prepared input (the embedding table must be the one the
/// input was prepared with; the attack's victims keep it frozen).
pub fn forward_frozen_no_grad(config: &VictimConfig, params: &Params, input: &FrozenInput) -> Tensor {
    tch::no_grad(|| {
        if config.arch != Arch::Lstm || param(params, "out.weight").dim() != 2 {
            return forward_ids(config, params, &input.ids);
        }
        let fwd = libtorch_lstm_direction(params, "lstm.fwd", &input.emb);
        let bwd = unreverse(&libtorch_lstm_direction(params, "lstm.bwd", &input.emb_reversed), &input.reversal);
        let pooled = max_over_time(&Tensor::cat(&[fwd, bwd], -1), &input.mask);
        pooled.matmul(&param(params, "out.weight").tr()) + param(params, "out.bias")
    })
}

/// Both LSTM directions' hidden states [.., T, 2H] at every step, each direction computed
/// by `direction`. Right padding only follows a row's real tokens, so the forward
/// direction runs unmasked (its outputs at padded steps are pooled away). The backward
/// direction runs forward over each row's tokens reversed in place, so it too starts from
/// zeros at the row's last real token.
fn lstm_states(params: &Params, emb: &Tensor, mask: &Tensor, direction: fn(&Params, &str, &Tensor) -> Tensor) -> Tensor {
    let reversal = reversal_index(mask);
    let fwd = direction(params, "lstm.fwd", emb);
    let bwd = unreverse(&direction(params, "lstm.bwd", &reverse_rows(emb, &reversal)), &reversal);
    Tensor::cat(&[fwd, bwd], -1)
}

/// Max over time of states [.., T, F]; padding pushed far down so it never wins.
pub(crate) fn max_over_time(states: &Tensor, mask: &Tensor) -> Tensor {
    let penalty = (mask.unsqueeze(-1) - 1.0) * 1e4;
    (states + penalty).amax([-2].as_slice(), false)
}

/// One LSTM direction by libtorch's kernel (batch-first, no graph): the same cell as
/// `lstm_direction` (gate order i, f, g, o; one bias, passed as b_ih with b_hh = 0).
fn libtorch_lstm_direction(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    libtorch_lstm(params, prefix, x, false)
}

/// `libtorch_lstm_direction` in training mode, for passes differentiated once (cuDNN's
/// backward needs the forward in training mode; with no dropout nothing else changes).
fn libtorch_lstm_direction_train(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    libtorch_lstm(params, prefix, x, true)
}

fn libtorch_lstm(params: &Params, prefix: &str, x: &Tensor, train: bool) -> Tensor {
    let w_ih = param(params, &format!("{prefix}.w_ih"));
    let w_hh = param(params, &format!("{prefix}.w_hh"));
    let b = param(params, &format!("{prefix}.b"));
    let h0 = Tensor::zeros([1, x.size()[0], w_hh.size()[1]], (x.kind(), x.device()));
    let zero_b = b.zeros_like();
    let weights = [w_ih, w_hh, b, &zero_b];
    x.lstm(&[&h0, &h0], &weights, true, 1, 0.0, train, false, true).0
}

/// Logits for token ids under one (unstacked) parameter set through libtorch's LSTM
/// kernel with autograd: for passes differentiated once (the clean part of the first inner
/// step, L_adv at θ'), never twice, since the kernel's backward is not differentiable on
/// every backend. Equal to `forward_ids` up to float rounding, gradients included (tested).
pub fn forward_ids_first_order(config: &VictimConfig, params: &Params, ids: &Tensor) -> Tensor {
    if config.arch != Arch::Lstm || param(params, "out.weight").dim() != 2 {
        return forward_ids(config, params, ids);
    }
    let mask = mask_of(ids, params);
    let states = lstm_states(params, &embed(params, ids), &mask, libtorch_lstm_direction_train);
    max_over_time(&states, &mask).matmul(&param(params, "out.weight").tr()) + param(params, "out.bias")
}

/// For a padding mask [..., T]: index [..., T] that reverses each row's real tokens in
/// place (position t < len ↦ len − 1 − t) and leaves its padding where it is. The map
/// is its own inverse.
pub(crate) fn reversal_index(mask: &Tensor) -> Tensor {
    let t = mask.size()[mask.dim() - 1];
    let steps = Tensor::arange(t, (Kind::Int64, mask.device()));
    let len = mask.sum_dim_intlist(-1, true, Kind::Int64);
    let reversed = &len - 1 - &steps;
    reversed.where_self(&steps.lt_tensor(&len), &steps.expand_as(&reversed))
}

/// Rows of x [..., T, D] reordered along time by `reversal_index` (index [..., T]).
pub(crate) fn reverse_rows(x: &Tensor, index: &Tensor) -> Tensor {
    x.gather(-2, &index.unsqueeze(-1).expand_as(x), false)
}

/// Undoes `reverse_rows` on hidden states [..., T, H], which may carry a leading stack
/// dimension the index lacks (inputs shared by stacked parameter sets).
pub(crate) fn unreverse(h: &Tensor, index: &Tensor) -> Tensor {
    h.gather(-2, &index.unsqueeze(-1).expand(h.size().as_slice(), false), false)
}

/// One LSTM direction over [batch, time, dim] (or [C, batch, time, dim]); returns hidden
/// states [batch, time, H] ([C, batch, time, H] for stacked parameters) at every step.
/// No masking: with right padding, the states at real tokens never see the padding.
fn lstm_direction(params: &Params, prefix: &str, x: &Tensor) -> Tensor {
    let w_ih = param(params, &format!("{prefix}.w_ih"));
    let w_hh = param(params, &format!("{prefix}.w_hh"));
    let b = param(params, &format!("{prefix}.b"));
    let time = x.size()[x.dim() - 2];
    let h_units = w_hh.size()[w_hh.dim() - 1];
    // Input projections of all steps in one matmul: [(C,) batch, time, 4H].
    let xw = if w_ih.dim() == 3 {
        // One [C, B·T, D] × [C, D, 4H] product: broadcasting the weights over the batch
        // instead would materialise B copies of them (and of their gradient).
        let c = w_ih.size()[0];
        let x = if x.dim() == 3 { x.unsqueeze(0).expand([c, -1, -1, -1], false) } else { x.shallow_clone() };
        let (bsz, t) = (x.size()[1], x.size()[2]);
        let xw = x.flatten(1, 2).matmul(&w_ih.transpose(-1, -2));
        xw.view([c, bsz, t, -1]) + b.unsqueeze(1).unsqueeze(1)
    } else {
        x.matmul(&w_ih.tr()) + b
    };
    let mut state_shape = xw.size();
    state_shape.remove(state_shape.len() - 2);
    *state_shape.last_mut().unwrap() = h_units;
    let mut h = Tensor::zeros(state_shape.as_slice(), (x.kind(), x.device()));
    let mut c = h.zeros_like();
    let mut outs: Vec<Tensor> = Vec::with_capacity(time as usize);
    let w_hh_t = w_hh.transpose(-1, -2);
    // unbind once: the backward of T separate `select`s would build T zero tensors of
    // xw's full size (quadratic in the length; it dominated training time).
    for x_t in xw.unbind(-2) {
        let gates = x_t + h.matmul(&w_hh_t);
        let g = gates.chunk(4, -1);
        let (i, f, gg, o) = (g[0].sigmoid(), g[1].sigmoid(), g[2].tanh(), g[3].sigmoid());
        c = &f * &c + &i * &gg;
        h = &o * c.tanh();
        outs.push(h.shallow_clone());
    }
    Tensor::stack(&outs, -2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_shapes_are_what_new_creates() {
        for arch in [Arch::Bow, Arch::Lstm, Arch::Minilm] {
            let v = tiny(arch, false);
            let made: BTreeMap<String, Vec<i64>> = v.params().iter().map(|(k, t)| (k.clone(), t.size())).collect();
            assert_eq!(made, param_shapes(&v.config), "{arch:?}");
        }
    }

    pub(crate) fn tiny(arch: Arch, train_embeddings: bool) -> Victim {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(0);
        let config = VictimConfig {
            arch,
            vocab_size: 12,
            embed_dim: 5,
            hidden: 4,
            num_classes: 2,
            train_embeddings,
            max_len: 16,
            bert: tiny_bert_config_for(arch, 12, 5),
        };
        let table = Tensor::randn([12, 5], (Kind::Float, Device::Cpu));
        Victim::new(config, &table, Device::Cpu).unwrap()
    }

    #[test]
    fn padding_does_not_change_logits() {
        for arch in [Arch::Bow, Arch::Lstm, Arch::Minilm] {
            let v = tiny(arch, false);
            let short = Tensor::from_slice(&[3i64, 4, 5]).view([1, 3]);
            let padded = Tensor::from_slice(&[3i64, 4, 5, 0, 0]).view([1, 5]);
            let a = v.logits(&short);
            let b = v.logits(&padded);
            let diff = (&a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{arch:?}: padding changed logits by {diff}");
            // In a batch beside longer and shorter rows (each row reversed in place for
            // the backward direction).
            let batch = Tensor::from_slice(&[9i64, 8, 7, 6, 5, 3, 4, 5, 0, 0, 2, 0, 0, 0, 0]).view([3, 5]);
            let in_batch = v.logits(&batch).get(1);
            let diff = (a.get(0) - in_batch).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{arch:?}: other rows changed logits by {diff}");
        }
    }

    #[test]
    fn the_kernel_forward_and_its_gradient_equal_the_hand_written_ones() {
        let v = tiny(Arch::Lstm, false);
        let ids = Tensor::from_slice(&[9i64, 8, 7, 6, 5, 3, 4, 5, 0, 0, 2, 0, 0, 0, 0]).view([3, 5]);
        let labels = Tensor::from_slice(&[0i64, 1, 1]);
        let p = v.params();
        let names: Vec<&String> = p.keys().filter(|k| p[*k].requires_grad()).collect();
        let tensors: Vec<&Tensor> = names.iter().map(|n| &p[*n]).collect();
        let hand = crate::train::cross_entropy(&forward_ids(&v.config, &p, &ids), &labels);
        let kernel = crate::train::cross_entropy(&forward_ids_first_order(&v.config, &p, &ids), &labels);
        assert!((hand.double_value(&[]) - kernel.double_value(&[])).abs() < 1e-6);
        let a = Tensor::run_backward(&[&hand], &tensors, false, false);
        let b = Tensor::run_backward(&[&kernel], &tensors, false, false);
        for ((n, a), b) in names.iter().zip(a).zip(b) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{n}: gradients differ by {diff}");
        }
    }

    #[test]
    fn the_no_grad_forward_equals_the_differentiable_one() {
        for arch in [Arch::Bow, Arch::Lstm, Arch::Minilm] {
            let v = tiny(arch, false);
            let ids = Tensor::from_slice(&[9i64, 8, 7, 6, 5, 3, 4, 5, 0, 0, 2, 0, 0, 0, 0]).view([3, 5]);
            let a = v.logits(&ids);
            let b = forward_ids_no_grad(&v.config, &v.params(), &ids);
            assert!(!b.requires_grad());
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{arch:?}: the no-grad forward differs by {diff}");
        }
    }

    /// L_adv after one SGD step on a minibatch whose last row is the poison, given as
    /// input embeddings: the bi-level proxy the attack differentiates (SPEC step 2-3).
    fn unrolled_adv_loss(v: &Victim, poison_emb: &Tensor) -> Tensor {
        let p = v.params();
        let clean_ids = Tensor::from_slice(&[3i64, 4, 5, 0, 6, 7, 8, 9, 2, 3, 0, 0]).view([3, 4]);
        let clean_labels = Tensor::from_slice(&[0i64, 1, 0]);
        let emb = Tensor::cat(&[embed(&p, &clean_ids), poison_emb.shallow_clone()], 0);
        let ids_for_mask = Tensor::cat(&[clean_ids, Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4])], 0);
        let logits = forward(&v.config, &p, &emb, &mask_of(&ids_for_mask, &p));
        let labels = Tensor::cat(&[clean_labels, Tensor::from_slice(&[1i64])], 0);
        let loss = crate::train::cross_entropy(&logits, &labels);
        let names: Vec<String> = p.keys().filter(|k| p[*k].requires_grad()).cloned().collect();
        let tensors: Vec<&Tensor> = names.iter().map(|n| &p[n]).collect();
        let grads = Tensor::run_backward(&[&loss], &tensors, true, true);
        let eta = 0.5;
        let mut stepped = shallow_copy(&p);
        for (n, g) in names.iter().zip(grads) {
            assert!(g.defined(), "no gradient for {n}");
            stepped.insert(n.clone(), &p[n] - g * eta);
        }
        let adv_ids = Tensor::from_slice(&[7i64, 8, 3, 0, 0, 9, 10, 11]).view([2, 4]);
        let logits = forward_ids(&v.config, &stepped, &adv_ids);
        crate::train::cross_entropy(&logits, &Tensor::from_slice(&[1i64, 1]))
    }

    #[test]
    fn second_order_gradient_matches_finite_differences_in_f64() {
        for arch in [Arch::Bow, Arch::Lstm, Arch::Minilm] {
            for train_embeddings in [false, true] {
                let mut v = tiny(arch, train_embeddings);
                v.vs.set_kind(Kind::Double);
                let poison = embed(&v.params(), &Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4]))
                    .detach()
                    .set_requires_grad(true);
                let g = unrolled_adv_loss(&v, &poison);
                let grad = Tensor::run_backward(&[&g], &[&poison], false, false).pop().unwrap();
                let worst = crate::testing::worst_fd_error(&poison, &grad, 1e-6, 1e-3, |x| unrolled_adv_loss(&v, x).double_value(&[]));
                eprintln!("{arch:?} train_embeddings={train_embeddings}: max relative error {worst:.2e}");
                assert!(worst < 1e-6, "{arch:?}: second-order gradient off by {worst}");
                assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0, "gradient is identically zero");
            }
        }
    }

    #[test]
    fn stacked_parameters_equal_one_pass_per_set() {
        for arch in [Arch::Bow, Arch::Lstm, Arch::Minilm] {
            let v = tiny(arch, false);
            let sets: Vec<Params> = (0..3)
                .map(|k| {
                    v.params()
                        .into_iter()
                        .map(|(n, t)| {
                            let t = t.detach();
                            let t = if n == "embedding.weight" { t } else { &t + t.randn_like() * (0.1 * k as f64) };
                            (n, t)
                        })
                        .collect()
                })
                .collect();
            let mut stacked: Params = Params::new();
            for name in sets[0].keys() {
                let t = if name == "embedding.weight" {
                    sets[0][name].shallow_clone()
                } else {
                    Tensor::stack(&sets.iter().map(|p| p[name].shallow_clone()).collect::<Vec<_>>(), 0)
                };
                stacked.insert(name.clone(), t);
            }
            let ids = Tensor::from_slice(&[3i64, 4, 5, 0, 6, 7, 8, 9, 2, 0, 0, 0]).view([3, 4]);
            let all = forward_ids(&v.config, &stacked, &ids);
            assert_eq!(all.size(), [3, 3, 2]);
            for (k, p) in sets.iter().enumerate() {
                let one = forward_ids(&v.config, p, &ids);
                let diff = (all.get(k as i64) - one).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{arch:?}: set {k} differs by {diff}");
            }
        }
    }

    #[test]
    fn frozen_table_is_not_trainable() {
        let frozen = tiny(Arch::Lstm, false);
        let trained = tiny(Arch::Lstm, true);
        assert_eq!(frozen.vs.trainable_variables().len() + 1, trained.vs.trainable_variables().len());
    }
}

/// A tiny BERT of the same architecture for tests and benchmarks (2 layers; 2 heads when
/// the width is even); `None` for victims that are not minilm.
pub fn tiny_bert_config_for(arch: Arch, vocab_size: usize, width: usize) -> Option<BertConfig> {
    (arch == Arch::Minilm).then(|| bert::BertConfig {
        vocab_size: vocab_size as i64,
        hidden_size: width as i64,
        num_hidden_layers: 2,
        num_attention_heads: if width % 2 == 0 { 2 } else { 1 },
        intermediate_size: 2 * width as i64,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    })
}
