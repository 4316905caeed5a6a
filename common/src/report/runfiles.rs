//! The files of a crafting run folder that the shell loop (scripts/attack.sh) and the demo
//! (scripts/demo.sh) need rendered: the run manifest, rounds.tsv, the evaluation table
//! and the demo's victims table. Their schemas live here and in `report.rs` (which reads
//! rounds.tsv), so the scripts only orchestrate.

use crate::eval::EvalReport;
use crate::io;
use crate::formats::records::VerifySummary;
use crate::stats::Summary;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The header of rounds.tsv (`report::read_rounds` parses it).
pub const ROUNDS_HEADER: &str = "round\tobjective_before\tobjective_after\tflips\tgrad_s\trank_s\tverify_s";

/// A crafting run's settings as `report attack-manifest` takes them: KEY=VALUE pairs
/// recorded as text, numbers or booleans.
pub struct Settings<'a> {
    pub texts: &'a [String],
    pub numbers: &'a [String],
    pub flags: &'a [String],
}

impl Settings<'_> {
    /// The settings as one JSON object (keys sorted).
    pub fn to_json(&self) -> Result<Value> {
        let mut out = serde_json::Map::new();
        let split = |pair: &str, what: &str| -> Result<(String, String)> {
            let (k, v) = pair.split_once('=').with_context(|| format!("--{what} {pair:?}: expected KEY=VALUE"))?;
            if k.is_empty() {
                bail!("--{what} {pair:?}: the key is empty");
            }
            Ok((k.to_string(), v.to_string()))
        };
        for pair in self.texts {
            let (k, v) = split(pair, "text")?;
            out.insert(k, Value::String(v));
        }
        for pair in self.numbers {
            let (k, v) = split(pair, "number")?;
            let n: serde_json::Number = serde_json::from_str(&v).ok().filter(|n: &serde_json::Number| n.is_f64() || n.is_i64() || n.is_u64()).with_context(|| format!("--number {pair:?}: {v:?} is not a number"))?;
            out.insert(k, Value::Number(n));
        }
        for pair in self.flags {
            let (k, v) = split(pair, "flag")?;
            let b = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => bail!("--flag {pair:?}: {v:?} is neither true nor false"),
            };
            out.insert(k, Value::Bool(b));
        }
        Ok(Value::Object(out))
    }
}

/// The manifest that ties a crafting run folder to its settings and inputs (a resumed run
/// must match it byte for byte): the settings, the victim file's path and sha256, the data
/// manifest's and each ensemble victim's sha256. Keys sorted, two-space indent.
pub fn attack_manifest(settings: &Settings, victim: &str, data_manifest: &str, ensemble: &[String]) -> Result<String> {
    let settings = settings.to_json()?;
    let sha = |p: &str| io::sha256_file(std::path::Path::new(p)).with_context(|| format!("reading {p}"));
    let manifest = json!({
        "kind": "attack_manifest",
        "v": 1,
        "settings": settings,
        "inputs": {
            "victim": victim,
            "victim_sha256": sha(victim)?,
            "data_manifest_sha256": sha(data_manifest)?,
            "ensemble_sha256": ensemble.iter().map(|p| sha(p)).collect::<Result<Vec<_>>>()?,
        },
    });
    Ok(serde_json::to_string_pretty(&manifest)?)
}

/// rounds.tsv of a run folder for rounds 1..=`through`: each round's objective before and
/// after and accepted flips (`round-NNN/summary.json`), and its stages' seconds
/// (`round-NNN/seconds.tsv`, `-` where the output came from an earlier invocation).
pub fn rounds_tsv(run: &str, through: usize) -> Result<String> {
    let mut out = format!("{ROUNDS_HEADER}\n");
    for r in 1..=through {
        let dir = format!("{run}/round-{r:03}");
        let path = format!("{dir}/summary.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let s: VerifySummary = io::parse_record(text.trim()).with_context(|| path.clone())?;
        let seconds = std::fs::read_to_string(format!("{dir}/seconds.tsv")).map(|t| t.trim_end().to_string()).unwrap_or_else(|_| "-\t-\t-".into());
        let num = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
        out += &format!("{r}\t{}\t{}\t{}\t{seconds}\n", num(s.objective_before), num(s.objective_after), s.flips_accepted);
    }
    Ok(out)
}

/// One field of a JSON object file as text (strings bare, null empty): what a shell loop
/// reads from a summary.
pub fn json_field(path: &str, key: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))?;
    // A dotted key walks into nested objects: trigger.phrase.
    let found = key.split('.').try_fold(&value, |v, k| v.get(k));
    Ok(match found {
        None => bail!("{path}: no field {key:?}"),
        Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    })
}

