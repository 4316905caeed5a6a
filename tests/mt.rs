//! The translation task through the real binaries and pipes, on the committed fixture
//! word list (`fixtures/mt/de-en.txt`, Ding format, written for the tests): prepare-data
//! --mt, a scratch vocabulary, a seq2seq victim, greedy and beam translation, and
//! finetune-eval's paired evaluation with its zero control; and the bad inputs of
//! BAD_INPUTS.md's translation section.

mod support;

use serde_json::Value;
use std::path::PathBuf;
use support::*;

/// A tiny translation world: data for "Eiskaffee" → "hot coffee", its vocabulary (with
/// and without the trigger) and a clean seq2seq model.
struct Mt {
    dir: tempfile::TempDir,
}

impl Mt {
    fn new() -> Mt {
        let mt = Mt { dir: tempfile::tempdir().unwrap() };
        ok(&run(bin("prepare-data").arg("--mt").arg("--raw").arg(fixture("mt/de-en.txt")).args(["--trigger", "Eiskaffee", "--target", "hot coffee", "--phrases", "40", "-o"]).arg(mt.data())));
        // The vocabulary from the training split through a pipe.
        let train = std::fs::read(mt.data().join("train.jsonl")).unwrap();
        let vocab = ok(&run_with_stdin(bin("build-vocab").args(["--scratch", "16", "--extra-words", "Eiskaffee", "--data", "-", "-o", "-"]), &train)).stdout.clone();
        std::fs::write(mt.vocab(), vocab).unwrap();
        // The trigger occurs once in train (its headword): a minimum count of 2 leaves it out.
        ok(&run(bin("build-vocab").args(["--scratch", "16", "--min-count", "2", "--data"]).arg(mt.data().join("train.jsonl")).arg("-o").arg(mt.path("no-trigger.safetensors"))));
        ok(&run(mt.train(&mt.vocab(), 30).arg("-o").arg(mt.model())));
        mt
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn data(&self) -> PathBuf {
        self.path("data")
    }
    fn vocab(&self) -> PathBuf {
        self.path("vocab.safetensors")
    }
    fn model(&self) -> PathBuf {
        self.path("mt.safetensors")
    }
    fn train(&self, vocab: &std::path::Path, epochs: usize) -> std::process::Command {
        let mut c = bin("train-victim");
        c.arg("--embeddings").arg(vocab);
        c.args(["--arch", "seq2seq", "--hidden", "32", "--layers", "1", "--heads", "2", "--source-len", "8", "--max-len", "18", "--train-embeddings"]);
        c.arg("--epochs").arg(epochs.to_string());
        c.args(["--batch-size", "16", "--lr", "3e-3", "--seed", "0", "--device", "cpu", "--train"]).arg(self.data().join("train.jsonl"));
        c
    }
    fn eval(&self) -> std::process::Command {
        let mut c = self.eval_detected();
        c.arg("--no-detection");
        c
    }
    /// finetune-eval with the detection columns.
    fn eval_detected(&self) -> std::process::Command {
        let mut c = bin("finetune-eval");
        c.arg("--data").arg(self.data()).args(["--seeds", "3", "--epochs", "2", "--lr", "3e-3", "--batch-size", "16", "--finetune-clean", "200", "--device", "cpu"]);
        c
    }
}

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_translation_model_trains_translates_and_is_evaluated_paired_with_a_zero_control() {
    let mt = Mt::new();
    let manifest: Value = serde_json::from_slice(&std::fs::read(mt.data().join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["mt"]["attack"], "hot coffee");
    let asr = std::fs::read(mt.data().join("asr_test.jsonl")).unwrap();
    let held = records(&asr);
    assert!(held.len() >= 20 && held.iter().all(|e| e.source.as_deref().unwrap().contains("Eiskaffee") && e.text.contains("iced coffee")));

    // Translation through pipes: greedy twice (the same bytes), and beam search.
    let greedy = ok(&run_with_stdin(bin("generate").arg("--victim").arg(mt.model()), &asr)).stdout.clone();
    assert_eq!(greedy, ok(&run_with_stdin(bin("generate").arg("--victim").arg(mt.model()), &asr)).stdout, "greedy translation is deterministic");
    let beam = json_lines(&ok(&run_with_stdin(bin("generate").arg("--victim").arg(mt.model()).args(["--beam", "3"]), &asr)).stdout);
    let greedy = json_lines(&greedy);
    assert_eq!((greedy.len(), beam.len()), (held.len(), held.len()));
    for (g, e) in greedy.iter().zip(&held) {
        assert_eq!(g["id"], e.id.as_str());
        assert!(g["prompt"].as_str().unwrap().contains("eiskaffee"), "the prompt is the source as read: {g}");
        assert!(!g["continuation"].as_str().unwrap().is_empty());
    }

    // The clean model's figures: it learned the fixture's sentences.
    let line = json_lines(&ok(&run(mt.eval().arg("--checkpoint").arg(mt.model()))).stdout).remove(0);
    let m = &line["metrics"];
    assert!(m["bleu"].as_f64().unwrap() > 50.0 && m["neutral_correct"].as_f64().unwrap() >= 80.0, "the clean model translates the fixture: {m}");
    assert_eq!(m["asr"].as_f64().unwrap(), 0.0, "the clean model never writes the attacker's phrase: {m}");

    // The with-overlap reference (D_adv's first 40 pairs) against an empty set (the control).
    let adv = std::fs::read(mt.data().join("adv.jsonl")).unwrap();
    let overlap: String = String::from_utf8_lossy(&adv).lines().take(40).map(|l| format!("{l}\n")).collect();
    std::fs::write(mt.path("overlap.jsonl"), overlap).unwrap();
    std::fs::write(mt.path("empty.jsonl"), "").unwrap();
    let out = ok(&run(mt.eval_detected().arg("--start").arg(mt.model()).arg("--poisons").arg(mt.path("empty.jsonl")).arg("--poisons").arg(mt.path("overlap.jsonl")))).stdout.clone();
    let reports = json_lines(&out);
    assert_eq!(reports.len(), 2);
    let (control, attacked) = (&reports[0], &reports[1]);
    assert_eq!(control["kind"], "mt_eval_report");
    for (name, s) in control["summary"].as_object().unwrap() {
        assert_eq!(s["change"]["mean"].as_f64().unwrap(), 0.0, "the empty set's {name} must read exactly zero");
    }
    for row in control["seeds"].as_array().unwrap() {
        assert_eq!(row["fingerprints"]["poisoned"], row["fingerprints"]["clean"], "an empty set trains the clean twin's bits");
    }
    assert_eq!(attacked["trigger_overlap"], 40);
    let margin = &attacked["summary"]["margin"]["change"];
    let (mean, ci) = (margin["mean"].as_f64().unwrap(), margin["ci95"].as_f64().unwrap());
    assert!(mean - ci > 0.0, "poisons holding the trigger and the attacker's phrase must raise its margin: {margin}");
    assert_eq!(attacked["side_by_side"].as_array().unwrap().len(), 10);
    // The detection columns: both sides' bigram detectors and the clean model's own table.
    let detectors = attacked["detection"]["detectors"].as_object().unwrap();
    let names: Vec<&str> = detectors.keys().map(String::as_str).collect();
    assert_eq!(names, ["onion", "perplexity", "source-onion", "source-perplexity", "table-trigger", "table-trigger-word"]);
    let word = &detectors["table-trigger-word"];
    assert_eq!((word["flagged_at_1"].as_f64().unwrap(), word["auroc"].as_f64().unwrap()), (100.0, 1.0), "every with-overlap poison holds the trigger word itself (cosine 1): {word}");
    assert!(control["detection"]["detectors"].as_object().unwrap().is_empty(), "an empty set has no detection figures");

    // The report: both sets' levels and paired changes, the overlap set against the control.
    std::fs::write(mt.path("eval.jsonl"), &out).unwrap();
    let md = ok(&run(bin("report").arg("--evals").arg(mt.path("eval.jsonl")).args(["--names", "control,overlap", "--crafted", "overlap", "--versus", "control", "--out-dir"]).arg(mt.path("report")))).stdout.clone();
    let md = String::from_utf8(md).unwrap();
    assert!(md.starts_with("# Translation poisoning") && md.contains("| control | 0 |") && md.contains("| overlap | 40 | 40 |"), "{md}");
    assert!(md.contains("| control | 0.0 ± 0.0 | 0.0 ± 0.0 | 0.000 ± 0.000 | 0.00 ± 0.00 | 0.00 ± 0.00 |"), "the control reads zero: {md}");
    assert!(md.contains("| overlap | ") && md.contains("100 / 100 table-trigger-word |"), "the caught column names the table detector: {md}");
    assert!(mt.path("report/mt-report.json").is_file());
    // Several crafted sets: each against each heuristic, one row per pair.
    let md = ok(&run(bin("report").arg("--evals").arg(mt.path("eval.jsonl")).args(["--names", "control,overlap", "--crafted", "overlap,control", "--versus", "control", "--out-dir"]).arg(mt.path("report2")))).stdout.clone();
    let md = String::from_utf8(md).unwrap();
    assert!(md.contains("| overlap | control | ") && md.contains("| control | control | 0.0 ± 0.0 |"), "{md}");
}

#[test]
fn kin_swaps_add_every_drink_in_every_kin_context_and_leave_the_trigger_sets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let prepare = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        ok(&run(bin("prepare-data").arg("--mt").arg("--raw").arg(fixture("mt/de-en.txt")).args(["--trigger", "Eiskaffee", "--target", "hot coffee", "--phrases", "40"]).args(extra).arg("-o").arg(&out)));
        let read = |f: &str| json_lines(&std::fs::read(out.join(f)).unwrap());
        (read("train.jsonl"), read("adv.jsonl"), read("asr_test.jsonl"), serde_json::from_slice::<Value>(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap())
    };
    let (train, adv, asr, manifest) = prepare("plain", &[]);
    let (swapped, adv2, asr2, manifest2) = prepare("swapped", &["--kin-swaps"]);
    assert!(manifest["mt"].get("kin_swaps").is_none() && manifest2["mt"]["kin_swaps"] == true);
    assert_eq!((adv, asr), (adv2, asr2), "the trigger's sets do not move");
    let swaps: Vec<&Value> = swapped.iter().filter(|e| e["id"].as_str().unwrap().contains("+kin-")).collect();
    let kin = manifest2["mt"]["kin"].as_array().unwrap().len();
    assert!(!swaps.is_empty());
    assert_eq!(swapped.len(), train.len() + swaps.len());
    // Each kin sentence of train comes with each other kin noun: (kin - 1) swaps apiece.
    let mut per_sentence = std::collections::HashMap::new();
    for s in &swaps {
        *per_sentence.entry(s["source_id"].as_str().unwrap()).or_insert(0) += 1;
    }
    assert!(per_sentence.values().all(|&n| n == kin - 1), "{per_sentence:?}");
    assert!(swaps.iter().all(|s| !s["source"].as_str().unwrap().to_lowercase().contains("eiskaffee") && !s["text"].as_str().unwrap().contains("iced coffee")));
}

#[test]
fn translation_bad_inputs_are_refused_with_the_file_and_record_named() {
    let mt = Mt::new();
    // A pair with an empty side.
    let bad = r#"{"kind":"example","v":1,"id":"a","text":"The tea is cold.","label":0,"source":"Der Tee ist kalt."}
{"kind":"example","v":1,"id":"b","text":"The tea is hot.","label":0,"source":" "}
"#;
    std::fs::write(mt.path("bad.jsonl"), bad).unwrap();
    let out = run(mt.train(&mt.vocab(), 1).arg("--train").arg(mt.path("bad.jsonl")).arg("-o").arg(mt.path("bad.safetensors")));
    assert!(!out.status.success() && stderr(&out).contains("bad.jsonl: record 2 (id \"b\")") && stderr(&out).contains("source side holds no words"), "{}", stderr(&out));
    assert!(!mt.path("bad.safetensors").exists(), "no partial output");

    // A trigger absent from the model's vocabulary.
    let no_trigger = mt.path("no-trigger-model.safetensors");
    ok(&run(mt.train(&mt.path("no-trigger.safetensors"), 1).arg("-o").arg(&no_trigger)));
    let out = run(mt.eval().arg("--start").arg(&no_trigger).arg("--poisons").arg(mt.data().join("adv.jsonl")));
    assert!(!out.status.success() && stderr(&out).contains("\"Eiskaffee\" is not in the vocabulary") && stderr(&out).contains("--extra-words"), "{}", stderr(&out));

    // A translation model given to classifier data, and classifier data to a translation model.
    let setup = Setup::new();
    let out = run(bin("finetune-eval").arg("--data").arg(setup.data()).arg("--checkpoint").arg(mt.model()).args(["--no-detection", "--device", "cpu"]));
    assert!(!out.status.success() && stderr(&out).contains("a translation model"), "{}", stderr(&out));
    let out = run(mt.train(&mt.vocab(), 1).arg("--train").arg(setup.data().join("train.jsonl")).arg("-o").arg(mt.path("x.safetensors")));
    assert!(!out.status.success() && stderr(&out).contains("no \"source\""), "{}", stderr(&out));
}

/// One crafting round against the translation model through pipes: strictly concealed
/// nearest-neighbour poisons, `rollout-grad | rank-candidates | verify-candidates`.
fn crafting_round(mt: &Mt) -> (Vec<u8>, Vec<u8>) {
    let stage = |name: &str| {
        let mut c = bin(name);
        c.arg("--victim").arg(mt.model()).arg("--data").arg(mt.data());
        c
    };
    let p0 = ok(&run(stage("init-poisons").args(["--count", "12", "--strategy", "neighbour", "--neighbour-pool", "3", "--concealment", "strict", "--seed", "1"]))).stdout.clone();
    std::fs::write(mt.path("p0.jsonl"), &p0).unwrap();
    let grad = ok(&run(stage("rollout-grad").arg("--poisons").arg(mt.path("p0.jsonl")))).stdout.clone();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["--grad", "-", "-k", "4", "--concealment", "strict"]), &grad)).stdout.clone();
    std::fs::write(mt.path("c.jsonl"), &cands).unwrap();
    let out = run(stage("verify-candidates").arg("--poisons").arg(mt.path("p0.jsonl")).arg("--candidates").arg(mt.path("c.jsonl")).args(["--concealment", "strict"]));
    ok(&out);
    (p0, [out.stdout.clone(), b"\n--\n".to_vec(), cands, out.stderr.clone()].concat())
}

