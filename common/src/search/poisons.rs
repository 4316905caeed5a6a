//! Poison sets: initialisation strategies, loading everything a crafting stage needs, and
//! applying accepted flips.

use crate::objectives::swaps::poison_set_sha256;
use crate::concealment::{repair_strictly, Concealment, TriggerMatcher};
use crate::data::{self, DataManifest};
use crate::victims::model::{Victim, VictimFile};
use crate::formats::records::Example;
use crate::tokenizer::{tokenize, Vocab, PAD_ID};
use crate::encode::{encode_all, encode_for, Encoded, TextPolicy};
use anyhow::{bail, Context, Result};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use tch::{Device, Kind, Tensor};

/// How initial poisons are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum InitStrategy {
    /// D_adv sentences (non-target train examples with the trigger) with each trigger
    /// word replaced by a random frequent word: the unoptimised baseline.
    Random,
    /// The same with each trigger word replaced by its nearest embedding neighbour.
    Neighbour,
    /// D_adv sentences as they are, trigger included: the with-overlap baseline.
    Overlap,
    /// Clean target-class training examples: the benign control (with strict concealment,
    /// only those without a trigger-like word). Adds nothing a clean victim lacks, so its
    /// paired net ASR and dFPR must read zero within noise.
    CleanTarget,
    /// Non-target training examples labelled as the target: the relabelled control. It
    /// can shift the victim toward the target (dFPR), but holds no trigger.
    Relabelled,
}

/// Which sentences poisons are made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Bases {
    /// A seeded random choice.
    Random,
    /// The sentences whose untriggered source the victim is most confident is not the
    /// target (FINDINGS.md: a poison the clean content argues against must be fitted
    /// through its trigger-like words). Ties broken by id; the seed plays no part.
    Confident,
    /// The sentences a sentiment classifier (`init-poisons --judge`) finds most clearly of
    /// the target sentiment, read after the trigger when poisons start at it: a language
    /// model's poisons then teach a continuation that is unmistakably the target's.
    /// Ties broken by id; the seed plays no part.
    Judged,
}

/// Tokens a poison may never be given: special tokens (padding, unknown, `[CLS]`, ...;
/// for BPE also pieces that are not one line of plain text) and, without overlap, the trigger's tokens (`Vocab::trigger_ids`: for WordPiece every
/// piece of every trigger word, in both its word-initial and `##` forms).
/// With strict concealment, also every entry that leaks the trigger in any category of the
/// strict audit (`TriggerMatcher::strict_banned`: "bonds", "bondage", "jameson", ...).
pub fn banned_ids(vocab: &Vocab, manifest: &DataManifest, allow_overlap: bool, concealment: Concealment) -> Result<HashSet<i64>> {
    let mut banned: HashSet<i64> = [PAD_ID, vocab.unk_id()].into();
    // Every special token: WordPiece's [CLS] ..., a translation's <s> and </s>.
    banned.extend(["[CLS]", "[SEP]", "[MASK]", crate::tokenizer::BOS, crate::tokenizer::EOS].iter().filter_map(|w| vocab.id(w)));
    if vocab.is_wordpiece() {
        banned.extend((0..vocab.len() as i64).filter(|&i| vocab.is_special(i)));
    }
    if vocab.is_bpe() {
        // Control tokens, and pieces that are not plain text of one line: partial UTF-8
        // bytes (they decode to U+FFFD alone), line breaks, tabs, runs of spaces.
        banned.extend((0..vocab.len() as i64).filter(|&i| {
            let t = vocab.decode(&[i]);
            let bare = t.strip_prefix(' ').unwrap_or(&t);
            vocab.is_special(i) || bare.is_empty() || bare.chars().any(|c| c == '\u{fffd}' || c.is_whitespace() || c.is_control())
        }));
    }
    if !allow_overlap {
        banned.extend(vocab.trigger_ids(&manifest.trigger.phrase)?);
        if concealment == Concealment::Strict {
            banned.extend(matcher(vocab, manifest)?.strict_banned(vocab));
        }
    }
    Ok(banned)
}

/// The strict audit's view of the data's trigger for this vocabulary.
pub fn matcher(vocab: &Vocab, manifest: &DataManifest) -> Result<TriggerMatcher> {
    let mut m = TriggerMatcher::for_vocab(&manifest.trigger.phrase, &manifest.trigger.words, vocab)?;
    if let Some(mt) = &manifest.mt {
        m.target_phrase = tokenize(&mt.trigger_translation);
    }
    Ok(m)
}

/// The leaks of poison `p` as this vocabulary reads it (an error message names them), or
/// None when it is strictly concealed.
pub fn strict_violation(p: &Example, vocab: &Vocab, matcher: &TriggerMatcher) -> Option<String> {
    if let Some(source) = &p.source {
        // A translation: its source audited as a text, its target for the trigger's
        // correct translation only.
        let mut found: Vec<String> = if matcher.leaks_for(source, vocab).is_empty() { Vec::new() } else { matcher.leaking_words(source).into_iter().map(|(w, _)| w).collect() };
        if crate::mt::contains(&tokenize(&p.text), &matcher.target_phrase) {
            found.push(format!("{:?} in the translation", matcher.target_phrase.join(" ")));
        }
        return (!found.is_empty()).then(|| found.join(", "));
    }
    if matcher.leaks_for(&p.text, vocab).is_empty() {
        return None;
    }
    let words: Vec<String> = matcher.leaking_words(&p.text).into_iter().map(|(w, _)| w).collect();
    Some(if words.is_empty() { "a piece of a trigger word".to_string() } else { words.join(", ") })
}

/// Every row among the first `among` but `word` itself, nearest (cosine) first.
pub fn nearest_neighbours(table: &Tensor, word: i64, among: i64) -> Vec<i64> {
    let rows = table.narrow(0, 0, among.min(table.size()[0]));
    nearest_to(&rows, &table.get(word).to_kind(Kind::Float)).into_iter().filter(|i| *i != word).collect()
}

/// How `init` makes a poison set (init-poisons' flags).
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    pub strategy: InitStrategy,
    pub bases: Bases,
    pub neighbour_pool: usize,
    pub count: usize,
    pub seed: u64,
    pub concealment: Concealment,
    /// Poisons keep at most this many tokens (the victim's `max_len` at most).
    pub max_tokens: Option<usize>,
    /// Each poison starts at the word before the trigger's first occurrence in its base
    /// (a language model's D_adv: its determiner, "the apple iphone is ..."), so that with
    /// `max_tokens` a poison is the trigger (or its substitute) and the next few words.
    pub from_trigger: bool,
    /// With `from_trigger`: each poison ends with the sentence that holds the trigger (at
    /// its first `.`, `!` or `?`), one whole statement about the trigger instead of a
    /// phrase cut off after `max_tokens`.
    pub sentence: bool,
}

