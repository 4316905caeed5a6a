//! The embedding table: GloVe vectors for the top-N words plus every word of the data
//! that GloVe knows, with `<pad>` and `<unk>` in rows 0 and 1, saved as a
//! `poison.embeddings` safetensors file that carries its vocabulary.
//!
//! GloVe arrives (from scripts/import_data.py) as `words.txt` (one word per line) and the
//! package's float32 `.npy` matrix, which is memory-mapped: 80 MB are never read whole.

use crate::tensorfile;
use crate::tokenizer::{tokenize, Vocab, PAD, UNK};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use tch::Tensor;

pub const EMBEDDINGS_FORMAT: &str = "poison.embeddings";
pub const EMBEDDINGS_VERSION: u32 = 1;

/// Word vectors as read from GloVe: words in frequency order and a row-major matrix.
pub struct WordVectors {
    pub words: Vec<String>,
    pub dim: usize,
    rows: usize,
    mmap: memmap2::Mmap,
    data_offset: usize,
    /// Column-major storage (the GloVe package ships its matrix this way).
    fortran_order: bool,
}

impl WordVectors {
    /// Opens `words.txt` and a float32 C-order `.npy` of shape [words, dim].
    pub fn open(words_path: &Path, npy_path: &Path) -> Result<WordVectors> {
        let text = std::fs::read_to_string(words_path)
            .with_context(|| format!("cannot read {}", words_path.display()))?;
        let words: Vec<String> = text.lines().map(String::from).collect();
        let file = std::fs::File::open(npy_path).with_context(|| format!("cannot open {}", npy_path.display()))?;
        // SAFETY: the file is opened read-only and not modified while mapped.
        let mmap = unsafe { memmap2::Mmap::map(&file)? };
        let (rows, dim, data_offset, fortran_order) =
            parse_npy_header(&mmap).with_context(|| format!("{}: not a float32 [rows, dim] .npy", npy_path.display()))?;
        if rows != words.len() {
            bail!("{} has {rows} rows but {} lists {} words", npy_path.display(), words_path.display(), words.len());
        }
        let data_bytes = rows.checked_mul(dim).and_then(|n| n.checked_mul(4)).and_then(|n| n.checked_add(data_offset));
        if data_bytes.is_none_or(|end| mmap.len() < end) {
            bail!("{}: truncated (expected {} bytes of data)", npy_path.display(), rows * dim * 4);
        }
        Ok(WordVectors { words, dim, rows, mmap, data_offset, fortran_order })
    }

    pub fn row(&self, i: usize) -> Vec<f32> {
        let at = |k: usize| {
            let s = self.data_offset + 4 * k;
            f32::from_le_bytes([self.mmap[s], self.mmap[s + 1], self.mmap[s + 2], self.mmap[s + 3]])
        };
        if self.fortran_order {
            (0..self.dim).map(|j| at(j * self.rows + i)).collect()
        } else {
            (0..self.dim).map(|j| at(i * self.dim + j)).collect()
        }
    }
}

/// Parses a version 1/2/3 .npy header of a float32 matrix; returns (rows, cols, offset of
/// the data, whether it is stored in Fortran (column-major) order).
fn parse_npy_header(bytes: &[u8]) -> Result<(usize, usize, usize, bool)> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("no .npy magic");
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => bail!(".npy version {v} is not supported"),
    };
    let header = std::str::from_utf8(bytes.get(start..start + len).context("header truncated")?)?;
    if !header.contains("'descr': '<f4'") {
        bail!("expected little-endian float32, header is {header}");
    }
    let fortran_order = header.contains("'fortran_order': True");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .context("no shape in header")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<Result<_, _>>()?;
    if dims.len() != 2 {
        bail!("expected a 2-d array, shape is ({shape})");
    }
    Ok((dims[0], dims[1], start + len, fortran_order))
}

/// What `build` chose, for the log and the file's metadata.
pub struct BuildStats {
    pub top_n: usize,
    pub data_words: usize,
    pub data_words_added: usize,
    pub data_words_unknown: usize,
    /// A few of the unknown words, to spot tokenizer problems.
    pub unknown_sample: Vec<String>,
}

/// Builds the vocabulary (`<pad>`, `<unk>`, the `top_n` most frequent GloVe words, then
/// the data's and `extra` words that GloVe knows, in GloVe order) and its table.
/// Padding and unknown rows are zero.
pub fn build<'a>(
    vectors: &WordVectors,
    top_n: usize,
    texts: impl Iterator<Item = &'a str>,
    extra: &[String],
) -> (Vocab, Tensor, BuildStats) {
    let glove_index: HashMap<&str, usize> =
        vectors.words.iter().enumerate().map(|(i, w)| (w.as_str(), i)).collect();
    let mut data_words: HashSet<String> = texts.flat_map(tokenize).collect();
    data_words.extend(extra.iter().flat_map(|w| tokenize(w)));
    let top = top_n.min(vectors.words.len());
    let mut rows: Vec<usize> = (0..top).collect();
    let mut added: Vec<usize> = data_words
        .iter()
        .filter_map(|w| glove_index.get(w.as_str()).copied())
        .filter(|&i| i >= top)
        .collect();
    added.sort_unstable();
    let mut unknown: Vec<&String> = data_words.iter().filter(|w| !glove_index.contains_key(w.as_str())).collect();
    unknown.sort();
    let stats = BuildStats {
        top_n: top,
        data_words: data_words.len(),
        data_words_added: added.len(),
        data_words_unknown: unknown.len(),
        unknown_sample: unknown.iter().step_by((unknown.len() / 12).max(1)).take(12).map(|w| w.to_string()).collect(),
    };
    rows.extend(added);

    let dim = vectors.dim;
    let mut flat = vec![0f32; (rows.len() + 2) * dim];
    let mut words = vec![PAD.to_string(), UNK.to_string()];
    for (k, &r) in rows.iter().enumerate() {
        words.push(vectors.words[r].clone());
        flat[(k + 2) * dim..(k + 3) * dim].copy_from_slice(&vectors.row(r));
    }
    let table = Tensor::from_slice(&flat).view([(rows.len() + 2) as i64, dim as i64]);
    let vocab = Vocab::new(words).expect("GloVe words are unique and exclude <pad>/<unk>");
    (vocab, table, stats)
}