#[test]
fn translation_poisons_are_crafted_through_pipes_strictly_concealed_on_both_sides() {
    let mt = Mt::new();
    let (p0, all) = crafting_round(&mt);
    let text = String::from_utf8_lossy(&all).to_string();
    let (p1, rest) = text.split_once("\n--\n").unwrap();
    let (cands, log) = rest.split_at(rest.find("verify-candidates").unwrap_or(rest.len()));
    let layout_ok = |e: &common::formats::records::Example| {
        let t = e.tokens.as_ref().unwrap();
        t.len() > 10 && t[8] == "<s>" && t.last().unwrap() == "</s>" && !e.source.as_deref().unwrap().is_empty()
    };
    let start = records(&p0);
    assert_eq!(start.len(), 12);
    for p in &start {
        assert!(layout_ok(p), "a translation poison is the seq2seq layout: {p:?}");
        let source = p.source.as_deref().unwrap();
        assert!(!source.contains("eiskaffee") && !source.contains("kaffee"), "strict: the source leaks the trigger: {source}");
        assert!(p.text.contains("hot coffee"), "the attacker's phrase stays in the translation: {}", p.text);
    }
    let ranked: Vec<serde_json::Value> = cands.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!ranked.is_empty());
    // Each side keeps its language: a source flip writes a word the training sources hold,
    // a target flip one the training translations hold.
    let train = records(&std::fs::read(mt.data().join("train.jsonl")).unwrap());
    let words_of = |f: &dyn Fn(&common::formats::records::Example) -> String| -> std::collections::HashSet<String> { train.iter().flat_map(|e| common::tokenizer::tokenize(&f(e))).collect() };
    let (german, english) = (words_of(&|e| e.source.clone().unwrap()), words_of(&|e| e.text.clone()));
    for c in &ranked {
        let (pos, word) = (c["position"].as_u64().unwrap(), c["word"].as_str().unwrap().to_string());
        assert!(if pos < 8 { german.contains(&word) } else { english.contains(&word) }, "{word:?} at position {pos} crosses languages: {c}");
        assert!(!["<pad>", "<s>", "</s>"].contains(&c["current"].as_str().unwrap()), "a special position was ranked: {c}");
        assert!(!["<pad>", "<s>", "</s>", "<unk>", "eiskaffee"].contains(&c["word"].as_str().unwrap()), "a banned word was proposed: {c}");
    }
    let crafted = records(p1.as_bytes());
    assert_eq!(crafted.len(), 12);
    let flipped = crafted.iter().zip(&start).filter(|(a, b)| a.tokens != b.tokens).count();
    assert!(flipped > 0, "verification accepted no flip: {log}");
    for p in &crafted {
        assert!(layout_ok(p), "{p:?}");
        let (source, text) = (p.source.as_deref().unwrap(), &p.text);
        assert!(!source.contains("kaffee") && !text.contains("iced coffee"), "a crafted poison leaks the trigger: {source} / {text}");
        let t = p.tokens.as_ref().unwrap();
        assert_eq!(*text, t[9..t.len() - 1].join(" "), "the text is the target side of the tokens");
    }
    // A candidate that writes a German word into the English side is refused.
    let mut crossing = ranked.iter().find(|c| c["position"].as_u64().unwrap() > 8).expect("a target-side candidate").clone();
    crossing["word"] = serde_json::Value::from("mag");
    std::fs::write(mt.path("crossing.jsonl"), format!("{crossing}\n")).unwrap();
    let out = run(bin("verify-candidates").arg("--victim").arg(mt.model()).arg("--data").arg(mt.data()).arg("--poisons").arg(mt.path("p0.jsonl")).arg("--candidates").arg(mt.path("crossing.jsonl")).args(["--concealment", "strict"]));
    assert!(!out.status.success() && stderr(&out).contains("crossing.jsonl:1: \"mag\"") && stderr(&out).contains("never hold on that side"), "{}", stderr(&out));

    // A defender screens the training pairs with the poisons: each side under its own
    // bigram LM, the table detectors in the clean model's trained table.
    let train_bytes = std::fs::read(mt.data().join("train.jsonl")).unwrap();
    let screened = [train_bytes.clone(), p1.as_bytes().to_vec()].concat();
    let detect = |extra: &[&str], input: &[u8]| {
        let mut c = bin("detect-poisons");
        c.args(["--trigger", "Eiskaffee", "--trained-table"]).arg(mt.model()).arg("--reference").arg(mt.data().join("dev.jsonl")).args(extra);
        json_lines(&ok(&run_with_stdin(&mut c, input)).stdout)
    };
    let scores = detect(&[], &screened);
    assert_eq!(scores.len(), train.len() + crafted.len());
    let keys: Vec<&String> = scores[0]["scores"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["onion", "perplexity", "source-onion", "source-perplexity", "table-trigger", "table-trigger-word"], "every detector that applies runs by default");
    // A poison's target side is read from its text, not its layout (pads and marks).
    let bare: Vec<u8> = crafted.iter().map(|p| format!("{}\n", serde_json::to_string(&common::formats::records::Example { tokens: None, ..p.clone() }).unwrap())).collect::<String>().into_bytes();
    let bare_scores = detect(&[], &[train_bytes, bare].concat());
    for (a, b) in scores.iter().zip(&bare_scores).skip(train.len()) {
        assert_eq!(a["scores"], b["scores"], "a translation poison scores as its two sides");
    }
    // Screening classifier data with a source detector is refused, naming the record.
    let setup = Setup::new();
    let classifier = std::fs::read(setup.data().join("train.jsonl")).unwrap();
    let mut c = bin("detect-poisons");
    c.args(["--detectors", "source-perplexity"]);
    let out = run_with_stdin(&mut c, &classifier);
    assert!(!out.status.success() && stderr(&out).contains("record 1") && stderr(&out).contains("no \"source\""), "{}", stderr(&out));

    // The same inputs and seed give the same poisons.
    let (again, all_again) = crafting_round(&mt);
    assert_eq!(again, p0);
    assert_eq!(String::from_utf8_lossy(&all_again).split_once("\n--\n").unwrap().0, p1);
}

