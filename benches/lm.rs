//! `make bench` (language model): the cost of a crafting round against the demo-lm GPT
//! (vocabulary 6,770 × 50 frozen, width 128, 2 blocks of 4 heads, max_len 48), as ratios
//! measured side by side in one run: rollout-grad (one unrolled step, the second-order
//! gradient and the word scores) over one training step on the same minibatch, and exact
//! checks of candidate flips per second, verify-candidates' shared path against redoing the
//! rollout per candidate. Synthetic token ids of the real sizes.

use common::generate::{generate, GenerateOptions, Prompt, Sampling};
use common::objectives::bilevel::{BiLevel, RolloutConfig, Replacement, Verifier};
use common::objectives::swaps::flipped;
use common::victims::gpt::GptShape;
use common::victims::loss::Target;
use common::victims::model::{logits, ArchConfig, Arch, Victim, VictimConfig, Pass};
use common::encode::{batch_tensors, Encoded};
use rand::{Rng, SeedableRng};
use std::time::Instant;
mod support;
use support::time;
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 6_770;

fn texts(rng: &mut rand_chacha::ChaCha8Rng, n: usize, lengths: std::ops::RangeInclusive<usize>, prompt: Option<usize>) -> Vec<Encoded> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(lengths.clone());
            Encoded { ids: (0..len).map(|_| rng.gen_range(2..VOCAB)).collect(), target: Target::NextToken { from: prompt.unwrap_or(1) } }
        })
        .collect()
}


