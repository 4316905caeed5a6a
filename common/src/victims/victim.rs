//! The victim seam: what the attack, training and evaluation need from an architecture.
//!
//! An architecture is its own fields (widths, an encoder's config) plus the functions of
//! [`Architecture`]. Everything else (the word table, the padding mask, the loss, training,
//! unrolling, verification) is shared and lives outside the architecture's file. The
//! contract below is checked for every registered architecture by the conformance suite
//! (`victims::conformance`).

use crate::victims::loss::Targets;
use crate::victims::layers::linear;
use crate::victims::params::{embed, mask_of, Params};
use anyhow::Result;
use tch::nn;
use tch::Tensor;

/// What a new victim of an architecture starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// A frozen word table from build-vocab (`--embeddings`).
    Table,
    /// A pretrained encoder package (`--pretrained`) with its own WordPiece vocabulary.
    Pretrained,
    /// A pretrained language model's checkpoint (GGUF or a Hugging Face folder), imported
    /// by import-model with its own byte-level BPE vocabulary.
    Checkpoint,
}

/// A causal model's keys and values so far, per block: [B, heads, positions, d] each,
/// positions up to the model's `max_len`; a row's entries past its own length are stale
/// and never attended to.
pub struct KvCache {
    pub layers: Vec<(Tensor, Tensor)>,
}

/// Per-architecture speed settings, chosen by measurement (BENCHMARKS.md). They change how
/// work is grouped, never a result beyond float summation order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// θ' sets stacked into one L_adv pass when verification checks candidates.
    pub verify_stack: usize,
    /// Candidates whose gradients verification holds at once.
    pub verify_chunk: usize,
    /// Adam learning rate when `--lr` is not given.
    pub default_lr: f64,
}

/// Token ids with what does not depend on the trainable weights: their embeddings under
/// the frozen table, the padding mask, and whatever the architecture prepares from them
/// (`Architecture::prepare_frozen`). Verification runs thousands of no-grad passes over
/// the same D_adv inputs.
pub struct FrozenInput {
    pub emb: Tensor,
    pub mask: Tensor,
    pub prepared: Vec<Tensor>,
}

/// The functional contract of a victim architecture.
///
/// - **Named parameters, input embeddings.** A victim's parameters are a name → tensor map
///   ([`Params`]); `embedding.weight` [vocab, dim] is shared by all architectures and is
///   not among [`Architecture::shapes`]. The forward pass takes input embeddings, not ids,
///   so the attack can differentiate with respect to a poison's token embeddings.
/// - **Differentiable twice.** [`Architecture::forward`] is built from plain differentiable
///   ops: the second-order gradient through unrolled training steps (the bi-level
///   objective) must match f64 finite differences.
/// - **Stacked parameter sets.** When every parameter but the word table carries a leading
///   dimension C, `forward` runs the inputs under all C sets at once: logits [C, batch,
///   classes] (a language model: [C, batch, time, vocab]) from shared inputs [batch, time,
///   dim] or per-set inputs [C, batch, time, dim]; set c's logits equal a pass under set c
///   alone. Training C victims together and
///   checking C candidates at once rely on it.
/// - **Padding invariance.** Right padding (mask 0) never changes a row's logits, nor do the
///   other rows of its batch.
/// - **Faster passes are equal passes.** `forward_first_order` (differentiated at most
///   once) and `forward_frozen_no_grad` (not differentiated) may use faster kernels but
///   must equal `forward` (and its gradient) up to float rounding.
/// - **Per-example gradients.** `example_grads` gives each example's own loss gradient,
///   equal to one backward pass per example.
/// What a victim's logits are over; the task it serves follows (`tasks::rules::of_victim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Classes: logits [.., batch, classes], trained on `loss::Target::Class`.
    Classes,
    /// The next token: logits [.., batch, time, vocab] (its `num_classes` is the
    /// vocabulary size), trained on `loss::Target::NextToken`.
    NextToken,
    /// A translation's next token: logits as `NextToken`'s over one sequence holding the
    /// source block and the target (`victims::seq2seq`), trained on the target's tokens.
    Translation,
}

