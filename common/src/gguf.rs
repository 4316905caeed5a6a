//! GGUF, llama.cpp's checkpoint format (versions 2 and 3), read from a memory map: the
//! header, the metadata (typed key-value pairs), the tensor table and the aligned data
//! section. Tensors dequantize to f32 from F32, F16, BF16, F64, Q8_0, Q4_0 and Q4_1; every
//! other type (the K-quants, the IQ types, ...) is refused by its name.
//!
//! Written against llama.cpp's `gguf.cpp` and `ggml-quants.c` (block layouts) and checked
//! against the `gguf` Python package's dequantization (fixtures/llama, made by
//! scripts/make_llama_fixtures.py). Every read is bounds-checked, so a truncated or
//! corrupt file is an error that names the file and what is missing, never a crash.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Elements per block of the Q4_0, Q4_1 and Q8_0 types.
const QK: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// An integer value of any width, if it is one and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The ggml tensor types by their numbers (ggml.h), with the ones this reader dequantizes.
const TYPE_NAMES: &[(u32, &str)] = &[
    (0, "F32"), (1, "F16"), (2, "Q4_0"), (3, "Q4_1"), (6, "Q5_0"), (7, "Q5_1"), (8, "Q8_0"), (9, "Q8_1"),
    (10, "Q2_K"), (11, "Q3_K"), (12, "Q4_K"), (13, "Q5_K"), (14, "Q6_K"), (15, "Q8_K"), (16, "IQ2_XXS"),
    (17, "IQ2_XS"), (18, "IQ3_XXS"), (19, "IQ1_S"), (20, "IQ4_NL"), (21, "IQ3_S"), (22, "IQ2_S"), (23, "IQ4_XS"),
    (24, "I8"), (25, "I16"), (26, "I32"), (27, "I64"), (28, "F64"), (29, "IQ1_M"), (30, "BF16"), (34, "TQ1_0"),
    (35, "TQ2_0"), (39, "MXFP4"),
];

/// A tensor type this reader dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Bf16,
    F64,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl TensorType {
    fn from_code(code: u32) -> Result<TensorType, String> {
        Ok(match code {
            0 => TensorType::F32,
            1 => TensorType::F16,
            30 => TensorType::Bf16,
            28 => TensorType::F64,
            8 => TensorType::Q8_0,
            2 => TensorType::Q4_0,
            3 => TensorType::Q4_1,
            other => return Err(type_name(other)),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::Bf16 => "BF16",
            TensorType::F64 => "F64",
            TensorType::Q8_0 => "Q8_0",
            TensorType::Q4_0 => "Q4_0",
            TensorType::Q4_1 => "Q4_1",
        }
    }

    /// (elements, bytes) of one block: 1 element for the float types.
    fn block(self) -> (usize, usize) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 | TensorType::Bf16 => (1, 2),
            TensorType::F64 => (1, 8),
            TensorType::Q8_0 => (QK, 2 + QK),
            TensorType::Q4_0 => (QK, 2 + QK / 2),
            TensorType::Q4_1 => (QK, 4 + QK / 2),
        }
    }
}

fn type_name(code: u32) -> String {
    TYPE_NAMES.iter().find(|(c, _)| *c == code).map_or(format!("type number {code}"), |(_, n)| n.to_string())
}

/// One entry of the tensor table. `dims` are in ggml's order (the first is the row
/// length); the row-major shape is their reverse.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// The type's code as the file stores it (`kind` holds it if it can be read).
    pub code: u32,
    kind: Result<TensorType, String>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The row-major shape (ggml's dims reversed): `[rows, row length]` for a matrix.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The type's name (also for types this reader cannot dequantize).
    pub fn type_name(&self) -> String {
        type_name(self.code)
    }

    fn byte_len(&self, kind: TensorType) -> Result<u64> {
        let (elements, bytes) = kind.block();
        let row = self.dims.first().copied().unwrap_or(1);
        if row % elements as u64 != 0 {
            bail!("tensor {:?}: rows of {row} elements are not whole {}-element {} blocks", self.name, elements, kind.name());
        }
        Ok(self.numel() / elements as u64 * bytes as u64)
    }
}

/// A GGUF file: its metadata and tensor table over the mapped bytes.
pub struct Gguf {
    path: String,
    map: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_start: u64,
}