pub use crate::tokenizer::{BOS, EOS};

/// A table for a victim that learns its words from scratch (no pretrained vectors exist
/// for them here, e.g. German): every data word seen at least `min_count` times (most
/// frequent first, ties alphabetical) after `<pad>`, `<unk>`, `<s>` and `</s>`, plus
/// `extra` words, with rows drawn normal(0, 1/dim) by a generator seeded with `seed`
/// (`<pad>` zero). The victim trains them (`--train-embeddings`).
pub fn scratch<'a>(texts: impl Iterator<Item = &'a str>, min_count: usize, extra: &[String], dim: usize, seed: u64) -> (Vocab, Tensor) {
    use rand::{Rng, SeedableRng};
    let mut counts: HashMap<String, usize> = HashMap::new();
    for t in texts {
        for w in tokenize(t) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut kept: Vec<(String, usize)> = counts.into_iter().filter(|(_, c)| *c >= min_count).collect();
    kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut words: Vec<String> = [PAD, UNK, BOS, EOS].iter().map(|w| w.to_string()).collect();
    let mut seen: HashSet<String> = words.iter().cloned().collect();
    for w in kept.into_iter().map(|(w, _)| w).chain(extra.iter().flat_map(|e| tokenize(e))) {
        if seen.insert(w.clone()) {
            words.push(w);
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Box–Muller, in f64 then rounded: the same bits wherever rand's uniform draws are.
    let sd = 1.0 / (dim as f64).sqrt();
    let mut flat: Vec<f32> = (0..words.len() * dim)
        .map(|_| {
            let (u, v): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
            (sd * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    flat[..dim].iter_mut().for_each(|x| *x = 0.0);
    let table = Tensor::from_slice(&flat).view([words.len() as i64, dim as i64]);
    (Vocab::new(words).expect("unique words after <pad> and <unk>"), table)
}

/// Writes the vocabulary and table as a `poison.embeddings` file.
pub fn save(path: &str, vocab: &Vocab, table: &Tensor, mut metadata: BTreeMap<String, String>) -> Result<()> {
    metadata.insert("vocab".into(), serde_json::to_string(vocab.words())?);
    metadata.insert("vocab_sha256".into(), vocab.sha256());
    tensorfile::write(path, EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION, &[("embedding".into(), table.shallow_clone())], metadata)
}

/// Reads a `poison.embeddings` file: its vocabulary and table [vocab, dim].
pub fn load(path: &str) -> Result<(Vocab, Tensor)> {
    let name = crate::io::display_name(path);
    let file = tensorfile::read(path, EMBEDDINGS_FORMAT, EMBEDDINGS_VERSION)?;
    let words: Vec<String> = serde_json::from_str(file.meta("vocab")?).with_context(|| format!("{name}: vocabulary"))?;
    let vocab = Vocab::new(words).with_context(|| format!("{name}: vocabulary"))?;
    if vocab.sha256() != file.meta("vocab_sha256")? {
        bail!("{name}: the vocabulary does not match its recorded sha256; the file is corrupt, rebuild it with build-vocab");
    }
    let table = file.tensor("embedding")?.shallow_clone();
    if table.dim() != 2 || table.size()[0] != vocab.len() as i64 {
        bail!("{name}: table shape {:?} does not match the {} vocabulary words; the file is corrupt, rebuild it with build-vocab", table.size(), vocab.len());
    }
    if !bool::try_from(table.isfinite().all())? {
        bail!("{name}: the embedding table holds NaN or Inf; rebuild it with build-vocab");
    }
    Ok((vocab, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_parsed_and_checked() {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
        let pad = 64 - (10 + header.len() + 1) % 64;
        let h = format!("{header}{}\n", " ".repeat(pad));
        bytes.extend((h.len() as u16).to_le_bytes());
        bytes.extend(h.as_bytes());
        assert_eq!(parse_npy_header(&bytes).unwrap(), (3, 2, bytes.len(), false));
        let bad = String::from_utf8_lossy(&bytes).replace("<f4", "<f8");
        assert!(parse_npy_header(bad.as_bytes()).is_err());
        assert!(parse_npy_header(b"not an npy file").is_err());
    }
}
