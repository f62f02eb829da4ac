//! `--timeline FILE`: what each rank did when, as Chrome trace-event JSON.
//!
//! A [`Timeline`] is a cheap handle shared by the training loop and the communication
//! thread. Disabled (the default, and whenever `--timeline` is absent) it holds nothing:
//! every method returns at once without reading the clock or allocating. Enabled, each
//! finished span is pushed into one vector behind a mutex: a lock and a push per event,
//! a handful of events per step.
//!
//! # The file
//!
//! [`Timeline::write`] writes `{"traceEvents": [...]}` as Perfetto and chrome://tracing
//! read it: complete events (`"ph": "X"`) with `ts` and `dur` in microseconds, `pid` = the
//! rank, and one `tid` per [`Track`]. Timestamps count from the Unix epoch, so the files of
//! ranks on different machines line up as well as their clocks do. Every rank writes its
//! own file, named by [`rank_path`] (`trace.json` → `trace.rank0.json`); [`merge`] joins
//! them into one, which `ringtrain launch --timeline FILE` does for its ranks.
//!
//! | track (tid) | spans |
//! |---|---|
//! | 0 `train loop` | `forward/backward`, `all-reduce` (as the loop waits for it), `optimizer`, `digest check` |
//! | 1 `ring` | `reduce-scatter`, `all-gather`, `broadcast`, with bytes sent and received |
//! | 2 `wait` | `wait for neighbour`: the receiver waiting for the previous rank's next frame |

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The rows of one rank in the trace viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// The training loop's thread.
    Train,
    /// The collective's phases on the communication thread.
    Ring,
    /// Waiting for frames from the previous rank.
    Wait,
}

impl Track {
    const ALL: [Track; 3] = [Track::Train, Track::Ring, Track::Wait];

    fn tid(self) -> u32 {
        match self {
            Track::Train => 0,
            Track::Ring => 1,
            Track::Wait => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Track::Train => "train loop",
            Track::Ring => "ring",
            Track::Wait => "wait",
        }
    }
}

