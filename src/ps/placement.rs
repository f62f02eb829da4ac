//! Which ps task holds which variable: pure functions of the model's tensors.
//!
//! TensorFlow's `replica_device_setter` assigns each variable, in creation order, to a ps
//! task: round-robin by default, or with a load-balancing strategy. Here the variables are
//! the tensors of [`crate::model::Mlp::tensors`] (each layer's weight, then its bias) and a
//! ps task's *shard* is the concatenation of its tensors in layout order. Because
//! [`crate::optim::Optimizer`] works element by element, applying it to a shard gives
//! exactly the values it would give on those elements of the whole buffer.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

/// How variables are spread over the ps tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Tensor `i` (in layout order) goes to ps task `i mod K`, like TensorFlow's default.
    #[default]
    RoundRobin,
    /// Each tensor, in layout order, goes to the ps task holding the fewest bytes so far
    /// (the lowest index on ties), like TensorFlow's `GreedyLoadBalancingStrategy` with
    /// the byte-size load function.
    Greedy,
}

impl Strategy {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::Greedy => "greedy",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Strategy::RoundRobin),
            "greedy" => Ok(Strategy::Greedy),
            other => Err(format!(
                "unknown placement strategy {other:?}: expected round-robin or greedy"
            )),
        }
    }
}

/// One ps task's tensors: names and element ranges in the flat buffer, in layout order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shard {
    /// `(name, range)` of each tensor this task holds.
    pub tensors: Vec<(String, Range<usize>)>,
}

impl Shard {
    /// Number of elements in the shard.
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|(_, r)| r.len()).sum()
    }

    /// Whether the shard holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this shard's elements of `whole` to `out`, in shard order.
    pub fn gather_into(&self, whole: &[f32], out: &mut Vec<f32>) {
        for (_, r) in &self.tensors {
            out.extend_from_slice(&whole[r.clone()]);
        }
    }

    /// Copies `values` (in shard order, [`Shard::len`] of them) into their places in
    /// `whole`.
    pub fn scatter(&self, values: &[f32], whole: &mut [f32]) {
        debug_assert_eq!(
            values.len(),
            self.len(),
            "invariant: a whole shard's values"
        );
        let mut at = 0;
        for (_, r) in &self.tensors {
            whole[r.clone()].copy_from_slice(&values[at..at + r.len()]);
            at += r.len();
        }
    }
}

/// The shard of every ps task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    shards: Vec<Shard>,
}

impl Placement {
    /// Places `tensors` (`(name, offset, shape)` as [`crate::model::Mlp::tensors`] lists
    /// them) on `ps` tasks; `ps` must be at least 1 (debug-asserted; 0 is treated as 1).
    pub fn new(tensors: &[(String, usize, Vec<usize>)], ps: usize, strategy: Strategy) -> Self {
        debug_assert!(ps > 0, "invariant: at least one ps task");
        let mut shards = vec![Shard::default(); ps.max(1)];
        let mut load = vec![0usize; shards.len()];
        for (i, (name, offset, shape)) in tensors.iter().enumerate() {
            let len: usize = shape.iter().product();
            let task = match strategy {
                Strategy::RoundRobin => i % shards.len(),
                // min_by_key returns the first minimum: the lowest index on ties.
                Strategy::Greedy => (0..shards.len()).min_by_key(|&t| load[t]).unwrap_or(0),
            };
            load[task] += len;
            shards[task]
                .tensors
                .push((name.clone(), *offset..offset + len));
        }
        Placement { shards }
    }

    /// Number of ps tasks.
    pub fn ps_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of ps task `task`.
    ///
    /// # Panics
    ///
    /// If `task >= ps_count()`; tasks come from a checked cluster file.
    pub fn shard(&self, task: usize) -> &Shard {
        &self.shards[task]
    }

    /// Every shard, by ps task.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The placement in words, for logs and the handshake fingerprint:
    /// `ps0 [layers.0.weight, layers.1.bias] ps1 [layers.0.bias]`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .shards
            .iter()
            .enumerate()
            .map(|(t, s)| {
                let names: Vec<&str> = s.tensors.iter().map(|(n, _)| n.as_str()).collect();
                format!("ps{t} [{}]", names.join(", "))
            })
            .collect();
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mlp;

    fn covers_exactly(p: &Placement, len: usize) {
        let mut seen = vec![0u8; len];
        for s in p.shards() {
            for (_, r) in &s.tensors {
                assert!(r.start <= r.end && r.end <= len, "{r:?}");
                r.clone().for_each(|i| seen[i] += 1);
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every element exactly once");
    }

    #[test]
    fn round_robin_deals_tensors_in_layout_order() {
        let m = Mlp::new(64, &[16], 10);
        let p = Placement::new(&m.tensors(), 2, Strategy::RoundRobin);
        assert_eq!(
            p.describe(),
            "ps0 [layers.0.weight, layers.1.weight] ps1 [layers.0.bias, layers.1.bias]"
        );
        covers_exactly(&p, m.param_len());
        assert_eq!(p.shard(0).len(), 64 * 16 + 16 * 10);
    }

    #[test]
    fn greedy_balances_bytes() {
        // Tensors of 1024, 16, 160, 10 elements: greedy puts the big weight alone.
        let m = Mlp::new(64, &[16], 10);
        let p = Placement::new(&m.tensors(), 2, Strategy::Greedy);
        assert_eq!(p.shard(0).len(), 1024);
        assert_eq!(p.shard(1).len(), 16 + 160 + 10);
        covers_exactly(&p, m.param_len());
    }

    #[test]
    fn every_model_and_task_count_is_covered_and_gather_scatter_round_trip() {
        for hidden in [vec![], vec![3], vec![5, 7], vec![16, 8, 4]] {
            let m = Mlp::new(6, &hidden, 3);
            let whole: Vec<f32> = (0..m.param_len()).map(|i| i as f32).collect();
            for ps in 1..=7 {
                for strategy in [Strategy::RoundRobin, Strategy::Greedy] {
                    let p = Placement::new(&m.tensors(), ps, strategy);
                    assert_eq!(p.ps_count(), ps);
                    covers_exactly(&p, m.param_len());
                    let mut back = vec![0.0; whole.len()];
                    for s in p.shards() {
                        let mut part = Vec::new();
                        s.gather_into(&whole, &mut part);
                        assert_eq!(part.len(), s.len());
                        s.scatter(&part, &mut back);
                    }
                    assert_eq!(back, whole, "{hidden:?} on {ps} ps, {strategy}");
                }
            }
        }
    }

    #[test]
    fn strategy_names_round_trip() {
        for s in [Strategy::RoundRobin, Strategy::Greedy] {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
        }
        assert!(
            "random"
                .parse::<Strategy>()
                .unwrap_err()
                .contains("round-robin")
        );
    }
}
