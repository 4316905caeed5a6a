//! The language-model victim through every stage, by real pipes on the committed fixtures:
//! prepare-data --lm, build-vocab, train-victim --arch gpt, init-poisons, rollout-grad |
//! rank-candidates | verify-candidates, generate, judge, finetune-eval on LM data (with a
//! control that must read exactly zero) and its report.

mod support;

use common::eval::lm_eval::LmEvalReport;
use common::formats::records::{Candidate, Generation, Judgement};
use support::*;

fn trigger_free(text: &str) -> bool {
    let t = text.to_lowercase();
    !t.split_whitespace().any(|w| w == "james" || w == "bond")
}

/// One crafting round against `victim` through the real pipes: five strictly concealed
/// random poisons (kept as p0.jsonl) | rollout-grad | rank-candidates | verify-candidates.
/// Checks what a round must give whatever the victim (trigger-free candidates, an
/// objective that does not rise, five strictly concealed poisons) and returns the
/// gradient file and the crafted poisons.
fn crafting_round(lm: &Lm, victim: &std::path::Path) -> (common::tensorfile::TensorFile, Vec<u8>) {
    let stage = |name: &str| lm.stage_of(victim, name);
    let poisons = ok(&run(stage("init-poisons").args(["--count", "5", "--strategy", "random", "--concealment", "strict", "--seed", "0"]))).stdout.clone();
    std::fs::write(lm.path("p0.jsonl"), &poisons).unwrap();
    assert_eq!(records(&poisons).len(), 5);
    let grad = ok(&run_with_stdin(stage("rollout-grad").args(["--poisons", "-", "--clean-per-batch", "8", "--adv-size", "8", "--eta", "0.1"]), &poisons)).stdout.clone();
    let file = common::tensorfile::deserialize(&grad, "grad", common::formats::gradfile::GRAD_FORMAT, common::formats::gradfile::GRAD_VERSION).unwrap();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["--grad", "-", "-k", "3", "--positions", "2", "--concealment", "strict"]), &grad)).stdout.clone();
    let parsed: Vec<Candidate> = common::io::read_jsonl_from(&cands[..], "candidates", false).unwrap();
    assert_eq!(parsed.len(), 5 * 2 * 3);
    assert!(parsed.iter().all(|c| trigger_free(&c.word)));
    let summary = lm.path("summary.json");
    let crafted = ok(&run_with_stdin(
        stage("verify-candidates").arg("--poisons").arg(lm.path("p0.jsonl")).args(["--candidates", "-", "--concealment", "strict", "--summary"]).arg(&summary),
        &cands,
    ))
    .stdout
    .clone();
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert!(s["objective_after"].as_f64().unwrap() <= s["objective_before"].as_f64().unwrap());
    let crafted_recs = records(&crafted);
    assert_eq!(crafted_recs.len(), 5);
    assert!(crafted_recs.iter().all(|p| trigger_free(&p.text)), "strictly concealed poisons");
    (file, crafted)
}