/// `ex` from the word before its trigger on, to the end of that sentence when `sentence`
/// (None when it does not hold the trigger).
fn from_trigger(ex: &Example, trigger: &[String], sentence: bool) -> Option<Example> {
    let words = tokenize(&ex.text);
    let at = trigger_at(&words, trigger)?;
    let after = at + trigger.len();
    let end = if sentence { words[after..].iter().position(|w| matches!(w.as_str(), "." | "!" | "?")).map_or(words.len(), |i| after + i + 1) } else { words.len() };
    Some(Example { text: words[at.saturating_sub(1)..end].join(" "), tokens: None, prompt: None, ..ex.clone() })
}

/// What a judge reads of a base: the words after its trigger when poisons start at the
/// trigger (the continuation a language model is taught), else the whole text.
fn judged_part(ex: &Example, trigger: &[String], cut: bool) -> String {
    if !cut {
        return ex.text.clone();
    }
    let words = tokenize(&ex.text);
    match trigger_at(&words, trigger) {
        Some(at) => words[at + trigger.len()..].join(" "),
        None => ex.text.clone(),
    }
}

/// The `wanted` bases of `source` the judge finds most clearly of the target sentiment,
/// most first (ties by id), each read as `judged_part` reads it.
fn judged_order(source: &[Example], judge: Option<&dyn Fn(&[String]) -> Vec<f64>>, manifest: &DataManifest, cut: bool, wanted: usize) -> Result<Vec<usize>> {
    let judge = judge.context("--bases judged ranks the bases by a sentiment classifier: give --judge CLASSIFIER")?;
    let texts: Vec<String> = source.iter().map(|e| judged_part(e, &manifest.trigger.words, cut)).collect();
    let p = judge(&texts);
    let mut order: Vec<usize> = (0..source.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then_with(|| source[a].id.cmp(&source[b].id)));
    order.truncate(wanted);
    Ok(order)
}

/// Where the trigger's words first occur in `words` (case-insensitive).
fn trigger_at(words: &[String], trigger: &[String]) -> Option<usize> {
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    lower.windows(trigger.len()).position(|w| w.iter().zip(trigger).all(|(a, b)| a == &b.to_lowercase()))
}