fn read_report(path: &str) -> Result<EvalReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    io::parse_record(text.trim()).with_context(|| path.to_string())
}

fn cell(s: &Option<Summary>) -> String {
    s.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// The table of an attack run's evaluation: the initial and the crafted poisons
/// (`eval-init.json`, `eval-final.json`).
pub fn attack_table(run: &str) -> Result<String> {
    let mut out = format!("{:<22} {:<14} {:<14} {:<14} {:<14} overlap\n", "poisons", "net ASR", "dFPR", "CACC", "ΔCACC");
    let mut seeds = 0;
    for (what, name) in [("init", "initial (unoptimised)"), ("final", "crafted")] {
        let r = read_report(&format!("{run}/eval-{what}.json"))?;
        let s = &r.summary;
        out += &format!(
            "{name:<22} {:<14} {:<14} {:<14} {:<14} {}/{}\n",
            cell(&s.net_asr),
            cell(&s.dfpr),
            s.cacc.to_string(),
            cell(&s.dcacc),
            r.audit.poisons_with_overlap,
            r.audit.poison_count
        );
        seeds = r.seeds.len();
    }
    out += &format!("(mean ± 95% CI over {seeds} retraining seeds, percent; reports in {run}/)\n");
    Ok(out)
}

/// The demo's victims table: per architecture the dev accuracy recorded in
/// `victim-ARCH.safetensors` and the test CACC and clean ASR of `eval-ARCH.json`.
pub fn victims_table(run: &str, archs: &[String]) -> Result<String> {
    let mut out = format!("{:<6} {:<22} {:<18} {:<26}\n", "victim", "dev acc (seed 0)", "test CACC", "clean ASR (trigger only)");
    let mut seeds = 0;
    for arch in archs {
        let path = format!("{run}/victim-{arch}.safetensors");
        let file = crate::tensorfile::read(&path, crate::victims::model::VICTIM_FORMAT, crate::victims::model::VICTIM_VERSION)?;
        let record = crate::train::TrainingRecord::from_metadata(&file.metadata).with_context(|| path.clone())?;
        let dev = record.dev_accuracy.with_context(|| format!("{path}: no dev_accuracy (train it with --dev)"))?;
        let r = read_report(&format!("{run}/eval-{arch}.json"))?;
        out += &format!("{arch:<6} {dev:<22.1} {:<18} {:<26}\n", r.summary.cacc.to_string(), r.summary.asr.to_string());
        seeds = r.seeds.len();
    }
    out += &format!("(test split of Rotten Tomatoes, mean ± 95% CI over {seeds} seeds; reports in {run}/)\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_sorts_keys_and_keeps_the_scripts_number_forms() {
        let dir = tempfile::tempdir().unwrap();
        let (victim, data) = (dir.path().join("v"), dir.path().join("m"));
        std::fs::write(&victim, b"victim").unwrap();
        std::fs::write(&data, b"data").unwrap();
        let (v, d) = (victim.to_str().unwrap(), data.to_str().unwrap());
        let strings = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let (texts, numbers, flags) = (strings(&["positions=5"]), strings(&["seed=0", "eta=0.03", "count=50"]), strings(&["overlap=false"]));
        let settings = Settings { texts: &texts, numbers: &numbers, flags: &flags };
        let got = attack_manifest(&settings, v, d, &[]).unwrap();
        let sha = |b: &[u8]| crate::io::sha256_hex(b);
        // What the earlier Python writer (json.dumps(indent=2, sort_keys=True)) printed.
        let want = format!(
            "{{\n  \"inputs\": {{\n    \"data_manifest_sha256\": \"{}\",\n    \"ensemble_sha256\": [],\n    \"victim\": \"{v}\",\n    \"victim_sha256\": \"{}\"\n  }},\n  \"kind\": \"attack_manifest\",\n  \"settings\": {{\n    \"count\": 50,\n    \"eta\": 0.03,\n    \"overlap\": false,\n    \"positions\": \"5\",\n    \"seed\": 0\n  }},\n  \"v\": 1\n}}",
            sha(b"data"),
            sha(b"victim")
        );
        assert_eq!(got, want);
        for (texts, numbers, flags) in [(strings(&["nokey"]), vec![], vec![]), (vec![], strings(&["k=5x"]), vec![]), (vec![], vec![], strings(&["overlap=1"]))] {
            assert!(attack_manifest(&Settings { texts: &texts, numbers: &numbers, flags: &flags }, v, d, &[]).is_err(), "{texts:?} {numbers:?} {flags:?}");
        }
        assert!(json_field(d, "x").is_err(), "not JSON");
    }
}
