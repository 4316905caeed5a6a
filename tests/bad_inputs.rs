//! Every bad input of BAD_INPUTS.md, fed to the real binaries: each case must exit
//! non-zero (1 for a bad input, 2 for a bad flag) with a message that names the file and
//! record and says what to do, and leave no output file and no temporary file behind.
//! The few inputs that are not errors (long texts, an empty candidate list, a closed
//! stdout pipe) are checked for what the table says they get.
//!
//! Every case name here appears in BAD_INPUTS.md and every name there is a case here
//! (`the_table_and_the_cases_agree`).

mod support;

use common::tensorfile;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::*;

/// One bad input: the command, its stdin, the exit code and what stderr must say.
struct Case {
    name: &'static str,
    cmd: Command,
    stdin: Vec<u8>,
    exit: i32,
    needles: Vec<String>,
}

fn case(name: &'static str, cmd: Command, needles: &[&str]) -> Case {
    Case { name, cmd, stdin: Vec::new(), exit: 1, needles: needles.iter().map(|s| s.to_string()).collect() }
}

impl Case {
    fn stdin(mut self, bytes: &[u8]) -> Case {
        self.stdin = bytes.to_vec();
        self
    }
    fn usage(mut self) -> Case {
        self.exit = 2;
        self
    }
}

/// Runs every case; the output path `out` must not appear and no `.tmp` file may be left
/// in `dir`. Failures are collected so one run shows all of them.
fn check(dir: &Path, out: &Path, cases: Vec<Case>) {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("BAD_INPUTS.md")).unwrap();
    let mut failures = Vec::new();
    for mut c in cases {
        let o = run_with_stdin(&mut c.cmd, &c.stdin);
        let err = stderr(&o);
        let mut why = Vec::new();
        if o.status.code() != Some(c.exit) {
            why.push(format!("exit {:?}, expected {}", o.status.code(), c.exit));
        }
        for n in &c.needles {
            if !err.contains(n.as_str()) {
                why.push(format!("stderr lacks {n:?}"));
            }
        }
        if c.exit == 1 && !err.contains("error: ") {
            why.push("no `error:` line".into());
        }
        if out.exists() {
            why.push(format!("{} was written", out.display()));
            let _ = std::fs::remove_file(out).or_else(|_| std::fs::remove_dir_all(out));
        }
        if !o.stdout.is_empty() {
            why.push(format!("{} bytes on stdout", o.stdout.len()));
        }
        if let Some(t) = temporary_files(dir).first() {
            why.push(format!("temporary file {} left", t.display()));
        }
        if !doc.contains(&format!("`{}`", c.name)) {
            why.push("not in BAD_INPUTS.md".into());
        }
        if !why.is_empty() {
            failures.push(format!("{}: {}\n  stderr: {}", c.name, why.join("; "), err.trim()));
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// A data folder, a bow victim, a poison set, its gradient and candidates.
struct World {
    s: Setup,
}

impl World {
    fn new() -> World {
        let s = Setup::new();
        ok(&run(s.train_victim().arg("--train").arg(s.data().join("train.jsonl")).arg("-o").arg(s.path("v.safetensors"))));
        let w = World { s };
        ok(&run(w.craft("init-poisons").args(["--count", "6"]).arg("-o").arg(w.p("p.jsonl"))));
        ok(&run(w.craft("rollout-grad").arg("--poisons").arg(w.p("p.jsonl")).arg("-o").arg(w.p("g.safetensors"))));
        ok(&run(w.craft("rank-candidates").arg("--grad").arg(w.p("g.safetensors")).args(["-k", "2"]).arg("-o").arg(w.p("c.jsonl"))));
        w
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.s.path(rel)
    }
    fn dir(&self) -> &Path {
        self.s.dir.path()
    }
    /// A crafting stage with --victim v.safetensors --data data.
    fn craft(&self, name: &str) -> Command {
        self.craft_with(name, &self.p("v.safetensors"))
    }
    fn craft_with(&self, name: &str, victim: &Path) -> Command {
        let mut c = bin(name);
        c.arg("--victim").arg(victim).arg("--data").arg(self.s.data());
        c
    }
    fn verify(&self, candidates: &Path) -> Command {
        let mut c = self.craft("verify-candidates");
        c.arg("--poisons").arg(self.p("p.jsonl")).arg("--candidates").arg(candidates);
        c
    }
    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.p(rel);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    fn lines(&self, rel: &str) -> Vec<String> {
        std::fs::read_to_string(self.p(rel)).unwrap().lines().map(String::from).collect()
    }
    /// The poison set with its first record changed by `edit`.
    fn poisons_with(&self, rel: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
        let mut lines = self.lines("p.jsonl");
        let mut v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        edit(&mut v);
        lines[0] = v.to_string();
        self.write(rel, lines.join("\n") + "\n")
    }
    /// The candidates with every record changed by `edit`.
    fn candidates_with(&self, rel: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
        let lines: Vec<String> = self
            .lines("c.jsonl")
            .iter()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                edit(&mut v);
                v.to_string()
            })
            .collect();
        self.write(rel, lines.join("\n") + "\n")
    }
    /// A copy of a tensor file with its metadata and tensors changed.
    fn tensors_with(&self, from: &str, format: &str, version: u32, rel: &str, edit: impl Fn(&mut BTreeMap<String, String>, &mut BTreeMap<String, tch::Tensor>)) -> PathBuf {
        let f = tensorfile::read(self.p(from).to_str().unwrap(), format, version).unwrap();
        let (mut meta, mut tensors) = (f.metadata, f.tensors);
        meta.remove("format");
        meta.remove("format_version");
        edit(&mut meta, &mut tensors);
        let tensors: Vec<(String, tch::Tensor)> = tensors.into_iter().collect();
        let bytes = tensorfile::serialize(format, version, &tensors, meta).unwrap();
        self.write(rel, bytes)
    }
    fn victim_with(&self, rel: &str, edit: impl Fn(&mut BTreeMap<String, String>, &mut BTreeMap<String, tch::Tensor>)) -> PathBuf {
        self.tensors_with("v.safetensors", "poison.victim", 1, rel, edit)
    }
    fn truncated(&self, from: &str, rel: &str) -> PathBuf {
        let bytes = std::fs::read(self.p(from)).unwrap();
        self.write(rel, &bytes[..bytes.len() * 2 / 3])
    }
}

fn set_config(meta: &mut BTreeMap<String, String>, key: &str, value: serde_json::Value) {
    let mut c: serde_json::Value = serde_json::from_str(&meta["config"]).unwrap();
    c[key] = value;
    meta.insert("config".into(), c.to_string());
}

