//! Defenses that train victims on the screened set itself: every example's loss after
//! every epoch (its training dynamics: hardness-crafted poisons are hard to fit by
//! construction, and label-flipped bases disagree with their text) and the spectral
//! signature of the victims' pooled features (Tran et al., 2018): within each labelled
//! class, poisons that share a direction of their own stand out along the top singular
//! vector of the centred features.

use crate::victims::origin::Origin;
use crate::victims::model::{features_ids_no_grad, logits, Params, Victim, VictimConfig, Pass};
use crate::train::{self, TrainData, TrainOptions};
use crate::encode::{batch_tensors, Encoded};
use anyhow::Result;
use tch::{Kind, Tensor};

/// Scores from victims trained on the set, one per example.
pub struct Dynamics {
    /// The loss averaged over victims and epochs (the area under its training curve).
    pub loss_mean: Vec<f64>,
    /// The loss at the end of training, averaged over victims.
    pub loss_final: Vec<f64>,
    /// The squared projection on the top singular vector of its class's centred features,
    /// divided by that class's median (so classes share a scale), averaged over victims.
    pub spectral: Vec<f64>,
}

/// Every example's own loss under one parameter set, in batches sorted by length.
pub fn example_losses(config: &VictimConfig, params: &Params, data: &[Encoded], batch: usize) -> Vec<f64> {
    let device = params.values().next().map_or(tch::Device::Cpu, |t| t.device());
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].ids.len());
    let mut out = vec![0.0; data.len()];
    tch::no_grad(|| {
        for chunk in order.chunks(batch.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
            let (ids, targets) = batch_tensors(&items, device);
            let nll = targets.example_nll(&logits(config, params, &ids, Pass::NoGrad)).to_kind(Kind::Double).to_device(tch::Device::Cpu);
            for (&i, l) in chunk.iter().zip(Vec::<f64>::try_from(nll).expect("f64 losses")) {
                out[i] = l;
            }
        }
    });
    out
}

/// Spectral-signature scores of one victim's pooled features.
pub fn spectral_scores(config: &VictimConfig, params: &Params, data: &[Encoded], num_classes: usize, batch: usize) -> Vec<f64> {
    let device = params.values().next().map_or(tch::Device::Cpu, |t| t.device());
    let mut features: Vec<Tensor> = Vec::with_capacity(data.len());
    tch::no_grad(|| {
        for chunk in data.chunks(batch.max(1)) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let (ids, _) = batch_tensors(&items, device);
            let f = features_ids_no_grad(config, params, &ids).to_kind(Kind::Double).to_device(tch::Device::Cpu);
            features.extend((0..chunk.len() as i64).map(|r| f.get(r)));
        }
    });
    let labels: Vec<Option<i64>> = data.iter().map(|e| e.target.class()).collect();
    spectral_of_features(&Tensor::stack(&features, 0), &labels, num_classes)
}

/// Spectral-signature scores of feature rows [n, d] with their labels.
pub fn spectral_of_features(features: &Tensor, labels: &[Option<i64>], num_classes: usize) -> Vec<f64> {
    let mut out = vec![0.0; labels.len()];
    for class in 0..num_classes as i64 {
        let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == Some(class)).collect();
        if members.len() < 2 {
            continue;
        }
        let f = features.index_select(0, &Tensor::from_slice(&members.iter().map(|&i| i as i64).collect::<Vec<_>>())).to_kind(Kind::Double);
        let centred = &f - f.mean_dim(0, true, None::<Kind>);
        // The top right singular vector: the covariance's eigenvector of the largest eigenvalue.
        let (_, vectors) = Tensor::linalg_eigh(&centred.tr().matmul(&centred), "L");
        let top = vectors.select(1, vectors.size()[1] - 1);
        let proj: Vec<f64> = Vec::try_from(centred.matmul(&top).square()).expect("f64 projections");
        // Divided by the class's median, which the outliers barely move (a mean would
        // shrink the scores of the class that holds the poisons).
        let mut sorted = proj.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let median = sorted[sorted.len() / 2].max(1e-300);
        for (&i, p) in members.iter().zip(proj) {
            out[i] = p / median;
        }
    }
    out
}

/// Trains one victim per option set on `data` (the whole screened set, poisons unknown)
/// and scores every example by its training dynamics and spectral signature.
pub fn training_dynamics(base: &Origin, config: &VictimConfig, data: &[Encoded], opts: &[TrainOptions], workers: usize, device: tch::Device, log: &(dyn Fn(String) + Sync)) -> Result<Dynamics> {
    let n = data.len();
    let mut victims: Vec<Victim> = Vec::with_capacity(opts.len());
    for o in opts {
        tch::manual_seed(o.seed as i64);
        victims.push(base.new_victim(config.clone(), device)?);
    }
    let sets: Vec<TrainData> = opts.iter().map(|_| TrainData::clean(data)).collect();
    let losses: std::sync::Mutex<Vec<Vec<Vec<f64>>>> = std::sync::Mutex::new(vec![Vec::new(); opts.len()]);
    let observe = |victim: usize, _epoch: usize, params: &Params| {
        let l = example_losses(config, params, data, 256);
        losses.lock().unwrap_or_else(|e| e.into_inner())[victim].push(l);
    };
    let epochs = opts.first().map_or(0, |o| o.epochs);
    let start = std::time::Instant::now();
    train::train_all(&mut victims, &sets, opts, workers, |v, epoch, loss| {
        if v == 0 {
            log(format!("training dynamics: epoch {epoch}/{epochs}, mean loss {loss:.4}, {:.0}s", start.elapsed().as_secs_f64()))
        }
    }, Some(&observe))?;
    let losses = losses.into_inner().unwrap_or_else(|e| e.into_inner());
    let k = victims.len() as f64;
    let mut d = Dynamics { loss_mean: vec![0.0; n], loss_final: vec![0.0; n], spectral: vec![0.0; n] };
    let num_classes = config.num_classes;
    for (v, per_epoch) in victims.iter().zip(&losses) {
        for (e, l) in per_epoch.iter().enumerate() {
            for i in 0..n {
                d.loss_mean[i] += l[i] / (k * per_epoch.len() as f64);
                if e + 1 == per_epoch.len() {
                    d.loss_final[i] += l[i] / k;
                }
            }
        }
        for (i, s) in spectral_scores(&v.config, &v.params(), data, num_classes, 256).into_iter().enumerate() {
            d.spectral[i] += s / k;
        }
    }
    Ok(d)
}

