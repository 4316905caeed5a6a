//! Retraining for evaluation (finetune-eval): clean and poisoned victims for every seed,
//! each poisoned victim paired with its clean twin, clean figures cached across runs, every
//! victim still to train trained side by side (`train::train_all`: each victim's bits
//! depend on its own inputs only, so a cached twin is the twin).

use crate::victims::origin::Origin;
use crate::eval::{self, EvalSets, Metrics};
use crate::victims::model::VictimConfig;
use crate::train::{self, TrainData, TrainOptions};
use crate::encode::Encoded;
use anyhow::Result;
use tch::Device;

/// How a poisoned victim is paired with its clean twin of the same seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pairing {
    /// Common random numbers: it trains exactly like the twin (same initialisation, same
    /// clean batches in the same order) and each poison joins one of those batches.
    Crn,
    /// Poisons shuffled in with the clean data, so the two victims' batches are unrelated
    /// (the evaluation before common random numbers; kept to measure what pairing buys).
    Independent,
}

impl Pairing {
    /// The name `eval_report` records.
    pub fn name(self) -> &'static str {
        match self {
            Pairing::Crn => "crn",
            Pairing::Independent => "independent",
        }
    }
}

/// A folder of clean-victim figures keyed by everything that decides the clean victim's
/// bits (data, start, config, options, trainer, device and the CPU code paths of
/// `numerics::key`): evaluations of several poison sets on the same data then train each
/// clean victim once, and a cached twin is bit for bit the one training would give.
pub struct CleanCache<'a> {
    pub dir: &'a str,
    /// The data files' hashes (the manifest's `files`), as JSON.
    pub data_files: serde_json::Value,
    /// The hash of the embeddings or pretrained weights the victims start from.
    pub base_sha256: &'a str,
    /// What the cached figures measure when it is not the data folder's evaluation sets
    /// (select-carriers measures ASR on the attacker's D_adv): part of the key, so a cache
    /// never hands one stage's figures to another.
    pub measures: Option<String>,
}

impl CleanCache<'_> {
    fn path(&self, config: &VictimConfig, opts: &TrainOptions, device: Device) -> Result<String> {
        let mut k = serde_json::json!({"files": self.data_files, "embeddings": self.base_sha256, "victim": config, "training": opts,
            "trainer": train::TRAINER_VERSION, "device": format!("{device:?}"), "numerics": crate::numerics::key()});
        if let Some(m) = &self.measures {
            k["measures"] = serde_json::Value::String(m.clone());
        }
        Ok(format!("{}/clean-{}.json", self.dir, crate::io::sha256_hex(serde_json::to_string(&k)?.as_bytes())))
    }
}

/// Everything that decides how victims are retrained.
pub struct Retraining<'a> {
    pub origin: &'a Origin,
    pub config: &'a VictimConfig,
    pub device: Device,
    /// The clean training examples.
    pub clean: &'a [Encoded],
    pub eval_sets: &'a EvalSets,
    /// Training options for a seed.
    pub options: &'a dyn Fn(u64) -> TrainOptions,
    pub seeds: &'a [u64],
    pub pairing: Pairing,
    /// Threads that train victims side by side, one victim each at a time.
    pub workers: usize,
    pub clean_cache: Option<CleanCache<'a>>,
    /// Measure every victim after every epoch too (early stopping's curve); false: after
    /// the last epoch only (`Measured::epochs` is then empty).
    pub measure_epochs: bool,
}

/// A victim's figures after training and after every epoch, and its
/// `params::fingerprint`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    #[serde(rename = "final")]
    pub last: Metrics,
    pub epochs: Vec<Metrics>,
    pub fingerprint: String,
}

/// Figures per seed: the clean twins', and each poison set's (`poisoned[set][seed]`).
pub struct Retrained {
    pub clean: Vec<Measured>,
    pub poisoned: Vec<Vec<Measured>>,
    /// Clean twins read from the cache instead of trained.
    pub clean_from_cache: usize,
}

