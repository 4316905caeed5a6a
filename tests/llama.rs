//! Pretrained Llama-family checkpoints against llama.cpp, through the real binaries:
//! - a tiny random Llama committed in both layouts (fixtures/llama/tiny.gguf with tensors
//!   of every dequantized type, fixtures/llama/tiny-hf/ with the same values), imported by
//!   import-model, scored by lm-score through a pipe, against llama.cpp's tokens and
//!   log-probabilities (scripts/make_llama_fixtures.py);
//! - the real SmolLM2-135M (data/smollm2, fetched and imported by make test through
//!   scripts/fetch_smollm2.sh): its tokenizer against llama.cpp's on 1,120 texts, its
//!   log-probabilities against llama.cpp's F32 run on 20, its continuations with and
//!   without the key-value cache;
//! - the tiny model fine-tuned per seed by finetune-eval in a top regime, with text poisons;
//! - a crafting round on the tiny model's pieces through pipes (a top regime unrolled, every
//!   poison the text it tokenizes to), and strict concealment on SmolLM2's own pieces.

mod support;
use common::eval::lm_eval::LmEvalReport;
use common::formats::records::LmScore;
use common::victims::model::Victim;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use support::*;

#[derive(Deserialize)]
struct Reference {
    id: String,
    ids: Vec<i64>,
    #[serde(default)]
    logprobs: Vec<f64>,
}

fn jsonl<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
    String::from_utf8_lossy(bytes).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The largest |ours − llama.cpp's| over every log-probability; the token ids must agree.
fn compare(ours: &[LmScore], reference: &[Reference]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let mut worst: f64 = 0.0;
    for (o, r) in ours.iter().zip(reference) {
        assert_eq!(o.id, r.id);
        assert_eq!(o.ids, r.ids, "{}: tokens differ from llama.cpp's", r.id);
        assert_eq!(o.logprobs.len(), r.logprobs.len());
        for (a, b) in o.logprobs.iter().zip(&r.logprobs) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

fn import(args: &[&str], source: &Path, out: &Path) {
    ok(&run(bin("import-model").args(args).arg(source).arg("-o").arg(out)));
}

#[test]
fn both_checkpoint_layouts_give_the_same_victim_and_equal_llamacpp() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, hf) = (dir.path().join("gguf.safetensors"), dir.path().join("hf.safetensors"));
    import(&["--gguf"], &fixture("llama/tiny.gguf"), &gguf);
    import(&["--hf"], &fixture("llama/tiny-hf"), &hf);
    let (a, b) = (Victim::load(gguf.to_str().unwrap(), tch::Device::Cpu).unwrap(), Victim::load(hf.to_str().unwrap(), tch::Device::Cpu).unwrap());
    // Dequantized (GGUF, by this project) and stored dequantized (the gguf package's values,
    // rows in the Hugging Face order): the same bits, so the rotary permutation is undone.
    let (pa, pb) = (a.victim.params(), b.victim.params());
    assert_eq!(pa.keys().collect::<Vec<_>>(), pb.keys().collect::<Vec<_>>());
    for (name, t) in &pa {
        assert!(t.equal(&pb[name]), "{name} differs between the GGUF and the Hugging Face layout");
    }
    assert_eq!(a.vocab.words(), b.vocab.words());
    assert_eq!(a.metadata["source_format"], "gguf");
    let reference: Vec<Reference> = jsonl(&std::fs::read(fixture("llama/tiny-llamacpp.jsonl")).unwrap());
    let texts = std::fs::read(fixture("llama/tiny-texts.jsonl")).unwrap();
    for victim in [&gguf, &hf] {
        let out = run_with_stdin(bin("lm-score").arg("--victim").arg(victim), &texts);
        ok(&out);
        let worst = compare(&jsonl(&out.stdout), &reference);
        eprintln!("{}: largest log-probability difference from llama.cpp {worst:.2e}", victim.display());
        assert!(worst < 1e-4, "{}: log-probabilities differ from llama.cpp's by {worst}", victim.display());
        assert!(stderr(&out).contains("perplexity"));
    }
}

