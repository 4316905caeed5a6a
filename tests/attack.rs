//! Integration tests of the crafting stages: real binaries, real pipes, committed fixtures.

mod support;

use common::objectives::bilevel::{BiLevel, Replacement, RolloutConfig, Verifier};
use common::search::rank::taylor_scores;
use common::formats::records::VerifySummary;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use support::*;

struct Attack {
    s: Setup,
}

impl Attack {
    fn new() -> Attack {
        let s = Setup::new();
        let v = s.path("victim.safetensors");
        ok(&run(bin("train-victim").arg("--embeddings").arg(s.emb())
            .args(["--arch", "lstm", "--hidden", "8", "--epochs", "2", "--device", "cpu"])
            .arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(&v)));
        Attack { s }
    }
    fn victim(&self) -> PathBuf {
        self.s.path("victim.safetensors")
    }
    fn stage(&self, name: &str) -> Command {
        let mut c = bin(name);
        c.arg("--victim").arg(self.victim()).arg("--data").arg(self.s.data());
        c
    }
    const ROLLOUT: [&'static str; 8] = ["--clean-per-batch", "16", "--adv-size", "24", "--eta", "0.1", "--device", "cpu"];

    /// init-poisons > p0; rollout-grad < p0 | rank-candidates | verify-candidates > p1,
    /// three processes joined by real pipes.
    fn round(&self, tag: &str, workers: &str) -> (Vec<u8>, VerifySummary) {
        let p0 = self.s.path(&format!("{tag}-p0.jsonl"));
        ok(&run(self.stage("init-poisons").args(["--count", "6", "--seed", "2", "-o"]).arg(&p0)));
        let mut grad = self.stage("rollout-grad").args(Self::ROLLOUT).arg("--poisons").arg(&p0)
            .stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut rank = self.stage("rank-candidates").args(["-k", "6", "--positions", "2"])
            .stdin(grad.stdout.take().unwrap()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let summary = self.s.path(&format!("{tag}-summary.json"));
        let verify = self.stage("verify-candidates").args(["--device", "cpu", "--workers", workers, "--poisons"]).arg(&p0)
            .arg("--summary").arg(&summary).stdin(rank.stdout.take().unwrap()).output().unwrap();
        assert!(grad.wait().unwrap().success() && rank.wait().unwrap().success());
        ok(&verify);
        let s: VerifySummary = common::io::parse_record(&std::fs::read_to_string(&summary).unwrap()).unwrap();
        (verify.stdout, s)
    }
}

#[test]
fn a_crafting_round_composes_through_pipes_lowers_the_objective_and_is_reproducible() {
    let a = Attack::new();
    let (p1, summary) = a.round("a", "2");
    let before = summary.objective_before.unwrap();
    let after = summary.objective_after.unwrap();
    assert!(after <= before, "verify-candidates raised the objective: {before} -> {after}");
    assert_eq!(summary.candidates_checked, 6 * 2 * 6);
    assert!(summary.flips_accepted > 0, "no flip accepted on the fixture");
    for f in &summary.flips {
        assert!(f.exact < 0.0, "accepted flips lower the objective alone: {f:?}");
    }
    let manifest = common::data::DataManifest::load(a.s.data().to_str().unwrap()).unwrap();
    let poisons = records(&p1);
    assert_eq!(poisons.len(), 6);
    for p in &poisons {
        assert!(manifest.trigger.overlap(&p.text).is_empty(), "no-overlap poison holds a trigger word: {}", p.text);
        assert_eq!(p.label, manifest.target);
        assert_eq!(p.text, p.tokens.as_ref().unwrap().join(" "));
    }
    // Again, with the candidates checked on one thread instead of two.
    let (p1_again, again) = a.round("b", "1");
    assert!(p1 == p1_again, "same inputs and seed give the same poisons, on one thread or two");
    assert_eq!(summary.objective_after.unwrap().to_bits(), again.objective_after.unwrap().to_bits());
}

#[test]
fn verification_refuses_candidates_made_for_another_poison_set() {
    let a = Attack::new();
    let p0 = a.s.path("p0.jsonl");
    let other = a.s.path("other.jsonl");
    ok(&run(a.stage("init-poisons").args(["--count", "4", "-o"]).arg(&p0)));
    ok(&run(a.stage("init-poisons").args(["--count", "4", "--seed", "5", "-o"]).arg(&other)));
    let grad = ok(&run(a.stage("rollout-grad").args(Attack::ROLLOUT).arg("--poisons").arg(&p0))).stdout.clone();
    let cands = ok(&run_with_stdin(a.stage("rank-candidates").args(["-k", "3"]), &grad)).stdout.clone();
    let out_path = a.s.path("p1.jsonl");
    let out = run_with_stdin(a.stage("verify-candidates").arg("--poisons").arg(&other).arg("-o").arg(&out_path), &cands);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("<stdin>:1") && stderr(&out).contains("another poison set"), "{}", stderr(&out));
    assert!(!out_path.exists(), "no partial output");
    // Gradients and candidates are not interchangeable.
    let out = run_with_stdin(&mut a.stage("rank-candidates"), &cands);
    assert!(!out.status.success() && stderr(&out).contains("not a readable safetensors file"), "{}", stderr(&out));
}

#[test]
fn taylor_predicted_change_correlates_with_the_exact_change_on_the_fixture() {
    let a = Attack::new();
    let p0 = a.s.path("p0.jsonl");
    ok(&run(a.stage("init-poisons").args(["--count", "6", "-o"]).arg(&p0)));
    let inputs = common::search::poisons::AttackInputs::load(
        a.victim().to_str().unwrap(), a.s.data().to_str().unwrap(), p0.to_str().unwrap(), tch::Device::Cpu,
    ).unwrap();
    let cfg = RolloutConfig { steps: 1, eta: 0.1, rollouts: 1, clean_per_batch: 16, adv_size: 24, seed: 0, regime: None };
    let problem = BiLevel::new(&inputs.victim, &inputs.clean, &inputs.adv, cfg).unwrap();
    let (g0, grad) = problem.objective_and_grad(&inputs.poisons_enc).unwrap();
    let verifier = Verifier::new(&problem, &inputs.poisons_enc);
    let table = inputs.victim.params()["embedding.weight"].shallow_clone();
    let (mut predicted, mut flips) = (Vec::new(), Vec::new());
    for (i, p) in inputs.poisons_enc.iter().enumerate() {
        for pos in (0..p.ids.len()).step_by(3) {
            let scores = taylor_scores(&table, &grad.get(i as i64).get(pos as i64));
            for w in (2..inputs.vocab.len() as i64).step_by(457).take(8) {
                predicted.push(scores.double_value(&[w]) - scores.double_value(&[p.ids[pos]]));
                flips.push((i, common::objectives::swaps::flipped(p, pos, w)));
            }
        }
    }
    let examples: Vec<_> = flips.iter().map(|(_, e)| e.clone()).collect();
    let grads = verifier.example_grads(&examples);
    let sets: Vec<Vec<Replacement>> = flips.iter().zip(&grads).map(|((i, example), g)| vec![Replacement { poison: *i, example, grad: g }]).collect();
    let exact: Vec<f64> = verifier.objectives_with(&sets).into_iter().map(|v| v - g0).collect();
    let n = predicted.len() as f64;
    let (mp, me) = (predicted.iter().sum::<f64>() / n, exact.iter().sum::<f64>() / n);
    let cov: f64 = predicted.iter().zip(&exact).map(|(p, e)| (p - mp) * (e - me)).sum();
    let r = cov / (predicted.iter().map(|p| (p - mp).powi(2)).sum::<f64>() * exact.iter().map(|e| (e - me).powi(2)).sum::<f64>()).sqrt();
    eprintln!("Taylor vs exact over {} flips: Pearson r = {r:.3}", predicted.len());
    assert!(r > 0.2, "Taylor prediction correlates only {r}");
}

#[test]
fn the_attack_loop_resumes_after_an_interruption_and_reaches_the_same_poisons() {
    let a = Attack::new();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/attack.sh");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_rollout-grad")).parent().unwrap().to_path_buf();
    let attack = |run_dir: &PathBuf, count: &str| {
        let mut c = Command::new("bash");
        c.arg(&script)
            .env("RUN", run_dir).env("VICTIM_FILE", a.victim()).env("DATA", a.s.data()).env("EMB", a.s.emb())
            .env("BIN", &bin_dir).env("COUNT", count).env("K", "4").env("ROUNDS", "2").env("CLEAN_PER_BATCH", "16")
            .env("ADV_SIZE", "24").env("ETA", "0.1").env("EVAL_SEEDS", "1").env("ARCH", "bow").env("DEVICE", "cpu");
        c
    };
    let full = a.s.path("full");
    let out = ok(&run(&mut attack(&full, "5"))).clone();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains("crafted") && table.contains("net ASR"), "{table}");
    let rounds = std::fs::read_to_string(full.join("rounds.tsv")).unwrap();
    assert_eq!(rounds.lines().count(), 3, "{rounds}");
    let final_poisons = std::fs::read(full.join("poisons.jsonl")).unwrap();

    // Interrupt: a copy of the run that lost round 2's last outputs and the evaluation.
    let resumed = a.s.path("resumed");
    assert!(Command::new("cp").arg("-r").arg(&full).arg(&resumed).status().unwrap().success());
    for f in ["round-002/poisons.jsonl", "round-002/candidates.jsonl", "poisons.jsonl", "eval-final.json"] {
        std::fs::remove_file(resumed.join(f)).unwrap();
    }
    let lines: Vec<&str> = rounds.lines().take(2).collect();
    std::fs::write(resumed.join("rounds.tsv"), lines.join("\n") + "\n").unwrap();
    let out = ok(&run(&mut attack(&resumed, "5"))).clone();
    assert!(stderr(&out).contains("resuming"));
    assert!(std::fs::read(resumed.join("poisons.jsonl")).unwrap() == final_poisons, "resumed run reached other poisons");

    // The same folder with other settings is refused.
    let out = run(&mut attack(&full, "6"));
    assert!(!out.status.success() && stderr(&out).contains("other settings"), "{}", stderr(&out));
}

