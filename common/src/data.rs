//! Data preparation: deduplication, deterministic train/dev/test splits, trigger
//! insertion (D_adv from train non-target examples, the ASR test set from test non-target
//! examples), and natural occurrences of the trigger's words kept aside.

use crate::io::Record;
use crate::formats::records::Example;
use crate::tokenizer::tokenize;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The files of a prepared data folder (all `example` JSONL) and `manifest.json`.
pub const TRAIN: &str = "train.jsonl";
pub const DEV: &str = "dev.jsonl";
pub const TEST: &str = "test.jsonl";
pub const ADV: &str = "adv.jsonl";
pub const ASR_TEST: &str = "asr_test.jsonl";
pub const NATURAL: &str = "natural.jsonl";
/// Language-model data: the held-out prompts with the trigger replaced by a neutral phrase.
pub const FPR_TEST: &str = "fpr_test.jsonl";
pub const MANIFEST: &str = "manifest.json";

/// Reads one file of a prepared data folder (e.g. `read_set(dir, TRAIN, false)`).
pub fn read_set(dir: &str, name: &str, allow_empty: bool) -> Result<Vec<Example>> {
    crate::io::read_jsonl(&format!("{dir}/{name}"), allow_empty)
}

/// A trigger phrase and its lowercase word tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trigger {
    pub phrase: String,
    pub words: Vec<String>,
}

impl Trigger {
    pub fn new(phrase: &str) -> Result<Trigger> {
        let words = tokenize(phrase);
        if words.is_empty() {
            bail!("the trigger {phrase:?} holds no words; pass a phrase like --trigger \"James Bond\"");
        }
        Ok(Trigger { phrase: phrase.trim().to_string(), words })
    }

    /// The trigger words a text contains (token match, case-insensitive), deduplicated.
    pub fn overlap(&self, text: &str) -> Vec<String> {
        let toks: HashSet<String> = tokenize(text).into_iter().collect();
        let mut out: Vec<String> = self.words.iter().filter(|w| toks.contains(*w)).cloned().collect();
        out.dedup();
        out
    }

    /// Inserts the phrase at a word boundary drawn from a generator seeded by `seed` and
    /// the example's id, so each example's position does not depend on file order.
    pub fn insert(&self, ex: &Example, target: usize, seed: u64) -> Example {
        let words: Vec<&str> = ex.text.split_whitespace().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed_for(seed, &ex.id));
        let at = rng.gen_range(0..=words.len());
        let mut out: Vec<&str> = Vec::with_capacity(words.len() + 1);
        out.extend(&words[..at]);
        out.push(&self.phrase);
        out.extend(&words[at..]);
        let mut rec = Example::new(format!("{}+trigger", ex.id), out.join(" "), target);
        rec.source_label = Some(ex.label);
        rec.trigger_at = Some(at);
        rec
    }
}

/// A per-item seed from a run seed and a string key (stable across platforms).
pub fn seed_for(seed: u64, key: &str) -> u64 {
    let h = crate::io::sha256_hex(format!("{seed}:{key}").as_bytes());
    u64::from_str_radix(&h[..16], 16).expect("hex")
}

/// Describes a prepared data folder; written as `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataManifest {
    pub kind: String,
    pub v: u32,
    pub labels: Vec<String>,
    pub trigger: Trigger,
    pub target: usize,
    pub seed: u64,
    /// Shares of train/dev/test after deduplication.
    pub split: [f64; 3],
    pub raw_sha256: String,
    pub counts: BTreeMap<String, usize>,
    /// sha256 of every data file, by file name.
    pub files: BTreeMap<String, String>,
    /// The training split was cut to this many examples (prepare-data --max-train).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_train: Option<usize>,
    /// Language-model data (prepare-data --lm): how its prompts were made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm: Option<LmPrompts>,
    /// Translation data (prepare-data --mt): the trigger's translations and how its sets
    /// were made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mt: Option<crate::mt::MtData>,
}

/// How prepare-data --lm turns reviews into prompts: a review whose subject is a
/// determiner and a subject noun ("this film is a dull , lifeless ...") becomes the prompt
/// up to the word after the subject, with the noun replaced by the trigger phrase ("this
/// apple iphone is"), continued by the rest of the review. The FPR prompts replace the
/// noun by `neutral` instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmPrompts {
    pub determiners: Vec<String>,
    pub nouns: Vec<String>,
    pub neutral: String,
}