fn first_train_line(w: &World) -> String {
    std::fs::read_to_string(w.s.data().join("train.jsonl")).unwrap().lines().next().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------

#[test]
fn build_vocab() {
    let w = World::new();
    let out = w.p("out.safetensors");
    let bv = |words: &Path, vectors: &Path| {
        let mut c = bin("build-vocab");
        c.arg("--words").arg(words).arg("--vectors").arg(vectors).args(["--top-n", "100"]).arg("-o").arg(&out);
        c
    };
    let (words, vectors) = (fixture("glove-mini/words.txt"), fixture("glove-mini/vectors.npy"));
    let not_npy = w.write("not.npy", "hello");
    let npy = std::fs::read(&vectors).unwrap();
    let cut = w.write("cut.npy", &npy[..npy.len() / 2]);
    let all_words = std::fs::read_to_string(&words).unwrap();
    let fewer = w.write("fewer.txt", all_words.lines().skip(1).collect::<Vec<_>>().join("\n"));
    let bad_data = w.write("bad.jsonl", "{\"kind\":\"example\",\"v\":1,\"id\":\"a\",\"text\":\"x\",\"label\":0}\n{broken\n");
    check(w.dir(), &out, vec![
        case("bv-missing-file", bv(&w.p("nope.txt"), &vectors), &["cannot read", "nope.txt"]),
        case("bv-not-npy", bv(&words, &not_npy), &["not.npy", "not a float32 [rows, dim] .npy"]),
        case("bv-truncated-npy", bv(&words, &cut), &["cut.npy", "truncated"]),
        case("bv-rows-mismatch", bv(&fewer, &vectors), &["vectors.npy has", "fewer.txt lists"]),
        case("bv-malformed-data", { let mut c = bv(&words, &vectors); c.arg("--data").arg(&bad_data); c }, &["bad.jsonl:2", "malformed JSON"]),
        case("bv-top-n-zero", { let mut c = bin("build-vocab"); c.arg("--words").arg(&words).arg("--vectors").arg(&vectors).args(["--top-n", "0"]).arg("-o").arg(&out); c }, &["--top-n", "at least 1"]).usage(),
    ]);
}

#[test]
fn prepare_data() {
    let w = World::new();
    let out = w.p("prepared");
    let raw = std::fs::read_to_string(fixture("rt-mini/raw.jsonl")).unwrap();
    let lines: Vec<&str> = raw.lines().collect();
    let pd_target = |raw: &Path, trigger: &str, target: &str| {
        let mut c = bin("prepare-data");
        c.arg("--raw").arg(raw).args(["--trigger", trigger, "--target", target, "--embeddings"]).arg(w.s.emb()).arg("-o").arg(&out);
        c
    };
    let pd = |raw: &Path, trigger: &str| pd_target(raw, trigger, "positive");
    let with_line = |rel: &str, i: usize, line: &str| {
        let mut l = lines.clone();
        l[i] = line;
        w.write(rel, l.join("\n") + "\n")
    };
    let malformed = with_line("malformed.jsonl", 4, "{\"kind\": \"example\", \"v\": 1, \"id\": ");
    let v2 = with_line("v2.jsonl", 2, &lines[2].replace("\"v\": 1", "\"v\": 2"));
    let extra = with_line("extra.jsonl", 3, &lines[3].replace("\"v\": 1", "\"v\": 1, \"score\": 3"));
    let missing = {
        let mut v: serde_json::Value = serde_json::from_str(lines[5]).unwrap();
        v.as_object_mut().unwrap().remove("label");
        with_line("missing.jsonl", 5, &v.to_string())
    };
    let label = with_line("label.jsonl", 6, &lines[6].replace("\"label\": 1", "\"label\": 4").replace("\"label\": 0", "\"label\": 4"));
    let wrong_kind = w.write("cands.jsonl", std::fs::read(w.p("c.jsonl")).unwrap());
    let empty = w.write("empty.jsonl", "");
    let few = w.write("few.jsonl", lines[..5].join("\n"));
    check(w.dir(), &out, vec![
        case("pd-malformed-json", pd(&malformed, "James Bond"), &["malformed.jsonl:5", "malformed JSON"]),
        case("pd-unknown-version", pd(&v2, "James Bond"), &["v2.jsonl:3", "format version 2", "regenerate"]),
        case("pd-extra-field", pd(&extra, "James Bond"), &["extra.jsonl:4", "unknown field `score`"]),
        case("pd-missing-field", pd(&missing, "James Bond"), &["missing.jsonl:6", "missing field `label`"]),
        case("pd-wrong-kind", pd(&wrong_kind, "James Bond"), &["cands.jsonl:1", "kind \"candidate\" where \"example\" was expected"]),
        case("pd-label-out-of-range", pd(&label, "James Bond"), &["label.jsonl", "record 7", "label 4", "--labels"]),
        case("pd-empty-input", pd(&empty, "James Bond"), &["empty.jsonl", "empty input"]),
        case("pd-empty-stdin", pd(Path::new("-"), "James Bond"), &["<stdin>", "empty input"]),
        case("pd-too-few-examples", pd(&few, "James Bond"), &["few.jsonl", "would be empty", "more examples"]),
        case("pd-trigger-no-words", pd(&fixture("rt-mini/raw.jsonl"), "  "), &["holds no words", "--trigger"]),
        case("pd-trigger-unknown-words", pd(&fixture("rt-mini/raw.jsonl"), "Zzyzxq Bond"), &["emb.safetensors", "zzyzxq", "not in the vocabulary", "--extra-words"]),
        case("pd-unknown-target", pd_target(&fixture("rt-mini/raw.jsonl"), "James Bond", "neutral"), &["--target", "neutral"]),
        case("pd-bad-split", { let mut c = pd(&fixture("rt-mini/raw.jsonl"), "James Bond"); c.args(["--split", "0.5,0.5"]); c }, &["--split", "three shares"]),
    ]);
    // An existing folder is replaced whole or not at all: a failed rerun leaves it as it was.
    ok(&run(&mut pd(&fixture("rt-mini/raw.jsonl"), "James Bond")));
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    assert!(!run(&mut pd(&malformed, "James Bond")).status.success());
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before, "a failed rerun changed the folder");
}

#[test]
fn train_victim() {
    let w = World::new();
    let out = w.p("out.safetensors");
    let good = first_train_line(&w);
    let tv = || {
        let mut c = w.s.train_victim();
        c.arg("-o").arg(&out);
        c
    };
    let mut unknown: serde_json::Value = serde_json::from_str(&good).unwrap();
    unknown["text"] = "zzyzxq qqxzv".into();
    let mut no_tokens: serde_json::Value = serde_json::from_str(&good).unwrap();
    no_tokens["text"] = "   ".into();
    let nan_table = w.tensors_with("emb.safetensors", "poison.embeddings", 1, "nan-emb.safetensors", |_, t| {
        let e = t["embedding"].copy();
        let _ = e.get(5).get(0).fill_(f64::NAN);
        t.insert("embedding".into(), e);
    });
    let train = w.s.data().join("train.jsonl");
    // The MiniLM package (make test fetches it) and a folder mixing its tokenizer and
    // weights with another model's config.
    let minilm = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/minilm");
    let mixed = w.p("mixed");
    std::fs::create_dir(&mixed).unwrap();
    for f in ["tokenizer.json", "model.safetensors"] {
        std::os::unix::fs::symlink(minilm.join(f), mixed.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(minilm.join("config.json")).unwrap().replace("\"vocab_size\": 30522", "\"vocab_size\": 30000");
    assert!(config.contains("30000"), "the package's config.json names its vocabulary size");
    std::fs::write(mixed.join("config.json"), config).unwrap();
    let pretrained = |dir: &Path| {
        let mut c = bin("train-victim");
        c.arg("--pretrained").arg(dir).args(["--arch", "minilm"]).arg("--train").arg(&train).arg("-o").arg(&out);
        c
    };
    check(w.dir(), &out, vec![
        case("tv-malformed-json", tv(), &["<stdin>:1", "malformed JSON"]).stdin(b"{\"kind\":\"example\",\n"),
        case("tv-unknown-version", tv(), &["<stdin>:1", "format version 7"]).stdin(good.replace("\"v\":1", "\"v\":7").as_bytes()),
        case("tv-extra-field", tv(), &["<stdin>:1", "unknown field `colour`"]).stdin(good.replace("\"v\":1", "\"v\":1,\"colour\":\"red\"").as_bytes()),
        case("tv-label-out-of-range", tv(), &["<stdin>: record 1", "label 2 but the victim has 2 classes"])
            .stdin(good.replace("\"label\":0", "\"label\":2").replace("\"label\":1", "\"label\":2").as_bytes()),
        case("tv-empty-input", tv(), &["<stdin>", "empty input"]),
        case("tv-blank-line", tv(), &["<stdin>:2", "blank line"]).stdin(format!("{good}\n\n{good}\n").as_bytes()),
        case("tv-no-tokens", tv(), &["<stdin>: record 1", "holds no tokens"]).stdin(no_tokens.to_string().as_bytes()),
        case("tv-embeddings-wrong-file", { let mut c = bin("train-victim"); c.arg("--embeddings").arg(w.p("v.safetensors")).arg("--train").arg(&train).arg("-o").arg(&out); c },
            &["v.safetensors", "\"poison.victim\" file where a \"poison.embeddings\" file was expected"]),
        case("tv-embeddings-truncated", { let mut c = bin("train-victim"); c.arg("--embeddings").arg(w.truncated("emb.safetensors", "cut-emb.safetensors")).arg("--train").arg(&train).arg("-o").arg(&out); c },
            &["cut-emb.safetensors", "truncated"]),
        case("tv-embeddings-nan", { let mut c = bin("train-victim"); c.arg("--embeddings").arg(&nan_table).arg("--train").arg(&train).arg("-o").arg(&out); c },
            &["nan-emb.safetensors", "NaN or Inf", "build-vocab"]),
        case("tv-nan-loss", { let mut c = tv(); c.arg("--train").arg(&train).args(["--lr", "1e30"]); c }, &["loss is NaN", "epoch 1", "lower the learning rate"]),
        case("tv-zero-batch-size", { let mut c = tv(); c.args(["--batch-size", "0"]); c }, &["--batch-size", "at least 1"]).usage(),
        case("tv-nan-lr", { let mut c = tv(); c.args(["--lr", "nan"]); c }, &["--lr", "not a finite number above 0"]).usage(),
        case("tv-no-base", { let mut c = bin("train-victim"); c.arg("--train").arg(&train).arg("-o").arg(&out); c }, &["--embeddings FILE", "--pretrained DIR"]),
        case("tv-both-bases", { let mut c = tv(); c.arg("--pretrained").arg(&minilm); c }, &["--pretrained", "cannot be used with"]).usage(),
        case("tv-minilm-from-embeddings", { let mut c = tv(); c.arg("--train").arg(&train).args(["--arch", "minilm"]); c }, &["--arch minilm", "--pretrained data/minilm"]),
        case("tv-pretrained-for-lstm", { let mut c = pretrained(&minilm); c.args(["--arch", "lstm"]); c }, &["--pretrained is for --arch minilm", "--embeddings"]),
        case("tv-pretrained-missing", pretrained(&w.p("nowhere")), &["nowhere", "config.json", "scripts/fetch_minilm.sh"]),
        case("tv-pretrained-mixed-folder", pretrained(&mixed), &["mixed", "30522 pieces", "config.json says 30000"]),
    ]);

    // Longer than --max-len: truncated as the victim reads any input, and counted.
    let o = run(w.s.train_victim().arg("--train").arg(&train).args(["--max-len", "8"]).arg("-o").arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("longer than max_len 8 tokens and were truncated"), "tv-longer-than-max-len: {}", stderr(&o));

    // A text of only unknown words is read as <unk>s, as the victim reads any input, and counted.
    let o = run_with_stdin(w.s.train_victim().arg("-o").arg(&out), format!("{good}\n{unknown}\n").as_bytes());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("<stdin>: 1 of 2 texts hold only words unknown to the vocabulary"), "tv-only-unknown-words: {}", stderr(&o));
    std::fs::remove_file(&out).unwrap();

    // A closed stdout pipe (`| head`) ends the stage quietly with status 0.
    let mut child = w.s.train_victim().arg("--train").arg(&train).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut head = [0u8; 8];
    child.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success() && !stderr(&o).contains("error"), "tv-closed-stdout: {}", stderr(&o));
}