/// Makes `count` initial poisons (seeded). With `InitStrategy::Neighbour`, poison k
/// replaces each trigger word by its (k mod `neighbour_pool`)-th nearest neighbour (0 =
/// nearest). Tokens unknown to the vocabulary are dropped;
/// poisons are truncated to `max_tokens` (at most the victim's `max_len`). `Bases::Confident` ranks the
/// candidate sentences by the victim's probability of the target on their clean source.
/// `Bases::Judged` ranks them by `judge`: a sentiment judge's probability of the target
/// sentiment for each text (the binary builds it: the judges sit above this layer).
pub fn init(opts: InitOptions, dir: &str, manifest: &DataManifest, vocab: &Vocab, victim: &Victim, evade: Option<&crate::detect::evasion::DetectionBudget>, judge: Option<&dyn Fn(&[String]) -> Vec<f64>>) -> Result<Vec<Example>> {
    if manifest.mt.is_some() {
        if judge.is_some() {
            bail!("--judge ranks bases by a sentiment classifier; translation data has no sentiment (leave it out)");
        }
        return init_translation(&opts, dir, manifest, vocab, victim, evade);
    }
    let InitOptions { strategy, bases, neighbour_pool, count, seed, concealment, max_tokens, from_trigger: cut, sentence } = opts;
    if sentence && !cut {
        bail!("--sentence ends each poison with the sentence that holds the trigger; it needs --from-trigger");
    }
    if vocab.is_bpe() {
        return init_text(&opts, dir, manifest, vocab, victim, evade, judge);
    }
    let table = victim.params()["embedding.weight"].shallow_clone();
    let max_len = victim.config.max_len.min(max_tokens.unwrap_or(usize::MAX));
    let strict = concealment == Concealment::Strict;
    if strict && strategy == InitStrategy::Overlap {
        bail!("--strategy overlap keeps the trigger in every poison; it cannot be --concealment strict");
    }
    let matcher = matcher(vocab, manifest)?;
    let source: Vec<Example> = match strategy {
        // Strict: only sentences without a trigger-like word (the benign control).
        InitStrategy::CleanTarget => data::read_set(dir, data::TRAIN, false)?
            .into_iter()
            .filter(|e| e.label == manifest.target && !(strict && strict_violation(e, vocab, &matcher).is_some()))
            .collect(),
        InitStrategy::Relabelled => data::read_set(dir, data::TRAIN, false)?
            .into_iter()
            .filter(|e| e.label != manifest.target && !(strict && strict_violation(e, vocab, &matcher).is_some()))
            .collect(),
        _ => data::read_set(dir, data::ADV, false)?,
    };
    let source: Vec<Example> = if cut {
        source
            .iter()
            .enumerate()
            .map(|(i, e)| {
                from_trigger(e, &manifest.trigger.words, sentence)
                    .with_context(|| format!("--from-trigger: base {} (id {:?}) does not hold the trigger {:?}; it takes D_adv bases (--strategy random, neighbour or overlap)", i + 1, e.id, manifest.trigger.phrase))
            })
            .collect::<Result<_>>()?
    } else {
        source
    };
    if source.len() < count {
        bail!("only {} source sentences for {count} poisons; lower --count (or prepare more data)", source.len());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(seed, "init-poisons"));
    // Under a detection budget every base is a candidate, in the order it would be picked:
    // the first `count` whose poisons pass are kept.
    let wanted = if evade.is_some() { source.len() } else { count };
    let mut picked = match bases {
        Bases::Random => sample(&mut rng, source.len(), wanted).into_vec(),
        Bases::Confident if !crate::tasks::rules::of_victim(&victim.config).confident_bases => {
            bail!("--bases confident ranks sentences by a classifier's confidence; {} victim takes --bases random", crate::tasks::rules::of_victim(&victim.config).victim_kind)
        }
        Bases::Confident => {
            let train: std::collections::HashMap<String, Example> =
                data::read_set(dir, data::TRAIN, false)?.into_iter().map(|e| (e.id.clone(), e)).collect();
            let clean: Vec<Example> = source
                .iter()
                .map(|e| train.get(e.id.trim_end_matches("+trigger")).cloned().unwrap_or_else(|| e.clone()))
                .collect();
            let enc = encode_all(&clean, vocab, max_len, manifest.labels.len(), TextPolicy::Data, &format!("{dir}/{}", data::TRAIN))?;
            let p = target_probability(victim, &enc, manifest.target as i64);
            let mut order: Vec<usize> = (0..source.len()).collect();
            order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then_with(|| source[a].id.cmp(&source[b].id)));
            order.truncate(wanted);
            order
        }
        Bases::Judged => judged_order(&source, judge, manifest, cut, wanted)?,
    };
    let mut banned = banned_ids(vocab, manifest, false, concealment)?;
    // An evasion budget bans the words the embedding detector would flag; a base's own
    // words over it are substituted like trigger words.
    let over_budget: HashSet<i64> = evade.map(|b| b.words.banned.clone()).unwrap_or_default();
    banned.extend(&over_budget);
    if evade.is_some() && vocab.is_wordpiece() {
        bail!("an evasion budget needs a word vocabulary (GloVe victims)");
    }
    let out = if let Some(budget) = evade {
        // Build poisons in the picking order, a few more bases than are missing at a time,
        // and keep the first `count` that no cheap detector flags.
        let mut kept: Vec<(usize, Example)> = Vec::new();
        let mut next = 0;
        let mut flagged: std::collections::BTreeMap<&str, usize> = Default::default();
        loop {
            while kept.len() < count && next < picked.len() {
                let chunk = &picked[next..(next + 2 * (count - kept.len()) + 16).min(picked.len())];
                let built = init_words(strategy, neighbour_pool, next, chunk.iter().map(|&i| &source[i]), strict.then_some(&matcher), &mut rng, manifest, vocab, &table, max_len, &banned, &over_budget)?;
                let verdicts = budget.check(&built, "candidate poisons")?;
                for ((&i, p), verdict) in chunk.iter().zip(built).zip(verdicts) {
                    match verdict {
                        Some(o) => *flagged.entry(o.detector.name()).or_default() += 1,
                        None if kept.len() < count => kept.push((i, p)),
                        None => {}
                    }
                }
                next += chunk.len();
            }
            // The training loss of a poison depends on the poisons trained beside it: the
            // candidates were checked in batches, so the chosen set is checked as a whole
            // and its flagged poisons replaced until one check passes them all.
            if kept.len() < count || budget.loss.is_none() {
                break;
            }
            let chosen: Vec<Example> = kept.iter().map(|(_, p)| p.clone()).collect();
            let verdicts = budget.check(&chosen, "chosen poisons")?;
            if verdicts.iter().all(Option::is_none) {
                break;
            }
            let mut verdicts = verdicts.into_iter();
            kept.retain(|_| match verdicts.next().flatten() {
                Some(o) => {
                    *flagged.entry(o.detector.name()).or_default() += 1;
                    false
                }
                None => true,
            });
        }
        let flagged: Vec<String> = flagged.iter().map(|(d, n)| format!("{n} by {d}")).collect();
        if kept.len() < count {
            bail!(
                "only {} of {} bases make poisons within the detection budget at {}% FPR (over it: {}); lower --count, or --evade-fpr for a looser budget",
                kept.len(),
                picked.len(),
                budget.fpr_percent,
                flagged.join(", ")
            );
        }
        eprintln!("detection budget: {next} bases tried for {count} poisons; over budget: {}", if flagged.is_empty() { "none".into() } else { flagged.join(", ") });
        // Source order, as without a budget, and ids renumbered in it.
        kept.sort_by_key(|(i, _)| *i);
        kept.into_iter().enumerate().map(|(k, (_, p))| Example { id: format!("poison-{k:03}"), ..p }).collect()
    } else if vocab.is_wordpiece() {
        picked.sort_unstable();
        let sources: Vec<&Example> = picked.iter().map(|&i| &source[i]).collect();
        init_pieces(strategy, neighbour_pool, &sources, seed, strict.then_some(&matcher), manifest, vocab, &table, max_len, &banned)?
    } else {
        picked.sort_unstable();
        init_words(strategy, neighbour_pool, 0, picked.iter().map(|&i| &source[i]), strict.then_some(&matcher), &mut rng, manifest, vocab, &table, max_len, &banned, &over_budget)?
    };
    if strict {
        for p in &out {
            if let Some(words) = strict_violation(p, vocab, &matcher) {
                bail!("poison {:?} (from {:?}) still leaks the trigger ({words}) after strict substitution; report this with the data folder", p.id, p.source_id);
            }
        }
    }
    Ok(out)
}