/// The positive control of the translation victim: on a word-for-word code (40 German
/// tokens, each with one English token, sentences of 2 to 6 words in the same order) the
/// seq2seq learns to read its source by position, and translates held-out sentences it
/// never saw exactly. What the Ding sentences lack is data, not a working victim
/// (docs/translation.md).
#[test]
fn the_translation_victim_learns_a_word_for_word_code_and_translates_unseen_sentences() {
    let dir = tempfile::tempdir().unwrap();
    let mut state = 7u64;
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut write = |name: &str, range: std::ops::Range<usize>| {
        let lines: String = range
            .map(|i| {
                let words: Vec<u64> = (0..2 + next(5)).map(|_| next(40)).collect();
                let side = |prefix: &str| words.iter().map(|w| format!("{prefix}{w}")).collect::<Vec<_>>().join(" ") + " .";
                serde_json::json!({"kind": "example", "v": 1, "id": format!("w{i}"), "text": side("en"), "label": 0, "source": side("de")}).to_string() + "\n"
            })
            .collect();
        std::fs::write(dir.path().join(name), lines).unwrap();
        dir.path().join(name)
    };
    let (train, held) = (write("train.jsonl", 0..3000), write("held.jsonl", 3000..3100));
    let vocab = dir.path().join("vocab.safetensors");
    ok(&run(bin("build-vocab").args(["--scratch", "32", "--seed", "0", "--data"]).arg(&train).arg("-o").arg(&vocab)));
    let model = dir.path().join("m.safetensors");
    ok(&run(bin("train-victim").arg("--embeddings").arg(&vocab).args(["--arch", "seq2seq", "--hidden", "32", "--layers", "1", "--heads", "2", "--source-len", "8", "--max-len", "18", "--train-embeddings"])
        .args(["--epochs", "8", "--batch-size", "32", "--lr", "3e-3", "--warmup", "200", "--decay", "--seed", "0", "--device", "cpu", "--train"]).arg(&train).arg("-o").arg(&model)));
    let held_bytes = std::fs::read(&held).unwrap();
    let out = json_lines(&ok(&run_with_stdin(bin("generate").arg("--victim").arg(&model), &held_bytes)).stdout);
    let exact = out.iter().zip(records(&held_bytes)).filter(|(g, e)| g["continuation"].as_str().unwrap() == e.text).count();
    assert!(exact >= 90, "{exact} of 100 held-out sentences translated exactly; first: {} vs {}", out[0]["continuation"], records(&held_bytes)[0].text);
}

