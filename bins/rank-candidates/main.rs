//! rank-candidates: first-order (Taylor) scores over the vocabulary, bottom-K candidate
//! replacements per poison position.

use anyhow::{bail, Context};
use clap::Parser;
use common::attack::{bottom_k, RolloutConfig, GRAD_FORMAT, GRAD_VERSION};
use common::concealment::{flip_conceals, Concealment};
use common::data::DataManifest;
use common::io::{self, Record};
use common::model::Victim;
use common::hardness::ObjectiveKind;
use common::poisons::{banned_ids, nearest_neighbours};
use common::tokenizer::Vocab;
use common::records::Candidate;
use common::{log, tensorfile};
use std::str::FromStr;

/// Which positions of each poison get candidates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Positions {
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

/// Scores every vocabulary word at every poison position by ∇g·e' and writes the K words
/// with the lowest predicted change ∇g·(e' − e) per chosen position, as candidate JSONL.
/// Never proposes padding, the unknown word, the current word or (without
/// --allow-overlap) a trigger word.
///
/// Examples:
///   rollout-grad ... | rank-candidates --victim v.safetensors --data data/rt-jb -k 50 > candidates.jsonl
///   rank-candidates --victim v.safetensors --data data/rt-jb --grad grad.safetensors --positions all | head
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    inputs: common::cli::CraftArgs,
    /// Gradient file from rollout-grad, - for stdin.
    #[arg(long, default_value = "-")]
    grad: String,
    /// Candidates per position.
    #[arg(short, default_value_t = 50, value_parser = common::cli::at_least_one)]
    k: usize,
    /// Positions per poison: all, best (one), or a number N (the N positions whose best
    /// candidate predicts the largest decrease). Measured on Rotten Tomatoes (BiLSTM, 50
    /// poisons, round 1): at 2,500 exact checks, 5 positions x K=10 lowered L_adv
    /// 0.862 -> 0.692, one position x K=50 only to 0.734; all positions x K=3 (3,474
    /// checks) to 0.678.
    #[arg(long, default_value = "5")]
    positions: Positions,
    /// Allow trigger words as candidates (the with-overlap baseline).
    #[arg(long)]
    allow_overlap: bool,
    /// token: never propose a trigger word (or piece). strict: never propose a word that
    /// leaks the trigger in any category of the strict audit, nor a WordPiece flip that
    /// joins pieces into such a word (the poisons must be strict already: init-poisons
    /// --concealment strict).
    #[arg(long, value_enum, default_value_t = Concealment::Token)]
    concealment: Concealment,
    /// Leave the positions that hold the trigger words' replacements alone (the poisons'
    /// `substitutes`): crafting then works on the rest of the sentence.
    #[arg(long)]
    keep_substitutes: bool,
    /// Only propose words seen at least this often in the clean training split (0: any
    /// vocabulary word). Rare words and GloVe-only words make odd, conspicuous poisons.
    #[arg(long, default_value_t = 0)]
    min_count: usize,
    /// Never propose the trigger words' N nearest embedding neighbours, so that crafting
    /// cannot simply add more trigger-like words.
    #[arg(long, default_value_t = 0)]
    exclude_neighbours: usize,
    /// Keep only the N best-predicted candidates of each poison (over all its positions).
    #[arg(long, value_parser = common::cli::at_least_one)]
    per_poison: Option<usize>,
    /// Output file, or - for stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn main() {
    common::cli::run("rank-candidates", || {
        let args = Args::parse();
        let common::model::VictimFile { victim, vocab, .. } = Victim::load(&args.inputs.victim, tch::Device::Cpu)?;
        let manifest = DataManifest::load(&args.inputs.data)?;
        let gname = io::display_name(&args.grad);
        let file = tensorfile::read(&args.grad, GRAD_FORMAT, GRAD_VERSION)?;
        if file.meta("vocab_sha256")? != vocab.sha256() {
            bail!("{gname} was made with another vocabulary than {}", args.inputs.victim);
        }
        let grad = file.tensor("grad")?.to_kind(tch::Kind::Float);
        if !bool::try_from(grad.isfinite().all())? {
            bail!("{gname}: the gradient holds NaN or Inf; rerun rollout-grad (with a lower --eta if its objective diverged)");
        }
        let ids = file.tensor("ids")?.shallow_clone();
        let poison_ids: Vec<String> = serde_json::from_str(file.meta("poison_ids")?).context("poison_ids")?;
        let rollout: RolloutConfig = serde_json::from_str(file.meta("rollout")?).context("rollout")?;
        let objective: f64 = file.meta("objective")?.parse().context("objective")?;
        let poisons_sha256 = file.meta("poisons_sha256")?.to_string();
        let victim_sha256 = file.meta("victim_sha256").context(gname.clone())?.to_string();
        let (n, t, d) = grad.size3().context("grad must be [poisons, tokens, dim]")?;
        if ids.size() != [n, t] || poison_ids.len() != n as usize {
            bail!("{gname}: ids {:?} and {} poison ids do not match grad {:?}", ids.size(), poison_ids.len(), grad.size());
        }
        let table = victim.params()["embedding.weight"].to_kind(tch::Kind::Float);
        if table.size()[1] != d {
            bail!("{gname}: gradients of dimension {d}, the victim's embeddings have {}", table.size()[1]);
        }
        // Keys older gradient files lack: the bi-level objective, no ensemble, no substitutes.
        let objective_kind: ObjectiveKind = file.meta_json("objective_kind").context(gname.clone())?.unwrap_or_default();
        let ensemble_sha256: Vec<String> = file.meta_json("ensemble_sha256").context(gname.clone())?.unwrap_or_default();
        let substitutes: Vec<Vec<usize>> =
            file.meta_json("substitutes").context(gname.clone())?.unwrap_or_else(|| vec![Vec::new(); n as usize]);
        if substitutes.len() != n as usize {
            bail!("{gname}: substitutes for {} poisons, gradients for {n}", substitutes.len());
        }
        let mut banned = banned_ids(&vocab, &manifest, args.allow_overlap, args.concealment)?;
        let strict = (args.concealment == Concealment::Strict && !args.allow_overlap).then(|| common::poisons::matcher(&vocab, &manifest)).transpose()?;
        if args.exclude_neighbours > 0 {
            for id in vocab.trigger_ids(&manifest.trigger.phrase)? {
                banned.extend(nearest_neighbours(&table, id, table.size()[0]).into_iter().take(args.exclude_neighbours));
            }
        }
        if args.min_count > 0 {
            let rare = rare_words(&vocab, &args.inputs.data, args.min_count)?;
            log!("{} of {} vocabulary words seen fewer than {} times in training: not proposed", rare.len(), vocab.len(), args.min_count);
            banned.extend(rare);
        }
        // A flip keeps a position's kind (a word-initial piece stays word-initial, a WordPiece
        // `##` piece stays `##`), so the poison still decodes into the same words and reads as
        // text ("the movie gets" never becomes "the moviecre"). GloVe words are all initial.
        let mask_of_kind = |continuation: bool| {
            let m: Vec<f32> = (0..vocab.len() as i64)
                .map(|i| if banned.contains(&i) || vocab.is_continuation(i) != continuation { f32::INFINITY } else { 0.0 })
                .collect();
            tch::Tensor::from_slice(&m)
        };
        let masks = [mask_of_kind(false), mask_of_kind(true)];
        let mut out = io::Output::create(&args.output)?;
        let mut written = 0;
        for i in 0..n {
            let row: Vec<i64> = Vec::try_from(ids.get(i))?;
            let len = row.iter().take_while(|&&x| x != 0).count();
            let mask = if vocab.is_wordpiece() {
                let rows: Vec<&tch::Tensor> = row[..len].iter().map(|&id| &masks[vocab.is_continuation(id) as usize]).collect();
                tch::Tensor::stack(&rows, 0)
            } else {
                masks[0].shallow_clone()
            };
            let ranked = bottom_k(&table, &grad.get(i), &row[..len], &mask, args.k);
            // Special tokens ([CLS], [SEP]) hold their places; substitutes may be kept too.
            let keep = |j: &usize| !vocab.is_special(row[*j]) && !(args.keep_substitutes && substitutes[i as usize].contains(j));
            let mut per_position: Vec<(usize, i64, Vec<(i64, f64)>)> =
                ranked.into_iter().enumerate().filter(|(j, _)| keep(j)).map(|(j, c)| (j, row[j], c)).collect();
            if let Positions::Best(b) = args.positions {
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
            if let Some(matcher) = &strict {
                // A flip must not join WordPiece pieces into a leaking word ("bo" + "##nds").
                flat.retain(|&(j, _, _, w, _)| flip_conceals(&row[..len], j, w, &vocab, matcher));
            }
            if let Some(cap) = args.per_poison {
                flat.sort_by(|a, b| a.4.total_cmp(&b.4));
                flat.truncate(cap);
            }
            for (j, current, rank, w, predicted) in flat {
                out.write_record(&Candidate {
                    kind: Candidate::KIND.into(),
                    v: Candidate::VERSION,
                    poison_id: poison_ids[i as usize].clone(),
                    poison_index: i as usize,
                    position: j,
                    current: vocab.word(current).to_string(),
                    word: vocab.word(w).to_string(),
                    predicted,
                    rank,
                    objective,
                    poisons_sha256: poisons_sha256.clone(),
                    victim_sha256: victim_sha256.clone(),
                    rollout: rollout.clone(),
                    objective_kind,
                    ensemble_sha256: ensemble_sha256.clone(),
                })?;
                written += 1;
            }
        }
        out.commit()?;
        log!("{written} candidates for {n} poisons ({:?} positions, K={})", args.positions, args.k);
        Ok(())
    })
}

/// Vocabulary ids seen fewer than `min_count` times in the clean training split.
fn rare_words(vocab: &Vocab, dir: &str, min_count: usize) -> anyhow::Result<Vec<i64>> {
    let mut counts = vec![0usize; vocab.len()];
    for e in common::data::read_set(dir, common::data::TRAIN, false)? {
        for id in vocab.encode(&e.text) {
            counts[id as usize] += 1;
        }
    }
    Ok((0..vocab.len() as i64).filter(|&i| counts[i as usize] < min_count).collect())
}
