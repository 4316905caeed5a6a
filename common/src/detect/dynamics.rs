//! Defenses that train victims on the screened set itself: every example's loss after
//! every epoch (its training dynamics: hardness-crafted poisons are hard to fit by
//! construction, and label-flipped bases disagree with their text) and the spectral
//! signature of the victims' pooled features (Tran et al., 2018): within each labelled
//! class, poisons that share a direction of their own stand out along the top singular
//! vector of the centred features.

use crate::base::Base;
use crate::model::{features_ids_no_grad, forward_ids_no_grad, Params, Victim, VictimConfig};
use crate::train::{self, batch_tensors, Encoded, TrainData, TrainOptions};
use anyhow::Result;
use tch::{Kind, Tensor};

/// Scores from victims trained on the set, one per example.
pub struct Dynamics {
    /// The loss averaged over victims and epochs (the area under its training curve).
    pub loss_mean: Vec<f64>,
    /// The loss at the end of training, averaged over victims.
    pub loss_final: Vec<f64>,
    /// The squared projection on the top singular vector of its class's centred features,
    /// divided by that class's mean (so classes share a scale), averaged over victims.
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
            let nll = targets.example_nll(&forward_ids_no_grad(config, params, &ids)).to_kind(Kind::Double).to_device(tch::Device::Cpu);
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
    let mut out = vec![0.0; data.len()];
    for class in 0..num_classes as i64 {
        let members: Vec<usize> = (0..data.len()).filter(|&i| data[i].target.class() == Some(class)).collect();
        if members.len() < 2 {
            continue;
        }
        let f = Tensor::stack(&members.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0);
        let centred = &f - f.mean_dim(0, true, None::<Kind>);
        // The top right singular vector: the covariance's eigenvector of the largest eigenvalue.
        let (_, vectors) = Tensor::linalg_eigh(&centred.tr().matmul(&centred), "L");
        let top = vectors.select(1, vectors.size()[1] - 1);
        let proj = centred.matmul(&top).square();
        let mean = proj.mean(None::<Kind>).double_value(&[]).max(1e-300);
        for (&i, p) in members.iter().zip(Vec::<f64>::try_from(proj).expect("f64 projections")) {
            out[i] = p / mean;
        }
    }
    out
}

/// Trains one victim per option set on `data` (the whole screened set, poisons unknown)
/// and scores every example by its training dynamics and spectral signature.
pub fn training_dynamics(base: &Base, config: &VictimConfig, data: &[Encoded], opts: &[TrainOptions], workers: usize, device: tch::Device, log: &(dyn Fn(String) + Sync)) -> Result<Dynamics> {
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
    train::train_in_waves(&mut victims, &sets, opts, workers, config.tuning().retrain_stack, |_, epoch, l| {
        log(format!("training dynamics: epoch {epoch}/{epochs}, mean loss {:.4}, {:.0}s", l[0], start.elapsed().as_secs_f64()))
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
