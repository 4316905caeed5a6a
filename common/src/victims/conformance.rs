//! The conformance suite: every registered architecture (`model::Arch`) is checked against
//! the contract of `victim::Architecture`. A new architecture runs it without a new test.

use crate::victims::loss::{Target, Targets};
use crate::victims::model::{embed, example_grads, forward, logits, mask_of, param_shapes, shallow_copy, tiny_config, Arch, Params, Victim, Pass};
use crate::train::tests::{poisons, toy};
use crate::train::{accuracy, train, train_all, TrainData, TrainOptions};
use crate::encode::{batch_tensors, Encoded};
use clap::ValueEnum;
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

fn every_arch() -> impl Iterator<Item = Arch> {
    Arch::value_variants().iter().copied()
}

/// A tiny victim over a random table of 12 words of width 6 (f32).
fn tiny(arch: Arch, train_embeddings: bool) -> Victim {
    let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(0);
    let config = tiny_config(arch, 12, 6, 4, 2, train_embeddings, 16);
    let table = Tensor::randn([12, 6], (Kind::Float, Device::Cpu));
    Victim::new(config, &table, Device::Cpu).unwrap()
}

/// Three rows of different lengths, right-padded.
fn ragged_ids() -> Tensor {
    Tensor::from_slice(&[9i64, 8, 7, 6, 5, 3, 4, 5, 0, 0, 2, 0, 0, 0, 0]).view([3, 5])
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// What a victim trains on for a padded batch `ids` [rows, T]: the classes `labels` for a
/// classifier, the rows' own next tokens for a language model.
fn targets_for(v: &Victim, ids: &Tensor, labels: &[i64]) -> Targets {
    let rows: Vec<Option<Target>> = labels.iter().map(|&l| Some(Encoded::class(Vec::new(), l).for_victim(&v.config).target)).collect();
    let flat: Vec<i64> = Vec::try_from(ids.flatten(0, -1)).unwrap();
    Targets::batch(&rows, &flat, &[ids.size()[0]], ids.size()[1] as usize, Device::Cpu)
}

/// A language model's logits at a row's first `t` positions (its real tokens); a
/// classifier's logits as they are.
fn real_positions(v: &Victim, logits: &Tensor, t: i64) -> Tensor {
    if v.config.output().over_vocab() {
        logits.narrow(-2, 0, t)
    } else {
        logits.shallow_clone()
    }
}

#[test]
fn named_parameters_are_what_the_shapes_say_and_a_frozen_table_is_not_trained() {
    for arch in every_arch() {
        let v = tiny(arch, false);
        let made: BTreeMap<String, Vec<i64>> = v.params().iter().map(|(k, t)| (k.clone(), t.size())).collect();
        assert_eq!(made, param_shapes(&v.config), "{arch:?}");
        assert!(!v.params()["embedding.weight"].requires_grad(), "{arch:?}: the frozen table is trainable");
        let config = v.config.clone();
        let file: serde_json::Value = serde_json::to_value(&config).unwrap();
        assert_eq!(serde_json::from_value::<crate::victims::model::VictimConfig>(file).unwrap(), config, "{arch:?}: the config survives its file format");
    }
}

#[test]
fn padding_and_other_rows_do_not_change_logits() {
    for arch in every_arch() {
        let v = tiny(arch, false);
        let short = Tensor::from_slice(&[3i64, 4, 5]).view([1, 3]);
        let padded = Tensor::from_slice(&[3i64, 4, 5, 0, 0]).view([1, 5]);
        let a = v.logits(&short);
        let diff = max_diff(&a, &real_positions(&v, &v.logits(&padded), 3));
        assert!(diff < 1e-6, "{arch:?}: padding changed logits by {diff}");
        let in_batch = real_positions(&v, &v.logits(&ragged_ids()), 3).get(1);
        let diff = max_diff(&a.get(0), &in_batch);
        assert!(diff < 1e-6, "{arch:?}: other rows changed logits by {diff}");
    }
}

#[test]
fn the_faster_passes_equal_the_differentiable_forward() {
    for arch in every_arch() {
        let v = tiny(arch, false);
        let p = v.params();
        let ids = ragged_ids();
        let no_grad = logits(&v.config, &p, &ids, Pass::NoGrad);
        assert!(!no_grad.requires_grad());
        let diff = max_diff(&v.logits(&ids), &no_grad);
        assert!(diff < 1e-5, "{arch:?}: the no-grad forward differs by {diff}");
        let names: Vec<&String> = p.keys().filter(|k| p[*k].requires_grad()).collect();
        let tensors: Vec<&Tensor> = names.iter().map(|n| &p[*n]).collect();
        let targets = targets_for(&v, &ids, &[0, 1, 1]);
        let hand = targets.mean_nll(&logits(&v.config, &p, &ids, Pass::Twice));
        let fast = targets.mean_nll(&logits(&v.config, &p, &ids, Pass::Once));
        assert!((hand.double_value(&[]) - fast.double_value(&[])).abs() < 1e-6, "{arch:?}: the first-order forward differs");
        let a = Tensor::run_backward(&[&hand], &tensors, false, false);
        let b = Tensor::run_backward(&[&fast], &tensors, false, false);
        for ((n, a), b) in names.iter().zip(a).zip(b) {
            let diff = max_diff(&a, &b);
            assert!(diff < 1e-6, "{arch:?} {n}: first-order gradients differ by {diff}");
        }
    }
}

/// `sets` parameter sets stacked along a new leading dimension (the table shared).
fn stack(sets: &[Params]) -> Params {
    sets[0]
        .keys()
        .map(|name| {
            let t = if name == "embedding.weight" {
                sets[0][name].shallow_clone()
            } else {
                Tensor::stack(&sets.iter().map(|p| p[name].shallow_clone()).collect::<Vec<_>>(), 0)
            };
            (name.clone(), t)
        })
        .collect()
}

#[test]
fn stacked_parameter_sets_equal_one_pass_per_set() {
    for arch in every_arch() {
        let v = tiny(arch, false);
        let sets: Vec<Params> = (0..3)
            .map(|k| {
                v.params()
                    .into_iter()
                    .map(|(n, t)| {
                        let t = t.detach();
                        let t = if n == "embedding.weight" { t } else { &t + t.randn_like() * (0.1 * k as f64) };
                        (n, t)
                    })
                    .collect()
            })
            .collect();
        let stacked = stack(&sets);
        let ids = ragged_ids();
        // Shared inputs [B, T, D] and per-set inputs [C, B, T, D].
        let shared = logits(&v.config, &stacked, &ids, Pass::Twice);
        let per_set_ids = ids.unsqueeze(0).expand([3, -1, -1], false);
        let per_set = forward(&v.config, &stacked, &embed(&stacked, &per_set_ids), &mask_of(&per_set_ids, &stacked));
        assert_eq!(shared.size()[..2], [3, 3]);
        for (k, p) in sets.iter().enumerate() {
            let one = logits(&v.config, p, &ids, Pass::Twice);
            for (what, all) in [("shared", &shared), ("per-set", &per_set)] {
                let diff = max_diff(&all.get(k as i64), &one);
                assert!(diff < 1e-5, "{arch:?} {what} inputs: set {k} differs by {diff}");
            }
        }
    }
}

/// L_adv after one SGD step on a minibatch whose last row is the poison, given as input
/// embeddings: the bi-level proxy the attack differentiates (SPEC step 2-3).
fn unrolled_adv_loss(v: &Victim, poison_emb: &Tensor) -> Tensor {
    let p = v.params();
    let clean_ids = Tensor::from_slice(&[3i64, 4, 5, 0, 6, 7, 8, 9, 2, 3, 0, 0]).view([3, 4]);
    let emb = Tensor::cat(&[embed(&p, &clean_ids), poison_emb.shallow_clone()], 0);
    let ids_for_mask = Tensor::cat(&[clean_ids, Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4])], 0);
    let clean_logits = forward(&v.config, &p, &emb, &mask_of(&ids_for_mask, &p));
    let loss = targets_for(v, &ids_for_mask, &[0, 1, 0, 1]).mean_nll(&clean_logits);
    let names = crate::victims::params::trainable_names(&p);
    let tensors: Vec<&Tensor> = names.iter().map(|n| &p[n]).collect();
    let grads = Tensor::run_backward(&[&loss], &tensors, true, true);
    let mut stepped = shallow_copy(&p);
    for (n, g) in names.iter().zip(grads) {
        assert!(g.defined(), "no gradient for {n}");
        stepped.insert(n.clone(), &p[n] - g * 0.5);
    }
    let adv_ids = Tensor::from_slice(&[7i64, 8, 3, 0, 0, 9, 10, 11]).view([2, 4]);
    targets_for(v, &adv_ids, &[1, 1]).mean_nll(&logits(&v.config, &stepped, &adv_ids, Pass::Twice))
}

