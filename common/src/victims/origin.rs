//! What a new victim starts from: a word embedding table made by build-vocab (the bow and
//! lstm victims), a pretrained encoder package folder (the minilm victim: config.json,
//! model.safetensors and tokenizer.json, as scripts/fetch_minilm.sh keeps them), or a
//! pretrained language model's victim file (import-model: a llama victim, fine-tuned under
//! its `--regime` and saved as what training changed plus its base's hash). The training
//! stages (train-victim, finetune-eval) take one and build every victim through
//! `Origin::new_victim`.

use crate::victims::bert::{self, BertConfig};
use crate::victims::model::{Arch, ArchConfig, BaseRef, Params, Victim, VictimConfig};
use crate::victims::victim::StartKind;
use crate::tokenizer::Vocab;
use crate::wordpiece::WordPiece;
use anyhow::{bail, Result};
use tch::{Device, Tensor};

pub enum Start {
    /// A frozen word embedding table [vocab, dim].
    Table(Tensor),
    /// The pretrained encoder's parameters under their package names.
    Pretrained { config: BertConfig, params: Params },
    /// A pretrained language model's victim file (import-model): its config and parameters.
    Checkpoint { config: VictimConfig, params: Params },
}

/// What a victim's flags choose besides where it starts (`cli::VictimArgs` gathers them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VictimShape {
    pub arch: Arch,
    /// Hidden units, where the architecture has them (the GPT's width).
    pub hidden: usize,
    pub gpt: crate::victims::gpt::GptShape,
    /// A translation model's source block (seq2seq).
    pub source_len: usize,
    /// Classes of a classifier (a language model's are its vocabulary).
    pub num_classes: usize,
    /// Tokens read at most.
    pub max_len: usize,
    pub train_embeddings: bool,
    /// Which of a checkpoint's parameters fine-tuning trains.
    pub regime: crate::victims::llama::Regime,
}

pub struct Origin {
    pub vocab: Vocab,
    pub start: Start,
    /// sha256 of the table file or of the encoder's weights (clean-cache keys, provenance).
    pub sha256: String,
    /// The path it was loaded from.
    pub source: String,
}

impl Origin {
    /// A build-vocab embeddings file.
    pub fn embeddings(path: &str) -> Result<Origin> {
        let (vocab, table) = crate::embeddings::load(path)?;
        let sha256 = crate::io::sha256_file(std::path::Path::new(path))?;
        Ok(Origin { vocab, start: Start::Table(table), sha256, source: path.to_string() })
    }

    /// The word table a trained victim learned (its `embedding.weight`, with its
    /// vocabulary): the table detectors' word space for a victim that trains its table, or
    /// for a pretrained checkpoint (its pieces' table, learned in pretraining). Another
    /// victim with a frozen table has learned none: its `--embeddings` file is that table.
    pub fn trained_table(path: &str) -> Result<Origin> {
        Origin::trained_table_of(&crate::victims::model::Victim::load(path, Device::Cpu)?, path)
    }

    /// `trained_table` of a victim already loaded from `path`.
    pub fn trained_table_of(file: &crate::victims::model::VictimFile, path: &str) -> Result<Origin> {
        // A pretrained checkpoint learned its table in pretraining, frozen or not since.
        let pretrained = file.victim.config.arch().start() == StartKind::Checkpoint;
        if !file.victim.config.train_embeddings && !pretrained {
            bail!("{path}: this victim kept its word table frozen, so it learned none; give the table it was trained from (--embeddings)");
        }
        Origin::word_table_of(file, path)
    }

    /// The word table of a loaded victim (`path`, its file) as the detectors read one: its
    /// `embedding.weight` on the CPU in f32, with its vocabulary and the file's hash.
    pub fn word_table_of(file: &crate::victims::model::VictimFile, path: &str) -> Result<Origin> {
        let params = file.victim.params();
        let Some(table) = params.get("embedding.weight") else {
            bail!("{path}: a {:?} victim has no word table (embedding.weight); the word-table detectors read word-level victims", file.victim.config.arch.name());
        };
        let table = table.detach().to_kind(tch::Kind::Float).to_device(Device::Cpu);
        Ok(Origin { vocab: file.vocab.clone(), start: Start::Table(table), sha256: file.sha256.clone(), source: path.to_string() })
    }

    /// A pretrained language model's victim file, as import-model writes it.
    pub fn checkpoint(path: &str) -> Result<Origin> {
        let file = Victim::load(path, Device::Cpu)?;
        let config = file.victim.config.clone();
        if config.arch().start() != StartKind::Checkpoint {
            bail!("{path} is a {:?} victim; --base takes a pretrained language model's victim file (import-model)", config.arch.name());
        }
        if let Some(base) = &file.victim.base {
            bail!("{path} is a fine-tuned victim (of {}); fine-tune from a whole checkpoint: --base {}", base.path, base.path);
        }
        let params = file.victim.params();
        Ok(Origin { vocab: file.vocab, start: Start::Checkpoint { config, params }, sha256: file.sha256, source: path.to_string() })
    }

