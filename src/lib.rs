//! ringtrain: data-parallel training with a ring all-reduce over QUIC.
//!
//! (architecture note written later)

pub mod cli;
pub mod collective;
pub mod data;
pub mod frame;
pub mod hosts;
pub mod launch;
pub mod model;
pub mod optim;
pub mod ring;
pub mod train;
pub mod transport;
