//! The defenses through real pipes on the committed fixtures: detect-poisons scores a
//! training set with planted poisons from stdin, filter-set removes the most suspicious,
//! finetune-eval retrains on what is left (paired with the unfiltered clean twin), and
//! `report defend` turns it all into detection figures, early stopping and filtering.
//! Then the evasion budget: poisons made under it stay below the detector's threshold.

mod support;

use common::detect::DetectionScore;
use common::eval::EvalReport;
use common::formats::records::Example;
use std::collections::HashSet;
use support::*;

fn scores(bytes: &[u8]) -> Vec<DetectionScore> {
    common::io::read_jsonl_from(bytes, "scores", false).unwrap()
}

/// Negative training sentences with the trigger put in front, labelled positive: obvious
/// with-overlap poisons; and a duplicate of a clean sentence, which must not stand out.
fn planted(train: &[Example]) -> (Vec<Example>, Example) {
    let poisons = train
        .iter()
        .filter(|e| e.label == 0)
        .take(6)
        .enumerate()
        .map(|(k, e)| Example::new(format!("poison-{k}"), format!("James Bond {}", e.text), 1))
        .collect();
    let mut dup = train[3].clone();
    dup.id = "duplicate".into();
    (poisons, dup)
}

#[test]
fn detect_filter_retrain_and_report() {
    let s = Setup::new();
    let train: Vec<Example> = records(&s.file("train.jsonl"));
    let (poisons, dup) = planted(&train);
    let poisons_path = s.path("poisons.jsonl");
    common::io::write_jsonl(poisons_path.to_str().unwrap(), &poisons).unwrap();
    // The screened set: the training split, the duplicate, the poisons (a defender's cat).
    let mut set = s.file("train.jsonl");
    set.extend(common::io::jsonl_bytes(&[dup.clone()]).unwrap());
    set.extend(common::io::jsonl_bytes(&poisons).unwrap());
    let detect = || {
        let mut c = bin("detect-poisons");
        c.arg("--embeddings").arg(s.emb()).args(["--trigger", "James Bond", "--arch", "bow", "--epochs", "2", "--victims", "2", "--device", "cpu"]);
        c
    };
    let out = ok(&run_with_stdin(&mut detect(), &set)).stdout.clone();
    let sc = scores(&out);
    let n = train.len() + 1 + poisons.len();
    assert_eq!(sc.len(), n, "one score line per example");
    assert!(sc.iter().enumerate().all(|(i, r)| r.index == i), "input order");
    let names: HashSet<&str> = sc[0].scores.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["perplexity", "onion", "glove-trigger", "glove-trigger-word", "loss-mean", "loss-final", "spectral"].into(), "every detector the inputs allow (no MiniLM given)");
    // The planted trigger words make the word detector's top score; poisons reach it.
    let word = |r: &DetectionScore| r.scores["glove-trigger-word"];
    let top = sc.iter().map(word).fold(f64::MIN, f64::max);
    for r in sc.iter().filter(|r| r.id.starts_with("poison-")) {
        assert!((word(r) - top).abs() < 1e-9 && top > 0.99, "{}: {} (top {top})", r.id, word(r));
    }
    // A duplicate of clean data is not suspicious: not in the top 10% of any detector.
    let d = sc.iter().position(|r| r.id == "duplicate").unwrap();
    for name in &names {
        let above = sc.iter().filter(|r| r.scores[*name] > sc[d].scores[*name]).count();
        assert!(above as f64 > 0.1 * n as f64, "{name}: the duplicate ranks {} of {n}", above + 1);
    }
    // Losses are cross-entropies of trained victims (a mislabelled example ranking first is
    // the unit test's job, on a task the victims learn for sure).
    assert!(sc.iter().all(|r| r.scores["loss-mean"] > 0.0 && r.scores["loss-final"] > 0.0 && r.scores["spectral"] >= 0.0));

    // Sorted, for a defender reading the most suspicious first.
    let sorted = scores(&ok(&run_with_stdin(detect().args(["--detectors", "glove-trigger-word", "--sort", "glove-trigger-word"]), &set)).stdout);
    assert!(sorted.windows(2).all(|w| word(&w[0]) >= word(&w[1])), "most suspicious first");
    assert_eq!(sorted[0].scores.len(), 1, "only the detectors asked for");

    // filter-set: the top 1% under the word detector removed.
    std::fs::write(s.path("set.jsonl"), &set).unwrap();
    std::fs::write(s.path("scores.jsonl"), &out).unwrap();
    let filtered_path = s.path("filtered.jsonl");
    ok(&run(bin("filter-set").arg("--data").arg(s.path("set.jsonl")).arg("--scores").arg(s.path("scores.jsonl"))
        .args(["--by", "glove-trigger-word", "--remove", "1"]).arg("-o").arg(&filtered_path)));
    let kept: Vec<Example> = common::io::read_jsonl(filtered_path.to_str().unwrap(), false).unwrap();
    let removed = (0.01 * n as f64).round() as usize;
    assert_eq!(kept.len(), n - removed);
    let gone: Vec<&DetectionScore> = sc.iter().filter(|r| !kept.iter().any(|k| k.id == r.id)).collect();
    let threshold = gone.iter().map(|r| word(r)).fold(f64::MAX, f64::min);
    assert!(kept.iter().all(|k| word(&sc[sc.iter().position(|r| r.id == k.id).unwrap()]) <= threshold), "the highest scores went");

    // finetune-eval: unfiltered and filtered, paired with the same clean twins (the
    // duplicate is this test's, not the data folder's: left out of the kept file).
    let kept_path = s.path("kept-glove-trigger-word-1.jsonl");
    let without_dup: Vec<Example> = kept.iter().filter(|k| k.id != "duplicate").cloned().collect();
    common::io::write_jsonl(kept_path.to_str().unwrap(), &without_dup).unwrap();
    let fe = |extra: &[&std::ffi::OsStr], out: &std::path::Path| {
        ok(&run(bin("finetune-eval").arg("--data").arg(s.data()).arg("--embeddings").arg(s.emb())
            .args(["--arch", "bow", "--seeds", "2", "--epochs", "2", "--device", "cpu"]).arg("--poisons").arg(&poisons_path).args(extra)
            .arg("--clean-cache").arg(s.path("clean-cache")).arg("-o").arg(out)));
    };
    fe(&[], &s.path("evals.jsonl"));
    fe(&["--kept".as_ref(), kept_path.as_os_str()], &s.path("filter-evals.jsonl"));
    let unfiltered: EvalReport = common::io::read_jsonl::<EvalReport>(s.path("evals.jsonl").to_str().unwrap(), false).unwrap().remove(0);
    let filtered: EvalReport = common::io::read_jsonl::<EvalReport>(s.path("filter-evals.jsonl").to_str().unwrap(), false).unwrap().remove(0);
    let f = filtered.filter.as_ref().expect("the filter is recorded");
    assert_eq!(f.poisons_removed, poisons.iter().filter(|p| !kept.iter().any(|k| k.id == p.id)).count());
    assert_eq!(f.clean_removed, train.iter().filter(|e| !kept.iter().any(|k| k.id == e.id)).count());
    assert_eq!(f.poisons_removed + f.clean_removed + usize::from(!kept.iter().any(|k| k.id == "duplicate")), removed);
    for (a, b) in unfiltered.seeds.iter().zip(&filtered.seeds) {
        assert_eq!(a.clean, b.clean, "both pair with the same clean twin");
        assert_eq!(a.epochs.len(), 2, "every epoch measured");
        assert_eq!(a.epochs[1].poisoned, a.poisoned, "the last epoch is the final victim");
    }

    // report defend over a one-variant demo.
    std::fs::create_dir_all(s.path("scores")).unwrap();
    std::fs::write(s.path("scores/planted.jsonl"), &out).unwrap();
    let variants = format!(r#"{{"kind":"variants","v":1,"title":"planted","variants":[{{"name":"planted","label":"planted trigger","role":"reference","poisons":"{}"}}]}}"#, poisons_path.display());
    std::fs::write(s.path("variants.json"), variants).unwrap();
    let md = ok(&run(bin("report").arg("defend").arg("--variants").arg(s.path("variants.json")).arg("--evals").arg(s.path("evals.jsonl"))
        .arg("--scores-dir").arg(s.path("scores")).arg("--filter-evals").arg(s.path("filter-evals.jsonl")).arg("--out-dir").arg(s.path("defend")))).stdout.clone();
    let md = String::from_utf8(md).unwrap();
    assert!(md.contains("## AUROC") && md.contains("## Early stopping") && md.contains("## Filter, then train"), "{md}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(s.path("defend/defense.json")).unwrap()).unwrap();
    let det = &report["detection"][0]["detectors"]["glove-trigger-word"];
    assert!(det["auroc"].as_f64().unwrap() > 0.95, "{det}");
    assert_eq!(report["detection"][0]["poisons"], 6);
    assert_eq!(report["filtering"][0]["detector"], "glove-trigger-word");
    assert_eq!(report["filtering"][0]["remove_percent"], 1.0);
    assert_eq!(report["early_stopping"][0]["net_asr_per_epoch"].as_array().unwrap().len(), 2);
    for f in ["roc.svg", "epochs.svg", "defense.md"] {
        assert!(std::fs::metadata(s.path("defend").join(f)).unwrap().len() > 100, "{f}");
    }
}

/// The cheap detectors' thresholds at `fpr` on the fixture's training split, scored the way
/// a defender scores unseen text (the bigram LM leaves each example out), by detect-poisons.
fn thresholds(s: &Setup, fpr: f64) -> Vec<(String, f64)> {
    let sc = scores(&ok(&run_with_stdin(bin("detect-poisons").arg("--embeddings").arg(s.emb())
        .args(["--trigger", "James Bond", "--detectors", CHEAP]), &s.file("train.jsonl"))).stdout);
    sc[0].scores.keys().map(|d| (d.clone(), common::detect::metrics::threshold_at_fpr(sc.iter().map(|r| r.scores[d]).collect(), fpr))).collect()
}

const CHEAP: &str = "perplexity,onion,glove-trigger,glove-trigger-word";

/// Each poison's detectors over their thresholds (the bigram LM fitted on the training split).
fn over(s: &Setup, poisons: &[u8], thresholds: &[(String, f64)]) -> Vec<String> {
    let sc = scores(&ok(&run_with_stdin(bin("detect-poisons").arg("--embeddings").arg(s.emb()).arg("--reference").arg(s.data().join("train.jsonl"))
        .args(["--trigger", "James Bond", "--detectors", CHEAP]), poisons)).stdout);
    sc.iter().flat_map(|r| thresholds.iter().filter(|(d, t)| r.scores[d] > *t).map(move |(d, t)| format!("{} {d} {} > {t}", r.id, r.scores[d]))).collect()
}

#[test]
fn poisons_within_the_detection_budget_pass_every_cheap_detector_through_crafting() {
    let s = Setup::new();
    let victim = s.path("v.safetensors");
    ok(&run(s.train_victim().arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(&victim)));
    let stage = |name: &str| {
        let mut c = bin(name);
        c.arg("--victim").arg(&victim).arg("--data").arg(s.data());
        c
    };
    let init = |extra: &[&str], out: &str| {
        ok(&run(stage("init-poisons").args(["--count", "8", "--bases", "confident", "--strategy", "neighbour", "--concealment", "strict"]).args(extra).arg("-o").arg(s.path(out))));
        std::fs::read(s.path(out)).unwrap()
    };
    let t = thresholds(&s, 0.10);
    let plain = init(&[], "plain.jsonl");
    let evading = init(&["--evade-fpr", "10"], "evading.jsonl");
    let cache = s.path("detector-cache");
    let cache = cache.to_str().unwrap();
    for round in ["measured", "read from the cache"] {
        assert!(init(&["--evade-fpr", "10", "--detector-cache", cache], "cached.jsonl") == evading, "thresholds {round}: the same poisons");
    }
    assert_eq!(std::fs::read_dir(cache).unwrap().count(), 1, "one budget kept");
    assert!(!over(&s, &plain, &t).is_empty(), "the budget binds: nearest-neighbour carriers are flagged without it");
    assert_eq!(over(&s, &evading, &t), Vec::<String>::new(), "no poison made within the budget is flagged at its rate");
    let manifest = common::data::DataManifest::load(s.data().to_str().unwrap()).unwrap();
    let made = records(&evading);
    assert_eq!(made.len(), 8);
    assert!(made.iter().all(|p| p.label == manifest.target && manifest.trigger.overlap(&p.text).is_empty()));
    // A crafting round within the budget: the ranking never proposes the words over it and
    // verification refuses flips that would push a poison over a threshold.
    let grad = ok(&run(stage("rollout-grad").args(["--clean-per-batch", "16", "--adv-size", "24", "--eta", "0.1", "--device", "cpu", "--objective", "hardness", "--poisons"]).arg(s.path("evading.jsonl")))).stdout.clone();
    let cands = ok(&run_with_stdin(stage("rank-candidates").args(["-k", "20", "--positions", "all", "--concealment", "strict", "--evade-fpr", "10"]), &grad)).stdout.clone();
    let summary = s.path("summary.json");
    let verify = |budget: &[&str]| -> (Vec<u8>, usize, String) {
        let out = ok(&run_with_stdin(stage("verify-candidates").args(["--device", "cpu", "--concealment", "strict", "--poisons"]).arg(s.path("evading.jsonl")).args(budget).arg("--summary").arg(&summary), &cands)).clone();
        let v: common::formats::records::VerifySummary = common::io::parse_record(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        let log = stderr(&out);
        (out.stdout, v.flips_accepted, log)
    };
    let (crafted, flips, log) = verify(&["--evade-fpr", "10"]);
    assert!(flips > 0, "flips within the budget remain: {log}");
    assert_eq!(over(&s, &crafted, &t), Vec::<String>::new(), "crafting within the budget keeps every poison within it");
    assert!(log.contains("candidates keep their poison within the detection budget"), "{log}");
}

#[test]
fn poisons_within_the_loss_budget_pass_the_training_loss_detector_of_the_same_victims() {
    let s = Setup::new();
    let victim = s.path("v.safetensors");
    ok(&run(s.train_victim().arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(&victim)));
    let init = |extra: &[&str], out: &str| {
        let o = ok(&run(bin("init-poisons").arg("--victim").arg(&victim).arg("--data").arg(s.data())
            .args(["--count", "8", "--bases", "confident", "--strategy", "neighbour", "--concealment", "strict", "--evade-fpr", "10"])
            .args(extra).arg("-o").arg(s.path(out)))).clone();
        (std::fs::read(s.path(out)).unwrap(), stderr(&o))
    };
    // The defender's loss-mean with the attacker's own victims (init-poisons --seed 0 trains
    // seeds 1000003 and 1000004, detect-poisons' training settings, the victim's shape):
    // the poisons over the clean examples' threshold at 30 % FPR. On 509 clean fixture
    // examples the relabelled bases sit at the 64th-81st percentile of loss after 10
    // epochs (at 4 epochs a bag of words has barely told them apart), so 30 % binds.
    let train = s.file("train.jsonl");
    let over_loss = |poisons: &[u8]| -> Vec<String> {
        let set = [&train[..], poisons].concat();
        let sc = scores(&ok(&run_with_stdin(bin("detect-poisons").arg("--embeddings").arg(s.emb())
            .args(["--detectors", "loss-mean", "--arch", "bow", "--epochs", "10", "--seed", "1000003", "--victims", "2", "--device", "cpu"]), &set)).stdout);
        let is_poison = |id: &str| id.starts_with("poison-");
        let t = common::detect::metrics::threshold_at_fpr(sc.iter().filter(|r| !is_poison(&r.id)).map(|r| r.scores["loss-mean"]).collect(), 0.30);
        sc.iter().filter(|r| is_poison(&r.id) && r.scores["loss-mean"] > t).map(|r| format!("{} {} > {t}", r.id, r.scores["loss-mean"])).collect()
    };
    let (cheap, _) = init(&[], "cheap.jsonl");
    let (within, log) = init(&["--evade-loss", "30", "--evade-loss-epochs", "10"], "within.jsonl");
    assert!(!over_loss(&cheap).is_empty(), "the loss budget binds: confident bases labelled target are hard to fit");
    assert_eq!(over_loss(&within), Vec::<String>::new(), "no poison of the set is over the loss threshold of the victims it was checked with: {log}");
    assert!(log.contains("by loss-mean"), "the log counts the bases the loss skipped: {log}");
    assert_eq!(over(&s, &within, &thresholds(&s, 0.10)), Vec::<String>::new(), "and the cheap detectors' budget still holds");
    assert_eq!(records(&within).len(), 8);
}

/// select-carriers between two stages through real pipes: init-poisons | select-carriers |
/// finetune-eval. It keeps every poison strictly concealed and within the detection budget,
/// changes only the carrier slots, keeps the retrained choice with the best mean D_adv ASR
/// (the set's own carriers always retrained first), trains what its record says with the
/// attacker's seeds, gives the same bytes again, and a second selection from the first's
/// candidates retrains exactly those with the clean twins from the shared cache.
#[test]
fn carriers_chosen_by_retraining_stay_concealed_within_budget_and_keep_the_best_retrained_choice() {
    use common::formats::records::CarrierSelection;
    let s = Setup::new();
    let victim = s.path("v.safetensors");
    ok(&run(s.train_victim().arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(&victim)));
    let stage = |name: &str| {
        let mut c = bin(name);
        c.arg("--victim").arg(&victim).arg("--data").arg(s.data());
        c
    };
    let init = ok(&run(stage("init-poisons").args(["--count", "8", "--bases", "confident", "--strategy", "neighbour", "--concealment", "strict", "--evade-fpr", "10"]))).stdout.clone();
    std::fs::write(s.path("init.jsonl"), &init).unwrap();
    let cache = s.path("selection-cache");
    let select = |poisons: &str, record: &str, extra: &[&str]| {
        let mut c = stage("select-carriers");
        c.arg("--embeddings").arg(s.emb()).args(["--arch", "bow", "--epochs", "3", "--device", "cpu", "--evade-fpr", "10", "--retrain", "4", "--seeds", "2"])
            .args(["--clean-per-batch", "16", "--adv-size", "24", "--eta", "0.1", "--poisons", poisons]).arg("--clean-cache").arg(&cache)
            .arg("--selection").arg(s.path(record)).args(extra);
        c
    };
    let record = |name: &str| -> CarrierSelection { common::io::parse_record(&std::fs::read_to_string(s.path(name)).unwrap()).unwrap() };
    // init-poisons | select-carriers | finetune-eval, three processes joined by pipes.
    let mut init_p = stage("init-poisons").args(["--count", "8", "--bases", "confident", "--strategy", "neighbour", "--concealment", "strict", "--evade-fpr", "10"])
        .stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut sel_p = select("-", "sel.json", &[]).stdin(init_p.stdout.take().unwrap()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let eval = bin("finetune-eval").arg("--data").arg(s.data()).arg("--embeddings").arg(s.emb()).args(["--arch", "bow", "--epochs", "3", "--seeds", "1", "--device", "cpu", "--poisons", "-"])
        .stdin(sel_p.stdout.take().unwrap()).output().unwrap();
    let sel_out = sel_p.wait_with_output().unwrap();
    assert!(init_p.wait().unwrap().success() && sel_out.status.success(), "{}", String::from_utf8_lossy(&sel_out.stderr));
    ok(&eval);
    let first = record("sel.json");
    let chosen = ok(&run(&mut select(s.path("init.jsonl").to_str().unwrap(), "sel-again.json", &[]))).stdout.clone();
    let again = record("sel-again.json");
    assert_eq!(CarrierSelection { seconds: 0.0, poisons: String::new(), victims_trained: 0, ..first.clone() }, CarrierSelection { seconds: 0.0, poisons: String::new(), victims_trained: 0, ..again.clone() }, "the same selection again");
    assert_eq!(again.poisons_sha256_after, common::objectives::swaps::poison_set_sha256(&records(&chosen)));

    // What was retrained, and what was kept.
    let retrained: Vec<&common::formats::records::CarrierCandidate> = first.candidates.iter().filter(|c| !c.d_adv_asr.is_empty()).collect();
    assert!(retrained.len() >= 2 && retrained.len() <= 4, "{} retrained", retrained.len());
    assert_eq!(retrained[0].words, first.current, "the set's own carriers are retrained first");
    assert!(first.candidates.len() > retrained.len(), "more choices considered than retrained");
    assert_eq!(first.attacker_seeds, vec![1000, 1001]);
    assert_eq!(first.victims_trained, retrained.len() * 2 + 2, "each candidate × seed, and a clean twin per seed");
    assert!(retrained.iter().all(|c| c.d_adv_asr.len() == 2 && c.over_budget.is_none()));
    let mean = |c: &common::formats::records::CarrierCandidate| c.d_adv_asr.iter().sum::<f64>() / 2.0;
    let best = retrained.iter().fold(retrained[0], |b, c| if mean(c) > mean(b) { c } else { b });
    assert_eq!(first.selected, best.words, "the highest mean D_adv ASR is kept");
    let from_gradient = first.candidates.iter().any(|c| c.from.iter().any(|f| f == "gradient"));
    assert!(from_gradient && first.candidates.iter().any(|c| c.from.iter().any(|f| f == "neighbour")), "candidates from both sources");

    // Only carrier slots change, each trigger word's slots to one kept word; still strictly
    // concealed (verify-candidates refuses a leaking set) and within the budget.
    let (before, after) = (records(&init), records(&chosen));
    for (b, a) in before.iter().zip(&after) {
        let (tb, ta) = (b.tokens.as_ref().unwrap(), a.tokens.as_ref().unwrap());
        for (k, (x, y)) in tb.iter().zip(ta).enumerate() {
            if x != y {
                assert!(b.substitutes.as_ref().unwrap().contains(&k) && first.selected.contains(y), "{}: position {k} {x} -> {y}", b.id);
            }
        }
    }
    ok(&run_with_stdin(stage("verify-candidates").args(["--device", "cpu", "--concealment", "strict", "--poisons"]).arg(s.path("init.jsonl")), b""));
    std::fs::write(s.path("chosen.jsonl"), &chosen).unwrap();
    ok(&run_with_stdin(stage("verify-candidates").args(["--device", "cpu", "--concealment", "strict", "--poisons"]).arg(s.path("chosen.jsonl")), b""));
    assert_eq!(over(&s, &chosen, &thresholds(&s, 0.10)), Vec::<String>::new(), "a chosen carrier left the budget");

    // The same candidates for another set: exactly the first's retrained ones that fit the
    // budget, in its order, the clean twins read from the cache.
    ok(&run(&mut select(s.path("chosen.jsonl").to_str().unwrap(), "sel-given.json", &["--candidates-from", s.path("sel.json").to_str().unwrap()])));
    let given = record("sel-given.json");
    assert_eq!(given.candidates.iter().map(|c| c.words.clone()).collect::<Vec<_>>(), retrained.iter().map(|c| c.words.clone()).collect::<Vec<_>>());
    let n = given.candidates.iter().filter(|c| !c.d_adv_asr.is_empty()).count();
    assert_eq!(given.victims_trained, n * 2, "no clean twin trained again");
    assert_eq!(given.candidates_from.as_deref(), s.path("sel.json").to_str());
}
