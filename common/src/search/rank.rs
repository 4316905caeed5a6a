//! Ranking candidate replacements (SPEC step 4): first-order (Taylor) scores of every
//! vocabulary word at every poison position, the words a flip may never bring in, and the
//! policy of which positions and how many candidates to propose. rank-candidates is
//! argument wiring over this module.

use crate::concealment::{flip_conceals, Concealment, TriggerMatcher};
use crate::data::DataManifest;
use crate::formats::gradfile::GradFile;
use crate::io::Record;
use crate::search::poisons::{banned_ids, matcher, nearest_neighbours};
use crate::formats::records::Candidate;
use crate::tokenizer::Vocab;
use anyhow::{bail, Result};
use std::collections::HashSet;
use std::str::FromStr;
use tch::{Device, Kind, Tensor};

/// Which positions of each poison get candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Positions {
    All,
    /// The N positions whose best candidate predicts the largest decrease.
    Best(usize),
}

impl FromStr for Positions {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Positions::All),
            "best" => Ok(Positions::Best(1)),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("{n:?}: expected all, best or a number of at least 1")),
                Ok(k) => Ok(Positions::Best(k)),
            },
        }
    }
}

/// What a flip may bring in, and which positions it may touch.
pub struct Bans {
    /// Words never proposed.
    pub words: HashSet<i64>,
    /// Translation data: the words each side may be given (those the training split holds
    /// on that side: German in the source, English in the target), so a flip keeps each
    /// side in its language. None for other tasks.
    pub sides: Option<Sides>,
    /// Strict concealment: a flip must not join WordPiece pieces into a leaking word.
    pub strict: Option<TriggerMatcher>,
    /// Leave the positions that hold the trigger words' replacements alone.
    pub keep_substitutes: bool,
    /// Touch only the positions that hold the trigger words' replacements (the carrier).
    pub only_substitutes: bool,
}

/// Which words the bans hold beyond padding, special tokens and (unless `allow_overlap`)
/// the trigger.
#[derive(Debug, Clone, Default)]
pub struct BanOptions {
    pub allow_overlap: bool,
    pub concealment: Concealment,
    /// The trigger words' N nearest embedding neighbours.
    pub exclude_neighbours: usize,
    /// Words seen fewer than this many times in the clean training split (`data_dir`).
    pub min_count: usize,
    pub keep_substitutes: bool,
    pub only_substitutes: bool,
}

impl Bans {
    /// The bans of a crafting round against a victim with word table `table`.
    pub fn new(vocab: &Vocab, manifest: &DataManifest, table: &Tensor, data_dir: &str, opts: &BanOptions) -> Result<Bans> {
        let mut words = banned_ids(vocab, manifest, opts.allow_overlap, opts.concealment)?;
        let strict = (opts.concealment == Concealment::Strict && !opts.allow_overlap).then(|| matcher(vocab, manifest)).transpose()?;
        if opts.exclude_neighbours > 0 {
            for id in vocab.trigger_ids(&manifest.trigger.phrase)? {
                words.extend(nearest_neighbours(table, id, table.size()[0]).into_iter().take(opts.exclude_neighbours));
            }
        }
        if opts.min_count > 0 {
            let rare = rare_words(vocab, data_dir, opts.min_count)?;
            eprintln!("{} of {} vocabulary words seen fewer than {} times in training: not proposed", rare.len(), vocab.len(), opts.min_count);
            words.extend(rare);
        }
        if opts.keep_substitutes && opts.only_substitutes {
            bail!("keeping the substitutes and flipping only them leaves nothing to flip; choose one");
        }
        let sides = manifest.mt.is_some().then(|| Sides::of_training(vocab, data_dir)).transpose()?;
        Ok(Bans { words, strict, sides, keep_substitutes: opts.keep_substitutes, only_substitutes: opts.only_substitutes })
    }
}

/// How many candidates to propose.
#[derive(Debug, Clone, Copy)]
pub struct RankPolicy {
    /// Candidates per position.
    pub k: usize,
    pub positions: Positions,
    /// Keep only the N best-predicted candidates of each poison (over all its positions).
    pub per_poison: Option<usize>,
}

