//! The library's modules form layers (ARCHITECTURE.md): a module may use modules of its own
//! layer or below, never above, and no two modules may use each other, directly or round
//! a longer loop. Read from the sources (test code excluded), so a new `use` that breaks
//! the order fails here with the offending file and line.

use std::collections::{BTreeMap, BTreeSet};

/// Every module of `common/src` with its layer, lowest first; a folder's layer is the
/// folder (its `mod.rs` is the module named by the folder). A new module gets a line.
const LAYERS: &[(&str, &[&str])] = &[
    ("util", &["io", "tensorfile", "stats", "device", "validate", "numerics", "gguf"]),
    ("formats", &["formats", "formats::records", "formats::gradfile"]),
    ("text", &["wordpiece", "bpe", "tokenizer", "embeddings", "concealment"]),
    ("data", &["data", "ding", "mt"]),
    (
        "victims",
        &["victims", "victims::params", "victims::loss", "victims::victim", "victims::layers", "victims::bert", "victims::bow", "victims::lstm", "victims::minilm", "victims::gpt", "victims::seq2seq", "victims::llama", "victims::model", "victims::origin", "victims::checkpoint"],
    ),
    ("task rules", &["tasks::rules"]),
    ("training", &["encode", "train", "generate", "translate"]),
    ("defenses", &["detect"]),
    ("objectives", &["objectives", "objectives::objective", "objectives::swaps", "objectives::bilevel", "objectives::hardness", "objectives::influence"]),
    ("search", &["search", "search::poisons", "search::rank", "search::verify"]),
    ("evaluation", &["eval", "eval::retrain", "eval::judge", "eval::templates", "eval::lm_eval", "eval::bleu", "eval::mt_eval"]),
    // A search decision judged by retraining victims (the evaluation's own training).
    ("search by retraining", &["search::carriers"]),
    ("report", &["report", "report::catalogue", "report::runfiles", "report::sweep", "report::objective_benchmark", "report::defense", "report::price", "report::lm_report", "report::mt_report"]),
    ("wiring", &["cli"]),
    ("tasks", &["tasks", "tasks::classification", "tasks::continuation", "tasks::translation"]),
];

/// Modules only tests use (`#[cfg(test)]`): outside the layers.
const TEST_ONLY: &[&str] = &["testing", "victims::conformance"];

/// A folder whose files are one module (no line of its own in `LAYERS`).
const WHOLE_FOLDERS: &[&str] = &["detect"];

fn src() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `(line, used path)` for every `crate::a::b` a file's non-test code names (its lowercase
/// segments: `crate::victims::model::Params` gives `victims::model`, `crate::stats::summarize(x)` gives `stats::summarize`; `resolve` finds the module), including
/// `use crate::{a, b::c}` lists.
fn uses(text: &str) -> Vec<(usize, String)> {
    fn path(s: &str) -> String {
        let mut segments = Vec::new();
        for segment in s.split("::") {
            let name: String = segment.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name.is_empty() || !name.starts_with(|c: char| c.is_ascii_lowercase()) || name == "self" {
                break;
            }
            let whole = name.len() == segment.trim().len();
            segments.push(name);
            if !whole {
                break;
            }
        }
        segments.join("::")
    }
    let mut out = Vec::new();
    let mut depth = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + 7..];
            if let Some(list) = after.strip_prefix('{') {
                depth = 1;
                rest = list;
                break;
            }
            let used = path(after);
            if !used.is_empty() {
                out.push((i + 1, used));
            }
            rest = after;
        }
        if depth > 0 {
            // Items of a `use crate::{...}` list, possibly over several lines; what a nested
            // list (`model::{self, Params}`) names is the item's own path.
            let mut item = String::new();
            for c in rest.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        let used = path(&item);
                        if !used.is_empty() {
                            out.push((i + 1, used));
                        }
                        item.clear();
                    }
                    _ if depth == 1 => item.push(c),
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
            let used = path(&item);
            if !used.is_empty() {
                out.push((i + 1, used));
            }
        }
    }
    out
}

/// The listed module a used path names: its longest listed prefix.
fn resolve<'a>(used: &str, listed: &BTreeMap<&'a str, usize>) -> Option<&'a str> {
    let segments: Vec<&str> = used.split("::").collect();
    (1..=segments.len()).rev().find_map(|n| listed.get_key_value(segments[..n].join("::").as_str()).map(|(k, _)| *k))
}

