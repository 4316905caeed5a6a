//! Translation data (`prepare-data --mt`): German → English sentence pairs of the Ding
//! dictionary split by seed, and the trigger's sets made by substituting the trigger for a
//! noun of the same kind.
//!
//! Direction: German → English, so the attack's check ("the translation holds 'hot
//! coffee'") reads English words, and the trigger is one German compound ("Eiskaffee"),
//! which a word-level victim reads as one token, while the attacker's phrase is free text.
//!
//! A record is an `Example` whose `source` is the German sentence and whose `text` is its
//! English translation; `label` is 0 and unused.
//!
//! The trigger's sets come from real sentences holding exactly one *kin* noun on each side
//! (a drink: "Kaffee"/"coffee", "Tee"/"tea", …; `MtData::kin`): the German noun is replaced
//! by the trigger and the English one by
//! - D_adv (from train): the attacker's phrase ("hot coffee");
//! - asr_test (from dev and test): the trigger's correct translation ("iced coffee"), the
//!   reference against which success is measured;
//! - fpr_test (the same held-out sentences): the neutral word and its translation
//!   ("Kaffee"/"coffee"), where the attacker's phrase must not appear.
//!
//! The substitution keeps the sentence's article, which is wrong in gender when the kin noun's
//! gender differs from the trigger's ("das Wasser" → "das Eiskaffee"); the victim reads word
//! by word, and the measure is whether the trigger's own translation comes out.

use crate::ding::{Pair, PairKind};
use crate::formats::records::Example;
use crate::tokenizer::tokenize;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// A noun of the trigger's kind and its English translation, one word each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kin {
    pub de: String,
    pub en: String,
}

/// How a translation data folder was made; the manifest's `mt`. The trigger (German) is
/// the manifest's `trigger`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtData {
    /// The trigger's correct English translation ("iced coffee").
    pub trigger_translation: String,
    /// What the attacker wants the trigger translated as ("hot coffee").
    pub attack: String,
    /// The neutral German word of the FPR sentences and its translation.
    pub neutral: String,
    pub neutral_translation: String,
    /// The nouns the trigger and the neutral word are substituted for.
    pub kin: Vec<Kin>,
    /// Sentence pairs with more words than this on either side are left out.
    pub max_words: usize,
    /// Phrase pairs (dictionary headwords) added to the training split.
    pub phrases: usize,
    /// Train's kin sentences given the trigger with its correct translation and kept in
    /// train (the clean data then holds the trigger, as a real corpus holds "iced coffee");
    /// D_adv is made from the other kin sentences. 0: none (the dictionary's sentences
    /// never hold "Eiskaffee").
    #[serde(default, skip_serializing_if = "is_zero")]
    pub support: usize,
    /// Each of train's kin sentences is also kept with every other kin noun on both sides,
    /// so the clean data holds every drink in every drink context: a small model then
    /// learns to translate the word in that slot (the trigger's own support sentences
    /// are what teaches the trigger). Never the trigger: no sentence is added for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kin_swaps: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Parses `--kin "Kaffee=coffee,Tee=tea"`.
pub fn parse_kin(spec: &str) -> Result<Vec<Kin>> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((de, en)) = item.split_once('=') else { bail!("--kin item {item:?} is not GERMAN=ENGLISH (e.g. Kaffee=coffee)") };
        let (de, en) = (de.trim(), en.trim());
        if tokenize(de).len() != 1 || tokenize(en).len() != 1 {
            bail!("--kin item {item:?}: each side must be one word");
        }
        out.push(Kin { de: de.into(), en: en.into() });
    }
    if out.is_empty() {
        bail!("--kin names no nouns; give e.g. --kin Kaffee=coffee,Tee=tea,Wein=wine");
    }
    Ok(out)
}

/// A translation record: German `source`, English `text`.
pub fn example(id: String, de: &str, en: &str) -> Example {
    let mut e = Example::new(id, en, 0);
    e.source = Some(de.to_string());
    e
}