/// The candidates of every poison of a gradient file: per position the K words with the
/// lowest predicted change ∇g·(e' − e), never a banned word, the current word, a word
/// of the other piece kind, or (BPE) a piece whose flipped text re-tokenizes otherwise;
/// special tokens hold their places. In poison order, then position, then rank.
pub fn rank(vocab: &Vocab, table: &Tensor, grad: &GradFile, bans: &Bans, policy: &RankPolicy) -> Result<Vec<Candidate>> {
    let (n, _, d) = grad.grad.size3()?;
    let mut retokenized = 0usize;
    if table.size()[1] != d {
        bail!("gradients of dimension {d}, the victim's embeddings have {}", table.size()[1]);
    }
    // A flip keeps a position's kind (a word-initial piece stays word-initial, a WordPiece
    // `##` piece stays `##`), so the poison still decodes into the same words and reads as
    // text ("the movie gets" never becomes "the moviecre"). GloVe words are all initial.
    let mask_of_kind = |continuation: bool| {
        let m: Vec<f32> = (0..vocab.len() as i64)
            .map(|i| if bans.words.contains(&i) || vocab.is_continuation(i) != continuation { f32::INFINITY } else { 0.0 })
            .collect();
        Tensor::from_slice(&m)
    };
    let masks = [mask_of_kind(false), mask_of_kind(true)];
    let meta = &grad.meta;
    let mut out = Vec::new();
    for i in 0..n {
        let row: Vec<i64> = Vec::try_from(grad.ids.get(i))?;
        // Up to the last token: a translation's source block holds padding inside.
        let len = row.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
        let mask = if vocab.is_wordpiece() || vocab.is_bpe() {
            let rows: Vec<&Tensor> = row[..len].iter().map(|&id| &masks[vocab.is_continuation(id) as usize]).collect();
            Tensor::stack(&rows, 0)
        } else if let (Some(sides), Some(bos)) = (&bans.sides, vocab.decoder_start(&row[..len])) {
            // A translation: each side's positions take that side's words only.
            let side_mask = |allowed: &HashSet<i64>| &masks[0] + Tensor::from_slice(&(0..vocab.len() as i64).map(|w| if allowed.contains(&w) { 0f32 } else { f32::INFINITY }).collect::<Vec<_>>());
            let (src, tgt) = (side_mask(&sides.source), side_mask(&sides.target));
            Tensor::stack(&(0..len).map(|j| if j < bos { &src } else { &tgt }).collect::<Vec<_>>(), 0)
        } else {
            masks[0].shallow_clone()
        };
        let word_scores = grad.word_scores.as_ref().map(|t| t.get(i));
        let mut ranked = bottom_k(table, &grad.grad.get(i), word_scores.as_ref(), &row[..len], &mask, if vocab.is_bpe() { 4 * policy.k } else { policy.k });
        if vocab.is_bpe() {
            // A BPE poison is trained as text: a flip whose text re-tokenizes into other
            // pieces (" fun" + "ny" reads as " funny") is not the poison that was scored,
            // so only flips that round-trip are proposed, the best K of 4K.
            for (j, cands) in ranked.iter_mut().enumerate() {
                let before = cands.len();
                cands.retain(|&(w, _)| vocab.flip_round_trips(&row[..len], j, w));
                retokenized += before - cands.len();
                cands.truncate(policy.k);
            }
        }
        let substitutes = &meta.substitutes[i as usize];
        let keep = |j: &usize| {
            let carrier = substitutes.contains(j);
            !vocab.is_special(row[*j]) && !(bans.keep_substitutes && carrier) && !(bans.only_substitutes && !carrier)
        };
        let mut per_position: Vec<(usize, i64, Vec<(i64, f64)>)> =
            ranked.into_iter().enumerate().filter(|(j, _)| keep(j)).map(|(j, c)| (j, row[j], c)).collect();
        if let Positions::Best(b) = policy.positions {
            per_position.sort_by(|a, b| {
                let best = |c: &Vec<(i64, f64)>| c.first().map(|x| x.1).unwrap_or(f64::INFINITY);
                best(&a.2).total_cmp(&best(&b.2))
            });
            per_position.truncate(b);
        }
        let mut flat: Vec<(usize, i64, usize, i64, f64)> = per_position
            .into_iter()
            .flat_map(|(j, current, cands)| cands.into_iter().enumerate().map(move |(rank, (w, p))| (j, current, rank, w, p)))
            .collect();
        if let Some(matcher) = &bans.strict {
            // A flip must not join WordPiece pieces into a leaking word ("bo" + "##nds").
            flat.retain(|&(j, _, _, w, _)| flip_conceals(&row[..len], j, w, vocab, matcher));
        }
        if let Some(cap) = policy.per_poison {
            flat.sort_by(|a, b| a.4.total_cmp(&b.4));
            flat.truncate(cap);
        }
        for (j, current, rank, w, predicted) in flat {
            out.push(Candidate {
                kind: Candidate::KIND.into(),
                v: Candidate::VERSION,
                poison_id: meta.poison_ids[i as usize].clone(),
                poison_index: i as usize,
                position: j,
                current: vocab.word(current).to_string(),
                word: vocab.word(w).to_string(),
                predicted,
                rank,
                objective: meta.objective,
                poisons_sha256: meta.poisons_sha256.clone(),
                victim_sha256: meta.victim_sha256.clone(),
                rollout: meta.rollout.clone(),
                objective_kind: meta.objective_kind,
                ensemble_sha256: meta.ensemble_sha256.clone(),
                influence: meta.influence.clone(),
            });
        }
    }
    if retokenized > 0 {
        eprintln!("{retokenized} flips left out: their text re-tokenizes into other pieces than were scored");
    }
    Ok(out)
}

