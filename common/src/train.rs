//! Encoding examples into token ids, batching, and the training loop shared by every
//! victim (train-victim, finetune-eval, and later the attack's checkpoints).

use crate::model::{forward_ids, Victim};
use crate::loss::{Target, Targets};
use crate::records::Example;
use crate::tokenizer::{Vocab, PAD_ID, UNK_ID};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

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

    /// The same tokens with the target a victim of `config` trains on: the class for a
    /// classifier, the tokens themselves for a language model.
    pub fn for_victim(self, config: &crate::model::VictimConfig) -> Encoded {
        match (config.language_model(), self.target) {
            (true, Target::Class(_)) => Encoded::text(self.ids),
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

/// `encode_all` for a victim of `config`: a classifier's examples keep their classes, a
/// language model's are text (`Encoded::for_victim`; a record's `prompt` keeps its
/// continuation-only target), and labels are not checked against an LM's classes.
pub fn encode_for(config: &crate::model::VictimConfig, examples: &[Example], vocab: &Vocab, policy: TextPolicy, source: &str) -> Result<Vec<Encoded>> {
    let classes = if config.language_model() { usize::MAX } else { config.num_classes };
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
/// first (the order they are trained in comes from `aligned_schedules`); then every joined
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

/// Length blocks of an epoch (see `aligned_schedules`).
pub const LENGTH_BLOCKS: usize = 32;

/// The step order of several victims' batches in one epoch (each list sorted by length),
/// so that victims trained together (`train_many`) see batches of similar length at the
/// same step and little padding. Each victim's batches fall into `LENGTH_BLOCKS` blocks
/// by length quantile and are shuffled within each block by the victim's own generator;
/// the blocks are visited in one random order drawn from `epoch_seed`. Within a block the
/// victims with fewer batches idle (`None`) at its end. So the sequence of batches a
/// victim trains on depends only on its own data, seed and the epoch, never on the
/// victims trained with it.
pub fn aligned_schedules(counts: &[usize], epoch_seed: u64, rngs: &mut [ChaCha8Rng]) -> Vec<Vec<Option<usize>>> {
    let mut order: Vec<usize> = (0..LENGTH_BLOCKS).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(epoch_seed));
    let blocks: Vec<Vec<Vec<usize>>> = counts
        .iter()
        .zip(rngs.iter_mut())
        .map(|(&n, rng)| {
            let mut b = vec![Vec::new(); LENGTH_BLOCKS];
            for r in 0..n {
                b[r * LENGTH_BLOCKS / n].push(r);
            }
            for block in &mut b {
                block.shuffle(rng);
            }
            b
        })
        .collect();
    let mut out = vec![Vec::new(); counts.len()];
    for &k in &order {
        let steps = blocks.iter().map(|b| b[k].len()).max().unwrap_or(0);
        for (i, b) in blocks.iter().enumerate() {
            out[i].extend((0..steps).map(|s| b[k].get(s).copied()));
        }
    }
    out
}

/// Changes whenever training would give other victims for the same options (batch
/// order, optimiser): cached clean-victim figures are keyed by it.
pub const TRAINER_VERSION: &str = "stacked-adam-length-blocks-v1";

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

pub use crate::loss::cross_entropy;

/// Trains with Adam; `on_epoch(epoch, mean_loss)` is called after each epoch. A NaN or
/// infinite loss stops training with an error naming the epoch and step.
pub fn train(victim: &mut Victim, data: TrainData, opts: &TrainOptions, mut on_epoch: impl FnMut(usize, f64)) -> Result<()> {
    train_many(std::slice::from_mut(victim), &[data], std::slice::from_ref(opts), |e, losses| on_epoch(e, losses[0]))
}

const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

/// Trains several victims of one configuration at once, each on its own data with its own
/// seed (batch order) and learning rate: their parameters are stacked into [C, ...]
/// tensors and every step runs one forward/backward pass for all of them (see
/// `model::forward`). A small BiLSTM step is mostly per-operation overhead, so C victims
/// cost far less than C times one. The summed loss keeps the victims' gradients apart and
/// Adam is elementwise, so each victim follows its own Adam trajectory; a victim whose
/// data runs out of batches early is held still. `on_epoch(epoch, mean losses)`.
pub fn train_many(victims: &mut [Victim], data: &[TrainData], opts: &[TrainOptions], on_epoch: impl FnMut(usize, &[f64])) -> Result<()> {
    train_stack(victims, data, opts, on_epoch, None, 0)
}

/// Looks at victims between epochs: `observe(victim, epoch, params)` is called after every
/// epoch for every victim trained, with that victim's parameters (unstacked; the frozen
/// ones shared), from the thread training it. finetune-eval measures each epoch with it
/// (early stopping), detect-poisons records every example's loss (training dynamics).
pub type Observer<'a> = &'a (dyn Fn(usize, usize, &crate::model::Params) + Sync);

/// The parameters of victim `i` of a stack (its slice of every stacked tensor; the
/// shared frozen tensors as they are).
pub fn unstack(stacked: &crate::model::Params, stacked_names: &[String], i: usize) -> crate::model::Params {
    stacked
        .iter()
        .map(|(n, t)| (n.clone(), if stacked_names.contains(n) { t.get(i as i64) } else { t.shallow_clone() }))
        .collect()
}

/// `train_many` with an observer; `offset` is the index the observer is given for the
/// stack's first victim.
fn train_stack(victims: &mut [Victim], data: &[TrainData], opts: &[TrainOptions], mut on_epoch: impl FnMut(usize, &[f64]), observe: Option<Observer>, offset: usize) -> Result<()> {
    let c = victims.len();
    if c == 0 {
        return Ok(());
    }
    assert!(data.len() == c && opts.len() == c, "one data set and one option set per victim");
    if let Some(i) = data.iter().position(|d| d.clean.is_empty()) {
        bail!("no clean training examples for victim {} (poisons join the clean examples' batches)", i + 1);
    }
    let config = victims[0].config.clone();
    if victims.iter().any(|v| v.config != config) || opts.iter().any(|o| o.epochs != opts[0].epochs) {
        bail!("victims trained together must share one configuration and epoch count");
    }
    let device = victims[0].device();
    let epochs = opts[0].epochs;
    // Every victim's batches for every epoch, drawn from its own seeded generator.
    let mut rngs: Vec<ChaCha8Rng> = opts.iter().map(|o| ChaCha8Rng::seed_from_u64(o.seed)).collect();
    let first = victims[0].params();
    let names = crate::params::trainable_names(&first);
    let frozen: Vec<String> = first.keys().filter(|k| !first[*k].requires_grad()).cloned().collect();
    let mut params: crate::model::Params = crate::model::Params::new();
    for name in &frozen {
        // Frozen tensors (the embedding table) are the same for every victim: shared.
        params.insert(name.clone(), first[name].detach());
    }
    let stack_of = |name: &str| Tensor::stack(&victims.iter().map(|v| v.params()[name].detach()).collect::<Vec<_>>(), 0);
    let mut leaves: Vec<Tensor> = names.iter().map(|n| stack_of(n).set_requires_grad(true)).collect();
    let mut m: Vec<Tensor> = leaves.iter().map(|t| t.zeros_like()).collect();
    let mut v: Vec<Tensor> = leaves.iter().map(|t| t.zeros_like()).collect();
    let mut steps_done = vec![0i32; c];
    let lr = Tensor::from_slice(&opts.iter().map(|o| o.lr).collect::<Vec<_>>()).to_device(device);
    let kind = first[&names[0]].kind();
    for epoch in 1..=epochs {
        let sorted: Vec<Vec<Vec<usize>>> =
            (0..c).map(|i| epoch_batches(data[i], opts[i].batch_size, &mut rngs[i], opts[i].seed, epoch)).collect();
        let counts: Vec<usize> = sorted.iter().map(|b| b.len()).collect();
        let schedules = aligned_schedules(&counts, crate::data::seed_for(0, &format!("batch-order-epoch{epoch}")), &mut rngs);
        let steps = schedules[0].len();
        let (mut loss_sums, mut seen) = (vec![0.0; c], vec![0usize; c]);
        for step in 0..steps {
            let batch_of = |i: usize| -> &[usize] { schedules[i][step].map_or(&[][..], |r| &sorted[i][r][..]) };
            // The weighted mean over each batch (all weights 1: the plain mean); a victim
            // whose batch weighs nothing (none this step, or all removed) is held still.
            let totals: Vec<f64> = (0..c).map(|i| batch_of(i).iter().map(|&j| data[i].get(j).1).sum()).collect();
            let active: Vec<bool> = (0..c).map(|i| schedules[i][step].is_some() && totals[i] > 0.0).collect();
            let rows = (0..c).map(|i| batch_of(i).len()).max().unwrap_or(1).max(1);
            let time = (0..c).flat_map(|i| batch_of(i).iter().map(move |&j| data[i].get(j).0.ids.len())).max().unwrap_or(1);
            // Rows beyond a victim's batch hold one real token with weight 0 (an all-padding
            // row would divide by zero in the bag-of-words mean).
            let mut ids = vec![PAD_ID; c * rows * time];
            let mut targets: Vec<Option<Target>> = vec![None; c * rows];
            let mut weights = vec![0f64; c * rows];
            for i in 0..c {
                let batch = batch_of(i);
                let total = totals[i].max(f64::MIN_POSITIVE);
                for r in 0..rows {
                    let at = (i * rows + r) * time;
                    match batch.get(r) {
                        Some(&j) => {
                            let (e, w) = data[i].get(j);
                            ids[at..at + e.ids.len()].copy_from_slice(&e.ids);
                            targets[i * rows + r] = Some(e.target);
                            weights[i * rows + r] = w / total;
                        }
                        None => ids[at] = UNK_ID,
                    }
                }
            }
            let shape = [c as i64, rows as i64, time as i64];
            let targets = Targets::batch(&targets, &ids, &[c as i64, rows as i64], time, device);
            let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
            let weights = Tensor::from_slice(&weights).view([c as i64, rows as i64]).to_kind(kind).to_device(device);
            for (n, leaf) in names.iter().zip(&leaves) {
                params.insert(n.clone(), leaf.shallow_clone());
            }
            let logits = forward_ids(&config, &params, &ids); // [C, rows, classes]
            let nll = targets.example_nll(&logits);
            let per_victim = (nll * &weights).sum_dim_intlist(-1, false, None::<Kind>); // [C]
            let losses: Vec<f64> = Vec::try_from(per_victim.detach().to_kind(Kind::Double).to_device(Device::Cpu)).expect("f64 losses");
            for i in (0..c).filter(|&i| active[i]) {
                if !losses[i].is_finite() {
                    bail!("training loss is {} for victim {} at epoch {epoch} step {}; lower the learning rate (--lr)", losses[i], i + 1, step + 1);
                }
                loss_sums[i] += losses[i] * batch_of(i).len() as f64;
                seen[i] += batch_of(i).len();
                steps_done[i] += 1;
            }
            let grads = Tensor::run_backward(&[&per_victim.sum(None::<Kind>)], &leaves.iter().collect::<Vec<_>>(), false, false);
            // Adam (the PyTorch defaults), per victim: bias corrections use each victim's own
            // step count; inactive victims keep their parameters and moments.
            let on: Vec<f64> = active.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect();
            let on = Tensor::from_slice(&on).to_device(device).to_kind(kind);
            let bc1 = Tensor::from_slice(&steps_done.iter().map(|&t| 1.0 - ADAM_BETA1.powi(t.max(1))).collect::<Vec<_>>()).to_device(device);
            let bc2 = Tensor::from_slice(&steps_done.iter().map(|&t| 1.0 - ADAM_BETA2.powi(t.max(1))).collect::<Vec<_>>()).to_device(device);
            let step_size = (&lr / &bc1).to_kind(kind) * &on;
            let bc2_sqrt = bc2.sqrt().to_kind(kind);
            tch::no_grad(|| {
                for k in 0..leaves.len() {
                    let g = &grads[k];
                    let view: Vec<i64> = std::iter::once(c as i64).chain(std::iter::repeat_n(1, g.dim() - 1)).collect();
                    let on_k = on.view(view.as_slice());
                    let keep = 1.0 - &on_k;
                    m[k] = &on_k * (&m[k] * ADAM_BETA1 + g * (1.0 - ADAM_BETA1)) + &keep * &m[k];
                    v[k] = &on_k * (&v[k] * ADAM_BETA2 + g * g * (1.0 - ADAM_BETA2)) + &keep * &v[k];
                    let denom = v[k].sqrt() / bc2_sqrt.view(view.as_slice()) + ADAM_EPS;
                    let update = &m[k] / denom * step_size.view(view.as_slice());
                    let _ = leaves[k].f_sub_(&update).expect("in-place Adam step");
                }
            });
        }
        let means: Vec<f64> = loss_sums.iter().zip(&seen).map(|(s, n)| s / (*n).max(1) as f64).collect();
        on_epoch(epoch, &means);
        if let Some(observe) = observe {
            tch::no_grad(|| {
                for (n, leaf) in names.iter().zip(&leaves) {
                    params.insert(n.clone(), leaf.detach());
                }
                for i in 0..c {
                    observe(offset + i, epoch, &unstack(&params, &names, i));
                }
            });
        }
    }
    // Write the trained slices back into each victim's variables.
    tch::no_grad(|| {
        for (i, victim) in victims.iter_mut().enumerate() {
            let mut vars = victim.params();
            for (n, leaf) in names.iter().zip(&leaves) {
                vars.get_mut(n).expect("same parameter names").copy_(&leaf.get(i as i64));
            }
        }
    });
    Ok(())
}

/// `train_many` on `workers` threads, each training a stack of about C / workers victims
/// with one libtorch thread: the small BiLSTM steps are bound by per-operation overhead,
/// which one process's intra-op threads do not share but separate threads do (2 cores:
/// two stacks of 6 train 12 victims faster than one stack of 12 on two intra-op threads).
/// Each victim runs the same computation whatever the grouping (only floating-point
/// summation order can differ). `on_epoch` reports the first group.
pub fn train_parallel(
    victims: &mut [Victim],
    data: &[TrainData],
    opts: &[TrainOptions],
    workers: usize,
    on_epoch: impl FnMut(usize, &[f64]) + Send,
    observe: Option<Observer>,
    first: usize,
) -> Result<()> {
    let workers = workers.clamp(1, victims.len().max(1));
    if workers == 1 {
        return train_stack(victims, data, opts, on_epoch, observe, first);
    }
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let per = victims.len().div_ceil(workers);
    let mut on_epoch = Some(on_epoch);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = victims
            .chunks_mut(per)
            .zip(data.chunks(per))
            .zip(opts.chunks(per))
            .enumerate()
            .map(|(k, ((v, d), o))| {
                let mut report = on_epoch.take();
                scope.spawn(move || {
                    let on_epoch = |e, l: &[f64]| {
                        if let Some(f) = report.as_mut() {
                            f(e, l)
                        }
                    };
                    train_stack(v, d, o, on_epoch, observe, first + k * per)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a training thread panicked")).collect()
    });
    tch::set_num_threads(threads);
    results.into_iter().collect()
}

/// `train_parallel` over successive waves of at most `workers × max_stack` victims, so
/// that at most `max_stack` victims share a stack: a stack's activations grow with its
/// size (11 stacked MiniLM victims per thread held 22 GB), and a compute-bound victim
/// gains nothing from stacking. `on_epoch(wave, epoch, losses)`; `observe` sees every
/// victim (by its index in `victims`) after every epoch.
pub fn train_in_waves(
    victims: &mut [Victim],
    data: &[TrainData],
    opts: &[TrainOptions],
    workers: usize,
    max_stack: usize,
    mut on_epoch: impl FnMut(usize, usize, &[f64]) + Send,
    observe: Option<Observer>,
) -> Result<()> {
    let wave = workers.max(1).saturating_mul(max_stack.max(1));
    for (w, ((v, d), o)) in victims.chunks_mut(wave).zip(data.chunks(wave)).zip(opts.chunks(wave)).enumerate() {
        train_parallel(v, d, o, workers, |e, l| on_epoch(w, e, l), observe, w * wave)?;
    }
    Ok(())
}

/// Predicted class of every example, in batches, without building a graph.
pub fn predict(victim: &Victim, data: &[Encoded], batch_size: usize) -> Vec<usize> {
    predict_with(&victim.config, &victim.params(), data, batch_size)
}

/// `predict` under a parameter set of a victim of `config` (one victim, unstacked).
pub fn predict_with(config: &crate::model::VictimConfig, params: &crate::model::Params, data: &[Encoded], batch_size: usize) -> Vec<usize> {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(data.len());
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let (ids, _) = batch_tensors(&items, device);
            let pred = forward_ids(config, params, &ids).argmax(-1, false).to_device(Device::Cpu);
            out.extend(Vec::<i64>::try_from(&pred).expect("i64 predictions").into_iter().map(|p| p as usize));
        }
        out
    })
}

/// Percentage of examples whose prediction equals their label.
pub fn accuracy(victim: &Victim, data: &[Encoded]) -> f64 {
    if victim.config.language_model() {
        return next_token_accuracy(&victim.config, &victim.params(), data, 64);
    }
    let preds = predict(victim, data, 256);
    100.0 * preds.iter().zip(data).filter(|(p, e)| e.target.class() == Some(**p as i64)).count() as f64 / data.len().max(1) as f64
}

/// A language model's accuracy: the percentage of counted next-token positions whose most
/// likely token is the one that follows.
pub fn next_token_accuracy(config: &crate::model::VictimConfig, params: &crate::model::Params, data: &[Encoded], batch_size: usize) -> f64 {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let (mut right, mut counted) = (0.0, 0.0);
    tch::no_grad(|| {
        for chunk in data.chunks(batch_size.max(1)) {
            let (ids, targets) = batch_tensors(&chunk.iter().collect::<Vec<_>>(), device);
            let Targets::NextToken { ids: next, mask } = targets else { panic!("next-token accuracy of class targets") };
            let pred = forward_ids(config, params, &ids).argmax(-1, false);
            right += (pred.eq_tensor(&next).to_kind(Kind::Double) * &mask).sum(Kind::Double).double_value(&[]);
            counted += mask.sum(Kind::Double).double_value(&[]);
        }
    });
    100.0 * right / counted.max(1.0)
}


#[cfg(test)]
pub(crate) mod tests {
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

    #[test]
    fn aligned_schedules_give_every_batch_once_whatever_the_stack() {
        let rngs = |seeds: &[u64]| seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect::<Vec<_>>();
        let s = aligned_schedules(&[100, 70, 100], 5, &mut rngs(&[1, 2, 3]));
        for (n, sched) in [100usize, 70, 100].iter().zip(&s) {
            assert_eq!(sched.len(), s[0].len(), "one step count for the stack");
            let mut got: Vec<usize> = sched.iter().flatten().copied().collect();
            got.sort_unstable();
            assert_eq!(got, (0..*n).collect::<Vec<_>>(), "each batch exactly once");
        }
        let alone = aligned_schedules(&[70], 5, &mut rngs(&[2]));
        let mine = |x: &Vec<Option<usize>>| x.iter().flatten().copied().collect::<Vec<_>>();
        assert_eq!(mine(&alone[0]), mine(&s[1]), "a victim's order does not depend on the stack");
        assert_ne!(mine(&alone[0]), (0..70).collect::<Vec<_>>(), "the order is shuffled");
        // At every step where both are active, the two length ranks are in the same block.
        for (a, b) in s[0].iter().zip(&s[1]) {
            if let (Some(a), Some(b)) = (a, b) {
                assert_eq!(a * LENGTH_BLOCKS / 100, b * LENGTH_BLOCKS / 70);
            }
        }
    }

    /// Poisons for the toy task: a few examples of other lengths and labels.
    pub(crate) fn poisons() -> Vec<Encoded> {
        vec![Encoded::class(vec![5, 5, 2, 6, 7], 1), Encoded::class(vec![3], 0), Encoded::class(vec![4, 2, 4, 2, 4, 2, 4], 1)]
    }

    #[test]
    fn removed_clean_examples_leave_no_trace() {
        let (data, table) = toy();
        let config = crate::model::tiny_config(crate::model::Arch::Bow, 8, 6, 8, 2, false, 16);
        let removed: Vec<bool> = (0..data.len()).map(|i| i % 7 == 0).collect();
        // The removed examples with their labels flipped: if they counted, training would differ.
        let mut garbled = data.clone();
        for (e, r) in garbled.iter_mut().zip(&removed) {
            if *r {
                *e = Encoded::class(e.ids.clone(), 1 - e.target.class().unwrap());
            }
        }
        let opts = TrainOptions { epochs: 2, batch_size: 16, lr: 1e-2, seed: 4 };
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
                let schedule = aligned_schedules(&[batches.len()], 3, &mut [rng]);
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
