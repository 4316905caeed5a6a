//! `cargo bench --bench minilm`: what the MiniLM victim (issue 4) will cost on this CPU,
//! measured before it becomes a victim of the stages: fine-tuning speed and dev accuracy
//! on a subset of the real Rotten Tomatoes split, and one unrolled step with its
//! second-order gradient. Needs `make data` and scripts/fetch_minilm.sh.
//!   MINILM_TRAIN (default 2000) training sentences, MINILM_EPOCHS (1), batch 32,
//!   Adam at 3e-5 on every encoder weight and a fresh linear head.

use common::victims::bert::{encode, load_weights, mean_pool, word_embeddings, BertConfig};
use common::victims::model::Params;
use common::formats::records::Example;
use common::wordpiece::WordPiece;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const DATA: &str = "data/rt-james-bond-positive-s0";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn batch(wp: &WordPiece, examples: &[&Example], max_len: usize) -> (Tensor, Tensor, Tensor) {
    let encoded: Vec<Vec<i64>> = examples.iter().map(|e| {
        let mut ids = wp.encode(&e.text);
        ids.truncate(max_len);
        ids
    }).collect();
    let t = encoded.iter().map(Vec::len).max().unwrap_or(1);
    let flat: Vec<i64> = encoded.iter().flat_map(|ids| ids.iter().copied().chain(std::iter::repeat_n(0, t - ids.len()))).collect();
    let ids = Tensor::from_slice(&flat).view([examples.len() as i64, t as i64]);
    let labels = Tensor::from_slice(&examples.iter().map(|e| e.label as i64).collect::<Vec<_>>());
    let mask = ids.ne(0);
    (ids, mask, labels)
}

fn logits(cfg: &BertConfig, params: &Params, ids: &Tensor, mask: &Tensor) -> Tensor {
    let pooled = mean_pool(&encode(cfg, params, &word_embeddings(params, ids), mask), mask);
    pooled.matmul(&params["head.weight"].tr()) + &params["head.bias"]
}

