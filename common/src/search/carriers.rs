//! The carriers as one decision for the whole poison set (select-carriers).
//!
//! A concealed poison holds, where its base held each trigger word, a stand-in word: the
//! carrier. On the frozen-GloVe classifier the carrier words, one choice for all poisons,
//! decide most of the effect (docs/classification.md), and first-order proxies do not
//! predict what retraining does with them. So the choice is made here as the seed's method
//! makes any choice it cannot judge in one step, by the real objective:
//! 1. candidates per trigger word: its nearest allowed neighbours in the victim's table and
//!    the words the bi-level gradient, summed over that word's slots, ranks best among the
//!    allowed words near it (allowed: strictly concealed, seen in training, within the
//!    detection budget's word ban);
//! 2. every combination ranked two ways, by the bi-level objective of the whole set with it
//!    and by its closeness to the trigger's words, taken from the two rankings in turn
//!    (`interleave`) and checked against the detection budget poison by poison;
//! 3. the first few (the set's current carriers always first) retrained: victims of the
//!    attacker's own seeds trained on the training split ∪ the set with those carriers,
//!    exactly as an evaluation trains them, and measured on the attacker's D_adv (D_adv
//!    without the poisons' bases); the carriers with the highest mean ASR there are kept.

use crate::concealment::Concealment;
use crate::data;
use crate::detect::evasion::DetectionBudget;
use crate::encode::{encode_all, Encoded, TextPolicy};
use crate::eval::retrain::{retrain, CleanCache, Pairing, Retraining};
use crate::eval::EvalSets;
use crate::formats::records::{CarrierCandidate, CarrierSelection, Example, ObjectiveKind, RolloutConfig};
use crate::objectives::swaps::poison_set_sha256;
use crate::objectives::ObjectiveInputs;
use crate::search::poisons::{banned_ids, nearest_neighbours, with_tokens, AttackInputs};
use crate::tokenizer::{tokenize, Vocab};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use tch::{Device, Kind, Tensor};

/// Where each trigger word's carrier sits in the poison set.
#[derive(Debug, Clone, PartialEq)]
pub struct CarrierSlots {
    /// Per trigger word (the phrase's order): the (poison, position) slots that stand for it.
    pub slots: Vec<Vec<(usize, usize)>>,
    /// Per trigger word: the word most of its slots hold now (ties: the lowest id).
    pub current: Vec<i64>,
}

impl CarrierSlots {
    /// The carrier slots of `inputs`' poisons: each poison's substitute positions (from
    /// init-poisons) whose word in the poison's D_adv base (read as init-poisons reads it:
    /// its known words in order) is one of the trigger's words. Positions that stand for
    /// another word (a word that leaks the trigger, one over the detection budget) are not
    /// carriers and stay as they are.
    pub fn find(inputs: &AttackInputs) -> Result<CarrierSlots> {
        let vocab = &inputs.vocab;
        let dir = &inputs.data_dir;
        let words: Vec<String> = inputs.manifest.trigger.words.iter().map(|w| w.to_lowercase()).collect();
        let bases: std::collections::HashMap<String, Example> =
            data::read_set(dir, data::ADV, false)?.into_iter().map(|e| (e.id.trim_end_matches("+trigger").to_string(), e)).collect();
        let mut slots = vec![Vec::new(); words.len()];
        for (i, p) in inputs.poisons.iter().enumerate() {
            let at = || format!("poison {} (id {:?})", i + 1, p.id);
            let Some(subs) = &p.substitutes else { continue };
            let source = p.source_id.as_deref().with_context(|| format!("{} has substitutes but no source_id; make the set with init-poisons", at()))?;
            let base = bases.get(source).with_context(|| format!("{}: its base {source:?} is not in {dir}/{}; the set was made from another data folder", at(), data::ADV))?;
            let known: Vec<String> = tokenize(&base.text).into_iter().filter(|t| vocab.id(t).is_some()).collect();
            for &pos in subs {
                if let Some(j) = known.get(pos).and_then(|w| words.iter().position(|t| t == &w.to_lowercase())) {
                    slots[j].push((i, pos));
                }
            }
        }
        let mut current = Vec::with_capacity(words.len());
        for (j, s) in slots.iter().enumerate() {
            if s.is_empty() {
                bail!("no poison holds a stand-in for the trigger word {:?}: select-carriers takes a set made by init-poisons --strategy neighbour or random from D_adv (substitutes recorded)", words[j]);
            }
            let mut counts: std::collections::BTreeMap<i64, usize> = Default::default();
            for &(i, pos) in s {
                *counts.entry(inputs.poisons_enc[i].ids[pos]).or_default() += 1;
            }
            current.push(counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(w, _)| *w).expect("non-empty"));
        }
        Ok(CarrierSlots { slots, current })
    }

    /// The encoded set with every slot of trigger word j holding `carriers[j]`.
    pub fn apply_encoded(&self, poisons: &[Encoded], carriers: &[i64]) -> Vec<Encoded> {
        let mut out = poisons.to_vec();
        for (s, &w) in self.slots.iter().zip(carriers) {
            for &(i, pos) in s {
                out[i].ids[pos] = w;
            }
        }
        out
    }

    /// The poison records with every slot of trigger word j holding `carriers[j]` (tokens
    /// and text rewritten; ids, labels, sources and substitutes kept).
    pub fn apply(&self, poisons: &[Example], encoded: &[Encoded], carriers: &[i64], vocab: &Vocab) -> Vec<Example> {
        let enc = self.apply_encoded(encoded, carriers);
        poisons.iter().zip(&enc).map(|(p, e)| with_tokens(p, &e.ids, vocab)).collect()
    }
}