fn main() {
    common::numerics::pin(); // the binaries' CPU code paths and one libtorch thread
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    tch::manual_seed(0);
    let table = Tensor::randn([VOCAB, 50], (Kind::Float, Device::Cpu)) * 0.4;
    let arch = ArchConfig::from_flags(Arch::Gpt, 128, None, GptShape { layers: 2, heads: 4 }, 0, 48).unwrap();
    let config = VictimConfig { arch, vocab_size: VOCAB as usize, embed_dim: 50, num_classes: VOCAB as usize, train_embeddings: false, max_len: 48 };
    let victim = Victim::new(config.clone(), &table, Device::Cpu).unwrap();
    let clean = texts(&mut rng, 2000, 10..=30, None);
    let adv = texts(&mut rng, 64, 15..=30, Some(6));
    let poisons = texts(&mut rng, 50, 10..=30, None);
    let problem = BiLevel::new(&victim, &clean, &adv, RolloutConfig { steps: 1, eta: 0.03, rollouts: 1, clean_per_batch: 64, adv_size: 64, seed: 0, regime: None }).unwrap();
    let batch: Vec<&Encoded> = problem.batches[0][0].iter().copied().chain(poisons.iter()).collect();
    let (ids, targets) = batch_tensors(&batch, Device::Cpu);
    let params = victim.params();
    let trainable: Vec<Tensor> = params.values().filter(|t| t.requires_grad()).map(|t| t.shallow_clone()).collect();
    let step = time(5, || {
        let loss = targets.mean_nll(&logits(&config, &params, &ids, Pass::Twice));
        let _ = Tensor::run_backward(&[&loss], &trainable, false, false);
    });
    let embedding_only = time(5, || {
        let _ = problem.objective_grad_and_word_scores(&poisons, false).unwrap();
    });
    let with_targets = time(5, || {
        let _ = problem.objective_grad_and_word_scores(&poisons, true).unwrap();
    });
    let swaps: Vec<(usize, usize, i64)> = (0..16).map(|k| (k % 50, k % poisons[k % 50].ids.len(), 2 + (k as i64 * 997) % (VOCAB - 2))).collect();
    let t = Instant::now();
    let naive: Vec<f64> = swaps
        .iter()
        .map(|&(i, j, w)| {
            let mut set = poisons.clone();
            set[i] = flipped(&set[i], j, w);
            problem.objective(&set)
        })
        .collect();
    let naive_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let verifier = Verifier::new(&problem, &poisons);
    let news: Vec<Encoded> = swaps.iter().map(|&(i, j, w)| flipped(&poisons[i], j, w)).collect();
    let grads = verifier.example_grads(&news);
    let sets: Vec<Vec<Replacement>> = swaps.iter().zip(&news).zip(&grads).map(|((&(i, _, _), example), g)| vec![Replacement { poison: i, example, grad: g }]).collect();
    let shared = verifier.objectives_with(&sets);
    let shared_s = t.elapsed().as_secs_f64();
    let max_diff = naive.iter().zip(&shared).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("language-model crafting costs on this machine ({cores} cores, {} libtorch threads), median of repeated runs", tch::get_num_threads());
    println!("GPT width 128, 2 blocks × 4 heads, vocabulary {VOCAB}; minibatch 64 clean + 50 poisons of 10-30 tokens; 64 D_adv prompts");
    println!();
    println!("{:>10} {:>22} {:>7} {:>20} {:>7} {:>15} {:>16} {:>8} {:>14}", "step ms", "rollout ms (embedding)", "ratio", "rollout ms (+target)", "ratio", "naive checks/s", "shared checks/s", "speedup", "max |Δ value|");
    println!(
        "{:>10.1} {:>22.1} {:>7.2} {:>20.1} {:>7.2} {:>15.2} {:>16.2} {:>7.1}x {:>14.1e}",
        step * 1e3,
        embedding_only * 1e3,
        embedding_only / step,
        with_targets * 1e3,
        with_targets / step,
        swaps.len() as f64 / naive_s,
        swaps.len() as f64 / shared_s,
        naive_s / shared_s,
        max_diff
    );
    println!("\"ratio\": rollout-grad over one training step on the same minibatch; \"+target\": with the target");
    println!("scores a language model's ranking needs (one Jacobian-vector product of the poisons' log-probabilities).");
    println!("\"checks/s\": exact objective evaluations of candidate flips (16), naive redoing the rollout per candidate,");
    println!("shared being verify-candidates' path (set-up included); |Δ value|: the largest difference between them.");

    // A trained word table (the ranking's row term: the poisons as one-hot rows x through
    // each step's table) against the frozen table's rollout, same sizes.
    let trained_config = VictimConfig { train_embeddings: true, ..config.clone() };
    let trained = Victim::new(trained_config, &table, Device::Cpu).unwrap();
    let trained_problem = BiLevel::new(&trained, &clean, &adv, RolloutConfig { steps: 1, eta: 0.03, rollouts: 1, clean_per_batch: 64, adv_size: 64, seed: 0, regime: None }).unwrap();
    let trained_rollout = time(5, || {
        let _ = trained_problem.objective_grad_and_word_scores(&poisons, true).unwrap();
    });
    println!();
    println!("{:>28} {:>26} {:>7}", "rollout ms (frozen, +target)", "rollout ms (trained table)", "ratio");
    println!("{:>28.1} {:>26.1} {:>7.2}", with_targets * 1e3, trained_rollout * 1e3, trained_rollout / with_targets);

    // Generation: 64 prompts of 8-20 words, 24 new words each (no stop word), sampled, with
    // the key-value cache against recomputing the prefix at every step; the same words.
    let words: Vec<String> = [common::tokenizer::PAD.to_string(), common::tokenizer::UNK.to_string()].into_iter().chain((2..VOCAB).map(|i| format!("w{i}"))).collect();
    let vocab = common::tokenizer::Vocab::new(words).unwrap();
    let prompts: Vec<Prompt> = texts(&mut rng, 64, 8..=20, None).into_iter().enumerate().map(|(i, e)| Prompt { id: format!("p{i}"), ids: e.ids, sample: 0 }).collect();
    let opts = |kv_cache| GenerateOptions { sampling: Sampling::Sample { temperature: 1.0, top_k: 40 }, max_new: 24, stop: vec![], seed: 0, kv_cache };
    let mut outputs = Vec::new();
    let mut gen_time = |kv_cache: bool| {
        time(3, || {
            outputs.push(generate(&config, &params, &vocab, &prompts, &opts(kv_cache), 32).unwrap());
        })
    };
    let (uncached, cached) = (gen_time(false), gen_time(true));
    let same = outputs.windows(2).all(|w| w[0] == w[1]);
    println!();
    println!("{:>24} {:>22} {:>8} {:>11}", "generate s (no cache)", "generate s (kv cache)", "speedup", "same words");
    println!("{:>24.2} {:>22.2} {:>7.1}x {:>11}", uncached, cached, uncached / cached, same);
    println!("generate: 64 prompts of 8-20 words, 24 sampled words each, batches of 32 (finetune-eval's measure).");
}