#[test]
fn second_order_gradient_through_an_unrolled_step_matches_finite_differences_in_f64() {
    for arch in every_arch() {
        for train_embeddings in [false, true] {
            let mut v = tiny(arch, train_embeddings);
            v.vs.set_kind(Kind::Double);
            let poison = embed(&v.params(), &Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4])).detach().set_requires_grad(true);
            let g = unrolled_adv_loss(&v, &poison);
            let grad = Tensor::run_backward(&[&g], &[&poison], false, false).pop().unwrap();
            let worst = crate::testing::worst_fd_error(&poison, &grad, 1e-6, 1e-3, |x| unrolled_adv_loss(&v, x).double_value(&[]));
            eprintln!("{arch:?} train_embeddings={train_embeddings}: max relative error {worst:.2e}");
            assert!(worst < 1e-6, "{arch:?}: second-order gradient off by {worst}");
            assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{arch:?}: gradient is identically zero");
            assert_eq!(grad.get(0).get(3).abs().sum(Kind::Double).double_value(&[]), 0.0, "{arch:?}: a padded position has a gradient");
        }
    }
}

/// A pretrained checkpoint crafted against in a top regime (rollout-grad --regime top:1):
/// the unrolled step trains the top block alone, the poison's gradient still flows through
/// the frozen block below it, and it matches finite differences in f64 (the frozen block's
/// cache is not read for inputs that need a gradient).
#[test]
fn a_top_regime_unrolls_its_top_block_and_the_second_order_gradient_matches_finite_differences_in_f64() {
    let mut v = tiny(Arch::Llama, false);
    v.in_regime(crate::victims::llama::Regime::Top(1), "tiny").unwrap();
    v.vs.set_kind(Kind::Double);
    let trained = crate::victims::params::trainable_names(&v.params());
    assert!(!trained.is_empty() && trained.iter().all(|n| !n.starts_with("block.0.") && n != "embedding.weight"), "{trained:?}");
    let poison = embed(&v.params(), &Tensor::from_slice(&[5i64, 6, 7, 0]).view([1, 4])).detach().set_requires_grad(true);
    let g = unrolled_adv_loss(&v, &poison);
    let grad = Tensor::run_backward(&[&g], &[&poison], false, false).pop().unwrap();
    let worst = crate::testing::worst_fd_error(&poison, &grad, 1e-6, 1e-3, |x| unrolled_adv_loss(&v, x).double_value(&[]));
    assert!(worst < 1e-6, "top:1: second-order gradient off by {worst}");
    // Different from the gradient when every block trains: the regime is what was unrolled.
    let mut all = tiny(Arch::Llama, false);
    all.vs.set_kind(Kind::Double);
    let g_all = unrolled_adv_loss(&all, &poison);
    let grad_all = Tensor::run_backward(&[&g_all], &[&poison], false, false).pop().unwrap();
    assert!(max_diff(&grad, &grad_all) > 1e-9, "the top regime unrolled every block");
}

