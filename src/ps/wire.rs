//! The messages between workers and ps tasks, and how they travel on a QUIC stream.
//!
//! Each connection has one bidirectional stream. Both sides first send a
//! [`crate::transport::Hello`] as JSON; afterwards every message is a frame: a
//! little-endian `u32` length, then the message. A frame longer than the bound agreed for
//! the link is refused before anything is allocated for it.
//!
//! ```text
//! worker -> ps   Init   1 | values f32...                      (chief only, once)
//!                Pull   2                                       -> Params
//!                Push   3 | step u64 | based_on u64 | loss f32 | grad f32...   -> Params
//!                Done   4                                       -> Bye, once all are done
//! ps -> worker   Params 5 | version u64 | loss f32 | values f32...
//!                Bye    6 | version u64 | loss f32 | buckets u32 | (value u64, count u64)...
//!                         | values f32...
//! ```
//!
//! All integers and floats are little-endian. `based_on` is the ps version the worker's
//! parameters came from; `version` counts the updates the ps has applied. Decoding is a
//! pure function that never panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the largest fixed part of a message (kind, two u64, one f32, one u32).
pub const MAX_FIXED: usize = 1 + 8 + 8 + 4 + 4;
/// At most this many staleness buckets travel in a [`Msg::Bye`].
pub const MAX_BUCKETS: usize = 4096;
/// Hellos are at most this long.
pub const MAX_HELLO: usize = 64 * 1024;

/// One message between a worker and a ps task.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// The chief's initial values of the ps task's shard.
    Init {
        /// The shard's values.
        values: Vec<f32>,
    },
    /// Ask for the current values.
    Pull,
    /// A worker's gradient for the ps task's shard.
    Push {
        /// The worker's step, from 0.
        step: u64,
        /// The ps version the worker's parameters came from.
        based_on: u64,
        /// The worker's training loss on this step's batch.
        loss: f32,
        /// The gradient of the shard.
        grad: Vec<f32>,
    },
    /// The worker has run all its steps.
    Done,
    /// The current values of the shard.
    Params {
        /// Updates applied so far.
        version: u64,
        /// The training loss averaged over workers (see [`crate::ps`]).
        loss: f32,
        /// The shard's values.
        values: Vec<f32>,
    },
    /// The final values, once every worker is done, and the ps task's statistics.
    Bye {
        /// Updates applied in all.
        version: u64,
        /// The last loss averaged over workers.
        loss: f32,
        /// Staleness histogram: (staleness, number of pushes).
        staleness: Vec<(u64, u64)>,
        /// The shard's final values.
        values: Vec<f32>,
    },
}

/// Why bytes are not a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// An empty frame.
    #[error("empty message")]
    Empty,
    /// A kind byte we do not know.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The frame ends inside a fixed field.
    #[error("{kind} message of {len} bytes is truncated")]
    Truncated {
        /// The message kind.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// The values part is not a whole number of `f32`s.
    #[error("{kind} message has {bytes} value bytes, not a multiple of 4")]
    Ragged {
        /// The message kind.
        kind: &'static str,
        /// Bytes left for values.
        bytes: usize,
    },
    /// Too many staleness buckets.
    #[error("bye message announces {0} staleness buckets, more than {MAX_BUCKETS}")]
    TooManyBuckets(u32),
}

