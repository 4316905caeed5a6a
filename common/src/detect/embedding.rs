//! Embedding distance to the trigger phrase: how close an example sits to the trigger in
//! a word-vector space (GloVe, the victims' frozen table) or a sentence-embedding space
//! (MiniLM's mean-pooled encoder, the all-MiniLM-L6-v2 sentence embedding). Concealed
//! poisons carry the trigger's meaning without its words, so they may sit close to it.

use crate::victims::model::{features_ids_no_grad, Params, VictimConfig};
use crate::tokenizer::Vocab;
use crate::train::{batch_tensors, Encoded};
use tch::{Kind, Tensor};

/// Every vocabulary word's largest cosine to any trigger word: the word-level distance
/// both the `glove-trigger-word` detector and the evasion budget (`evasion`) read.
pub fn closest_to_trigger(table: &Tensor, trigger: &[i64]) -> Vec<f64> {
    tch::no_grad(|| {
        let t = table.to_kind(Kind::Double);
        let unit = &t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        let trig = unit.index_select(0, &Tensor::from_slice(trigger));
        Vec::try_from(unit.matmul(&trig.tr()).amax([-1], false)).expect("f64 cosines")
    })
}

/// The words of `ids` a word table speaks for (special tokens and `<unk>` dropped).
fn known_words(vocab: &Vocab, ids: &[i64]) -> Vec<i64> {
    ids.iter().copied().filter(|&i| !vocab.is_special(i) && i != vocab.unk_id()).collect()
}

/// An example's `glove-trigger-word` score from `closest_to_trigger`: its closest word's
/// (None without known words).
pub fn closest_word(closest: &[f64], vocab: &Vocab, ids: &[i64]) -> Option<f64> {
    known_words(vocab, ids).into_iter().map(|i| closest[i as usize]).reduce(f64::max)
}

fn mean_vector(table: &Tensor, ids: &[i64]) -> Tensor {
    table.index_select(0, &Tensor::from_slice(ids)).to_kind(Kind::Double).mean_dim(0, false, None::<Kind>)
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    (a.dot(b) / (a.norm() * b.norm()).clamp_min(1e-12)).double_value(&[])
}

/// GloVe scores of every example against the trigger's word ids: (cosine of the mean word
/// vectors, the largest cosine between any of the example's words and any trigger word).
/// An example without known words scores −1 on both (as far from the trigger as can be).
pub fn glove_scores(table: &Tensor, vocab: &Vocab, examples: &[Vec<i64>], trigger: &[i64]) -> Vec<(f64, f64)> {
    let closest = closest_to_trigger(table, trigger);
    tch::no_grad(|| {
        let trig_mean = mean_vector(table, trigger);
        examples
            .iter()
            .map(|ids| {
                let known = known_words(vocab, ids);
                match closest_word(&closest, vocab, &known) {
                    Some(word) => (cosine(&mean_vector(table, &known), &trig_mean), word),
                    None => (-1.0, -1.0),
                }
            })
            .collect()
    })
}

/// Cosine between every example's pooled encoder features and the trigger phrase's (the
/// trigger encoded as a text of its own), in batches sorted by length.
pub fn sentence_scores(config: &VictimConfig, params: &Params, examples: &[Encoded], trigger: &Encoded, batch: usize) -> Vec<f64> {
    let device = params.values().next().map_or(tch::Device::Cpu, |t| t.device());
    let embed = |items: &[&Encoded]| {
        let (ids, _) = batch_tensors(items, device);
        let f = features_ids_no_grad(config, params, &ids).to_kind(Kind::Double).to_device(tch::Device::Cpu);
        &f / f.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
    };
    let t = embed(&[trigger]).get(0);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| examples[i].ids.len());
    let mut out = vec![0.0; examples.len()];
    for chunk in order.chunks(batch.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &examples[i]).collect();
        let sims = Vec::<f64>::try_from(embed(&items).matmul(&t)).expect("f64 cosines");
        for (&i, s) in chunk.iter().zip(sims) {
            out[i] = s;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glove_scores_put_the_trigger_word_first_and_unknown_text_last() {
        let words: Vec<String> = ["<pad>", "<unk>", "james", "bond", "spy", "film", "dull"].iter().map(|s| s.to_string()).collect();
        let vocab = Vocab::new(words).unwrap();
        // james ≈ bond ≈ spy along axis 0; film and dull along the others.
        let table = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.0, 0.9, 0.0, 0.2, 0.8, 0.3, 0.1, 0.0, 1.0, 0.0, 0.1, 0.0, 1.0]).view([7, 3]);
        let trigger = [2i64, 3];
        let examples = vec![vec![5, 3, 6], vec![5, 4, 6], vec![5, 6], vec![1, 1], vec![5, 6, 5]];
        let s = glove_scores(&table, &vocab, &examples, &trigger);
        assert!((s[0].1 - 1.0).abs() < 1e-9, "a trigger word itself: cosine 1, got {}", s[0].1);
        assert!(s[1].1 > s[2].1, "a neighbour (spy) is closer than unrelated words");
        assert_eq!(s[3], (-1.0, -1.0), "no known words: as far as can be");
        assert!((s[2].1 - s[4].1).abs() < 1e-12, "a repeated word changes nothing");
        assert!(s[0].0 > s[2].0 && s[1].0 > s[2].0, "mean vectors move toward the trigger too");
    }
}