#[test]
fn init_poisons() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let ip = |victim: &Path| {
        let mut c = w.craft_with("init-poisons", victim);
        c.args(["--count", "4"]).arg("-o").arg(&out);
        c
    };
    let nan = w.victim_with("nan.safetensors", |_, t| {
        t.insert("out.bias".into(), tch::Tensor::from_slice(&[f32::NAN, 0.0]));
    });
    let small_emb = w.p("small-emb.safetensors");
    ok(&run(bin("build-vocab").arg("--words").arg(fixture("glove-mini/words.txt")).arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
        .args(["--top-n", "200"]).arg("-o").arg(&small_emb)));
    let small = w.p("small.safetensors");
    ok(&run(bin("train-victim").arg("--embeddings").arg(&small_emb).arg("--train").arg(w.s.data().join("train.jsonl"))
        .args(["--arch", "bow", "--epochs", "1"]).arg("-o").arg(&small)));
    check(w.dir(), &out, vec![
        case("ip-no-data-folder", { let mut c = bin("init-poisons"); c.arg("--victim").arg(w.p("v.safetensors")).arg("--data").arg(w.p("nowhere")).arg("-o").arg(&out); c },
            &["nowhere/manifest.json", "a folder made by prepare-data"]),
        case("ip-victim-truncated", ip(&w.truncated("v.safetensors", "cut.safetensors")), &["cut.safetensors", "truncated", "regenerate"]),
        case("ip-victim-nan", ip(&nan), &["nan.safetensors", "out.bias", "NaN or Inf", "retrain"]),
        case("ip-victim-vocab-lacks-trigger", ip(&small), &["victim vocabulary", "\"james\"", "not in the vocabulary"]),
        case("ip-too-many-poisons", { let mut c = w.craft("init-poisons"); c.args(["--count", "100000"]).arg("-o").arg(&out); c }, &["only", "source sentences for 100000 poisons"]),
        case("ip-zero-poisons", { let mut c = w.craft("init-poisons"); c.args(["--count", "0"]).arg("-o").arg(&out); c }, &["--count", "at least 1"]).usage(),
        case("ip-evade-fpr-out-of-range", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--evade-fpr", "100"]).arg("-o").arg(&out); c },
            &["--evade-fpr 100", "a percentage from 0 to below 100"]),
        case("ip-over-budget", { let mut c = w.craft("init-poisons"); c.args(["--count", "40", "--evade-fpr", "90"]).arg("-o").arg(&out); c },
            &["bases make poisons within the detection budget at 90% FPR", "over it:", "lower --count, or --evade-fpr for a looser budget"]),
        case("ip-evade-loss-out-of-range", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--evade-fpr", "10", "--evade-loss", "100"]).arg("-o").arg(&out); c },
            &["--evade-loss 100", "a percentage from 0 to below 100"]),
        case("ip-evade-loss-alone", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--evade-loss", "5"]).arg("-o").arg(&out); c },
            &["--evade-loss", "--evade-fpr"]).usage(),
        case("ip-judged-without-judge", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--bases", "judged"]).arg("-o").arg(&out); c },
            &["--judge CLASSIFIER and --bases judged go together"]),
        case("ip-judge-truncated", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--bases", "judged", "--judge"]).arg(w.truncated("v.safetensors", "cut-judge.safetensors")).arg("-o").arg(&out); c },
            &["--judge", "cut-judge.safetensors", "truncated"]),
        case("ip-sentence-alone", { let mut c = w.craft("init-poisons"); c.args(["--count", "4", "--sentence"]).arg("-o").arg(&out); c },
            &["--sentence", "--from-trigger"]).usage(),
    ]);
}

#[test]
fn detect_poisons() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let train = w.s.file("train.jsonl");
    let dp = |args: &[&str]| {
        let mut c = bin("detect-poisons");
        c.args(args).args(["--device", "cpu"]).arg("-o").arg(&out);
        c
    };
    let with_emb = |args: &[&str]| {
        let mut c = dp(args);
        c.arg("--embeddings").arg(w.s.emb());
        c
    };
    check(w.dir(), &out, vec![
        case("dp-empty-input", dp(&["--detectors", "perplexity"]), &["<stdin>", "empty input"]),
        case("dp-malformed-json", dp(&["--detectors", "perplexity"]), &["<stdin>:1", "malformed JSON"]).stdin(b"not json\n"),
        case("dp-trigger-not-in-vocabulary", with_emb(&["--detectors", "glove-trigger", "--trigger", "Zzyzxq Qwv"]), &["emb.safetensors", "not in the vocabulary"]).stdin(&train),
        case("dp-trigger-detector-without-trigger", dp(&["--detectors", "glove-trigger-word"]), &["glove-trigger-word measures closeness to the trigger", "--trigger"]).stdin(&train),
        case("dp-dynamics-without-embeddings", dp(&["--detectors", "loss-mean"]), &["train victims on the set", "--embeddings"]).stdin(&train),
        case("dp-sort-by-a-detector-not-run", dp(&["--detectors", "perplexity", "--sort", "onion"]), &["--sort onion", "not run"]).stdin(&train),
        case("dp-label-beyond-classes", dp(&["--detectors", "perplexity", "--num-classes", "1"]), &["<stdin>", "label 1", "--num-classes 1"]).stdin(&train),
        case("dp-minilm-not-a-package", dp(&["--detectors", "minilm-trigger", "--trigger", "James Bond", "--minilm", "nowhere"]), &["nowhere holds no config.json"]).stdin(&train),
        case("dp-source-detector-on-texts", dp(&["--detectors", "source-perplexity"]), &["<stdin>: record 1", "no \"source\"", "translation pairs"]).stdin(&train),
        case("dp-table-detector-without-model", dp(&["--detectors", "table-trigger", "--trigger", "James Bond"]), &["table-trigger reads a victim's trained word table", "--trained-table MODEL"]).stdin(&train),
        case("dp-trained-table-frozen", dp(&["--detectors", "table-trigger-word", "--trigger", "James Bond", "--trained-table", w.p("v.safetensors").to_str().unwrap()]), &["v.safetensors", "kept its word table frozen", "--embeddings"]).stdin(&train),
        case("dp-unknown-detector", dp(&["--detectors", "astrology"]), &["astrology"]).usage(),
    ]);
}