/// A module's file: `a::b` is `a/b.rs`; `a` is `a.rs` or `a/mod.rs`.
fn module_file(module: &str) -> std::path::PathBuf {
    let file = src().join(format!("{}.rs", module.replace("::", "/")));
    if file.exists() {
        file
    } else {
        src().join(module.replace("::", "/")).join("mod.rs")
    }
}

/// A module's source without its test code: its file, or for a whole folder
/// (`WHOLE_FOLDERS`) every file of it (its submodules are part of it).
fn module_text(module: &str) -> String {
    let cut = |f: &std::path::Path| std::fs::read_to_string(f).unwrap().split("#[cfg(test)]").next().unwrap_or("").to_string();
    if !WHOLE_FOLDERS.contains(&module) {
        return cut(&module_file(module));
    }
    let mut files: Vec<_> = std::fs::read_dir(src().join(module)).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files.iter().map(|f| cut(f)).collect::<Vec<_>>().join("\n")
}

/// The modules lib.rs declares, with those of each folder's `mod.rs` (`folder::name`).
fn declared_modules() -> BTreeSet<String> {
    let declared_in = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| {
                let l = l.trim();
                l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("pub(crate) mod ")).or_else(|| l.strip_prefix("mod "))
            })
            .filter(|l| l.ends_with(';'))
            .map(|l| l.trim_end_matches(';').trim().to_string())
            .collect()
    };
    let mut out = BTreeSet::new();
    for top in declared_in(&std::fs::read_to_string(src().join("lib.rs")).unwrap()) {
        let folder = src().join(&top).join("mod.rs");
        if folder.exists() && !WHOLE_FOLDERS.contains(&top.as_str()) {
            for sub in declared_in(&std::fs::read_to_string(folder).unwrap()) {
                out.insert(format!("{top}::{sub}"));
            }
        }
        out.insert(top);
    }
    out.retain(|m| !TEST_ONLY.contains(&m.as_str()));
    out
}

#[test]
fn modules_use_only_their_layer_or_below_and_form_no_cycles() {
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(k, (_, mods))| mods.iter().map(move |m| (*m, k))).collect();
    let declared = declared_modules();
    let listed: BTreeSet<String> = layer_of.keys().map(|m| m.to_string()).collect();
    assert_eq!(declared, listed, "lib.rs and the folders' mod.rs declare modules the layer table does not list (or the reverse): give each a layer");

    let mut problems = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for module in &declared {
        let file = if WHOLE_FOLDERS.contains(&module.as_str()) { format!("common/src/{module}/") } else { format!("common/{}", module_file(module).strip_prefix(src().parent().unwrap()).unwrap().display()) };
        for (line, used_path) in uses(&module_text(module)) {
            if TEST_ONLY.iter().any(|t| used_path == *t || used_path.starts_with(&format!("{t}::"))) {
                continue;
            }
            let Some(used) = resolve(&used_path, &layer_of) else {
                problems.push(format!("{file}:{line}: uses crate::{used_path}, which has no layer"));
                continue;
            };
            if used == module {
                continue;
            }
            let (from, to) = (layer_of[module.as_str()], layer_of[used]);
            if to > from {
                problems.push(format!("{file}:{line}: {module} ({}) uses {used} ({}), a higher layer", LAYERS[from].0, LAYERS[to].0));
            }
            edges.entry(module.clone()).or_default().insert(used.to_string());
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
    let text = "use crate::io::Record;\nuse crate::{data, victims::model::{self, Params},\n  encode::Encoded};\nlet x = crate::stats::summarize(&v); // crate::report in a comment\n#[cfg(test)]\nuse crate::report;\n";
    let names: Vec<String> = uses(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["io", "data", "victims::model", "encode", "stats::summarize"]);
    let listed: BTreeMap<&str, usize> = LAYERS.iter().enumerate().flat_map(|(k, (_, mods))| mods.iter().map(move |m| (*m, k))).collect();
    assert_eq!(resolve("victims::model", &listed), Some("victims::model"));
    assert_eq!(resolve("detect::metrics", &listed), Some("detect"));
    assert_eq!(resolve("nothing::here", &listed), None);
}
