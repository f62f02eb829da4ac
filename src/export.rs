//! `--save FILE.safetensors`: the final weights in the safetensors format, which numpy
//! (`safetensors.numpy.load_file`) and PyTorch (`safetensors.torch.load_file`) read.
//!
//! The file is an 8-byte little-endian header length `n`, `n` bytes of JSON, then the raw
//! data. The JSON maps each tensor name to `{"dtype": "F32", "shape": [...],
//! "data_offsets": [begin, end]}` (byte offsets into the data, which follows the header),
//! plus a `__metadata__` map of strings. The header is padded with spaces to a multiple of
//! 8 bytes so the data is aligned.
//!
//! Tensors are named and shaped as [`Mlp::tensors`] says, and stored in that order, so the
//! data section is the flat parameter buffer byte for byte (its blake3 is the summary's
//! `param_digest`). Weights are `[in, out]`: a layer computes `x @ W + b`, so
//! `layers.{l}.weight` is the **transpose** of a PyTorch `nn.Linear` weight (`[out, in]`);
//! `__metadata__` says so too.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::model::Mlp;

/// Why the weights could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The buffer does not match the model (a bug, not a user error).
    #[error("cannot save {len} parameters for a model of {expected}; this is a bug in ringtrain")]
    Length {
        /// The buffer's length.
        len: usize,
        /// The model's parameter count.
        expected: usize,
    },
    /// Writing the file failed.
    #[error("cannot write the weights to {} (check that its directory exists and is writable)", .path.display())]
    Write {
        /// The --save path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The safetensors header for `model`'s tensors, with `metadata`, padded with spaces to a
/// multiple of 8 bytes.
pub fn header(model: &Mlp, metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), json!(metadata));
    for (name, offset, shape) in model.tensors() {
        let len: usize = shape.iter().product();
        let (begin, end) = (4 * offset, 4 * (offset + len));
        let entry = json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, end]});
        map.insert(name, entry);
    }
    let mut bytes = serde_json::to_vec(&Value::Object(map)).expect("a header always serializes");
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    bytes
}

/// The metadata ringtrain writes: what produced the file, the layer sizes, the layout
/// and the parameter digest.
pub fn metadata(model: &Mlp, params: &[f32]) -> BTreeMap<String, String> {
    let layers: Vec<String> = model.layers().iter().map(usize::to_string).collect();
    let mut m = BTreeMap::new();
    m.insert(
        "producer".into(),
        format!("ringtrain {}", env!("CARGO_PKG_VERSION")),
    );
    m.insert("layers".into(), layers.join(","));
    m.insert(
        "layout".into(),
        "layers.{l}.weight is [in, out] (y = x @ W + b, ReLU between layers): transpose it \
         for torch.nn.Linear.weight, which is [out, in]"
            .into(),
    );
    m.insert(
        "param_digest".into(),
        crate::train::param_digest(params).to_hex().to_string(),
    );
    m
}

/// The whole file for `model` with parameters `params` (laid out as [`Mlp::tensors`]).
pub fn to_bytes(model: &Mlp, params: &[f32]) -> Result<Vec<u8>, ExportError> {
    if params.len() != model.param_len() {
        return Err(ExportError::Length {
            len: params.len(),
            expected: model.param_len(),
        });
    }
    let header = header(model, &metadata(model, params));
    let mut out = Vec::with_capacity(8 + header.len() + 4 * params.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for p in params {
        out.extend_from_slice(&p.to_le_bytes());
    }
    Ok(out)
}

/// Fails unless `path`'s directory exists, so that a run learns before training, not
/// after, that it could not save.
pub fn check_destination(path: &Path) -> Result<(), ExportError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        return Ok(());
    }
    Err(ExportError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
    })
}

/// Writes `params` to `path` as safetensors. The file appears whole or not at all: it is
/// written beside `path` as `NAME.tmp-PID`, then renamed.
pub fn save(path: &Path, model: &Mlp, params: &[f32]) -> Result<(), ExportError> {
    let bytes = to_bytes(model, params)?;
    let write_err = |source| ExportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_all()
    });
    match written.and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(write_err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_length_header_data() {
        let model = Mlp::new(3, &[2], 4);
        let params: Vec<f32> = (0..model.param_len())
            .map(|i| i as f32 * 0.5 - 3.0)
            .collect();
        let bytes = to_bytes(&model, &params).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "the header is padded to 8 bytes");
        assert_eq!(bytes.len(), 8 + n + 4 * params.len());
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["layers.0.weight"]["shape"], json!([3, 2]));
        assert_eq!(header["layers.0.weight"]["data_offsets"], json!([0, 24]));
        assert_eq!(header["layers.1.bias"]["data_offsets"], json!([64, 80]));
        assert_eq!(header["__metadata__"]["layers"], "3,2,4");
        let data = &bytes[8 + n..];
        assert_eq!(data[..4], (-3.0f32).to_le_bytes());
    }

    #[test]
    fn a_wrong_length_is_refused() {
        let model = Mlp::new(3, &[], 2);
        let err = to_bytes(&model, &[0.0; 3]).unwrap_err();
        assert!(err.to_string().contains("model of 8"), "{err}");
    }

    #[test]
    fn save_names_an_unwritable_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("w.safetensors");
        let early = check_destination(&path).unwrap_err().to_string();
        assert!(early.contains("w.safetensors"), "{early}");
        check_destination(&dir.path().join("w.safetensors")).unwrap();
        check_destination(Path::new("w.safetensors")).unwrap();
        let model = Mlp::new(2, &[], 2);
        let err = save(&path, &model, &[0.0; 6]).unwrap_err().to_string();
        assert!(err.contains("w.safetensors"), "{err}");
    }
}
