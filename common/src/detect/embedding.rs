//! Embedding distance to the trigger phrase: how close an example sits to the trigger in
//! a word-vector space (GloVe, the victims' frozen table) or a sentence-embedding space
//! (MiniLM's mean-pooled encoder, the all-MiniLM-L6-v2 sentence embedding). Concealed
//! poisons carry the trigger's meaning without its words, so they may sit close to it.

use crate::victims::model::{features_ids_no_grad, Params, VictimConfig};
use crate::tokenizer::Vocab;
use crate::encode::{batch_tensors, Encoded};
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

/// Word ids of every example under `vocab`, as the table detectors read it: a text's
/// `tokens` when it has them, else its words; a translation pair's words of both sides
/// (`source` and `text`, which a poison keeps in step with its layout).
pub(crate) fn example_ids(vocab: &Vocab, examples: &[crate::formats::records::Example]) -> Vec<Vec<i64>> {
    examples
        .iter()
        .map(|e| match (&e.source, &e.tokens) {
            (Some(source), _) => vocab.encode(source).into_iter().chain(vocab.encode(&e.text)).collect(),
            (None, Some(t)) => t.iter().map(|w| vocab.id(w).unwrap_or(vocab.unk_id())).collect(),
            (None, None) => vocab.encode(&e.text),
        })
        .collect()
}

/// The two table scores of every example (`glove_scores`) in the word table of `base`
/// (`what` names the detectors in errors).
fn table_detector_scores(s: &super::Screen, base: Option<&crate::victims::origin::Origin>, what: &str, flag: &str) -> anyhow::Result<Vec<(f64, f64)>> {
    use anyhow::Context;
    let base = base.with_context(|| format!("the {what} detectors need {flag}"))?;
    let crate::victims::origin::Start::Table(table) = &base.start else { anyhow::bail!("the {what} detectors need a word table ({flag}), not a pretrained encoder") };
    let phrase = s.trigger.with_context(|| format!("the {what} detectors need --trigger"))?;
    let trigger = base.vocab.trigger_ids(phrase).with_context(|| format!("vocabulary of {}", base.source))?;
    Ok(glove_scores(table, &base.vocab, &example_ids(&base.vocab, s.examples), &trigger))
}

/// `glove-trigger` (cosine of the mean GloVe vector to the trigger's) and
/// `glove-trigger-word` (largest cosine of any word to any trigger word), in one pass.
pub struct GloveDistance;

impl super::Family for GloveDistance {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::GloveTrigger, super::Detector::GloveTriggerWord]
    }
    fn needs(&self) -> super::Needs {
        super::Needs { trigger: true, table: true, ..Default::default() }
    }
    fn scores(&self, s: &super::Screen, _: &[super::Detector], _log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(super::Detector, Vec<f64>)>> {
        let scores = table_detector_scores(s, s.table, "GloVe", "--embeddings")?;
        Ok(vec![(super::Detector::GloveTrigger, scores.iter().map(|s| s.0).collect()), (super::Detector::GloveTriggerWord, scores.iter().map(|s| s.1).collect())])
    }
}

/// `table-trigger` and `table-trigger-word`: the GloVe detectors' two cosines in the word
/// table a victim trained itself (`Origin::trained_table`). A victim trained from a
/// scratch table (the translation model: no German vectors ship here) has no other word
/// space; it is also the space the nearest-neighbour poisons are chosen in. A
/// translation pair is read on both sides: the table is one for both languages.
pub struct TrainedTableDistance;

impl super::Family for TrainedTableDistance {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::TableTrigger, super::Detector::TableTriggerWord]
    }
    fn needs(&self) -> super::Needs {
        super::Needs { trigger: true, trained: true, ..Default::default() }
    }
    fn scores(&self, s: &super::Screen, _: &[super::Detector], _log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(super::Detector, Vec<f64>)>> {
        let scores = table_detector_scores(s, s.trained, "trained-table", "--trained-table MODEL")?;
        Ok(vec![(super::Detector::TableTrigger, scores.iter().map(|s| s.0).collect()), (super::Detector::TableTriggerWord, scores.iter().map(|s| s.1).collect())])
    }
}

/// `minilm-trigger`: cosine of MiniLM sentence embeddings to the trigger's (cached by
/// example text, weights and trigger when the screen has a cache folder).
pub struct MinilmDistance;

impl super::Family for MinilmDistance {
    fn detectors(&self) -> &'static [super::Detector] {
        &[super::Detector::MinilmTrigger]
    }
    fn needs(&self) -> super::Needs {
        super::Needs { trigger: true, minilm: true, ..Default::default() }
    }
    fn scores(&self, s: &super::Screen, _: &[super::Detector], log: &(dyn Fn(String) + Sync)) -> anyhow::Result<Vec<(super::Detector, Vec<f64>)>> {
        use crate::formats::records::Example;
        use crate::encode::{encode_all, TextPolicy};
        use anyhow::Context;
        let t = std::time::Instant::now();
        let base = s.minilm.context("minilm-trigger needs --minilm DIR (the folder scripts/fetch_minilm.sh makes)")?;
        let phrase = s.trigger.context("minilm-trigger needs --trigger")?;
        let config = base.victim_config(&crate::victims::origin::VictimShape { arch: crate::victims::model::Arch::Minilm, hidden: 1, gpt: crate::victims::gpt::GptShape { layers: 2, heads: 2 }, source_len: 0, num_classes: 2, max_len: 128, train_embeddings: false, regime: Default::default() })?;
        tch::manual_seed(0); // the unused classifier head
        let victim = base.new_victim(config.clone(), s.device)?;
        // WordPiece reads the text (a poison's `tokens` are the word victims' tokens).
        let texts: Vec<Example> = s.examples.iter().map(|e| Example { tokens: None, ..e.clone() }).collect();
        let encoded = encode_all(&texts, &base.vocab, config.max_len, s.num_classes, TextPolicy::Data, s.source)?;
        let trigger = encode_all(&[Example::new("trigger", phrase, 0)], &base.vocab, config.max_len, 2, TextPolicy::Poisons, "--trigger")?;
        let model = format!("minilm-trigger v1 {} {phrase:?} {}", base.sha256, config.max_len);
        let text_of: Vec<&str> = texts.iter().map(|e| e.text.as_str()).collect();
        let mut computed = 0;
        let col = super::cached_scores(s.cache, &model, &text_of, |todo| {
            computed = todo.len();
            let subset: Vec<Encoded> = todo.iter().map(|&i| encoded[i].clone()).collect();
            Ok(sentence_scores(&config, &victim.params(), &subset, &trigger[0], 64))
        })?;
        log(format!("MiniLM sentence embeddings of {computed} examples ({} from the cache): {:.1}s", s.examples.len() - computed, t.elapsed().as_secs_f64()));
        Ok(vec![(super::Detector::MinilmTrigger, col)])
    }
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