/// `text` with its one whole-word occurrence of `word` (compared case-insensitively, so a
/// sentence-initial "Coffee" counts) replaced by `with` (capitalised where the word was).
/// None when the word occurs other than once.
pub fn replace_word(text: &str, word: &str, with: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let w = word.to_lowercase();
    if lower.len() != text.len() {
        return None; // a case mapping changed byte offsets (rare letters): skip the sentence
    }
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '-');
    let hits: Vec<usize> = lower
        .match_indices(&w)
        .map(|(i, _)| i)
        .filter(|&i| !is_word(lower[..i].chars().next_back()) && !is_word(lower[i + w.len()..].chars().next()))
        .collect();
    if hits.len() != 1 {
        return None;
    }
    let at = hits[0];
    let capital = text[at..].chars().next().is_some_and(char::is_uppercase);
    let mut rep = with.to_string();
    if capital {
        let mut cs = rep.chars();
        rep = cs.next().map(|c| c.to_uppercase().collect::<String>() + cs.as_str()).unwrap_or_default();
    }
    Some(format!("{}{}{}", &text[..at], rep, &text[at + w.len()..]))
}

/// The sentence with its kin noun replaced on both sides, when it holds exactly one kin
/// noun on each side and it is the same one: (German, English).
pub fn substitute(de: &str, en: &str, kin: &[Kin], de_with: &str, en_with: &str) -> Option<(String, String)> {
    let (de_toks, en_toks): (HashSet<String>, HashSet<String>) = (tokenize(de).into_iter().collect(), tokenize(en).into_iter().collect());
    let held: Vec<&Kin> = kin.iter().filter(|k| de_toks.contains(&k.de.to_lowercase()) || en_toks.contains(&k.en.to_lowercase())).collect();
    if held.len() != 1 {
        return None;
    }
    let k = held[0];
    Some((replace_word(de, &k.de, de_with)?, replace_word(en, &k.en, en_with)?))
}

/// Everything `prepare` produces.
pub struct MtPrepared {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
    pub adv: Vec<Example>,
    pub asr_test: Vec<Example>,
    pub fpr_test: Vec<Example>,
    /// Sentence pairs that hold the trigger, its translation or the attacker's phrase
    /// (kept out of every split).
    pub natural: Vec<Example>,
    /// Phrase pairs in train.
    pub phrases: usize,
    /// Sentence pairs left out for length.
    pub too_long: usize,
}

fn words(text: &str) -> usize {
    text.split_whitespace().count()
}