/// Numeric arguments of a span (bytes, peer rank, step), shown when a span is selected.
/// Callers pass a slice on the stack; it is copied only when the timeline records.
pub type Args<'a> = &'a [(&'static str, u64)];

#[derive(Debug)]
struct Event {
    track: Track,
    name: &'static str,
    start: Instant,
    end: Instant,
    args: Vec<(&'static str, u64)>,
}

#[derive(Debug)]
struct Inner {
    rank: usize,
    origin: Instant,
    origin_unix_us: f64,
    events: Mutex<Vec<Event>>,
}

/// A handle on one rank's timeline; clones share it. See the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct Timeline(Option<Arc<Inner>>);

/// Why a timeline file could not be written or merged.
#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    /// Writing a file failed.
    #[error("cannot write the timeline {} (check that its directory exists and is writable)", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading a rank's file failed.
    #[error("cannot read the timeline {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A rank's file is not trace-event JSON.
    #[error("{} is not a trace-event JSON file: {detail}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

impl Timeline {
    /// A timeline that records nothing.
    pub fn disabled() -> Timeline {
        Timeline(None)
    }

    /// A recording timeline for `rank`, its clock starting now.
    pub fn enabled(rank: usize) -> Timeline {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Timeline(Some(Arc::new(Inner {
            rank,
            origin: Instant::now(),
            origin_unix_us: unix.as_secs_f64() * 1e6,
            events: Mutex::new(Vec::new()),
        })))
    }

    /// Whether spans are recorded.
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The current time when recording, `None` (without reading the clock) otherwise; pass
    /// it to [`Timeline::span`] when the span ends.
    pub fn now(&self) -> Option<Instant> {
        self.0.as_ref().map(|_| Instant::now())
    }

    /// Records a span from `start` (from [`Timeline::now`]) until now. Does nothing when
    /// `start` is `None`.
    pub fn span(&self, track: Track, name: &'static str, start: Option<Instant>, args: Args<'_>) {
        if let Some(start) = start {
            self.span_between(track, name, start, Instant::now(), args);
        }
    }

    /// Records a span between two instants; does nothing when disabled.
    pub fn span_between(
        &self,
        track: Track,
        name: &'static str,
        start: Instant,
        end: Instant,
        args: Args<'_>,
    ) {
        let Some(inner) = &self.0 else { return };
        let event = Event {
            track,
            name,
            start,
            end,
            args: args.to_vec(),
        };
        // A poisoned lock only means another thread panicked mid-push; the data is fine.
        let mut events = inner.events.lock().unwrap_or_else(|p| p.into_inner());
        events.push(event);
    }

    /// Number of spans recorded so far.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |inner| {
            inner.events.lock().unwrap_or_else(|p| p.into_inner()).len()
        })
    }

    /// Whether no span has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The recorded spans as trace-event JSON (`{"traceEvents": [...]}`), metadata first.
    /// `None` when disabled.
    pub fn to_json(&self) -> Option<Value> {
        let inner = self.0.as_ref()?;
        let pid = inner.rank;
        let mut out = vec![json!({
            "name": "process_name", "ph": "M", "pid": pid, "tid": 0,
            "args": {"name": format!("rank {pid}")},
        })];
        out.push(json!({
            "name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
            "args": {"sort_index": pid},
        }));
        for t in Track::ALL {
            out.push(json!({
                "name": "thread_name", "ph": "M", "pid": pid, "tid": t.tid(),
                "args": {"name": t.label()},
            }));
        }
        let us = |t: Instant| {
            let since = t.saturating_duration_since(inner.origin).as_secs_f64() * 1e6;
            round_us(inner.origin_unix_us + since)
        };
        let events = inner.events.lock().unwrap_or_else(|p| p.into_inner());
        for e in events.iter() {
            let args: serde_json::Map<String, Value> = e
                .args
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            let dur = e.end.saturating_duration_since(e.start).as_secs_f64() * 1e6;
            out.push(json!({
                "name": e.name, "cat": e.track.label(), "ph": "X",
                "ts": us(e.start), "dur": round_us(dur),
                "pid": pid, "tid": e.track.tid(), "args": args,
            }));
        }
        Some(json!({ "traceEvents": out, "displayTimeUnit": "ms" }))
    }

    /// Writes the trace to `path` (see [`rank_path`] for the name each rank uses). Does
    /// nothing when disabled.
    pub fn write(&self, path: &Path) -> Result<(), TimelineError> {
        let Some(json) = self.to_json() else {
            return Ok(());
        };
        let text = serde_json::to_string(&json).expect("trace JSON always serializes");
        std::fs::write(path, text + "\n").map_err(|source| TimelineError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Microseconds to a nanosecond grid, so the JSON does not carry float noise.
fn round_us(us: f64) -> f64 {
    (us * 1000.0).round() / 1000.0
}

/// The file rank `rank` writes for `--timeline path`: `.rankN` goes before the extension
/// (`trace.json` → `trace.rank2.json`), or at the end when there is none (`trace` →
/// `trace.rank2`).
pub fn rank_path(path: &Path, rank: usize) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank{rank}"),
    };
    path.with_file_name(name)
}

/// Joins trace files (each `{"traceEvents": [...]}` or a bare array) into one at `out`;
/// returns the number of events written.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<usize, TimelineError> {
    let mut all = Vec::new();
    for path in inputs {
        let text = std::fs::read_to_string(path).map_err(|source| TimelineError::Read {
            path: path.clone(),
            source,
        })?;
        let parse_err = |detail: String| TimelineError::Parse {
            path: path.clone(),
            detail,
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let events = match value {
            Value::Array(events) => events,
            Value::Object(mut o) => match o.remove("traceEvents") {
                Some(Value::Array(events)) => events,
                _ => return Err(parse_err("no \"traceEvents\" array".into())),
            },
            _ => return Err(parse_err("expected an object or an array".into())),
        };
        all.extend(events);
    }
    let n = all.len();
    let json = json!({ "traceEvents": all, "displayTimeUnit": "ms" });
    let text = serde_json::to_string(&json).expect("trace JSON always serializes");
    std::fs::write(out, text + "\n").map_err(|source| TimelineError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_timeline_records_nothing() {
        let t = Timeline::disabled();
        assert_eq!(t.now(), None);
        t.span(Track::Train, "forward/backward", t.now(), &[]);
        t.span_between(Track::Ring, "x", Instant::now(), Instant::now(), &[]);
        assert!(t.is_empty());
        assert!(t.to_json().is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        t.write(&path).unwrap();
        assert!(!path.exists(), "a disabled timeline must not create a file");
    }

    #[test]
    fn spans_become_complete_events_on_the_ranks_pid() {
        let t = Timeline::enabled(3);
        let clone = t.clone();
        let start = t.now();
        clone.span(Track::Ring, "reduce-scatter", start, &[("bytes_sent", 40)]);
        t.span(Track::Train, "optimizer", t.now(), &[]);
        assert_eq!(t.len(), 2);
        let json = t.to_json().unwrap();
        let events = json["traceEvents"].as_array().unwrap();
        let spans: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(spans.len(), 2);
        assert!(spans.iter().all(|e| e["pid"] == 3));
        assert_eq!(spans[0]["name"], "reduce-scatter");
        assert_eq!(spans[0]["tid"], 1);
        assert_eq!(spans[0]["args"]["bytes_sent"], 40);
        assert!(
            spans[0]["ts"].as_f64().unwrap() > 1.0e15,
            "Unix microseconds"
        );
        assert!(spans[0]["dur"].as_f64().unwrap() >= 0.0);
        let names = events.iter().filter(|e| e["ph"] == "M").count();
        assert_eq!(names, 2 + Track::ALL.len());
    }

    #[test]
    fn rank_paths_insert_the_rank_before_the_extension() {
        let p = |s: &str, r| rank_path(Path::new(s), r);
        assert_eq!(p("trace.json", 0), PathBuf::from("trace.rank0.json"));
        assert_eq!(
            p("/tmp/a.b.json", 12),
            PathBuf::from("/tmp/a.b.rank12.json")
        );
        assert_eq!(p("dir/trace", 1), PathBuf::from("dir/trace.rank1"));
    }

    #[test]
    fn merge_joins_rank_files_and_names_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut inputs = Vec::new();
        for rank in 0..2 {
            let t = Timeline::enabled(rank);
            t.span(Track::Train, "forward/backward", t.now(), &[]);
            let path = rank_path(&dir.path().join("t.json"), rank);
            t.write(&path).unwrap();
            inputs.push(path);
        }
        let out = dir.path().join("t.json");
        let n = merge(&inputs, &out).unwrap();
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(json["traceEvents"].as_array().unwrap().len(), n);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"events\": []}").unwrap();
        let err = merge(&[bad], &out).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("traceEvents"),
            "{err}"
        );
    }
}