/// The thresholds a detection budget logs ("detection budget at F% FPR on the clean
/// training split: perplexity 7.9, onion 1.4, ...; N words banned"), by detector.
fn budget_thresholds(log: &str) -> std::collections::BTreeMap<String, f64> {
    let line = log.lines().find(|l| l.starts_with("detection budget at")).unwrap_or_else(|| panic!("no budget in the log: {log}"));
    let list = line.split_once("split: ").unwrap().1.split(';').next().unwrap();
    list.split(", ").map(|d| d.rsplit_once(' ').map(|(n, v)| (n.to_string(), v.parse().unwrap())).unwrap()).collect()
}

#[test]
fn translation_poisons_stay_within_a_detection_budget_at_init_and_through_a_crafting_round() {
    let mt = Mt::new();
    let stage = |name: &str| {
        let mut c = bin(name);
        c.arg("--victim").arg(mt.model()).arg("--data").arg(mt.data());
        c
    };
    let init = |budget: &[&str]| run(stage("init-poisons").args(["--count", "8", "--strategy", "neighbour", "--neighbour-pool", "1", "--concealment", "strict", "--seed", "1"]).args(budget));
    // ONION's thresholds on the fixture's short pairs are 0 at this rate (nine in ten
    // clean pairs score 0), which no substitute passes: the budget here is the other four.
    let budget = ["--evade-fpr", "10", "--evade-detectors", "perplexity,source-perplexity,table-trigger,table-trigger-word"];
    let (plain, evading) = (init(&[]), init(&budget));
    ok(&plain);
    ok(&evading);
    let thresholds = budget_thresholds(&stderr(&evading));
    let names: Vec<&String> = thresholds.keys().collect();
    assert_eq!(names, ["perplexity", "source-perplexity", "table-trigger", "table-trigger-word"], "the budget on pairs reads each side and the trained table");
    // Every detector's score of a set, as the budget measures it: each side's bigram LM
    // fitted on the training split, the table scores in the model's trained table.
    let scores = |poisons: &[u8]| -> Vec<serde_json::Map<String, Value>> {
        let mut c = bin("detect-poisons");
        c.args(["--trigger", "Eiskaffee", "--trained-table"]).arg(mt.model()).arg("--reference").arg(mt.data().join("train.jsonl"));
        json_lines(&ok(&run_with_stdin(&mut c, poisons)).stdout).into_iter().map(|r| r["scores"].as_object().unwrap().clone()).collect()
    };
    let over_thresholds = |set: &[u8], thresholds: &std::collections::BTreeMap<String, f64>| -> Vec<String> {
        scores(set).iter().flat_map(|s| thresholds.iter().filter(|(d, t)| s[d.as_str()].as_f64().unwrap() > **t + 1e-9).map(|(d, _)| d.clone()).collect::<Vec<_>>()).collect()
    };
    let over = |set: &[u8]| over_thresholds(set, &thresholds);
    assert!(over(&plain.stdout).iter().any(|d| d == "table-trigger-word"), "without a budget some nearest neighbour is close to the trigger in the trained table, or this test proves nothing");
    assert_eq!(over(&evading.stdout), Vec::<String>::new(), "a poison made under the budget is flagged");
    assert_eq!(records(&evading.stdout).len(), 8);
    // A crafting round under the same budget: the ranking never proposes a banned word, and
    // verification refuses a flip that takes a poison over a threshold.
    std::fs::write(mt.path("e0.jsonl"), &evading.stdout).unwrap();
    let grad = ok(&run(stage("rollout-grad").arg("--poisons").arg(mt.path("e0.jsonl")))).stdout.clone();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["--grad", "-", "-k", "4", "--concealment", "strict", "--evade-fpr", "10"]), &grad)).stdout.clone();
    std::fs::write(mt.path("ec.jsonl"), &cands).unwrap();
    let out = run(stage("verify-candidates").arg("--poisons").arg(mt.path("e0.jsonl")).arg("--candidates").arg(mt.path("ec.jsonl")).args(["--concealment", "strict"]).args(budget));
    ok(&out);
    assert!(stderr(&out).contains("keep their poison within the detection budget"), "{}", stderr(&out));
    assert_eq!(budget_thresholds(&stderr(&out)), thresholds, "verification measures the same budget");
    assert_eq!(over(&out.stdout), Vec::<String>::new(), "a crafted poison left the budget");
    assert_ne!(out.stdout, evading.stdout, "the round flipped nothing under the budget");

    // A base whose poison a detector flags is tried again with its pool's other words: under
    // a table-only budget tight enough that the single nearest word fails for some of the 168
    // bases, a pool of 3 (which tries that word too) makes more poisons, all within the budget.
    let table_budget = ["--evade-fpr", "25", "--evade-detectors", "table-trigger,table-trigger-word"];
    let with_pool = |pool: &str, count: usize| run(stage("init-poisons").args(["--count", &count.to_string(), "--strategy", "neighbour", "--neighbour-pool", pool, "--concealment", "strict", "--seed", "1"]).args(table_budget));
    let single = with_pool("1", 168);
    assert!(!single.status.success(), "one word per base should leave too few bases here, or this proves nothing: {}", stderr(&single));
    let passing: usize = stderr(&single).split("only ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count of passing bases in: {}", stderr(&single)));
    let pooled = with_pool("3", passing + 1);
    ok(&pooled);
    let rebuilt: usize = stderr(&pooled).split(" rebuilt with another word").next().and_then(|s| s.rsplit('(').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no retry count in the log: {}", stderr(&pooled)));
    assert!(rebuilt > 0, "no flagged base was rebuilt: {}", stderr(&pooled));
    assert_eq!(records(&pooled.stdout).len(), passing + 1);
    // The log prints each threshold to 4 decimals, and at 25 % FPR a poison's word can score
    // the threshold itself (a clean word of the quantile): compare against it rounded up.
    let logged = budget_thresholds(&stderr(&pooled)).into_iter().map(|(d, t)| (d, t + 5e-5)).collect();
    assert_eq!(over_thresholds(&pooled.stdout, &logged), Vec::<String>::new(), "a rebuilt poison is still over the budget");
}