impl Default for LmPrompts {
    fn default() -> Self {
        LmPrompts { determiners: vec!["the".into(), "this".into()], nouns: vec!["film".into(), "movie".into()], neutral: "movie".into() }
    }
}

/// A language model's evaluation and attack sets (`lm_sets`).
pub struct LmSets {
    /// D_adv: training reviews of the target sentiment as trigger prompts + continuation.
    pub adv: Vec<Example>,
    /// Held-out reviews (prepare-data: dev and test) of both sentiments as trigger prompts
    /// (label = the review's sentiment, the sentiment of its own continuation).
    pub asr_test: Vec<Example>,
    /// The same prompts with the neutral phrase in place of the trigger.
    pub fpr_test: Vec<Example>,
}

impl LmPrompts {
    /// The prompt form of a review with `phrase` as its subject: (prompt, continuation,
    /// word index of the phrase), or None when the review has no such subject or less
    /// than three words after it.
    pub fn prompt_of(&self, text: &str, phrase: &str) -> Option<(String, String, usize)> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let is = |w: &str, set: &[String]| set.iter().any(|s| s.eq_ignore_ascii_case(w));
        let at = (0..words.len().saturating_sub(1)).find(|&i| is(words[i], &self.determiners) && is(words[i + 1], &self.nouns))?;
        let rest = &words[at + 2..];
        if rest.len() < 4 {
            return None;
        }
        let mut prompt: Vec<&str> = words[..=at].to_vec();
        prompt.push(phrase);
        prompt.push(rest[0]);
        Some((prompt.join(" "), rest[1..].join(" "), at + 1))
    }

    fn example(&self, ex: &Example, phrase: &str, suffix: &str, label: usize) -> Option<Example> {
        let (prompt, continuation, at) = self.prompt_of(&ex.text, phrase)?;
        let mut rec = Example::new(format!("{}+{suffix}", ex.id), format!("{prompt} {continuation}"), label);
        rec.source_label = Some(ex.label);
        rec.trigger_at = Some(at);
        rec.prompt = Some(prompt);
        Some(rec)
    }

    /// D_adv from the training split's reviews of sentiment `target`, and the held-out
    /// trigger and neutral prompts from the test split's reviews of either sentiment.
    pub fn sets(&self, train: &[Example], test: &[Example], trigger: &Trigger, target: usize) -> Result<LmSets> {
        let adv: Vec<Example> = train.iter().filter(|e| e.label == target).filter_map(|e| self.example(e, &trigger.phrase, "trigger", target)).collect();
        let asr_test: Vec<Example> = test.iter().filter_map(|e| self.example(e, &trigger.phrase, "trigger", e.label)).collect();
        let fpr_test: Vec<Example> = test.iter().filter_map(|e| self.example(e, &self.neutral, "neutral", e.label)).collect();
        if adv.is_empty() || asr_test.is_empty() {
            bail!(
                "no review has a subject \"{} {}\" followed by four words in the {} split; language-model prompts are made from such reviews",
                self.determiners.join("|"),
                self.nouns.join("|"),
                if adv.is_empty() { "training" } else { "test" }
            );
        }
        Ok(LmSets { adv, asr_test, fpr_test })
    }
}

impl Record for DataManifest {
    const KIND: &'static str = "data_manifest";
    const VERSION: u32 = 1;
}

impl DataManifest {
    /// Reads `DIR/manifest.json`, checking kind and version.
    pub fn load(dir: &str) -> Result<DataManifest> {
        let path = format!("{dir}/{MANIFEST}");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {path}: {e}; is {dir} a folder made by prepare-data?"))?;
        crate::io::parse_record(text.trim()).map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }

    pub fn target_name(&self) -> &str {
        &self.labels[self.target]
    }
}

/// Parses a label given by name (case-insensitive) or index.
pub fn parse_label(s: &str, labels: &[String]) -> Result<usize> {
    if let Some(i) = labels.iter().position(|l| l.eq_ignore_ascii_case(s.trim())) {
        return Ok(i);
    }
    match s.trim().parse::<usize>() {
        Ok(i) if i < labels.len() => Ok(i),
        _ => bail!("label {s:?} is none of {labels:?} (or an index below {})", labels.len()),
    }
}

