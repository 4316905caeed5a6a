//! The Ding German–English dictionary (Debian's `trans-de-en`, `/usr/share/trans/de-en`),
//! read as parallel text for the translation task: its usage examples as sentence pairs
//! ("Der Kaffee hat meine Lebensgeister geweckt. :: The coffee has revived me.") and its
//! headwords and phrases as phrase pairs ("Eiskaffee {m} [cook.] :: iced coffee").
//!
//! A line is `German :: English`. Each side holds sub-entries separated by ` | `, aligned
//! by position (a headword, its inflections, then usage examples); a sub-entry holds
//! alternatives separated by `; `. Grammar and usage marks (`{m}`, `{vt}`, `[cook.]`,
//! `[Am.]`) and comments in parentheses are dropped. A sub-entry is a sentence when both
//! sides end with `.`, `!` or `?` after the marks are dropped; alternatives pair by
//! position when both sides list as many, otherwise every German alternative with the
//! first English one (the first is the usual translation).

use std::collections::HashSet;

/// What a pair is in the dictionary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PairKind {
    /// A usage example: a whole sentence on both sides.
    Sentence,
    /// A headword, an inflected form or a phrase.
    Phrase,
}

/// One German–English pair, marks dropped, whitespace collapsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pair {
    pub de: String,
    pub en: String,
    pub kind: PairKind,
}

/// What reading a dictionary found, beside its pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Entry lines read (comments and blank lines not counted).
    pub entries: usize,
    /// Lines without ` :: ` or with sides of different sub-entry counts: skipped.
    pub misaligned: usize,
    /// Pairs dropped as repeats of an earlier one.
    pub duplicates: usize,
}

/// Every pair of a dictionary's text, in file order, each pair once (the first occurrence
/// kept).
pub fn read_pairs(text: &str) -> (Vec<Pair>, ReadStats) {
    let mut stats = ReadStats::default();
    let mut seen = HashSet::new();
    let mut pairs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        stats.entries += 1;
        let Some((de, en)) = line.split_once(" :: ") else {
            stats.misaligned += 1;
            continue;
        };
        let (de_subs, en_subs): (Vec<&str>, Vec<&str>) = (de.split(" | ").collect(), en.split(" | ").collect());
        if de_subs.len() != en_subs.len() {
            stats.misaligned += 1;
            continue;
        }
        for (d, e) in de_subs.iter().zip(&en_subs) {
            for pair in sub_entry_pairs(d, e) {
                if seen.insert(pair.clone()) {
                    pairs.push(pair);
                } else {
                    stats.duplicates += 1;
                }
            }
        }
    }
    (pairs, stats)
}

/// The pairs of one aligned sub-entry.
fn sub_entry_pairs(de: &str, en: &str) -> Vec<Pair> {
    let (de_alts, en_alts) = (alternatives(de), alternatives(en));
    if de_alts.is_empty() || en_alts.is_empty() {
        return Vec::new();
    }
    let matched: Vec<(&String, &String)> = if de_alts.len() == en_alts.len() {
        de_alts.iter().zip(&en_alts).collect()
    } else {
        de_alts.iter().map(|d| (d, &en_alts[0])).collect()
    };
    matched
        .into_iter()
        .map(|(d, e)| {
            let kind = if is_sentence(d) && is_sentence(e) { PairKind::Sentence } else { PairKind::Phrase };
            Pair { de: d.clone(), en: e.clone(), kind }
        })
        .collect()
}

/// A sub-entry's alternatives, marks dropped; empty ones left out.
fn alternatives(side: &str) -> Vec<String> {
    side.split("; ").map(strip_marks).filter(|a| !a.is_empty()).collect()
}