/// `loss-mean`, `loss-final` and `spectral`: victims trained on the screened set (one per
/// option set of the screen), their per-example losses over the epochs and the spectral
/// signature of their pooled features.
pub struct TrainingDynamics;

impl super::Family for TrainingDynamics {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::LossMean, super::Detector::LossFinal, super::Detector::Spectral]
    }
    fn needs(&self) -> super::Needs {
        super::Needs { table: true, training: true, ..Default::default() }
    }
    fn scores(&self, s: &super::Screen, _: &[super::Detector], log: &(dyn Fn(String) + Sync)) -> Result<Vec<(super::Detector, Vec<f64>)>> {
        use anyhow::Context;
        let base = s.table.context("the training-dynamics detectors need --embeddings")?;
        let (config, opts) = s.training.context("the training-dynamics detectors need victim settings")?;
        let encoded = crate::encode::encode_all(s.examples, &base.vocab, config.max_len, s.num_classes, crate::encode::TextPolicy::Data, s.source)?;
        let d = training_dynamics(base, config, &encoded, opts, s.workers, s.device, log)?;
        Ok(vec![(super::Detector::LossMean, d.loss_mean), (super::Detector::LossFinal, d.loss_final), (super::Detector::Spectral, d.spectral)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests::toy;

    #[test]
    fn spectral_signature_ranks_a_planted_direction_first() {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        // 200 examples of two classes, isotropic noise; 8 of class 1 shifted along one axis.
        let mut f = Tensor::randn([200, 16], (Kind::Double, tch::Device::Cpu));
        let planted: Vec<i64> = (0..8).map(|k| 2 * k + 1).collect();
        for &i in &planted {
            let _ = f.get(i).get(3).f_add_scalar_(10.0).unwrap();
        }
        let labels: Vec<Option<i64>> = (0..200).map(|i| Some(i % 2)).collect();
        let scores = spectral_of_features(&f, &labels, 2);
        let mut order: Vec<usize> = (0..200).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let top: std::collections::HashSet<i64> = order[..8].iter().map(|&i| i as i64).collect();
        assert_eq!(top, planted.iter().copied().collect(), "the planted rows are the top 8");
        // Scores are normalised per class: each class's median (the 51st of 100) is 1.
        for c in 0..2 {
            let mut xs: Vec<f64> = (0..200).filter(|i| i % 2 == c).map(|i| scores[i]).collect();
            xs.sort_by(|a, b| a.total_cmp(b));
            assert!((xs[50] - 1.0).abs() < 1e-9, "class {c} median {}", xs[50]);
        }
        f = f.zero_();
        let flat = spectral_of_features(&f, &labels, 2);
        assert!(flat.iter().all(|s| s.is_finite()), "no direction at all stays finite");
    }

    #[test]
    fn training_dynamics_give_a_mislabelled_example_the_highest_loss() {
        let (mut data, table) = toy();
        // Example 0 keeps its tokens but takes the other label: it contradicts the task.
        let flipped = 1 - data[0].target.class().unwrap();
        data[0] = Encoded::class(data[0].ids.clone(), flipped);
        let words: Vec<String> = ["<pad>", "<unk>", "pos", "neg", "a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let base = Origin { vocab: crate::tokenizer::Vocab::new(words).unwrap(), start: crate::victims::origin::Start::Table(table), sha256: String::new(), source: "toy".into() };
        let config = base.victim_config(&crate::victims::origin::VictimShape { arch: crate::victims::model::Arch::Bow, hidden: 8, gpt: crate::victims::gpt::GptShape { layers: 2, heads: 2 }, source_len: 0, num_classes: 2, max_len: 16, train_embeddings: false, regime: Default::default() }).unwrap();
        let opts: Vec<TrainOptions> = (0..2).map(|seed| TrainOptions { epochs: 3, batch_size: 16, lr: 1e-2, seed, schedule: Default::default(), regularisation: Default::default() }).collect();
        // training_dynamics seeds libtorch's global generator and draws the victims' weights:
        // under the lock, or it interleaves with the draws of tests running beside it.
        let d = {
            let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            training_dynamics(&base, &config, &data, &opts, 1, tch::Device::Cpu, &|_| {}).unwrap()
        };
        for (name, col) in [("loss-mean", &d.loss_mean), ("loss-final", &d.loss_final)] {
            let top = (0..data.len()).max_by(|&a, &b| col[a].total_cmp(&col[b])).unwrap();
            assert_eq!(top, 0, "{name}: the mislabelled example scores highest");
        }
        assert!(d.spectral.iter().all(|s| s.is_finite() && *s >= 0.0));
    }
}
