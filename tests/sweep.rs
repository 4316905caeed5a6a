//! Sweeps: cells planned from a spec run as independent `make cell` invocations that share
//! the data folders, the attacked victim and the clean-victim cache. `make sweep -j 2`
//! (cells side by side, one worker thread each) and `make sweep` (one at a time, two
//! threads) must give byte-identical results from nothing; the same cell started twice
//! must not race (the second refuses, naming the lock). Runs `make` in the project's root on the
//! committed fixtures (the `tiny` preset), in runs/sweeps/test-*.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// sweeps/tiny.json under another name (its own folder), one trigger, both counts.
fn spec(name: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("sweeps/tiny.json")).unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&text).unwrap();
    spec["name"] = name.into();
    spec["triggers"] = serde_json::json!([{"phrase": "James Bond", "target": "positive"}]);
    // A seed of its own: the data split and attacked victim are made by the cells themselves.
    spec["seed"] = 7.into();
    let _ = std::fs::remove_dir_all(root().join("runs/sweeps").join(name));
    std::fs::create_dir_all(root().join("runs/sweeps")).unwrap();
    let path = root().join(format!("runs/sweeps/{name}.json"));
    std::fs::write(&path, spec.to_string()).unwrap();
    path
}

/// The cells of a spec: (id, make invocation).
fn plan(spec: &Path) -> Vec<(String, String)> {
    let out = run(bin("sweep").current_dir(root()).arg("plan").arg(spec));
    ok(&out);
    String::from_utf8(out.stdout).unwrap().lines().map(|l| l.split_once('\t').map(|(a, b)| (a.to_string(), b.to_string())).unwrap()).collect()
}

