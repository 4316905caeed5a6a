//! The trainer this project used before victims trained one by one (`train::train_all`):
//! several victims of one configuration stacked into [C, ...] tensors, one forward and
//! backward pass per step for all of them, each batch padded to the stack's longest row,
//! stacks split over threads of one libtorch thread each. Kept here, verbatim but for the
//! imports, only so that `benches/training.rs` can measure the old way beside the new:
//! its floats depend on the neighbours and the thread count, which is why it went.
#![allow(dead_code)]

use anyhow::{bail, Result};
use common::victims::loss::{Target, Targets};
use common::victims::model::{logits, Victim, Pass};
use common::tokenizer::{PAD_ID, UNK_ID};
use common::train::{epoch_batches, TrainData, TrainOptions, LENGTH_BLOCKS};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;

pub type Observer<'a> = &'a (dyn Fn(usize, usize, &common::victims::model::Params) + Sync);

fn unstack(stacked: &common::victims::model::Params, stacked_names: &[String], i: usize) -> common::victims::model::Params {
    stacked
        .iter()
        .map(|(n, t)| (n.clone(), if stacked_names.contains(n) { t.get(i as i64) } else { t.shallow_clone() }))
        .collect()
}

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

pub fn train_stack(victims: &mut [Victim], data: &[TrainData], opts: &[TrainOptions], mut on_epoch: impl FnMut(usize, &[f64]), observe: Option<Observer>, offset: usize) -> Result<()> {
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
    let names = common::victims::params::trainable_names(&first);
    let frozen: Vec<String> = first.keys().filter(|k| !first[*k].requires_grad()).cloned().collect();
    let mut params: common::victims::model::Params = common::victims::model::Params::new();
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
        let schedules = aligned_schedules(&counts, common::data::seed_for(0, &format!("batch-order-epoch{epoch}")), &mut rngs);
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
            let logits = logits(&config, &params, &ids, Pass::Twice); // [C, rows, classes]
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

/// Stacks of about C / workers victims on `workers` threads of one libtorch thread each.
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