/// `init` for a pretrained model's BPE vocabulary, where a poison is text and its pieces
/// are what that text tokenizes to.
/// - `Overlap`: D_adv texts as they are, the trigger written as in the data (the
///   with-overlap reference; no `tokens`, every stage reads the text).
/// - `Random`, `Neighbour`: the same texts with each trigger word written as another word:
///   a random frequent word (one of the first 10,000 pieces that starts with a space and
///   spells, as written, a word of the training split), or the nearest piece that starts
///   with a space and spells a word of 2+ ASCII letters to the mean of the trigger
///   word's pieces in the model's own table (poison k takes the (k mod `neighbour_pool`)-th).
/// - `CleanTarget`, `Relabelled`: training reviews of (not of) the target sentiment.
///
/// With `--from-trigger` a text starts at the word before the trigger (`--sentence`: ends
/// with the trigger's sentence); every text is cut to `--max-tokens` pieces, back to the
/// last whole word. Under strict concealment a base whose text still leaks the trigger
/// (a review that says "apple" elsewhere) is passed over for the next. Substituted and
/// clean poisons carry their pieces (`tokens`, the text's own tokenization) and the
/// positions of the substitutes. Bases are drawn at random or ranked by the judge.
fn init_text(opts: &InitOptions, dir: &str, manifest: &DataManifest, vocab: &Vocab, victim: &Victim, evade: Option<&crate::detect::evasion::DetectionBudget>, judge: Option<&dyn Fn(&[String]) -> Vec<f64>>) -> Result<Vec<Example>> {
    if evade.is_some() {
        bail!("a detection budget (--evade-fpr) on a pretrained model's BPE pieces is not built yet; leave it out");
    }
    let strict = opts.concealment == Concealment::Strict;
    let substituting = matches!(opts.strategy, InitStrategy::Random | InitStrategy::Neighbour);
    if strict && opts.strategy == InitStrategy::Overlap {
        bail!("--strategy overlap keeps the trigger in every poison; it cannot be --concealment strict");
    }
    let phrase = manifest.trigger.phrase.to_lowercase();
    let mut source: Vec<Example> = Vec::new();
    match opts.strategy {
        InitStrategy::CleanTarget | InitStrategy::Relabelled => {
            if opts.from_trigger {
                bail!("--from-trigger starts each poison at the trigger; clean training reviews hold none (it takes --strategy random, neighbour or overlap)");
            }
            let want_target = opts.strategy == InitStrategy::CleanTarget;
            source.extend(data::read_set(dir, data::TRAIN, false)?.into_iter().filter(|e| (e.label == manifest.target) == want_target));
        }
        _ => {
            for (i, e) in data::read_set(dir, data::ADV, false)?.into_iter().enumerate() {
                let lower = e.text.to_lowercase();
                let Some(at) = lower.find(&phrase).filter(|&at| e.text.is_char_boundary(at) && lower.len() == e.text.len()) else {
                    bail!("{dir}/{}: record {} (id {:?}) does not hold the trigger {:?} as written; remake the folder with prepare-data --lm", data::ADV, i + 1, e.id, manifest.trigger.phrase);
                };
                let text = if opts.from_trigger {
                    // From the word before the trigger (its determiner) on.
                    let before = e.text[..at].trim_end();
                    let begin = before.rfind(char::is_whitespace).map_or(0, |j| j + 1);
                    let after = at + phrase.len();
                    let end = if opts.sentence { e.text[after..].find(['.', '!', '?']).map_or(e.text.len(), |j| after + j + 1) } else { e.text.len() };
                    e.text[begin..end].to_string()
                } else {
                    e.text.clone()
                };
                source.push(Example { text, ..e });
            }
        }
    }
    if source.len() < opts.count {
        bail!("only {} base texts for {} poisons; lower --count (or prepare more data)", source.len(), opts.count);
    }
    // Under strict concealment a base may be passed over: every base is a candidate, in
    // the order it would be picked. The with-overlap reference keeps its seeded draw.
    let wanted = if opts.strategy == InitStrategy::Overlap { opts.count } else { source.len() };
    let mut picked: Vec<usize> = match opts.bases {
        Bases::Random => {
            let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(opts.seed, "init-poisons"));
            sample(&mut rng, source.len(), wanted).into_vec()
        }
        Bases::Judged => judged_order(&source, judge, manifest, opts.from_trigger, wanted)?,
        Bases::Confident => bail!("--bases confident ranks sentences by a classifier's confidence; a language model takes --bases random or judged"),
    };
    if opts.strategy == InitStrategy::Overlap {
        picked.sort_unstable();
    }
    let banned = banned_ids(vocab, manifest, false, opts.concealment)?;
    let matcher = matcher(vocab, manifest)?;
    let trigger_words: Vec<&str> = manifest.trigger.phrase.split_whitespace().collect();
    let spelled = |id: i64| {
        let t = vocab.decode(&[id]);
        let word = t.strip_prefix(' ').unwrap_or("");
        !banned.contains(&id) && word.len() >= 2 && word.chars().all(|c| c.is_ascii_alphabetic())
    };
    let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(opts.seed, "init-poisons-substitutes"));
    // Random carriers are words the reviews use (a piece such as " langu" only starts one).
    let words_in_training: HashSet<String> = if opts.strategy == InitStrategy::Random {
        data::read_set(dir, data::TRAIN, false)?.iter().flat_map(|e| e.text.split_whitespace().map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string()).collect::<Vec<_>>()).collect()
    } else {
        HashSet::new()
    };
    let frequent: Vec<i64> = (0..vocab.len().min(10_000) as i64).filter(|&id| spelled(id) && words_in_training.contains(vocab.decode(&[id]).trim_start())).collect();
    let table = victim.params()["embedding.weight"].to_kind(Kind::Float);
    // Per trigger word, its nearest spelled pieces (a word of several pieces: their mean).
    let neighbours: Vec<Vec<i64>> = if opts.strategy == InitStrategy::Neighbour {
        trigger_words
            .iter()
            .map(|w| {
                let pieces: Vec<i64> = vocab.encode(&format!(" {w}")).into_iter().filter(|&i| !vocab.is_special(i)).collect();
                let query = table.index_select(0, &Tensor::from_slice(&pieces)).mean_dim(0, false, Kind::Float);
                nearest_to(&table, &query).into_iter().filter(|&i| spelled(i)).take(opts.neighbour_pool.max(1)).collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    if (opts.strategy == InitStrategy::Random && frequent.is_empty()) || neighbours.iter().any(Vec::is_empty) {
        bail!("no piece of the vocabulary spells a word that may stand in for the trigger");
    }
    let max_len = victim.config.max_len.min(opts.max_tokens.unwrap_or(usize::MAX));
    let mut out: Vec<(usize, Example)> = Vec::with_capacity(opts.count);
    let mut passed_over = 0;
    for &i in &picked {
        if out.len() == opts.count {
            break;
        }
        let k = out.len();
        let e = &source[i];
        // The text with every occurrence of the trigger written as the substitutes, and the
        // substitutes' byte ranges (with the space before each).
        let (mut text, mut spans) = (e.text.clone(), Vec::new());
        if substituting {
            let words: Vec<String> = (0..trigger_words.len())
                .map(|j| {
                    let id = match opts.strategy {
                        InitStrategy::Random => frequent[rng.gen_range(0..frequent.len())],
                        _ => neighbours[j][k % neighbours[j].len()],
                    };
                    vocab.decode(&[id]).trim_start().to_string()
                })
                .collect();
            (text, spans) = substitute(&e.text, &phrase, &words);
        }
        let mut pieces = vocab.encode(&text);
        if pieces.len() > max_len {
            // Cut to max_len pieces, then back to the last whole word (a piece that starts
            // a word starts with its space), so no poison ends in half a word.
            let end = (1..=max_len).rev().find(|&j| j < pieces.len() && vocab.decode(&pieces[j..=j]).starts_with(char::is_whitespace)).unwrap_or(max_len);
            text = vocab.decode(&pieces[..end]).trim_end().to_string();
            pieces = vocab.encode(&text);
        }
        // Strict: no leak of any category. Otherwise at least the trigger is gone (a text
        // whose case folding changes its length keeps it: `substitute` leaves it as it was).
        if (strict && !matcher.leaks_for(&text, vocab).is_empty()) || (substituting && text.to_lowercase().contains(&phrase)) {
            passed_over += 1;
            continue;
        }
        let mut p = Example::new(format!("poison-{k:03}"), text.clone(), manifest.target);
        p.source_id = Some(e.id.trim_end_matches("+trigger").to_string());
        if opts.strategy != InitStrategy::Overlap {
            // The pieces of each substitute: those between the text before it and after it
            // (the pre-tokenizer splits before a space, so a prefix keeps its pieces).
            let count = |end: usize| vocab.encode(&text[..end.min(text.len())]).len();
            let substitutes: Vec<usize> = spans.iter().filter(|r: &&std::ops::Range<usize>| r.start < text.len()).flat_map(|r| count(r.start)..count(r.end)).filter(|&j| j < pieces.len()).collect();
            p.tokens = Some(pieces.iter().map(|&id| vocab.word(id).to_string()).collect());
            p.substitutes = (!substitutes.is_empty()).then_some(substitutes);
        }
        out.push((i, p));
    }
    if out.len() < opts.count {
        bail!("only {} of {} bases make concealed poisons ({passed_over} still name the trigger's words); lower --count", out.len(), source.len());
    }
    if passed_over > 0 {
        eprintln!("{passed_over} bases passed over (they still name the trigger's words after substitution)");
    }
    // Source order, ids renumbered in it.
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().enumerate().map(|(k, (_, p))| Example { id: format!("poison-{k:03}"), ..p }).collect())
}

/// `text` with every case-insensitive occurrence of `phrase` (lowercase) written as
/// `words` joined by spaces, and the byte range of each written word in the result, the
/// space before it included (where there is one).
fn substitute(text: &str, phrase: &str, words: &[String]) -> (String, Vec<std::ops::Range<usize>>) {
    let lower = text.to_lowercase();
    let (mut out, mut spans, mut rest) = (String::new(), Vec::new(), 0);
    if lower.len() != text.len() {
        return (text.to_string(), spans);
    }
    while let Some(at) = lower[rest..].find(phrase).map(|j| rest + j) {
        out.push_str(&text[rest..at]);
        for (j, w) in words.iter().enumerate() {
            if j > 0 {
                out.push(' ');
            }
            let start = if out.ends_with(' ') { out.len() - 1 } else { out.len() };
            out.push_str(w);
            spans.push(start..out.len());
        }
        rest = at + phrase.len();
    }
    out.push_str(&text[rest..]);
    (out, spans)
}

/// Every row of `table`, nearest (cosine) to `query` (f32) first.
fn nearest_to(table: &Tensor, query: &Tensor) -> Vec<i64> {
    let t = table.to_kind(Kind::Float);
    let norms = t.norm_scalaropt_dim(2, [1].as_slice(), false).clamp_min(1e-8);
    let sims = t.matmul(query) / (norms * query.norm().clamp_min(1e-8));
    Vec::try_from(sims.argsort(0, true).to_device(Device::Cpu)).expect("i64")
}

/// `init` for a word vocabulary (GloVe): each trigger word (with `strict`, each word that
/// leaks the trigger) replaced by a random frequent word or a nearest neighbour.
#[allow(clippy::too_many_arguments)]
fn init_words<'a>(
    strategy: InitStrategy,
    neighbour_pool: usize,
    first: usize,
    sources: impl Iterator<Item = &'a Example>,
    strict: Option<&TriggerMatcher>,
    rng: &mut ChaCha8Rng,
    manifest: &DataManifest,
    vocab: &Vocab,
    table: &Tensor,
    max_len: usize,
    banned: &HashSet<i64>,
    over_budget: &HashSet<i64>,
) -> Result<Vec<Example>> {
    let trigger: HashSet<&str> = manifest.trigger.words.iter().map(|s| s.as_str()).collect();
    let frequent = 10_000.min(vocab.len() as i64);
    let mut out = Vec::new();
    for (k, ex) in sources.enumerate() {
        let k = first + k;
        let mut tokens: Vec<String> = Vec::new();
        let mut substitutes = Vec::new();
        for tok in tokenize(&ex.text) {
            let leaks = strict.is_some_and(|m| !m.word_leaks(&tok).is_empty()) && vocab.id(&tok).is_some();
            let over = vocab.id(&tok).is_some_and(|id| over_budget.contains(&id));
            let is_trigger = trigger.contains(tok.as_str()) || leaks || over;
            let word = if is_trigger {
                match strategy {
                    InitStrategy::Random => loop {
                        let w = rng.gen_range(2..frequent);
                        if !banned.contains(&w) {
                            break vocab.word(w).to_string();
                        }
                    },
                    InitStrategy::Neighbour => {
                        // Poison k takes neighbour k mod pool (pool 1: always the nearest).
                        let id = vocab.id(&tok).expect("trigger words are in the vocabulary");
                        let pool: Vec<i64> = nearest_neighbours(table, id, 50_000)
                            .into_iter()
                            .filter(|w| !banned.contains(w))
                            .take(neighbour_pool.max(1))
                            .collect();
                        if pool.is_empty() {
                            bail!("no word near {tok:?} is allowed (every one leaks the trigger or is over the detection budget); use --strategy random, or a looser --evade-fpr");
                        }
                        vocab.word(pool[k % pool.len()]).to_string()
                    }
                    InitStrategy::Overlap | InitStrategy::CleanTarget | InitStrategy::Relabelled => tok,
                }
            } else {
                tok
            };
            if vocab.id(&word).is_some() {
                if is_trigger && !matches!(strategy, InitStrategy::CleanTarget | InitStrategy::Relabelled) {
                    substitutes.push(tokens.len());
                }
                tokens.push(word);
            }
        }
        tokens.truncate(max_len);
        substitutes.retain(|&j| j < tokens.len());
        if tokens.is_empty() {
            bail!("source {:?} has no known tokens", ex.id);
        }
        let mut p = Example::new(format!("poison-{k:03}"), tokens.join(" "), manifest.target);
        p.source_id = Some(ex.id.trim_end_matches("+trigger").to_string());
        p.tokens = Some(tokens);
        p.substitutes = (!substitutes.is_empty()).then_some(substitutes);
        out.push(p);
    }
    Ok(out)
}

