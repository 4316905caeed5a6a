//! Text generation from a language-model victim: greedy or seeded sampling (temperature,
//! top-k), one generator per prompt and sample, so a prompt's continuation depends on the
//! seed, the prompt's id and the sample index only, never on what else is generated with
//! it.

use crate::victims::model::{embed, mask_of, Params, VictimConfig};
use crate::tokenizer::Vocab;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// The words that end a continuation by default (kept in it).
pub const STOP_WORDS: [&str; 3] = [".", "!", "?"];

/// The token ids that end a continuation for `words` (e.g. `STOP_WORDS`): each word the
/// vocabulary holds; with a BPE vocabulary also every piece whose text, spaces aside, is
/// made of those words' characters only ("." ".\n" "..." "?!"), since the model may write
/// the stop as any of them.
pub fn stop_ids(vocab: &Vocab, words: &[String]) -> Vec<i64> {
    let mut ids: Vec<i64> = words.iter().filter_map(|w| vocab.id(w)).collect();
    if vocab.is_bpe() {
        let chars: Vec<char> = words.iter().filter(|w| w.chars().count() == 1).filter_map(|w| w.chars().next()).collect();
        for id in 0..vocab.len() as i64 {
            if vocab.is_special(id) {
                continue;
            }
            let text = vocab.decode(&[id]);
            let core = text.trim();
            if !core.is_empty() && core.chars().all(|c| chars.contains(&c)) {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// How the next word is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The most likely word.
    Greedy,
    /// A draw from the softmax of logits / temperature over the top_k most likely words
    /// (top_k = 0: all words).
    Sample { temperature: f64, top_k: usize },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub sampling: Sampling,
    /// Words generated at most.
    pub max_new: usize,
    /// Words that end a continuation (kept in it), e.g. "." "!" "?".
    pub stop: Vec<i64>,
    pub seed: u64,
    /// Decode with the architecture's key-value cache (each step reads one new token per
    /// row instead of the whole prefix). The logits agree with the uncached pass to float
    /// summation order (`tests::cached_decoding_gives_the_uncached_logits`).
    pub kv_cache: bool,
}

/// One prompt to continue: its record id (which seeds its generator), its token ids and
/// the sample index.
pub struct Prompt {
    pub id: String,
    pub ids: Vec<i64>,
    pub sample: usize,
}

/// The continuation ids of every prompt, generated in batches of `batch` prompts. Special
/// tokens (padding, `<unk>`) are never generated. A continuation stops at a stop word, at
/// `max_new` words, or when the victim's `max_len` is full.
pub fn generate(config: &VictimConfig, params: &Params, vocab: &Vocab, prompts: &[Prompt], opts: &GenerateOptions, batch: usize) -> Result<Vec<Vec<i64>>> {
    if config.output() != crate::victims::victim::Output::NextToken {
        bail!("a {:?} victim is a classifier; generate needs a language model (train-victim --arch gpt)", config.arch.name());
    }
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let v = config.num_classes as i64;
    let banned: Vec<f64> = (0..v).map(|w| if vocab.is_special(w) { f64::NEG_INFINITY } else { 0.0 }).collect();
    let banned = Tensor::from_slice(&banned).to_device(device);
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(batch.max(1)) {
        let mut rows: Vec<Vec<i64>> = chunk.iter().map(|p| p.ids.clone()).collect();
        let mut rngs: Vec<ChaCha8Rng> =
            chunk.iter().map(|p| ChaCha8Rng::seed_from_u64(crate::data::seed_for(opts.seed, &format!("{}#{}", p.id, p.sample)))).collect();
        let mut done: Vec<bool> = rows.iter().map(|r| r.len() >= config.max_len).collect();
        let mut new: Vec<Vec<i64>> = vec![Vec::new(); chunk.len()];
        // The rows still generating, in the order of the current pass and its cache: a row
        // that finishes leaves the batch (and the cache), so the rest decode without it.
        let mut active: Vec<usize> = (0..rows.len()).filter(|&r| !done[r]).collect();
        let mut cache: Option<crate::victims::victim::KvCache> = None;
        for _ in 0..opts.max_new {
            if active.is_empty() {
                break;
            }
            // Each active row's last token's position.
            let last = Tensor::from_slice(&active.iter().map(|&r| rows[r].len() as i64 - 1).collect::<Vec<_>>()).to_device(device);
            let logits = tch::no_grad(|| match cache.as_mut() {
                Some(cache) => {
                    // One new token per row against the cache.
                    let words = Tensor::from_slice(&active.iter().map(|&r| *rows[r].last().expect("a prompt")).collect::<Vec<_>>()).to_device(device).unsqueeze(1);
                    config.arch().decode_step(params, cache, &embed(params, &words), &last)
                }
                None => {
                    let (ids, _, _) = crate::encode::padded(&active.iter().map(|&r| rows[r].as_slice()).collect::<Vec<_>>(), device);
                    let (emb, mask) = (embed(params, &ids), mask_of(&ids, params));
                    match opts.kv_cache.then(|| config.arch().prefill(params, &emb, &last)).flatten() {
                        Some((logits, filled)) => {
                            cache = Some(filled);
                            logits
                        }
                        // The logits at each row's last token (right padding: a causal
                        // model's earlier positions never see it).
                        None => config.arch().logits_at(params, &emb, &mask, &last),
                    }
                }
            });
            let logits = (logits.to_kind(Kind::Double) + &banned).to_device(Device::Cpu);
            for (k, &r) in active.iter().enumerate() {
                let row_logits: Vec<f64> = Vec::try_from(logits.get(k as i64))?;
                let word = choose(&row_logits, opts.sampling, &mut rngs[r]);
                rows[r].push(word);
                new[r].push(word);
                done[r] = opts.stop.contains(&word) || rows[r].len() >= config.max_len;
            }
            let keep: Vec<i64> = active.iter().enumerate().filter(|&(_, &r)| !done[r]).map(|(k, _)| k as i64).collect();
            if keep.len() < active.len() {
                if let Some(cache) = cache.as_mut() {
                    let keep = Tensor::from_slice(&keep).to_device(device);
                    for (keys, values) in cache.layers.iter_mut() {
                        (*keys, *values) = (keys.index_select(0, &keep), values.index_select(0, &keep));
                    }
                }
                active.retain(|&r| !done[r]);
            }
        }
        out.extend(new);
    }
    Ok(out)
}

/// The next word from one position's logits.
fn choose(logits: &[f64], sampling: Sampling, rng: &mut ChaCha8Rng) -> i64 {
    let argmax = |xs: &[f64]| xs.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).map(|(i, _)| i as i64).expect("a vocabulary");
    match sampling {
        Sampling::Greedy => argmax(logits),
        Sampling::Sample { temperature, top_k } => {
            let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
            // Highest first, ties by id: a total order, so the candidate list depends on
            // neither sort stability nor the selection below (which keeps a large
            // vocabulary's top k without sorting all of it).
            let highest_first = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
            if top_k > 0 && top_k < order.len() {
                order.select_nth_unstable_by(top_k - 1, highest_first);
                order.truncate(top_k);
            }
            order.sort_by(highest_first);
            let top = logits[order[0]];
            let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] - top) / temperature).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut u = rng.gen::<f64>() * total;
            for (&i, w) in order.iter().zip(&weights) {
                if u < *w {
                    return i as i64;
                }
                u -= w;
            }
            *order.last().expect("at least one word") as i64
        }
    }
}