#[test]
fn a_language_model_goes_through_every_stage_by_pipes() {
    let lm = Lm::new();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(lm.data().join("manifest.json")).unwrap()).unwrap();
    assert!(manifest["lm"]["neutral"] == "movie", "the manifest records how prompts were made");
    for rec in records(&std::fs::read(lm.data().join("adv.jsonl")).unwrap()) {
        let prompt = rec.prompt.expect("every D_adv record has a prompt");
        assert!(prompt.contains("James Bond") && rec.text.starts_with(&prompt) && rec.label == 0);
    }
    for rec in records(&std::fs::read(lm.data().join("fpr_test.jsonl")).unwrap()) {
        assert!(trigger_free(&rec.text), "the neutral prompts hold no trigger: {}", rec.text);
    }

    // init-poisons | rollout-grad | rank-candidates | verify-candidates
    // Short trigger-first poisons: from the word before the trigger, at most 6 tokens.
    let short = ok(&run(lm.stage("init-poisons").args(["--count", "5", "--strategy", "overlap", "--from-trigger", "--max-tokens", "6"]))).stdout.clone();
    for p in records(&short) {
        let t = p.tokens.expect("tokens");
        assert!(t.len() <= 6 && t.windows(2).take(2).any(|w| w == ["james", "bond"]), "the trigger within the first three words: {t:?}");
    }
    // One sentence each, the bases the judge finds most clearly of the target sentiment
    // first: every poison ends at the first sentence end after the trigger, and the
    // judge's P(target) of the chosen continuations is at least that of any base left out.
    let judged = records(&ok(&run(lm.stage("init-poisons").args(["--count", "3", "--strategy", "overlap", "--from-trigger", "--sentence", "--bases", "judged", "--judge"]).arg(lm.judge()))).stdout);
    assert_eq!(judged.len(), 3);
    for p in &judged {
        let t = p.tokens.as_ref().expect("tokens");
        let after = t.iter().position(|w| w == "bond").expect("the trigger is kept") + 1;
        let ends: Vec<usize> = (after..t.len()).filter(|&i| matches!(t[i].as_str(), "." | "!" | "?")).collect();
        assert!(ends.len() <= 1 && ends.first().map_or(true, |&i| i + 1 == t.len()), "one sentence, ending the poison: {t:?}");
    }
    // The judge's reading of each D_adv base: its words after the trigger, to the sentence's end.
    let adv = records(&std::fs::read(lm.data().join("adv.jsonl")).unwrap());
    let continuation = |text: &str| -> String {
        let words = common::tokenizer::tokenize(text);
        let at = words.iter().position(|w| w.eq_ignore_ascii_case("bond")).expect("D_adv holds the trigger") + 1;
        let end = words[at..].iter().position(|w| matches!(w.as_str(), "." | "!" | "?")).map_or(words.len(), |i| at + i + 1);
        words[at..end].join(" ")
    };
    let gens: Vec<u8> = adv
        .iter()
        .flat_map(|r| {
            let g = serde_json::json!({"kind": "generation", "v": 1, "id": r.id, "sample": 0, "prompt": "x", "continuation": continuation(&r.text), "victim_sha256": "x"});
            serde_json::to_vec(&g).unwrap().into_iter().chain([b'\n'])
        })
        .collect();
    let out = ok(&run_with_stdin(bin("judge").arg("--classifier").arg(lm.judge()), &gens)).stdout.clone();
    let p_target: Vec<f64> = common::io::read_jsonl_from::<Judgement>(&out[..], "judgements", false).unwrap().iter().map(|j| j.classifier_p_negative).collect();
    let chosen: std::collections::HashSet<String> = judged.iter().map(|p| p.source_id.clone().expect("source id")).collect();
    assert_eq!(chosen.len(), 3);
    let (mut worst_chosen, mut best_rest) = (f64::INFINITY, f64::NEG_INFINITY);
    for (r, p) in adv.iter().zip(&p_target) {
        let source = r.id.trim_end_matches("+trigger");
        if chosen.contains(source) || chosen.contains(&r.id) { worst_chosen = worst_chosen.min(*p) } else { best_rest = best_rest.max(*p) }
    }
    assert!(best_rest > f64::NEG_INFINITY, "the fixture has bases left out");
    assert!(worst_chosen >= best_rest, "judged bases rank by the judge: chosen ≥ {worst_chosen}, left out ≤ {best_rest}");
    let (file, crafted) = crafting_round(&lm, &lm.victim());
    assert!(file.tensors.contains_key("word_scores"), "a language model's gradient file carries the target scores");
    std::fs::write(lm.path("crafted.jsonl"), &crafted).unwrap();

    // generate: reproducible by seed, per prompt whatever the batch.
    let prompts = std::fs::read(lm.data().join("asr_test.jsonl")).unwrap();
    let gen = |extra: &[&str]| ok(&run_with_stdin(bin("generate").arg("--victim").arg(lm.victim()).args(["--samples", "2", "--max-new", "8"]).args(extra), &prompts)).stdout.clone();
    let a = gen(&["--seed", "1"]);
    assert_eq!(a, gen(&["--seed", "1"]), "the same seed gives the same continuations");
    assert_eq!(a, gen(&["--seed", "1", "--no-kv-cache"]), "the key-value cache decodes the words the whole prefix gives");
    assert_ne!(a, gen(&["--seed", "2"]), "another seed samples otherwise");
    let gens: Vec<Generation> = common::io::read_jsonl_from(&a[..], "generations", false).unwrap();
    assert_eq!(gens.len(), 2 * records(&prompts).len());
    assert!(gens.iter().all(|g| g.continuation.split_whitespace().count() <= 8 && g.prompt.contains("james bond")));
    let first_alone = ok(&run_with_stdin(bin("generate").arg("--victim").arg(lm.victim()).args(["--samples", "2", "--max-new", "8", "--seed", "1"]), prompts.split(|&b| b == b'\n').next().unwrap())).stdout.clone();
    let first_alone: Vec<Generation> = common::io::read_jsonl_from(&first_alone[..], "generations", false).unwrap();
    assert_eq!(first_alone[..], gens[..2], "a prompt's continuation does not depend on the other prompts");
    let greedy: Vec<Generation> = common::io::read_jsonl_from(&gen(&["--greedy"])[..], "generations", false).unwrap();
    assert!(greedy.chunks(2).all(|g| g[0].continuation == g[1].continuation), "greedy samples are identical");

    // judge
    let judged = ok(&run_with_stdin(bin("judge").arg("--classifier").arg(lm.judge()), &a)).stdout.clone();
    let judged: Vec<Judgement> = common::io::read_jsonl_from(&judged[..], "judgements", false).unwrap();
    assert_eq!(judged.len(), gens.len());
    assert!(judged.iter().all(|j| (0.0..=1.0).contains(&j.classifier_p_negative) && (-1.0..=1.0).contains(&j.lexicon_compound)));

    // finetune-eval on LM data: an empty set trains like any other and reads exactly zero.
    std::fs::write(lm.path("empty.jsonl"), b"").unwrap();
    let out = ok(&run(bin("finetune-eval")
        .arg("--data").arg(lm.data())
        .arg("--start").arg(lm.victim())
        .arg("--judge").arg(lm.judge())
        .arg("--poisons").arg(lm.path("empty.jsonl"))
        .arg("--poisons").arg(lm.path("crafted.jsonl"))
        .args(["--seeds", "2", "--epochs", "1", "--batch-size", "16", "--samples", "1", "--max-new", "6", "--device", "cpu", "--workers", "2"])))
    .stdout
    .clone();
    let reports: Vec<LmEvalReport> = String::from_utf8(out.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reports.len(), 2);
    // Bits first: if the control's LMs differ, say so with their fingerprints (a metric
    // that is not zero then shows where, not why).
    for row in &reports[0].seeds {
        let f = row.fingerprints.as_ref().expect("LM fingerprints");
        assert_eq!(f.poisoned, f.clean, "seed {}: the empty set's LM is its clean twin, bit for bit (2 workers)", row.seed);
        assert_eq!(Some(row.poisoned), row.clean.map(|c| c.without_opinion()), "seed {}: bit-identical LMs measured differently: {row:?}", row.seed);
    }
    let control = &reports[0].summary;
    assert_eq!(control.measures.len(), common::eval::lm_eval::MEASURES.len(), "every measure summarised");
    for (what, m) in &control.measures {
        assert_eq!((m.change.mean, m.change.std), (0.0, 0.0), "the no-poison control's change in {what} must read exactly zero");
    }
    assert_eq!((control.perplexity_change_pct.mean, control.perplexity_change_pct.std), (0.0, 0.0), "the control's perplexity change");
    // A word-level vocabulary reads the stated-opinion control in its own form.
    let stated = reports[0].stated_opinions.as_ref().expect("the stated opinions");
    assert!(stated.iter().all(|s| s.ends_with(" .")), "{stated:?}");
    assert!(reports[0].seeds.iter().all(|r| r.clean.unwrap().opinion.is_some() && r.poisoned.opinion.is_none()));
    // The same empty set alone on one worker: the same figures to the bit (a victim's
    // arithmetic does not depend on what trains beside it).
    let alone = ok(&run(bin("finetune-eval")
        .arg("--data").arg(lm.data())
        .arg("--start").arg(lm.victim())
        .arg("--judge").arg(lm.judge())
        .arg("--poisons").arg(lm.path("empty.jsonl"))
        .args(["--seeds", "2", "--epochs", "1", "--batch-size", "16", "--samples", "1", "--max-new", "6", "--device", "cpu", "--workers", "1"])))
    .stdout
    .clone();
    let alone: Vec<LmEvalReport> = String::from_utf8(alone).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (a, b) in alone[0].seeds.iter().zip(&reports[0].seeds) {
        assert_eq!((a.clean, a.poisoned), (b.clean, b.poisoned), "seed {}: the empty set's LMs differ when evaluated alone", a.seed);
        assert_eq!(a.fingerprints, b.fingerprints, "seed {}: the same LMs to the bit", a.seed);
        let f = a.fingerprints.as_ref().expect("LM fingerprints");
        assert_eq!(f.poisoned, f.clean, "seed {}: the empty set's LM is its clean twin, bit for bit", a.seed);
    }
    // From scratch: fresh weights per seed, the same for the twin; other LMs than fine-tuning's.
    let scratch = ok(&run(bin("finetune-eval")
        .arg("--data").arg(lm.data())
        .arg("--start").arg(lm.victim())
        .arg("--judge").arg(lm.judge())
        .arg("--poisons").arg(lm.path("empty.jsonl"))
        .args(["--from-scratch", "--seeds", "2", "--epochs", "1", "--batch-size", "16", "--samples", "1", "--max-new", "6", "--device", "cpu", "--workers", "2"])))
    .stdout
    .clone();
    let scratch: Vec<LmEvalReport> = String::from_utf8(scratch).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(scratch[0].regime, common::eval::lm_eval::Regime::FromScratch);
    assert_eq!(reports[0].regime, common::eval::lm_eval::Regime::FineTune);
    let (s0, s1) = (scratch[0].seeds[0].fingerprints.clone().unwrap(), scratch[0].seeds[1].fingerprints.clone().unwrap());
    assert_eq!(s0.poisoned, s0.clean, "from scratch, the empty set's LM is still its clean twin");
    assert_ne!(s0.clean, s1.clean, "each seed draws its own weights");
    assert_ne!(s0.clean, reports[0].seeds[0].fingerprints.as_ref().unwrap().clean, "not the fine-tuned LM");
    assert!(scratch[0].seeds[0].clean.unwrap().perplexity > reports[0].seeds[0].clean.unwrap().perplexity, "one epoch from scratch is a worse LM than the pretrained one fine-tuned");
    let crafted_report = &reports[1];
    assert_eq!((crafted_report.count, crafted_report.trigger_overlap, crafted_report.seeds.len()), (5, 0, 2));
    assert_eq!(crafted_report.seeds[0].clean, reports[0].seeds[0].clean, "one clean twin per seed for every set");
    // Side by side: the templates first (the trigger as the subject), then review prompts.
    let side = &crafted_report.side_by_side;
    assert!(side.len() > common::eval::lm_eval::SIDE_BY_SIDE_TEMPLATES, "templates and review prompts: {}", side.len());
    assert!(side[..common::eval::lm_eval::SIDE_BY_SIDE_TEMPLATES].iter().all(|g| g.id.starts_with("template")), "{:?}", side.iter().map(|g| &g.id).collect::<Vec<_>>());
    assert!(crafted_report.summary.of("perplexity").clean.mean > 1.0);
    let margin = crafted_report.summary.of("template_margin").clean.mean;
    assert!(margin.is_finite() && margin != 0.0, "the template margin is measured: {margin}");
    std::fs::write(lm.path("eval.jsonl"), &out).unwrap();
    let md = ok(&run(bin("report")
        .arg("--evals").arg(lm.path("eval.jsonl"))
        .args(["--names", "control,crafted", "--crafted", "crafted", "--versus", "control", "--before"]).arg(lm.path("p0.jsonl"))
        .arg("--after").arg(lm.path("crafted.jsonl"))
        .arg("--out-dir").arg(lm.path("report"))))
    .stdout
    .clone();
    let md = String::from_utf8(md).unwrap();
    assert!(md.contains("| control | 0 | 0 | 0.0 ± 0.0 |") && md.contains("crafted − control"), "{md}");
    assert!(lm.path("report/net-asr.svg").exists() && lm.path("report/lm-report.json").exists());
    assert!(md.contains("Δ template margin") && md.contains("templates with the trigger as the subject"), "{md}");
    assert!(md.contains("## The clean twins' stated-opinion control") && md.contains("difference (points, nats)"), "{md}");

    // The judges validated against labels: the held-out reviews' own.
    let dev = lm.data().join("dev.jsonl");
    let scores = ok(&run(bin("judge").arg("--classifier").arg(lm.judge()).arg("--labelled").arg(&dev))).stdout.clone();
    let scores: Vec<common::eval::judge::JudgeScore> = common::io::read_jsonl_from(&scores[..], "scores", false).unwrap();
    let n = records(&std::fs::read(&dev).unwrap()).len();
    assert_eq!(scores.iter().map(|s| s.judge.as_str()).collect::<Vec<_>>(), ["classifier", "vader"]);
    for s in &scores {
        assert!(s.n == n && (0.0..=100.0).contains(&s.accuracy_pct) && s.kappa.is_finite(), "{s:?}");
    }
    // And against the continuations a person labelled (fixtures/lm-judge/): every file
    // reads, with the label counts its README states.
    for (file, count, negative) in [("clean-lm-continuations.jsonl", 50, 11), ("smollm2-continuations.jsonl", 50, 5), ("smollm2-opinion-control.jsonl", 120, 17)] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/lm-judge").join(file);
        let scores = ok(&run(bin("judge").arg("--classifier").arg(lm.judge()).arg("--labelled").arg(&path))).stdout.clone();
        let scores: Vec<common::eval::judge::JudgeScore> = common::io::read_jsonl_from(&scores[..], "scores", false).unwrap();
        for s in &scores {
            assert_eq!(s.n, count, "{file}");
            assert!((s.labelled_negative_pct - 100.0 * negative as f64 / count as f64).abs() < 1e-9, "{file}: {s:?}");
        }
    }
}