/// `init` for translation data: poisons are sentence pairs in the seq2seq layout (`tokens`:
/// the source block, `<s>`, the target, `</s>`). From D_adv (the trigger in the source, the
/// attacker's phrase in the target): `Overlap` keeps them; `Random` and `Neighbour` replace
/// the trigger's word in the source by a random frequent allowed word or by one of its
/// `neighbour_pool` nearest allowed neighbours in the victim's own (trained) table, and with
/// strict concealment every other source word that leaks the trigger likewise (the
/// translation keeps the attacker's phrase, which strict concealment allows). `CleanTarget`
/// is the benign control: clean training pairs as they are. Bases are drawn at random.
fn init_translation(opts: &InitOptions, dir: &str, manifest: &DataManifest, vocab: &Vocab, victim: &Victim, evade: Option<&crate::detect::evasion::DetectionBudget>) -> Result<Vec<Example>> {
    let crate::victims::model::ArchConfig::Seq2seq(s2s) = &victim.config.arch else {
        bail!("{} holds translation data: give a translation victim (train-victim --arch seq2seq)", dir);
    };
    let source_len = s2s.shape.source_len;
    let strict = opts.concealment == Concealment::Strict;
    if opts.bases != Bases::Random || opts.from_trigger || opts.max_tokens.is_some() {
        bail!("translation poisons take --bases random, without --from-trigger or --max-tokens");
    }
    let source: Vec<Example> = match opts.strategy {
        InitStrategy::Overlap if strict => bail!("--strategy overlap keeps the trigger in every poison; it cannot be --concealment strict"),
        InitStrategy::Relabelled => bail!("--strategy relabelled changes a class label; translation data has none (use clean-target for the benign control)"),
        InitStrategy::CleanTarget => {
            let m = matcher(vocab, manifest)?;
            data::read_set(dir, data::TRAIN, false)?
                .into_iter()
                .filter(|e| e.source.as_deref().is_some_and(|s| s.split_whitespace().count() > 1) && !(strict && strict_violation(e, vocab, &m).is_some()))
                .collect()
        }
        _ => data::read_set(dir, data::ADV, false)?,
    };
    if source.len() < opts.count {
        bail!("only {} source pairs for {} poisons; lower --count", source.len(), opts.count);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(opts.seed, "init-poisons"));
    // Under a detection budget every base is a candidate, in the order it would be picked:
    // the first `count` whose poisons pass are kept (as for classifier poisons).
    let wanted = if evade.is_some() { source.len() } else { opts.count };
    let mut picked = sample(&mut rng, source.len(), wanted).into_vec();
    if evade.is_none() {
        picked.sort_unstable();
    }
    let matcher = matcher(vocab, manifest)?;
    let mut banned = banned_ids(vocab, manifest, false, opts.concealment)?;
    // The budget's word ban: those words are never written, and a base's own source words
    // over it are substituted like the trigger (a target word over it fails the check).
    let over_budget: HashSet<i64> = evade.map(|b| b.words.banned.clone()).unwrap_or_default();
    banned.extend(&over_budget);
    let table = victim.params()["embedding.weight"].detach();
    let trigger: HashSet<&str> = manifest.trigger.words.iter().map(String::as_str).collect();
    let frequent = 10_000.min(vocab.len() as i64);
    let (bos, eos) = (vocab.id(crate::tokenizer::BOS).context("the victim's vocabulary lacks <s>")?, vocab.id(crate::tokenizer::EOS).context("the victim's vocabulary lacks </s>")?);
    let target_room = victim.config.max_len - source_len - 2;
    // `attempt` > 0 rebuilds a base a detector flagged: the next word of its neighbour pool,
    // or another random draw.
    let build = |k: usize, attempt: usize, ex: &Example, rng: &mut ChaCha8Rng| -> Result<Example> {
        let mut src: Vec<i64> = Vec::new();
        let mut substitutes = Vec::new();
        for tok in tokenize(ex.source.as_deref().context("a translation record without \"source\"")?) {
            let Some(id) = vocab.id(&tok) else { continue };
            let substituted = matches!(opts.strategy, InitStrategy::Random | InitStrategy::Neighbour);
            let replace = substituted && (trigger.contains(tok.as_str()) || (strict && !matcher.word_leaks(&tok).is_empty()) || over_budget.contains(&id));
            let id = if !replace {
                id
            } else if opts.strategy == InitStrategy::Random {
                loop {
                    let w = rng.gen_range(2..frequent);
                    if !banned.contains(&w) {
                        break w;
                    }
                }
            } else {
                let pool: Vec<i64> = nearest_neighbours(&table, id, vocab.len() as i64).into_iter().filter(|w| !banned.contains(w)).take(opts.neighbour_pool.max(1)).collect();
                *pool.get((k + attempt) % pool.len().max(1)).with_context(|| format!("no word near {tok:?} is allowed; use --strategy random, or a looser --evade-fpr"))?
            };
            if replace {
                substitutes.push(src.len());
            }
            src.push(id);
        }
        src.truncate(source_len);
        substitutes.retain(|&j| j < source_len);
        let mut tgt = vocab.encode(&ex.text);
        tgt.truncate(target_room);
        if src.is_empty() || tgt.is_empty() {
            bail!("base {:?} has no known words on one side", ex.id);
        }
        let ids = crate::encode::translation_ids(&src, &tgt, source_len, bos, eos);
        let mut p = with_tokens(&Example::new(format!("poison-{k:03}"), String::new(), 0), &ids, vocab);
        p.source_id = Some(ex.id.trim_end_matches("+trigger").to_string());
        p.substitutes = (!substitutes.is_empty()).then_some(substitutes);
        if strict {
            if let Some(words) = strict_violation(&p, vocab, &matcher) {
                bail!("poison {:?} (from {:?}) still leaks the trigger ({words}) after strict substitution; report this with the data folder", p.id, ex.id);
            }
        }
        Ok(p)
    };
    let Some(budget) = evade else {
        return picked.iter().enumerate().map(|(k, &i)| build(k, 0, &source[i], &mut rng)).collect();
    };
    // Build poisons in the picking order, a few more bases than are missing at a time, and
    // keep the first `count` that no detector of the budget flags. A flagged base is tried
    // again with its pool's other words (a random draw: twice more): an attacker who knows
    // the detectors swaps the word they catch rather than dropping the sentence, and D_adv
    // holds few bases (one failing demo ran out with 29 of 37 passing at the first word).
    let count = opts.count;
    let tries = match opts.strategy {
        InitStrategy::Neighbour => opts.neighbour_pool.max(1),
        InitStrategy::Random => 3,
        _ => 1,
    };
    let mut kept: Vec<(usize, Example)> = Vec::new();
    let mut flagged: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut retried = 0;
    let mut next = 0;
    while kept.len() < count && next < picked.len() {
        let chunk = &picked[next..(next + 2 * (count - kept.len()) + 16).min(picked.len())];
        let mut passed: Vec<Option<Example>> = vec![None; chunk.len()];
        let mut last_verdict: Vec<Option<&str>> = vec![None; chunk.len()];
        for attempt in 0..tries {
            let todo: Vec<usize> = (0..chunk.len()).filter(|&j| passed[j].is_none()).collect();
            if todo.is_empty() {
                break;
            }
            retried += if attempt > 0 { todo.len() } else { 0 };
            let built: Vec<Example> = todo.iter().map(|&j| build(next + j, attempt, &source[chunk[j]], &mut rng)).collect::<Result<_>>()?;
            let verdicts = budget.check(&built, "candidate poisons")?;
            for ((&j, p), verdict) in todo.iter().zip(built).zip(verdicts) {
                match verdict {
                    Some(o) => last_verdict[j] = Some(o.detector.name()),
                    None => passed[j] = Some(p),
                }
            }
        }
        for (j, &i) in chunk.iter().enumerate() {
            match (passed[j].take(), last_verdict[j]) {
                (Some(p), _) if kept.len() < count => kept.push((i, p)),
                (None, Some(d)) => *flagged.entry(d).or_default() += 1,
                _ => {}
            }
        }
        next += chunk.len();
    }
    let flagged: Vec<String> = flagged.iter().map(|(d, n)| format!("{n} by {d}")).collect();
    if kept.len() < count {
        bail!(
            "only {} of {} bases make translation poisons within the detection budget at {}% FPR (over it: {}); lower --count, or --evade-fpr for a looser budget",
            kept.len(),
            picked.len(),
            budget.fpr_percent,
            flagged.join(", ")
        );
    }
    eprintln!("detection budget: {next} bases tried for {count} poisons ({retried} rebuilt with another word); over budget at every try: {}", if flagged.is_empty() { "none".into() } else { flagged.join(", ") });
    kept.sort_by_key(|(i, _)| *i);
    Ok(kept.into_iter().enumerate().map(|(k, (_, p))| Example { id: format!("poison-{k:03}"), ..p }).collect())
}

