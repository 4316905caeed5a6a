//! The demo's poison-set variants in one place: each one's name, label, role and how its
//! poison set is made. `scripts/demo.sh` asks `report recipe NAME` what to run for a
//! variant and `report variants-file` for the `variants.json` that lists them; the sweep
//! spec checks its variant names here. A new variant is a line in `CATALOGUE` (and, for a
//! new kind of recipe, an arm in demo.sh's dispatch).

use crate::report::{Role, VariantSpec, Variants};
use anyhow::{bail, Result};

/// Which words a crafting run may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slots {
    /// The rest of each sentence; the carrier (the trigger's substitutes) stays.
    Rest,
    /// The carrier only.
    Carrier,
    /// Both.
    Both,
}

/// How a variant's poison set is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// No poisons (the clean row).
    None,
    /// `init-poisons --bases B --strategy S`, under the concealment given (None: the run's),
    /// within the detection budget (EVADE_FPR) when `evading`.
    Init { bases: &'static str, strategy: &'static str, concealment: Option<&'static str>, evading: bool },
    /// A crafting run (`scripts/attack.sh`) of this objective from the confident-bases
    /// heuristic.
    Craft { objective: &'static str, slots: Slots, contrastive: bool, evading: bool },
    /// Every D_adv sentence made a strictly concealed poison, then the COUNT with the
    /// lowest influence terms (`score-poisons --select`).
    SelectByInfluence,
    /// Variant `from`'s set with its carriers chosen by retraining (`select-carriers`):
    /// among candidates it proposes, or among those variant `candidates_from` retrained.
    SelectCarriers { from: &'static str, candidates_from: Option<&'static str> },
}

/// One variant of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Variant {
    pub name: &'static str,
    pub label: &'static str,
    pub role: Role,
    pub recipe: Recipe,
}

const fn init(bases: &'static str, strategy: &'static str) -> Recipe {
    Recipe::Init { bases, strategy, concealment: None, evading: false }
}

const fn craft(objective: &'static str, slots: Slots) -> Recipe {
    Recipe::Craft { objective, slots, contrastive: false, evading: false }
}

/// Every variant, in the demo's display order.
pub const CATALOGUE: &[Variant] = &[
    Variant { name: "none", label: "no poisons", role: Role::Clean, recipe: Recipe::None },
    Variant { name: "benign", label: "benign control (target-class sentences)", role: Role::Control, recipe: Recipe::Init { bases: "random", strategy: "clean-target", concealment: Some("strict"), evading: false } },
    Variant { name: "relabelled", label: "relabelled control (non-target sentences)", role: Role::Control, recipe: Recipe::Init { bases: "random", strategy: "relabelled", concealment: Some("strict"), evading: false } },
    Variant { name: "unoptimised", label: "unoptimised (random substitutes)", role: Role::Baseline, recipe: init("random", "random") },
    Variant { name: "neighbour", label: "nearest-neighbour substitutes", role: Role::Heuristic, recipe: init("random", "neighbour") },
    Variant { name: "confident", label: "confident non-target bases + neighbours", role: Role::Heuristic, recipe: init("confident", "neighbour") },
    Variant { name: "overlap", label: "with overlap (trigger kept; not concealed)", role: Role::Reference, recipe: Recipe::Init { bases: "confident", strategy: "overlap", concealment: Some("token"), evading: false } },
    Variant { name: "bilevel", label: "crafted: seed bi-level objective", role: Role::Crafted, recipe: craft("bilevel", Slots::Both) },
    Variant { name: "influence", label: "crafted: influence objective", role: Role::Crafted, recipe: craft("influence", Slots::Rest) },
    Variant { name: "hardness", label: "crafted: hardness objective (default)", role: Role::Crafted, recipe: craft("hardness", Slots::Rest) },
    Variant { name: "influence-contrastive", label: "crafted: contrastive influence", role: Role::Crafted, recipe: Recipe::Craft { objective: "influence", slots: Slots::Rest, contrastive: true, evading: false } },
    Variant { name: "influence-carrier", label: "crafted: influence, carrier slots only", role: Role::Crafted, recipe: craft("influence", Slots::Carrier) },
    Variant { name: "influence-both", label: "crafted: influence, carrier and sentence", role: Role::Crafted, recipe: craft("influence", Slots::Both) },
    Variant { name: "influence-bases", label: "bases chosen by influence + neighbours", role: Role::Crafted, recipe: Recipe::SelectByInfluence },
    Variant { name: "confident-evading", label: "confident bases + neighbours, evading", role: Role::Heuristic, recipe: Recipe::Init { bases: "confident", strategy: "neighbour", concealment: None, evading: true } },
    Variant { name: "hardness-evading", label: "crafted: hardness, evading", role: Role::Crafted, recipe: Recipe::Craft { objective: "hardness", slots: Slots::Rest, contrastive: false, evading: true } },
    Variant { name: "hardness-carriers", label: "crafted: hardness + carriers by retraining", role: Role::Crafted, recipe: Recipe::SelectCarriers { from: "hardness", candidates_from: None } },
    Variant { name: "confident-carriers", label: "confident bases + carriers by retraining", role: Role::Heuristic, recipe: Recipe::SelectCarriers { from: "confident", candidates_from: Some("hardness-carriers") } },
];