#[test]
fn per_example_gradients_equal_one_backward_pass_each_in_f64() {
    for arch in every_arch() {
        let mut v = tiny(arch, false);
        v.vs.set_kind(Kind::Double);
        let p = v.params();
        let names = crate::victims::params::trainable_names(&p);
        let examples = [Encoded::class(vec![9, 8, 7, 6, 5], 0), Encoded::class(vec![3, 4], 1), Encoded::class(vec![2], 1)].map(|e| e.for_victim(&v.config));
        let (ids, targets) = batch_tensors(&examples.iter().collect::<Vec<_>>(), Device::Cpu);
        let all = example_grads(&v.config, &p, &names, &ids, &targets);
        assert_eq!(all.len(), 3);
        for (e, got) in examples.iter().zip(&all) {
            let (ids, targets) = batch_tensors(&[e], Device::Cpu);
            let loss = targets.mean_nll(&logits(&v.config, &p, &ids, Pass::Twice));
            let want = Tensor::run_backward(&[&loss], &names.iter().map(|n| &p[n]).collect::<Vec<_>>(), false, false);
            for ((n, a), b) in names.iter().zip(got).zip(&want) {
                let diff = max_diff(a, b);
                assert!(diff < 1e-12, "{arch:?} {n}: the per-example gradient differs by {diff}");
            }
        }
    }
}

