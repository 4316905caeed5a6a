//! Byte-level BPE, the tokenizer of GPT-2 and of the Llama-family models this project
//! reads (SmolLM2): text is split into words by a pre-tokenizer, each word's UTF-8 bytes
//! are mapped to printable characters (GPT-2's byte-to-unicode table), and the word's
//! symbols are merged pair by pair, the pair of lowest merge rank first (the leftmost of
//! equals), until no listed merge applies.
//!
//! It follows llama.cpp (`llama-vocab.cpp`, `unicode.cpp`), not the `tokenizers` crate, so
//! that one implementation serves both checkpoint layouts (a GGUF holds tokens and merges,
//! not a tokenizer.json) and is checked against llama.cpp itself, token for token
//! (fixtures/llama, scripts/compare_llamacpp.sh). The pre-tokenizers it knows:
//! - `gpt2`: GPT-2's regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//!   as llama.cpp's hand-written matcher applies it;
//! - `smollm`: every number character its own piece first (`\p{N}`), then `gpt2`.
//!
//! Others are refused by name. Conventions (the same everywhere in the project): text is
//! plain text, so control tokens written in it (`<|im_start|>`) are not parsed as control
//! tokens; user-defined tokens are (as llama.cpp does); no beginning-of-text token is added
//! unless the model asks for one (`add_bos`; SmolLM2 does not), and no chat template is
//! applied: a prompt is continued as written.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// llama.cpp's token types (`llama_token_type`).
pub const NORMAL: u8 = 1;
pub const UNKNOWN: u8 = 2;
pub const CONTROL: u8 = 3;
pub const USER_DEFINED: u8 = 4;
pub const UNUSED: u8 = 5;
pub const BYTE: u8 = 6;

/// How text is split into words before merging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    Gpt2,
    Smollm,
}

impl PreTokenizer {
    /// From llama.cpp's `tokenizer.ggml.pre` name.
    pub fn from_name(name: &str) -> Result<PreTokenizer> {
        Ok(match name {
            "gpt2" | "default" => PreTokenizer::Gpt2,
            "smollm" => PreTokenizer::Smollm,
            other => bail!("pre-tokenizer {other:?} is not supported (this reader knows gpt2 and smollm)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt2",
            PreTokenizer::Smollm => "smollm",
        }
    }
}

/// Everything a byte-level BPE tokenizer is made of, as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpeSpec {
    /// Token strings in byte-to-unicode form, by id (a victim file stores them as its
    /// vocabulary, not among these settings).
    #[serde(skip)]
    pub tokens: Vec<String>,
    /// llama.cpp's token type per id (`NORMAL`, `CONTROL`, ...).
    pub types: Vec<u8>,
    /// Merges, highest priority first, each "left right".
    pub merges: Vec<String>,
    /// The pre-tokenizer's llama.cpp name.
    pub pre: String,
    pub bos: Option<i64>,
    pub eos: Option<i64>,
    /// Whether a text starts with the beginning-of-text token.
    pub add_bos: bool,
}

#[derive(Clone)]
pub struct Bpe {
    spec: BpeSpec,
    pre: PreTokenizer,
    ids: HashMap<String, i64>,
    ranks: HashMap<(String, String), usize>,
    /// User-defined tokens matched in text, longest first.
    user_defined: Vec<(String, i64)>,
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
}

impl std::fmt::Debug for Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bpe({} tokens, {} merges, {})", self.spec.tokens.len(), self.spec.merges.len(), self.pre.name())
    }
}

/// GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others for
/// the characters from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("U+0100.. are characters");
            next += 1;
            c
        };
    }
    table
}

