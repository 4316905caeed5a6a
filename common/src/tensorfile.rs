//! safetensors files with the project's metadata: every file carries `format` (what it
//! holds, e.g. `poison.victim`) and `format_version`; readers check both before touching
//! the tensors. Files may be read from stdin and written to stdout (`-`).

use crate::io::{display_name, read_all, write_bytes};
use anyhow::{bail, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

pub const FORMAT_KEY: &str = "format";
pub const VERSION_KEY: &str = "format_version";

/// A file's tensors (by name, in name order) and its string metadata.
pub struct TensorFile {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, Tensor>,
    /// sha256 of the file's bytes.
    pub sha256: String,
}

impl TensorFile {
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(|s| s.as_str())
            .ok_or_else(|| anyhow::anyhow!("metadata key {key:?} missing"))
    }

    /// A JSON metadata value, or None when the key is absent (keys added after v1 files).
    pub fn meta_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.metadata
            .get(key)
            .map(|v| serde_json::from_str(v).map_err(|e| anyhow::anyhow!("metadata key {key:?} is not valid: {e}")))
            .transpose()
    }

    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| anyhow::anyhow!("tensor {name:?} missing"))
    }
}

fn to_dtype(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        k => bail!("cannot store tensors of kind {k:?}"),
    })
}

fn to_kind(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        d => bail!("tensors of dtype {d:?} are not supported"),
    })
}

/// Serialises tensors (moved to the CPU) with `format`/`format_version` and extra metadata.
///
/// Written here rather than with `safetensors::serialize`, whose metadata is a HashMap:
/// its random order would make two identical runs write different bytes. Here metadata
/// and tensors are in name order, so the same inputs and seed give byte-identical files.
/// The layout is the safetensors format (the crate reads it back, see `deserialize`).
pub fn serialize(
    format: &str,
    version: u32,
    tensors: &[(String, Tensor)],
    mut metadata: BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    metadata.insert(FORMAT_KEY.into(), format.into());
    metadata.insert(VERSION_KEY.into(), version.to_string());
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(&metadata)?);
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in sorted {
        if name == "__metadata__" {
            bail!("a tensor may not be called __metadata__");
        }
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let numel = t.numel();
        let dtype = to_dtype(t.kind())?;
        let start = data.len();
        data.resize(start + numel * t.kind().elt_size_in_bytes(), 0);
        t.copy_data_u8(&mut data[start..], numel);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut header_bytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The format pads the header with spaces to a multiple of 8 bytes.
    header_bytes.resize(header_bytes.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header_bytes.len() + data.len());
    out.extend((header_bytes.len() as u64).to_le_bytes());
    out.extend(header_bytes);
    out.extend(data);
    Ok(out)
}

/// Writes a tensor file atomically to `path` (or stdout for `-`).
pub fn write(
    path: &str,
    format: &str,
    version: u32,
    tensors: &[(String, Tensor)],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    crate::io::Output::refuse_terminal(path, format)?;
    let bytes = serialize(format, version, tensors, metadata)?;
    write_bytes(path, &bytes).with_context(|| format!("cannot write {}", display_name(path)))
}

/// Parses bytes as a tensor file of the expected format and version.
pub fn deserialize(bytes: &[u8], name: &str, format: &str, version: u32) -> Result<TensorFile> {
    if bytes.is_empty() {
        bail!("{name}: empty input where a {format} safetensors file was expected");
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        anyhow::anyhow!("{name}: not a readable safetensors file ({e}); was it truncated? regenerate it")
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes)?;
    let metadata: BTreeMap<String, String> =
        header.metadata().clone().unwrap_or_default().into_iter().collect();
    match metadata.get(FORMAT_KEY) {
        Some(f) if f == format => {}
        Some(f) => bail!("{name}: a {f:?} file where a {format:?} file was expected"),
        None => bail!("{name}: no {FORMAT_KEY:?} metadata; not a file made by this toolkit (expected {format:?})"),
    }
    match metadata.get(VERSION_KEY).map(|v| v.parse::<u32>()) {
        Some(Ok(v)) if v == version => {}
        Some(Ok(v)) => bail!(
            "{name}: {format} format version {v}, this build reads version {version}; regenerate the file with this build"
        ),
        _ => bail!("{name}: missing or malformed {VERSION_KEY:?} metadata"),
    }
    let mut tensors = BTreeMap::new();
    for (tname, view) in st.tensors() {
        let kind = to_kind(view.dtype()).with_context(|| format!("{name}: tensor {tname:?}"))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .with_context(|| format!("{name}: tensor {tname:?}"))?;
        tensors.insert(tname, t);
    }
    Ok(TensorFile { metadata, tensors, sha256: crate::io::sha256_hex(bytes) })
}

/// Reads a tensor file (or stdin for `-`) of the expected format and version. Files are
/// memory-mapped rather than read: nothing is allocated for the file itself, and the
/// header's shapes are validated against the file's length before any tensor is built.
pub fn read(path: &str, format: &str, version: u32) -> Result<TensorFile> {
    let file = match path {
        crate::io::STDIO => None,
        _ => Some(std::fs::File::open(path).with_context(|| format!("cannot open {path}"))?),
    };
    // Pipes, process substitutions and devices cannot be mapped: read those.
    let Some(file) = file.filter(|f| f.metadata().is_ok_and(|m| m.is_file())) else {
        return deserialize(&read_all(path)?, &display_name(path), format, version);
    };
    // SAFETY: mapped read-only; the toolkit replaces files by rename, never in place, so
    // the mapped bytes do not change under us.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {path}"))?;
    deserialize(&map, path, format, version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let ids = Tensor::from_slice(&[7i64, 8]);
        let mut meta = BTreeMap::new();
        meta.insert("seed".to_string(), "3".to_string());
        let bytes = serialize("test.thing", 2, &[("w".into(), t.shallow_clone()), ("ids".into(), ids)], meta).unwrap();
        let again = serialize("test.thing", 2, &[("ids".into(), Tensor::from_slice(&[7i64, 8])), ("w".into(), t.shallow_clone())], BTreeMap::from([("seed".to_string(), "3".to_string())])).unwrap();
        assert!(bytes == again, "serialisation is deterministic and independent of tensor order");
        let f = deserialize(&bytes, "mem", "test.thing", 2).unwrap();
        assert_eq!(f.meta("seed").unwrap(), "3");
        assert!(f.tensor("w").unwrap().equal(&t));
        assert_eq!(f.tensor("ids").unwrap().kind(), Kind::Int64);

        let e = deserialize(&bytes, "mem", "test.other", 2).err().unwrap().to_string();
        assert!(e.contains("\"test.thing\" file where a \"test.other\""), "{e}");
        let e = deserialize(&bytes, "mem", "test.thing", 3).err().unwrap().to_string();
        assert!(e.contains("format version 2"), "{e}");
        let e = deserialize(&bytes[..bytes.len() - 3], "mem", "test.thing", 2).err().unwrap().to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = deserialize(&[], "mem", "test.thing", 2).err().unwrap().to_string();
        assert!(e.contains("empty input"), "{e}");
    }
}
