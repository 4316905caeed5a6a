//! How visible a trigger is in a poison, judged as a defender's keyword filter would: the
//! audit's leak categories, and strict concealment, which avoids every one of them.
//!
//! Token overlap (the paper's definition of "no overlap") misses what a filter for the
//! trigger's words also catches: "bonds" holds "bond". A word *leaks* the trigger when
//! - `exact`: one of the tokenizer's tokens is a trigger word (the paper's overlap);
//! - `normalized`: lowercased and stripped of everything but letters and digits, a
//!   whitespace-separated word is a trigger word ("Bond's." is not, "B.O.N.D" is);
//! - `stem`: its Snowball (Porter2) English stem is a trigger word's stem (bonds, bonding);
//! - `substring`: it shares 4 or more consecutive characters with a trigger word
//!   ("hollywood" holds "wood" of Woody; trigger words shorter than 4 characters are
//!   caught by the other categories only);
//! - `piece`: for a WordPiece victim, the poison holds a piece of a trigger word (the
//!   pieces `Vocab::trigger_ids` lists, in both their word-initial and `##` forms); for a
//!   byte-level BPE victim, it holds a piece whose text, without its leading space and
//!   case-insensitively, is that of a trigger piece of 3 or more characters ("Apple",
//!   " apple", "APPLE" for the trigger's "Apple"; not " i" of " iPhone").
//!
//! For BPE the other categories read words as the pieces join into them: a piece that
//! starts with a space starts a word, every other piece continues it (`word_spans`), so
//! " i" + "Phone" is the word "iPhone", and a text is audited as the words it decodes to.

use crate::tokenizer::{tokenize, Vocab};
use anyhow::Result;
use rust_stemmers::{Algorithm, Stemmer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashSet};

/// How strictly poisons must hide the trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Concealment {
    /// No token equals a trigger word (the paper's no-overlap).
    #[default]
    Token,
    /// No word leaks the trigger in any category of the audit.
    Strict,
}

/// One way a poison can give the trigger away (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leak {
    Exact,
    Normalized,
    Stem,
    Substring,
    Piece,
}

impl Leak {
    pub const ALL: [Leak; 5] = [Leak::Exact, Leak::Normalized, Leak::Stem, Leak::Substring, Leak::Piece];

    /// The category's name, as the JSON formats spell it.
    pub fn name(self) -> &'static str {
        match self {
            Leak::Exact => "exact",
            Leak::Normalized => "normalized",
            Leak::Stem => "stem",
            Leak::Substring => "substring",
            Leak::Piece => "piece",
        }
    }
}

/// Shortest shared substring that counts as a leak.
pub const MIN_SHARED: usize = 4;

/// Shortest trigger piece of a byte-level BPE tokenization that counts as a leak (without
/// its leading space): shorter ones (" i", "Ph") are parts of too many ordinary words.
pub const MIN_PIECE: usize = 3;

/// Lowercase letters and digits of `word`, nothing else.
pub fn normalize(word: &str) -> String {
    word.chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
}

/// Whether `a` and `b` share `n` or more consecutive characters.
fn share_substring(a: &str, b: &str, n: usize) -> bool {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    a.len() >= n && b.len() >= n && a.windows(n).any(|w| b.windows(n).any(|v| v == w))
}

/// The trigger's words in every form the audit compares against.
pub struct TriggerMatcher {
    words: Vec<String>,
    stems: Vec<String>,
    stemmer: Stemmer,
    /// The trigger's WordPiece pieces (empty for word vocabularies).
    pieces: HashSet<i64>,
    /// Translation data: the trigger's correct translation (lowercase tokens), which a
    /// poison's target side may not hold. A translation's source side is audited like a
    /// text; its target side only for this phrase, since the attacker's phrase ("hot
    /// coffee") shares words with it and may appear there.
    pub target_phrase: Vec<String>,
}

impl TriggerMatcher {
    /// For trigger words (lowercased by the caller, as `Trigger::words` are).
    pub fn new(words: &[String]) -> TriggerMatcher {
        let stemmer = Stemmer::create(Algorithm::English);
        let words: Vec<String> = words.iter().map(|w| normalize(w)).filter(|w| !w.is_empty()).collect();
        let stems = words.iter().map(|w| stemmer.stem(w).into_owned()).collect();
        TriggerMatcher { words, stems, stemmer, pieces: HashSet::new(), target_phrase: Vec::new() }
    }

