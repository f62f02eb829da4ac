//! Checkpoints: everything needed to continue a run bit for bit, written atomically.
//!
//! A checkpoint file `ckpt-STEP.rtck` holds:
//!
//! ```text
//! "RTCKPT01" | header length (u32 LE) | header (JSON) | f32 data (LE) | blake3 (32 bytes)
//! ```
//!
//! The header names the step, the epoch and the position within it, the configuration
//! fingerprint the run was started with, and each buffer's name and length: the parameters,
//! then the optimizer's buffers. The data order needs no saved random state: each epoch's
//! shuffle is derived from the seed and the epoch number alone, so (epoch, position) is the
//! whole state of the sampler. The trailing blake3 hash covers everything before it; a file
//! whose hash does not match, or that is cut short, is skipped with a warning.
//!
//! A write goes to a temporary file in the same directory, is flushed to disk, renamed into
//! place and the directory is flushed too, so a crash leaves either the old set of
//! checkpoints or the new one, never a partial file under a checkpoint's name.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

const MAGIC: &[u8; 8] = b"RTCKPT01";
const SUFFIX: &str = ".rtck";
/// Headers beyond this size are refused before anything is allocated for them.
const MAX_HEADER: usize = 1 << 20;

/// Why a checkpoint could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a whole, intact checkpoint.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint belongs to a differently configured run.
    #[error(
        "{path} was written by a run with other settings ({fields}); resume with the \
         settings it was written with, or start without --resume in another directory"
    )]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// `name: checkpoint X, now Y` for each differing setting.
        fields: String,
    },
}

/// The header of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Optimizer steps completed.
    pub step: u64,
    /// The epoch the next step belongs to.
    pub epoch: u64,
    /// The next step's position within its epoch.
    pub position: u64,
    /// The optimizer's step count.
    pub optimizer_steps: u64,
    /// The run's configuration fingerprint (settings that must match to resume).
    pub fingerprint: BTreeMap<String, String>,
    /// Buffer names and lengths, in file order; the first is `params`.
    pub buffers: Vec<(String, usize)>,
}

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The header.
    pub header: Header,
    /// The buffers, in the header's order.
    pub buffers: Vec<(String, Vec<f32>)>,
}

impl Checkpoint {
    /// The parameters (the first buffer).
    pub fn params(&self) -> &[f32] {
        &self.buffers[0].1
    }

    /// A short digest of the whole file content, for the handshake.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&encode_body(self));
        h.finalize().to_hex()[..16].to_string()
    }
}

fn encode_body(ck: &Checkpoint) -> Vec<u8> {
    let header = serde_json::to_vec(&ck.header).expect("a checkpoint header always serializes");
    let values: usize = ck.buffers.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(12 + header.len() + 4 * values + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, b) in &ck.buffers {
        for v in b {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// The file name of the checkpoint after `step` steps.
pub fn file_name(step: u64) -> String {
    format!("ckpt-{step:010}{SUFFIX}")
}

/// Writes `ck` into `dir` atomically and keeps only the newest `keep` checkpoints there.
pub fn write(dir: &Path, ck: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bytes = encode_body(ck);
    let hash = blake3::hash(&bytes);
    bytes.extend_from_slice(hash.as_bytes());

    let path = dir.join(file_name(ck.header.step));
    let tmp = dir.join(format!(".{}.tmp", file_name(ck.header.step)));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    info!(path = %path.display(), step = ck.header.step, "checkpoint written");

    prune(dir, keep)?;
    Ok(path)
}

/// Checkpoint files in `dir`, newest (highest step) first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name
                .strip_prefix("ckpt-")?
                .strip_suffix(SUFFIX)?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    for old in list(dir)?.into_iter().skip(keep.max(1)) {
        if let Err(e) = fs::remove_file(&old) {
            warn!(path = %old.display(), "could not remove an old checkpoint: {e}");
        }
    }
    Ok(())
}

/// Reads and verifies one checkpoint file.
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(&bytes).map_err(|reason| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    })
}

fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..8] != MAGIC {
        return Err("not a ringtrain checkpoint (bad magic or too short)".into());
    }
    let (body, hash) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != hash {
        return Err("checksum mismatch: the file is damaged or was cut short".into());
    }
    let header_len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    if header_len > MAX_HEADER || 12 + header_len > body.len() {
        return Err(format!("header length {header_len} does not fit the file"));
    }
    let header: Header = serde_json::from_slice(&body[12..12 + header_len])
        .map_err(|e| format!("unreadable header: {e}"))?;
    let data = &body[12 + header_len..];
    let values: usize = header.buffers.iter().map(|(_, n)| n).sum();
    if header.buffers.first().map(|(n, _)| n.as_str()) != Some("params")
        || values.checked_mul(4) != Some(data.len())
    {
        return Err(format!(
            "header lists {values} values, the file holds {} bytes",
            data.len()
        ));
    }
    let mut rest = data;
    let mut buffers = Vec::with_capacity(header.buffers.len());
    for (name, n) in &header.buffers {
        let (this, next) = rest.split_at(4 * n);
        let vals = this
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        buffers.push((name.clone(), vals.collect()));
        rest = next;
    }
    Ok(Checkpoint { header, buffers })
}

/// The newest intact checkpoint in `dir`; damaged ones are skipped with a warning naming
/// them. `None` when there is none.
pub fn newest_valid(dir: &Path) -> Result<Option<(PathBuf, Checkpoint)>, CheckpointError> {
    for path in list(dir)? {
        match read(&path) {
            Ok(ck) => return Ok(Some((path, ck))),
            Err(e) => warn!("skipping a damaged checkpoint: {e}"),
        }
    }
    Ok(None)
}

/// Checks that `ck` was written with the same settings as `now` describes.
pub fn check_compatible(
    path: &Path,
    ck: &Checkpoint,
    now: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut diffs = Vec::new();
    for (key, value) in now {
        let theirs = ck
            .header
            .fingerprint
            .get(key)
            .map_or("(absent)", String::as_str);
        if theirs != value {
            diffs.push(format!("{key}: checkpoint {theirs}, now {value}"));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let fields = diffs.join("; ");
    Err(CheckpointError::Incompatible {
        path: path.to_path_buf(),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        let fingerprint = BTreeMap::from([("seed".to_string(), "7".to_string())]);
        Checkpoint {
            header: Header {
                step,
                epoch: 1,
                position: 3,
                optimizer_steps: step,
                fingerprint,
                buffers: vec![("params".into(), 3), ("momentum".into(), 3)],
            },
            buffers: vec![
                ("params".into(), vec![1.0, -2.5, f32::MIN_POSITIVE]),
                ("momentum".into(), vec![0.0, 0.5, -0.0]),
            ],
        }
    }

    #[test]
    fn write_then_read_gives_the_same_bits_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in [10, 20, 30, 40] {
            write(dir.path(), &sample(step), 2).unwrap();
        }
        let names: Vec<String> = list(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![file_name(40), file_name(30)]);
        let (path, ck) = newest_valid(dir.path()).unwrap().unwrap();
        assert_eq!(path, dir.path().join(file_name(40)));
        assert_eq!(ck, sample(40));
        let leftovers = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 2, "no temporary files remain");
    }

    #[test]
    fn a_flipped_byte_or_a_cut_file_is_skipped_for_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        for step in [1, 2, 3] {
            write(dir.path(), &sample(step), 5).unwrap();
        }
        let newest = dir.path().join(file_name(3));
        let mut bytes = fs::read(&newest).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&newest, &bytes).unwrap();
        let middle = dir.path().join(file_name(2));
        let bytes = fs::read(&middle).unwrap();
        fs::write(&middle, &bytes[..bytes.len() - 7]).unwrap();

        let err = read(&newest).unwrap_err().to_string();
        assert!(
            err.contains(&file_name(3)) && err.contains("checksum"),
            "{err}"
        );
        let (path, ck) = newest_valid(dir.path()).unwrap().unwrap();
        assert_eq!((path, ck.header.step), (dir.path().join(file_name(1)), 1));
    }

    #[test]
    fn a_checkpoint_of_other_settings_is_refused_with_the_fields() {
        let now = BTreeMap::from([("seed".to_string(), "8".to_string())]);
        let err = check_compatible(Path::new("c.rtck"), &sample(1), &now).unwrap_err();
        assert!(
            err.to_string().contains("seed: checkpoint 7, now 8"),
            "{err}"
        );
    }

    #[test]
    fn an_empty_or_missing_directory_has_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert!(newest_valid(dir.path()).unwrap().is_none());
        assert!(newest_valid(&dir.path().join("absent")).unwrap().is_none());
        fs::write(dir.path().join(file_name(5)), b"RTCKPT01").unwrap();
        assert!(newest_valid(dir.path()).unwrap().is_none());
    }
}