/// How candidates are proposed and how many are retrained.
#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// Nearest allowed neighbours per trigger word.
    pub neighbours: usize,
    /// Words per trigger word from the gradient's ranking (besides the neighbours).
    pub from_gradient: usize,
    /// The gradient ranks the allowed words among this many nearest to the trigger word.
    pub pool: usize,
    /// Carriers are words seen at least this often in the training split.
    pub min_count: usize,
    /// Candidates retrained (the current carriers among them).
    pub retrain: usize,
    /// The attacker's retraining seeds.
    pub seeds: Vec<u64>,
    /// The most victims a selection may train (clean twins included).
    pub max_victims: usize,
    /// The bi-level ranking's unrolling.
    pub rollout: RolloutConfig,
    pub concealment: Concealment,
}

/// How the attacker retrains victims: as finetune-eval would, with its own seeds.
pub struct AttackerTraining<'a> {
    pub origin: &'a crate::victims::origin::Origin,
    pub config: &'a crate::victims::model::VictimConfig,
    pub options: &'a dyn Fn(u64) -> crate::train::TrainOptions,
    pub device: Device,
    pub workers: usize,
    /// A folder keeping the attacker's clean twins' figures (shared by selections on the same
    /// bases), or None.
    pub clean_cache: Option<&'a str>,
}

/// Whether a vocabulary word may be a carrier: readable (2+ ASCII letters), not banned
/// (special, a trigger word, a strict leak, over the budget's word threshold) and seen
/// `min_count` times in training.
fn allowed_fn<'a>(vocab: &'a Vocab, banned: &'a HashSet<i64>, counts: &'a [usize], min_count: usize) -> impl Fn(i64) -> bool + 'a {
    move |w: i64| {
        let word = vocab.word(w);
        !banned.contains(&w) && counts[w as usize] >= min_count && word.len() >= 2 && word.chars().all(|c| c.is_ascii_alphabetic())
    }
}