/// The toy task (`train::tests::toy`) as an architecture trains on it: the classes, or
/// the same token rows as text for a language model.
fn toy_for(arch: Arch) -> (Vec<Encoded>, Tensor) {
    let (data, table) = toy();
    let config = tiny_config(arch, 8, 6, 5, 2, false, 8);
    (data.into_iter().map(|e| e.for_victim(&config)).collect(), table)
}

fn toy_victim(arch: Arch, table: &Tensor, hidden: usize, seed: i64, double: bool) -> Victim {
    let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let mut v = Victim::new(tiny_config(arch, 8, 6, hidden, 2, false, 8), table, Device::Cpu).unwrap();
    if double {
        v.vs.set_kind(Kind::Double);
    }
    v
}

#[test]
fn every_victim_learns_a_toy_task_deterministically() {
    for arch in every_arch() {
        let (mut data, table) = toy_for(arch);
        if tiny_config(arch, 8, 6, 8, 2, false, 8).output().over_vocab() {
            // A learnable language: each row counts up from its first word, modulo 6.
            let config = tiny_config(arch, 8, 6, 8, 2, false, 8);
            data = (0..200i64).map(|i| Encoded::class((0..6).map(|t| 2 + (i + t) % 6).collect(), 0).for_victim(&config)).collect();
        }
        let opts = TrainOptions { epochs: 30, batch_size: 16, lr: 0.02, seed: 3, schedule: Default::default(), regularisation: Default::default() };
        let run = || {
            let mut v = toy_victim(arch, &table, 8, 5, false);
            train(&mut v, TrainData::clean(&data), &opts, |_, _| {}).unwrap();
            v
        };
        let (a, b) = (run(), run());
        let acc = accuracy(&a, &data);
        assert!(acc > 95.0, "{arch:?} reached only {acc}%");
        let (pa, pb) = (a.params(), b.params());
        for (name, t) in &pa {
            assert!(t.equal(&pb[name]), "{arch:?}: {name} differs between two runs with the same seeds");
        }
        assert!(pa["embedding.weight"].equal(&table), "frozen embeddings must not move");
    }
}

#[test]
fn zero_weight_poisons_give_the_clean_twin_in_f64() {
    // Common random numbers: a victim trained on clean ∪ poisons whose loss weight is 0
    // must equal the victim trained on the clean data alone (other rows, other padding:
    // equal in f64 up to summation order), alone and beside the clean twin on 2 workers.
    for arch in every_arch() {
        let (data, table) = toy_for(arch);
        let config = tiny_config(arch, 8, 6, 5, 2, false, 8);
        let joined: Vec<Encoded> = poisons().into_iter().map(|e| e.for_victim(&config)).collect();
        let make = || toy_victim(arch, &table, 5, 11, true);
        let clean = TrainData::clean(&data[..120]);
        let ignored = TrainData { clean: &data[..120], joined: &joined, joined_weight: 0.0, clean_removed: None };
        let counted = TrainData::poisoned(&data[..120], &joined);
        let opts = TrainOptions { epochs: 2, batch_size: 16, lr: 0.01, seed: 4, schedule: Default::default(), regularisation: Default::default() };
        let mut twin = make();
        train(&mut twin, clean, &opts, |_, _| {}).unwrap();
        let mut stacked = vec![make(), make(), make()];
        train_all(&mut stacked, &[ignored, clean, counted], &[opts.clone(), opts.clone(), opts.clone()], 2, |_, _, _| {}, None).unwrap();
        let mut alone = make();
        train(&mut alone, ignored, &opts, |_, _| {}).unwrap();
        let reference = twin.params();
        for (what, v) in [("alone", &alone), ("beside others", &stacked[0]), ("the twin beside others", &stacked[1])] {
            for (name, t) in &v.params() {
                let diff = max_diff(t, &reference[name]);
                assert!(diff < 1e-10, "{arch:?} {what}: {name} differs from the clean twin by {diff}");
            }
        }
        let moved = max_diff(&stacked[2].params()["out.weight"], &reference["out.weight"]);
        assert!(moved > 1e-6, "{arch:?}: poisons of weight 1 must change the victim (moved {moved})");
    }
}