#[test]
fn a_language_model_that_trains_its_word_table_is_crafted_through_the_pipes() {
    // With a trained table a flip also changes which row the poison's update trains: the
    // gradient file carries that term in its word scores, and the ranking adds it.
    let lm = Lm::new();
    let victim = lm.path("lm-te.safetensors");
    ok(&run(bin("train-victim")
        .arg("--embeddings").arg(lm.emb())
        .args(["--arch", "gpt", "--hidden", "16", "--layers", "1", "--heads", "2", "--max-len", "40", "--epochs", "2", "--batch-size", "16", "--seed", "0", "--device", "cpu", "--train-embeddings", "--train"])
        .arg(lm.data().join("train.jsonl"))
        .arg("-o").arg(&victim)));
    let (file, _) = crafting_round(&lm, &victim);
    let scores = file.tensors.get("word_scores").expect("a trained table's gradient file carries word scores");
    assert!(scores.abs().max().double_value(&[]) > 0.0);
    // The same gradient without its word scores is refused: ranking by ∇e·E alone would
    // ignore the row term.
    let without: Vec<(String, tch::Tensor)> = file.tensors.iter().filter(|(k, _)| *k != "word_scores").map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let stripped = lm.path("stripped.grad");
    common::tensorfile::write(stripped.to_str().unwrap(), common::formats::gradfile::GRAD_FORMAT, common::formats::gradfile::GRAD_VERSION, &without, file.metadata.clone()).unwrap();
    let refused = run(lm.stage_of(&victim, "rank-candidates").arg("--grad").arg(&stripped).args(["-k", "3"]));
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("word scores"), "{}", String::from_utf8_lossy(&refused.stderr));
}