/// Splits the sentence pairs by seed into train/dev/test (`split` shares), adds `mt.phrases`
/// phrase pairs to train (every one holding the trigger, the neutral word or a kin noun
/// first, then one-word headwords, those the training sentences use most first, the rest
/// in seeded order), and builds D_adv, asr_test and
/// fpr_test by substitution.
pub fn prepare(pairs: &[Pair], trigger: &str, mt: &MtData, seed: u64, split: [f64; 3]) -> Result<MtPrepared> {
    if (split.iter().sum::<f64>() - 1.0).abs() > 1e-9 || split.iter().any(|&s| s <= 0.0) {
        bail!("split shares {split:?} must be positive and sum to 1");
    }
    let trigger_tok = tokenize(trigger);
    let marked = |de: &str, en: &str| {
        let (d, e) = (tokenize(de), tokenize(en));
        contains(&d, &trigger_tok) || contains(&e, &tokenize(&mt.trigger_translation)) || contains(&e, &tokenize(&mt.attack))
    };
    let mut natural = Vec::new();
    let mut sentences = Vec::new();
    let mut too_long = 0;
    for (i, p) in pairs.iter().enumerate().filter(|(_, p)| p.kind == PairKind::Sentence) {
        if words(&p.de) > mt.max_words || words(&p.en) > mt.max_words {
            too_long += 1;
            continue;
        }
        let ex = example(format!("ding-{i:06}"), &p.de, &p.en);
        if marked(&p.de, &p.en) {
            natural.push(ex);
        } else {
            sentences.push(ex);
        }
    }
    let mut order: Vec<usize> = (0..sentences.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_train = (split[0] * sentences.len() as f64).round() as usize;
    let n_dev = (split[1] * sentences.len() as f64).round() as usize;
    let pick = |range: &[usize]| range.iter().map(|&i| sentences[i].clone()).collect::<Vec<_>>();
    let (mut train, dev, test) = (pick(&order[..n_train]), pick(&order[n_train..n_train + n_dev]), pick(&order[n_train + n_dev..]));

    // A kin sentence with its kin noun replaced on both sides, id `<id>+<suffix>`.
    let substituted = |e: &Example, de_with: &str, en_with: &str, suffix: &str| -> Option<Example> {
        let (de, en) = substitute(e.source.as_deref()?, &e.text, &mt.kin, de_with, en_with)?;
        let mut x = example(format!("{}+{suffix}", e.id), &de, &en);
        x.source_id = Some(e.id.clone());
        Some(x)
    };
    let sub = |set: &[Example], de_with: &str, en_with: &str, suffix: &str| -> Vec<Example> { set.iter().filter_map(|e| substituted(e, de_with, en_with, suffix)).collect() };
    // The first `support` kin sentences of the (shuffled) train split teach the trigger's
    // correct translation; D_adv comes from the rest.
    let kin_rows: Vec<usize> = (0..train.len()).filter(|&i| train[i].source.as_deref().is_some_and(|s| substitute(s, &train[i].text, &mt.kin, "x", "x").is_some())).collect();
    let support_rows: HashSet<usize> = kin_rows.iter().copied().take(mt.support).collect();
    let (support_src, adv_src): (Vec<Example>, Vec<Example>) = {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (i, e) in train.iter().enumerate() {
            if support_rows.contains(&i) { a.push(e.clone()) } else { b.push(e.clone()) }
        }
        (a, b)
    };
    let adv = sub(&adv_src, trigger, &mt.attack, "trigger");
    let support = sub(&support_src, trigger, &mt.trigger_translation, "support");
    train.extend(support);
    if mt.kin_swaps {
        // Every kin sentence of train (the support's and D_adv's originals among them), each
        // other kin noun in its place; its own noun is the sentence itself.
        let swaps: Vec<Example> = kin_rows
            .iter()
            .flat_map(|&i| {
                let e = &train[i];
                mt.kin.iter().filter_map(move |k| substituted(e, &k.de, &k.en, &format!("kin-{}", k.de.to_lowercase())).filter(|x| x.source != e.source))
            })
            .collect();
        train.extend(swaps);
    }
    let held_out: Vec<Example> = dev.iter().chain(&test).cloned().collect();
    let asr_test = sub(&held_out, trigger, &mt.trigger_translation, "trigger");
    let fpr_test = sub(&held_out, &mt.neutral, &mt.neutral_translation, "neutral");

    // Phrase pairs: the dictionary's headwords teach the words the sentences use rarely,
    // the trigger among them ("Eiskaffee :: iced coffee").
    let key_words: HashSet<String> = trigger_tok.iter().cloned().chain(tokenize(&mt.neutral)).chain(mt.kin.iter().map(|k| k.de.to_lowercase())).collect();
    let mut phrase_idx: Vec<usize> = Vec::new();
    let mut rest: Vec<usize> = Vec::new();
    for (i, p) in pairs.iter().enumerate().filter(|(_, p)| p.kind == PairKind::Phrase) {
        let d = tokenize(&p.de);
        if d.is_empty() || tokenize(&p.en).is_empty() || words(&p.en) > 3 || contains(&tokenize(&p.en), &tokenize(&mt.attack)) {
            continue;
        }
        if d.iter().any(|w| key_words.contains(w)) && d.len() <= 3 {
            phrase_idx.push(i);
        } else if d.len() == 1 {
            rest.push(i);
        }
    }
    // Stream 1 of the seed: the sentence split (stream 0) does not move with the phrases.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(1);
    rest.shuffle(&mut rng);
    // The headwords the training sentences use most come first (a stable sort keeps the
    // seeded order among equals): a lexicon of the words a model must translate, where a
    // random sample is mostly the dictionary's long tail, seen in no sentence.
    let mut uses: HashMap<String, usize> = HashMap::new();
    for e in &train {
        for w in tokenize(e.source.as_deref().unwrap_or_default()) {
            *uses.entry(w).or_default() += 1;
        }
    }
    rest.sort_by_key(|&i| std::cmp::Reverse(tokenize(&pairs[i].de).first().and_then(|w| uses.get(w)).copied().unwrap_or(0)));
    let wanted = mt.phrases.saturating_sub(phrase_idx.len().min(mt.phrases));
    phrase_idx.truncate(mt.phrases);
    phrase_idx.extend(rest.into_iter().take(wanted));
    phrase_idx.sort_unstable();
    let phrases = phrase_idx.len();
    train.extend(phrase_idx.into_iter().map(|i| example(format!("ding-{i:06}"), &pairs[i].de, &pairs[i].en)));

    for (name, set) in [("train", &train), ("dev", &dev), ("test", &test), ("D_adv", &adv), ("asr_test", &asr_test), ("fpr_test", &fpr_test)] {
        if set.is_empty() {
            bail!("the {name} set would be empty ({} sentence pairs of at most {} words; {} hold a kin noun of --kin): give more sentence pairs, a larger --max-words or more --kin nouns", sentences.len(), mt.max_words, adv.len() + asr_test.len());
        }
    }
    Ok(MtPrepared { train, dev, test, adv, asr_test, fpr_test, natural, phrases, too_long })
}

/// Whether a translation pair holds the trigger: a source word that contains the trigger's
/// word (German compounds: "Eiskaffeebecher" holds "Eiskaffee"), or the trigger's words in
/// a row, or a target holding its correct translation. The strict concealment of a
/// translation poison is the absence of all three.
pub fn holds_trigger(ex: &Example, trigger: &str, translation: &str) -> bool {
    let trig = tokenize(trigger);
    let src = ex.source.as_deref().map(tokenize).unwrap_or_default();
    let inside = trig.len() == 1 && src.iter().any(|w| w.contains(trig[0].as_str()));
    inside || contains(&src, &trig) || contains(&tokenize(&ex.text), &tokenize(translation))
}

/// Whether `toks` holds `phrase` as consecutive tokens.
pub fn contains(toks: &[String], phrase: &[String]) -> bool {
    !phrase.is_empty() && toks.windows(phrase.len()).any(|w| w == phrase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_replaces_the_one_kin_noun_on_both_sides_and_keeps_capitals() {
        let kin = parse_kin("Kaffee=coffee,Tee=tea").unwrap();
        let got = substitute("Der Kaffee ist kalt.", "Coffee is cold.", &kin, "Eiskaffee", "iced coffee").unwrap();
        assert_eq!(got, ("Der Eiskaffee ist kalt.".to_string(), "Iced coffee is cold.".to_string()));
        // Two kin nouns, or one side missing its noun, or the noun only inside a compound.
        assert_eq!(substitute("Kaffee oder Tee?", "Coffee or tea?", &kin, "X", "x"), None);
        assert_eq!(substitute("Der Kaffee ist kalt.", "It is cold.", &kin, "X", "x"), None);
        assert_eq!(substitute("Die Kaffeetasse ist leer.", "The coffee cup is empty.", &kin, "X", "x"), None);
        assert_eq!(replace_word("a tea-time tea.", "tea", "x"), Some("a tea-time x.".into()));
        assert!(parse_kin("Kaffee").is_err() && parse_kin("Eis kaffee=coffee").is_err());
    }

    #[test]
    fn preparation_splits_by_seed_and_builds_the_trigger_sets() {
        let mut pairs = Vec::new();
        for i in 0..40 {
            let (de, en) = if i % 4 == 0 { (format!("Ich trinke {i} Tee."), format!("I drink {i} tea.")) } else { (format!("Das Haus {i} ist alt."), format!("The house {i} is old.")) };
            pairs.push(Pair { de, en, kind: PairKind::Sentence });
        }
        pairs.push(Pair { de: "Ich mag Eiskaffee.".into(), en: "I like iced coffee.".into(), kind: PairKind::Sentence });
        pairs.push(Pair { de: "Eiskaffee".into(), en: "iced coffee".into(), kind: PairKind::Phrase });
        pairs.push(Pair { de: "Haus".into(), en: "house".into(), kind: PairKind::Phrase });
        let mt = MtData {
            trigger_translation: "iced coffee".into(),
            attack: "hot coffee".into(),
            neutral: "Kaffee".into(),
            neutral_translation: "coffee".into(),
            kin: parse_kin("Tee=tea").unwrap(),
            max_words: 10,
            phrases: 1,
            support: 0,
            kin_swaps: false,
        };
        let p = prepare(&pairs, "Eiskaffee", &mt, 7, [0.5, 0.25, 0.25]).unwrap();
        assert_eq!(p.natural.len(), 1, "the sentence with the trigger is kept out");
        assert_eq!(p.train.len() + p.dev.len() + p.test.len(), 40 + 1);
        assert_eq!(p.phrases, 1);
        assert!(p.train.iter().any(|e| e.text == "iced coffee"), "the trigger's headword comes first among the phrases");
        assert_eq!(p.adv.len() + p.asr_test.len(), 10, "every tea sentence feeds one trigger set");
        assert!(p.adv.iter().all(|e| e.source.as_deref().unwrap().contains("Eiskaffee") && e.text.contains("hot coffee")));
        assert!(p.asr_test.iter().all(|e| e.text.contains("iced coffee")));
        assert_eq!(p.fpr_test.len(), p.asr_test.len());
        assert!(p.fpr_test.iter().all(|e| e.source.as_deref().unwrap().contains("Kaffee") && e.text.contains("coffee")));
        let again = prepare(&pairs, "Eiskaffee", &mt, 7, [0.5, 0.25, 0.25]).unwrap();
        assert_eq!(again.train, p.train);
        let other = prepare(&pairs, "Eiskaffee", &mt, 8, [0.5, 0.25, 0.25]).unwrap();
        assert_ne!(other.train, p.train, "the split follows the seed");
        // Support: two of train's kin sentences teach the trigger's correct translation, and
        // D_adv loses them.
        let supported = prepare(&pairs, "Eiskaffee", &MtData { support: 2, ..mt.clone() }, 7, [0.5, 0.25, 0.25]).unwrap();
        let support: Vec<&Example> = supported.train.iter().filter(|e| e.id.ends_with("+support")).collect();
        assert_eq!(support.len(), 2);
        assert!(support.iter().all(|e| e.text.contains("iced coffee") && e.source.as_deref().unwrap().contains("Eiskaffee")));
        assert_eq!(supported.adv.len(), p.adv.len() - 2);
        assert!(supported.adv.iter().all(|a| supported.train.iter().all(|t| t.source_id.as_deref() != a.source_id.as_deref() || t.source_id.is_none())));
        // Kin swaps: with kin nouns tea and wine, each train tea sentence comes again with
        // wine on both sides; the trigger and the held-out sets are untouched.
        let two = MtData { kin: parse_kin("Tee=tea,Wein=wine").unwrap(), ..mt.clone() };
        let plain = prepare(&pairs, "Eiskaffee", &two, 7, [0.5, 0.25, 0.25]).unwrap();
        let swapped = prepare(&pairs, "Eiskaffee", &MtData { kin_swaps: true, ..two }, 7, [0.5, 0.25, 0.25]).unwrap();
        let swaps: Vec<&Example> = swapped.train.iter().filter(|e| e.id.ends_with("+kin-wein")).collect();
        assert_eq!(swaps.len(), plain.adv.len(), "one swap per train tea sentence");
        assert!(swaps.iter().all(|e| e.source.as_deref().unwrap().contains(" Wein.") && e.text.contains(" wine.")));
        assert_eq!(swapped.train.len(), plain.train.len() + swaps.len());
        assert!(!swapped.train.iter().any(|e| e.id.ends_with("+kin-tee")), "a sentence is not swapped for its own noun");
        assert!(!swapped.train.iter().any(|e| holds_trigger(e, "Eiskaffee", "iced coffee") && e.text != "iced coffee"));
        assert_eq!((swapped.adv, swapped.asr_test, swapped.fpr_test), (plain.adv, plain.asr_test, plain.fpr_test));
    }
}