impl Msg {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Init { .. } => "init",
            Msg::Pull => "pull",
            Msg::Push { .. } => "push",
            Msg::Done => "done",
            Msg::Params { .. } => "params",
            Msg::Bye { .. } => "bye",
        }
    }

    /// The message as frame bytes (without the length prefix).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(MAX_FIXED + 4 * self.values().len());
        match self {
            Msg::Init { .. } => out.put_u8(1),
            Msg::Pull => out.put_u8(2),
            Msg::Push {
                step,
                based_on,
                loss,
                ..
            } => {
                out.put_u8(3);
                out.put_u64_le(*step);
                out.put_u64_le(*based_on);
                out.put_f32_le(*loss);
            }
            Msg::Done => out.put_u8(4),
            Msg::Params { version, loss, .. } => {
                out.put_u8(5);
                out.put_u64_le(*version);
                out.put_f32_le(*loss);
            }
            Msg::Bye {
                version,
                loss,
                staleness,
                ..
            } => {
                out.put_u8(6);
                out.put_u64_le(*version);
                out.put_f32_le(*loss);
                let kept = &staleness[..staleness.len().min(MAX_BUCKETS)];
                out.put_u32_le(kept.len() as u32);
                for (value, count) in kept {
                    out.put_u64_le(*value);
                    out.put_u64_le(*count);
                }
            }
        }
        for v in self.values() {
            out.put_f32_le(*v);
        }
        out.freeze()
    }

    fn values(&self) -> &[f32] {
        match self {
            Msg::Init { values } | Msg::Params { values, .. } | Msg::Bye { values, .. } => values,
            Msg::Push { grad, .. } => grad,
            Msg::Pull | Msg::Done => &[],
        }
    }

    /// Parses frame bytes; never panics.
    pub fn decode(frame: &[u8]) -> Result<Msg, WireError> {
        let Some((&kind, mut rest)) = frame.split_first() else {
            return Err(WireError::Empty);
        };
        let name = match kind {
            1 => "init",
            2 => "pull",
            3 => "push",
            4 => "done",
            5 => "params",
            6 => "bye",
            k => return Err(WireError::UnknownKind(k)),
        };
        let fixed = match kind {
            3 => 8 + 8 + 4,
            5 => 8 + 4,
            6 => 8 + 4 + 4,
            _ => 0,
        };
        let truncated = || WireError::Truncated {
            kind: name,
            len: frame.len(),
        };
        if rest.len() < fixed {
            return Err(truncated());
        }
        let msg = match kind {
            1 => Msg::Init {
                values: floats(name, rest)?,
            },
            2 => Msg::Pull,
            3 => Msg::Push {
                step: rest.get_u64_le(),
                based_on: rest.get_u64_le(),
                loss: rest.get_f32_le(),
                grad: floats(name, rest)?,
            },
            4 => Msg::Done,
            5 => Msg::Params {
                version: rest.get_u64_le(),
                loss: rest.get_f32_le(),
                values: floats(name, rest)?,
            },
            _ => {
                let (version, loss) = (rest.get_u64_le(), rest.get_f32_le());
                let buckets = rest.get_u32_le();
                if buckets as usize > MAX_BUCKETS {
                    return Err(WireError::TooManyBuckets(buckets));
                }
                if rest.len() < 16 * buckets as usize {
                    return Err(truncated());
                }
                let staleness = (0..buckets)
                    .map(|_| (rest.get_u64_le(), rest.get_u64_le()))
                    .collect();
                Msg::Bye {
                    version,
                    loss,
                    staleness,
                    values: floats(name, rest)?,
                }
            }
        };
        if matches!(msg, Msg::Pull | Msg::Done) && !rest.is_empty() {
            return Err(WireError::Ragged {
                kind: name,
                bytes: rest.len(),
            });
        }
        Ok(msg)
    }
}

fn floats(kind: &'static str, bytes: &[u8]) -> Result<Vec<f32>, WireError> {
    if bytes.len() % 4 != 0 {
        return Err(WireError::Ragged {
            kind,
            bytes: bytes.len(),
        });
    }
    let words = bytes.chunks_exact(4);
    Ok(words
        .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect())
}

/// The largest frame a link whose shard has `shard_len` elements may carry.
pub fn max_frame(shard_len: usize) -> usize {
    MAX_FIXED + 16 * MAX_BUCKETS + 4 * shard_len
}