/// The variants the demo's main table compares, in its order.
pub const DEMO: &[&str] = &["none", "benign", "relabelled", "unoptimised", "neighbour", "confident", "confident-carriers", "overlap", "bilevel", "influence", "hardness", "hardness-carriers"];

/// The variants a sweep cell may compute besides the benign control, which every cell has.
pub fn sweepable() -> impl Iterator<Item = &'static Variant> {
    CATALOGUE.iter().filter(|v| !matches!(v.role, Role::Clean | Role::Control))
}

/// The variant called `name`, or an error that lists them.
pub fn find(name: &str) -> Result<&'static Variant> {
    match CATALOGUE.iter().find(|v| v.name == name) {
        Some(v) => Ok(v),
        None => bail!("unknown variant {name:?}; the variants are {}", CATALOGUE.iter().map(|v| v.name).collect::<Vec<_>>().join(", ")),
    }
}

impl Variant {
    /// What `scripts/demo.sh` runs for it, as words its dispatch reads:
    /// `none`, `init BASES STRATEGY CONCEALMENT EVADING`, `craft OBJECTIVE SLOTS CONTRASTIVE
    /// EVADING` or `select-by-influence` (`-` for the run's concealment, `yes`/`no` for flags).
    pub fn recipe_line(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        match self.recipe {
            Recipe::None => "none".into(),
            Recipe::Init { bases, strategy, concealment, evading } => format!("init {bases} {strategy} {} {}", concealment.unwrap_or("-"), yes(evading)),
            Recipe::Craft { objective, slots, contrastive, evading } => {
                let slots = match slots {
                    Slots::Rest => "rest",
                    Slots::Carrier => "carrier",
                    Slots::Both => "both",
                };
                format!("craft {objective} {slots} {} {}", yes(contrastive), yes(evading))
            }
            Recipe::SelectByInfluence => "select-by-influence".into(),
            Recipe::SelectCarriers { from, candidates_from } => format!("select-carriers {from} {}", candidates_from.unwrap_or("-")),
        }
    }

    fn evading(&self) -> bool {
        matches!(self.recipe, Recipe::Init { evading: true, .. } | Recipe::Craft { evading: true, .. })
    }
}

/// How `variants_file` names, labels and places each variant's poison set.
pub struct Layout<'a> {
    /// The run folder: `init-NAME.jsonl` or `craft-NAME/` hold each set.
    pub dir: &'a str,
    /// Label every variant ", N" with this poison count and make its label its series (a
    /// sweep cell).
    pub count: Option<usize>,
    /// One variant per count, `NAME-nCOUNT` (a count sweep in one run).
    pub counts: &'a [usize],
    /// The evasion budget (percent FPR) an evading variant is made under: its name gains
    /// `-FPR` and its label says it.
    pub evade_fpr: Option<f64>,
}