impl Bpe {
    pub fn new(spec: BpeSpec) -> Result<Bpe> {
        let pre = PreTokenizer::from_name(&spec.pre)?;
        if spec.types.len() != spec.tokens.len() {
            bail!("{} token types for {} tokens", spec.types.len(), spec.tokens.len());
        }
        let mut ids = HashMap::with_capacity(spec.tokens.len());
        for (i, t) in spec.tokens.iter().enumerate() {
            // llama.cpp keeps the last id of a duplicated string.
            ids.insert(t.clone(), i as i64);
        }
        let mut ranks = HashMap::with_capacity(spec.merges.len());
        for (rank, m) in spec.merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').with_context(|| format!("merge {rank} {m:?} is not two symbols separated by a space"))?;
            ranks.entry((a.to_string(), b.to_string())).or_insert(rank);
        }
        for (what, id) in [("beginning-of-text", spec.bos), ("end-of-text", spec.eos)] {
            if let Some(id) = id.filter(|&i| i < 0 || i as usize >= spec.tokens.len()) {
                bail!("the {what} token id {id} is outside the {} tokens", spec.tokens.len());
            }
        }
        let mut user_defined: Vec<(String, i64)> =
            spec.types.iter().enumerate().filter(|(_, &t)| t == USER_DEFINED).map(|(i, _)| (spec.tokens[i].clone(), i as i64)).collect();
        user_defined.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let byte_chars = byte_chars();
        let char_bytes = byte_chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Bpe { spec, pre, ids, ranks, user_defined, byte_chars, char_bytes })
    }

    pub fn spec(&self) -> &BpeSpec {
        &self.spec
    }

    pub fn len(&self) -> usize {
        self.spec.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spec.tokens.is_empty()
    }

    pub fn id(&self, token: &str) -> Option<i64> {
        self.ids.get(token).copied()
    }

    /// Whether a token is not text (control, unknown, unused): never decoded, never a
    /// poison word.
    pub fn is_special(&self, id: i64) -> bool {
        matches!(self.spec.types.get(id as usize), Some(&(CONTROL | UNKNOWN | UNUSED)) | None)
    }

    /// Token ids of a plain text (the conventions of the module documentation).
    pub fn encode(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        if self.spec.add_bos {
            ids.extend(self.spec.bos);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest user-defined token, the longest at that position.
            let hit = self.user_defined.iter().filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id))).min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, after) = match hit {
                Some((at, len, id)) => (&rest[..at], Some((id, &rest[at + len..]))),
                None => (rest, None),
            };
            for word in self.words(plain) {
                self.encode_word(word, &mut ids);
            }
            match after {
                Some((id, tail)) => {
                    ids.push(id);
                    rest = tail;
                }
                None => break,
            }
        }
        ids
    }

    /// The pre-tokenizer's words of a text.
    pub fn words<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let pieces: Vec<&str> = match self.pre {
            PreTokenizer::Gpt2 => vec![text],
            PreTokenizer::Smollm => split_numbers(text),
        };
        pieces.into_iter().flat_map(gpt2_words).collect()
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<i64>) {
        let encoded: String = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
        let mut symbols: Vec<String> = encoded.chars().map(String::from).collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
                .min();
            let Some((_, i)) = best else { break };
            let right = symbols.remove(i + 1);
            symbols[i].push_str(&right);
        }
        for s in symbols {
            match self.id(&s) {
                Some(id) => ids.push(id),
                // llama.cpp's fallback for a symbol missing from the vocabulary: its
                // characters one by one, those that are tokens.
                None => ids.extend(s.chars().filter_map(|c| self.id(&c.to_string()))),
            }
        }
    }

    /// The text of token ids: their bytes, decoded as UTF-8 (invalid sequences replaced);
    /// control and unknown tokens are left out.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if self.is_special(id) {
                continue;
            }
            let token = &self.spec.tokens[id as usize];
            if self.spec.types[id as usize] == USER_DEFINED {
                bytes.extend(token.as_bytes());
                continue;
            }
            for c in token.chars() {
                match self.char_bytes.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => bytes.extend(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A token's text (its bytes as UTF-8, lossy): what a person reads for a piece.
    pub fn piece_text(&self, id: i64) -> String {
        self.decode(&[id])
    }
}

/// llama.cpp's character classes (`unicode_cpt_flags`): letters are the L categories,
/// numbers the N categories, whitespace its own list.
fn is_letter(c: char) -> bool {
    matches!(get_general_category(c), Gc::UppercaseLetter | Gc::LowercaseLetter | Gc::TitlecaseLetter | Gc::ModifierLetter | Gc::OtherLetter)
}

fn is_number(c: char) -> bool {
    matches!(get_general_category(c), Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber)
}

fn is_whitespace(c: char) -> bool {
    matches!(
        c as u32,
        0x09..=0x0d | 0x20 | 0x85 | 0xa0 | 0x1680 | 0x2000..=0x200a | 0x2028 | 0x2029 | 0x202f | 0x205f | 0x3000
    )
}

/// `\p{N}` as a splitting regex: every number character a piece, and the text between.
fn split_numbers(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_number(c) {
            if start < i {
                out.push(&text[start..i]);
            }
            out.push(&text[i..i + c.len_utf8()]);
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// GPT-2's regex over one piece, as llama.cpp's `unicode_regex_split_custom_gpt2` matches
/// it (positions past the piece's end are no character at all).
fn gpt2_words(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| if i < n { Some(chars[i].1) } else { None };
    let byte = |i: usize| if i < n { chars[i].0 } else { text.len() };
    let letter = |i: usize| at(i).is_some_and(is_letter);
    let number = |i: usize| at(i).is_some_and(is_number);
    let space = |i: usize| at(i).is_some_and(is_whitespace);
    let other = |i: usize| at(i).is_some_and(|c| !is_whitespace(c) && !is_letter(c) && !is_number(c));
    let mut words = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    let mut cut = |end: usize, start: &mut usize| {
        if end > *start {
            words.push(&text[byte(*start)..byte(end)]);
        }
        *start = end;
    };
    while pos < n {
        let c = chars[pos].1;
        if c == '\'' && pos + 1 < n {
            let next = chars[pos + 1].1;
            if matches!(next, 's' | 't' | 'm' | 'd') {
                pos += 2;
                cut(pos, &mut start);
                continue;
            }
            if pos + 2 < n && matches!((next, chars[pos + 2].1), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                pos += 3;
                cut(pos, &mut start);
                continue;
            }
        }
        let first = if c == ' ' { pos + 1 } else { pos };
        let class: Option<&dyn Fn(usize) -> bool> = if letter(first) {
            Some(&letter)
        } else if number(first) {
            Some(&number)
        } else if other(first) {
            Some(&other)
        } else {
            None
        };
        if let Some(class) = class {
            pos = first;
            while class(pos) {
                pos += 1;
            }
            cut(pos, &mut start);
            continue;
        }
        let mut spaces = 0;
        while space(pos + spaces) {
            spaces += 1;
        }
        if spaces > 1 && pos + spaces < n {
            // \s+(?!\S): the run but its last space, which joins the next word.
            pos += spaces - 1;
            cut(pos, &mut start);
            continue;
        }
        if spaces > 0 {
            pos += spaces;
            cut(pos, &mut start);
            continue;
        }
        pos += 1;
        cut(pos, &mut start);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, text: &str) -> Vec<&str> {
        let pieces = if pre == PreTokenizer::Smollm { split_numbers(text) } else { vec![text] };
        pieces.into_iter().flat_map(gpt2_words).collect()
    }

    #[test]
    fn gpt2_pretokenizer_splits_like_its_regex() {
        assert_eq!(words(PreTokenizer::Gpt2, "Hello world's  end!!  "), ["Hello", " world", "'s", " ", " end", "!!", "  "]);
        assert_eq!(words(PreTokenizer::Gpt2, "I've 123 cafés\n\nok"), ["I", "'ve", " 123", " cafés", "\n", "\n", "ok"]);
        assert_eq!(words(PreTokenizer::Smollm, "in 2024, 3.5x"), ["in", " ", "2", "0", "2", "4", ",", " ", "3", ".", "5", "x"]);
    }

    #[test]
    fn merges_apply_by_rank_and_bytes_round_trip() {
        let bytes = byte_chars();
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
        tokens.extend(bytes.iter().map(|c| c.to_string()));
        for t in ["he", "ll", "hell", "hello", "Ġw"] {
            tokens.push(t.into());
        }
        let mut types = vec![NORMAL; tokens.len()];
        types[0] = CONTROL;
        let spec = BpeSpec {
            tokens,
            types,
            merges: ["l l", "h e", "he ll", "hell o", "Ġ w"].map(String::from).to_vec(),
            pre: "smollm".into(),
            bos: None,
            eos: Some(0),
            add_bos: false,
        };
        let bpe = Bpe::new(spec).unwrap();
        let ids = bpe.encode("hello world 7 é😀");
        let pieces: Vec<&str> = ids.iter().map(|&i| bpe.spec.tokens[i as usize].as_str()).collect();
        assert_eq!(&pieces[..3], ["hello", "Ġw", "o"]);
        assert_eq!(bpe.decode(&ids), "hello world 7 é😀");
        assert_eq!(bpe.decode(&[0]), "", "control tokens are not text");
        assert_eq!(bpe.encode("<|endoftext|>").len(), 13, "control tokens written in text stay text");
    }
}