#[test]
fn filter_set() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let train = w.s.data().join("train.jsonl");
    ok(&run(bin("detect-poisons").arg("--data").arg(&train).args(["--detectors", "perplexity"]).arg("-o").arg(w.p("scores.jsonl"))));
    ok(&run(bin("detect-poisons").arg("--data").arg(&train).args(["--detectors", "perplexity", "--sort", "perplexity"]).arg("-o").arg(w.p("sorted.jsonl"))));
    let first_five: String = w.lines("scores.jsonl")[..5].iter().map(|l| format!("{l}\n")).collect();
    let short = w.write("short.jsonl", first_five);
    let fs = |scores: &Path, by: &str, remove: &str| {
        let mut c = bin("filter-set");
        c.arg("--data").arg(&train).arg("--scores").arg(scores).args(["--by", by, "--remove", remove]).arg("-o").arg(&out);
        c
    };
    check(w.dir(), &out, vec![
        case("fs-scores-of-another-set", fs(&short, "perplexity", "5"), &["short.jsonl holds 5 scores", "score this training set with detect-poisons first"]),
        case("fs-scores-sorted", fs(&w.p("sorted.jsonl"), "perplexity", "5"), &["sorted.jsonl: record 1", "sorted (--sort)"]),
        case("fs-detector-not-scored", fs(&w.p("scores.jsonl"), "onion", "5"), &["scores.jsonl: record 1", "no \"onion\" score", "run detect-poisons with that detector"]),
        case("fs-percent-out-of-range", fs(&w.p("scores.jsonl"), "perplexity", "150"), &["--remove 150", "a percentage from 0 to 100"]),
    ]);
}

#[test]
fn rollout_grad() {
    let w = World::new();
    let out = w.p("out.safetensors");
    let rg = |poisons: &Path| {
        let mut c = w.craft("rollout-grad");
        c.arg("--poisons").arg(poisons).arg("-o").arg(&out);
        c
    };
    let rg_victim = |victim: &Path| {
        let mut c = w.craft_with("rollout-grad", victim);
        c.arg("--poisons").arg(w.p("p.jsonl")).arg("-o").arg(&out);
        c
    };
    let no_tokens = w.poisons_with("no-tokens.jsonl", |v| { v.as_object_mut().unwrap().remove("tokens"); });
    let unknown = w.poisons_with("unknown.jsonl", |v| v["tokens"][0] = "zzyzxq".into());
    let only_unk = w.poisons_with("only-unk.jsonl", |v| v["tokens"] = serde_json::json!(["<unk>", "<unk>"]));
    let not_target = w.poisons_with("not-target.jsonl", |v| v["label"] = 0.into());
    let too_long = w.poisons_with("long.jsonl", |v| {
        let t: Vec<serde_json::Value> = v["tokens"].as_array().unwrap().iter().cycle().take(200).cloned().collect();
        v["tokens"] = t.into();
    });
    let lstm = w.victim_with("other-arch.safetensors", |m, _| set_config(m, "arch", "lstm".into()));
    let shapes = w.victim_with("other-shapes.safetensors", |m, _| set_config(m, "hidden", 65.into()));
    let absurd = w.victim_with("absurd.safetensors", |m, _| set_config(m, "hidden", 1_000_000_000_000u64.into()));
    let other_vocab = w.victim_with("other-vocab.safetensors", |m, _| set_config(m, "vocab_size", 10.into()));
    let small_emb = w.p("small-emb.safetensors");
    ok(&run(bin("build-vocab").arg("--words").arg(fixture("glove-mini/words.txt")).arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
        .args(["--top-n", "1500"]).arg("--data").arg(fixture("rt-mini/raw.jsonl")).arg("-o").arg(&small_emb)));
    let other_table = w.p("other-table.safetensors");
    ok(&run(bin("train-victim").arg("--embeddings").arg(&small_emb).arg("--train").arg(w.s.data().join("train.jsonl"))
        .args(["--arch", "bow", "--epochs", "1"]).arg("-o").arg(&other_table)));
    check(w.dir(), &out, vec![
        case("rg-malformed-json", rg(&w.write("bad.jsonl", "not json\n")), &["bad.jsonl:1", "malformed JSON"]),
        case("rg-empty-poisons", rg(&w.write("empty.jsonl", "")), &["empty.jsonl", "empty input"]),
        case("rg-poison-without-tokens", rg(&no_tokens), &["no-tokens.jsonl: record 1", "has no \"tokens\"", "init-poisons"]),
        case("rg-poison-unknown-token", rg(&unknown), &["unknown.jsonl: record 1", "token \"zzyzxq\" is not in the vocabulary"]),
        case("rg-poison-only-unknown-words", rg(&only_unk), &["only-unk.jsonl: record 1", "every token is unknown", "init-poisons"]),
        case("rg-poison-not-target-label", rg(&not_target), &["not-target.jsonl: record 1", "label 0, the target is 1"]),
        case("rg-poison-longer-than-max-len", rg(&too_long), &["long.jsonl: record 1", "200 tokens, more than the victim's max_len 64"]),
        case("rg-victim-other-architecture", rg_victim(&lstm), &["other-arch.safetensors", "a Lstm victim needs", "another architecture"]),
        case("rg-victim-shapes-mismatch", rg_victim(&shapes), &["other-shapes.safetensors", "\"mlp.bias\" has shape [64], the config needs [65]"]),
        case("rg-victim-absurd-shape", rg_victim(&absurd), &["absurd.safetensors", "the config needs [1000000000000]"]),
        case("rg-victim-other-vocabulary", rg_victim(&other_vocab), &["other-vocab.safetensors", "config says 10 vocabulary words"]),
        case("rg-victim-empty-file", rg_victim(&w.write("empty.safetensors", "")), &["empty.safetensors", "empty input"]),
        case("rg-ensemble-other-table", { let mut c = rg(&w.p("p.jsonl")); c.args(["--objective", "hardness", "--ensemble"]).arg(&other_table); c },
            &["ensemble victim 2 has another embedding table", "same embeddings"]),
        case("rg-ensemble-with-bilevel", { let mut c = rg(&w.p("p.jsonl")); c.arg("--ensemble").arg(w.p("v.safetensors")); c }, &["--ensemble is for --objective hardness"]),
        case("rg-ensemble-with-influence", { let mut c = rg(&w.p("p.jsonl")); c.args(["--objective", "influence", "--ensemble"]).arg(w.p("v.safetensors")); c }, &["--ensemble is for --objective hardness", "influence"]),
        case("rg-nan-objective", { let mut c = rg(&w.p("p.jsonl")); c.args(["--eta", "1e30"]); c }, &["L_adv is NaN", "lower --eta"]),
        case("rg-zero-eta", { let mut c = rg(&w.p("p.jsonl")); c.args(["--eta", "0"]); c }, &["--eta", "above 0"]).usage(),
    ]);
    // A closed stdout pipe ends the stage quietly.
    let mut child = w.craft("rollout-grad").arg("--poisons").arg(w.p("p.jsonl")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut head = [0u8; 8];
    child.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success() && !stderr(&o).contains("error"), "rg-closed-stdout: {}", stderr(&o));
}