/// Trains and measures the clean victim of every seed (unless cached) and a poisoned
/// victim per seed and poison set, an empty set included (it trains its twin's batches, so
/// it reads exactly zero); `log` takes progress lines (the binary prefixes its name).
/// `clean_removed[k]` (when given) marks the clean examples a filter removed before
/// poison set k's victims train (`TrainData::clean_removed`; crn pairing only).
pub fn retrain(r: &Retraining, poison_sets: &[Vec<Encoded>], clean_removed: &[Option<Vec<bool>>], log: &(dyn Fn(String) + Sync)) -> Result<Retrained> {
    if r.pairing == Pairing::Independent && clean_removed.iter().any(|m| m.is_some()) {
        anyhow::bail!("filtered training sets (--kept) pair with the unfiltered clean twin by common random numbers: use --pairing crn");
    }
    let seeds = r.seeds;
    // With independent pairing the poisons are appended to the clean examples and
    // shuffled with them.
    let joined: Vec<Vec<Encoded>> = poison_sets
        .iter()
        .map(|enc| match r.pairing {
            Pairing::Independent => r.clean.iter().chain(enc).cloned().collect(),
            Pairing::Crn => enc.clone(),
        })
        .collect();
    let cache_path = |seed: u64| -> Result<Option<String>> { r.clean_cache.as_ref().map(|c| c.path(r.config, &(r.options)(seed), r.device)).transpose() };
    let mut clean_m: Vec<Option<Measured>> = Vec::new();
    let mut clean_from_cache = 0;
    for &seed in seeds {
        // A file that does not parse (an older cache without per-epoch figures) is retrained.
        let cached = cache_path(seed)?.and_then(|k| std::fs::read_to_string(&k).ok()).and_then(|t| serde_json::from_str::<Measured>(&t).ok());
        if cached.is_some() {
            clean_from_cache += 1;
            log(format!("seed {seed} clean: from the cache"));
        }
        clean_m.push(cached);
    }
    // (seed index, poison set index or None for clean) of every victim to train.
    let mut jobs: Vec<(usize, Option<usize>)> = (0..seeds.len()).filter(|&i| clean_m[i].is_none()).map(|i| (i, None)).collect();
    // A set equal to an earlier one (same examples, same filter) trains the same victims bit
    // for bit: it is trained once and its figures copied (a carrier selection that keeps
    // the set's own carriers gives such a set).
    let removed = |k: usize| clean_removed.get(k).and_then(|m| m.as_deref());
    let same_as: Vec<usize> = (0..joined.len()).map(|k| (0..k).find(|&j| poison_sets[j] == poison_sets[k] && removed(j) == removed(k)).unwrap_or(k)).collect();
    for k in 0..joined.len() {
        if same_as[k] == k {
            jobs.extend((0..seeds.len()).map(|i| (i, Some(k))));
        } else {
            log(format!("poison set {} equals set {}: its victims are that set's", k + 1, same_as[k] + 1));
        }
    }
    let mut victims = Vec::with_capacity(jobs.len());
    for &(i, _) in &jobs {
        tch::manual_seed(seeds[i] as i64);
        victims.push(r.origin.new_victim(r.config.clone(), r.device)?);
    }
    let data_of: Vec<TrainData> = jobs
        .iter()
        .map(|&(_, k)| match (k, r.pairing) {
            (None, _) => TrainData::clean(r.clean),
            (Some(k), Pairing::Crn) => TrainData { clean_removed: clean_removed.get(k).and_then(|m| m.as_deref()), ..TrainData::poisoned(r.clean, &joined[k]) },
            (Some(k), Pairing::Independent) => TrainData::clean(&joined[k]),
        })
        .collect();
    let opts: Vec<_> = jobs.iter().map(|&(i, _)| (r.options)(seeds[i])).collect();
    log(format!("training {} victims ({} seeds, {} poison sets) on {} threads", jobs.len(), seeds.len(), poison_sets.len(), r.workers.min(jobs.len().max(1))));
    let epochs = opts.first().map_or(0, |o| o.epochs);
    let start = std::time::Instant::now();
    // Every victim measured after every epoch (early stopping's curve), by the thread
    // training it.
    let per_epoch: std::sync::Mutex<Vec<Vec<Metrics>>> = std::sync::Mutex::new(vec![Vec::new(); jobs.len()]);
    let observe = |victim: usize, _epoch: usize, params: &crate::victims::model::Params| {
        let m = eval::measure_with(r.config, params, r.eval_sets);
        per_epoch.lock().unwrap_or_else(|e| e.into_inner())[victim].push(m);
    };
    let mut done = 0;
    train::train_all(&mut victims, &data_of, &opts, r.workers, |_, epoch, _| {
        if epoch == epochs {
            done += 1;
            log(format!("trained {done}/{} victims {:.0}s", jobs.len(), start.elapsed().as_secs_f64()));
        }
    }, if r.measure_epochs { Some(&observe) } else { None })?;
    let per_epoch = per_epoch.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut poisoned_m: Vec<Vec<Option<Measured>>> = vec![vec![None; seeds.len()]; poison_sets.len()];
    for ((&(i, k), v), epochs) in jobs.iter().zip(&victims).zip(per_epoch) {
        // The observer's measurement after the last epoch is the trained victim's.
        let last = match epochs.last() {
            Some(m) => *m,
            None => eval::measure(v, r.eval_sets),
        };
        let m = Measured { last, epochs, fingerprint: crate::victims::params::fingerprint(&v.params()) };
        match k {
            Some(k) => poisoned_m[k][i] = Some(m),
            None => {
                if let Some(key) = cache_path(seeds[i])? {
                    crate::io::write_bytes(&key, serde_json::to_string(&m)?.as_bytes())?;
                }
                clean_m[i] = Some(m);
            }
        }
    }
    for (k, &j) in same_as.iter().enumerate() {
        if j != k {
            poisoned_m[k] = poisoned_m[j].clone();
        }
    }
    Ok(Retrained {
        clean: clean_m.into_iter().map(|m| m.expect("every clean victim trained or cached")).collect(),
        poisoned: poisoned_m.into_iter().map(|set| set.into_iter().map(|m| m.expect("every poisoned victim trained")).collect()).collect(),
        clean_from_cache,
    })
}