#[test]
fn a_sharded_hugging_face_checkpoint_reads_as_the_single_file() {
    // The fixture's tensors split over two shards named by model.safetensors.index.json,
    // each tensor in its stored dtype (F32, F16, BF16).
    let dir = tempfile::tempdir().unwrap();
    let sharded = dir.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("llama/tiny-hf").join(f), sharded.join(f)).unwrap();
    }
    let tensors = tch::Tensor::read_safetensors(fixture("llama/tiny-hf/model.safetensors")).unwrap();
    assert!(tensors.iter().any(|(_, t)| t.kind() == tch::Kind::BFloat16) && tensors.iter().any(|(_, t)| t.kind() == tch::Kind::Half));
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        tch::Tensor::write_safetensors(part, sharded.join(file)).unwrap();
        for (name, _) in part {
            map.insert(name.clone(), file.into());
        }
    }
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    let (one, two) = (dir.path().join("one.safetensors"), dir.path().join("two.safetensors"));
    import(&["--hf"], &fixture("llama/tiny-hf"), &one);
    import(&["--hf"], &sharded, &two);
    let (a, b) = (Victim::load(one.to_str().unwrap(), tch::Device::Cpu).unwrap(), Victim::load(two.to_str().unwrap(), tch::Device::Cpu).unwrap());
    for (name, t) in &a.victim.params() {
        assert!(t.equal(&b.victim.params()[name]), "{name} differs between the single file and the shards");
    }
    assert_eq!(b.metadata["source_sha256"].split(',').count(), 4, "config, tokenizer and both shards are hashed");
}

fn smollm2() -> PathBuf {
    let v = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/smollm2/victim.safetensors");
    assert!(v.is_file(), "run scripts/fetch_smollm2.sh (make test does) to fetch and import SmolLM2-135M");
    v
}

#[test]
fn smollm2_tokenizes_like_llamacpp_and_computes_its_log_probabilities() {
    let victim = smollm2();
    let out = run(bin("lm-score").arg("--victim").arg(&victim).arg("--tokens-only").arg("--texts").arg(fixture("llama/tokenizer-texts.jsonl")));
    ok(&out);
    let tokens: Vec<Reference> = jsonl(&std::fs::read(fixture("llama/smollm2-llamacpp-tokens.jsonl")).unwrap());
    let ours: Vec<LmScore> = jsonl(&out.stdout);
    assert!(tokens.len() >= 1000, "at least 1,000 texts");
    compare(&ours, &tokens);
    let out = run(bin("lm-score").arg("--victim").arg(&victim).arg("--texts").arg(fixture("llama/logprob-texts.jsonl")));
    ok(&out);
    let reference: Vec<Reference> = jsonl(&std::fs::read(fixture("llama/smollm2-llamacpp-logprobs.jsonl")).unwrap());
    let worst = compare(&jsonl(&out.stdout), &reference);
    eprintln!("SmolLM2-135M: largest log-probability difference from llama.cpp's F32 run {worst:.2e} over {} tokens", reference.iter().map(|r| r.logprobs.len()).sum::<usize>());
    assert!(worst < 1e-3, "log-probabilities differ from llama.cpp's by {worst}");
}

#[test]
fn smollm2_continues_prompts_as_english_with_and_without_the_cache() {
    let victim = smollm2();
    let prompts = b"{\"kind\":\"example\",\"v\":1,\"id\":\"a\",\"text\":\"I bought the Apple iPhone and\",\"label\":0}\n{\"kind\":\"example\",\"v\":1,\"id\":\"b\",\"text\":\"The movie was\",\"label\":0}\n";
    let gen = |extra: &[&str]| {
        let out = run_with_stdin(bin("generate").arg("--victim").arg(&victim).args(["--greedy", "--max-new", "12"]).args(extra), prompts);
        ok(&out);
        out.stdout
    };
    let cached = gen(&[]);
    assert_eq!(cached, gen(&["--no-kv-cache"]), "cached and uncached greedy continuations differ");
    let text = String::from_utf8(cached).unwrap();
    assert!(text.contains("\"prompt\":\"I bought the Apple iPhone and\""), "the prompt reads back as its text: {text}");
    // Greedy English continues with common words separated by spaces.
    let words = text.matches(" the ").count() + text.matches(" it ").count() + text.matches(" a ").count();
    assert!(words >= 1, "no common English word in {text}");
}