fn main() {
    common::numerics::pin(); // the binaries' CPU code paths and one libtorch thread
    let wp = WordPiece::from_tokenizer_json("data/minilm/tokenizer.json").expect("run scripts/fetch_minilm.sh");
    let cfg = BertConfig::from_json("data/minilm/config.json").unwrap();
    let mut params = load_weights("data/minilm/model.safetensors", Device::Cpu).unwrap();
    tch::manual_seed(0);
    params.insert("head.weight".into(), Tensor::randn([2, cfg.hidden_size], (Kind::Float, Device::Cpu)) * 0.02);
    params.insert("head.bias".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu)));
    for t in params.values_mut() {
        *t = t.detach().set_requires_grad(true);
    }
    let train: Vec<Example> = common::io::read_jsonl(&format!("{DATA}/train.jsonl"), false).expect("run make data");
    let dev: Vec<Example> = common::io::read_jsonl(&format!("{DATA}/dev.jsonl"), false).unwrap();
    let n = env("MINILM_TRAIN", 2000).min(train.len());
    let epochs = env("MINILM_EPOCHS", 1);
    let lengths: Vec<usize> = train.iter().map(|e| wp.encode(&e.text).len()).collect();
    println!("MiniLM on this CPU ({} libtorch threads); Rotten Tomatoes train {} sentences, WordPiece length mean {:.1}, max {}",
        tch::get_num_threads(), train.len(), lengths.iter().sum::<usize>() as f64 / lengths.len() as f64, lengths.iter().max().unwrap());

    let eval = |params: &Params| -> f64 {
        let mut correct = 0i64;
        tch::no_grad(|| {
            for chunk in dev.chunks(64) {
                let refs: Vec<&Example> = chunk.iter().collect();
                let (ids, mask, labels) = batch(&wp, &refs, 64);
                correct += logits(&cfg, params, &ids, &mask).argmax(-1, false).eq_tensor(&labels).sum(Kind::Int64).int64_value(&[]);
            }
        });
        100.0 * correct as f64 / dev.len() as f64
    };
    let t = Instant::now();
    let before = eval(&params);
    let eval_s = t.elapsed().as_secs_f64();

    // Adam over every parameter (the word table included), lr 3e-5, as BERT fine-tuning does.
    // BERT's pooler (a dense layer on [CLS]) is unused with mean pooling.
    let names: Vec<String> = params.keys().filter(|k| !k.starts_with("pooler.")).cloned().collect();
    let mut m: Vec<Tensor> = names.iter().map(|k| params[k].zeros_like()).collect();
    let mut v: Vec<Tensor> = names.iter().map(|k| params[k].zeros_like()).collect();
    let (lr, b1, b2, eps) = (3e-5, 0.9, 0.999, 1e-8);
    let mut step = 0;
    let t = Instant::now();
    for _ in 0..epochs {
        for chunk in train[..n].chunks(32) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (ids, mask, labels) = batch(&wp, &refs, 64);
            let loss = common::train::cross_entropy(&logits(&cfg, &params, &ids, &mask), &labels);
            let tensors: Vec<&Tensor> = names.iter().map(|k| &params[k]).collect();
            let grads = Tensor::run_backward(&[&loss], &tensors, false, false);
            step += 1;
            tch::no_grad(|| {
                for (i, g) in grads.iter().enumerate() {
                    m[i] = &m[i] * b1 + g * (1.0 - b1);
                    v[i] = &v[i] * b2 + g.square() * (1.0 - b2);
                    let mh = &m[i] / (1.0 - b1.powi(step));
                    let vh = &v[i] / (1.0 - b2.powi(step));
                    let mut p = params[&names[i]].shallow_clone();
                    let _ = p.g_sub_(&(mh / (vh.sqrt() + eps) * lr));
                }
            });
        }
    }
    let train_s = t.elapsed().as_secs_f64();
    let after = eval(&params);
    println!("fine-tuning: {n} sentences x {epochs} epoch(s) in {train_s:.1} s ({:.0} ms per batch of 32); dev accuracy {before:.1} before, {after:.1} after ({} dev sentences, {eval_s:.1} s to evaluate)",
        1e3 * train_s / step as f64, dev.len());

    // One unrolled SGD step on 50 poisons + 64 clean sentences, L_adv on 128, and the
    // gradient with respect to the poisons' word embeddings (through the inner step).
    let poisons: Vec<&Example> = train.iter().filter(|e| e.label == 1).take(50).collect();
    let clean: Vec<&Example> = train.iter().skip(100).take(64).collect();
    let adv: Vec<&Example> = train.iter().filter(|e| e.label == 0).take(128).collect();
    let (pids, pmask, plabels) = batch(&wp, &poisons, 64);
    let (cids, cmask, clabels) = batch(&wp, &clean, 64);
    let (aids, amask, _) = batch(&wp, &adv, 64);
    let trainable: Vec<String> = names.iter().filter(|k| !k.contains("word_embeddings")).cloned().collect();
    let rollout = || {
        let pe = word_embeddings(&params, &pids).detach().set_requires_grad(true);
        let tensors: Vec<&Tensor> = trainable.iter().map(|k| &params[k]).collect();
        let cl = common::train::cross_entropy(&logits(&cfg, &params, &cids, &cmask), &clabels) * (64.0 / 114.0);
        let cg = Tensor::run_backward(&[&cl], &tensors, false, false);
        let pooled = mean_pool(&encode(&cfg, &params, &pe, &pmask), &pmask);
        let pl = common::train::cross_entropy(&(pooled.matmul(&params["head.weight"].tr()) + &params["head.bias"]), &plabels) * (50.0 / 114.0);
        let pg = Tensor::run_backward(&[&pl], &tensors, true, true);
        let mut stepped = common::victims::model::shallow_copy(&params);
        for ((k, c), p) in trainable.iter().zip(cg).zip(pg) {
            stepped.insert(k.clone(), &params[k] - (c + p) * 0.03);
        }
        let target = Tensor::ones([adv.len() as i64], (Kind::Int64, Device::Cpu));
        let ladv = common::train::cross_entropy(&logits(&cfg, &stepped, &aids, &amask), &target);
        let g = Tensor::run_backward(&[&ladv], &[&pe], false, false);
        (ladv.double_value(&[]), g[0].abs().sum(Kind::Double).double_value(&[]))
    };
    let _ = rollout();
    let t = Instant::now();
    let (ladv, gsum) = rollout();
    let rollout_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    {
        let tensors: Vec<&Tensor> = names.iter().map(|k| &params[k]).collect();
        let (ids, mask, labels) = batch(&wp, &clean.iter().copied().chain(poisons.iter().copied()).collect::<Vec<_>>(), 64);
        let loss = common::train::cross_entropy(&logits(&cfg, &params, &ids, &mask), &labels);
        let _ = Tensor::run_backward(&[&loss], &tensors, false, false);
    }
    let step_s = t.elapsed().as_secs_f64();
    println!("rollout-grad (1 step, 50 poisons + 64 clean, L_adv on 128): {:.2} s, {:.1} training steps on the same minibatch ({:.2} s); L_adv {ladv:.4}, |grad| {gsum:.3e}",
        rollout_s, rollout_s / step_s, step_s);
}