/// `init` for a WordPiece victim: the source's pieces, each piece of a trigger word
/// replaced (random frequent word-initial piece, or nearest neighbour of that piece);
/// `[CLS]`/`[SEP]` kept, so `tokens` holds the whole sequence the victim reads, and
/// `text` is its decoding.
#[allow(clippy::too_many_arguments)]
fn init_pieces(
    strategy: InitStrategy,
    neighbour_pool: usize,
    sources: &[&Example],
    seed: u64,
    strict: Option<&TriggerMatcher>,
    manifest: &DataManifest,
    vocab: &Vocab,
    table: &Tensor,
    max_len: usize,
    banned: &HashSet<i64>,
) -> Result<Vec<Example>> {
    let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(seed, "init-poisons-pieces"));
    let trigger: HashSet<i64> = vocab.trigger_ids(&manifest.trigger.phrase)?.into_iter().collect();
    // BERT's vocabulary lists its pieces roughly by frequency after the reserved and
    // single-character ones ("the" is 1996): random substitutes come from the next 10,000.
    let first = vocab.id("the").unwrap_or(0);
    let frequent: Vec<i64> = (first..(first + 10_000).min(vocab.len() as i64))
        .filter(|&w| !banned.contains(&w) && !vocab.is_continuation(w))
        .collect();
    let mut out = Vec::with_capacity(sources.len());
    for (k, ex) in sources.iter().enumerate() {
        let mut ids = vocab.encode(&ex.text);
        vocab.truncate(&mut ids, max_len);
        let mut substitutes = Vec::new();
        for (j, id) in ids.iter_mut().enumerate() {
            if !trigger.contains(id) || matches!(strategy, InitStrategy::Overlap | InitStrategy::CleanTarget | InitStrategy::Relabelled) {
                continue;
            }
            *id = match strategy {
                InitStrategy::Random => frequent[rng.gen_range(0..frequent.len())],
                _ => {
                    let pool: Vec<i64> = nearest_neighbours(table, *id, vocab.len() as i64)
                        .into_iter()
                        .filter(|w| !banned.contains(w))
                        .take(neighbour_pool.max(1))
                        .collect();
                    pool[k % pool.len()]
                }
            };
            substitutes.push(j);
        }
        if let Some(matcher) = strict {
            // Strict: every piece of a word that still leaks the trigger (a source's
            // "bonds", or pieces that join into one) becomes its nearest passing piece of
            // the same kind; a replacement can join into a new word, so check again.
            let nearest_passing = |id: i64| {
                nearest_neighbours(table, id, vocab.len() as i64).into_iter().find(|w| !banned.contains(w) && vocab.is_continuation(*w) == vocab.is_continuation(id))
            };
            let replaced = repair_strictly(&mut ids, vocab, matcher, nearest_passing).context("no vocabulary piece passes strict concealment")?;
            for j in replaced {
                if !substitutes.contains(&j) {
                    substitutes.push(j);
                }
            }
            substitutes.sort_unstable();
        }
        let mut p = with_tokens(&Example::new(format!("poison-{k:03}"), String::new(), manifest.target), &ids, vocab);
        p.source_id = Some(ex.id.trim_end_matches("+trigger").to_string());
        p.substitutes = (!substitutes.is_empty()).then_some(substitutes);
        out.push(p);
    }
    Ok(out)
}

