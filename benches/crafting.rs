//! `make bench`: the cost of a crafting round, as ratios measured side by side in one run
//! (never in timed tests: the machines are noisy). Synthetic inputs of the real sizes:
//! a 55,178 × 50 table, 50 poisons and 64 clean examples of 10–30 tokens, 128 D_adv
//! inputs. Peak memory of each stage on the real data: scripts/bench_stages.sh.

use common::objectives::bilevel::{BiLevel, PoisonInput, RolloutConfig, Replacement, Verifier};
use common::objectives::swaps::{flipped, Swap};
use common::objectives::Objective;
use common::search::rank::{bottom_k, taylor_scores};
use common::victims::model::{embed, logits, mask_of, tiny_config, Arch, Victim, Pass};
use common::encode::{batch_tensors, Encoded};
use rand::{Rng, SeedableRng};
use std::time::Instant;
mod support;
use support::time;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 55_178;
const DIM: i64 = 50;
const HIDDEN: i64 = 64;

fn examples(rng: &mut rand_chacha::ChaCha8Rng, n: usize, lengths: std::ops::RangeInclusive<usize>, label: Option<i64>) -> Vec<Encoded> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(lengths.clone());
            Encoded::class((0..len).map(|_| rng.gen_range(2..VOCAB)).collect(), label.unwrap_or(rng.gen_range(0..2)))
        })
        .collect()
}


/// Counted multiply-add FLOPs of one forward pass over padded token ids [N, T]: per token
/// and direction, the input projection 2·D·4H and the recurrence 2·H·4H (the LSTM); the
/// MLP on the mean embedding (bow). Elementwise work is left out: it is small in FLOPs
/// and its cost shows up as the gap between counted and measured rates.
fn forward_flops(arch: Arch, ids: &[&Encoded]) -> f64 {
    let t = ids.iter().map(|e| e.ids.len()).max().unwrap_or(0) as f64;
    let n = ids.len() as f64;
    let (d, h) = (DIM as f64, HIDDEN as f64);
    match arch {
        Arch::Lstm => n * t * 2.0 * 2.0 * 4.0 * h * (d + h) + n * 2.0 * 2.0 * h * 2.0,
        Arch::Bow => n * t * d + n * 2.0 * (d * h + h * 2.0),
        Arch::Minilm => unimplemented!("this bench covers the GloVe victims; MiniLM's costs are in benches/minilm.rs"),
        Arch::Gpt | Arch::Seq2seq | Arch::Llama => unimplemented!("this bench covers the GloVe classifiers"),
    }
}

fn victim(arch: Arch, table: &Tensor) -> Victim {
    let config = tiny_config(arch, table.size()[0] as usize, DIM as usize, HIDDEN as usize, 2, false, 64);
    Victim::new(config, table, Device::Cpu).unwrap()
}

fn rollout_config() -> RolloutConfig {
    RolloutConfig { steps: 1, eta: 0.03, rollouts: 1, clean_per_batch: 64, adv_size: 128, seed: 0, regime: None }
}

/// Exact checks of `swaps` by the shipped shared-work path: (objective per swap, seconds).
fn shared_checks(problem: &BiLevel, poisons: &[Encoded], swaps: &[(usize, usize, i64)]) -> (Vec<f64>, f64) {
    let t = Instant::now();
    let verifier = Verifier::new(problem, poisons);
    let news: Vec<Encoded> = swaps.iter().map(|&(i, j, w)| flipped(&poisons[i], j, w)).collect();
    let grads = verifier.example_grads(&news);
    let sets: Vec<Vec<Replacement>> = swaps.iter().zip(&news).zip(&grads).map(|((&(i, _, _), example), g)| vec![Replacement { poison: i, example, grad: g }]).collect();
    let values = verifier.objectives_with(&sets);
    (values, t.elapsed().as_secs_f64())
}

