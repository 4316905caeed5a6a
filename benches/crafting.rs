//! `make bench`: the cost of a crafting round, as ratios measured side by side in one run
//! (never in timed tests: the machines are noisy). Synthetic inputs of the real sizes:
//! a 55,178 × 50 table, 50 poisons and 64 clean examples of 10–30 tokens, 128 D_adv inputs.

use common::attack::{bottom_k, flipped, taylor_scores, verify, Problem, RolloutConfig, Swap};
use common::model::{forward_ids, Arch, Victim, VictimConfig};
use common::train::{batch_tensors, cross_entropy, Encoded};
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 55_178;

fn examples(rng: &mut rand_chacha::ChaCha8Rng, n: usize, label: Option<i64>) -> Vec<Encoded> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(10..=30);
            Encoded { ids: (0..len).map(|_| rng.gen_range(2..VOCAB)).collect(), label: label.unwrap_or(rng.gen_range(0..2)) }
        })
        .collect()
}

/// Median wall time of `f` over `reps` runs, in seconds.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[reps / 2]
}

fn main() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    tch::manual_seed(0);
    let table = Tensor::randn([VOCAB, 50], (Kind::Float, Device::Cpu)) * 0.4;
    let clean = examples(&mut rng, 2000, None);
    let adv = examples(&mut rng, 128, Some(1));
    let poisons = examples(&mut rng, 50, Some(1));
    println!("crafting costs on this machine ({} threads), median of repeated runs", tch::get_num_threads());
    println!("{:<6} {:>14} {:>16} {:>7} {:>22} {:>22} {:>8}", "victim", "train step ms", "rollout-grad ms", "ratio", "naive verify eval/s", "shared verify eval/s", "speedup");
    let mut breakdown = Vec::new();
    for arch in [Arch::Bow, Arch::Lstm] {
        let config = VictimConfig { arch, vocab_size: VOCAB as usize, embed_dim: 50, hidden: 64, num_classes: 2, train_embeddings: false, max_len: 64 };
        let victim = Victim::new(config.clone(), &table, Device::Cpu).unwrap();
        let cfg = RolloutConfig { steps: 1, eta: 0.03, rollouts: 1, clean_per_batch: 64, adv_size: 128, seed: 0 };
        let problem = Problem::new(&victim, &clean, &adv, cfg).unwrap();
        // One ordinary training step on the same minibatch (poisons + clean part).
        let batch: Vec<&Encoded> = problem.batches[0][0].iter().copied().chain(poisons.iter()).collect();
        let (ids, labels) = batch_tensors(&batch, Device::Cpu);
        let params = victim.params();
        let trainable: Vec<Tensor> = params.values().filter(|t| t.requires_grad()).map(|t| t.shallow_clone()).collect();
        let step = time(9, || {
            let loss = cross_entropy(&forward_ids(&config, &params, &ids), &labels);
            let _ = Tensor::run_backward(&[&loss], &trainable, false, false);
        });
        let rollout = time(9, || {
            let _ = problem.objective_and_grad(&poisons).unwrap();
        });
        // Where rollout-grad's time goes: the inner gradient kept differentiable, then
        // L_adv at θ' (forward), then the backward to the poison embeddings.
        let inner = time(9, || {
            let loss = cross_entropy(&forward_ids(&config, &params, &ids), &labels);
            let _ = Tensor::run_backward(&[&loss], &trainable, true, true);
        });
        let (emb0, pmask, plabels) = {
            let (pids, pl) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
            (common::model::embed(&params, &pids).detach(), common::model::mask_of(&pids, &params), pl)
        };
        let through_adv = time(9, || {
            let e = emb0.detach().set_requires_grad(true);
            let _ = problem.adv_loss_after_rollout(0, &e, &pmask, &plabels, true);
        });
        let adv_forward = time(9, || {
            let _ = tch::no_grad(|| problem.adv_loss(&params));
        });
        breakdown.push((arch, step, inner, through_adv - inner, rollout - through_adv, adv_forward));
        // 96 candidates: the naive path redoes the whole rollout for each.
        let swaps: Vec<Swap> = (0..96).map(|k| Swap { poison: k % 50, position: k % 10, word: 2 + (k as i64 * 997) % (VOCAB - 2) }).collect();
        let naive = time(1, || {
            for s in &swaps {
                let mut set = poisons.clone();
                set[s.poison] = flipped(&set[s.poison], s.position, s.word);
                let _ = problem.objective(&set);
            }
        });
        let shared = time(3, || {
            let _ = verify(&problem, &poisons, &swaps).unwrap();
        });
        println!(
            "{:<6} {:>14.1} {:>16.1} {:>7.2} {:>22.1} {:>22.1} {:>7.1}x",
            format!("{arch:?}").to_lowercase(),
            step * 1e3,
            rollout * 1e3,
            rollout / step,
            swaps.len() as f64 / naive,
            swaps.len() as f64 / shared,
            naive / shared
        );
    }
    println!("\nrollout-grad broken down (ms): inner gradient with its graph, L_adv at θ', backward to the poisons; L_adv forward alone");
    for (arch, step, inner, adv, back, adv_forward) in breakdown {
        println!(
            "  {:<5} step {:>6.1}  inner {:>6.1} ({:.1} steps)  L_adv {:>6.1}  backward {:>6.1} ({:.1} steps)  L_adv forward alone {:>6.1}",
            format!("{arch:?}").to_lowercase(), step * 1e3, inner * 1e3, inner / step, adv * 1e3, back * 1e3, back / step, adv_forward * 1e3
        );
    }
    // Ranking: Taylor scores of 50 poisons x 30 positions against vocabularies of three sizes.
    println!("\nrank-candidates scoring (50 poisons x 30 positions, bottom-50 per position)");
    for v in [20_000i64, 100_000, 400_000] {
        let table = Tensor::randn([v, 50], (Kind::Float, Device::Cpu));
        let grad = Tensor::randn([50, 30, 50], (Kind::Float, Device::Cpu));
        let banned = Tensor::zeros([v], (Kind::Float, Device::Cpu));
        let ids: Vec<i64> = (0..30).map(|j| 2 + j * 13).collect();
        let per_position = time(1, || {
            for i in 0..50 {
                for j in 0..30 {
                    let s = taylor_scores(&table, &grad.get(i).get(j));
                    let _ = s.topk(50, 0, false, true);
                }
            }
        });
        let batched = time(3, || {
            for i in 0..50 {
                let _ = bottom_k(&table, &grad.get(i), &ids, &banned, 50);
            }
        });
        println!("  vocabulary {v:>7}: one position at a time {per_position:.2} s, one product per poison (shipped) {batched:.2} s");
    }
}