/// One poison set to evaluate: its path, records and sha256 (None for "no poisons").
pub struct PoisonSet {
    pub path: Option<String>,
    pub records: Vec<crate::formats::records::Example>,
    pub sha256: Option<String>,
}

impl PoisonSet {
    /// The poison sets of `paths` (each `-` or a file), or one empty set without any.
    pub fn load_all(paths: &[String]) -> Result<Vec<PoisonSet>> {
        let mut sets = Vec::new();
        for p in paths {
            let bytes = crate::io::read_all(p)?;
            let records = crate::io::read_jsonl_from(&bytes[..], &crate::io::display_name(p), true)?;
            sets.push(PoisonSet { path: Some(p.clone()), records, sha256: Some(crate::io::sha256_hex(&bytes)) });
        }
        if sets.is_empty() {
            sets.push(PoisonSet { path: None, records: Vec::new(), sha256: None });
        }
        Ok(sets)
    }
}

/// The per-seed rows of every poison set from a retraining (`sets[k]` trained as
/// `retrained.poisoned[k]`): each poisoned victim beside its clean twin; without a poison
/// file (`path` None: finetune-eval without --poisons) the clean victims themselves.
/// `log(what, seed, metrics)` reports each victim.
pub fn seed_rows(retrained: &Retrained, seeds: &[u64], sets: &[PoisonSet], log: &dyn Fn(&str, u64, &Metrics)) -> Vec<Vec<eval::SeedRow>> {
    let mut rows = vec![Vec::new(); sets.len()];
    for (i, &seed) in seeds.iter().enumerate() {
        let clean = &retrained.clean[i];
        log("clean", seed, &clean.last);
        for (k, set) in sets.iter().enumerate() {
            let (poisoned, fingerprints) = match &set.path {
                Some(path) => {
                    let poisoned = &retrained.poisoned[k][i];
                    log(&format!("poisoned ({path})"), seed, &poisoned.last);
                    (poisoned, Some(eval::Fingerprints { poisoned: poisoned.fingerprint.clone(), clean: clean.fingerprint.clone() }))
                }
                None => (clean, None),
            };
            let epochs = if poisoned.epochs.len() == clean.epochs.len() {
                poisoned.epochs.iter().zip(&clean.epochs).enumerate().map(|(e, (p, c))| eval::EpochRow { epoch: e + 1, poisoned: *p, clean: Some(*c) }).collect()
            } else {
                Vec::new()
            };
            rows[k].push(eval::SeedRow { seed, poisoned: poisoned.last, clean: Some(clean.last), epochs, fingerprints });
        }
    }
    rows
}

/// Given victims (`--checkpoint`) measured as they are, one row each (seed from their
/// metadata): their common config, vocabulary and rows. They must share one config.
pub fn checkpoint_rows(paths: &[String], data_dir: &str, manifest: &crate::data::DataManifest, device: Device, log: &dyn Fn(&str, u64, &Metrics)) -> Result<(VictimConfig, crate::tokenizer::Vocab, Vec<eval::SeedRow>)> {
    use anyhow::{bail, Context};
    let mut first: Option<(VictimConfig, crate::tokenizer::Vocab)> = None;
    let mut rows = Vec::new();
    for path in paths {
        let crate::victims::model::VictimFile { victim, vocab, metadata, .. } = crate::victims::model::Victim::load(path, device)?;
        crate::tasks::rules::CLASSIFICATION.check_victim(&victim.config, path).context("--checkpoint measures classifiers on classifier data (a language model is evaluated on prepare-data --lm data with --start, a translation model on prepare-data --mt data)")?;
        vocab.trigger_words(&manifest.trigger.phrase).with_context(|| format!("{path}: victim vocabulary"))?;
        let eval_sets = EvalSets::load(data_dir, manifest, &vocab, victim.config.max_len)?;
        let seed = crate::train::TrainingRecord::from_metadata(&metadata).with_context(|| path.clone())?.seed.unwrap_or(0);
        let m = eval::measure(&victim, &eval_sets);
        log(&format!("checkpoint {path}"), seed, &m);
        rows.push(eval::SeedRow { seed, poisoned: m, clean: None, epochs: Vec::new(), fingerprints: None });
        match &first {
            None => first = Some((victim.config.clone(), vocab)),
            Some((c, _)) if *c != victim.config => {
                bail!("{path}: a {:?} victim, but the first checkpoint is {:?}; evaluate one victim configuration per report", victim.config, c)
            }
            Some(_) => {}
        }
    }
    let (config, vocab) = first.context("no checkpoints")?;
    Ok((config, vocab, rows))
}