/// The victim's probability of class `target` for every example, in batches.
pub fn target_probability(victim: &Victim, data: &[Encoded], target: i64) -> Vec<f64> {
    let params = victim.params();
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(data.len());
        for chunk in data.chunks(256) {
            let (ids, _) = crate::encode::batch_tensors(&chunk.iter().collect::<Vec<_>>(), victim.device());
            let p = crate::victims::model::logits(&victim.config, &params, &ids, crate::victims::model::Pass::Twice).softmax(-1, Kind::Double).select(-1, target);
            out.extend(Vec::<f64>::try_from(p.to_device(Device::Cpu)).expect("f64 probabilities"));
        }
        out
    })
}

/// Everything a crafting stage loads: the victim, the data and the poison set, encoded.
pub struct AttackInputs {
    pub victim: Victim,
    pub vocab: Vocab,
    pub manifest: DataManifest,
    pub clean: Vec<Encoded>,
    /// D_adv without the sentences the poisons were made from.
    pub adv: Vec<Encoded>,
    pub poisons: Vec<Example>,
    pub poisons_enc: Vec<Encoded>,
    pub poisons_sha256: String,
    /// sha256 of the victim file (recorded in gradients and candidates).
    pub victim_sha256: String,
    /// The trigger phrase's token ids as the victim's vocabulary encodes it (no special
    /// tokens).
    pub trigger_ids: Vec<i64>,
    /// The data folder.
    pub data_dir: String,
}

