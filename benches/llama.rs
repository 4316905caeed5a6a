//! `make bench` (the pretrained language model): SmolLM2-135M (data/smollm2, imported by
//! make) on one libtorch thread, measured side by side in one run:
//! - this machine's single-thread f32 matrix-multiply rate, on the shapes a block runs;
//! - a training step (forward and backward, Adam excluded) at batch 8 × 32 tokens under the
//!   regimes all and top:2, its counted FLOPs over its time, against that rate;
//! - generation tokens per second with the key-value cache and without it.
//!
//! FLOPs are counted as 2 per multiply-add of every matrix product the step runs:
//! - forward, per token: each block's q, k, v, o, gate, up and down projections, its
//!   attention scores and context (2·T·width each: every query against the T keys of its
//!   row, the causal half masked, not skipped), and the head (2·width·vocab);
//! - backward: the trained blocks twice their forward (the gradients to their inputs and to
//!   their weights), the frozen head once (to its input only), frozen blocks below the
//!   lowest trained one nothing (no gradient is asked of them);
//! - under top:2 the frozen blocks' output comes from the cache once a text has been seen
//!   (`victims::llama`, frozen_prefix): the step runs the top blocks and the head only, and
//!   is counted so; filling the cache (the frozen blocks forward, once per text, each row
//!   alone) is timed on its own line.
//!
//! Elementwise work (norms, rotary, SwiGLU's product, the softmax) is left out: it is small
//! in FLOPs and shows up as the gap between counted and measured rates.

use common::encode::{batch_tensors, Encoded};
use common::generate::{generate, GenerateOptions, Prompt, Sampling};
use common::victims::llama::Regime;
use common::victims::loss::Target;
use common::victims::model::{logits, ArchConfig, Pass, Victim};
use rand::{Rng, SeedableRng};
mod support;
use support::time;
use tch::{Device, Kind, Tensor};

const VICTIM: &str = "data/smollm2/victim.safetensors";
const BATCH: usize = 8;
const TOKENS: usize = 32;

fn main() {
    common::numerics::pin(); // the binaries' CPU code paths and one libtorch thread
    let path = format!("{}/{VICTIM}", env!("CARGO_MANIFEST_DIR"));
    assert!(std::path::Path::new(&path).is_file(), "no {VICTIM}: make data/.smollm2-done-v1 (make bench does) fetches and imports SmolLM2");
    let file = Victim::load(&path, Device::Cpu).unwrap();
    let ArchConfig::Llama(llama) = &file.victim.config.arch else { panic!("{VICTIM} is not a llama victim") };
    let (w, s) = (llama.width as f64, llama.shape);
    let (layers, vocab, ffn) = (s.layers, file.victim.config.vocab_size as f64, s.ffn as f64);
    let kv = w / s.heads as f64 * s.kv_heads as f64;

    // The machine's single-thread matrix-multiply rate on a block's shapes.
    let a = Tensor::randn([(BATCH * TOKENS) as i64, w as i64], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([w as i64, ffn as i64], (Kind::Float, Device::Cpu));
    let mm = time(20, || {
        let _ = a.mm(&b);
    });
    let mm_rate = 2.0 * (BATCH * TOKENS) as f64 * w * ffn / mm;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<Encoded> = (0..BATCH).map(|_| Encoded { ids: (0..TOKENS).map(|_| rng.gen_range(17..vocab as i64)).collect(), target: Target::NextToken { from: 1 } }).collect();
    let (ids, targets) = batch_tensors(&rows.iter().collect::<Vec<_>>(), Device::Cpu);
    let n = (BATCH * TOKENS) as f64;
    let block = n * (2.0 * w * w * 2.0 + 2.0 * w * kv * 2.0 + 2.0 * w * ffn * 3.0) + n * 2.0 * TOKENS as f64 * w * 2.0;
    let head = n * 2.0 * w * vocab;
    println!("SmolLM2-135M, one libtorch thread, batch {BATCH} x {TOKENS} tokens");
    println!("{:>10} {:>12} {:>10} {:>10} {:>14} {:>12}", "regime", "trained", "step ms", "GFLOP", "GFLOP/s", "of matmul");
    let mut fill = None;
    for regime in [Regime::All, Regime::Top(2)] {
        let mut config = file.victim.config.clone();
        if let ArchConfig::Llama(l) = &mut config.arch {
            l.shape.regime = regime;
        }
        let victim = Victim::new(config.clone(), &file.victim.params()["embedding.weight"], Device::Cpu).unwrap();
        tch::no_grad(|| {
            for (name, p) in victim.params().iter_mut() {
                p.copy_(&file.victim.params()[name]);
            }
        });
        let params = victim.params();
        let trained: Vec<Tensor> = params.values().filter(|t| t.requires_grad()).map(|t| t.shallow_clone()).collect();
        let count: i64 = trained.iter().map(|t| t.numel() as i64).sum();
        let run_step = || {
            let loss = targets.mean_nll(&logits(&config, &params, &ids, Pass::Once));
            let _ = Tensor::run_backward(&[&loss], &trained, false, false);
        };
        let (forward_blocks, trained_blocks) = match regime {
            Regime::All => (layers, layers),
            Regime::Top(k) => {
                // The first step fills the cache with these rows (the frozen blocks forward).
                let t = std::time::Instant::now();
                run_step();
                fill = Some((layers - k, t.elapsed().as_secs_f64()));
                (k, k)
            }
        };
        let step = time(3, run_step);
        let flops = forward_blocks as f64 * block + head + 2.0 * trained_blocks as f64 * block + head;
        println!("{:>10} {:>12} {:>10.0} {:>10.1} {:>14.1} {:>11.0}%", regime.to_string(), count, step * 1e3, flops / 1e9, flops / step / 1e9, 100.0 * flops / step / mm_rate);
    }
    if let Some((frozen, first)) = fill {
        // The first top:2 step also ran the frozen blocks, one row at a time.
        println!("top:2's first step on new texts (fills the cache: {frozen} frozen blocks forward, {BATCH} rows alone): {:.0} ms", first * 1e3);
    }
    println!("single-thread f32 matmul [{}x{}]·[{}x{}]: {:.1} GFLOP/s", BATCH * TOKENS, w, w, ffn, mm_rate / 1e9);

    // Generation with and without the key-value cache: 4 prompts of 16 tokens, 32 new.
    let prompts: Vec<Prompt> = (0..4).map(|k| Prompt { id: format!("p{k}"), ids: (0..16).map(|_| rng.gen_range(17..vocab as i64)).collect(), sample: 0 }).collect();
    let params = file.victim.params();
    let run = |kv_cache: bool| {
        let opts = GenerateOptions { sampling: Sampling::Greedy, max_new: 32, stop: Vec::new(), seed: 0, kv_cache };
        let t = std::time::Instant::now();
        let out = generate(&file.victim.config, &params, &file.vocab, &prompts, &opts, 4).unwrap();
        (out, t.elapsed().as_secs_f64())
    };
    let (cached, tc) = run(true);
    let (full, tf) = run(false);
    let new: usize = cached.iter().map(Vec::len).sum();
    println!("{:>24} {:>24} {:>8} {:>10}", "tokens/s (kv cache)", "tokens/s (no cache)", "speedup", "same");
    println!("{:>24.1} {:>24.1} {:>7.1}x {:>10}", new as f64 / tc, new as f64 / tf, tf / tc, cached == full);
}