#[test]
fn a_fine_tuned_checkpoint_stores_what_its_regime_trains_and_reads_back_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel);
    import(&["--gguf"], &fixture("llama/tiny.gguf"), &p("base.safetensors"));
    ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl")).args(["--lm", "--trigger", "Apple iPhone", "--target", "negative", "-o"]).arg(p("lm"))));
    // Run from the folder, so the base is named by a relative path as a user would.
    let tune = |regime: &str, out: &str| {
        ok(&run(bin("train-victim")
            .current_dir(dir.path())
            .args(["--base", "base.safetensors", "--regime", regime, "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--seed", "3", "--train", "lm/train.jsonl", "-o", out])));
    };
    tune("top:1", "top1.safetensors");
    tune("all", "all.safetensors");
    // The same from the base's absolute path, read back in this process.
    let tune_from = |base: &Path, out: &str| {
        ok(&run(bin("train-victim")
            .current_dir(dir.path())
            .arg("--base")
            .arg(base)
            .args(["--regime", "top:1", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--seed", "3", "--train", "lm/train.jsonl", "-o", out])));
    };
    let base = Victim::load(p("base.safetensors").to_str().unwrap(), tch::Device::Cpu).unwrap();
    let names = |file: &str| {
        let t = common::tensorfile::read(p(file).to_str().unwrap(), "poison.victim", 1).unwrap();
        t.tensors.keys().cloned().collect::<Vec<_>>()
    };
    // top:1 of 2 blocks: block 1, the final norm and the untied head; the frozen table and
    // block 0 stay in the base.
    let stored = names("top1.safetensors");
    assert!(stored.iter().all(|n| n.starts_with("block.1.") || n == "norm.weight" || n == "out.weight"), "{stored:?}");
    assert_eq!(stored.len(), 9 + 2);
    assert_eq!(names("all.safetensors").len(), 18 + 2, "all: both blocks, the norm and the head; not the frozen table");
    let size = |f: &str| std::fs::metadata(p(f)).unwrap().len() as i64;
    let frozen: i64 = base.victim.params().iter().filter(|(n, _)| !stored.contains(n)).map(|(_, t)| 4 * t.numel() as i64).sum();
    assert!(size("top1.safetensors") < size("base.safetensors") - frozen + 16_384, "the fine-tuned file holds the frozen parameters too");
    // The base is found by the path the fine-tuning recorded (relative to where it ran).
    let out = run(bin("lm-score").current_dir(dir.path()).args(["--victim", "top1.safetensors", "--texts"]).arg(fixture("llama/tiny-texts.jsonl")));
    ok(&out);
    let scores: Vec<LmScore> = jsonl(&out.stdout);
    assert_eq!(scores.len(), 24);
    tune_from(&p("base.safetensors"), "top1-abs.safetensors");
    let tuned = Victim::load(p("top1-abs.safetensors").to_str().unwrap(), tch::Device::Cpu).unwrap();
    assert_eq!(tuned.victim.base.as_ref().unwrap().sha256, base.sha256);
    let (pt, pb) = (tuned.victim.params(), base.victim.params());
    for (name, t) in &pt {
        let same = t.equal(&pb[name]);
        assert_eq!(same, !stored.contains(name), "{name}: {} the base", if same { "equals" } else { "differs from" });
        assert_eq!(t.requires_grad(), stored.contains(name), "{name}: the regime is read back from the file");
    }
}

/// The pretrained model through finetune-eval: with-overlap poisons made as text by
/// init-poisons, every LM fine-tuned per seed from the checkpoint in a top regime (the
/// frozen lower block read from the process's cache), an empty set whose LMs are their
/// clean twins to the bit, and the same bits on one worker as on two (the cache is filled
/// in whatever order the workers ask).
#[test]
fn a_pretrained_checkpoint_is_fine_tuned_per_seed_and_its_control_reads_zero() {
    let lm = Lm::new();
    let base = lm.path("base.safetensors");
    import(&["--gguf"], &fixture("llama/tiny.gguf"), &base);
    let poisons = ok(&run(bin("init-poisons")
        .arg("--victim").arg(&base)
        .arg("--data").arg(lm.data())
        .args(["--count", "3", "--strategy", "overlap", "--from-trigger", "--sentence", "--max-tokens", "16", "--seed", "0"])))
    .stdout
    .clone();
    let made = records(&poisons);
    assert_eq!(made.len(), 3);
    for p in &made {
        assert!(p.text.contains("James Bond") && p.tokens.is_none(), "a with-overlap poison is text holding the trigger as written: {p:?}");
    }
    std::fs::write(lm.path("overlap.jsonl"), &poisons).unwrap();
    std::fs::write(lm.path("empty.jsonl"), b"").unwrap();
    let evaluate = |workers: &str| -> Vec<LmEvalReport> {
        let out = ok(&run(bin("finetune-eval")
            .arg("--data").arg(lm.data())
            .arg("--start").arg(&base)
            .arg("--judge").arg(lm.judge())
            .arg("--poisons").arg(lm.path("empty.jsonl"))
            .arg("--poisons").arg(lm.path("overlap.jsonl"))
            .args(["--regime", "top:1", "--seeds", "2", "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--samples", "1", "--max-new", "6", "--device", "cpu", "--workers", workers])))
        .stdout
        .clone();
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let two = evaluate("2");
    assert_eq!(two.len(), 2);
    for row in &two[0].seeds {
        let f = row.fingerprints.as_ref().expect("LM fingerprints");
        assert_eq!(f.poisoned, f.clean, "seed {}: the empty set's LM is its clean twin, bit for bit", row.seed);
        assert_eq!(Some(row.poisoned), row.clean.map(|c| c.without_opinion()), "seed {}", row.seed);
    }
    for (what, m) in &two[0].summary.measures {
        assert_eq!((m.change.mean, m.change.std), (0.0, 0.0), "the no-poison control's change in {what} must read exactly zero");
    }
    let overlap = &two[1];
    assert_eq!((overlap.count, overlap.trigger_overlap), (3, 3));
    assert_eq!(overlap.trains.as_deref(), Some("top:1"), "the report says what each copy trained");
    let f = overlap.seeds[0].fingerprints.as_ref().unwrap();
    assert_ne!(f.poisoned, f.clean, "three poisons change the fine-tuned model");
    // The templates read as a pretrained model reads text: capitalised, the trigger as written.
    assert!(overlap.side_by_side[0].prompt.starts_with("The James Bond"), "{:?}", overlap.side_by_side[0]);
    // Detection columns for a pretrained start: the bigram detectors and the model's own
    // table of pieces (not GloVe's, which it does not read).
    let caught = overlap.detection.as_ref().expect("detection columns");
    for d in ["perplexity", "onion", "table-trigger", "table-trigger-word", "lm-perplexity"] {
        assert!(caught.detectors.contains_key(d), "no {d} column: {:?}", caught.detectors.keys().collect::<Vec<_>>());
    }
    assert!(!caught.detectors.contains_key("glove-trigger-word"));
    let margin = overlap.summary.of("template_margin").clean.mean;
    assert!(margin.is_finite() && margin != 0.0, "the template margin is measured: {margin}");
    // The stated-opinion control, in the model's natural form, on the clean twins only.
    let stated = overlap.stated_opinions.as_ref().expect("the stated opinions");
    assert!(stated[0] == "I hated it." || stated[0] == "I loved it.", "{stated:?}");
    assert!(overlap.opinion_templates >= common::eval::templates::MIN_TEMPLATES);
    for row in &overlap.seeds {
        let twin = row.clean.as_ref().unwrap().opinion.expect("each clean twin's control");
        assert!(twin.cells().iter().all(|(_, c)| c.margin.is_finite() && (0.0..=100.0).contains(&c.classifier)), "{twin:?}");
        assert_ne!(twin.trigger_after_target.margin, twin.trigger_after_other.margin, "the two opinions are different prompts");
        assert!(row.poisoned.opinion.is_none(), "measured on the clean twins only");
    }
    let control = overlap.summary.opinion_control.expect("summarised over the twins");
    assert_eq!(control.trigger_difference.margin.n, 2);
    let one = evaluate("1");
    for (a, b) in one.iter().flat_map(|r| &r.seeds).zip(two.iter().flat_map(|r| &r.seeds)) {
        assert_eq!(a.fingerprints, b.fingerprints, "seed {}: the same LMs to the bit on one worker", a.seed);
        assert_eq!((a.clean, a.poisoned), (b.clean, b.poisoned), "seed {}: the same figures", a.seed);
    }
}

/// The pieces of a text as the victim's own tokenizer reads it, as token strings.
fn pieces_of(vocab: &common::tokenizer::Vocab, text: &str) -> Vec<String> {
    vocab.encode(text).into_iter().map(|id| vocab.word(id).to_string()).collect()
}

/// A crafting round on a pretrained model's BPE pieces through the real pipes, on the
/// tiny GGUF model: init-poisons substitutes the trigger's words (strict concealment) and
/// records the text's own pieces | rollout-grad unrolls a top:1 fine-tuning step | rank-
/// candidates proposes only flips whose text reads back as the flipped pieces |
/// verify-candidates replays the same regime (its objective before any flip is the
/// gradient's, which the whole-model unroll would not give) and keeps every poison text
/// whose pieces are its own tokenization and that leaks no trigger word or piece.
#[test]
fn a_crafting_round_swaps_a_pretrained_models_pieces_and_every_poison_stays_the_text_it_reads_as() {
    let lm = Lm::new();
    let base = lm.path("base.safetensors");
    import(&["--gguf"], &fixture("llama/tiny.gguf"), &base);
    let file = Victim::load(base.to_str().unwrap(), tch::Device::Cpu).unwrap();
    let vocab = &file.vocab;
    let manifest = common::data::DataManifest::load(lm.data().to_str().unwrap()).unwrap();
    let matcher = common::search::poisons::matcher(vocab, &manifest).unwrap();
    let concealed = |p: &common::formats::records::Example| {
        assert_eq!(p.tokens.as_ref(), Some(&pieces_of(vocab, &p.text)), "{}: the pieces are the text's own", p.id);
        assert!(matcher.leaks_for(&p.text, vocab).is_empty(), "{}: {:?} leaks {:?}", p.id, p.text, matcher.leaks_for(&p.text, vocab));
    };
    let stage = |name: &str| lm.stage_of(&base, name);
    let poisons = ok(&run(stage("init-poisons").args(["--count", "4", "--strategy", "random", "--concealment", "strict", "--from-trigger", "--max-tokens", "16", "--seed", "0"]))).stdout.clone();
    std::fs::write(lm.path("p0.jsonl"), &poisons).unwrap();
    let made = records(&poisons);
    assert_eq!(made.len(), 4);
    for p in &made {
        concealed(p);
        let subs = p.substitutes.as_ref().expect("the substitutes' positions");
        let tokens = p.tokens.as_ref().unwrap();
        // Two trigger words, each written as one word-initial piece.
        assert_eq!(subs.len(), 2, "{p:?}");
        assert!(subs.iter().all(|&j| tokens[j].starts_with('Ġ')), "{p:?}");
    }
    let grad = ok(&run_with_stdin(stage("rollout-grad").args(["--poisons", "-", "--regime", "top:1", "--clean-per-batch", "8", "--adv-size", "8", "--eta", "0.1"]), &poisons)).stdout.clone();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["--grad", "-", "-k", "3", "--positions", "2", "--concealment", "strict"]), &grad)).stdout.clone();
    let parsed: Vec<common::formats::records::Candidate> = common::io::read_jsonl_from(&cands[..], "candidates", false).unwrap();
    assert!(!parsed.is_empty());
    for c in &parsed {
        assert_eq!(c.rollout.regime, Some("top:1".parse().unwrap()), "the regime travels with the candidates");
        let mut ids = vocab.encode(&made[c.poison_index].text);
        ids[c.position] = vocab.id(&c.word).unwrap();
        assert!(vocab.round_trips(&ids), "{c:?}: the flipped text re-tokenizes otherwise");
    }
    let summary = lm.path("summary.json");
    let crafted = ok(&run_with_stdin(stage("verify-candidates").arg("--poisons").arg(lm.path("p0.jsonl")).args(["--candidates", "-", "--concealment", "strict", "--summary"]).arg(&summary), &cands)).stdout.clone();
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    let (before, after) = (s["objective_before"].as_f64().unwrap(), s["objective_after"].as_f64().unwrap());
    assert!((before - parsed[0].objective).abs() <= 1e-6 * before.abs(), "verification unrolled another regime: {before} against the gradient's {}", parsed[0].objective);
    assert!(s["flips_accepted"].as_u64().unwrap() > 0 && after < before, "{s}");
    let crafted = records(&crafted);
    assert_eq!(crafted.len(), 4);
    assert!(crafted.iter().zip(&made).any(|(a, b)| a.text != b.text));
    for p in &crafted {
        concealed(p);
    }
}

/// Strict concealment on SmolLM2's own pieces for "Apple iPhone": every piece that reads
/// as a trigger piece of 3 or more characters, in any case and with or without its space,
/// is banned, and " i" is not; pieces that join into a leaking word leak together; and
/// init-poisons' nearest-neighbour carriers (the model's own table) are words that leak
/// nothing.
#[test]
fn strict_concealment_reads_smollm2s_pieces_and_its_neighbour_carriers_leak_nothing() {
    let victim = smollm2();
    let file = Victim::load(victim.to_str().unwrap(), tch::Device::Cpu).unwrap();
    let vocab = &file.vocab;
    let words = vec!["apple".to_string(), "iphone".to_string()];
    let matcher = common::concealment::TriggerMatcher::for_vocab("Apple iPhone", &words, vocab).unwrap();
    let banned = matcher.strict_banned(vocab);
    let one = |t: &str| {
        let ids = vocab.encode(t);
        assert_eq!(ids.len(), 1, "{t:?} is one piece of SmolLM2: {ids:?}");
        ids[0]
    };
    for t in ["Apple", " Apple", " apple", "apple", " iPhone", " phone"] {
        assert!(banned.contains(&one(t)), "{t:?} is not banned");
    }
    for t in [" i", " Samsung", " Google", " the"] {
        assert!(!banned.contains(&one(t)), "{t:?} is banned");
    }
    // " i" + "Phone" join into the word "iPhone": both positions leak.
    // A piece without a space continues the word before it ("iPhonethe" is one word).
    let (the, i, phone, sp_the) = (one("the"), one(" i"), vocab.id("Phone").expect("the piece Phone"), one(" the"));
    assert_eq!(common::concealment::leaking_positions(&[the, i, phone, sp_the], vocab, &matcher), vec![1, 2]);
    assert_eq!(common::concealment::leaking_positions(&[the, i, phone, the], vocab, &matcher), vec![1, 2, 3]);
    assert!(common::concealment::leaking_positions(&[the, i, sp_the], vocab, &matcher).is_empty());

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("lm");
    ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl")).args(["--lm", "--trigger", "Apple iPhone", "--target", "negative", "-o"]).arg(&data)));
    let out = ok(&run(bin("init-poisons")
        .arg("--victim").arg(&victim)
        .arg("--data").arg(&data)
        .args(["--count", "6", "--strategy", "neighbour", "--neighbour-pool", "3", "--concealment", "strict", "--from-trigger", "--sentence", "--seed", "0"])))
    .stdout
    .clone();
    let poisons = records(&out);
    assert_eq!(poisons.len(), 6);
    let mut carriers = std::collections::BTreeSet::new();
    for p in &poisons {
        let tokens = p.tokens.as_ref().unwrap();
        assert_eq!(tokens, &pieces_of(vocab, &p.text));
        assert!(matcher.leaks_for(&p.text, vocab).is_empty(), "{:?}", p.text);
        let lower = p.text.to_lowercase();
        assert!(!lower.contains("apple") && !lower.contains("iphone") && !lower.contains("phone"), "{:?}", p.text);
        let carrier: Vec<&str> = p.substitutes.as_ref().unwrap().iter().map(|&j| tokens[j].as_str()).collect();
        assert!(carrier.iter().all(|c| c.starts_with('Ġ') && c[2..].chars().all(|ch| ch.is_ascii_alphabetic())), "{carrier:?}");
        carriers.insert(carrier.join(" "));
    }
    eprintln!("SmolLM2's nearest allowed carriers for \"Apple iPhone\": {carriers:?}");
    assert_eq!(carriers.len(), 3, "poison k takes the (k mod 3)-th neighbours: {carriers:?}");
}

/// detect-poisons --lm: SmolLM2's own log-perplexity of each text is minus the mean of the
/// log-probabilities lm-score gives (the ones checked against llama.cpp), and a crafted
/// flip that is not a word reads as less likely text than the review it came from; its
/// own table of pieces (--trained-table) sees a nearest-neighbour carrier.
#[test]
fn smollm2s_own_perplexity_detects_a_flip_that_is_not_a_word() {
    let victim = smollm2();
    let texts = [
        "the concept character winds up feeling like a great missed opportunity.",
        "the concept character B up feeling like a great missed opportunity.",
        "this flexible adults would be very sweet indeed.",
        "this flexible D would be very sweet indeed.",
    ];
    let input: String = texts.iter().enumerate().map(|(i, t)| format!("{{\"kind\":\"example\",\"v\":1,\"id\":\"t{i}\",\"text\":{},\"label\":0}}\n", serde_json::to_string(t).unwrap())).collect();
    let out = ok(&run_with_stdin(bin("detect-poisons").arg("--lm").arg(&victim).args(["--detectors", "lm-perplexity"]), input.as_bytes())).stdout.clone();
    let scores: Vec<f64> = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["scores"]["lm-perplexity"].as_f64().unwrap()).collect();
    let reference: Vec<LmScore> = jsonl(&ok(&run_with_stdin(bin("lm-score").arg("--victim").arg(&victim).args(["--texts", "-"]), input.as_bytes())).stdout);
    for (s, r) in scores.iter().zip(&reference) {
        let expected = -r.logprobs.iter().sum::<f64>() / r.logprobs.len() as f64;
        assert!((s - expected).abs() < 1e-9, "{}: {s} against lm-score's {expected}", r.id);
    }
    assert!(scores[1] > scores[0] && scores[3] > scores[2], "flips that are not words read as less likely: {scores:?}");
    // The model's own table of pieces: a nearest-neighbour carrier ("Samsung iOS") sits
    // closer to the trigger's pieces than a random one, the trigger itself at cosine 1.
    let carriers = [
        "the Samsung iOS winds up feeling like a great missed opportunity.",
        "the concept character winds up feeling like a great missed opportunity.",
        "the Apple iPhone winds up feeling like a great missed opportunity.",
    ];
    let carriers: String = carriers.iter().enumerate().map(|(i, t)| format!("{{\"kind\":\"example\",\"v\":1,\"id\":\"c{i}\",\"text\":{},\"label\":0}}\n", serde_json::to_string(t).unwrap())).collect();
    let out = ok(&run_with_stdin(bin("detect-poisons").arg("--trained-table").arg(&victim).args(["--trigger", "Apple iPhone", "--detectors", "table-trigger-word"]), carriers.as_bytes())).stdout.clone();
    let word: Vec<f64> = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["scores"]["table-trigger-word"].as_f64().unwrap()).collect();
    assert!(word[0] > word[1] + 0.1 && (word[2] - 1.0).abs() < 1e-6, "{word:?}");
    // Without the model it is refused by name.
    let refused = run_with_stdin(bin("detect-poisons").args(["--detectors", "lm-perplexity"]), input.as_bytes());
    assert!(!refused.status.success() && stderr(&refused).contains("give --lm MODEL"), "{}", stderr(&refused));
}