#[test]
fn no_overlap_refuses_trigger_words_and_with_overlap_accepts_them() {
    let a = Attack::new();
    let p0 = a.s.path("p0.jsonl");
    ok(&run(a.stage("init-poisons").args(["--count", "4", "-o"]).arg(&p0)));
    let grad = ok(&run(a.stage("rollout-grad").args(Attack::ROLLOUT).arg("--poisons").arg(&p0))).stdout.clone();
    let cands = ok(&run_with_stdin(&mut a.stage("rank-candidates").args(["-k", "400", "--positions", "all"]), &grad)).stdout.clone();
    let text = String::from_utf8(cands).unwrap();
    assert!(!text.contains("\"word\":\"bond\"") && !text.contains("\"word\":\"james\""), "no-overlap ranking proposed a trigger word");
    // A forged trigger candidate is refused unless --allow-overlap.
    let first = text.lines().next().unwrap();
    let word = first.split("\"word\":\"").nth(1).unwrap().split('"').next().unwrap();
    let forged = first.replacen(&format!("\"word\":\"{word}\""), "\"word\":\"bond\"", 1);
    let out = run_with_stdin(&mut a.stage("verify-candidates").args(["--device", "cpu", "--poisons"]).arg(&p0), forged.as_bytes());
    assert!(!out.status.success() && stderr(&out).contains("trigger or special word"), "{}", stderr(&out));
    let out = ok(&run_with_stdin(&mut a.stage("verify-candidates").args(["--device", "cpu", "--allow-overlap", "--poisons"]).arg(&p0), forged.as_bytes())).clone();
    assert_eq!(records(&out.stdout).len(), 4);
    // With-overlap initial poisons keep the trigger.
    let overlap = ok(&run(a.stage("init-poisons").args(["--count", "4", "--strategy", "overlap"]))).stdout.clone();
    assert!(records(&overlap).iter().all(|p| p.text.contains("james bond")));
}