/// Each row's next-token log-probabilities: for row r, `out[r][t]` = log p(ids[t + 1] |
/// ids[..=t]), from no-grad passes over right-padded batches of `batch` rows (a causal
/// model's row does not read its padding). Rows must fit the model's context.
pub fn next_token_logprobs(config: &VictimConfig, params: &Params, rows: &[Vec<i64>], batch: usize) -> Vec<Vec<f64>> {
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(batch.max(1)) {
        let (ids, _, _) = crate::encode::padded(&chunk.iter().map(Vec::as_slice).collect::<Vec<_>>(), device);
        let logp = tch::no_grad(|| crate::victims::model::logits(config, params, &ids, crate::victims::model::Pass::NoGrad).log_softmax(-1, None::<Kind>));
        for (r, row) in chunk.iter().enumerate() {
            if row.len() < 2 {
                out.push(Vec::new());
                continue;
            }
            let n = row.len() as i64 - 1;
            let next = Tensor::from_slice(&row[1..]).to_device(device).unsqueeze(-1);
            let picked = logp.get(r as i64).narrow(0, 0, n).gather(-1, &next, false).squeeze_dim(-1).to_kind(Kind::Double).to_device(Device::Cpu);
            out.push(Vec::try_from(picked).expect("a vector of log-probabilities"));
        }
    }
    out
}