/// Starts a cell's make invocation (`-o build`: the binaries under test are built already).
fn start(cmd: &str) -> Child {
    Command::new("bash")
        .current_dir(root())
        .arg("-c")
        .arg(format!("{cmd} -o build"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// A cell's evaluation without what legitimately differs between folders: paths and times.
fn results(spec_name: &str, id: &str) -> Vec<serde_json::Value> {
    let dir = root().join(format!("runs/sweeps/{spec_name}/cells/{id}"));
    assert!(dir.join("cell.json").is_file(), "{id} did not finish");
    let text = std::fs::read_to_string(dir.join("evals.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("poisons");
            v
        })
        .collect()
}

#[test]
fn make_sweep_gives_the_same_bytes_at_any_j_and_a_running_cell_refuses_a_second_run() {
    // Each sweep from nothing: its own data split, attacked victim and crafting.
    let clear = || {
        for shared in ["data/rt-james-bond-positive-s7-mini", "runs/victims-cache/james-bond-positive-tiny-lstm-s7"] {
            let _ = std::fs::remove_dir_all(root().join(shared));
        }
    };
    clear();
    let j2 = spec("test-j2");
    let cells = plan(&j2);
    assert_eq!(cells.len(), 2, "{cells:?}");
    assert!(cells[0].1.contains("CELL_DIR='runs/sweeps/test-j2/cells/james-bond-positive-tiny-n4'"), "{}", cells[0].1);

    // `make sweep -j 2`: both cells at once, one worker thread each, sharing the data
    // folder, the attacked victim and the clean cache.
    let sweep = start(&format!("make --no-print-directory sweep SPEC={} -j 2", j2.display()));
    // While a cell runs, a second invocation of it waits for nothing and refuses, naming the lock.
    let lock = root().join("runs/sweeps/test-j2/cells/james-bond-positive-tiny-n4/.lock");
    let held = || Command::new("flock").arg("-n").arg(&lock).arg("true").status().is_ok_and(|s| !s.success());
    let t0 = std::time::Instant::now();
    while !(lock.is_file() && held()) {
        if t0.elapsed().as_secs() >= 120 {
            // Say why: a cell that failed before the lock was seen held leaves only this.
            let o = finish(sweep);
            let e = String::from_utf8_lossy(&o.stderr).to_string();
            panic!("the sweep never took the cell's lock (exit {:?}); its stderr ends:\n{}", o.status.code(), &e[e.floor_char_boundary(e.len().saturating_sub(4000))..]);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let second = finish(start(&cells[0].1));
    assert!(!second.status.success(), "a second invocation of a running cell must refuse");
    assert!(stderr(&second).contains("being computed by another process") && stderr(&second).contains(".lock"), "{}", stderr(&second));
    ok(&finish(sweep));
    assert!(root().join("runs/victims-cache/james-bond-positive-tiny-lstm-s7/victim.safetensors").is_file());
    // A finished cell skips itself.
    let again = finish(start(&cells[0].1));
    ok(&again);
    assert!(stderr(&again).contains("is finished"), "{}", stderr(&again));

    // `make sweep` (-j 1: one cell at a time with every core) from nothing, in a sweep
    // folder of its own: byte-identical results.csv (figures, poison hashes and victim
    // fingerprints), the same evaluations cell by cell.
    clear();
    let j1 = spec("test-j1");
    ok(&finish(start(&format!("make --no-print-directory sweep SPEC={}", j1.display()))));
    for (id, _) in &cells {
        assert_eq!(results("test-j2", id), results("test-j1", id), "{id}: make sweep -j 2 and -j 1 differ");
    }
    let csv = |name: &str| std::fs::read(root().join(format!("runs/sweeps/{name}/results.csv"))).unwrap();
    let (a, b) = (csv("test-j2"), csv("test-j1"));
    assert!(a == b, "make sweep -j 2 and -j 1 must give byte-identical results.csv:\n{}\n---\n{}", String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));

    // The merge: one row per cell, variant and seed; a cell that is gone is listed.
    ok(&run(bin("sweep").current_dir(root()).arg("merge").arg(&j2)));
    let csv = std::fs::read_to_string(root().join("runs/sweeps/test-j2/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 5 * 2, "header + 2 cells x 5 variants x 2 seeds:\n{csv}");
    let table = std::fs::read_to_string(root().join("runs/sweeps/test-j2/james-bond-positive-tiny.md")).unwrap();
    for crafted in ["hardness", "influence", "influence-bases"] {
        assert!(table.contains(&format!("| {crafted} − confident |")), "the paired differences per count:\n{table}");
    }
    std::fs::remove_file(root().join("runs/sweeps/test-j2/cells/james-bond-positive-tiny-n8/cell.json")).unwrap();
    let merged = run(bin("sweep").current_dir(root()).arg("merge").arg(&j2));
    ok(&merged);
    assert!(String::from_utf8_lossy(&merged.stdout).contains("1 of 2 cells merged"), "{}", String::from_utf8_lossy(&merged.stdout));
    let missing = std::fs::read_to_string(root().join("runs/sweeps/test-j2/missing.txt")).unwrap();
    assert!(missing.starts_with("james-bond-positive-tiny-n8\t"), "{missing}");
    for name in ["test-j2", "test-j1"] {
        let _ = std::fs::remove_dir_all(root().join("runs/sweeps").join(name));
        let _ = std::fs::remove_file(root().join(format!("runs/sweeps/{name}.json")));
    }
}

#[test]
fn a_bad_spec_is_refused_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    for (name, spec, needle) in [
        ("variant", r#"{"kind":"sweep_spec","v":1,"name":"x","triggers":[{"phrase":"James Bond","target":"positive"}],"victims":["tiny"],"counts":[4],"variants":["magic"],"seeds":2}"#, "variant \"magic\": expected one of"),
        ("preset", r#"{"kind":"sweep_spec","v":1,"name":"x","triggers":[{"phrase":"James Bond","target":"positive"}],"victims":["nope"],"counts":[4],"variants":["confident"],"seeds":2}"#, "there is no presets/nope.mk"),
        ("seeds", r#"{"kind":"sweep_spec","v":1,"name":"x","triggers":[{"phrase":"James Bond","target":"positive"}],"victims":["tiny"],"counts":[4],"variants":["confident"],"seeds":1}"#, "seeds at least 2"),
        ("name", r#"{"kind":"sweep_spec","v":1,"name":"X Y","triggers":[{"phrase":"James Bond","target":"positive"}],"victims":["tiny"],"counts":[4],"variants":["confident"],"seeds":2}"#, "name \"X Y\""),
        ("version", r#"{"kind":"sweep_spec","v":9,"name":"x","triggers":[],"victims":[],"counts":[],"variants":[],"seeds":2}"#, "version"),
    ] {
        let path = dir.path().join(format!("{name}.json"));
        std::fs::write(&path, spec).unwrap();
        let out = run(bin("sweep").current_dir(root()).arg("plan").arg(&path));
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("{name}.json")) && stderr(&out).contains(needle), "{name}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{name}: no partial plan");
    }
}