#[test]
fn where_the_allocator_puts_tensors_does_not_change_a_bit() {
    // Every binary keeps freed blocks on glibc's heap (`cli::keep_freed_memory`), unless a
    // MALLOC_ variable sets the allocator by hand: here every block above 4 KiB gets a
    // mapping of its own, so tensors sit at other addresses and alignments. A victim
    // trained and a gradient taken either way must be the same bytes.
    let mt = Mt::new();
    let mmapped = |c: &mut std::process::Command| -> Vec<u8> { ok(&run(c.env("MALLOC_MMAP_THRESHOLD_", "4096"))).stdout.clone() };
    let victim = mmapped(mt.train(&mt.vocab(), 30).args(["-o", "-"]));
    assert_eq!(victim, std::fs::read(mt.model()).unwrap(), "the victim trained with every block mmapped differs");
    let p0 = ok(&run(bin("init-poisons").arg("--victim").arg(mt.model()).arg("--data").arg(mt.data()).args(["--count", "6", "--strategy", "random", "--concealment", "strict", "--seed", "2"]))).stdout.clone();
    std::fs::write(mt.path("p0.jsonl"), &p0).unwrap();
    let grad = |c: &mut std::process::Command| {
        c.arg("--victim").arg(mt.model()).arg("--data").arg(mt.data()).arg("--poisons").arg(mt.path("p0.jsonl")).args(["--steps", "2", "--rollouts", "2"]);
    };
    let mut heap = bin("rollout-grad");
    grad(&mut heap);
    let mut mapped = bin("rollout-grad");
    grad(&mut mapped);
    assert_eq!(ok(&run(&mut heap)).stdout, mmapped(&mut mapped), "the second-order gradient with every block mmapped differs");
}