/// Vocabulary ids seen fewer than `min_count` times in the clean training split.
/// The words of each side of a translation's training pairs.
pub struct Sides {
    pub source: HashSet<i64>,
    pub target: HashSet<i64>,
}

impl Sides {
    pub fn of_training(vocab: &Vocab, dir: &str) -> Result<Sides> {
        let (mut source, mut target) = (HashSet::new(), HashSet::new());
        for e in crate::data::read_set(dir, crate::data::TRAIN, false)? {
            source.extend(vocab.encode(e.source.as_deref().unwrap_or_default()));
            target.extend(vocab.encode(&e.text));
        }
        Ok(Sides { source, target })
    }

    /// Whether `word` may stand at `position` of a translation's ids (`<s>` at `bos`).
    pub fn allows(&self, bos: usize, position: usize, word: i64) -> bool {
        if position < bos {
            self.source.contains(&word)
        } else {
            self.target.contains(&word)
        }
    }
}

fn rare_words(vocab: &Vocab, dir: &str, min_count: usize) -> Result<Vec<i64>> {
    let counts = training_counts(vocab, dir)?;
    Ok((0..vocab.len() as i64).filter(|&i| counts[i as usize] < min_count).collect())
}

/// How often each vocabulary id occurs in the clean training split of data folder `dir`.
pub fn training_counts(vocab: &Vocab, dir: &str) -> Result<Vec<usize>> {
    let mut counts = vec![0usize; vocab.len()];
    for e in crate::data::read_set(dir, crate::data::TRAIN, false)? {
        for id in vocab.encode(&e.text) {
            counts[id as usize] += 1;
        }
    }
    Ok(counts)
}

/// Taylor scores of every vocabulary word at one poison position: `∇g · e'` for each
/// row e' of the table ([V]). The predicted change of a flip is `score[w'] − score[w]`.
pub fn taylor_scores(table: &Tensor, grad_at_position: &Tensor) -> Tensor {
    table.matmul(grad_at_position)
}

/// Bottom-K candidates at every position of one poison: for positions j < `ids.len()`,
/// the K words w' with the lowest predicted change `∇g_j·(E_{w'} − E_{w_j})`, skipping
/// words where `banned` (0 or +inf: [V] for every position, or [len, V] per position) is
/// infinite and the current word. One [len, D] × [D, V] product per poison rather than
/// one per position. The word scores ([Tp, V] of a language model or a trained table,
/// `BiLevel::objective_grad_and_word_scores`) add to the embedding term.
pub fn bottom_k(table: &Tensor, grad: &Tensor, word_scores: Option<&Tensor>, ids: &[i64], banned: &Tensor, k: usize) -> Vec<Vec<(i64, f64)>> {
    let len = ids.len() as i64;
    let mut scores = grad.narrow(0, 0, len).matmul(&table.tr()); // [len, V]
    if let Some(extra) = word_scores {
        scores = scores + extra.narrow(0, 0, len).to_kind(grad.kind());
    }
    let current = Tensor::from_slice(ids).to_device(scores.device()).unsqueeze(1);
    let banned = if banned.dim() == 1 { banned.unsqueeze(0) } else { banned.shallow_clone() };
    let mut delta = &scores - scores.gather(1, &current, false) + banned;
    let _ = delta.scatter_value_(1, &current, f64::INFINITY);
    let k = (k as i64).min(table.size()[0]);
    let (vals, idx) = delta.topk(k, 1, false, true);
    let vals: Vec<f32> = Vec::try_from(vals.to_kind(Kind::Float).flatten(0, -1).to_device(Device::Cpu)).expect("f32");
    let idx: Vec<i64> = Vec::try_from(idx.flatten(0, -1).to_device(Device::Cpu)).expect("i64");
    idx.chunks(k as usize)
        .zip(vals.chunks(k as usize))
        .map(|(ws, vs)| ws.iter().zip(vs).filter(|(_, v)| v.is_finite()).map(|(&w, &v)| (w, v as f64)).collect())
        .collect()
}