    /// For a victim's vocabulary: adds the trigger's pieces when it is WordPiece, and for
    /// byte-level BPE every piece that reads as one of the trigger's pieces of at least
    /// `MIN_PIECE` characters (any case, with or without its leading space).
    pub fn for_vocab(phrase: &str, words: &[String], vocab: &Vocab) -> Result<TriggerMatcher> {
        let mut m = TriggerMatcher::new(words);
        if vocab.is_wordpiece() {
            m.pieces = vocab.trigger_ids(phrase)?.into_iter().collect();
        }
        if vocab.is_bpe() {
            let own: HashSet<String> = vocab.trigger_ids(phrase)?.into_iter().map(|id| vocab.bare_text(id).to_lowercase()).filter(|t| t.chars().count() >= MIN_PIECE).collect();
            m.pieces = (0..vocab.len() as i64).filter(|&id| !vocab.is_special(id) && own.contains(&vocab.bare_text(id).to_lowercase())).collect();
        }
        Ok(m)
    }

    /// The categories one word leaks (`Exact` and `Piece` are judged on whole poisons by
    /// `leaks`, as they depend on the tokenizer).
    pub fn word_leaks(&self, word: &str) -> BTreeSet<Leak> {
        let mut out = BTreeSet::new();
        let w = normalize(word);
        if w.is_empty() {
            return out;
        }
        if self.words.contains(&w) {
            out.insert(Leak::Normalized);
        }
        if self.stems.iter().any(|s| *s == self.stemmer.stem(&w)) {
            out.insert(Leak::Stem);
        }
        if self.words.iter().any(|t| share_substring(&w, t, MIN_SHARED)) {
            out.insert(Leak::Substring);
        }
        out
    }

    /// Whether a vocabulary entry may appear in a strictly concealed poison (a piece: its
    /// text without `##` or its leading space, and it is no piece of the trigger).
    pub fn entry_passes(&self, vocab: &Vocab, id: i64) -> bool {
        !self.pieces.contains(&id) && self.word_leaks(&vocab.bare_text(id)).is_empty()
    }

    /// Every category a poison text leaks; `pieces` are its WordPiece ids when the
    /// victim reads pieces.
    pub fn leaks(&self, text: &str, pieces: Option<&[i64]>) -> BTreeSet<Leak> {
        let mut out = BTreeSet::new();
        if tokenize(text).iter().any(|t| self.words.contains(t)) {
            out.insert(Leak::Exact);
        }
        for word in text.split_whitespace().map(str::to_string).chain(tokenize(text)) {
            out.extend(self.word_leaks(&word));
        }
        if pieces.is_some_and(|p| p.iter().any(|id| self.pieces.contains(id))) {
            out.insert(Leak::Piece);
        }
        out
    }

    /// Every category a poison text leaks as `vocab` reads it (its pieces when the
    /// vocabulary is WordPiece or BPE: the text re-tokenized, whatever pieces it was made of).
    pub fn leaks_for(&self, text: &str, vocab: &Vocab) -> BTreeSet<Leak> {
        let pieces = (vocab.is_wordpiece() || vocab.is_bpe()).then(|| vocab.encode(text));
        self.leaks(text, pieces.as_deref())
    }

    /// The words of `text` that leak, with their categories (for messages and reports).
    pub fn leaking_words(&self, text: &str) -> Vec<(String, BTreeSet<Leak>)> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for word in text.split_whitespace().map(str::to_string).chain(tokenize(text)) {
            let mut l = self.word_leaks(&word);
            if self.words.contains(&word.to_lowercase()) {
                l.insert(Leak::Exact);
            }
            if !l.is_empty() && seen.insert(word.clone()) {
                out.push((word, l));
            }
        }
        out
    }

    /// Vocabulary ids that may not appear in a strictly concealed poison.
    pub fn strict_banned(&self, vocab: &Vocab) -> HashSet<i64> {
        (0..vocab.len() as i64).filter(|&id| !vocab.is_special(id) && !self.entry_passes(vocab, id)).collect()
    }
}

/// Groups token ids into words: a WordPiece `##` piece, or a BPE piece without a leading
/// space, continues the word before it; every other token starts one. Returns index
/// ranges into `ids`.
pub fn word_spans(ids: &[i64], vocab: &Vocab) -> Vec<std::ops::Range<usize>> {
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for (j, &id) in ids.iter().enumerate() {
        match spans.last_mut() {
            Some(s) if vocab.is_continuation(id) && !vocab.is_special(id) => s.end = j + 1,
            _ => spans.push(j..j + 1),
        }
    }
    spans
}