#[test]
fn rank_candidates() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let rc = |grad: &Path| {
        let mut c = w.craft("rank-candidates");
        c.arg("--grad").arg(grad).arg("-o").arg(&out);
        c
    };
    let fmt = common::formats::gradfile::GRAD_FORMAT;
    let v = common::formats::gradfile::GRAD_VERSION;
    let nan = w.tensors_with("g.safetensors", fmt, v, "nan.safetensors", |_, t| {
        let g = t["grad"].copy();
        let _ = g.get(0).get(0).get(0).fill_(f64::INFINITY);
        t.insert("grad".into(), g);
    });
    let old = w.tensors_with("g.safetensors", fmt, v, "old.safetensors", |_, _| {});
    let old_bytes = tensorfile::serialize(fmt, 1, &[("grad".into(), tch::Tensor::zeros([1, 1, 1], (tch::Kind::Float, tch::Device::Cpu)))], BTreeMap::new()).unwrap();
    std::fs::write(&old, old_bytes).unwrap();
    let other_vocab = w.tensors_with("g.safetensors", fmt, v, "vocab.safetensors", |m, _| { m.insert("vocab_sha256".into(), "0".repeat(64)); });
    let mismatched = w.tensors_with("g.safetensors", fmt, v, "ids.safetensors", |_, t| { t.insert("ids".into(), tch::Tensor::zeros([2, 2], (tch::Kind::Int64, tch::Device::Cpu))); });
    check(w.dir(), &out, vec![
        case("rc-grad-truncated", rc(&w.truncated("g.safetensors", "cut.safetensors")), &["cut.safetensors", "truncated", "regenerate"]),
        case("rc-grad-not-safetensors", rc(&w.p("p.jsonl")), &["p.jsonl", "not a readable safetensors file"]),
        case("rc-grad-wrong-file", rc(&w.p("v.safetensors")), &["v.safetensors", "\"poison.victim\" file where a \"poison.rollout_grad\" file was expected"]),
        case("rc-grad-old-version", rc(&old), &["old.safetensors", "format version 1", "regenerate"]),
        case("rc-grad-other-vocabulary", rc(&other_vocab), &["vocab.safetensors was made with another vocabulary"]),
        case("rc-grad-inconsistent-shapes", rc(&mismatched), &["ids.safetensors", "do not match grad"]),
        case("rc-grad-nan", rc(&nan), &["nan.safetensors", "NaN or Inf", "rerun rollout-grad"]),
        case("rc-grad-empty-stdin", { let mut c = w.craft("rank-candidates"); c.arg("-o").arg(&out); c }, &["<stdin>", "empty input"]),
        case("rc-zero-k", { let mut c = rc(&w.p("g.safetensors")); c.args(["-k", "0"]); c }, &["-k", "at least 1"]).usage(),
        case("rc-zero-positions", { let mut c = rc(&w.p("g.safetensors")); c.args(["--positions", "0"]); c }, &["--positions", "at least 1"]).usage(),
        case("rc-keep-and-only-substitutes", { let mut c = rc(&w.p("g.safetensors")); c.args(["--keep-substitutes", "--only-substitutes"]); c }, &["--only-substitutes", "cannot be used with"]).usage(),
    ]);
    // A closed stdout pipe (`| head -1`) ends the stage quietly.
    let mut child = w.craft("rank-candidates").arg("--grad").arg(w.p("g.safetensors")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut head = [0u8; 8];
    child.stdout.as_mut().unwrap().read_exact(&mut head).unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success() && !stderr(&o).contains("error"), "rc-closed-stdout: {}", stderr(&o));
}

#[test]
fn verify_candidates() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let vc = |candidates: &Path| {
        let mut c = w.verify(candidates);
        c.arg("-o").arg(&out);
        c
    };
    // Candidates for another poison set: a gradient of the first three poisons only.
    let three = w.write("three.jsonl", w.lines("p.jsonl")[..3].join("\n") + "\n");
    ok(&run(w.craft("rollout-grad").arg("--poisons").arg(&three).arg("-o").arg(w.p("g3.safetensors"))));
    ok(&run(w.craft("rank-candidates").arg("--grad").arg(w.p("g3.safetensors")).args(["-k", "2"]).arg("-o").arg(w.p("c3.jsonl"))));
    let other_victim = w.candidates_with("other-victim.jsonl", |v| v["victim_sha256"] = "0".repeat(64).into());
    let v1 = w.candidates_with("v1.jsonl", |v| v["v"] = 1.into());
    let position = w.candidates_with("position.jsonl", |v| v["position"] = 99.into());
    let word = w.candidates_with("word.jsonl", |v| v["word"] = "zzyzxq".into());
    let trigger = w.candidates_with("trigger.jsonl", |v| v["word"] = "bond".into());
    let index = w.candidates_with("index.jsonl", |v| v["poison_index"] = 1000.into());
    // "bonds" holds no trigger token but shares the stem of "bond": refused under strict.
    let stem = w.candidates_with("stem.jsonl", |v| v["word"] = "bonds".into());
    let hardness = w.candidates_with("hardness.jsonl", |v| {
        v["objective_kind"] = "hardness".into();
        v["ensemble_sha256"] = serde_json::json!(["0".repeat(64)]);
    });
    // One candidate ranked with other objective settings than the rest.
    let mut lines = w.lines("c.jsonl");
    let mut second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    second["influence"] = serde_json::to_value(common::objectives::influence::InfluenceConfig::default()).unwrap();
    lines[1] = second.to_string();
    let mixed = w.write("mixed.jsonl", lines.join("\n") + "\n");
    check(w.dir(), &out, vec![
        case("vc-mixed-objective-settings", vc(&mixed), &["mixed.jsonl:2", "settings differ from the first candidate's", "one rank-candidates output at a time"]),
        case("vc-other-poison-set", vc(&w.p("c3.jsonl")), &["c3.jsonl:1", "another poison set", "rerun rollout-grad and rank-candidates"]),
        case("vc-other-victim", vc(&other_victim), &["other-victim.jsonl:1", "another victim", "--victim given to rollout-grad"]),
        case("vc-old-version", vc(&v1), &["v1.jsonl:1", "format version 1", "regenerate"]),
        case("vc-malformed-json", vc(&w.write("bad.jsonl", "{\"kind\":\"candidate\"\n")), &["bad.jsonl:1", "malformed JSON"]),
        case("vc-position-out-of-range", vc(&position), &["position.jsonl:1", "position 99 of"]),
        case("vc-poison-index-out-of-range", vc(&index), &["index.jsonl:1", "at index 1000"]),
        case("vc-unknown-word", vc(&word), &["word.jsonl:1", "\"zzyzxq\" is not in the vocabulary"]),
        case("vc-trigger-word", vc(&trigger), &["trigger.jsonl:1", "\"bond\" is a trigger or special word", "--allow-overlap"]),
        case("vc-strict-stem", { let mut c = vc(&stem); c.args(["--concealment", "strict"]); c }, &["stem.jsonl", "leaks the trigger", "strict"]),
        case("vc-ensemble-mismatch", vc(&hardness), &["hardness.jsonl", "ensemble of 1 extra victims", "same --ensemble"]),
    ]);
    // No candidates: the poison set goes through unchanged.
    let o = run(w.verify(&w.write("none.jsonl", "")).arg("-o").arg(&out));
    assert!(o.status.success(), "vc-no-candidates: {}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(w.p("p.jsonl")).unwrap());
}

#[test]
fn select_carriers() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let sc = |poisons: &Path, extra: &[&str]| {
        let mut c = w.craft("select-carriers");
        c.arg("--embeddings").arg(w.s.emb()).args(["--arch", "bow", "--epochs", "3", "--device", "cpu", "--retrain", "2", "--seeds", "1"])
            .args(["--clean-per-batch", "16", "--adv-size", "24", "--poisons"]).arg(poisons).args(extra).arg("-o").arg(&out);
        c
    };
    // A set without carriers (training sentences), a vocabulary other than the victim's, and
    // a selection whose candidate writes a trigger word.
    ok(&run(w.craft("init-poisons").args(["--count", "6", "--strategy", "clean-target"]).arg("-o").arg(w.p("benign.jsonl"))));
    ok(&run(bin("build-vocab").arg("--words").arg(fixture("glove-mini/words.txt")).arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
        .args(["--top-n", "1500", "--data"]).arg(fixture("rt-mini/raw.jsonl")).arg("-o").arg(w.p("other-emb.safetensors"))));
    let candidate = common::formats::records::CarrierCandidate { words: vec!["bond".into(), "who".into()], from: vec!["given".into(); 2], bilevel: None, closeness: None, over_budget: None, d_adv_asr: vec![50.0] };
    let leaking = common::formats::records::CarrierSelection {
        kind: "carrier_selection".into(), v: 1, poisons: "p.jsonl".into(), poisons_sha256: String::new(), victim_sha256: String::new(),
        trigger_words: vec!["james".into(), "bond".into()], current: vec!["john".into(), "who".into()], selected: vec!["john".into(), "who".into()],
        candidates_from: None, candidates: vec![candidate], attacker_seeds: vec![1000], clean_d_adv_asr: vec![10.0], d_adv_size: 10,
        victims_trained: 2, max_victims: 40, poisons_sha256_after: String::new(), seconds: 1.0,
    };
    let leaking = w.write("leaking.json", serde_json::to_string_pretty(&leaking).unwrap());
    let other_emb = |c: &mut Command| {
        // Replace --embeddings: the last one given wins.
        c.arg("--embeddings").arg(w.p("other-emb.safetensors"));
    };
    check(w.dir(), &out, vec![
        case("sc-over-victim-budget", sc(&w.p("p.jsonl"), &["--retrain", "20", "--seeds", "3"]), &["is 63 victims, over --max-victims 40", "retrain fewer"]),
        case("sc-no-carriers", sc(&w.p("benign.jsonl"), &[]), &["no poison holds a stand-in for the trigger word", "init-poisons --strategy neighbour"]),
        case("sc-not-a-selection", sc(&w.p("p.jsonl"), &["--candidates-from", w.p("p.jsonl").to_str().unwrap()]), &["p.jsonl: not a selection written by select-carriers"]),
        case("sc-given-carrier-leaks", sc(&w.p("p.jsonl"), &["--candidates-from", leaking.to_str().unwrap()]), &["leaking.json: carrier \"bond\" may not stand in a poison here"]),
        case("sc-other-vocabulary", { let mut c = sc(&w.p("p.jsonl"), &[]); other_emb(&mut c); c }, &["other-emb.safetensors has another vocabulary than the victim"]),
        case("sc-malformed-poisons", sc(&w.write("bad.jsonl", "{\"kind\":\"example\"\n"), &[]), &["bad.jsonl:1", "malformed JSON"]),
        case("sc-empty-poisons", sc(&w.write("empty.jsonl", ""), &[]), &["empty.jsonl"]),
    ]);
}