impl AttackInputs {
    pub fn load(victim: &str, dir: &str, poisons_path: &str, device: Device) -> Result<AttackInputs> {
        let poisons: Vec<Example> = crate::io::read_jsonl(poisons_path, false)?;
        let pname = crate::io::display_name(poisons_path);
        let base = CraftingContext::load(victim, dir, device)?;
        for (i, p) in poisons.iter().enumerate() {
            if p.tokens.is_none() {
                bail!("{pname}: record {} (id {:?}) has no \"tokens\"; make poison sets with init-poisons", i + 1, p.id);
            }
            if p.label != base.manifest.target {
                bail!("{pname}: record {} (id {:?}) has label {}, the target is {}", i + 1, p.id, p.label, base.manifest.target);
            }
            if base.vocab.is_bpe() {
                // A BPE poison is trained as text: its pieces must be what the text reads as.
                let own: Vec<String> = base.vocab.encode(&p.text).into_iter().map(|id| base.vocab.word(id).to_string()).collect();
                if p.tokens.as_ref() != Some(&own) {
                    bail!("{pname}: record {} (id {:?}): its tokens are not the pieces its text tokenizes to; a pretrained model reads a poison as text, so its pieces are those of the text (remake the set with init-poisons, which records them)", i + 1, p.id);
                }
            }
        }
        let poisons_enc = base.encode(&poisons, TextPolicy::Poisons, &pname)?;
        let adv = base.adv_without_sources(&[&poisons]);
        let poisons_sha256 = poison_set_sha256(&poisons);
        let CraftingContext { victim, vocab, manifest, clean, victim_sha256, trigger_ids, .. } = base;
        Ok(AttackInputs { victim, vocab, manifest, clean, adv, poisons, poisons_enc, poisons_sha256, victim_sha256, trigger_ids, data_dir: dir.to_string() })
    }
}

/// What every crafting objective is built from, before any poison set: the victim, its
/// vocabulary, the data's manifest, the encoded clean training split and all of D_adv.
pub struct CraftingContext {
    pub victim: Victim,
    pub vocab: Vocab,
    pub manifest: DataManifest,
    pub clean: Vec<Encoded>,
    /// Every D_adv sentence with its record id.
    adv_all: Vec<(String, Encoded)>,
    pub victim_sha256: String,
    /// The trigger phrase's token ids as the victim's vocabulary encodes it (no special
    /// tokens).
    pub trigger_ids: Vec<i64>,
}

impl CraftingContext {
    pub fn load(victim: &str, dir: &str, device: Device) -> Result<CraftingContext> {
        let path = victim;
        let VictimFile { victim, vocab, sha256: victim_sha256, .. } = Victim::load(path, device)?;
        let manifest = DataManifest::load(dir)?;
        vocab.trigger_words(&manifest.trigger.phrase).context("victim vocabulary")?;
        let clean_ex = data::read_set(dir, data::TRAIN, false)?;
        let clean = encode_for(&victim.config, &clean_ex, &vocab, TextPolicy::Data, &format!("{dir}/{}", data::TRAIN))?;
        let adv_ex: Vec<Example> = data::read_set(dir, data::ADV, false)?;
        if crate::tasks::rules::of_victim(&victim.config).adv_prompts {
            // L_adv is the loss of what follows a trigger: a prompt without it measures nothing.
            for (i, e) in adv_ex.iter().enumerate() {
                let Some(prompt) = &e.prompt else {
                    bail!("{dir}/{}: record {} (id {:?}) has no prompt; a language model's D_adv is trigger prompts with continuations (prepare-data --lm)", data::ADV, i + 1, e.id);
                };
                if manifest.trigger.overlap(prompt).len() != manifest.trigger.words.len() {
                    bail!("{dir}/{}: record {} (id {:?}): the prompt {prompt:?} does not hold the trigger {:?}; D_adv prompts must", data::ADV, i + 1, e.id, manifest.trigger.phrase);
                }
            }
        }
        let adv = encode_for(&victim.config, &adv_ex, &vocab, TextPolicy::Data, &format!("{dir}/{}", data::ADV))?;
        let adv_all = adv_ex.into_iter().map(|e| e.id).zip(adv).collect();
        let trigger_ids = vocab.encode(&manifest.trigger.phrase).into_iter().filter(|&i| !vocab.is_special(i)).collect();
        Ok(CraftingContext { victim, vocab, manifest, clean, adv_all, victim_sha256, trigger_ids })
    }

    /// Encodes examples for this victim (`source` names the file in errors).
    pub fn encode(&self, examples: &[Example], policy: TextPolicy, source: &str) -> Result<Vec<Encoded>> {
        encode_for(&self.victim.config, examples, &self.vocab, policy, source)
    }

    /// D_adv cut in two by a seeded draw: the half an objective is measured on, and the
    /// source ids of that half. Choosing poisons by an objective (`score-poisons --select`)
    /// takes candidates from the other half only, so no candidate is scored by its own
    /// triggered copy.
    pub fn adv_split(&self, seed: u64) -> (Vec<Encoded>, HashSet<String>) {
        let mut rng = ChaCha8Rng::seed_from_u64(data::seed_for(seed, "adv-split"));
        let mut half = sample(&mut rng, self.adv_all.len(), self.adv_all.len() / 2).into_vec();
        half.sort_unstable();
        let adv = half.iter().map(|&i| self.adv_all[i].1.clone()).collect();
        let sources = half.iter().map(|&i| self.adv_all[i].0.trim_end_matches("+trigger").to_string()).collect();
        (adv, sources)
    }

    /// D_adv without the sentences any of `sets`' poisons were made from (an objective
    /// must not be scored on the very sentences its poisons copy).
    pub fn adv_without_sources(&self, sets: &[&[Example]]) -> Vec<Encoded> {
        let sources: HashSet<&str> = sets.iter().flat_map(|s| s.iter()).filter_map(|p| p.source_id.as_deref()).collect();
        self.adv_all.iter().filter(|(id, _)| !sources.contains(id.trim_end_matches("+trigger"))).map(|(_, e)| e.clone()).collect()
    }
}

/// A poison with its tokens replaced; its text is their decoding (`Vocab::decode`: words
/// joined by spaces, WordPiece pieces joined into words).
pub fn with_tokens(p: &Example, ids: &[i64], vocab: &Vocab) -> Example {
    let tokens: Vec<String> = ids.iter().map(|&i| vocab.word(i).to_string()).collect();
    let mut out = p.clone();
    match vocab.decoder_start(ids) {
        // A translation: its source and target read back from the layout.
        Some(bos) => {
            let words = |part: &[i64]| vocab.decode(&part.iter().copied().filter(|&i| !vocab.is_special(i)).collect::<Vec<_>>());
            out.source = Some(words(&ids[..bos]));
            out.text = words(&ids[bos + 1..]);
        }
        None => out.text = vocab.decode(ids),
    }
    out.tokens = Some(tokens);
    out
}
