//! What a new victim starts from: a word embedding table made by build-vocab (the bow and
//! lstm victims) or a pretrained encoder package folder (the minilm victim: config.json,
//! model.safetensors and tokenizer.json, as scripts/fetch_minilm.sh keeps them). The
//! training stages (train-victim, finetune-eval) take one of the two and build every
//! victim through `Base::new_victim`.

use crate::bert::{self, BertConfig};
use crate::model::{Arch, Params, Victim, VictimConfig};
use crate::tokenizer::Vocab;
use crate::wordpiece::WordPiece;
use anyhow::{bail, Result};
use tch::{Device, Tensor};

pub enum Start {
    /// A frozen word embedding table [vocab, dim].
    Table(Tensor),
    /// The pretrained encoder's parameters under their package names.
    Pretrained { config: BertConfig, params: Params },
}

pub struct Base {
    pub vocab: Vocab,
    pub start: Start,
    /// sha256 of the table file or of the encoder's weights (clean-cache keys, provenance).
    pub sha256: String,
    /// The path it was loaded from.
    pub source: String,
}

impl Base {
    /// A build-vocab embeddings file.
    pub fn embeddings(path: &str) -> Result<Base> {
        let (vocab, table) = crate::embeddings::load(path)?;
        let sha256 = crate::io::sha256_file(std::path::Path::new(path))?;
        Ok(Base { vocab, start: Start::Table(table), sha256, source: path.to_string() })
    }

    /// A pretrained MiniLM package folder: its config, weights and WordPiece tokenizer.
    pub fn pretrained(dir: &str) -> Result<Base> {
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
        Ok(Base { vocab: Vocab::from_wordpiece(wp), start: Start::Pretrained { config, params }, sha256, source: dir.to_string() })
    }

    /// The victim config `draft` (its architecture, widths and lengths as asked) completed
    /// from this base: the embedding width, and for minilm the encoder's config. The
    /// architecture must suit the base.
    pub fn victim_config(&self, draft: VictimConfig) -> Result<VictimConfig> {
        let mut config = draft;
        match (&self.start, config.arch) {
            (Start::Table(table), Arch::Bow | Arch::Lstm) => config.embed_dim = table.size()[1] as usize,
            (Start::Pretrained { config: bert, .. }, Arch::Minilm) => {
                if config.max_len as i64 > bert.max_position_embeddings {
                    bail!("--max-len {} exceeds the encoder's {} positions", config.max_len, bert.max_position_embeddings);
                }
                if config.train_embeddings {
                    bail!("--train-embeddings: the minilm victim keeps its word table frozen (the attack supports frozen tables only)");
                }
                config.embed_dim = bert.hidden_size as usize;
                config.hidden = bert.hidden_size as usize;
                config.bert = Some(bert.clone());
            }
            (Start::Table(_), Arch::Minilm) => bail!("--arch minilm starts from a pretrained encoder: give --pretrained data/minilm instead of --embeddings"),
            (Start::Pretrained { .. }, arch) => bail!("--pretrained is for --arch minilm; a {arch:?} victim takes --embeddings"),
        }
        Ok(config)
    }

    /// A fresh victim (seed libtorch's generator first: it draws the untrained weights).
    pub fn new_victim(&self, config: VictimConfig, device: Device) -> Result<Victim> {
        match &self.start {
            Start::Table(table) => Victim::new(config, table, device),
            Start::Pretrained { params, .. } => Victim::from_pretrained(config, params, device),
        }
    }
}