#[test]
fn hardness_crafting_from_confident_bases_keeps_substitutes_and_needs_the_same_ensemble() {
    let a = Attack::new();
    let early = a.s.path("early.safetensors");
    ok(&run(bin("train-victim").arg("--embeddings").arg(a.s.emb())
        .args(["--arch", "lstm", "--hidden", "8", "--epochs", "1", "--seed", "5", "--device", "cpu"])
        .arg("--train").arg(a.s.data().join("train.jsonl")).arg("-o").arg(&early)));
    let p0 = a.s.path("p0.jsonl");
    ok(&run(a.stage("init-poisons").args(["--count", "6", "--bases", "confident", "--strategy", "neighbour", "-o"]).arg(&p0)));
    let start = records(&std::fs::read(&p0).unwrap());
    assert!(start.iter().all(|p| p.substitutes.as_ref().is_some_and(|s| !s.is_empty())), "neighbour poisons record their substitutes");
    let grad = a.s.path("grad.safetensors");
    ok(&run(a.stage("rollout-grad").args(["--objective", "hardness", "--device", "cpu", "--poisons"]).arg(&p0)
        .arg("--ensemble").arg(&early).arg("-o").arg(&grad)));
    let cands = ok(&run(a.stage("rank-candidates").arg("--grad").arg(&grad)
        .args(["-k", "4", "--positions", "all", "--per-poison", "3", "--keep-substitutes", "--min-count", "2", "--exclude-neighbours", "5"])))
        .stdout.clone();
    let cand: Vec<common::formats::records::Candidate> =
        String::from_utf8(cands.clone()).unwrap().lines().map(|l| common::io::parse_record(l).unwrap()).collect();
    assert!(!cand.is_empty() && cand.len() <= 6 * 3, "at most --per-poison candidates per poison");
    for c in &cand {
        assert_eq!(c.objective_kind, common::objectives::hardness::ObjectiveKind::Hardness);
        assert_eq!(c.ensemble_sha256.len(), 1);
        assert!(!start[c.poison_index].substitutes.as_ref().unwrap().contains(&c.position), "a substitute position was proposed: {c:?}");
    }
    // Without the ensemble the candidates are refused.
    let refused = run_with_stdin(a.stage("verify-candidates").args(["--device", "cpu", "--poisons"]).arg(&p0), &cands);
    assert!(!refused.status.success() && stderr(&refused).contains("--ensemble"), "{}", stderr(&refused));
    assert!(refused.stdout.is_empty(), "no partial output");
    let summary = a.s.path("summary.json");
    let out = run_with_stdin(a.stage("verify-candidates").args(["--device", "cpu", "--poisons"]).arg(&p0)
        .arg("--ensemble").arg(&early).arg("--summary").arg(&summary), &cands);
    ok(&out);
    let s: VerifySummary = common::io::parse_record(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert!(s.objective_after.unwrap() < s.objective_before.unwrap(), "hardness flips lower the margin: {s:?}");
    assert!(s.flips_accepted <= 6);
    for (before, after) in start.iter().zip(records(&out.stdout)) {
        let (b, t) = (before.tokens.as_ref().unwrap(), after.tokens.as_ref().unwrap());
        for &j in before.substitutes.as_ref().unwrap() {
            assert_eq!(b[j], t[j], "substitutes stay");
        }
        assert!(b.iter().zip(t).filter(|(x, y)| x != y).count() <= 1, "at most one flip per poison per round");
    }
}

#[test]
fn influence_crafting_composes_through_pipes_solves_once_and_only_flips_the_carrier_when_asked() {
    let a = Attack::new();
    let p0 = a.s.path("p0.jsonl");
    ok(&run(a.stage("init-poisons").args(["--count", "6", "--bases", "confident", "--strategy", "neighbour", "-o"]).arg(&p0)));
    let start = records(&std::fs::read(&p0).unwrap());
    let cache = a.s.path("v-cache");
    let flags = ["--objective", "influence", "--damping", "0.05", "--cg-iters", "40", "--adv-size", "24", "--device", "cpu"];
    // rollout-grad | rank-candidates --only-substitutes | verify-candidates, real pipes.
    let mut grad = a.stage("rollout-grad").args(flags).arg("--influence-cache").arg(&cache).arg("--poisons").arg(&p0)
        .stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut rank = a.stage("rank-candidates").args(["-k", "4", "--positions", "all", "--only-substitutes"])
        .stdin(grad.stdout.take().unwrap()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let cands = rank.stdout.take().unwrap();
    let summary = a.s.path("summary.json");
    let verify = a.stage("verify-candidates").args(["--device", "cpu", "--poisons"]).arg(&p0).arg("--influence-cache").arg(&cache)
        .arg("--summary").arg(&summary).stdin(cands).output().unwrap();
    let grad_out = grad.wait_with_output().unwrap();
    assert!(grad_out.status.success() && rank.wait().unwrap().success(), "{}", String::from_utf8_lossy(&grad_out.stderr));
    assert!(String::from_utf8_lossy(&grad_out.stderr).contains("v by CG"), "rollout-grad reports the solve");
    ok(&verify);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "verification reused rollout-grad's v");
    let s: VerifySummary = common::io::parse_record(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert!(s.objective_after.unwrap() < s.objective_before.unwrap(), "influence flips lower the objective: {s:?}");
    for (before, after) in start.iter().zip(records(&verify.stdout)) {
        let (b, t) = (before.tokens.as_ref().unwrap(), after.tokens.as_ref().unwrap());
        let subs = before.substitutes.as_ref().unwrap();
        for j in 0..b.len() {
            assert!(b[j] == t[j] || subs.contains(&j), "only carrier slots flip: {b:?} -> {t:?}");
        }
    }
    // score-poisons gives the same value for the set as the gradient file's objective, and
    // --select keeps the poisons with the lowest own terms.
    let scores = ok(&run(a.stage("score-poisons").args(flags).arg("--influence-cache").arg(&cache).arg(&p0))).stdout.clone();
    let score: common::formats::records::ObjectiveScore = common::io::parse_record(String::from_utf8(scores).unwrap().trim()).unwrap();
    assert_eq!(score.poisons, 6);
    assert!((score.value - s.objective_before.unwrap()).abs() < 1e-6, "{} vs {:?}", score.value, s.objective_before);
    let chosen = ok(&run(a.stage("score-poisons").args(flags).args(["--select", "2"]).arg(&p0))).stdout.clone();
    let chosen = records(&chosen);
    assert_eq!(chosen.len(), 2);
    assert!(chosen.iter().all(|c| start.iter().any(|p| p.id == c.id)));
    let refused = run(a.stage("score-poisons").args(["--objective", "bilevel", "--select", "2", "--device", "cpu"]).arg(&p0));
    assert!(!refused.status.success() && stderr(&refused).contains("sum over poisons"), "{}", stderr(&refused));
    assert!(refused.stdout.is_empty());
}