    /// A pretrained MiniLM package folder: its config, weights and WordPiece tokenizer.
    pub fn pretrained(dir: &str) -> Result<Origin> {
        let file = |name: &str| format!("{dir}/{name}");
        if !std::path::Path::new(&file("config.json")).is_file() {
            bail!("{dir} holds no config.json; --pretrained takes the folder scripts/fetch_minilm.sh makes (data/minilm)");
        }
        let config = BertConfig::from_json(&file("config.json"))?;
        let wp = WordPiece::from_tokenizer_json(&file("tokenizer.json"))?;
        let weights = file("model.safetensors");
        let params = bert::load_weights(&weights, Device::Cpu)?;
        if wp.len() as i64 != config.vocab_size {
            bail!("{dir}: tokenizer.json lists {} pieces, config.json says {}; the folder mixes two models", wp.len(), config.vocab_size);
        }
        let sha256 = crate::io::sha256_file(std::path::Path::new(&weights))?;
        Ok(Origin { vocab: Vocab::from_wordpiece(wp), start: Start::Pretrained { config, params }, sha256, source: dir.to_string() })
    }

    /// The config of a victim of the given shape that starts from this origin: the
    /// embedding width, and for a pretrained encoder its config, come from the origin. The
    /// architecture must suit it. A GPT's classes are the vocabulary (it predicts the next
    /// word).
    pub fn victim_config(&self, shape: &VictimShape) -> Result<VictimConfig> {
        let VictimShape { arch, hidden, gpt, source_len, num_classes, max_len, train_embeddings, regime } = *shape;
        let (embed_dim, encoder) = match &self.start {
            Start::Table(table) => (table.size()[1] as usize, None),
            Start::Pretrained { config, .. } => (config.hidden_size as usize, Some(config)),
            Start::Checkpoint { config, .. } => {
                // The checkpoint decides the architecture and its shape; the flags choose how
                // it fine-tunes.
                let mut config = crate::victims::model::with_regime(config, regime, &self.source)?;
                config.train_embeddings = train_embeddings;
                return Ok(config);
            }
        };
        if !regime.is_all() {
            bail!("--regime {regime} chooses what a pretrained checkpoint's fine-tuning trains; give --base FILE (import-model)");
        }
        let name = format!("{arch:?}").to_lowercase();
        let arch = ArchConfig::from_flags(arch, hidden, encoder, gpt, source_len, max_len)?;
        let num_classes = if arch.get().output().over_vocab() { self.vocab.len() } else { num_classes };
        match (&self.start, arch.get().start()) {
            (Start::Checkpoint { .. }, _) => unreachable!("a checkpoint's config is its own (returned above)"),
            (Start::Table(_), StartKind::Table) => {}
            (Start::Pretrained { config: bert, .. }, StartKind::Pretrained) => {
                if max_len as i64 > bert.max_position_embeddings {
                    bail!("--max-len {max_len} exceeds the encoder's {} positions", bert.max_position_embeddings);
                }
                if train_embeddings {
                    bail!("--train-embeddings: the {name} victim keeps its word table frozen (the attack supports frozen tables only)");
                }
            }
            (Start::Table(_), StartKind::Pretrained) => bail!("--arch {name} starts from a pretrained encoder: give --pretrained data/minilm instead of --embeddings"),
            (Start::Pretrained { .. }, StartKind::Table) => bail!("--pretrained is for --arch minilm; a {:?} victim takes --embeddings", arch.name()),
            (_, StartKind::Checkpoint) => bail!("--arch {name} starts from a pretrained checkpoint: import it with import-model"),
        }
        let config = VictimConfig { arch, vocab_size: self.vocab.len(), embed_dim, num_classes, train_embeddings, max_len };
        config.arch().check(config.embed_dim, config.max_len)?;
        Ok(config)
    }

    /// A fresh victim (seed libtorch's generator first: it draws the untrained weights).
    pub fn new_victim(&self, config: VictimConfig, device: Device) -> Result<Victim> {
        match &self.start {
            Start::Table(table) => Victim::new(config, table, device),
            Start::Pretrained { params, .. } => Victim::from_pretrained(config, params, device),
            Start::Checkpoint { params, .. } => {
                let mut victim = Victim::new(config, &params["embedding.weight"], device)?;
                for (name, p) in victim.params().iter_mut() {
                    tch::no_grad(|| p.copy_(&params[name]));
                }
                victim.base = Some(BaseRef { path: self.source.clone(), sha256: self.sha256.clone() });
                Ok(victim)
            }
        }
    }
}