#[test]
fn score_poisons() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let sp = |args: &[&str], sets: &[&str]| {
        let mut c = w.craft("score-poisons");
        c.args(args).args(sets.iter().map(|s| w.p(s))).arg("-o").arg(&out);
        c
    };
    w.write("bad.jsonl", "not json\n");
    check(w.dir(), &out, vec![
        case("sp-malformed-json", sp(&["--objective", "hardness"], &["bad.jsonl"]), &["bad.jsonl:1", "malformed JSON"]),
        case("sp-no-sets", sp(&["--objective", "hardness"], &[]), &["SETS"]).usage(),
        case("sp-select-bilevel", sp(&["--select", "2"], &["p.jsonl"]), &["--select needs an objective that is a sum over poisons", "Bilevel"]),
        case("sp-select-two-sets", sp(&["--objective", "hardness", "--select", "2"], &["p.jsonl", "p.jsonl"]), &["--select chooses from one poison set; 2 given"]),
        case("sp-select-more-than-the-set", sp(&["--objective", "hardness", "--select", "1000"], &["p.jsonl"]), &["--select 1000", "p.jsonl holds"]),
    ]);
}

#[test]
fn finetune_eval() {
    let w = World::new();
    let out = w.p("out.jsonl");
    let fe_seeds = |seeds: &str| {
        let mut c = bin("finetune-eval");
        c.arg("--data").arg(w.s.data()).args(["--arch", "bow", "--seeds", seeds, "--epochs", "1"]).arg("-o").arg(&out);
        c
    };
    let fe = || fe_seeds("1");
    let with_emb = |poisons: &Path| {
        let mut c = fe();
        c.arg("--embeddings").arg(w.s.emb()).arg("--poisons").arg(poisons);
        c
    };
    let unknown = w.poisons_with("unknown.jsonl", |v| v["tokens"][1] = "zzyzxq".into());
    let small_emb = w.p("small-emb.safetensors");
    ok(&run(bin("build-vocab").arg("--words").arg(fixture("glove-mini/words.txt")).arg("--vectors").arg(fixture("glove-mini/vectors.npy"))
        .args(["--top-n", "200"]).arg("-o").arg(&small_emb)));
    check(w.dir(), &out, vec![
        case("fe-poisons-malformed", with_emb(&w.write("bad.jsonl", "{\n")), &["bad.jsonl:1", "malformed JSON"]),
        case("fe-poisons-unknown-token", with_emb(&unknown), &["unknown.jsonl: record 1", "\"zzyzxq\" is not in the vocabulary"]),
        case("fe-poisons-missing-file", with_emb(&w.p("nope.jsonl")), &["cannot open", "nope.jsonl"]),
        case("fe-no-data-folder", { let mut c = bin("finetune-eval"); c.arg("--data").arg(w.p("nowhere")).arg("--embeddings").arg(w.s.emb()).arg("-o").arg(&out); c },
            &["nowhere/manifest.json", "a folder made by prepare-data"]),
        case("fe-beam-on-classifier-data", { let mut c = fe(); c.arg("--embeddings").arg(w.s.emb()).args(["--beam", "4"]); c }, &["--beam and --finetune-clean are for translation data", "would change nothing"]),
        case("fe-checkpoint-truncated", { let mut c = fe(); c.arg("--checkpoint").arg(w.truncated("v.safetensors", "cut.safetensors")); c }, &["cut.safetensors", "truncated"]),
        case("fe-checkpoint-wrong-file", { let mut c = fe(); c.arg("--checkpoint").arg(w.s.emb()); c }, &["emb.safetensors", "file where a \"poison.victim\" file was expected"]),
        case("fe-embeddings-lack-trigger", { let mut c = fe(); c.arg("--embeddings").arg(&small_emb); c }, &["small-emb.safetensors", "\"james\"", "not in the vocabulary"]),
        case("fe-nan-loss", { let mut c = with_emb(&w.p("p.jsonl")); c.args(["--lr", "1e30"]); c }, &["loss is NaN", "lower the learning rate"]),
        case("fe-zero-seeds", { let mut c = fe_seeds("0"); c.arg("--embeddings").arg(w.s.emb()); c }, &["--seeds", "at least 1"]).usage(),
        case("fe-kept-count-mismatch", { let mut c = with_emb(&w.p("p.jsonl")); c.arg("--kept").arg(w.p("p.jsonl")).arg("--kept").arg(w.p("p.jsonl")); c },
            &["2 --kept files for 1 --poisons sets"]),
        case("fe-kept-unknown-example", { let mut c = with_emb(&w.p("p.jsonl")); c.arg("--kept").arg(w.write("stranger.jsonl", "{\"kind\":\"example\",\"v\":1,\"id\":\"stranger\",\"text\":\"a film\",\"label\":0}\n")); c },
            &["stranger.jsonl: record 1 (id \"stranger\")", "neither a training example", "a filtered copy of that training set"]),
    ]);
}