impl Output {
    /// Whether the logits are over the vocabulary at every position (a language model's
    /// or a translation model's), so `num_classes` is the vocabulary size.
    pub fn over_vocab(self) -> bool {
        matches!(self, Output::NextToken | Output::Translation)
    }
}

pub trait Architecture: Send + Sync {
    /// Where its victims start from.
    fn start(&self) -> StartKind;

    /// What its logits are over (a classifier's classes by default).
    fn output(&self) -> Output {
        Output::Classes
    }

    /// Its parameters besides `embedding.weight`, with their shapes.
    fn shapes(&self, embed_dim: i64, num_classes: i64) -> Vec<(String, Vec<i64>)>;

    /// Creates those parameters under `root` with their initial values, drawn from
    /// libtorch's generator in a fixed order (seed it first).
    fn init(&self, root: &nn::Path, embed_dim: i64, num_classes: i64);

    /// Computes and keeps what later passes over right-padded inputs `emb` [B, T, E] can
    /// reuse (a `Top` regime Llama's frozen lower blocks, `victims::llama`); nothing for
    /// the others. Lets an evaluation fill the cache on every worker at once, before its
    /// models train, instead of its first models filling it twice side by side.
    fn warm(&self, _params: &Params, _emb: &Tensor, _mask: &Tensor) {}

    /// Whether a parameter stays frozen in training (a fine-tuning regime's lower layers);
    /// the word table's freezing is the config's `train_embeddings`, not this.
    fn frozen(&self, _name: &str) -> bool {
        false
    }

    /// Checks the architecture's own fields against the shared sizes of a config.
    fn check(&self, _embed_dim: usize, _max_len: usize) -> Result<()> {
        Ok(())
    }