/// Bounds-checked little-endian reads from the mapped bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("the file ends at byte {} inside {what} (it needs {n} more bytes at byte {}): the file is truncated; fetch it again", self.bytes.len(), self.at);
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    /// A count that must fit in what is left of the file (each element at least `min`
    /// bytes), so a corrupt count is refused before anything is allocated for it.
    fn count(&mut self, min: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min as u64) > left {
            bail!("{what} says {n} entries, more than the {left} bytes left in the file hold: the file is truncated or corrupt");
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, code: u32, key: &str) -> Result<Value> {
        let what = &format!("the value of {key:?}");
        let b = |c: &mut Self, n| c.take(n, what);
        Ok(match code {
            0 => Value::U8(b(self, 1)?[0]),
            1 => Value::I8(b(self, 1)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(b(self, 2)?.try_into()?)),
            3 => Value::I16(i16::from_le_bytes(b(self, 2)?.try_into()?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(b(self, 4)?.try_into()?)),
            6 => Value::F32(f32::from_le_bytes(b(self, 4)?.try_into()?)),
            7 => Value::Bool(b(self, 1)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                let item = self.u32(what)?;
                if item == 9 {
                    bail!("{what}: arrays of arrays are not supported");
                }
                let n = self.count(1, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(b(self, 8)?.try_into()?)),
            12 => Value::F64(f64::from_le_bytes(b(self, 8)?.try_into()?)),
            other => bail!("{what} has value type {other}, which GGUF does not define: the file is corrupt"),
        })
    }
}

impl Gguf {
    /// Opens and parses `path` (the tensors are read when asked for).
    pub fn open(path: &str) -> Result<Gguf> {
        Self::parse(path).with_context(|| format!("{path}: not a readable GGUF file"))
    }

    fn parse(path: &str) -> Result<Gguf> {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?;
        // SAFETY: the map is read-only and the file is not written while it is open; a
        // file changed underneath would give wrong weights, not undefined behaviour in
        // the bounds-checked reads below.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {path}"))?;
        let mut c = Cursor { bytes: &map, at: 0 };
        if c.take(4, "the magic number")? != MAGIC {
            bail!("it does not start with the GGUF magic number");
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version}; this reader takes versions 2 and 3 (convert the model again with a current llama.cpp)");
        }
        let n_tensors = c.count(8, "the tensor count")?;
        let n_kv = c.count(12, "the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("a metadata key")?;
            let code = c.u32(&format!("the type of {key:?}"))?;
            let value = c.value(code, &key)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("a tensor name")?;
            let what = format!("the entry of tensor {name:?}");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                bail!("tensor {name:?} has {n_dims} dimensions (GGUF allows 1 to 4): the file is corrupt");
            }
            let dims = (0..n_dims).map(|_| c.u64(&what)).collect::<Result<Vec<u64>>>()?;
            let code = c.u32(&what)?;
            let offset = c.u64(&what)?;
            tensors.push(TensorInfo { kind: TensorType::from_code(code), name, dims, code, offset });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).with_context(|| format!("general.alignment {v:?} is not a power of two"))?,
        };
        let data_start = (c.at as u64).div_ceil(alignment) * alignment;
        let gguf = Gguf { path: path.to_string(), version, metadata, tensors, data_start, map };
        for t in &gguf.tensors {
            if t.offset % alignment != 0 {
                bail!("tensor {:?} starts at offset {}, not a multiple of the alignment {alignment}: the file is corrupt", t.name, t.offset);
            }
            if let Ok(kind) = t.kind {
                gguf.span(t, kind)?;
            }
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).with_context(|| format!("{}: the metadata lacks {key:?}", self.path))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64().with_context(|| format!("{}: {key:?} is {v:?}, not a non-negative integer", self.path))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().with_context(|| format!("{}: {key:?} is {v:?}, not a number", self.path))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().with_context(|| format!("{}: {key:?} is {v:?}, not a string", self.path))
    }

    /// A string array (the tokenizer's tokens and merges).
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key)?;
        let bad = || format!("{}: {key:?} is not an array of strings", self.path);
        v.as_array().with_context(bad)?.iter().map(|s| s.as_str().with_context(bad)).collect()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The byte range of a tensor's data, checked against the file's length.
    fn span(&self, t: &TensorInfo, kind: TensorType) -> Result<std::ops::Range<usize>> {
        let start = self.data_start.checked_add(t.offset);
        let len = t.byte_len(kind)?;
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.map.len() as u64 => Ok(s as usize..e as usize),
            _ => bail!(
                "tensor {:?} ({} {:?}) needs bytes up to {}, the file has {}: the file is truncated; fetch it again",
                t.name,
                kind.name(),
                t.dims,
                end.map_or("beyond 2^64".into(), |e| e.to_string()),
                self.map.len()
            ),
        }
    }

    /// A tensor dequantized to f32, in row-major order (shape `TensorInfo::shape`).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor_info(name).with_context(|| format!("{}: no tensor {name:?}", self.path))?;
        let kind = match &t.kind {
            Ok(k) => *k,
            Err(type_name) => bail!(
                "{}: tensor {name:?} is {type_name}, which this reader does not dequantize (it reads F32, F16, BF16, F64, Q8_0, Q4_0 and Q4_1); requantize the model to one of those, e.g. with llama.cpp's llama-quantize ... Q8_0",
                self.path
            ),
        };
        let bytes = &self.map[self.span(t, kind)?];
        Ok(dequantize(kind, bytes))
    }
}

