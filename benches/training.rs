//! `make bench` (training): victims trained per minute, the old stacked trainer beside
//! the per-victim one (`train::train_all`) in one run, on 2 worker threads as
//! finetune-eval uses them on 2 cores. Synthetic inputs of the demo's sizes: the BiLSTM
//! and bag-of-words over a 55,178 × 50 frozen table (hidden 64), the demo-lm GPT (6,770 ×
//! 50, width 128, 2 blocks of 4 heads); 1,000 texts of 4–40 tokens (LM: 10–30), 1 epoch,
//! batch 32, 16 victims (GPT: 4) of different seeds, half of them with 50 poisons. (The
//! demo's evaluation trains 100 victims: the old way stacked 50 per thread.)
//! The per-victim trainer's bits do not depend on the neighbours, the workers or the
//! threads (common/tests/determinism.rs); the stacked one's do.

use common::victims::gpt::GptShape;
use common::victims::loss::Target;
use common::victims::model::{ArchConfig, Arch, Victim, VictimConfig};
use common::train::{train_all, TrainData, TrainOptions};
use common::encode::Encoded;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
#[path = "support/stacked.rs"]
mod stacked;

fn texts(rng: &mut rand_chacha::ChaCha8Rng, n: usize, vocab: i64, lengths: std::ops::RangeInclusive<usize>, lm: bool) -> Vec<Encoded> {
    (0..n)
        .map(|_| {
            let len = rng.gen_range(lengths.clone());
            let ids = (0..len).map(|_| rng.gen_range(2..vocab)).collect();
            if lm {
                Encoded { ids, target: Target::NextToken { from: 1 } }
            } else {
                Encoded::class(ids, rng.gen_range(0..2))
            }
        })
        .collect()
}

/// Seconds to train `victims` fresh victims of `config` one epoch, the old way and the new.
fn measure(name: &str, config: &VictimConfig, vocab: i64, lengths: std::ops::RangeInclusive<usize>, texts_per_victim: usize, victims: usize) {
    let lm = config.output() == common::victims::victim::Output::NextToken;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    tch::manual_seed(1);
    let table = Tensor::randn([vocab, 50], (Kind::Float, Device::Cpu)) * 0.4;
    let clean = texts(&mut rng, texts_per_victim, vocab, lengths.clone(), lm);
    let poisons = texts(&mut rng, 50, vocab, lengths, lm);
    let data: Vec<TrainData> = (0..victims).map(|i| if i % 2 == 0 { TrainData::clean(&clean) } else { TrainData::poisoned(&clean, &poisons) }).collect();
    let opts: Vec<TrainOptions> = (0..victims).map(|i| TrainOptions { epochs: 1, batch_size: 32, lr: 2e-3, seed: i as u64, schedule: Default::default(), regularisation: Default::default() }).collect();
    let fresh = || -> Vec<Victim> {
        (0..victims)
            .map(|i| {
                tch::manual_seed(i as i64);
                Victim::new(config.clone(), &table, Device::Cpu).unwrap()
            })
            .collect()
    };
    let workers = 2;
    // Alternating, twice each; the faster of each pair (the machine is noisy).
    let (mut old_s, mut new_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        let mut old = fresh();
        let t = Instant::now();
        stacked::train_parallel(&mut old, &data, &opts, workers, |_, _| {}, None, 0).unwrap();
        old_s = old_s.min(t.elapsed().as_secs_f64());
        let mut new = fresh();
        let t = Instant::now();
        train_all(&mut new, &data, &opts, workers, |_, _, _| {}, None).unwrap();
        new_s = new_s.min(t.elapsed().as_secs_f64());
    }
    let per_minute = |s: f64| 60.0 * victims as f64 / s;
    println!(
        "{name:<5} {victims:>2} victims × 1 epoch of {texts_per_victim} texts: stacked (2 stacks of {}) {:6.1} victims/min ({old_s:.1} s), per-victim {:6.1} victims/min ({new_s:.1} s): new/old speed {:.2}×",
        victims.div_ceil(workers),
        per_minute(old_s),
        per_minute(new_s),
        old_s / new_s
    );
}

fn main() {
    common::numerics::pin();
    println!("training throughput on {} cores, {} (common::numerics)", std::thread::available_parallelism().map_or(1, |n| n.get()), common::numerics::key());
    let glove = |arch: Arch| VictimConfig {
        arch: ArchConfig::from_flags(arch, 64, None, GptShape { layers: 2, heads: 4 }, 0, 64).unwrap(),
        vocab_size: 55_178,
        embed_dim: 50,
        num_classes: 2,
        train_embeddings: false,
        max_len: 64,
    };
    measure("lstm", &glove(Arch::Lstm), 55_178, 4..=40, 1000, 16);
    measure("bow", &glove(Arch::Bow), 55_178, 4..=40, 1000, 16);
    let gpt = VictimConfig {
        arch: ArchConfig::from_flags(Arch::Gpt, 128, None, GptShape { layers: 2, heads: 4 }, 0, 48).unwrap(),
        vocab_size: 6_770,
        embed_dim: 50,
        num_classes: 6_770,
        train_embeddings: false,
        max_len: 48,
    };
    measure("gpt", &gpt, 6_770, 10..=30, 1000, 4);
}