/// Candidate words per trigger word: the current carrier, its `neighbours` nearest allowed
/// neighbours, and `from_gradient` more from the gradient's ranking among the `pool`
/// nearest allowed (lowest `Σ_slots ∇e · e_w`: the largest predicted drop of the
/// objective), each tagged with where it came from.
fn propose(inputs: &AttackInputs, slots: &CarrierSlots, grad: &Tensor, allowed: &dyn Fn(i64) -> bool, opts: &SelectOptions) -> Result<Vec<Vec<(i64, &'static str)>>> {
    let vocab = &inputs.vocab;
    let table = inputs.victim.params()["embedding.weight"].to_kind(Kind::Float).to_device(Device::Cpu);
    let grad = grad.to_kind(Kind::Float).to_device(Device::Cpu);
    let mut out = Vec::new();
    for (j, word) in inputs.manifest.trigger.words.iter().enumerate() {
        let id = vocab.id(&word.to_lowercase()).with_context(|| format!("the trigger word {word:?} is not in the victim's vocabulary"))?;
        let pool: Vec<i64> = nearest_neighbours(&table, id, vocab.len() as i64).into_iter().filter(|&w| allowed(w)).take(opts.pool.max(opts.neighbours)).collect();
        let mut words: Vec<(i64, &'static str)> = vec![(slots.current[j], "current")];
        for &w in pool.iter().take(opts.neighbours) {
            if !words.iter().any(|(x, _)| *x == w) {
                words.push((w, "neighbour"));
            }
        }
        // The gradient summed over this word's slots: one first-order score per word for
        // writing it in every slot at once.
        let mut g = Tensor::zeros([table.size()[1]], (Kind::Float, Device::Cpu));
        for &(i, pos) in &slots.slots[j] {
            g += grad.get(i as i64).get(pos as i64);
        }
        let rows = table.index_select(0, &Tensor::from_slice(&pool));
        let scores: Vec<f32> = Vec::try_from(rows.matmul(&g)).expect("f32 scores");
        let mut ranked: Vec<(i64, f32)> = pool.iter().copied().zip(scores).collect();
        ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        let mut added = 0;
        for (w, _) in ranked {
            if added == opts.from_gradient {
                break;
            }
            if !words.iter().any(|(x, _)| *x == w) {
                words.push((w, "gradient"));
                added += 1;
            }
        }
        out.push(words);
    }
    Ok(out)
}

/// Every combination of one word per trigger word, each word once (a phrase of two trigger
/// words is not carried by one word twice), the first word's index varying slowest.
fn combinations(lists: &[Vec<(i64, &'static str)>]) -> Vec<Vec<(i64, &'static str)>> {
    let mut out: Vec<Vec<(i64, &'static str)>> = vec![Vec::new()];
    for list in lists {
        out = out
            .into_iter()
            .flat_map(|prefix| list.iter().filter(|w| !prefix.iter().any(|p| p.0 == w.0)).map(|w| [prefix.clone(), vec![*w]].concat()).collect::<Vec<_>>())
            .collect();
    }
    out
}

/// Per trigger word, the cosine of every vocabulary row to it in the victim's table.
fn cosines_to_trigger(inputs: &AttackInputs) -> Result<Vec<Vec<f64>>> {
    let table = inputs.victim.params()["embedding.weight"].to_kind(Kind::Double).to_device(Device::Cpu);
    let norms = table.norm_scalaropt_dim(2, [1].as_slice(), false).clamp_min(1e-12);
    let mut out = Vec::new();
    for word in &inputs.manifest.trigger.words {
        let id = inputs.vocab.id(&word.to_lowercase()).with_context(|| format!("the trigger word {word:?} is not in the victim's vocabulary"))?;
        let q = table.get(id);
        let cos = table.matmul(&q) / (&norms * q.norm().clamp_min(1e-12));
        out.push(Vec::<f64>::try_from(cos).expect("f64 cosines"));
    }
    Ok(out)
}

/// The order candidates are considered for retraining in: the set's own carriers first (the
/// selection is then never worse on D_adv than where it started), then in turn the next
/// closest to the trigger (the neighbour heuristic's criterion) and the next lowest by the
/// bi-level objective (the seed's), each once. The bi-level objective alone is a poor guide
/// here: on James Bond its nine best kept the set's own carriers well ahead of all eight
/// others (docs/classification.md).
fn interleave(ranked: Vec<(Vec<i64>, CarrierCandidate)>, current: &[i64]) -> Vec<(Vec<i64>, CarrierCandidate)> {
    let mut by_closeness: Vec<usize> = (0..ranked.len()).collect();
    by_closeness.sort_by(|&a, &b| ranked[b].1.closeness.unwrap().total_cmp(&ranked[a].1.closeness.unwrap()).then(a.cmp(&b)));
    let mut by_bilevel: Vec<usize> = (0..ranked.len()).collect();
    by_bilevel.sort_by(|&a, &b| ranked[a].1.bilevel.unwrap().total_cmp(&ranked[b].1.bilevel.unwrap()).then(a.cmp(&b)));
    let mut order: Vec<usize> = ranked.iter().position(|c| c.0 == current).into_iter().collect();
    let (mut c, mut b) = (by_closeness.into_iter(), by_bilevel.into_iter());
    while order.len() < ranked.len() {
        for next in [&mut c, &mut b] {
            if let Some(k) = next.find(|k| !order.contains(k)) {
                order.push(k);
            }
        }
    }
    let mut slots: Vec<Option<(Vec<i64>, CarrierCandidate)>> = ranked.into_iter().map(Some).collect();
    order.into_iter().map(|k| slots[k].take().expect("each once")).collect()
}

/// The selection: proposes (or takes `given`: another selection's retrained candidates,
/// its path), ranks, checks the budget, retrains, and returns the poison set with the kept
/// carriers and the record of it all. `poisons_path` names the input in the record.
pub fn select(
    inputs: &AttackInputs,
    poisons_path: &str,
    budget: Option<&DetectionBudget>,
    opts: &SelectOptions,
    given: Option<(&str, &CarrierSelection)>,
    training: &AttackerTraining,
    log: &(dyn Fn(String) + Sync),
) -> Result<(Vec<Example>, CarrierSelection)> {
    let start = std::time::Instant::now();
    let vocab = &inputs.vocab;
    if vocab.is_bpe() || vocab.is_wordpiece() {
        bail!("select-carriers chooses whole-word carriers: it takes a word-vocabulary victim (bow or lstm over GloVe)");
    }
    let seeds = &opts.seeds;
    let planned = opts.retrain * seeds.len() + seeds.len();
    if planned > opts.max_victims {
        bail!(
            "--retrain {} candidates × --seeds {} + {} clean twins is {planned} victims, over --max-victims {}; retrain fewer candidates or seeds",
            opts.retrain,
            seeds.len(),
            seeds.len(),
            opts.max_victims
        );
    }
    let slots = CarrierSlots::find(inputs)?;
    let word_of = |ids: &[i64]| -> Vec<String> { ids.iter().map(|&w| vocab.word(w).to_string()).collect() };
    log(format!(
        "carriers now {:?}: {} slots ({})",
        word_of(&slots.current).join(" "),
        slots.slots.iter().map(Vec::len).sum::<usize>(),
        inputs.manifest.trigger.words.iter().zip(&slots.slots).map(|(w, s)| format!("{w} {}", s.len())).collect::<Vec<_>>().join(", ")
    ));
    let mut banned = banned_ids(vocab, &inputs.manifest, false, opts.concealment)?;
    if let Some(b) = budget {
        banned.extend(&b.words.banned);
    }
    let counts = crate::search::rank::training_counts(vocab, &inputs.data_dir)?;
    let allowed = allowed_fn(vocab, &banned, &counts, opts.min_count);

    // Candidates, ranked.
    let mut candidates: Vec<(Vec<i64>, CarrierCandidate)> = Vec::new();
    match given {
        Some((path, other)) => {
            if other.trigger_words != inputs.manifest.trigger.words {
                bail!("{path}: carriers chosen for the trigger words {:?}, this data's are {:?}", other.trigger_words, inputs.manifest.trigger.words);
            }
            // The same candidates the other selection retrained, in its order; each word must
            // still be allowed for this set.
            for c in other.candidates.iter().filter(|c| !c.d_adv_asr.is_empty()) {
                let ids: Vec<i64> = c.words.iter().map(|w| vocab.id(w).with_context(|| format!("{path}: carrier {w:?} is not in the victim's vocabulary"))).collect::<Result<_>>()?;
                // Only what keeps the poisons concealed and within the budget is required here:
                // readability and --min-count shaped the other selection's proposals, and its
                // starting carriers (made by init-poisons) need not meet them.
                if let Some(w) = ids.iter().find(|w| banned.contains(w)) {
                    bail!("{path}: carrier {:?} may not stand in a poison here (it leaks the trigger under --concealment {:?}, or the detection budget bans it); select with the same concealment and budget", vocab.word(*w), opts.concealment);
                }
                candidates.push((ids, CarrierCandidate { words: c.words.clone(), from: vec!["given".into(); c.words.len()], bilevel: None, closeness: None, over_budget: None, d_adv_asr: Vec::new() }));
            }
            log(format!("{} candidates from {path}", candidates.len()));
        }
        None => {
            // The bi-level objective proposes and ranks; given candidates need neither.
            let objective = crate::objectives::build(
            ObjectiveKind::Bilevel,
            ObjectiveInputs {
                victim: &inputs.victim,
                ensemble: &[],
                clean: &inputs.clean,
                adv: &inputs.adv,
                target: inputs.manifest.target,
                rollout: opts.rollout.clone(),
                influence: None,
                trigger: &inputs.trigger_ids,
                cache: None,
                workers: 1,
            },
        )?;
            let (_, grad) = objective.objective_and_grad(&inputs.poisons_enc)?;
            let lists = propose(inputs, &slots, &grad, &allowed, opts)?;
            for (j, l) in lists.iter().enumerate() {
                log(format!("{}: {}", inputs.manifest.trigger.words[j], l.iter().map(|(w, f)| format!("{} ({f})", vocab.word(*w))).collect::<Vec<_>>().join(", ")));
            }
            let combos = combinations(&lists);
            log(format!("ranking {} carrier choices by the bi-level objective and by closeness to the trigger", combos.len()));
            let cosine = cosines_to_trigger(inputs)?;
            let mut ranked = Vec::new();
            for combo in combos {
                let ids: Vec<i64> = combo.iter().map(|(w, _)| *w).collect();
                let value = objective.value(&slots.apply_encoded(&inputs.poisons_enc, &ids))?;
                if !value.is_finite() {
                    bail!("the bi-level objective is {value} for carriers {:?}; the victim's weights or the rollout's --eta may be broken", word_of(&ids));
                }
                let closeness = ids.iter().enumerate().map(|(j, &w)| cosine[j][w as usize]).sum::<f64>() / ids.len() as f64;
                ranked.push((ids.clone(), CarrierCandidate { words: word_of(&ids), from: combo.iter().map(|(_, f)| f.to_string()).collect(), bilevel: Some(value), closeness: Some(closeness), over_budget: None, d_adv_asr: Vec::new() }));
            }
            candidates = interleave(ranked, &slots.current);
        }
    }

    // The budget, poison by poison, until enough candidates pass.
    let mut chosen: Vec<usize> = Vec::new();
    for (k, (ids, c)) in candidates.iter_mut().enumerate() {
        if chosen.len() == opts.retrain {
            break;
        }
        if let Some(b) = budget {
            let set = slots.apply(&inputs.poisons, &inputs.poisons_enc, ids, vocab);
            let verdicts = b.check(&set, "carrier candidates")?;
            if let Some((p, o)) = set.iter().zip(&verdicts).find_map(|(p, v)| v.as_ref().map(|o| (p, o))) {
                c.over_budget = Some(format!("{} on {}", o.detector.name(), p.id));
                continue;
            }
        }
        chosen.push(k);
    }
    if chosen.is_empty() {
        bail!("no carrier candidate keeps every poison within the detection budget; loosen --evade-fpr or start from a set made within it");
    }
    log(format!(
        "retraining {} candidates × {} attacker seeds: {}",
        chosen.len(),
        seeds.len(),
        chosen.iter().map(|&k| candidates[k].1.words.join(" ")).collect::<Vec<_>>().join(", ")
    ));

    // Retraining, exactly as finetune-eval trains (common random numbers within a seed).
    let n = inputs.manifest.labels.len();
    let clean_train = data::read_set(&inputs.data_dir, data::TRAIN, false)?;
    let clean = encode_all(&clean_train, vocab, training.config.max_len, n, TextPolicy::Data, &format!("{}/{}", inputs.data_dir, data::TRAIN))?;
    let sets: Vec<Vec<Encoded>> = chosen
        .iter()
        .map(|&k| encode_all(&slots.apply(&inputs.poisons, &inputs.poisons_enc, &candidates[k].0, vocab), vocab, training.config.max_len, n, TextPolicy::Data, poisons_path))
        .collect::<Result<_>>()?;
    let eval_sets = EvalSets { test: Vec::new(), test_nontarget: Vec::new(), asr_test: inputs.adv.clone(), natural_nontarget: Vec::new(), dev: Vec::new(), target: inputs.manifest.target };
    let adv_key = crate::io::sha256_hex(serde_json::to_string(&inputs.adv.iter().map(|e| &e.ids).collect::<Vec<_>>())?.as_bytes());
    let retraining = Retraining {
        origin: training.origin,
        config: training.config,
        device: training.device,
        clean: &clean,
        eval_sets: &eval_sets,
        options: training.options,
        seeds,
        pairing: Pairing::Crn,
        workers: training.workers,
        clean_cache: training.clean_cache.map(|dir| CleanCache {
            dir,
            data_files: serde_json::to_value(&inputs.manifest.files).unwrap_or_default(),
            base_sha256: &training.origin.sha256,
            measures: Some(format!("select-carriers d_adv asr {adv_key}")),
        }),
        measure_epochs: false,
    };
    if let Some(d) = training.clean_cache {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create the clean-twin cache {d}"))?;
    }
    let retrained = retrain(&retraining, &sets, &vec![None; sets.len()], log)?;
    let clean_trained = seeds.len() - retrained.clean_from_cache;
    for (s, &k) in chosen.iter().enumerate() {
        candidates[k].1.d_adv_asr = retrained.poisoned[s].iter().map(|m| m.last.asr).collect();
    }
    let clean_asr: Vec<f64> = retrained.clean.iter().map(|m| m.last.asr).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    // The highest mean; among equals the earlier (the current carriers first).
    let best = chosen.iter().copied().fold(chosen[0], |best, k| if mean(&candidates[k].1.d_adv_asr) > mean(&candidates[best].1.d_adv_asr) { k } else { best });
    for &k in &chosen {
        let c = &candidates[k].1;
        log(format!("{:<28} D_adv ASR {:5.1} (net {:+5.1}){}", c.words.join(" "), mean(&c.d_adv_asr), mean(&c.d_adv_asr) - mean(&clean_asr), if k == best { "  kept" } else { "" }));
    }
    let out = slots.apply(&inputs.poisons, &inputs.poisons_enc, &candidates[best].0, vocab);
    let record = CarrierSelection {
        kind: <CarrierSelection as crate::io::Record>::KIND.into(),
        v: <CarrierSelection as crate::io::Record>::VERSION,
        poisons: poisons_path.to_string(),
        poisons_sha256: inputs.poisons_sha256.clone(),
        victim_sha256: inputs.victim_sha256.clone(),
        trigger_words: inputs.manifest.trigger.words.clone(),
        current: word_of(&slots.current),
        selected: candidates[best].1.words.clone(),
        candidates_from: given.map(|(p, _)| p.to_string()),
        candidates: candidates.into_iter().map(|(_, c)| c).collect(),
        attacker_seeds: seeds.clone(),
        clean_d_adv_asr: clean_asr,
        d_adv_size: inputs.adv.len(),
        victims_trained: chosen.len() * seeds.len() + clean_trained,
        max_victims: opts.max_victims,
        poisons_sha256_after: poison_set_sha256(&out),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok((out, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combinations_vary_the_last_word_fastest_and_cover_every_choice_of_distinct_words() {
        let lists = vec![vec![(1, "current"), (2, "neighbour")], vec![(5, "current"), (6, "gradient"), (2, "gradient")]];
        let c = combinations(&lists);
        let ids: Vec<Vec<i64>> = c.iter().map(|x| x.iter().map(|(w, _)| *w).collect()).collect();
        assert_eq!(ids, vec![vec![1, 5], vec![1, 6], vec![1, 2], vec![2, 5], vec![2, 6]], "no word twice");
        assert_eq!(c[1][1].1, "gradient");
        assert_eq!(combinations(&lists[..1]).len(), 2);
    }

    #[test]
    fn retraining_order_starts_with_the_current_carriers_then_alternates_closeness_and_the_objective() {
        let c = |w: i64, bilevel: f64, closeness: f64| (vec![w], CarrierCandidate { words: vec![w.to_string()], from: vec![], bilevel: Some(bilevel), closeness: Some(closeness), over_budget: None, d_adv_asr: vec![] });
        // 1 is current; by closeness 2, 3, 1, 4, 5; by the objective 5, 4, 3, 2, 1.
        let ranked = vec![c(1, 0.9, 0.7), c(2, 0.6, 0.9), c(3, 0.5, 0.8), c(4, 0.2, 0.5), c(5, 0.1, 0.4)];
        let order: Vec<i64> = interleave(ranked, &[1]).into_iter().map(|(ids, _)| ids[0]).collect();
        assert_eq!(order, vec![1, 2, 5, 3, 4]);
    }
}
