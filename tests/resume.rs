//! An interrupted crafting run resumes and reaches the same poisons: scripts/attack.sh
//! (what `make attack` runs after training its victim) is killed with SIGKILL, process
//! group and all, at moments spread over the run, again and again until one invocation
//! finishes; the result must equal an uninterrupted run's, byte for byte.

mod support;

use common::eval::EvalReport;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn attack(s: &Setup, run: &Path, victim: &Path) -> Command {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_rollout-grad")).parent().unwrap();
    let mut c = Command::new("bash");
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/attack.sh"))
        .env("RUN", run)
        .env("VICTIM_FILE", victim)
        .env("DATA", s.data())
        .env("EMB", s.emb())
        .env("BIN", bin_dir)
        .envs([("COUNT", "6"), ("K", "3"), ("ROUNDS", "3"), ("PATIENCE", "3"), ("EVAL_SEEDS", "1")])
        .envs([("ARCH", "bow"), ("DEVICE", "cpu"), ("SEED", "0")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Everything a finished run decided, without the timings.
fn outcome(run: &Path) -> Vec<(String, String)> {
    let mut out = vec![("poisons.jsonl".to_string(), std::fs::read_to_string(run.join("poisons.jsonl")).unwrap())];
    for r in 0..=3 {
        let d = run.join(format!("round-{r:03}"));
        out.push((format!("{r}/poisons"), std::fs::read_to_string(d.join("poisons.jsonl")).unwrap()));
        if r > 0 {
            let mut summary: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("summary.json")).unwrap()).unwrap();
            summary.as_object_mut().unwrap().remove("seconds");
            out.push((format!("{r}/summary"), summary.to_string()));
        }
    }
    let rounds = std::fs::read_to_string(run.join("rounds.tsv")).unwrap();
    let decided: Vec<String> = rounds.lines().map(|l| l.split('\t').take(4).collect::<Vec<_>>().join("\t")).collect();
    out.push(("rounds.tsv".into(), decided.join("\n")));
    for what in ["init", "final"] {
        let r: EvalReport = serde_json::from_slice(&std::fs::read(run.join(format!("eval-{what}.json"))).unwrap()).unwrap();
        out.push((what.into(), serde_json::to_string(&(r.seeds, r.audit)).unwrap()));
    }
    out
}

#[test]
fn killing_the_attack_at_any_moment_and_rerunning_reaches_the_same_poisons() {
    let s = Setup::new();
    let victim = s.path("victim.safetensors");
    ok(&run(s.train_victim().arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(&victim)));

    let reference = s.path("uninterrupted");
    let start = Instant::now();
    assert!(attack(&s, &reference, &victim).status().unwrap().success());
    let full = start.elapsed();
    let want = outcome(&reference);

    // Kill after 4%, 8%, 12%, ... of an uninterrupted run's time: every invocation
    // starts over from what the killed ones left, so the delays sweep all its stages
    // and the loop ends once one invocation outlives its delay.
    let resumed = s.path("killed");
    let mut kills = 0;
    for attempt in 0.. {
        assert!(attempt < 60, "the run never finished between kills");
        let delay = full.mul_f64(0.04 + 0.04 * attempt as f64);
        let mut cmd = attack(&s, &resumed, &victim);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + delay;
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match finished {
            Some(status) => {
                assert!(status.success(), "a resumed run failed on attempt {attempt}");
                break;
            }
            None => {
                // The whole group: bash and whichever stage or helper it is running.
                let group = format!("-{}", child.id());
                let killed = Command::new("kill").args(["-KILL", "--", &group]).status().unwrap();
                assert!(killed.success());
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    eprintln!("finished after {kills} kills (uninterrupted run {:.1}s)", full.as_secs_f64());
    assert!(kills >= 3, "only {kills} kills: the test did not interrupt the run");
    let got = outcome(&resumed);
    for ((name, w), (_, g)) in want.iter().zip(&got) {
        assert_eq!(w, g, "{name} differs after {kills} kills");
    }
    assert_eq!(temporary_files(&resumed), Vec::<PathBuf>::new(), "temporary files left behind");
}
