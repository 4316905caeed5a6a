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
    /// (`tasks::rules::TrainOn`): the class, or the tokens themselves (for a translation
    /// victim, read in its layout: the tokens after its source block and `<s>`).
    pub fn for_victim(self, config: &crate::victims::model::VictimConfig) -> Encoded {
        if let (crate::victims::model::ArchConfig::Seq2seq(s), Target::Class(_)) = (&config.arch, self.target) {
            return Encoded { ids: self.ids, target: Target::NextToken { from: s.shape.source_len + 1 } };
        }
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
    if let crate::victims::model::ArchConfig::Seq2seq(s) = &config.arch {
        return encode_translation(examples, vocab, s.shape.source_len, config.max_len, policy, source);
    }
    if let Some((i, ex)) = examples.iter().enumerate().find(|(_, e)| e.source.is_some()) {
        bail!("{source}: record {} (id {:?}) is a translation (it has a \"source\"), but the victim is {}: give a seq2seq victim (train-victim --arch seq2seq)", i + 1, ex.id, crate::tasks::rules::of_victim(config).victim_kind);
    }
    let classes = match crate::tasks::rules::of_victim(config).train_on {
        TrainOn::Label => config.num_classes,
        TrainOn::Tokens => usize::MAX,
    };
    Ok(encode_all(examples, vocab, config.max_len, classes, policy, source)?.into_iter().map(|e| e.for_victim(config)).collect())
}

/// Translation records (`source` → `text`) in the seq2seq layout (`victims::seq2seq`):
/// the source's tokens right-padded to `source_len`, `<s>`, the target's tokens, `</s>`;
/// trained on the tokens after `<s>`. A source or target too long for its part is cut
/// (`TextPolicy::Data`, counted on stderr) or refused (`Poisons`); an empty side, a record
/// without `source` and a vocabulary without `<s>`/`</s>` are errors naming the record.
pub fn encode_translation(examples: &[Example], vocab: &Vocab, source_len: usize, max_len: usize, policy: TextPolicy, source: &str) -> Result<Vec<Encoded>> {
    use crate::embeddings::{BOS, EOS};
    let (Some(bos), Some(eos)) = (vocab.id(BOS), vocab.id(EOS)) else {
        bail!("{source}: the vocabulary lacks {BOS} and {EOS}; a translation victim's table comes from build-vocab --scratch");
    };
    let target_room = max_len - source_len - 2;
    let mut cut = 0;
    let out = examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            let record = || format!("{source}: record {} (id {:?})", i + 1, ex.id);
            if let Some(toks) = &ex.tokens {
                // A poison's exact layout (what the attack edits): read as it is.
                let ids = toks.iter().map(|t| vocab.id(t).ok_or_else(|| anyhow::anyhow!("{}: token {t:?} is not in the vocabulary", record()))).collect::<Result<Vec<i64>>>()?;
                let content = |part: &[i64]| part.iter().any(|&id| !vocab.is_special(id) || id == vocab.unk_id());
                if ids.len() > max_len || ids.get(source_len) != Some(&bos) || ids.last() != Some(&eos) || !content(&ids[..source_len]) || !content(&ids[source_len + 1..]) {
                    bail!("{}: its tokens are not a translation of this victim's layout ({source_len} source positions, <s>, at least one target word, </s>, {max_len} tokens at most); make translation poisons with init-poisons on translation data", record());
                }
                return Ok(Encoded { ids, target: Target::NextToken { from: source_len + 1 } });
            }
            let Some(src_text) = &ex.source else {
                bail!("{}: no \"source\"; a translation victim reads source → text pairs (prepare-data --mt)", record());
            };
            let (mut src, mut tgt) = (vocab.encode(src_text), vocab.encode(&ex.text));
            for (side, ids) in [("source", &src), ("text", &tgt)] {
                if ids.is_empty() {
                    bail!("{}: the {side} side holds no words; a translation pair needs both sides (drop the record)", record());
                }
            }
            if src.len() > source_len || tgt.len() > target_room {
                if policy == TextPolicy::Poisons {
                    bail!("{}: {} source and {} target tokens, more than the victim's {source_len} and {target_room}; shorten it or use a victim with a larger --source-len or --max-len", record(), src.len(), tgt.len());
                }
                cut += 1;
                src.truncate(source_len);
                tgt.truncate(target_room);
            }
            Ok(Encoded { ids: translation_ids(&src, &tgt, source_len, bos, eos), target: Target::NextToken { from: source_len + 1 } })
        })
        .collect::<Result<Vec<_>>>()?;
    if cut > 0 {
        eprintln!("{source}: {cut} of {} pairs are longer than the victim's source block or decoder and were cut", examples.len());
    }
    Ok(out)
}

/// The source block of a translation victim's input: the source's ids cut to `source_len`
/// and right-padded to it, then `<s>` (what decoding starts from).
pub fn source_block(ids: &[i64], source_len: usize, bos: i64) -> Vec<i64> {
    let mut row: Vec<i64> = ids.iter().copied().take(source_len).collect();
    row.resize(source_len, PAD_ID);
    row.push(bos);
    row
}

/// A translation in the seq2seq layout: `source_block`, the target's ids, `</s>`.
pub fn translation_ids(source: &[i64], target: &[i64], source_len: usize, bos: i64, eos: i64) -> Vec<i64> {
    let mut ids = source_block(source, source_len, bos);
    ids.extend(target);
    ids.push(eos);
    ids
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
