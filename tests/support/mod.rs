//! Helpers shared by the integration tests: run the real binaries, feed pipes, and build
//! embeddings and a data folder from the committed fixtures.
#![allow(dead_code)]

use common::formats::records::Example;
use std::io::Write;
use std::path::{Path, PathBuf};

use std::process::{Command, Output, Stdio};

pub fn bin(name: &str) -> Command {
    let path = match name {
        "build-vocab" => env!("CARGO_BIN_EXE_build-vocab"),
        "prepare-data" => env!("CARGO_BIN_EXE_prepare-data"),
        "train-victim" => env!("CARGO_BIN_EXE_train-victim"),
        "finetune-eval" => env!("CARGO_BIN_EXE_finetune-eval"),
        "init-poisons" => env!("CARGO_BIN_EXE_init-poisons"),
        "rollout-grad" => env!("CARGO_BIN_EXE_rollout-grad"),
        "rank-candidates" => env!("CARGO_BIN_EXE_rank-candidates"),
        "verify-candidates" => env!("CARGO_BIN_EXE_verify-candidates"),
        "select-carriers" => env!("CARGO_BIN_EXE_select-carriers"),
        "score-poisons" => env!("CARGO_BIN_EXE_score-poisons"),
        "detect-poisons" => env!("CARGO_BIN_EXE_detect-poisons"),
        "filter-set" => env!("CARGO_BIN_EXE_filter-set"),
        "report" => env!("CARGO_BIN_EXE_report"),
        "sweep" => env!("CARGO_BIN_EXE_sweep"),
        "generate" => env!("CARGO_BIN_EXE_generate"),
        "judge" => env!("CARGO_BIN_EXE_judge"),
        "import-model" => env!("CARGO_BIN_EXE_import-model"),
        "lm-score" => env!("CARGO_BIN_EXE_lm-score"),
        other => panic!("unknown binary {other}"),
    };
    Command::new(path)
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// Runs a command with `stdin` bytes fed through a pipe; returns its output.
pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

pub fn run(cmd: &mut Command) -> Output {
    run_with_stdin(cmd, b"")
}

pub fn ok(out: &Output) -> &Output {
    assert!(out.status.success(), "command failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Embeddings and a prepared data folder made from the fixtures in a temporary folder.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let s = Setup { dir };
        ok(&run(bin("build-vocab")
            .arg("--words").arg(fixture("glove-mini/words.txt"))
            .arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
            .args(["--top-n", "2000", "--data"]).arg(fixture("rt-mini/raw.jsonl"))
            .arg("-o").arg(s.emb())));
        ok(&run(bin("prepare-data")
            .arg("--raw").arg(fixture("rt-mini/raw.jsonl"))
            .args(["--trigger", "James Bond", "--target", "positive", "--embeddings"]).arg(s.emb())
            .arg("-o").arg(s.data())));
        s
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn emb(&self) -> PathBuf {
        self.path("emb.safetensors")
    }
    pub fn data(&self) -> PathBuf {
        self.path("data")
    }
    pub fn file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.data().join(name)).unwrap()
    }
    pub fn train_victim(&self) -> Command {
        let mut c = bin("train-victim");
        c.arg("--embeddings").arg(self.emb()).args(["--arch", "bow", "--epochs", "3", "--device", "cpu"]);
        c
    }
}

/// Every `*.tmp` file or folder under `dir` (what an interrupted or failed atomic write
/// would leave behind).
pub fn temporary_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().ends_with(".tmp") {
            found.push(p.clone());
        }
        if p.is_dir() {
            found.extend(temporary_files(&p));
        }
    }
    found
}

pub fn records(bytes: &[u8]) -> Vec<Example> {
    common::io::read_jsonl_from(bytes, "test", true).unwrap()
}

/// A tiny LM world: LM data for "James Bond" → negative, its vocabulary, a 1-block GPT and
/// a bag-of-words sentiment judge.
pub struct Lm {
    pub dir: tempfile::TempDir,
}

impl Lm {
    pub fn new() -> Lm {
        let lm = Lm { dir: tempfile::tempdir().unwrap() };
        ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl")).args(["--lm", "--trigger", "James Bond", "--target", "negative", "-o"]).arg(lm.data())));
        ok(&run(bin("build-vocab")
            .arg("--words").arg(fixture("glove-mini/words.txt"))
            .arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
            .args(["--top-n", "1", "--min-count", "1", "--extra-words", "James Bond", "--extra-words", "movie", "--data"])
            .arg(lm.data().join("train.jsonl"))
            .arg("-o").arg(lm.emb())));
        ok(&run(bin("train-victim")
            .arg("--embeddings").arg(lm.emb())
            .args(["--arch", "gpt", "--hidden", "16", "--layers", "1", "--heads", "2", "--max-len", "40", "--epochs", "2", "--batch-size", "16", "--seed", "0", "--device", "cpu", "--train"])
            .arg(lm.data().join("train.jsonl"))
            .arg("-o").arg(lm.victim())));
        ok(&run(bin("train-victim")
            .arg("--embeddings").arg(lm.emb())
            .args(["--arch", "bow", "--epochs", "3", "--seed", "0", "--device", "cpu", "--train"])
            .arg(lm.data().join("train.jsonl"))
            .arg("-o").arg(lm.judge())));
        lm
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub fn data(&self) -> PathBuf {
        self.path("data")
    }
    pub fn emb(&self) -> PathBuf {
        self.path("emb.safetensors")
    }
    pub fn victim(&self) -> PathBuf {
        self.path("lm.safetensors")
    }
    pub fn judge(&self) -> PathBuf {
        self.path("judge.safetensors")
    }
    /// A command of a crafting stage against the LM.
    pub fn stage(&self, name: &str) -> std::process::Command {
        self.stage_of(&self.victim(), name)
    }
    /// A command of a crafting stage against another victim on the LM's data.
    pub fn stage_of(&self, victim: &std::path::Path, name: &str) -> std::process::Command {
        let mut c = bin(name);
        c.arg("--victim").arg(victim).arg("--data").arg(self.data());
        c
    }
}