    /// The pooled representation [batch, features] the output layer `out` reads, from
    /// input embeddings [batch, time, dim] and a padding mask [batch, time] (1.0 for a
    /// token); stacked as the trait documentation says. Every row holds at least one
    /// token. Representation defenses (detect-poisons' spectral signature) and sentence
    /// embeddings (MiniLM's mean pooling) read it.
    fn features(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor;

    /// Logits [batch, classes]: the output layer over `features`.
    fn forward(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        linear(params, &self.features(params, emb, mask), "out")
    }

    /// A language model's logits [batch, vocab] at one position per row (`last` [batch],
    /// int64), without a graph: what generation needs at each step. The default gathers
    /// them from `forward`; an architecture may skip the output layer elsewhere.
    fn logits_at(&self, params: &Params, emb: &Tensor, mask: &Tensor, last: &Tensor) -> Tensor {
        let logits = self.forward(params, emb, mask);
        let v = logits.size()[2];
        logits.gather(1, &last.view([-1, 1, 1]).expand([-1, 1, v], false), false).squeeze_dim(1)
    }

    /// Cached decoding (a key-value cache), without a graph: the logits [batch, vocab] at
    /// each row's last prompt token (`last`) of right-padded prompts `emb` [B, T, E], and
    /// the cache that `decode_step` extends. None: the architecture has no cache, and
    /// generation recomputes the whole prefix at every step.
    fn prefill(&self, _params: &Params, _emb: &Tensor, _last: &Tensor) -> Option<(Tensor, KvCache)> {
        None
    }

    /// One new token per row, `emb` [B, 1, E] at positions `at` [B] (int64), read against
    /// `cache` (which it extends): the logits [B, vocab] there. Only for an architecture
    /// whose `prefill` gives a cache.
    fn decode_step(&self, _params: &Params, _cache: &mut KvCache, _emb: &Tensor, _at: &Tensor) -> Tensor {
        unreachable!("decode_step without a prefill cache")
    }

    /// Whether training may drop units (`forward_dropout`): an architecture without
    /// dropout refuses `--dropout` rather than ignore it.
    fn has_dropout(&self) -> bool {
        false
    }

    /// `forward` in training with dropout (`Dropout`'s masks on the architecture's
    /// chosen activations), for the training loop only: every other pass (unrolling,
    /// verification, evaluation) is `forward`'s, without dropout. Only for an
    /// architecture whose `has_dropout` is true.
    fn forward_dropout(&self, _params: &Params, _emb: &Tensor, _mask: &Tensor, _dropout: &mut crate::victims::layers::Dropout) -> Tensor {
        unreachable!("forward_dropout on an architecture without dropout")
    }

    /// `forward` for passes differentiated at most once (the clean part of the first
    /// inner step, L_adv at θ').
    fn forward_first_order(&self, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
        self.forward(params, emb, mask)
    }

    /// What `forward_frozen_no_grad` reuses across passes over the same input.
    fn prepare_frozen(&self, _emb: &Tensor, _mask: &Tensor) -> Vec<Tensor> {
        Vec::new()
    }

    /// Logits without a graph on a prepared input, under one (unstacked) parameter set.
    fn forward_frozen_no_grad(&self, params: &Params, input: &FrozenInput) -> Tensor {
        self.forward(params, &input.emb, &input.mask)
    }

    /// The gradient of each example's own loss with respect to the parameters `names`
    /// (one row of `ids` per example), in `names` order.
    fn example_grads(&self, params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
        stacked_example_grads(self, params, names, ids, targets)
    }

    fn tuning(&self) -> Tuning;
}

/// Per-example gradients by stacking C copies of the parameters: example c runs only under
/// copy c, so the gradient of the summed losses with respect to copy c is example c's own.
/// A batch-of-one pass is all per-op overhead; this turns C of them into one batch of C.
pub fn stacked_example_grads<A: Architecture + ?Sized>(arch: &A, theta: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
    let c = ids.size()[0];
    if c == 0 {
        return Vec::new();
    }
    let mut params: Params = theta.iter().map(|(k, t)| (k.clone(), t.detach())).collect();
    let mut stacked = Vec::with_capacity(names.len());
    for name in names {
        let mut shape = vec![c];
        shape.extend(theta[name].size());
        let s = theta[name].detach().unsqueeze(0).expand(shape.as_slice(), false).contiguous().set_requires_grad(true);
        params.insert(name.clone(), s.shallow_clone());
        stacked.push(s);
    }
    let ids = ids.unsqueeze(1); // [C, 1, T]: one example per parameter copy
    let emb = embed(&params, &ids);
    let mask = mask_of(&ids, &params);
    let logits = arch.forward(&params, &emb, &mask).squeeze_dim(1); // [C, classes]
    let loss = targets.summed_nll(&logits);
    let grads = Tensor::run_backward(&[&loss], &stacked.iter().collect::<Vec<_>>(), false, false);
    (0..c).map(|k| grads.iter().map(|g| g.get(k)).collect()).collect()
}

/// Per-example gradients by one backward pass each: for victims whose passes are
/// compute-bound already and whose stacked copies would not fit (a minilm gradient is
/// 45 MB).
pub fn one_by_one_example_grads<A: Architecture + ?Sized>(arch: &A, params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
    let tensors: Vec<&Tensor> = names.iter().map(|n| &params[n]).collect();
    (0..ids.size()[0])
        .map(|k| {
            // The example alone, without the batch's padding: exactly a batch of one.
            let row = ids.narrow(0, k, 1);
            let len = row.ne(crate::tokenizer::PAD_ID).sum(tch::Kind::Int64).int64_value(&[]);
            let row = row.narrow(1, 0, len.max(1));
            let logits = arch.forward(params, &embed(params, &row), &mask_of(&row, params));
            let loss = targets.row(k).mean_nll(&logits);
            Tensor::run_backward(&[&loss], &tensors, false, false).into_iter().map(|g| g.detach()).collect()
        })
        .collect()
}

/// The VarStore path of a dotted parameter name (`encoder.layer.0.output.dense.weight`)
/// and its last part: tch paths are built one dot-free part at a time.
pub fn dotted_path<'a>(root: &nn::Path<'a>, name: &'a str) -> (nn::Path<'a>, &'a str) {
    let (dirs, last) = name.rsplit_once('.').expect("a dotted parameter name");
    let mut parts = dirs.split('.');
    let mut path = root.sub(parts.next().expect("at least one part"));
    for d in parts {
        path = path.sub(d);
    }
    (path, last)
}