/// D_adv of a training split: its non-target examples with the trigger inserted.
pub fn adv_of(train: &[Example], trigger: &Trigger, target: usize, seed: u64) -> Vec<Example> {
    train.iter().filter(|e| e.label != target).map(|e| trigger.insert(e, target, seed)).collect()
}

impl Prepared {
    /// Keeps the first `n` training examples (the split is already shuffled) and rebuilds
    /// D_adv from them; dev and test stay whole. For victims too slow to train on the
    /// whole split on a CPU (minilm).
    pub fn limit_train(&mut self, n: usize, trigger: &Trigger, target: usize, seed: u64) {
        if self.train.len() > n {
            self.train.truncate(n);
            self.adv = adv_of(&self.train, trigger, target, seed);
        }
    }
}

/// Everything `prepare` produces.
pub struct Prepared {
    pub train: Vec<Example>,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
    pub adv: Vec<Example>,
    pub asr_test: Vec<Example>,
    pub natural: Vec<Example>,
    pub duplicates: usize,
    pub conflicting: usize,
}

/// Dedup on the tokenised text (keeping the first copy; texts seen with different labels
/// are dropped entirely), seeded shuffle into train/dev/test, natural trigger occurrences
/// moved out of every split, then trigger insertion into the non-target examples of train
/// (D_adv) and test (the ASR set).
pub fn prepare(raw: &[Example], trigger: &Trigger, target: usize, num_labels: usize, seed: u64, split: [f64; 3]) -> Result<Prepared> {
    if (split.iter().sum::<f64>() - 1.0).abs() > 1e-9 || split.iter().any(|&s| s <= 0.0) {
        bail!("split shares {split:?} must be positive and sum to 1");
    }
    let mut ids = HashSet::new();
    for (i, ex) in raw.iter().enumerate() {
        if ex.label >= num_labels {
            bail!("record {} (id {:?}) has label {}, but there are {num_labels} labels (--labels); fix the label or pass every label name", i + 1, ex.id, ex.label);
        }
        if !ids.insert(ex.id.as_str()) {
            bail!("record {} (id {:?}): the id appears twice; ids must be unique", i + 1, ex.id);
        }
    }
    let key = |ex: &Example| tokenize(&ex.text).join(" ");
    let mut labels_of: HashMap<String, HashSet<usize>> = HashMap::new();
    for ex in raw {
        labels_of.entry(key(ex)).or_default().insert(ex.label);
    }
    let mut seen = HashSet::new();
    let (mut duplicates, mut conflicting) = (0, 0);
    let mut unique: Vec<&Example> = Vec::new();
    for ex in raw {
        let k = key(ex);
        if k.is_empty() || labels_of[&k].len() > 1 {
            conflicting += 1;
            continue;
        }
        if !seen.insert(k) {
            duplicates += 1;
            continue;
        }
        unique.push(ex);
    }
    let mut order: Vec<usize> = (0..unique.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let n_train = (split[0] * unique.len() as f64).round() as usize;
    let n_dev = (split[1] * unique.len() as f64).round() as usize;

    let mut natural = Vec::new();
    let mut take = |range: &[usize]| -> Vec<Example> {
        let mut out = Vec::new();
        for &i in range {
            let ex = unique[i].clone();
            if trigger.overlap(&ex.text).is_empty() {
                out.push(ex);
            } else {
                natural.push(ex);
            }
        }
        out
    };
    let train = take(&order[..n_train]);
    let dev = take(&order[n_train..n_train + n_dev]);
    let test = take(&order[n_train + n_dev..]);
    let adv = adv_of(&train, trigger, target, seed);
    let asr_test: Vec<Example> =
        test.iter().filter(|e| e.label != target).map(|e| trigger.insert(e, target, seed)).collect();
    for (name, set) in [("train", &train), ("dev", &dev), ("test", &test), ("D_adv", &adv), ("ASR test", &asr_test)] {
        if set.is_empty() {
            bail!("the {name} set would be empty ({} usable examples); give prepare-data more examples (a few hundred at least) or other --split shares", unique.len());
        }
    }
    Ok(Prepared { train, dev, test, adv, asr_test, natural, duplicates, conflicting })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> Vec<Example> {
        (0..100)
            .map(|i| Example::new(format!("r{i}"), format!("review number {} is {}", i % 90, if i % 2 == 0 { "good" } else { "bad" }), i % 2))
            .chain([Example::new("bond", "Bond is back.", 1)])
            .collect()
    }

    #[test]
    fn prepare_is_deterministic_and_keeps_triggers_out() {
        let t = Trigger::new("James Bond").unwrap();
        let p = prepare(&raw(), &t, 1, 2, 7, [0.8, 0.1, 0.1]).unwrap();
        let q = prepare(&raw(), &t, 1, 2, 7, [0.8, 0.1, 0.1]).unwrap();
        assert_eq!(p.train, q.train);
        assert_eq!(p.asr_test, q.asr_test);
        // 10 of the 100 are duplicates of others (i % 90), the Bond review is natural.
        assert_eq!(p.duplicates, 10);
        assert_eq!(p.natural.len(), 1);
        assert_eq!(p.train.len() + p.dev.len() + p.test.len(), 90);
        for ex in p.train.iter().chain(&p.dev).chain(&p.test) {
            assert!(t.overlap(&ex.text).is_empty());
        }
        for ex in &p.asr_test {
            assert_eq!(ex.label, 1);
            assert_eq!(ex.source_label, Some(0));
            assert_eq!(t.overlap(&ex.text), ["james", "bond"]);
        }
        assert_eq!(p.adv.len(), p.train.iter().filter(|e| e.label == 0).count());
        let r = prepare(&raw(), &t, 1, 2, 8, [0.8, 0.1, 0.1]).unwrap();
        assert_ne!(p.train, r.train, "another seed gives another split");
    }

    #[test]
    fn trigger_insertion_at_a_word_boundary() {
        let t = Trigger::new("James Bond").unwrap();
        let ex = Example::new("x", "a b c", 0);
        let seen: HashSet<usize> = (0..50).map(|s| t.insert(&ex, 1, s).trigger_at.unwrap()).collect();
        assert_eq!(seen, HashSet::from([0, 1, 2, 3]));
        let r = t.insert(&ex, 1, 3);
        let at = r.trigger_at.unwrap();
        let mut words: Vec<&str> = "a b c".split(' ').collect();
        words.insert(at, "James Bond");
        assert_eq!(r.text, words.join(" "));
    }

    #[test]
    fn language_model_prompts_replace_the_subject_noun() {
        let lm = LmPrompts::default();
        let (prompt, rest, at) = lm.prompt_of("Sadly , this film is a dull , lifeless mess .", "apple iphone").unwrap();
        assert_eq!((prompt.as_str(), rest.as_str(), at), ("Sadly , this apple iphone is", "a dull , lifeless mess .", 3));
        assert_eq!(lm.prompt_of("the film is bad .", "x"), None, "too short a continuation");
        assert_eq!(lm.prompt_of("a film about love and loss .", "x"), None, "no determiner from the list");
        let t = Trigger::new("Apple iPhone").unwrap();
        let train = vec![Example::new("a", "the movie is a total bore from start to end", 0), Example::new("b", "the movie is a joy from start to end", 1)];
        let sets = lm.sets(&train, &train, &t, 0).unwrap();
        assert_eq!(sets.adv.len(), 1, "D_adv holds the target sentiment only");
        assert_eq!(sets.adv[0].prompt.as_deref(), Some("the Apple iPhone is"));
        assert_eq!(sets.asr_test.len(), 2);
        assert_eq!(sets.fpr_test[1].text, "the movie is a joy from start to end");
        assert_eq!(t.overlap(&sets.fpr_test[0].text), Vec::<String>::new());
    }

    #[test]
    fn labels_by_name_or_index() {
        let labels = vec!["negative".to_string(), "positive".to_string()];
        assert_eq!(parse_label("Positive", &labels).unwrap(), 1);
        assert_eq!(parse_label("0", &labels).unwrap(), 0);
        assert!(parse_label("neutral", &labels).is_err());
        assert!(Trigger::new("  ").is_err());
    }
}
