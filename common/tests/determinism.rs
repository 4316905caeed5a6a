//! A victim's bits depend on its own inputs only: the same victim (initial weights, data,
//! options) trained alone, beside neighbours of longer and shorter texts, in groups of two
//! and five, on one or two worker threads, from a caller set to one or two libtorch
//! threads, ends with bit-identical f32 parameters, for every architecture. Sized so that
//! the arithmetic is big enough for libtorch to split work across threads and for padding
//! to change BLAS calls (the stacked trainer failed this). `scripts/test_cpu_paths.sh`
//! runs it again under the settings that emulate other CPUs (README, Reproducibility).

use clap::ValueEnum;
use common::victims::model::{tiny_config, Arch, Victim};
use common::train::{train, train_all, Regularisation, TrainData, TrainOptions};
use common::encode::Encoded;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

const VOCAB: usize = 300;
const WIDTH: usize = 32;

/// Texts of `lo..=hi` random content words (ids 2.. : 0 and 1 are padding and <unk>),
/// labelled by whether word 2 occurs more often than word 3, as classes or text.
fn texts(n: usize, lo: usize, hi: usize, seed: u64, lm: bool) -> Vec<Encoded> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.gen_range(lo..=hi);
            let ids: Vec<i64> = (0..len).map(|_| rng.gen_range(2..VOCAB as i64)).collect();
            if lm {
                Encoded::text(ids)
            } else {
                let label = (ids.iter().filter(|&&t| t % 2 == 0).count() * 2 > len) as i64;
                Encoded::class(ids, label)
            }
        })
        .collect()
}

fn victim(arch: Arch, table: &Tensor, seed: i64) -> Victim {
    // tiny_config: a 2-layer BERT / GPT of width WIDTH for minilm and gpt.
    let config = tiny_config(arch, VOCAB, WIDTH, WIDTH, 2, false, 32);
    tch::manual_seed(seed);
    Victim::new(config, table, Device::Cpu).unwrap()
}

fn bits(v: &Victim) -> Vec<(String, Vec<u8>)> {
    v.params()
        .iter()
        .map(|(name, t)| {
            let t = t.to_kind(Kind::Float).contiguous().view([-1]);
            let floats = Vec::<f32>::try_from(&t).unwrap();
            (name.clone(), floats.iter().flat_map(|f| f.to_bits().to_le_bytes()).collect())
        })
        .collect()
}

#[test]
fn a_victims_bits_depend_on_its_own_inputs_only() {
    tch::manual_seed(5);
    let table = Tensor::randn([VOCAB as i64, WIDTH as i64], (Kind::Float, Device::Cpu));
    for &arch in Arch::value_variants() {
        let lm = tiny_config(arch, VOCAB, WIDTH, WIDTH, 2, false, 32).output().over_vocab();
        let mine = texts(192, 4, 16, 1, lm);
        let poisons = texts(6, 3, 12, 2, lm);
        let longer = texts(160, 20, 32, 3, lm);
        let shorter = texts(224, 2, 5, 4, lm);
        // Dropout's masks and label smoothing where the architecture has them: the masks
        // are drawn from each victim's own seed, so the neighbours must not move them either.
        let config = tiny_config(arch, VOCAB, WIDTH, WIDTH, 2, false, 32);
        let regularisation = if config.arch().has_dropout() { Regularisation { dropout: 0.2, label_smoothing: 0.1 } } else { Regularisation::default() };
        let opts = |seed: u64, lr: f64| TrainOptions { epochs: 2, batch_size: 32, lr, seed, schedule: Default::default(), regularisation };
        let me = (TrainData::poisoned(&mine, &poisons), opts(11, 3e-3), 7);
        let neighbours = [
            (TrainData::clean(&longer), opts(12, 1e-3), 8),
            (TrainData::clean(&shorter), opts(13, 2e-3), 9),
            (TrainData::poisoned(&longer, &poisons), opts(14, 3e-3), 10),
            (TrainData::clean(&mine), opts(11, 3e-3), 7),
        ];
        // Alone, from a caller thread with two libtorch threads.
        tch::set_num_threads(2);
        let mut alone = victim(arch, &table, me.2);
        train(&mut alone, me.0, &me.1, |_, _| {}).unwrap();
        let reference = bits(&alone);
        assert_ne!(reference, bits(&victim(arch, &table, me.2)), "{arch:?}: training moved nothing");
        if !regularisation.is_none() {
            let mut plain = victim(arch, &table, me.2);
            train(&mut plain, me.0, &TrainOptions { regularisation: Regularisation::default(), ..me.1.clone() }, |_, _| {}).unwrap();
            assert_ne!(reference, bits(&plain), "{arch:?}: dropout and label smoothing changed nothing");
        }
        // (neighbours before, neighbours after, workers, caller threads)
        for (before, after, workers, threads) in [(0, 1, 1, 1), (1, 0, 2, 2), (2, 2, 2, 1), (1, 3, 1, 2), (4, 0, 2, 2)] {
            tch::set_num_threads(threads);
            let group: Vec<_> = neighbours[..before].iter().chain(std::iter::once(&me)).chain(&neighbours[4 - after.min(4)..][..after]).collect();
            let mut victims: Vec<Victim> = group.iter().map(|g| victim(arch, &table, g.2)).collect();
            let data: Vec<TrainData> = group.iter().map(|g| g.0).collect();
            let options: Vec<TrainOptions> = group.iter().map(|g| g.1.clone()).collect();
            train_all(&mut victims, &data, &options, workers, |_, _, _| {}, None).unwrap();
            assert!(
                bits(&victims[before]) == reference,
                "{arch:?}: the victim's parameters changed bits when trained after {before} and before {after} neighbours on {workers} worker(s), caller at {threads} thread(s)"
            );
        }
    }
}