/// `variants.json` for `names` (each as often as `layout.counts` asks).
pub fn variants_file(title: &str, names: &[String], layout: &Layout) -> Result<Variants> {
    let mut out = Vec::new();
    for name in names {
        let v = find(name)?;
        let points: Vec<Option<usize>> = if layout.counts.is_empty() { vec![None] } else { layout.counts.iter().map(|&n| Some(n)).collect() };
        for point in points {
            let stem = match point {
                Some(n) => format!("{name}-n{n}"),
                None => name.clone(),
            };
            let (mut shown, mut label) = (stem.clone(), v.label.to_string());
            if v.evading() {
                let fpr = layout.evade_fpr.ok_or_else(|| anyhow::anyhow!("variant {name:?} evades a detector: give --evade-fpr"))?;
                shown = format!("{stem}-{fpr}");
                label = format!("{label} (budget {fpr}% FPR)");
            }
            let count = point.or(layout.count);
            let series = count.map(|_| label.clone());
            let label = match count {
                Some(n) => format!("{label}, {n}"),
                None => label,
            };
            let dir = layout.dir;
            let mut selection = None;
            let (poisons, initial, rounds) = match v.recipe {
                Recipe::None => (None, None, None),
                Recipe::SelectCarriers { from, .. } => {
                    selection = Some(format!("{dir}/select-{stem}/selection.json"));
                    let from_stem = stem.replacen(name.as_str(), from, 1);
                    let initial = match find(from)?.recipe {
                        Recipe::Craft { .. } => format!("{dir}/craft-{from_stem}/poisons.jsonl"),
                        _ => format!("{dir}/init-{from_stem}.jsonl"),
                    };
                    (Some(format!("{dir}/select-{stem}/poisons.jsonl")), Some(initial), None)
                }
                Recipe::Init { .. } | Recipe::SelectByInfluence => (Some(format!("{dir}/init-{stem}.jsonl")), None, None),
                Recipe::Craft { .. } => (
                    Some(format!("{dir}/craft-{stem}/poisons.jsonl")),
                    Some(format!("{dir}/craft-{stem}/round-000/poisons.jsonl")),
                    Some(format!("{dir}/craft-{stem}/rounds.tsv")),
                ),
            };
            out.push(VariantSpec { name: shown, label, role: v.role, poisons, initial, rounds, series, selection });
        }
    }
    Ok(Variants { kind: <Variants as crate::io::Record>::KIND.into(), v: <Variants as crate::io::Record>::VERSION, title: title.into(), variants: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_demo_and_sweep_name_is_in_the_catalogue() {
        let mut names: Vec<&str> = CATALOGUE.iter().map(|v| v.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len(), "a name is used twice");
        for d in DEMO {
            find(d).unwrap();
        }
        assert!(find("nothing").unwrap_err().to_string().contains("hardness"));
    }

    #[test]
    fn the_variants_file_places_each_set_where_its_recipe_writes_it() {
        let names: Vec<String> = ["none", "confident", "hardness", "hardness-evading"].iter().map(|s| s.to_string()).collect();
        let f = variants_file("t", &names, &Layout { dir: "run", count: Some(50), counts: &[], evade_fpr: Some(1.0) }).unwrap();
        let v = &f.variants;
        assert_eq!((v[0].poisons.as_deref(), v[1].poisons.as_deref()), (None, Some("run/init-confident.jsonl")));
        assert_eq!(v[2].initial.as_deref(), Some("run/craft-hardness/round-000/poisons.jsonl"));
        assert_eq!((v[3].name.as_str(), v[3].label.as_str()), ("hardness-evading-1", "crafted: hardness, evading (budget 1% FPR), 50"));
        assert_eq!(v[1].series.as_deref(), Some("confident non-target bases + neighbours"));
        let sweep = variants_file("t", &names[1..2], &Layout { dir: "s", count: None, counts: &[5, 10], evade_fpr: None }).unwrap();
        assert_eq!(sweep.variants.iter().map(|v| v.poisons.clone().unwrap()).collect::<Vec<_>>(), ["s/init-confident-n5.jsonl", "s/init-confident-n10.jsonl"]);
        assert!(variants_file("t", &names[3..], &Layout { dir: "r", count: None, counts: &[], evade_fpr: None }).is_err(), "an evading variant needs its budget");
    }
}