/// Readable text of generated token ids: a BPE vocabulary's bytes decoded; other
/// vocabularies' words (or pieces) joined by spaces, how a word-level language model's
/// text reads.
pub fn detokenize(vocab: &Vocab, ids: &[i64]) -> String {
    if vocab.is_bpe() {
        return vocab.decode(ids);
    }
    ids.iter().map(|&i| vocab.word(i)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gathered_logits_equal_the_full_forward_at_those_positions() {
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let config = crate::victims::model::tiny_config(crate::victims::model::Arch::Gpt, 12, 6, 8, 2, false, 16);
        let v = crate::victims::model::Victim::new(config.clone(), &Tensor::randn([12, 6], (Kind::Float, Device::Cpu)), Device::Cpu).unwrap();
        let p = v.params();
        let ids = Tensor::from_slice(&[3i64, 4, 5, 6, 7, 8, 0, 0]).view([2, 4]);
        let last = Tensor::from_slice(&[3i64, 1]);
        let full = crate::victims::model::logits(&config, &p, &ids, crate::victims::model::Pass::Twice);
        let at = config.arch().logits_at(&p, &embed(&p, &ids), &mask_of(&ids, &p), &last);
        for (r, t) in [(0, 3), (1, 1)] {
            let diff = (full.get(r).get(t) - at.get(r)).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "row {r}: {diff}");
        }
    }

    #[test]
    fn cached_decoding_gives_the_uncached_logits() {
        // Right-padded prompts of different lengths, then three tokens each through the
        // cache: the logits at every step equal a full forward over the whole prefix (f64).
        let _guard = crate::TEST_RNG_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(5);
        let config = crate::victims::model::tiny_config(crate::victims::model::Arch::Gpt, 12, 6, 8, 2, false, 16);
        let mut v = crate::victims::model::Victim::new(config.clone(), &Tensor::randn([12, 6], (Kind::Float, Device::Cpu)), Device::Cpu).unwrap();
        v.vs.set_kind(Kind::Double);
        let p = v.params();
        let mut rows: Vec<Vec<i64>> = vec![vec![3, 4, 5, 6], vec![7, 8], vec![9]];
        let (ids, _, _) = crate::encode::padded(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), Device::Cpu);
        let last = |rows: &[Vec<i64>]| Tensor::from_slice(&rows.iter().map(|r| r.len() as i64 - 1).collect::<Vec<_>>());
        let (mut logits, mut cache) = config.arch().prefill(&p, &embed(&p, &ids), &last(&rows)).expect("a GPT has a cache");
        for step in 0..4 {
            let (ids, _, _) = crate::encode::padded(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), Device::Cpu);
            let full = crate::victims::model::logits(&config, &p, &ids, crate::victims::model::Pass::Twice);
            for (r, row) in rows.iter().enumerate() {
                let diff = (full.get(r as i64).get(row.len() as i64 - 1) - logits.get(r as i64)).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "step {step}, row {r}: {diff}");
            }
            for (r, row) in rows.iter_mut().enumerate() {
                row.push(2 + ((step + r) % 9) as i64);
            }
            let words = Tensor::from_slice(&rows.iter().map(|r| *r.last().unwrap()).collect::<Vec<_>>()).unsqueeze(1);
            logits = config.arch().decode_step(&p, &mut cache, &embed(&p, &words), &last(&rows));
        }
        // Generation through both paths: the same words, greedy and sampled.
        let words = [crate::tokenizer::PAD.to_string(), crate::tokenizer::UNK.to_string()].into_iter().chain((2..12).map(|i| format!("w{i}"))).collect();
        let vocab = crate::tokenizer::Vocab::new(words).unwrap();
        let prompts: Vec<Prompt> = [vec![3i64, 4, 5], vec![6], vec![7, 8, 9, 10, 11]]
            .into_iter()
            .enumerate()
            .map(|(i, ids)| Prompt { id: format!("p{i}"), ids, sample: 0 })
            .collect();
        for sampling in [Sampling::Greedy, Sampling::Sample { temperature: 1.0, top_k: 0 }] {
            let run = |kv_cache: bool| generate(&config, &p, &vocab, &prompts, &GenerateOptions { sampling, max_new: 9, stop: vec![5], seed: 1, kv_cache }, 2).unwrap();
            let cached = run(true);
            assert_eq!(cached, run(false), "{sampling:?}");
            assert!(cached.iter().any(|c| c.len() > 3), "the continuations run several steps");
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_sampling_follows_the_temperature_and_top_k() {
        let logits = [0.0, 2.0, 1.0, f64::NEG_INFINITY];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(choose(&logits, Sampling::Greedy, &mut rng), 1);
        let draws = |s: Sampling, rng: &mut ChaCha8Rng| (0..4000).map(|_| choose(&logits, s, rng)).collect::<Vec<_>>();
        let top1 = draws(Sampling::Sample { temperature: 1.0, top_k: 1 }, &mut rng);
        assert!(top1.iter().all(|&w| w == 1), "top-1 sampling is greedy");
        let all = draws(Sampling::Sample { temperature: 1.0, top_k: 0 }, &mut rng);
        assert!(!all.contains(&3), "a banned word is never drawn");
        let share = |xs: &[i64], w: i64| xs.iter().filter(|&&x| x == w).count() as f64 / xs.len() as f64;
        // softmax(0, 2, 1) = (0.090, 0.665, 0.245)
        assert!((share(&all, 1) - 0.665).abs() < 0.03 && (share(&all, 0) - 0.090).abs() < 0.02, "{} {}", share(&all, 1), share(&all, 0));
        let cold = draws(Sampling::Sample { temperature: 0.25, top_k: 0 }, &mut rng);
        assert!(share(&cold, 1) > 0.97, "a low temperature sharpens the distribution");
        let top2 = draws(Sampling::Sample { temperature: 1.0, top_k: 2 }, &mut rng);
        assert!(!top2.contains(&0), "top-2 never draws the third word");
    }
}