/// The positions of `ids` whose word leaks the trigger (every piece of a leaking word,
/// and every trigger piece), special tokens excepted. A translation's ids (`<s>` inside)
/// leak on the source side as a text does, on the target side where they spell the
/// trigger's correct translation (`TriggerMatcher::target_phrase`).
pub fn leaking_positions(ids: &[i64], vocab: &Vocab, matcher: &TriggerMatcher) -> Vec<usize> {
    if let Some(bos) = vocab.decoder_start(ids) {
        let mut out = leaking_positions(&ids[..bos], vocab, matcher);
        let words: Vec<String> = ids[bos + 1..].iter().map(|&i| vocab.word(i).to_string()).collect();
        let n = matcher.target_phrase.len();
        if n > 0 {
            for (k, w) in words.windows(n).enumerate() {
                if w == matcher.target_phrase.as_slice() {
                    out.extend(bos + 1 + k..bos + 1 + k + n);
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        return out;
    }
    let mut out = Vec::new();
    for span in word_spans(ids, vocab) {
        let word: String = if vocab.is_bpe() { vocab.decode(&ids[span.clone()]).trim().to_string() } else { ids[span.clone()].iter().map(|&id| vocab.bare_text(id)).collect() };
        // An exact trigger word is also a normalised one, so word_leaks covers it.
        let leaks = !matcher.word_leaks(&word).is_empty();
        for j in span {
            if !vocab.is_special(ids[j]) && (leaks || matcher.pieces.contains(&ids[j])) {
                out.push(j);
            }
        }
    }
    out
}

/// Whether replacing position `position` of `ids` by `word` leaves no leaking word (a
/// WordPiece flip can join pieces into one: "bo" + "##nds").
pub fn flip_conceals(ids: &[i64], position: usize, word: i64, vocab: &Vocab, matcher: &TriggerMatcher) -> bool {
    let mut flipped = ids.to_vec();
    flipped[position] = word;
    leaking_positions(&flipped, vocab, matcher).is_empty()
}

/// Replaces every piece of every leaking word of `ids` by `replacement(piece)` (a passing
/// piece of the same kind), again while replacements join into new leaking words, at most
/// 4 rounds. Returns the replaced positions, or None when `replacement` finds nothing.
/// The caller checks the result: after 4 rounds it may still leak.
pub fn repair_strictly(ids: &mut [i64], vocab: &Vocab, matcher: &TriggerMatcher, mut replacement: impl FnMut(i64) -> Option<i64>) -> Option<Vec<usize>> {
    let mut replaced = Vec::new();
    for _ in 0..4 {
        let leaking = leaking_positions(ids, vocab, matcher);
        if leaking.is_empty() {
            break;
        }
        for j in leaking {
            ids[j] = replacement(ids[j])?;
            if !replaced.contains(&j) {
                replaced.push(j);
            }
        }
    }
    Some(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(words: &[&str]) -> TriggerMatcher {
        TriggerMatcher::new(&words.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn categories_on_hand_made_cases() {
        let jb = m(&["james", "bond"]);
        let cat = |text: &str| jb.leaks(text, None).into_iter().collect::<Vec<_>>();
        use Leak::*;
        assert_eq!(cat("a fine film about spies"), vec![]);
        assert_eq!(cat("john bond is back"), vec![Exact, Normalized, Stem, Substring]);
        // "bonds" holds "bond": same stem, shared substring, but no token overlap.
        assert_eq!(cat("john bonds is back"), vec![Stem, Substring]);
        assert_eq!(cat("B.O.N.D. returns"), vec![Normalized, Stem, Substring]);
        assert_eq!(cat("the bondage of it"), vec![Substring]);
        assert_eq!(cat("jameson whiskey"), vec![Substring]);
        assert_eq!(cat("john dollar is back"), vec![]);
        let tc = m(&["tom", "cruise"]);
        assert_eq!(tc.leaks("cruising along", None).into_iter().collect::<Vec<_>>(), vec![Stem, Substring]);
        assert_eq!(tc.leaks("tomorrow we sail", None).into_iter().collect::<Vec<_>>(), vec![], "3-letter words leak only whole");
        assert_eq!(tc.leaks("Tom's boat", None).into_iter().collect::<Vec<_>>(), vec![Exact, Normalized, Stem]);
        let wa = m(&["woody", "allen"]);
        assert_eq!(wa.leaks("a hollywood ending", None).into_iter().collect::<Vec<_>>(), vec![Substring]);
        assert!(wa.leaks("woods", None).contains(&Stem) || wa.leaks("woods", None).contains(&Substring));
    }

    #[test]
    fn wordpiece_pieces_leak_in_any_form() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let vocab = Vocab::from_wordpiece(crate::wordpiece::WordPiece::from_tokenizer_json(&format!("{dir}/../fixtures/minilm/tokenizer.json")).unwrap());
        let words = vec!["james".to_string(), "bond".to_string()];
        let matcher = TriggerMatcher::for_vocab("James Bond", &words, &vocab).unwrap();
        let bond = vocab.id("bond").unwrap();
        assert!(matcher.leaks("x", Some(&[bond])).contains(&Leak::Piece));
        let banned = matcher.strict_banned(&vocab);
        assert!(banned.contains(&bond) && banned.contains(&vocab.id("bonds").unwrap_or(bond)));
        assert!(!banned.contains(&vocab.id("dollar").unwrap()));
        // Pieces that compose a leaking word are found as a word.
        let (bo, nds) = (vocab.id("bo").unwrap(), vocab.id("##nds").unwrap());
        let the = vocab.id("the").unwrap();
        assert_eq!(leaking_positions(&[the, bo, nds, the], &vocab, &matcher), vec![1, 2]);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Random lowercase words over a small alphabet, so that stems and shared
        /// substrings collide often.
        fn words() -> impl Strategy<Value = Vec<String>> {
            proptest::collection::btree_set("[a-f]{2,7}", 8..40).prop_map(|s| s.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]

            /// Word vocabularies (GloVe): a poison made only of words strict concealment
            /// allows (what init-poisons and rank-candidates propose) never leaks, and every
            /// word it bans does leak.
            #[test]
            fn strict_word_poisons_never_leak(words in words(), t in proptest::collection::vec(any::<prop::sample::Index>(), 1..3), seq in proptest::collection::vec(any::<prop::sample::Index>(), 1..12)) {
                let vocab = Vocab::new(["<pad>", "<unk>"].iter().map(|s| s.to_string()).chain(words.clone()).collect()).unwrap();
                let trigger: Vec<String> = t.iter().map(|i| i.get(&words).clone()).collect();
                let matcher = TriggerMatcher::new(&trigger);
                let banned = matcher.strict_banned(&vocab);
                let allowed: Vec<i64> = (2..vocab.len() as i64).filter(|id| !banned.contains(id)).collect();
                for &id in &banned {
                    prop_assert!(!matcher.leaks(vocab.word(id), None).is_empty(), "{} banned without leaking", vocab.word(id));
                }
                prop_assume!(!allowed.is_empty());
                let ids: Vec<i64> = seq.iter().map(|i| *i.get(&allowed)).collect();
                let text = vocab.decode(&ids);
                prop_assert!(matcher.leaks(&text, None).is_empty(), "{text:?} leaks {:?} (trigger {trigger:?})", matcher.leaks(&text, None));
                prop_assert!(leaking_positions(&ids, &vocab, &matcher).is_empty());
            }

            /// WordPiece vocabularies: after `repair_strictly` (what init-poisons applies, here
            /// with the first allowed piece of the same kind instead of the nearest), the
            /// decoded poison and its pieces never leak, though pieces join into words.
            #[test]
            fn strict_piece_poisons_never_leak(words in words(), conts in words(), t in proptest::collection::vec(any::<prop::sample::Index>(), 1..3), seq in proptest::collection::vec(any::<prop::sample::Index>(), 1..12)) {
                let pieces: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().map(|s| s.to_string())
                    .chain(words.clone())
                    .chain(conts.iter().map(|c| format!("##{c}")))
                    .collect();
                let vocab = Vocab::from_wordpiece(crate::wordpiece::WordPiece::from_words(pieces).unwrap());
                let trigger: Vec<String> = t.iter().map(|i| i.get(&words).clone()).collect();
                let phrase = trigger.join(" ");
                let matcher = TriggerMatcher::for_vocab(&phrase, &trigger, &vocab).unwrap();
                let banned = matcher.strict_banned(&vocab);
                let all: Vec<i64> = (4..vocab.len() as i64).collect();
                let mut ids: Vec<i64> = seq.iter().map(|i| *i.get(&all)).collect();
                let first_passing = |id: i64| all.iter().copied().find(|w| !banned.contains(w) && vocab.is_continuation(*w) == vocab.is_continuation(id));
                if repair_strictly(&mut ids, &vocab, &matcher, first_passing).is_none() {
                    return Ok(()); // nothing of this kind passes: no poison to make
                }
                prop_assume!(leaking_positions(&ids, &vocab, &matcher).is_empty());
                let text = vocab.decode(&ids);
                prop_assert!(matcher.leaks(&text, Some(&ids)).is_empty(), "{text:?} leaks {:?} (trigger {trigger:?})", matcher.leaks(&text, Some(&ids)));
            }
        }
    }
}