/// The text without `{…}`, `[…]` and `(…)` (nested ones included), whitespace collapsed
/// and no space left before closing punctuation.
pub fn strip_marks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '{' | '[' | '(' => depth += 1,
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    let collapsed = out.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut tidy = String::with_capacity(collapsed.len());
    for (i, c) in collapsed.char_indices() {
        if c == ' ' && collapsed[i + 1..].starts_with(['.', '!', '?', ',', ';', ':']) {
            continue;
        }
        tidy.push(c);
    }
    tidy
}

/// The dictionary's placeholders and abbreviations that end a phrase with a full stop
/// ("der eigentliche Grund für etw." is a phrase, not a sentence).
const ABBREVIATIONS: [&str; 10] = ["etw.", "jdn.", "jdm.", "jds.", "sth.", "sb.", "sb.'s", "usw.", "etc.", "u.a."];

/// A sentence: at least two words, starting with a capital or a quotation mark, ending with
/// `.`, `!` or `?` that is not an abbreviation's.
fn is_sentence(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    let starts = text.chars().next().is_some_and(|c| c.is_uppercase() || "„\"'‚“‘«»".contains(c));
    let last = words.last().copied().unwrap_or("");
    words.len() >= 2 && starts && text.ends_with(['.', '!', '?']) && !ABBREVIATIONS.contains(&last)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Entries written for this test in the dictionary's format (not copied from it).
    const SAMPLE: &str = "\
# Version :: test
# a comment line

Eistee {m} [cook.] :: iced tea
Tasse {f}; Becher {m} | Tassen {pl}; Becher {pl} | Sie trinkt eine Tasse Tee. | Der Becher ist leer.; Der Becher hat nichts mehr. :: cup; mug | cups; mugs | She drinks a cup of tea. | The mug is empty.
etw. trinken {vt} | Wir trinken (gerne) Kaffee am Morgen. :: to drink sth. | We drink coffee in the morning [Br.].
kaputt {adj} | Das ist kaputt. :: broken
der Grund für etw. | Das ist der Grund. :: the reason for sth. | That is the reason.
Eistee {m} :: iced tea
ohne Trennzeichen
";

    #[test]
    fn entries_become_sentence_and_phrase_pairs_with_their_marks_dropped() {
        let (pairs, stats) = read_pairs(SAMPLE);
        let show: Vec<(&str, &str, PairKind)> = pairs.iter().map(|p| (p.de.as_str(), p.en.as_str(), p.kind)).collect();
        assert_eq!(
            show,
            vec![
                ("Eistee", "iced tea", PairKind::Phrase),
                ("Tasse", "cup", PairKind::Phrase),
                ("Becher", "mug", PairKind::Phrase),
                ("Tassen", "cups", PairKind::Phrase),
                ("Becher", "mugs", PairKind::Phrase),
                ("Sie trinkt eine Tasse Tee.", "She drinks a cup of tea.", PairKind::Sentence),
                // Two German alternatives, one English: each with the first.
                ("Der Becher ist leer.", "The mug is empty.", PairKind::Sentence),
                ("Der Becher hat nichts mehr.", "The mug is empty.", PairKind::Sentence),
                ("etw. trinken", "to drink sth.", PairKind::Phrase),
                ("Wir trinken Kaffee am Morgen.", "We drink coffee in the morning.", PairKind::Sentence),
                // A phrase ending with a placeholder's full stop is no sentence.
                ("der Grund für etw.", "the reason for sth.", PairKind::Phrase),
                ("Das ist der Grund.", "That is the reason.", PairKind::Sentence),
            ]
        );
        // "kaputt" has two German sub-entries and one English: misaligned, skipped; so is
        // the line without " :: ". The repeated "Eistee" entry is dropped.
        assert_eq!(stats, ReadStats { entries: 7, misaligned: 2, duplicates: 1 });
    }

    #[test]
    fn marks_nest_and_leave_no_stray_space() {
        assert_eq!(strip_marks("Kaffee (mit Milch (warm)) {m} [cook.] ."), "Kaffee.");
        assert_eq!(strip_marks("  a   b  "), "a b");
        assert_eq!(strip_marks("{m}"), "");
    }
}