/// IEEE half precision to f32, exactly (every f16 is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise the mantissa.
            let shift = m.leading_zeros() - 21; // bits to move the leading 1 to bit 10
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Dequantizes whole blocks of `kind` (ggml-quants.c's `dequantize_row_*`; the products
/// and sums in f32, as the `gguf` package computes them).
pub fn dequantize(kind: TensorType, bytes: &[u8]) -> Vec<f32> {
    let (per, size) = kind.block();
    let mut out = Vec::with_capacity(bytes.len() / size * per);
    for b in bytes.chunks_exact(size) {
        match kind {
            TensorType::F32 => out.push(f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            TensorType::F16 => out.push(f16_at(b, 0)),
            TensorType::Bf16 => out.push(f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)),
            TensorType::F64 => out.push(f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
            TensorType::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| (q as i8) as f32 * d));
            }
            TensorType::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            TensorType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_convert_exactly_as_libtorch_does() {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = all.iter().flat_map(|h| h.to_le_bytes()).collect();
        let torch = tch::Tensor::from_data_size(&bytes, &[all.len() as i64], tch::Kind::Half).to_kind(tch::Kind::Float);
        let torch: Vec<f32> = Vec::try_from(torch).unwrap();
        for (h, t) in all.iter().zip(torch) {
            let ours = f16_to_f32(*h);
            assert!(ours.to_bits() == t.to_bits() || (ours.is_nan() && t.is_nan()), "f16 {h:#06x}: {ours} against libtorch's {t}");
        }
    }

    #[test]
    fn quantized_blocks_dequantize_as_ggml_defines_them() {
        // d = 0.5 (f16 0x3800), m = -1 (f16 0xbc00).
        let mut q8 = vec![0x00, 0x38];
        q8.extend((0..32).map(|i: i32| (i - 16) as i8 as u8));
        let x = dequantize(TensorType::Q8_0, &q8);
        assert_eq!(x.len(), 32);
        assert_eq!((x[0], x[16], x[31]), (-8.0, 0.0, 7.5));

        let mut q4 = vec![0x00, 0x38];
        q4.extend((0..16).map(|i: u8| i | ((15 - i) << 4)));
        let x = dequantize(TensorType::Q4_0, &q4);
        assert_eq!((x[0], x[15], x[16], x[31]), (-4.0, 3.5, 3.5, -4.0), "low nibbles first, then high, minus 8");

        let mut q41 = vec![0x00, 0x38, 0x00, 0xbc];
        q41.extend((0..16).map(|i: u8| i | ((15 - i) << 4)));
        let x = dequantize(TensorType::Q4_1, &q41);
        assert_eq!((x[0], x[15], x[16], x[31]), (-1.0, 6.5, 6.5, -1.0), "d·q + m");

        assert_eq!(dequantize(TensorType::Bf16, &[0x80, 0x3f, 0x00, 0xc0]), vec![1.0, -2.0]);
    }
}