/// Why a stream operation failed, in words fit for an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamFail {
    /// The connection or stream ended; the reason in words.
    Lost(String),
    /// The peer announced a frame above the bound.
    TooLarge {
        /// Announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

/// Writes one frame: its length, then its bytes. Returns the bytes put on the stream.
pub async fn write_frame(stream: &mut quinn::SendStream, frame: Bytes) -> Result<u64, StreamFail> {
    let len = frame.len();
    let prefix = (len as u32).to_le_bytes();
    let fail = |e: quinn::WriteError| StreamFail::Lost(write_lost(e));
    stream.write_all(&prefix).await.map_err(fail)?;
    stream.write_chunk(frame).await.map_err(fail)?;
    Ok(4 + len as u64)
}

/// Reads one frame of at most `max` bytes.
pub async fn read_frame(stream: &mut quinn::RecvStream, max: usize) -> Result<Bytes, StreamFail> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.map_err(read_lost)?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(StreamFail::TooLarge { len, max });
    }
    let mut buf = BytesMut::zeroed(len);
    stream.read_exact(&mut buf).await.map_err(read_lost)?;
    Ok(buf.freeze())
}

fn read_lost(e: quinn::ReadExactError) -> StreamFail {
    StreamFail::Lost(match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => why_lost(&c),
        quinn::ReadExactError::FinishedEarly(_) => "it ended its stream".into(),
        other => other.to_string(),
    })
}

fn write_lost(e: quinn::WriteError) -> String {
    match e {
        quinn::WriteError::ConnectionLost(c) => why_lost(&c),
        other => other.to_string(),
    }
}

/// Says in words why a connection ended, with the peer's own reason when it gave one.
pub fn why_lost(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) if !c.reason.is_empty() => format!(
            "it closed the connection: {}",
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::ApplicationClosed(_) => "it closed the connection".into(),
        quinn::ConnectionError::TimedOut => "no packets within the peer timeout: the process \
                                             died, hangs, or the network between us is cut"
            .into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Init {
                values: vec![1.0, -2.5],
            },
            Msg::Pull,
            Msg::Push {
                step: 7,
                based_on: 6,
                loss: 0.25,
                grad: vec![0.5; 3],
            },
            Msg::Done,
            Msg::Params {
                version: u64::MAX,
                loss: 1.5,
                values: vec![],
            },
            Msg::Bye {
                version: 3,
                loss: 0.5,
                staleness: vec![(0, 10), (2, 1)],
                values: vec![9.0],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            assert_eq!(Msg::decode(&m.encode()), Ok(m.clone()), "{}", m.name());
        }
    }

    #[test]
    fn every_prefix_and_every_flipped_kind_is_an_error_not_a_panic() {
        for m in all() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                // A cut inside the values may still decode (fewer values); it must not panic.
                let _ = Msg::decode(&bytes[..cut]);
            }
            let mut odd = bytes.to_vec();
            odd.push(0);
            assert!(Msg::decode(&odd).is_err(), "{} with a stray byte", m.name());
            for kind in [0u8, 7, 255] {
                odd[0] = kind;
                assert_eq!(Msg::decode(&odd), Err(WireError::UnknownKind(kind)));
            }
        }
        assert_eq!(Msg::decode(&[]), Err(WireError::Empty));
        assert!(matches!(
            Msg::decode(&[3, 1, 2]),
            Err(WireError::Truncated { kind: "push", .. })
        ));
        let mut huge = vec![6u8];
        huge.extend_from_slice(&[0; 12]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Msg::decode(&huge), Err(WireError::TooManyBuckets(u32::MAX)));
    }

    #[test]
    fn a_frame_bound_covers_the_largest_message() {
        let bye = Msg::Bye {
            version: 1,
            loss: 0.0,
            staleness: vec![(1, 1); MAX_BUCKETS + 10],
            values: vec![0.0; 100],
        };
        assert!(bye.encode().len() <= max_frame(100));
    }
}