/// The same checks, each by redoing the whole rollout: (objective per swap, seconds).
fn naive_checks(problem: &BiLevel, poisons: &[Encoded], swaps: &[(usize, usize, i64)]) -> (Vec<f64>, f64) {
    let t = Instant::now();
    let values = swaps
        .iter()
        .map(|&(i, j, w)| {
            let mut set = poisons.to_vec();
            set[i] = flipped(&set[i], j, w);
            problem.objective(&set)
        })
        .collect();
    (values, t.elapsed().as_secs_f64())
}

fn swaps_for(poisons: &[Encoded], n: usize) -> Vec<(usize, usize, i64)> {
    (0..n).map(|k| (k % poisons.len(), k % poisons[k % poisons.len()].ids.len(), 2 + (k as i64 * 997) % (VOCAB - 2))).collect()
}

fn main() {
    common::numerics::pin(); // the binaries' CPU code paths and one libtorch thread
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    tch::manual_seed(0);
    let table = Tensor::randn([VOCAB, DIM], (Kind::Float, Device::Cpu)) * 0.4;
    let clean = examples(&mut rng, 2000, 10..=30, None);
    let adv = examples(&mut rng, 128, 10..=30, Some(1));
    let poisons = examples(&mut rng, 50, 10..=30, Some(1));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("crafting costs on this machine ({cores} cores, {} libtorch threads), median of repeated runs", tch::get_num_threads());
    println!();
    println!("{:<6} {:>10} {:>13} {:>7} {:>16} {:>17} {:>8} {:>14}", "victim", "step ms", "rollout ms", "ratio", "naive checks/s", "shared checks/s", "speedup", "max |Δ value|");
    let mut breakdown = Vec::new();
    for arch in [Arch::Bow, Arch::Lstm] {
        let victim = victim(arch, &table);
        let config = victim.config.clone();
        let problem = BiLevel::new(&victim, &clean, &adv, rollout_config()).unwrap();
        // One ordinary training step on the same minibatch (clean part + poisons).
        let batch: Vec<&Encoded> = problem.batches[0][0].iter().copied().chain(poisons.iter()).collect();
        let (ids, targets) = batch_tensors(&batch, Device::Cpu);
        let params = victim.params();
        let trainable: Vec<Tensor> = params.values().filter(|t| t.requires_grad()).map(|t| t.shallow_clone()).collect();
        let step = time(9, || {
            let loss = targets.mean_nll(&logits(&config, &params, &ids, Pass::Twice));
            let _ = Tensor::run_backward(&[&loss], &trainable, false, false);
        });
        let rollout = time(9, || {
            let _ = problem.objective_and_grad(&poisons).unwrap();
        });
        // Where rollout-grad's time goes: L_adv at θ' with its graph (the inner step
        // included), then the backward to the poison embeddings.
        let (pids, ptargets) = batch_tensors(&poisons.iter().collect::<Vec<_>>(), Device::Cpu);
        let (emb0, pmask) = (embed(&params, &pids).detach(), mask_of(&pids, &params));
        let through_adv = time(9, || {
            let input = PoisonInput::Embedded { emb: emb0.detach().set_requires_grad(true), mask: pmask.shallow_clone(), targets: ptargets.shallow_clone() };
            let _ = problem.adv_loss_after_rollout(0, &input, true);
        });
        let adv_graph = time(9, || {
            let _ = problem.adv_loss(&params);
        });
        let adv_no_grad = time(9, || {
            let _ = problem.adv_loss_no_grad(&params);
        });
        // 96 candidates, checked exactly both ways; the values must agree.
        let swaps = swaps_for(&poisons, 96);
        let (naive_values, naive) = naive_checks(&problem, &poisons, &swaps);
        let mut shared_times = Vec::new();
        let mut shared_values = Vec::new();
        for _ in 0..3 {
            let (v, t) = shared_checks(&problem, &poisons, &swaps);
            shared_times.push(t);
            shared_values = v;
        }
        shared_times.sort_by(f64::total_cmp);
        let shared = shared_times[1];
        let max_diff = naive_values.iter().zip(&shared_values).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!(
            "{:<6} {:>10.1} {:>13.1} {:>7.2} {:>16.1} {:>17.1} {:>7.1}x {:>14.1e}",
            format!("{arch:?}").to_lowercase(),
            step * 1e3,
            rollout * 1e3,
            rollout / step,
            swaps.len() as f64 / naive,
            swaps.len() as f64 / shared,
            naive / shared,
            max_diff
        );
        let adv_items: Vec<&Encoded> = adv.iter().collect();
        let flops = (forward_flops(arch, &batch), forward_flops(arch, &adv_items), forward_flops(arch, &poisons.iter().collect::<Vec<_>>()));
        breakdown.push((arch, step, rollout, through_adv, adv_graph, adv_no_grad, flops));
    }
    println!("\"ratio\": rollout-grad (one unrolled step and the second-order gradient) over one training step on the");
    println!("same minibatch. \"checks/s\": exact objective evaluations of candidate flips; naive redoes the whole");
    println!("rollout per candidate, shared is verify-candidates' path (set-up included); |Δ value|: largest difference.");

    println!("\nwhere the time goes (ms), with counted forward GFLOP (backward counted as 2x forward)");
    for (arch, step, rollout, through_adv, adv_graph, adv_no_grad, (fb, fa, fp)) in &breakdown {
        let gf = |f: f64, s: f64| f / s / 1e9;
        println!(
            "  {:<5} train step {:>6.1} ({:.2} GFLOP, {:>5.1} GFLOP/s) | rollout {:>6.1}: to L_adv at θ' {:>6.1}, backward {:>6.1} | L_adv forward: with graph {:>5.1}, no graph {:>5.1} ({:.2} GFLOP, {:>5.1} GFLOP/s)",
            format!("{arch:?}").to_lowercase(),
            step * 1e3,
            3.0 * fb / 1e9,
            gf(3.0 * fb, *step),
            rollout * 1e3,
            through_adv * 1e3,
            (rollout - through_adv) * 1e3,
            adv_graph * 1e3,
            adv_no_grad * 1e3,
            fa / 1e9,
            gf(*fa, *adv_no_grad),
        );
        // The floor of rollout-grad in counted work: the minibatch's forward and backward
        // (3 F_b), L_adv's forward and backward at θ' (3 F_a), and the second-order term,
        // a backward through the poisons' part of the inner gradient (about 2 × 3 F_p).
        let floor = (3.0 * fb + 3.0 * fa + 6.0 * fp) / (3.0 * fb);
        println!("        counted floor of the rollout: {floor:.2} training steps; measured {:.2}", rollout / step);
    }

    // Threads: libtorch's intra-op threads on these small passes.
    println!("\nlibtorch intra-op threads (lstm): rollout-grad ms and shared checks/s (the stages run on 1: bits independent of the thread count; 2 is what that costs)");
    {
        let victim = victim(Arch::Lstm, &table);
        let problem = BiLevel::new(&victim, &clean, &adv, rollout_config()).unwrap();
        let swaps = swaps_for(&poisons, 48);
        let threads = tch::get_num_threads();
        for n in [1, 2] {
            tch::set_num_threads(n);
            let rollout = time(5, || {
                let _ = problem.objective_and_grad(&poisons).unwrap();
            });
            let (_, t) = shared_checks(&problem, &poisons, &swaps);
            println!("  {n} thread(s): rollout {:>6.1} ms, shared checks {:>6.1}/s", rollout * 1e3, swaps.len() as f64 / t);
        }
        tch::set_num_threads(threads);
    }

    // k > 1: the shared path saves the first of the k minibatch steps per candidate.
    println!("\nk = 3 inner steps, R = 2 rollouts (lstm): exact checks/s, naive (every step per candidate) and shared (step 0 shared)");
    {
        let victim = victim(Arch::Lstm, &table);
        let problem = BiLevel::new(&victim, &clean, &adv, RolloutConfig { steps: 3, rollouts: 2, ..rollout_config() }).unwrap();
        let swaps = swaps_for(&poisons, 24);
        let (naive_values, naive) = naive_checks(&problem, &poisons, &swaps);
        let (shared_values, shared) = shared_checks(&problem, &poisons, &swaps);
        let max_diff = naive_values.iter().zip(&shared_values).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        println!(
            "  naive {:>6.1}/s, shared {:>6.1}/s, speedup {:.2}x (at most k/(k-1) = 1.5x), max |Δ value| {max_diff:.1e}",
            swaps.len() as f64 / naive, swaps.len() as f64 / shared, naive / shared
        );
        // verify-candidates' whole check (set-up, checks, greedy combination) on --workers
        // threads; 128 candidates are two of the BiLSTM's chunks of 64, one per thread.
        let as_swaps: Vec<Swap> = swaps_for(&poisons, 128).into_iter().map(|(poison, position, word)| Swap { poison, position, word }).collect();
        let mut problem = problem;
        let mut seconds = Vec::new();
        let mut outcomes = Vec::new();
        for workers in [1, 2] {
            problem.workers = workers;
            let t = Instant::now();
            outcomes.push(Objective::verify(&problem, &poisons, &as_swaps).unwrap().after.to_bits());
            seconds.push(t.elapsed().as_secs_f64());
        }
        println!(
            "  verify of {} candidates on 1 worker {:.1} s, on 2 workers {:.1} s: {:.2}x; the same result bits: {}",
            as_swaps.len(), seconds[0], seconds[1], seconds[0] / seconds[1], outcomes[0] == outcomes[1]
        );
    }

    // How a round's cost grows: poison count, poison length (lstm; rank at the real vocabulary).
    println!("\nround cost against poison count and length (lstm): rollout-grad ms, shared checks/s, rank ms (5 positions x K=10 per poison)");
    let vic = victim(Arch::Lstm, &table);
    let banned = Tensor::zeros([VOCAB], (Kind::Float, Device::Cpu));
    for (count, lengths) in [(10, 10..=30), (50, 10..=30), (100, 10..=30), (50, 5..=10), (50, 30..=60)] {
        let ps = examples(&mut rng, count, lengths.clone(), Some(1));
        let problem = BiLevel::new(&vic, &clean, &adv, rollout_config()).unwrap();
        let rollout = time(3, || {
            let _ = problem.objective_and_grad(&ps).unwrap();
        });
        let swaps = swaps_for(&ps, 48);
        let (_, t) = shared_checks(&problem, &ps, &swaps);
        let (_, grad) = problem.objective_and_grad(&ps).unwrap();
        let rank = time(3, || {
            for (i, p) in ps.iter().enumerate() {
                let _ = bottom_k(&table, &grad.get(i as i64), None, &p.ids, &banned, 10);
            }
        });
        let checks = count * 5 * 10;
        let round = rollout + rank + checks as f64 * t / swaps.len() as f64;
        println!(
            "  {count:>3} poisons of {:>2}-{:<2} tokens: rollout {:>6.1} ms, checks {:>6.1}/s, rank {:>6.1} ms; a round of {checks} checks {:>6.1} s",
            lengths.start(), lengths.end(), rollout * 1e3, swaps.len() as f64 / t, rank * 1e3, round
        );
    }

    // Ranking: Taylor scores of 50 poisons x 30 positions against vocabularies of three sizes.
    println!("\nrank-candidates scoring against vocabulary size (50 poisons x 30 positions, bottom-50 per position)");
    for v in [20_000i64, 100_000, 400_000] {
        let table = Tensor::randn([v, DIM], (Kind::Float, Device::Cpu));
        let grad = Tensor::randn([50, 30, DIM], (Kind::Float, Device::Cpu));
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
                let _ = bottom_k(&table, &grad.get(i), None, &ids, &banned, 50);
            }
        });
        println!("  vocabulary {v:>7}: one position at a time {per_position:.2} s, one product per poison (shipped) {batched:.2} s");
    }
}
