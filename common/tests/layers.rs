//! The library's modules form layers (ARCHITECTURE.md): a module may use modules of its own
//! layer or below, never above, and no two modules may use each other, directly or round
//! a longer loop. Read from the sources (test code excluded), so a new `use` that breaks
//! the order fails here with the offending file and line.

use std::collections::{BTreeMap, BTreeSet};

/// Every module of `common/src` with its layer, lowest first. A new module gets a line.
const LAYERS: &[(&str, &[&str])] = &[
    ("util", &["io", "tensorfile", "stats", "device", "validate", "numerics"]),
    ("formats", &["records", "gradfile"]),
    ("text", &["wordpiece", "tokenizer", "embeddings", "concealment"]),
    ("data", &["data"]),
    ("victims", &["params", "loss", "victim", "bert", "bow", "lstm", "minilm", "gpt", "model", "base"]),
    ("training", &["train", "generate"]),
    ("defenses", &["detect"]),
    ("objectives", &["attack", "hardness", "influence", "objective"]),
    ("search", &["poisons", "rank", "verify"]),
    ("evaluation", &["eval", "retrain", "judge", "lm_eval"]),
    ("report", &["report", "runfiles", "sweep", "objective_benchmark", "defense", "lm_report"]),
    ("wiring", &["cli"]),
];

/// Modules only tests use (`#[cfg(test)]` in lib.rs): outside the layers.
const TEST_ONLY: &[&str] = &["testing", "conformance"];

fn src() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `(line, used module)` for every `crate::m` a file's non-test code names, including
/// `use crate::{a, b::c}` lists.
fn uses(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_braces = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + 7..];
            if let Some(list) = after.strip_prefix('{') {
                in_braces = true;
                rest = list;
                break;
            }
            let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            out.push((i + 1, name));
            rest = after;
        }
        if in_braces {
            // Items of a `use crate::{...}` list, possibly over several lines.
            let (items, closed) = match rest.find('}') {
                Some(end) => (&rest[..end], true),
                None => (rest, false),
            };
            for item in items.split(',') {
                let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != "self" {
                    out.push((i + 1, name));
                }
            }
            in_braces = !closed;
        }
    }
    out
}

/// A module's source: `m.rs`, or every file of the folder `m/` (its submodules are part
/// of it; their test code is cut file by file).
fn module_text(module: &str) -> String {
    let file = src().join(format!("{module}.rs"));
    if file.exists() {
        return std::fs::read_to_string(file).unwrap();
    }
    let mut files: Vec<_> = std::fs::read_dir(src().join(module)).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let t = std::fs::read_to_string(f).unwrap();
            t.split("#[cfg(test)]").next().unwrap_or("").to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn modules_use_only_their_layer_or_below_and_form_no_cycles() {
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(k, (_, mods))| mods.iter().map(move |m| (*m, k))).collect();
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').trim().to_string())
        .filter(|m| !TEST_ONLY.contains(&m.as_str()))
        .collect();
    let listed: BTreeSet<String> = layer_of.keys().map(|m| m.to_string()).collect();
    assert_eq!(declared, listed, "lib.rs declares modules the layer table does not list (or the reverse): give each a layer");

    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for module in &declared {
        let text = module_text(module);
        for (line, used) in uses(&text) {
            if used == *module || TEST_ONLY.contains(&used.as_str()) {
                continue;
            }
            let (Some(&from), Some(&to)) = (layer_of.get(module.as_str()), layer_of.get(used.as_str())) else {
                problems.push(format!("common/src/{module}.rs:{line}: uses crate::{used}, which has no layer"));
                continue;
            };
            if to > from {
                problems.push(format!(
                    "common/src/{module}.rs:{line}: {module} ({}) uses {used} ({}), a higher layer",
                    LAYERS[from].0, LAYERS[to].0
                ));
            }
            edges.entry(module.clone()).or_default().insert(used);
        }
    }
    // Cycles (within a layer; across layers they are caught above): depth-first search.
    fn visit(m: &str, edges: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>, found: &mut Vec<String>) {
        if let Some(at) = path.iter().position(|p| p == m) {
            found.push(format!("cycle: {} -> {m}", path[at..].join(" -> ")));
            return;
        }
        if done.contains(m) {
            return;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            visit(next, edges, path, done, found);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in &declared {
        visit(m, &edges, &mut Vec::new(), &mut done, &mut problems);
    }
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}

#[test]
fn the_reader_finds_uses_in_every_form() {
    let text = "use crate::io::Record;\nuse crate::{data, model::Params,\n  train::Encoded};\nlet x = crate::stats::summarize(&v); // crate::report in a comment\n#[cfg(test)]\nuse crate::report;\n";
    let names: Vec<String> = uses(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["io", "data", "model", "train", "stats"]);
}
