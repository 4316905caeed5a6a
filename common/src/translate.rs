//! Translation by a seq2seq victim: greedy decoding or beam search, without a graph, in
//! batches of sources. Each source's translation depends on that source only (its rows are
//! its own beams; the others in the batch differ only in float summation order).

use crate::embeddings::{BOS, EOS};
use crate::encode::source_block;
use crate::tokenizer::{Vocab, PAD_ID};
use crate::victims::model::{embed, mask_of, ArchConfig, Params, VictimConfig};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// How translations are searched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchOptions {
    /// Hypotheses kept per source; 1 is greedy decoding.
    pub beam: usize,
    /// Target tokens generated at most (besides `</s>`); the victim's decoder length caps it.
    pub max_new: usize,
}


/// The translations (target ids, without `<s>` and `</s>`) of `sources` (source ids),
/// `batch` sources at a time. Beam search keeps `beam` hypotheses per source by summed log
/// probability; a hypothesis that writes `</s>` is finished, and the best finished one by
/// mean log probability per token (its `</s>` counted) is returned. Special tokens other
/// than `</s>` are never written.
pub fn translate(config: &VictimConfig, params: &Params, vocab: &Vocab, sources: &[Vec<i64>], opts: SearchOptions, batch: usize) -> Result<Vec<Vec<i64>>> {
    let ArchConfig::Seq2seq(s2s) = &config.arch else {
        bail!("a {:?} victim does not translate; give a seq2seq victim (train-victim --arch seq2seq)", config.arch.name());
    };
    let (Some(bos), Some(eos)) = (vocab.id(BOS), vocab.id(EOS)) else { bail!("the victim's vocabulary lacks {BOS} and {EOS}") };
    let source_len = s2s.shape.source_len;
    let max_new = opts.max_new.min(config.max_len - source_len - 1);
    let beam = opts.beam.max(1);
    let device = params.values().next().map_or(Device::Cpu, |t| t.device());
    let v = config.num_classes as i64;
    let banned: Vec<f64> = (0..v).map(|w| if w != eos && (vocab.is_special(w) || w == bos) { f64::NEG_INFINITY } else { 0.0 }).collect();
    let banned = Tensor::from_slice(&banned).to_device(device);
    let mut out = Vec::with_capacity(sources.len());
    for chunk in sources.chunks(batch.max(1)) {
        // Row k·beam + b is hypothesis b of source k; at the start only b = 0 is live.
        let mut rows: Vec<Vec<i64>> = chunk.iter().flat_map(|s| std::iter::repeat_n(source_block(s, source_len, bos), beam)).collect();
        let mut score: Vec<f64> = (0..rows.len()).map(|r| if r % beam == 0 { 0.0 } else { f64::NEG_INFINITY }).collect();
        let mut finished: Vec<Vec<(f64, Vec<i64>)>> = vec![Vec::new(); chunk.len()];
        for step in 0..=max_new {
            let (ids, _, _) = crate::encode::padded(&rows.iter().map(Vec::as_slice).collect::<Vec<_>>(), device);
            let last = Tensor::full([rows.len() as i64], (source_len + step) as i64, (Kind::Int64, device));
            let logits = tch::no_grad(|| config.arch().logits_at(params, &embed(params, &ids), &mask_of(&ids, params), &last));
            let logp = (logits.to_kind(Kind::Double).log_softmax(-1, None::<Kind>) + &banned).to_device(Device::Cpu);
            let logp: Vec<f64> = Vec::try_from(logp.flatten(0, -1))?;
            let mut next_rows = Vec::with_capacity(rows.len());
            let mut next_score = Vec::with_capacity(rows.len());
            for k in 0..chunk.len() {
                // Every extension of source k's live hypotheses, best first (ties by row, word).
                let mut cands: Vec<(f64, usize, i64)> = Vec::new();
                for b in 0..beam {
                    let r = k * beam + b;
                    if score[r] == f64::NEG_INFINITY {
                        continue;
                    }
                    let row_lp = &logp[r * v as usize..(r + 1) * v as usize];
                    cands.extend(best_words(row_lp, beam).into_iter().map(|w| (score[r] + row_lp[w], r, w as i64)));
                }
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
                let mut live = Vec::new();
                for (sc, r, w) in cands {
                    if live.len() == beam {
                        break;
                    }
                    let written = &rows[r][source_len + 1..];
                    if w == eos || step == max_new {
                        let len = written.len() + 1;
                        let words: Vec<i64> = if w == eos { written.to_vec() } else { written.iter().copied().chain([w]).collect() };
                        finished[k].push((sc / len as f64, words));
                        continue;
                    }
                    let mut row = rows[r].clone();
                    row.push(w);
                    live.push((sc, row));
                }
                // Sources done early keep their rows (at -inf) so the batch stays aligned.
                for b in 0..beam {
                    match live.get(b) {
                        Some((sc, row)) => {
                            next_rows.push(row.clone());
                            next_score.push(*sc);
                        }
                        None => {
                            let mut row = rows[k * beam].clone();
                            row.push(PAD_ID);
                            next_rows.push(row);
                            next_score.push(f64::NEG_INFINITY);
                        }
                    }
                }
            }
            rows = next_rows;
            score = next_score;
            if score.iter().all(|s| *s == f64::NEG_INFINITY) {
                break;
            }
        }
        for f in finished {
            let best = f.into_iter().enumerate().max_by(|(i, a), (j, b)| a.0.total_cmp(&b.0).then(j.cmp(i))).map(|(_, (_, w))| w).unwrap_or_default();
            out.push(best);
        }
    }
    Ok(out)
}

/// The `n` words of highest log probability in `row_lp`, best first, ties by the lower id;
/// words at -inf (banned) never. The same words in the same order as sorting the whole row
/// by that order and taking `n`, in one pass: a full sort of the vocabulary for every row at
/// every step was most of a greedy translation's time.
fn best_words(row_lp: &[f64], n: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (w, lp) in row_lp.iter().enumerate() {
        if !lp.is_finite() || (best.len() == n && lp.total_cmp(&row_lp[best[n - 1]]).is_le()) {
            continue;
        }
        // Ids come in increasing order, so an equal score already kept stays before w.
        let at = best.partition_point(|&b| row_lp[b].total_cmp(lp).is_ge());
        best.insert(at, w);
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::best_words;

    #[test]
    fn best_words_are_the_head_of_the_fully_sorted_row() {
        // Ties, -0.0 beside 0.0, banned words, and n beyond the finite words.
        let row = [-1.0, -0.5, f64::NEG_INFINITY, -0.5, 0.0, -0.0, -3.0, -0.5, f64::NEG_INFINITY, -2.0];
        let mut sorted: Vec<usize> = (0..row.len()).filter(|&w| row[w].is_finite()).collect();
        sorted.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for n in 1..=10 {
            assert_eq!(best_words(&row, n), sorted.iter().copied().take(n).collect::<Vec<_>>(), "n = {n}");
        }
        let mut state = 12345u64;
        for _ in 0..200 {
            let row: Vec<f64> = (0..50)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    match state >> 60 {
                        0 => f64::NEG_INFINITY,
                        k => -((k % 5) as f64) / 2.0,
                    }
                })
                .collect();
            let mut sorted: Vec<usize> = (0..row.len()).filter(|&w| row[w].is_finite()).collect();
            sorted.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for n in [1, 3, 7] {
                assert_eq!(best_words(&row, n), sorted.iter().copied().take(n).collect::<Vec<_>>());
            }
        }
    }
}