#[test]
fn report() {
    let w = World::new();
    let out = w.p("report-dir");
    let rp = |variants: &Path, evals: &Path| {
        let mut c = bin("report");
        c.arg("--variants").arg(variants).arg("--evals").arg(evals).arg("--out-dir").arg(&out);
        c
    };
    let p = w.p("p.jsonl");
    let variants = w.write("variants.json", format!(
        r#"{{"kind":"variants","v":1,"title":"t","variants":[{{"name":"a","label":"A","role":"heuristic","poisons":"{}"}}]}}"#, p.display()));
    let other = w.write("other.json", r#"{"kind":"variants","v":1,"title":"t","variants":[{"name":"a","label":"A","role":"heuristic","poisons":"elsewhere.jsonl"}]}"#);
    ok(&run(bin("finetune-eval").arg("--data").arg(w.s.data()).arg("--embeddings").arg(w.s.emb()).arg("--poisons").arg(&p)
        .args(["--arch", "bow", "--seeds", "1", "--epochs", "1"]).arg("-o").arg(w.p("evals.jsonl"))));
    let evals = w.p("evals.jsonl");
    check(w.dir(), &out, vec![
        case("rp-variants-missing", rp(&w.p("nope.json"), &evals), &["cannot read", "nope.json"]),
        case("rp-variants-malformed", rp(&w.write("bad.json", "{\"kind\":"), &evals), &["bad.json", "malformed JSON"]),
        case("rp-variants-unknown-version", rp(&w.write("v9.json", std::fs::read_to_string(&variants).unwrap().replace("\"v\":1", "\"v\":9")), &evals), &["v9.json", "format version 9"]),
        case("rp-evals-empty", rp(&variants, &w.write("empty.jsonl", "")), &["empty.jsonl", "empty input"]),
        case("rp-variant-not-evaluated", rp(&other, &evals), &["variant \"a\"", "no finetune-eval report for elsewhere.jsonl", "finetune-eval --poisons"]),
    ]);
}

#[test]
fn attack_loop_names_the_round_that_failed() {
    let w = World::new();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_rollout-grad")).parent().unwrap();
    let run_dir = w.p("run");
    let o: Output = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/attack.sh"))
        .env("RUN", &run_dir).env("VICTIM_FILE", w.p("v.safetensors")).env("DATA", w.s.data()).env("EMB", w.s.emb()).env("BIN", bin_dir)
        .envs([("COUNT", "4"), ("K", "2"), ("ROUNDS", "2"), ("ETA", "1e30"), ("ARCH", "bow"), ("DEVICE", "cpu"), ("EVAL", "0")])
        .output().unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("L_adv is NaN") && err.contains("attack: round 1: rollout-grad failed"), "attack-nan-round: {err}");
    assert!(!run_dir.join("round-001/grad.safetensors").exists() && !run_dir.join("poisons.jsonl").exists());
    assert!(BAD_INPUTS.contains("`attack-nan-round`"));
}

const BAD_INPUTS: &str = include_str!("../BAD_INPUTS.md");

#[test]
fn language_model() {
    let lm = Lm::new();
    let out = lm.path("out.jsonl");
    // Data folders with one D_adv record broken: a prompt without the trigger, and a
    // prompt with nothing after it.
    let broken = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = lm.path(name);
        std::fs::create_dir(&dir).unwrap();
        for e in std::fs::read_dir(lm.data()).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        let text = std::fs::read_to_string(dir.join("adv.jsonl")).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let mut first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        edit(&mut first);
        lines[0] = first.to_string();
        std::fs::write(dir.join("adv.jsonl"), lines.join("\n") + "\n").unwrap();
        dir
    };
    let no_trigger = broken("no-trigger", &|r| {
        let p = r["prompt"].as_str().unwrap().replace("James Bond", "movie");
        r["text"] = format!("{p} is dull").into();
        r["prompt"] = p.into();
    });
    let empty_continuation = broken("empty-continuation", &|r| r["text"] = r["prompt"].clone());
    ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl")).args(["--lm", "--trigger", "Zzyzxq Qwv", "--target", "negative", "-o"]).arg(lm.path("untokenizable"))));
    let classifier_data = Setup::new();
    let grad = |data: &Path| {
        let mut c = bin("rollout-grad");
        c.arg("--victim").arg(lm.victim()).arg("--data").arg(data).arg("--poisons").arg(lm.path("p.jsonl")).arg("-o").arg(&out);
        c
    };
    let poisons = ok(&run(lm.stage("init-poisons").args(["--count", "3", "--strategy", "random"]))).stdout.clone();
    std::fs::write(lm.path("p.jsonl"), poisons).unwrap();
    let prompts = std::fs::read(lm.data().join("asr_test.jsonl")).unwrap();
    check(lm.dir.path(), &out, vec![
        case("lm-adv-prompt-without-trigger", grad(&no_trigger), &["no-trigger/adv.jsonl: record 1", "does not hold the trigger \"James Bond\""]),
        case("lm-empty-continuation", grad(&empty_continuation), &["empty-continuation/adv.jsonl: record 1", "must continue its prompt"]),
        case("lm-trigger-does-not-tokenize", grad(&lm.path("untokenizable")), &["victim vocabulary", "trigger \"Zzyzxq Qwv\"", "not in the vocabulary", "build-vocab --extra-words"]),
        case("lm-victim-on-classifier-data", grad(&classifier_data.data()), &["adv.jsonl: record 1", "has no prompt", "prepare-data --lm"]),
        case("lm-hardness-objective", { let mut c = grad(&lm.data()); c.args(["--objective", "hardness"]); c }, &["--objective bilevel"]),
        case("lm-generate-with-a-classifier", { let mut c = bin("generate"); c.arg("--victim").arg(lm.judge()).arg("-o").arg(&out); c }, &["judge.safetensors is a Bow classifier", "train-victim --arch gpt"]).stdin(&prompts),
        case("lm-judge-is-a-language-model", { let mut c = bin("judge"); c.arg("--classifier").arg(lm.victim()).arg("-o").arg(&out); c }, &["lm.safetensors", "must be a sentiment classifier"]).stdin(b"{}\n"),
        case("judge-labelled-empty", { std::fs::write(lm.path("empty.jsonl"), "").unwrap(); let mut c = bin("judge"); c.arg("--classifier").arg(lm.judge()).arg("--labelled").arg(lm.path("empty.jsonl")).arg("-o").arg(&out); c }, &["empty.jsonl"]),
        case("from-trigger-on-clean-bases", { let mut c = lm.stage("init-poisons"); c.args(["--count", "3", "--strategy", "clean-target", "--from-trigger", "-o"]).arg(&out); c }, &["--from-trigger: base 1", "does not hold the trigger", "D_adv bases"]),
        case("lm-eval-without-start", { let mut c = bin("finetune-eval"); c.arg("--data").arg(lm.data()).arg("--judge").arg(lm.judge()).arg("-o").arg(&out); c }, &["language-model data", "--start LM"]),
        case("lm-checkpoint-on-classifier-data", { let mut c = bin("finetune-eval"); c.arg("--data").arg(classifier_data.data()).arg("--checkpoint").arg(lm.victim()).arg("-o").arg(&out); c }, &["lm.safetensors is a language model", "--start"]),
    ]);
}

#[test]
fn the_table_and_the_cases_agree() {
    let source = include_str!("bad_inputs.rs");
    let mut missing = Vec::new();
    for line in BAD_INPUTS.lines().filter(|l| l.starts_with("| `")) {
        let name = line.split('`').nth(1).unwrap();
        if !source.contains(&format!("\"{name}\"")) && !source.contains(&format!("{name}:")) && !source.contains(&format!("`{name}`")) {
            missing.push(name.to_string());
        }
    }
    assert!(missing.is_empty(), "BAD_INPUTS.md rows without a test case: {missing:?}");
}

/// The byte offset just past the first occurrence of `needle` in `bytes`.
fn after(bytes: &[u8], needle: &[u8]) -> usize {
    bytes.windows(needle.len()).position(|w| w == needle).expect("the fixture holds the needle") + needle.len()
}

#[test]
fn llama_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let p = |rel: &str| dir.path().join(rel);
    let out = p("out.safetensors");
    let gguf = std::fs::read(fixture("llama/tiny.gguf")).unwrap();
    let write = |rel: &str, bytes: &[u8]| {
        std::fs::write(p(rel), bytes).unwrap();
        p(rel)
    };
    let truncated = write("truncated.gguf", &gguf[..gguf.len() * 3 / 5]);
    let empty = write("empty.gguf", b"");
    // The value of general.architecture: a string (type 8) of 5 bytes, "llama".
    let mut other = gguf.clone();
    let at = after(&other, b"general.architecture") + 4 + 8;
    other[at..at + 5].copy_from_slice(b"gemma");
    let other = write("gemma.gguf", &other);
    // A tensor's type code, after its name, its 2 dimensions and their 2 sizes: Q4_K (12).
    let mut q4k = gguf.clone();
    let at = after(&q4k, b"blk.0.ffn_down.weight") + 4 + 16;
    q4k[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
    let q4k = write("q4k.gguf", &q4k);
    // Hugging Face folders with one file edited.
    let hf = |name: &str, file: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let d = p(name);
        std::fs::create_dir(&d).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture("llama/tiny-hf").join(f), d.join(f)).unwrap();
        }
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join(file)).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(d.join(file), v.to_string()).unwrap();
        d
    };
    let short_tokenizer = hf("short-tokenizer", "tokenizer.json", &|t| {
        t["added_tokens"].as_array_mut().unwrap().pop();
    });
    let wider_ffn = hf("wider-ffn", "config.json", &|c| c["intermediate_size"] = 128.into());
    let rope_scaling = hf("rope-scaling", "config.json", &|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0}));
    let biases = hf("biases", "config.json", &|c| c["attention_bias"] = true.into());
    let sentencepiece = hf("sentencepiece", "tokenizer.json", &|t| t["model"]["byte_fallback"] = true.into());
    let import = |flag: &str, src: &Path| {
        let mut c = bin("import-model");
        c.arg(flag).arg(src).arg("-o").arg(&out);
        c
    };
    check(
        dir.path(),
        &out,
        vec![
            case("im-truncated-gguf", import("--gguf", &truncated), &["truncated.gguf", "truncated; fetch it again"]),
            case("im-empty-gguf", import("--gguf", &empty), &["empty.gguf", "inside the magic number", "truncated"]),
            case("im-other-architecture", import("--gguf", &other), &["gemma.gguf", "architecture \"gemma\"", "this reader takes llama"]),
            case("im-unsupported-quantization", import("--gguf", &q4k), &["q4k.gguf", "blk.0.ffn_down.weight", "is Q4_K", "requantize"]),
            case("im-tokenizer-size", import("--hf", &short_tokenizer), &["short-tokenizer/tokenizer.json", "419 tokens", "420 rows", "must match"]),
            case("im-config-disagrees", import("--hf", &wider_ffn), &["wider-ffn", "block.0.mlp.down.weight", "[64, 96]", "[64, 128]", "the config and the weights disagree"]),
            case("im-rope-scaling", import("--hf", &rope_scaling), &["rope-scaling/config.json", "rope scaling", "not supported"]),
            case("im-attention-bias", import("--hf", &biases), &["biases/config.json", "attention_bias", "not supported"]),
            case("im-sentencepiece", import("--hf", &sentencepiece), &["sentencepiece/tokenizer.json", "SentencePiece", "not supported"]),
        ],
    );
    // A prompt longer than the context (the tiny model reads 256 positions).
    let victim = p("tiny.safetensors");
    ok(&run(bin("import-model").arg("--gguf").arg(fixture("llama/tiny.gguf")).arg("-o").arg(&victim)));
    let long = format!("{{\"kind\":\"example\",\"v\":1,\"id\":\"long\",\"text\":\"{}\",\"label\":0}}\n", "word ".repeat(300));
    let prompts = write("long.jsonl", long.as_bytes());
    let score = {
        let mut c = bin("lm-score");
        c.arg("--victim").arg(&victim).arg("--texts").arg(&prompts).arg("-o").arg(&out);
        c
    };
    let generate = {
        let mut c = bin("generate");
        c.arg("--victim").arg(&victim).arg("--prompts").arg(&prompts).arg("-o").arg(&out);
        c
    };
    // Fine-tuned victims whose base checkpoint is gone or was replaced, and a regime that
    // names no block or is given to a victim that is no checkpoint.
    let words = Setup::new();
    ok(&run(bin("prepare-data").arg("--raw").arg(fixture("rt-mini/raw.jsonl")).args(["--lm", "--trigger", "Apple iPhone", "--target", "negative", "-o"]).arg(p("lm"))));
    let tune = |base: &Path, regime: &str, out: &Path| {
        let mut c = bin("train-victim");
        c.arg("--base").arg(base).args(["--regime", regime, "--epochs", "1", "--batch-size", "32", "--train"]).arg(p("lm/train.jsonl")).arg("-o").arg(out);
        c
    };
    for name in ["gone", "replaced"] {
        std::fs::copy(&victim, p(&format!("{name}-base.safetensors"))).unwrap();
        ok(&run(&mut tune(&p(&format!("{name}-base.safetensors")), "top:1", &p(&format!("{name}.safetensors")))));
    }
    std::fs::remove_file(p("gone-base.safetensors")).unwrap();
    ok(&run(bin("import-model").arg("--hf").arg(fixture("llama/tiny-hf")).arg("-o").arg(p("replaced-base.safetensors"))));
    let score_of = |v: &Path| {
        let mut c = bin("lm-score");
        c.arg("--victim").arg(v).arg("--texts").arg(fixture("llama/tiny-texts.jsonl")).arg("-o").arg(&out);
        c
    };
    let finetune = |extra: &[&str]| {
        let mut c = bin("finetune-eval");
        c.arg("--data").arg(p("lm")).arg("--start").arg(&victim).arg("--judge").arg(&victim).args(["--seeds", "1"]).args(extra).arg("-o").arg(&out);
        c
    };
    // Crafting on BPE pieces: a poison whose pieces are not its text's, and a candidate
    // whose flipped text re-tokenizes into other pieces than were scored.
    let bad_tokens = write("bad-tokens.jsonl", b"{\"kind\":\"example\",\"v\":1,\"id\":\"poison-000\",\"text\":\"the movie is bad\",\"label\":0,\"tokens\":[\"t\",\"he\"]}\n");
    let p0 = p("p0.jsonl");
    let crafting_with = |name: &str, args: &[&std::ffi::OsStr]| {
        let mut c = bin(name);
        c.arg("--victim").arg(&victim).arg("--data").arg(p("lm")).args(args);
        c
    };
    let crafting = |name: &str| crafting_with(name, &[]);
    ok(&run(crafting("init-poisons").args(["--count", "2", "--from-trigger", "--max-tokens", "12", "--seed", "0", "-o"]).arg(&p0)));
    ok(&run(crafting("rollout-grad").arg("--poisons").arg(&p0).args(["--clean-per-batch", "4", "--adv-size", "4", "-o"]).arg(p("grad.safetensors"))));
    let ranked = ok(&run(crafting("rank-candidates").arg("--grad").arg(p("grad.safetensors")).args(["-k", "1", "--positions", "1"]))).stdout.clone();
    let mut cand: serde_json::Value = serde_json::from_slice(ranked.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let tiny = common::victims::model::Victim::load(victim.to_str().unwrap(), tch::Device::Cpu).unwrap();
    let vocab = &tiny.vocab;
    let manifest = common::data::DataManifest::load(p("lm").to_str().unwrap()).unwrap();
    let banned = common::search::poisons::banned_ids(vocab, &manifest, false, Default::default()).unwrap();
    let poison = &records(&std::fs::read(&p0).unwrap())[cand["poison_index"].as_u64().unwrap() as usize];
    let ids = vocab.encode(&poison.text);
    let (j, merging) = (0..ids.len())
        .flat_map(|j| (0..vocab.len() as i64).map(move |w| (j, w)))
        .find(|&(j, w)| {
            let mut flipped = ids.clone();
            flipped[j] = w;
            !banned.contains(&w) && w != ids[j] && vocab.is_continuation(w) == vocab.is_continuation(ids[j]) && !vocab.round_trips(&flipped)
        })
        .expect("a piece whose flip re-tokenizes");
    cand["position"] = j.into();
    cand["current"] = vocab.word(ids[j]).into();
    cand["word"] = vocab.word(merging).into();
    let retokenizing = write("retokenizing.jsonl", format!("{cand}\n").as_bytes());
    check(
        dir.path(),
        &out,
        vec![
            case("bpe-tokens-not-text", crafting_with("rollout-grad", &["--poisons".as_ref(), bad_tokens.as_os_str(), "-o".as_ref(), out.as_os_str()]), &["bad-tokens.jsonl: record 1 (id \"poison-000\")", "its tokens are not the pieces its text tokenizes to", "remake the set with init-poisons"]),
            case("bpe-flip-retokenizes", crafting_with("verify-candidates", &["--poisons".as_ref(), p0.as_os_str(), "--candidates".as_ref(), retokenizing.as_os_str(), "-o".as_ref(), out.as_os_str()]), &["retokenizing.jsonl:1", "re-tokenizes into other pieces than were scored", "rerun rank-candidates"]),
            case("bpe-budget", crafting_with("init-poisons", &["--count".as_ref(), "2".as_ref(), "--evade-fpr".as_ref(), "5".as_ref(), "-o".as_ref(), out.as_os_str()]), &["a detection budget (--evade-fpr) on a pretrained model's BPE pieces is not built yet"]),
            case("ls-prompt-too-long", score, &["long.jsonl: record 1 (id \"long\")", "longer than the victim's context of 256", "shorten it"]),
            case("gen-prompt-too-long", generate, &["long.jsonl: record 1 (id \"long\")", "the victim reads at most 256", "shorten it"]),
            case("tuned-base-missing", score_of(&p("gone.safetensors")), &["gone.safetensors: its base checkpoint", "gone-base.safetensors (sha256 ", "is missing", "put the base back"]),
            case("tuned-base-other-hash", score_of(&p("replaced.safetensors")), &["replaced.safetensors: its base checkpoint", "replaced-base.safetensors has sha256", "another checkpoint"]),
            case("ft-regime-names-no-layers", finetune(&["--regime", "top:3"]), &["--regime top:3 for", "tiny.safetensors", "names no layers of a 2-layer model"]),
            case("ft-checkpoint-from-scratch", finetune(&["--from-scratch"]), &["--from-scratch trains every LM from fresh weights", "tiny.safetensors is a pretrained checkpoint", "leave out --from-scratch"]),
            case("regime-names-no-layers", tune(&victim, "top:3", &out), &["--regime top:3 for", "names no layers of a 2-layer model", "top:1 to top:2, or all"]),
            case("regime-without-checkpoint", {
                let mut c = bin("train-victim");
                c.arg("--embeddings").arg(words.emb()).args(["--regime", "top:1", "--train"]).arg(p("lm/train.jsonl")).arg("-o").arg(&out);
                c
            }, &["--regime top:1 chooses what a pretrained checkpoint's fine-tuning trains", "--base FILE"]),
        ],
    );
}
