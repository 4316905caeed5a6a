//! The training loop shared by every victim (train-victim, finetune-eval, the detectors'
//! and the defenses' victims): which examples make each batch and in which order, Adam,
//! victims side by side on worker threads, prediction, and what a victim file records
//! about its training. Examples arrive encoded (`encode`).

use crate::encode::{batch_tensors, Encoded};
use crate::victims::model::{logits, Pass, Victim};
use crate::victims::loss::Targets;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// One victim's training data. The `clean` examples alone decide the batches: their
/// shuffle, batch composition and order are exactly those of a victim trained on `clean`
/// only with the same seed (its clean twin). Each `joined` example (a poison) joins one of
/// those batches per epoch, drawn by a generator of its own (`joined_batch`), so a
/// poisoned victim differs from its clean twin only by the poisons, and two poison sets
/// differ only where their poisons differ: paired differences use common random numbers.
#[derive(Debug, Clone, Copy)]
pub struct TrainData<'a> {
    pub clean: &'a [Encoded],
    pub joined: &'a [Encoded],
    /// Loss weight of a joined example relative to a clean one (1: the same). A batch's
    /// loss is the weighted mean over its examples, so joined examples of weight 0 leave
    /// training exactly as on `clean` alone.
    pub joined_weight: f64,
    /// Clean examples a filter removed (weight 0; None: none). They keep their place in
    /// the batches, so a filtered victim still pairs with its unfiltered clean twin: the
    /// two differ only by the removed examples and the poisons. A step whose batch is all
    /// removed is skipped (the victim held still), as if that batch were gone.
    pub clean_removed: Option<&'a [bool]>,
}

impl<'a> TrainData<'a> {
    /// Clean examples only.
    pub fn clean(clean: &'a [Encoded]) -> Self {
        TrainData { clean, joined: &[], joined_weight: 1.0, clean_removed: None }
    }

    /// Clean examples with poisons that join their batches at full weight.
    pub fn poisoned(clean: &'a [Encoded], joined: &'a [Encoded]) -> Self {
        TrainData { clean, joined, joined_weight: 1.0, clean_removed: None }
    }

