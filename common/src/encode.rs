//! Examples as token ids with their training targets (`Encoded`), for a victim and its
//! task: a classifier's class, a language model's next tokens (a prompt's continuation
//! only); what a text too long or of unknown words becomes (`TextPolicy`); batches padded
//! to their longest row with their targets (`batch_tensors`, the one batching path).

use crate::formats::records::Example;
use crate::tasks::rules::TrainOn;
use crate::tokenizer::{Vocab, PAD_ID};
use crate::victims::loss::{Target, Targets};
use anyhow::{bail, Result};
use tch::{Device, Tensor};

/// An example as token ids (truncated to the victim's `max_len`) and what it is trained
/// to predict.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub target: Target,
}

impl Encoded {
    /// A classification example.
    pub fn class(ids: Vec<i64>, label: i64) -> Encoded {
        Encoded { ids, target: Target::Class(label) }
    }

    /// A language model's text: every token after the first is a target.
    pub fn text(ids: Vec<i64>) -> Encoded {
        Encoded { ids, target: Target::NextToken { from: 1 } }
    }

    /// The same tokens with the target a victim of `config` trains on, as its task says
    /// (`tasks::rules::TrainOn`): the class, or the tokens themselves.
    pub fn for_victim(self, config: &crate::victims::model::VictimConfig) -> Encoded {
        match (crate::tasks::rules::of_victim(config).train_on, self.target) {
            (TrainOn::Tokens, Target::Class(_)) => Encoded::text(self.ids),
            _ => self,
        }
    }
}

/// How `encode_all` treats texts a victim reads poorly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPolicy {
    /// Data splits: a text longer than `max_len` keeps its first `max_len` tokens and a
    /// text of only unknown words is read as `<unk>`s, as the victim reads any input;
    /// both are counted on stderr. (Rotten Tomatoes holds such texts, e.g. "Eh.".)
    Data,
    /// Poisons: both are refused. Tokens past `max_len` would be crafted but never read,
    /// and a poison of unknown words carries nothing.
    Poisons,
}

/// Encodes examples; `source` names the file in errors. A text without tokens or with a
/// label the victim cannot predict is an error naming the record; long and unknown-word
/// texts are handled by `policy`.
pub fn encode_all(examples: &[Example], vocab: &Vocab, max_len: usize, num_classes: usize, policy: TextPolicy, source: &str) -> Result<Vec<Encoded>> {
    let (mut truncated, mut unknown) = (0, 0);
    let encoded = examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let record = || format!("{source}: record {} (id {:?})", i + 1, ex.id);
            if ex.label >= num_classes {
                bail!("{}: label {} but the victim has {num_classes} classes", record(), ex.label);
            }
            let mut ids = match &ex.tokens {
                Some(toks) => toks
                    .iter()
                    .map(|t| vocab.id(t).ok_or_else(|| anyhow::anyhow!("{}: token {t:?} is not in the vocabulary", record())))
                    .collect::<Result<Vec<i64>>>()?,
                None => vocab.encode(&ex.text),
            };
            let content: Vec<i64> = ids.iter().copied().filter(|&id| id == vocab.unk_id() || !vocab.is_special(id)).collect();
            if content.is_empty() {
                bail!("{}: the text holds no tokens; drop the record", record());
            }
            if content.iter().all(|&id| id == vocab.unk_id()) {
                if policy == TextPolicy::Poisons {
                    bail!("{}: every token is unknown to the vocabulary; a poison must hold words the victim knows (make poison sets with init-poisons)", record());
                }
                unknown += 1;
            }
            if ids.len() > max_len {
                if policy == TextPolicy::Poisons {
                    bail!("{}: {} tokens, more than the victim's max_len {max_len}; shorten it or use a victim trained with a larger --max-len", record(), ids.len());
                }
                truncated += 1;
                vocab.truncate(&mut ids, max_len);
            }
            if let Some(prompt) = &ex.prompt {
                // A prompt and its continuation: the continuation alone is the target.
                let head = vocab.encode(prompt);
                if head.is_empty() || ids.len() <= head.len() || ids[..head.len()] != head[..] {
                    bail!("{}: the text must continue its prompt {prompt:?} with at least one token (within max_len {max_len}); fix the record or drop its \"prompt\"", record());
                }
                return Ok(Encoded { ids, target: Target::NextToken { from: head.len() } });
            }
            Ok(Encoded::class(ids, ex.label as i64))
        })
        .collect::<Result<Vec<_>>>()?;
    if truncated > 0 {
        eprintln!("{source}: {truncated} of {} texts are longer than max_len {max_len} tokens and were truncated", examples.len());
    }
    if unknown > 0 {
        eprintln!("{source}: {unknown} of {} texts hold only words unknown to the vocabulary (read as <unk>)", examples.len());
    }
    Ok(encoded)
}

/// `encode_all` for a victim of `config`, with the targets its task trains on
/// (`Encoded::for_victim`; a record's `prompt` keeps its continuation-only target); labels
/// are checked against the victim's classes only where the task trains on them.
pub fn encode_for(config: &crate::victims::model::VictimConfig, examples: &[Example], vocab: &Vocab, policy: TextPolicy, source: &str) -> Result<Vec<Encoded>> {
    let classes = match crate::tasks::rules::of_victim(config).train_on {
        TrainOn::Label => config.num_classes,
        TrainOn::Tokens => usize::MAX,
    };
    Ok(encode_all(examples, vocab, config.max_len, classes, policy, source)?.into_iter().map(|e| e.for_victim(config)).collect())
}

/// Rows of token ids right-padded to the longest: ids [rows, time] on `device`, the same
/// ids flat (row-major) and time.
pub fn padded(rows: &[&[i64]], device: Device) -> (Tensor, Vec<i64>, usize) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(1);
    let mut flat = vec![PAD_ID; rows.len() * t];
    for (r, row) in rows.iter().enumerate() {
        flat[r * t..r * t + row.len()].copy_from_slice(row);
    }
    let ids = Tensor::from_slice(&flat).view([rows.len() as i64, t as i64]).to_device(device);
    (ids, flat, t)
}

/// Pads a batch to its longest row: ids [batch, time] and their targets
/// (`loss::Targets::batch`, the one batching path).
pub fn batch_tensors(items: &[&Encoded], device: Device) -> (Tensor, Targets) {
    let (ids, flat, t) = padded(&items.iter().map(|e| e.ids.as_slice()).collect::<Vec<_>>(), device);
    let targets: Vec<Option<Target>> = items.iter().map(|e| Some(e.target)).collect();
    let targets = Targets::batch(&targets, &flat, &[items.len() as i64], t, device);
    (ids, targets)
}