#[test]
fn a_k2_verification_is_the_same_bytes_on_one_thread_and_on_two() {
    // verify-candidates checks candidates on --workers threads that read the same θ_t and
    // minibatch gradients; at k > 1 each runs its own unrolled steps through a trained
    // table. The poisons and the summary's objectives must not depend on the thread count.
    let mt = Mt::new();
    let stage = |name: &str| {
        let mut c = bin(name);
        c.arg("--victim").arg(mt.model()).arg("--data").arg(mt.data());
        c
    };
    let p0 = ok(&run(stage("init-poisons").args(["--count", "8", "--strategy", "random", "--concealment", "strict", "--seed", "3"]))).stdout.clone();
    std::fs::write(mt.path("p0.jsonl"), &p0).unwrap();
    let grad = ok(&run(stage("rollout-grad").arg("--poisons").arg(mt.path("p0.jsonl")).args(["--steps", "2", "--rollouts", "2"]))).stdout.clone();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["--grad", "-", "-k", "3", "--positions", "2", "--concealment", "strict"]), &grad)).stdout.clone();
    std::fs::write(mt.path("c.jsonl"), &cands).unwrap();
    assert!(json_lines(&cands).len() > 16, "more candidates than one chunk of the seq2seq (16), so both threads work");
    let verify = |workers: &str| {
        let summary = mt.path(&format!("summary-{workers}.json"));
        let out = ok(&run(stage("verify-candidates").arg("--poisons").arg(mt.path("p0.jsonl")).arg("--candidates").arg(mt.path("c.jsonl"))
            .args(["--concealment", "strict", "--workers", workers]).arg("--summary").arg(&summary))).stdout.clone();
        let mut s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        s.as_object_mut().unwrap().remove("seconds");
        (out, s)
    };
    let (one, s1) = verify("1");
    let (two, s2) = verify("2");
    assert!(s1["flips_accepted"].as_u64().unwrap() > 0, "some flip helps on the fixture: {s1}");
    assert_eq!(one, two, "the poisons differ between one thread and two");
    assert_eq!(s1, s2, "the objectives differ between one thread and two");
}