    pub fn len(&self) -> usize {
        self.clean.len() + self.joined.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i` of the joint numbering (clean first, then joined) and its loss weight.
    pub fn get(&self, i: usize) -> (&'a Encoded, f64) {
        match i.checked_sub(self.clean.len()) {
            None if self.clean_removed.is_some_and(|r| r[i]) => (&self.clean[i], 0.0),
            None => (&self.clean[i], 1.0),
            Some(j) => (&self.joined[j], self.joined_weight),
        }
    }
}

/// Batches of indices for one epoch: the clean examples shuffled, then sorted by length
/// within pools of 50 batches (less padding, the LSTM runs fewer steps), returned shortest
/// first (the order they are trained in comes from `batch_order`); then every joined
/// example (index `clean.len() + j`) added to the batch `joined_batch` draws for it. Only
/// the clean examples consume `rng`, and the batches are ordered by their clean examples,
/// so the clean part of every batch and the batch order equal the clean twin's.
pub fn epoch_batches(data: TrainData, batch_size: usize, rng: &mut ChaCha8Rng, seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    let clean = data.clean;
    let mut order: Vec<usize> = (0..clean.len()).collect();
    order.shuffle(rng);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| clean[i].ids.len());
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    let longest = |b: &Vec<usize>| b.iter().map(|&i| clean[i].ids.len()).max().unwrap_or(0);
    batches.sort_by_key(longest); // stable: ties keep their shuffled order
    let lengths: Vec<usize> = batches.iter().map(longest).collect();
    for (j, e) in data.joined.iter().enumerate() {
        if let Some(b) = joined_batch(&lengths, e.ids.len(), seed, epoch, j) {
            batches[b].push(clean.len() + j);
        }
    }
    batches
}

/// The batch joined example `j` joins in `epoch`, given the batches' longest clean
/// lengths in ascending order: a uniform draw among the batches nearest its own length
/// (a window of one length block, `LENGTH_BLOCKS`), so it adds little padding, from a
/// generator seeded by (training seed, epoch, j) alone. Which batch a poison joins thus
/// depends on its length and index only, never on the other poisons. None without batches.
pub fn joined_batch(lengths: &[usize], len: usize, seed: u64, epoch: usize, j: usize) -> Option<usize> {
    let n = lengths.len();
    if n == 0 {
        return None;
    }
    let window = n.div_ceil(LENGTH_BLOCKS).max(1);
    let at = lengths.partition_point(|&l| l < len).min(n - 1);
    let lo = at.saturating_sub(window / 2).min(n - window);
    let mut rng = ChaCha8Rng::seed_from_u64(crate::data::seed_for(seed, &format!("joined-{j}-epoch{epoch}")));
    Some(lo + rng.gen_range(0..window))
}

/// The window `joined_batch` draws a joined example's batch from: one of this many
/// blocks of an epoch's batches by length.
pub const LENGTH_BLOCKS: usize = 32;

/// The order one victim trains its epoch's batches in (indices into `epoch_batches`,
/// which returns them by length): a shuffle by the victim's own generator.
pub fn batch_order(batches: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batches).collect();
    order.shuffle(rng);
    order
}

/// Changes whenever training would give other victims for the same options (batch
/// order, optimiser, the arithmetic's grouping): cached clean-victim figures are keyed by
/// it (with `numerics::key()`, what decides the bits on this machine).
pub const TRAINER_VERSION: &str = "per-victim-adam-v2";

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
    /// The learning rate's course over the steps (constant unless set; then absent from
    /// JSON, so records of constant-rate training read as before).
    #[serde(default, skip_serializing_if = "Schedule::is_constant")]
    pub schedule: Schedule,
    /// Dropout and label smoothing (none unless set; then absent from JSON, as the schedule).
    #[serde(default, skip_serializing_if = "Regularisation::is_none")]
    pub regularisation: Regularisation,
}

/// What keeps a victim trained from scratch on little data from memorising it (the usual
/// recipe of low-resource translation): dropout inside the network, whose masks come from
/// the victim's own seed (`victims::layers::Dropout`), and label smoothing, which trains
/// on the target mixed with the uniform distribution over the outputs. Training only:
/// unrolling, verification and evaluation read the network without either.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Regularisation {
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub label_smoothing: f64,
}

impl Regularisation {
    pub fn is_none(&self) -> bool {
        *self == Regularisation::default()
    }
}

/// How the learning rate moves over a training run: a linear warm-up from 0 over the
/// first `warmup` steps, then, with `decay`, a linear fall to 0 at the last step (the
/// usual recipe for a transformer trained from scratch: Adam's early steps on an
/// untrained model are the ones that diverge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub warmup: usize,
    pub decay: bool,
}

impl Schedule {
    pub fn is_constant(&self) -> bool {
        *self == Schedule::default()
    }

    /// The learning rate's multiplier at step `step` (1-based) of `total`.
    pub fn factor(&self, step: usize, total: usize) -> f64 {
        let warm = if self.warmup > 0 { (step as f64 / self.warmup as f64).min(1.0) } else { 1.0 };
        let decay = if self.decay { (1.0 - (step - 1) as f64 / total.max(1) as f64).max(0.0) } else { 1.0 };
        warm * decay
    }
}

pub use crate::victims::loss::cross_entropy;

/// What `train-victim` records in a victim file about how the victim was trained (its
/// metadata besides the config and vocabulary; FORMATS.md). Every field is optional: a
/// file written by other code, or before a field existed, lacks it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingRecord {
    pub seed: Option<u64>,
    /// Accuracy on --dev, percent.
    pub dev_accuracy: Option<f64>,
    /// sha256 of the training files' bytes, in the order read (--train, then --poisons).
    pub train_sha256: Option<String>,
    /// Training examples, poisons included, and poisons.
    pub train_examples: Option<usize>,
    pub poisons: Option<usize>,
    pub training: Option<TrainOptions>,
    /// `params::fingerprint` of the trained parameters and `numerics::key` of the code paths.
    pub fingerprint: Option<String>,
    pub numerics: Option<String>,
    /// Where it started: the embedding table file or the pretrained encoder folder.
    pub embeddings: Option<String>,
    pub pretrained: Option<String>,
}

impl TrainingRecord {
    /// As victim-file metadata entries (absent fields are left out).
    pub fn to_metadata(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("seed", self.seed.map(|s| s.to_string()));
        put("dev_accuracy", self.dev_accuracy.map(|a| format!("{a:.4}")));
        put("train_sha256", self.train_sha256.clone());
        put("train_examples", self.train_examples.map(|n| n.to_string()));
        put("poisons", self.poisons.map(|n| n.to_string()));
        put("training", self.training.as_ref().map(serde_json::to_string).transpose()?);
        put("fingerprint", self.fingerprint.clone());
        put("numerics", self.numerics.clone());
        put("embeddings", self.embeddings.clone());
        put("pretrained", self.pretrained.clone());
        Ok(m)
    }

    /// From a victim file's metadata; a present entry that does not parse is an error
    /// naming it.
    pub fn from_metadata(m: &std::collections::BTreeMap<String, String>) -> Result<TrainingRecord> {
        use anyhow::Context;
        fn parse<T: std::str::FromStr>(m: &std::collections::BTreeMap<String, String>, key: &str) -> Result<Option<T>>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            m.get(key).map(|v| v.parse::<T>().with_context(|| format!("metadata {key:?} = {v:?}"))).transpose()
        }
        Ok(TrainingRecord {
            seed: parse(m, "seed")?,
            dev_accuracy: parse(m, "dev_accuracy")?,
            train_sha256: m.get("train_sha256").cloned(),
            train_examples: parse(m, "train_examples")?,
            poisons: parse(m, "poisons")?,
            training: m.get("training").map(|v| serde_json::from_str(v).with_context(|| format!("metadata \"training\" = {v:?}"))).transpose()?,
            fingerprint: m.get("fingerprint").cloned(),
            numerics: m.get("numerics").cloned(),
            embeddings: m.get("embeddings").cloned(),
            pretrained: m.get("pretrained").cloned(),
        })
    }
}

/// Trains one victim with Adam; `on_epoch(epoch, mean_loss)` is called after each epoch.
/// A NaN or infinite loss stops training with an error naming the epoch and step. The
/// victim trains on one libtorch thread of its own (`train_all`), so its parameters are
/// the same bits whatever the caller's thread settings.
pub fn train(victim: &mut Victim, data: TrainData, opts: &TrainOptions, mut on_epoch: impl FnMut(usize, f64) + Send) -> Result<()> {
    train_all(std::slice::from_mut(victim), &[data], std::slice::from_ref(opts), 1, |_, e, loss| on_epoch(e, loss), None)
}

const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// Looks at victims between epochs: `observe(victim, epoch, params)` is called after every
/// epoch for every victim trained, with that victim's parameters, from the thread
/// training it. finetune-eval measures each epoch with it (early stopping), detect-poisons
/// records every example's loss (training dynamics).
pub type Observer<'a> = &'a (dyn Fn(usize, usize, &crate::victims::model::Params) + Sync);

/// Trains every victim, each on its own data with its own options, on `workers` threads
/// that take the next untrained victim until none is left.
///
/// **A victim's bits depend on its own inputs only** (initial weights, data, poisons,
/// options, and the machine's arithmetic, `numerics`): each victim runs its own batches
/// at their own shapes on a thread with one libtorch thread, so neither the other victims,
/// nor `workers`, nor which thread takes it, nor the thread settings of the caller change
/// one bit. (Victims used to train stacked into [C, ...] tensors, padded to the stack's
/// longest row, on as many libtorch threads as there were cores: faster per victim on a
/// small BiLSTM, but every float then depended on the neighbours and the thread count;
/// `make bench` measures both.)
///
/// `on_epoch(victim, epoch, mean loss)` and `observe` are called from the training threads.
pub fn train_all(
    victims: &mut [Victim],
    data: &[TrainData],
    opts: &[TrainOptions],
    workers: usize,
    on_epoch: impl FnMut(usize, usize, f64) + Send,
    observe: Option<Observer>,
) -> Result<()> {
    assert!(data.len() == victims.len() && opts.len() == victims.len(), "one data set and one option set per victim");
    if let Some(i) = data.iter().position(|d| d.clean.is_empty()) {
        bail!("no clean training examples for victim {} (poisons join the clean examples' batches)", i + 1);
    }
    let workers = workers.clamp(1, victims.len().max(1));
    let queue: std::sync::Mutex<Vec<(usize, &mut Victim)>> = std::sync::Mutex::new(victims.iter_mut().enumerate().rev().collect());
    let on_epoch = std::sync::Mutex::new(on_epoch);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (queue, on_epoch, failed) = (&queue, &on_epoch, &failed);
                scope.spawn(move || -> Result<()> {
                    crate::numerics::one_thread_here();
                    loop {
                        if failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return Ok(());
                        }
                        let Some((i, victim)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return Ok(()) };
                        let report = |epoch: usize, loss: f64, params: &crate::victims::model::Params| {
                            (on_epoch.lock().unwrap_or_else(|e| e.into_inner()))(i, epoch, loss);
                            if let Some(observe) = observe {
                                tch::no_grad(|| observe(i, epoch, params));
                            }
                        };
                        if let Err(e) = train_one(victim, data[i], &opts[i], report) {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(if data.len() == 1 { e } else { e.context(format!("victim {} of {}", i + 1, data.len())) });
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a training thread panicked")).collect()
    });
    results.into_iter().collect()
}

/// One victim's whole training on the calling thread: per epoch its batches
/// (`epoch_batches`) in its own order (`batch_order`), each padded to its own longest
/// row, a weighted-mean loss, and Adam (the PyTorch defaults). A step whose batch weighs
/// nothing (all removed) is skipped. `after_epoch(epoch, mean loss, params)`.
fn train_one(victim: &mut Victim, data: TrainData, opts: &TrainOptions, mut after_epoch: impl FnMut(usize, f64, &crate::victims::model::Params)) -> Result<()> {
    let config = victim.config.clone();
    let device = victim.device();
    let params = victim.params();
    let names = crate::victims::params::trainable_names(&params);
    let mut leaves: Vec<Tensor> = names.iter().map(|n| params[n].shallow_clone()).collect();
    let mut m: Vec<Tensor> = leaves.iter().map(|t| t.zeros_like()).collect();
    let mut v: Vec<Tensor> = leaves.iter().map(|t| t.zeros_like()).collect();
    let kind = leaves.first().map_or(Kind::Float, |t| t.kind());
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let reg = opts.regularisation;
    if reg.dropout > 0.0 && !config.arch().has_dropout() {
        bail!("--dropout {}: the {:?} victim has no dropout (the seq2seq has); leave it out", reg.dropout, config.arch.name());
    }
    if !(0.0..1.0).contains(&reg.dropout) || !(0.0..1.0).contains(&reg.label_smoothing) {
        bail!("dropout {} and label smoothing {} must each lie in [0, 1)", reg.dropout, reg.label_smoothing);
    }
    let mut dropout = (reg.dropout > 0.0).then(|| crate::victims::layers::Dropout::new(reg.dropout, opts.seed));
    let mut steps_done = 0i32;
    // The schedule's length: the first epoch's steps times the epochs (an epoch's batch
    // count is its clean examples' and does not change).
    let mut total_steps = 0usize;
    for epoch in 1..=opts.epochs {
        let batches = epoch_batches(data, opts.batch_size, &mut rng, opts.seed, epoch);
        if epoch == 1 {
            total_steps = batches.len() * opts.epochs;
        }
        let order = batch_order(batches.len(), &mut rng);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for (step, &b) in order.iter().enumerate() {
            let batch = &batches[b];
            // The weighted mean over the batch (all weights 1: the plain mean).
            let items: Vec<(&Encoded, f64)> = batch.iter().map(|&j| data.get(j)).collect();
            let total: f64 = items.iter().map(|(_, w)| w).sum();
            if total <= 0.0 {
                continue;
            }
            let encoded: Vec<&Encoded> = items.iter().map(|(e, _)| *e).collect();
            let (ids, targets) = batch_tensors(&encoded, device);
            let weights: Vec<f64> = items.iter().map(|(_, w)| w / total).collect();
            let weights = Tensor::from_slice(&weights).to_kind(kind).to_device(device);
            let logits = match dropout.as_mut() {
                Some(d) => config.arch().forward_dropout(&params, &crate::victims::model::embed(&params, &ids), &crate::victims::model::mask_of(&ids, &params), d),
                None => crate::victims::model::logits(&config, &params, &ids, crate::victims::model::Pass::Once),
            };
            let per_example = match opts.regularisation.label_smoothing {
                0.0 => targets.example_nll(&logits),
                eps => targets.example_smoothed_nll(&logits, eps),
            };
            let loss = (per_example * &weights).sum(None::<Kind>);
            let value = loss.double_value(&[]);
            if !value.is_finite() {
                bail!("training loss is {value} at epoch {epoch} step {}; lower the learning rate (--lr)", step + 1);
            }
            loss_sum += value * batch.len() as f64;
            seen += batch.len();
            let grads = Tensor::run_backward(&[&loss], &leaves.iter().collect::<Vec<_>>(), false, false);
            steps_done += 1;
            // A constant rate multiplies by nothing: its bits are those of the trainer before schedules.
            let lr = if opts.schedule.is_constant() { opts.lr } else { opts.lr * opts.schedule.factor(steps_done as usize, total_steps) };
            let step_size = lr / (1.0 - ADAM_BETA1.powi(steps_done));
            let bc2_sqrt = (1.0 - ADAM_BETA2.powi(steps_done)).sqrt();
            tch::no_grad(|| {
                for k in 0..leaves.len() {
                    let g = &grads[k];
                    m[k] = &m[k] * ADAM_BETA1 + g * (1.0 - ADAM_BETA1);
                    v[k] = &v[k] * ADAM_BETA2 + g * g * (1.0 - ADAM_BETA2);
                    let denom = v[k].sqrt() / bc2_sqrt + ADAM_EPS;
                    let update = &m[k] / denom * step_size;
                    let _ = leaves[k].f_sub_(&update).expect("in-place Adam step");
                }
            });
        }
        after_epoch(epoch, loss_sum / seen.max(1) as f64, &params);
    }
    Ok(())
}

/// Predicted class of every example, in batches, without building a graph.
pub fn predict(victim: &Victim, data: &[Encoded], batch_size: usize) -> Vec<usize> {
    predict_with(&victim.config, &victim.params(), data, batch_size)
}

/// `predict` under a parameter set of a victim of `config` (one victim, unstacked).
pub fn predict_with(config: &crate::victims::model::VictimConfig, params: &crate::victims::model::Params, data: &[Encoded], batch_size: usize) -> Vec<usize> {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(data.len());
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let (ids, _) = batch_tensors(&items, device);
            let pred = logits(config, params, &ids, Pass::Twice).argmax(-1, false).to_device(Device::Cpu);
            out.extend(Vec::<i64>::try_from(&pred).expect("i64 predictions").into_iter().map(|p| p as usize));
        }
        out
    })
}

/// Percentage of examples whose prediction equals their label.
pub fn accuracy(victim: &Victim, data: &[Encoded]) -> f64 {
    if victim.config.output().over_vocab() {
        return next_token_accuracy(&victim.config, &victim.params(), data, 64);
    }
    let preds = predict(victim, data, 256);
    100.0 * preds.iter().zip(data).filter(|(p, e)| e.target.class() == Some(**p as i64)).count() as f64 / data.len().max(1) as f64
}

/// A language model's accuracy: the percentage of counted next-token positions whose most
/// likely token is the one that follows.
pub fn next_token_accuracy(config: &crate::victims::model::VictimConfig, params: &crate::victims::model::Params, data: &[Encoded], batch_size: usize) -> f64 {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let (mut right, mut counted) = (0.0, 0.0);
    tch::no_grad(|| {
        for chunk in data.chunks(batch_size.max(1)) {
            let (ids, targets) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
            let Targets::NextToken { ids: next, mask } = targets else { panic!("next-token accuracy of class targets") };
            let pred = logits(config, params, &ids, Pass::Twice).argmax(-1, false);
            right += (pred.eq_tensor(&next).to_kind(Kind::Double) * &mask).sum(Kind::Double).double_value(&[]);
            counted += mask.sum(Kind::Double).double_value(&[]);
        }
    });
    100.0 * right / counted.max(1.0)
}


#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn the_schedule_warms_up_then_falls_to_zero_and_constant_is_one() {
        let s = super::Schedule { warmup: 4, decay: true };
        let f: Vec<f64> = (1..=10).map(|t| s.factor(t, 10)).collect();
        assert_eq!(f[0], 0.25, "step 1 of a 4-step warm-up");
        assert!((f[3] - 0.7).abs() < 1e-12, "step 4: warm, and decayed by 3 of 10 steps: {}", f[3]);
        assert!((f[9] - 0.1).abs() < 1e-12 && f.windows(2).skip(3).all(|w| w[1] < w[0]), "falls linearly after the warm-up: {f:?}");
        let c = super::Schedule::default();
        assert!(c.is_constant() && (1..=10).all(|t| c.factor(t, 10) == 1.0));
        assert_eq!(super::Schedule { warmup: 0, decay: true }.factor(1, 10), 1.0);
    }

    use super::*;
    /// A toy task (token 2 means positive, token 3 negative; 4..8 are noise) and a random
    /// table of 8 words of width 6; the conformance suite trains on it too.
    pub(crate) fn toy() -> (Vec<Encoded>, Tensor) {
        let mut data = Vec::new();
        for i in 0..200i64 {
            let label = i % 2;
            let mut ids = vec![4 + (i % 4), 2 + (1 - label), 4 + ((i / 3) % 4)];
            ids.rotate_left((i % 3) as usize);
            data.push(Encoded::class(ids, label));
        }
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        (data, Tensor::randn([8, 6], (Kind::Float, Device::Cpu)))
    }

    /// Poisons for the toy task: a few examples of other lengths and labels.
    pub(crate) fn poisons() -> Vec<Encoded> {
        vec![Encoded::class(vec![5, 5, 2, 6, 7], 1), Encoded::class(vec![3], 0), Encoded::class(vec![4, 2, 4, 2, 4, 2, 4], 1)]
    }

    #[test]
    fn dropout_is_refused_by_a_victim_without_it() {
        let (data, table) = toy();
        let config = crate::victims::model::tiny_config(crate::victims::model::Arch::Bow, 8, 6, 8, 2, false, 16);
        let mut v = Victim::new(config, &table, Device::Cpu).unwrap();
        let opts = TrainOptions { epochs: 1, batch_size: 16, lr: 1e-2, seed: 4, schedule: Default::default(), regularisation: Regularisation { dropout: 0.1, label_smoothing: 0.0 } };
        let err = train(&mut v, TrainData::clean(&data), &opts, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("--dropout") && err.contains("no dropout"), "{err}");
    }

    #[test]
    fn removed_clean_examples_leave_no_trace() {
        let (data, table) = toy();
        let config = crate::victims::model::tiny_config(crate::victims::model::Arch::Bow, 8, 6, 8, 2, false, 16);
        let removed: Vec<bool> = (0..data.len()).map(|i| i % 7 == 0).collect();
        // The removed examples with their labels flipped: if they counted, training would differ.
        let mut garbled = data.clone();
        for (e, r) in garbled.iter_mut().zip(&removed) {
            if *r {
                *e = Encoded::class(e.ids.clone(), 1 - e.target.class().unwrap());
            }
        }
        let opts = TrainOptions { epochs: 2, batch_size: 16, lr: 1e-2, seed: 4, schedule: Default::default(), regularisation: Default::default() };
        let trained = |d: &[Encoded], removed: Option<&[bool]>| {
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(2);
            let mut v = Victim::new(config.clone(), &table, Device::Cpu).unwrap();
            drop(_guard);
            train(&mut v, TrainData { clean_removed: removed, ..TrainData::clean(d) }, &opts, |_, _| {}).unwrap();
            v.params()["out.weight"].copy()
        };
        let a = trained(&data, Some(&removed));
        let b = trained(&garbled, Some(&removed));
        assert!(a.allclose(&b, 1e-6, 1e-7, false), "removed examples changed training");
        let c = trained(&garbled, None);
        assert!(!a.allclose(&c, 1e-6, 1e-7, false), "the flipped labels do matter when kept");
        // Every example of the set removed: nothing moves.
        let all = vec![true; data.len()];
        let start = {
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(2);
            Victim::new(config.clone(), &table, Device::Cpu).unwrap().params()["out.weight"].copy()
        };
        assert!(trained(&data, Some(&all)).allclose(&start, 0.0, 0.0, false), "a fully removed set trains nothing");
    }

    #[test]
    fn a_poison_changes_only_the_batches_it_joins() {
        let (data, _) = toy();
        let joined = poisons();
        for epoch in 1..=3 {
            let plan = |d: TrainData| {
                let mut rng = ChaCha8Rng::seed_from_u64(9);
                let batches = epoch_batches(d, 16, &mut rng, 9, epoch);
                let schedule = batch_order(batches.len(), &mut rng);
                (batches, schedule)
            };
            let (clean_batches, clean_schedule) = plan(TrainData::clean(&data));
            for k in 0..=joined.len() {
                let (batches, schedule) = plan(TrainData::poisoned(&data, &joined[..k]));
                assert_eq!(schedule, clean_schedule, "the batch order is the clean twin's");
                assert_eq!(batches.len(), clean_batches.len(), "poisons join batches, they make none");
                let mut changed = 0;
                for (b, c) in batches.iter().zip(&clean_batches) {
                    assert_eq!(&b[..c.len()], &c[..], "the clean part of every batch is the twin's");
                    changed += (b.len() > c.len()) as usize;
                    assert!(b[c.len()..].iter().all(|&i| i >= data.len()), "only poisons are added");
                }
                let mut added: Vec<usize> = batches.iter().flat_map(|b| b.iter().copied().filter(|&i| i >= data.len())).collect();
                added.sort_unstable();
                assert_eq!(added, (data.len()..data.len() + k).collect::<Vec<_>>(), "every poison joins exactly one batch");
                assert!(changed <= k);
                // A poison's batch does not depend on the other poisons.
                for j in 0..k {
                    let at = |bs: &Vec<Vec<usize>>| bs.iter().position(|b| b.contains(&(data.len() + j)));
                    let (all, _) = plan(TrainData::poisoned(&data, &joined));
                    assert_eq!(at(&batches), at(&all), "poison {j} joins the same batch whatever follows it");
                }
            }
        }
        // Similar length: a poison lands among the batches nearest its own length.
        let lengths: Vec<usize> = (0..64).map(|i| 1 + i / 2).collect();
        for j in 0..50 {
            let b = joined_batch(&lengths, 20, 1, 1, j).unwrap();
            assert!(lengths[b].abs_diff(20) <= 1, "batch {b} of length {} for a poison of 20", lengths[b]);
        }
        let draws: std::collections::HashSet<usize> = (0..50).map(|j| joined_batch(&lengths, 20, 1, 1, j).unwrap()).collect();
        assert!(draws.len() > 1, "the draw is random within the window");
    }
}
