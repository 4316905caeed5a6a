//! Encoding examples into token ids, batching, and the training loop shared by every
//! victim (train-victim, finetune-eval, and later the attack's checkpoints).

use crate::model::{forward_ids, Victim};
use crate::records::Example;
use crate::tokenizer::{Vocab, PAD_ID};
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{nn::OptimizerConfig, Device, Kind, Tensor};

/// An example as token ids (truncated to the victim's `max_len`).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub label: i64,
}

/// Encodes examples; `source` names the file in errors. A text without tokens or with a
/// label the victim cannot predict is an error naming the record.
pub fn encode_all(examples: &[Example], vocab: &Vocab, max_len: usize, num_classes: usize, source: &str) -> Result<Vec<Encoded>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, ex)| {
            if ex.label >= num_classes {
                bail!("{source}: record {} (id {:?}): label {} but the victim has {num_classes} classes", i + 1, ex.id, ex.label);
            }
            let mut ids = match &ex.tokens {
                Some(toks) => toks
                    .iter()
                    .map(|t| {
                        vocab.id(t).ok_or_else(|| {
                            anyhow::anyhow!("{source}: record {} (id {:?}): token {t:?} is not in the vocabulary", i + 1, ex.id)
                        })
                    })
                    .collect::<Result<Vec<i64>>>()?,
                None => vocab.encode(&ex.text),
            };
            if ids.is_empty() {
                bail!("{source}: record {} (id {:?}): the text holds no tokens", i + 1, ex.id);
            }
            ids.truncate(max_len);
            Ok(Encoded { ids, label: ex.label as i64 })
        })
        .collect()
}

/// Pads a batch to its longest row: ids [batch, time] and labels [batch].
pub fn batch_tensors(items: &[&Encoded], device: Device) -> (Tensor, Tensor) {
    let t = items.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut flat = vec![PAD_ID; items.len() * t];
    for (r, e) in items.iter().enumerate() {
        flat[r * t..r * t + e.ids.len()].copy_from_slice(&e.ids);
    }
    let ids = Tensor::from_slice(&flat).view([items.len() as i64, t as i64]).to_device(device);
    let labels: Vec<i64> = items.iter().map(|e| e.label).collect();
    (ids, Tensor::from_slice(&labels).to_device(device))
}

/// Batches of indices for one epoch: shuffled, then sorted by length within pools of
/// 50 batches (less padding, the LSTM runs fewer steps), then the batches shuffled.
pub fn epoch_batches(data: &[Encoded], batch_size: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(rng);
    let mut batches = Vec::new();
    for pool in order.chunks(batch_size * 50) {
        let mut pool = pool.to_vec();
        pool.sort_by_key(|&i| data[i].ids.len());
        batches.extend(pool.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(rng);
    batches
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainOptions {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Mean cross-entropy (computed in the logits' dtype, so f64 stays f64).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Tensor {
    logits.log_softmax(-1, None::<Kind>).nll_loss(labels)
}

/// Trains with Adam; `on_epoch(epoch, mean_loss)` is called after each epoch. A NaN or
/// infinite loss stops training with an error naming the epoch and step.
pub fn train(victim: &mut Victim, data: &[Encoded], opts: &TrainOptions, mut on_epoch: impl FnMut(usize, f64)) -> Result<()> {
    if data.is_empty() {
        bail!("no training examples");
    }
    let mut opt = tch::nn::Adam::default().build(&victim.vs, opts.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let device = victim.device();
    for epoch in 1..=opts.epochs {
        let (mut sum, mut count) = (0.0, 0usize);
        for (step, batch) in epoch_batches(data, opts.batch_size, &mut rng).iter().enumerate() {
            let items: Vec<&Encoded> = batch.iter().map(|&i| &data[i]).collect();
            let (ids, labels) = batch_tensors(&items, device);
            let loss = cross_entropy(&forward_ids(&victim.config, &victim.params(), &ids), &labels);
            let l = loss.double_value(&[]);
            if !l.is_finite() {
                bail!("training loss is {l} at epoch {epoch} step {}; lower the learning rate (--lr)", step + 1);
            }
            opt.backward_step(&loss);
            sum += l * items.len() as f64;
            count += items.len();
        }
        on_epoch(epoch, sum / count as f64);
    }
    Ok(())
}

/// Predicted class of every example, in batches, without building a graph.
pub fn predict(victim: &Victim, data: &[Encoded], batch_size: usize) -> Vec<usize> {
    let params = victim.params();
    tch::no_grad(|| {
        let mut out = Vec::with_capacity(data.len());
        for chunk in data.chunks(batch_size.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let (ids, _) = batch_tensors(&items, victim.device());
            let pred = forward_ids(&victim.config, &params, &ids).argmax(-1, false).to_device(Device::Cpu);
            out.extend(Vec::<i64>::try_from(&pred).expect("i64 predictions").into_iter().map(|p| p as usize));
        }
        out
    })
}

/// Percentage of examples whose prediction equals their label.
pub fn accuracy(victim: &Victim, data: &[Encoded]) -> f64 {
    let preds = predict(victim, data, 256);
    100.0 * preds.iter().zip(data).filter(|(p, e)| **p as i64 == e.label).count() as f64 / data.len().max(1) as f64
}

/// Percentage of examples predicted as `class`.
pub fn share_predicted(victim: &Victim, data: &[Encoded], class: usize) -> f64 {
    let preds = predict(victim, data, 256);
    100.0 * preds.iter().filter(|&&p| p == class).count() as f64 / data.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Arch, VictimConfig};

    fn toy() -> (Vec<Encoded>, Tensor) {
        // Token 2 means positive, token 3 negative; 4..8 are noise.
        let mut data = Vec::new();
        for i in 0..200i64 {
            let label = i % 2;
            let mut ids = vec![4 + (i % 4), 2 + (1 - label), 4 + ((i / 3) % 4)];
            ids.rotate_left((i % 3) as usize);
            data.push(Encoded { ids, label });
        }
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(1);
        (data, Tensor::randn([8, 6], (Kind::Float, Device::Cpu)))
    }

    #[test]
    fn both_victims_learn_a_toy_task_deterministically() {
        for arch in [Arch::Bow, Arch::Lstm] {
            let (data, table) = toy();
            let config = VictimConfig { arch, vocab_size: 8, embed_dim: 6, hidden: 8, num_classes: 2, train_embeddings: false, max_len: 8 };
            let opts = TrainOptions { epochs: 30, batch_size: 16, lr: 0.02, seed: 3 };
            let run = || {
                let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                tch::manual_seed(5);
                let mut v = Victim::new(config.clone(), &table, Device::Cpu).unwrap();
                train(&mut v, &data, &opts, |_, _| {}).unwrap();
                v
            };
            let (a, b) = (run(), run());
            let acc = accuracy(&a, &data);
            assert!(acc > 95.0, "{arch:?} reached only {acc}%");
            let pa = a.params();
            let pb = b.params();
            for (name, t) in &pa {
                assert!(t.equal(&pb[name]), "{arch:?}: {name} differs between two runs with the same seeds");
            }
            assert!(pa["embedding.weight"].equal(&table), "frozen embeddings must not move");
        }
    }
}
