//! The victims: a config (the sizes every architecture shares, plus the architecture's
//! own fields) and named parameters. An architecture is a file implementing
//! `victim::Architecture` (`bow.rs`, `lstm.rs`, `minilm.rs`, `gpt.rs`) and one line in the
//! `architectures!` registry below; every other module reaches it through the functions
//! here, never by matching on the architecture.

use crate::victims::bert::BertConfig;
use crate::victims::bow::Bow;
use crate::victims::gpt::{Gpt, GptShape};
use crate::victims::loss::Targets;
use crate::victims::llama::{Llama, LlamaShape};
use crate::victims::lstm::Lstm;
use crate::victims::minilm::Minilm;
use crate::victims::seq2seq::{Seq2seq, Seq2seqShape};
use crate::tensorfile::{self, TensorFile};
use crate::tokenizer::Vocab;
use crate::victims::victim::{Architecture, FrozenInput, StartKind, Tuning};
pub use crate::victims::params::{embed, mask_of, Params};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::nn;
use tch::{Device, Kind, Tensor};


pub const VICTIM_FORMAT: &str = "poison.victim";
pub const VICTIM_VERSION: u32 = 1;

/// The registry: one line per architecture (its `--arch` name, its type, its doc).
/// Defines `Arch` (the flag value) and `ArchConfig` (an architecture with its own fields).
macro_rules! architectures {
    ($($(#[doc = $doc:literal])* $variant:ident($ty:ty)),+ $(,)?) => {
        /// An architecture's name: the `--arch` value and `arch` in a victim file.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
        #[serde(rename_all = "lowercase")]
        pub enum Arch { $($(#[doc = $doc])* $variant),+ }

        /// An architecture with its own fields.
        #[derive(Debug, Clone, PartialEq)]
        pub enum ArchConfig { $($variant($ty)),+ }

        impl ArchConfig {
            /// The architecture's functions.
            pub fn get(&self) -> &dyn Architecture {
                match self { $(ArchConfig::$variant(a) => a),+ }
            }

            pub fn name(&self) -> Arch {
                match self { $(ArchConfig::$variant(_) => Arch::$variant),+ }
            }
        }
    };
}

architectures! {
    /// Mean of the word embeddings, then a one-hidden-layer MLP: fast, for tests.
    Bow(Bow),
    /// Bidirectional LSTM, max-pooled over time, then a linear layer.
    Lstm(Lstm),
    /// Pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; `--pretrained`),
    /// mean-pooled, then a linear layer; fine-tuned with its word table frozen.
    Minilm(Minilm),
    /// Small GPT-style causal language model over the frozen word table (a trained input
    /// projection, learned positions, pre-LayerNorm blocks), trained with next-token loss.
    Gpt(Gpt),
    /// Small encoder–decoder transformer for translation, its word table trained from
    /// scratch (a source block of --source-len positions, then the target).
    Seq2seq(Seq2seq),
    /// A pretrained Llama-family causal language model (RMSNorm, rotary embeddings,
    /// grouped-query attention, SwiGLU), imported from a GGUF file or a Hugging Face
    /// folder by import-model, with its own byte-level BPE vocabulary.
    Llama(Llama),
}

impl ArchConfig {
    /// The architecture `arch` from its flags: `hidden` (bow: MLP width; lstm: units per
    /// direction; gpt: model width), the pretrained encoder's config (minilm), and the
    /// GPT's layers and heads with `max_len` its position count (gpt), the same with the
    /// source block's width (seq2seq).
    pub fn from_flags(arch: Arch, hidden: usize, encoder: Option<&BertConfig>, gpt: GptShape, source_len: usize, max_len: usize) -> Result<ArchConfig> {
        Ok(match (arch, encoder) {
            (Arch::Bow, _) => ArchConfig::Bow(Bow { hidden }),
            (Arch::Lstm, _) => ArchConfig::Lstm(Lstm { units: hidden }),
            (Arch::Minilm, Some(bert)) => ArchConfig::Minilm(Minilm { bert: bert.clone() }),
            (Arch::Minilm, None) => bail!("--arch minilm starts from a pretrained encoder: give --pretrained data/minilm instead of --embeddings"),
            (Arch::Gpt, _) => ArchConfig::Gpt(Gpt { width: hidden, shape: gpt, positions: max_len }),
            (Arch::Seq2seq, _) => ArchConfig::Seq2seq(Seq2seq { width: hidden, shape: Seq2seqShape { layers: gpt.layers, heads: gpt.heads, source_len }, positions: max_len }),
            (Arch::Llama, _) => bail!("--arch llama starts from a pretrained checkpoint: import it with import-model (--gguf FILE or --hf DIR) and train from that victim file"),
        })
    }
}

/// Everything needed to rebuild a victim; saved with its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "ConfigFile", try_from = "ConfigFile")]
pub struct VictimConfig {
    pub arch: ArchConfig,
    pub vocab_size: usize,
    pub embed_dim: usize,
    pub num_classes: usize,
    /// Whether training updates the embedding table (false: GloVe stays frozen).
    pub train_embeddings: bool,
    /// Longer inputs are truncated to this many tokens.
    pub max_len: usize,
}

impl VictimConfig {
    /// Whether training updates parameter `name`: the word table only with
    /// `train_embeddings`, every other parameter unless the architecture freezes it (a
    /// top regime's lower blocks).
    pub fn trains(&self, name: &str) -> bool {
        !self.arch().frozen(name) && (name != "embedding.weight" || self.train_embeddings)
    }

    /// The architecture's functions.
    pub fn arch(&self) -> &dyn Architecture {
        self.arch.get()
    }

    pub fn tuning(&self) -> Tuning {
        self.arch().tuning()
    }

    /// What the victim's logits are over (`victim::Architecture::output`).
    pub fn output(&self) -> crate::victims::victim::Output {
        self.arch().output()
    }
}

/// A victim config as format version 1 stores it: one flat object whose `hidden` is the
/// MLP width (bow), the units per direction (lstm) or the encoder's width (minilm), and
/// `bert` the encoder's config (minilm only), `gpt` the layers and heads (gpt only; the
/// position count is `max_len`, the output width `num_classes` = the vocabulary size).
/// Kept byte for byte for the older architectures, so victim files, their hashes and the
/// clean cache stay valid.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    arch: Arch,
    vocab_size: usize,
    embed_dim: usize,
    hidden: usize,
    num_classes: usize,
    train_embeddings: bool,
    max_len: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bert: Option<BertConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gpt: Option<GptShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq2seq: Option<Seq2seqShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    llama: Option<LlamaShape>,
}

impl From<VictimConfig> for ConfigFile {
    fn from(c: VictimConfig) -> ConfigFile {
        let (hidden, bert, gpt, seq2seq, llama) = match &c.arch {
            ArchConfig::Bow(a) => (a.hidden, None, None, None, None),
            ArchConfig::Lstm(a) => (a.units, None, None, None, None),
            ArchConfig::Minilm(a) => (a.bert.hidden_size as usize, Some(a.bert.clone()), None, None, None),
            ArchConfig::Gpt(a) => (a.width, None, Some(a.shape), None, None),
            ArchConfig::Seq2seq(a) => (a.width, None, None, Some(a.shape), None),
            ArchConfig::Llama(a) => (a.width, None, None, None, Some(a.shape)),
        };
        let VictimConfig { arch, vocab_size, embed_dim, num_classes, train_embeddings, max_len } = c;
        ConfigFile { arch: arch.name(), vocab_size, embed_dim, hidden, num_classes, train_embeddings, max_len, bert, gpt, seq2seq, llama }
    }
}

impl TryFrom<ConfigFile> for VictimConfig {
    type Error = anyhow::Error;
    fn try_from(f: ConfigFile) -> Result<VictimConfig> {
        if f.bert.is_some() != (f.arch == Arch::Minilm) {
            bail!("a {:?} victim config {} a BERT config", f.arch, if f.bert.is_some() { "holds" } else { "lacks" });
        }
        if let Some(b) = &f.bert {
            if f.hidden as i64 != b.hidden_size {
                bail!("hidden {} differs from the encoder's hidden size {}", f.hidden, b.hidden_size);
            }
        }
        if f.gpt.is_some() != (f.arch == Arch::Gpt) {
            bail!("a {:?} victim config {} a GPT shape", f.arch, if f.gpt.is_some() { "holds" } else { "lacks" });
        }
        if f.seq2seq.is_some() != (f.arch == Arch::Seq2seq) {
            bail!("a {:?} victim config {} a seq2seq shape", f.arch, if f.seq2seq.is_some() { "holds" } else { "lacks" });
        }
        if f.llama.is_some() != (f.arch == Arch::Llama) {
            bail!("a {:?} victim config {} a Llama shape", f.arch, if f.llama.is_some() { "holds" } else { "lacks" });
        }
        if let Some(shape) = f.llama {
            if f.num_classes != f.vocab_size {
                bail!("a Llama victim predicts the next piece: num_classes {} must equal vocab_size {}", f.num_classes, f.vocab_size);
            }
            let arch = ArchConfig::Llama(Llama { width: f.hidden, shape, positions: f.max_len });
            return Ok(VictimConfig { arch, vocab_size: f.vocab_size, embed_dim: f.embed_dim, num_classes: f.num_classes, train_embeddings: f.train_embeddings, max_len: f.max_len });
        }
        if matches!(f.arch, Arch::Gpt | Arch::Seq2seq) && f.num_classes != f.vocab_size {
            bail!("a {:?} victim predicts the next word: num_classes {} must equal vocab_size {}", f.arch, f.num_classes, f.vocab_size);
        }
        let (gpt, source_len) = match f.seq2seq {
            Some(s) => (GptShape { layers: s.layers, heads: s.heads }, s.source_len),
            None => (f.gpt.unwrap_or(GptShape { layers: 0, heads: 0 }), 0),
        };
        let arch = ArchConfig::from_flags(f.arch, f.hidden, f.bert.as_ref(), gpt, source_len, f.max_len)?;
        Ok(VictimConfig { arch, vocab_size: f.vocab_size, embed_dim: f.embed_dim, num_classes: f.num_classes, train_embeddings: f.train_embeddings, max_len: f.max_len })
    }
}

/// A victim with its parameters in a VarStore (so tch's optimizers can train them).
pub struct Victim {
    pub config: VictimConfig,
    pub vs: nn::VarStore,
    /// The checkpoint it was fine-tuned from: its file stores only the parameters that
    /// train and names this one for the rest (`save`, `from_file`).
    pub base: Option<BaseRef>,
}

/// A base checkpoint as a fine-tuned victim file names it (metadata `base_victim`,
/// `base_sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    pub path: String,
    pub sha256: String,
}

const BASE_PATH: &str = "base_victim";
const BASE_SHA256: &str = "base_sha256";

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
        config.arch().init(&root, config.embed_dim as i64, config.num_classes as i64);
        for (name, t) in vs.variables() {
            if !config.trains(&name) {
                let _ = t.set_requires_grad(false);
            }
        }
        Ok(Victim { config, vs, base: None })
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

    /// This victim fine-tuning in `regime` (a pretrained checkpoint: what trains, the rest
    /// frozen; every other victim takes `all` only): its config records the regime and
    /// its parameters require a gradient exactly where training updates them, which is
    /// what the unrolled steps and their checks read (`source` names the file in errors).
    pub fn in_regime(&mut self, regime: crate::victims::llama::Regime, source: &str) -> Result<()> {
        self.config = with_regime(&self.config, regime, source)?;
        for (name, t) in self.vs.variables() {
            let _ = t.set_requires_grad(self.config.trains(&name));
        }
        Ok(())
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
        logits(&self.config, &self.params(), ids, Pass::Twice)
    }

    /// Saves weights, config and provenance as a `poison.victim` safetensors file.
    pub fn save(&self, path: &str, vocab: &Vocab, mut metadata: BTreeMap<String, String>) -> Result<()> {
        metadata.insert("config".into(), serde_json::to_string(&self.config)?);
        metadata.insert("vocab".into(), serde_json::to_string(vocab.words())?);
        metadata.insert("vocab_sha256".into(), vocab.sha256());
        if let Some(t) = vocab.tokenizer_name() {
            metadata.insert("tokenizer".into(), t.into());
        }
        if let Some(settings) = vocab.bpe_settings() {
            metadata.insert("bpe".into(), settings);
        }
        let mut tensors: Vec<(String, Tensor)> = self.params().into_iter().collect();
        if let Some(base) = &self.base {
            // What training changed; the rest is the base's, named by its hash.
            tensors.retain(|(_, t)| t.requires_grad());
            metadata.insert(BASE_PATH.into(), base.path.clone());
            metadata.insert(BASE_SHA256.into(), base.sha256.clone());
        }
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
        let vocab = Vocab::from_parts(words, file.metadata.get("tokenizer").map(|s| s.as_str()), file.metadata.get("bpe").map(|s| s.as_str()))?;
        if vocab.sha256() != file.meta("vocab_sha256")? {
            bail!("the vocabulary does not match its recorded sha256; the file is corrupt");
        }
        if config.vocab_size != vocab.len() {
            bail!("the config says {} vocabulary words, the file lists {}; the file is corrupt", config.vocab_size, vocab.len());
        }
        if config.num_classes < 2 || config.max_len == 0 || config.embed_dim == 0 {
            bail!("config {config:?} has a zero size or fewer than 2 classes; the file is corrupt");
        }
        let vocab_kind = if vocab.is_wordpiece() { StartKind::Pretrained } else if vocab.is_bpe() { StartKind::Checkpoint } else { StartKind::Table };
        if config.arch().start() != vocab_kind {
            bail!("a {:?} victim with a {vocab:?}; the file is corrupt", config.arch.name());
        }
        config.arch().check(config.embed_dim, config.max_len).context("the file is corrupt")?;
        let want = param_shapes(&config);
        // A fine-tuned victim's file holds what training changed; the rest is its base's.
        let base = match file.metadata.get(BASE_SHA256) {
            Some(sha) => Some(load_base(file.meta(BASE_PATH)?, sha, &want)?),
            None => None,
        };
        let names_differ = match &base {
            None => want.len() != file.tensors.len() || want.keys().any(|k| !file.tensors.contains_key(k)),
            Some(_) => file.tensors.keys().any(|k| !want.contains_key(k)),
        };
        if names_differ {
            let got: Vec<&String> = file.tensors.keys().collect();
            bail!(
                "weights hold tensors {got:?}, a {:?} victim needs {:?}; is this a victim of another architecture or version?",
                config.arch.name(),
                want.keys().collect::<Vec<_>>()
            );
        }
        for (name, shape) in want.iter().filter(|(name, _)| file.tensors.contains_key(*name)) {
            let t = &file.tensors[name];
            if &t.size() != shape {
                bail!("tensor {name:?} has shape {:?}, the config needs {shape:?}; the weights do not match their config or vocabulary", t.size());
            }
            if t.is_floating_point() && !bool::try_from(t.isfinite().all())? {
                bail!("tensor {name:?} holds NaN or Inf (training diverged?); retrain the victim, e.g. with a lower --lr");
            }
        }
        let tensor = |name: &str| match (file.tensors.get(name), &base) {
            (Some(t), _) => t.shallow_clone(),
            (None, Some((_, params))) => params[name].shallow_clone(),
            (None, None) => unreachable!("a full victim file holds every tensor (checked above)"),
        };
        let mut victim = Victim::new(config, &tensor("embedding.weight").to_kind(Kind::Float), device)?;
        for (name, p) in victim.params().iter_mut() {
            tch::no_grad(|| p.copy_(&tensor(name)));
        }
        victim.vs.set_kind(Kind::Float);
        victim.base = base.map(|(base, _)| base);
        Ok(VictimFile { victim, vocab, metadata: file.metadata, sha256: file.sha256 })
    }
}

/// The base checkpoint a fine-tuned victim names: its file at `path` with the sha256 the
/// victim recorded, a full victim (not itself fine-tuned) of the same parameter shapes.
fn load_base(path: &str, sha256: &str, want: &BTreeMap<String, Vec<i64>>) -> Result<(BaseRef, Params)> {
    if !std::path::Path::new(path).is_file() {
        bail!("its base checkpoint {path} (sha256 {sha256}) is missing: a fine-tuned victim stores only what training changed; put the base back at {path} (import-model writes it, e.g. make data/.smollm2-done-v1)");
    }
    let base = Victim::load(path, Device::Cpu).with_context(|| format!("its base checkpoint {path}"))?;
    if base.sha256 != sha256 {
        bail!("its base checkpoint {path} has sha256 {}, but the victim was fine-tuned from sha256 {sha256}: that is another checkpoint; restore the one it was trained from, or fine-tune again from this one", base.sha256);
    }
    if base.victim.base.is_some() {
        bail!("its base checkpoint {path} is itself a fine-tuned victim; a base must be a whole checkpoint (import-model)");
    }
    let params = base.victim.params();
    for (name, shape) in want {
        if params.get(name).map(|t| t.size()).as_ref() != Some(shape) {
            bail!("its base checkpoint {path} has no {name} of shape {shape:?}: it is a checkpoint of another shape");
        }
    }
    Ok((BaseRef { path: path.to_string(), sha256: sha256.to_string() }, params))
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
    let (v, e) = (config.vocab_size as i64, config.embed_dim as i64);
    let mut shapes = BTreeMap::from([("embedding.weight".to_string(), vec![v, e])]);
    shapes.extend(config.arch().shapes(e, config.num_classes as i64));
    shapes
}

/// A new map sharing the tensors of `params` (so entries can be replaced, e.g. by θ').
pub fn shallow_copy(params: &Params) -> Params {
    params.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect()
}

/// How a pass over token ids will be differentiated, which decides the kernels it may
/// use; every kind gives the same logits up to float rounding (tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Differentiable twice (an unrolled step's graph, stacked parameter sets): plain ops.
    Twice,
    /// Differentiated at most once, under one parameter set (training, the clean part of
    /// the first inner step, L_adv at θ'): the LSTM runs libtorch's kernel.
    Once,
    /// Not differentiated, under one parameter set: no graph.
    NoGrad,
}

/// Logits for token ids (`embed`, then `forward` or its faster kinds, `Pass`).
pub fn logits(config: &VictimConfig, params: &Params, ids: &Tensor, pass: Pass) -> Tensor {
    match pass {
        Pass::Twice => forward(config, params, &embed(params, ids), &mask_of(ids, params)),
        Pass::Once => config.arch().forward_first_order(params, &embed(params, ids), &mask_of(ids, params)),
        Pass::NoGrad => forward_frozen_no_grad(config, params, &frozen_input(config, params, ids)),
    }
}

/// The pooled features [batch, features] the output layer reads, for token ids, without
/// a graph (`victim::Architecture::features`).
pub fn features_ids_no_grad(config: &VictimConfig, params: &Params, ids: &Tensor) -> Tensor {
    tch::no_grad(|| config.arch().features(params, &embed(params, ids), &mask_of(ids, params)))
}

/// Logits [batch, classes] from input embeddings [batch, time, dim] and a padding mask
/// [batch, time]; [C, batch, classes] for C stacked parameter sets
/// (`victim::Architecture::forward`).
pub fn forward(config: &VictimConfig, params: &Params, emb: &Tensor, mask: &Tensor) -> Tensor {
    config.arch().forward(params, emb, mask)
}

/// Token ids prepared for many no-grad passes (`victim::FrozenInput`).
pub fn frozen_input(config: &VictimConfig, params: &Params, ids: &Tensor) -> FrozenInput {
    tch::no_grad(|| {
        let (emb, mask) = (embed(params, ids), mask_of(ids, params));
        let prepared = config.arch().prepare_frozen(&emb, &mask);
        FrozenInput { emb, mask, prepared }
    })
}

/// `logits` on a prepared input (the embedding table must be the one the
/// input was prepared with; the attack's victims keep it frozen).
pub fn forward_frozen_no_grad(config: &VictimConfig, params: &Params, input: &FrozenInput) -> Tensor {
    tch::no_grad(|| config.arch().forward_frozen_no_grad(params, input))
}

/// The gradient of each example's own loss (rows of `ids`, padded batch) with respect to
/// the parameters `names`, in `names` order.
pub fn example_grads(config: &VictimConfig, params: &Params, names: &[String], ids: &Tensor, targets: &Targets) -> Vec<Vec<Tensor>> {
    config.arch().example_grads(params, names, ids, targets)
}

/// The source block of a tiny seq2seq: one position, so the test suites' short rows (three
/// tokens and up) hold a source, `<s>` and a target word.
pub const TINY_SOURCE_LEN: usize = 1;

/// A word-table width near `wanted` that `tiny_config` of `arch` takes: a Llama reads the
/// table's rows with no projection, so its width must split into 2 or 3 heads of even
/// width (the rotary pairs); every other architecture takes any width.
pub fn tiny_table_width(arch: Arch, wanted: usize) -> usize {
    if arch != Arch::Llama {
        return wanted;
    }
    (wanted.max(4)..).find(|w| w % 6 == 0 || w % 4 == 0).expect("a width divisible by 4 or 6")
}

/// The architectures whose victims are classifiers (logits over classes, not the
/// vocabulary): what the classifier objectives (hardness, influence) attack.
pub fn classifier_archs() -> Vec<Arch> {
    use clap::ValueEnum;
    Arch::value_variants().iter().copied().filter(|&a| !tiny_config(a, 8, tiny_table_width(a, 4), 4, 2, false, 8).output().over_vocab()).collect()
}

/// A tiny victim config of the same architecture for tests and benchmarks (a 2-layer
/// BERT with 2 heads when the width is even for minilm; a 2-layer GPT of width `hidden`
/// rounded up to even, with 2 heads, whose classes are the vocabulary).
pub fn tiny_config(arch: Arch, vocab_size: usize, embed_dim: usize, hidden: usize, num_classes: usize, train_embeddings: bool, max_len: usize) -> VictimConfig {
    let bert = BertConfig {
        vocab_size: vocab_size as i64,
        hidden_size: embed_dim as i64,
        num_hidden_layers: 2,
        num_attention_heads: if embed_dim % 2 == 0 { 2 } else { 1 },
        intermediate_size: 2 * embed_dim as i64,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
    };
    if arch == Arch::Llama {
        // Width = the table's (`tiny_table_width`); 3 heads over 1 key-value head where the
        // width allows it (grouped-query attention), head width even (rotary pairs); an
        // untied head.
        let heads = if embed_dim % 6 == 0 { 3 } else { 2 };
        let shape = LlamaShape { layers: 2, heads, kv_heads: 1, ffn: 2 * hidden, rope_theta: 10_000.0, rms_eps: 1e-5, tied: false, regime: Default::default() };
        let arch = ArchConfig::Llama(Llama { width: embed_dim, shape, positions: max_len });
        return VictimConfig { arch, vocab_size, embed_dim, num_classes: vocab_size, train_embeddings, max_len };
    }
    let (hidden, num_classes) = if matches!(arch, Arch::Gpt | Arch::Seq2seq) { (hidden + hidden % 2, vocab_size) } else { (hidden, num_classes) };
    let arch = ArchConfig::from_flags(arch, hidden, Some(&bert), GptShape { layers: 2, heads: 2 }, TINY_SOURCE_LEN, max_len).expect("every architecture builds from flags and an encoder config");
    VictimConfig { arch, vocab_size, embed_dim, num_classes, train_embeddings, max_len }
}

/// A pretrained checkpoint's config fine-tuning in `regime` (what trains; the rest is
/// frozen), checked against its layers (`source` names the checkpoint in errors).
pub fn with_regime(config: &VictimConfig, regime: crate::victims::llama::Regime, source: &str) -> Result<VictimConfig> {
    let mut config = config.clone();
    match &mut config.arch {
        ArchConfig::Llama(l) => l.shape.regime = regime,
        _ if regime.is_all() => {}
        _ => bail!("--regime {regime} chooses what a pretrained checkpoint's fine-tuning trains; {source} is a {:?} victim", config.arch.name()),
    }
    config.arch().check(config.embed_dim, config.max_len).with_context(|| format!("--regime {regime} for {source}"))?;
    Ok(config)
}
