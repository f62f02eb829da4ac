//! ringtrain: data-parallel training with a ring all-reduce over QUIC, and the
//! parameter-server designs it is measured against.
//!
//! Every rank holds the whole model (between-graph replication), trains on its own shard of
//! the data, and each step the ranks average their gradients with a ring all-reduce. No
//! rank is special except rank 0, whose initial parameters are broadcast and which writes
//! the summary.
//!
//! ```text
//!   reduce-scatter (N-1 steps)            all-gather (N-1 steps)
//!   each rank adds the chunk it receives  each rank copies the finished chunk it receives
//!
//!        r0 --c0--> r1                         r0 --S1--> r1
//!        ^           |                         ^           |
//!       c3          c1      chunk c_i moves    S0          S2     S_i = sum of chunk i,
//!        |           v      one hop per step    |           v     owned by rank i-1
//!        r3 <--c2-- r2                         r3 <--S3-- r2
//! ```
//!
//! Each rank sends 2(N-1)/N of the buffer per all-reduce, whatever N is.
//!
//! Where things live:
//! - [`ring`]: the chunk layout and the schedule, pure logic with no I/O;
//! - [`frame`]: the wire format of one segment;
//! - [`collective`]: drives the schedule over any pair of links; in-memory links for tests;
//! - [`transport`]: quinn endpoints, TLS, the handshake, QUIC links between neighbours;
//! - [`auth`]: the cluster credential (who may join) and the TLS settings built from it;
//! - [`model`], [`optim`], [`data`]: the MLP over one flat buffer, SGD and Adam, datasets
//!   and per-rank sharding;
//! - [`train`]: the step loop of one rank; [`hosts`]: the hosts file; [`bucket`]: which
//!   gradient ranges are all-reduced together, and when (overlapped with backward);
//! - [`elastic`]: `--elastic`, a ring that shrinks when ranks are lost and grows when they
//!   rejoin;
//! - [`launch`]: a whole cluster of processes on one machine; [`cli`]: the flags;
//! - [`ps`] and [`cluster`]: the parameter-server contrast (ps and worker tasks over the same
//!   QUIC transport); [`ingraph`]: in-graph replication, K replica threads in one process;
//! - [`config`]: `--config` files; [`launchenv`]: the rank from srun, mpirun, torchrun or a
//!   StatefulSet's host name; [`progress`], [`timeline`], [`export`]: the progress bar,
//!   Chrome traces (`--timeline`) and safetensors weights (`--save`).

pub mod auth;
pub mod bench;
pub mod bucket;
pub mod checkpoint;
pub mod cli;
pub mod cluster;
pub mod collective;
pub mod config;
pub mod data;
pub mod elastic;
pub mod emulate;
pub mod export;
pub mod frame;
pub mod hosts;
pub mod ingraph;
pub mod launch;
pub mod launchenv;
pub mod lossy;
pub mod model;
pub mod optim;
pub mod progress;
pub mod ps;
pub mod ring;
pub mod timeline;
pub mod train;
pub mod transport;
