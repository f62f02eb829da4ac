//! What a ps task does with each message: a state machine with no I/O and no clock.
//!
//! The network side ([`super::server`]) feeds it `(worker, message)` pairs in arrival
//! order and sends the replies it returns. Keeping the rules here makes them testable
//! without sockets and keeps the server a byte mover.
//!
//! Synchronous mode: a step completes when every worker has pushed its gradient for it.
//! The ps then sums the gradients in worker order, `((g_0 + g_1) + g_2) + ...`, multiplies
//! the sum by `1 / N` (the `f32` nearest to it, as ring mode does), applies the optimizer
//! once and answers every worker with the new values.
//!
//! Asynchronous mode: every push is applied at once, alone, and answered to its worker
//! only. Its gradient is multiplied by 1/N first, so that a round of N pushes moves the
//! parameters about as far as one synchronous step and one `--lr` suits both modes
//! (TensorFlow's asynchronous replicas apply the raw gradient and leave the learning rate
//! to the user; with momentum 0.9 that diverged here). The staleness of a push is the ps
//! version when it arrives minus the version its worker's parameters came from.

use bytes::Bytes;
use hdrhistogram::Histogram;

use super::SyncMode;
use super::wire::Msg;
use crate::optim::{OptimConfig, Optimizer};

/// A reply to send: the frame bytes and the workers who get them.
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    /// Worker task indices.
    pub to: Vec<usize>,
    /// The encoded message.
    pub frame: Bytes,
}

/// The state of one ps task's shard.
#[derive(Debug)]
pub struct Core {
    mode: SyncMode,
    workers: usize,
    shard_len: usize,
    params: Option<Vec<f32>>,
    optimizer: Optimizer,
    version: u64,
    /// Sync mode: each worker's (loss, gradient) for the step in progress.
    pending: Vec<Option<(f32, Vec<f32>)>>,
    waiting_pull: Vec<bool>,
    done: Vec<bool>,
    /// The latest loss of each worker (async mode's loss report).
    losses: Vec<Option<f32>>,
    last_loss: f32,
    staleness: Histogram<u64>,
    sum: Vec<f32>,
}

impl Core {
    /// A ps task holding `shard_len` elements for `workers` workers (at least 1).
    pub fn new(mode: SyncMode, workers: usize, shard_len: usize, optim: OptimConfig) -> Core {
        Core {
            mode,
            workers,
            shard_len,
            params: None,
            optimizer: Optimizer::new(optim, shard_len),
            version: 0,
            pending: vec![None; workers],
            waiting_pull: vec![false; workers],
            done: vec![false; workers],
            losses: vec![None; workers],
            last_loss: f32::NAN,
            staleness: Histogram::new(3).expect("3 significant figures is a valid histogram"),
            sum: Vec::new(),
        }
    }

    /// Updates applied so far.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether every worker has said it is done (and has been sent its [`Msg::Bye`]).
    pub fn finished(&self) -> bool {
        self.done.iter().all(|&d| d)
    }

    /// Whether `worker` has said it is done.
    #[cfg(test)]
    pub fn is_done(&self, worker: usize) -> bool {
        self.done.get(worker).copied().unwrap_or(false)
    }

    /// The staleness of every push so far.
    #[cfg(test)]
    pub fn staleness(&self) -> &Histogram<u64> {
        &self.staleness
    }

    /// Handles one message from `worker` (below the worker count, which the server
    /// guarantees); an `Err` names the broken rule and ends the run.
    pub fn handle(&mut self, worker: usize, msg: Msg) -> Result<Vec<Out>, String> {
        if self.done[worker] {
            return Err(format!("sent {} after done", msg.name()));
        }
        match msg {
            Msg::Init { values } => self.init(worker, values),
            Msg::Pull => {
                if self.params.is_none() {
                    self.waiting_pull[worker] = true;
                    return Ok(Vec::new());
                }
                Ok(vec![self.params_to(vec![worker])])
            }
            Msg::Push {
                step,
                based_on,
                loss,
                grad,
            } => self.push(worker, step, based_on, loss, grad),
            Msg::Done => self.worker_done(worker),
            other => Err(format!(
                "sent a {} message, which only ps tasks send",
                other.name()
            )),
        }
    }

    fn init(&mut self, worker: usize, values: Vec<f32>) -> Result<Vec<Out>, String> {
        if worker != 0 {
            return Err("sent init, which only the chief (worker 0) may".into());
        }
        if self.params.is_some() {
            return Err("sent init twice".into());
        }
        self.check_len("init", values.len())?;
        self.params = Some(values);
        let waiting: Vec<usize> = (0..self.workers)
            .filter(|&w| self.waiting_pull[w])
            .collect();
        self.waiting_pull.fill(false);
        if waiting.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![self.params_to(waiting)])
    }

    fn push(
        &mut self,
        worker: usize,
        step: u64,
        based_on: u64,
        loss: f32,
        grad: Vec<f32>,
    ) -> Result<Vec<Out>, String> {
        self.check_len("push", grad.len())?;
        let Some(params) = self.params.as_mut() else {
            return Err("pushed a gradient before the chief initialised the variables".into());
        };
        if based_on > self.version {
            return Err(format!(
                "pushed a gradient based on version {based_on}, but this ps is at {}",
                self.version
            ));
        }
        let stale = self.version - based_on;
        match self.mode {
            SyncMode::Async => {
                let _ = self.staleness.record(stale);
                let scale = 1.0 / self.workers as f32;
                let mut grad = grad;
                grad.iter_mut().for_each(|g| *g *= scale);
                self.optimizer.step(params, &grad);
                self.version += 1;
                self.losses[worker] = Some(loss);
                self.last_loss = mean_in_order(self.losses.iter().flatten().copied());
                Ok(vec![self.params_to(vec![worker])])
            }
            SyncMode::Sync => {
                if step != self.version || stale != 0 {
                    return Err(format!(
                        "pushed step {step} based on version {based_on} while this ps waits \
                         for step {} (synchronous training)",
                        self.version
                    ));
                }
                if self.pending[worker].is_some() {
                    return Err(format!("pushed step {step} twice"));
                }
                let _ = self.staleness.record(0);
                self.pending[worker] = Some((loss, grad));
                if self.pending.iter().any(Option::is_none) {
                    return Ok(Vec::new());
                }
                self.apply_step();
                Ok(vec![self.params_to((0..self.workers).collect())])
            }
        }
    }

    /// Sums the pending gradients in worker order, scales by `1 / N`, applies the optimizer.
    fn apply_step(&mut self) {
        let scale = 1.0 / self.workers as f32;
        let mut pending = self.pending.iter_mut().map(|p| p.take());
        let (loss0, first) = pending
            .next()
            .flatten()
            .expect("invariant: all workers pushed");
        let mut loss = loss0;
        self.sum.clear();
        self.sum.extend_from_slice(&first);
        for (l, g) in pending.flatten() {
            loss += l;
            self.sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x);
        }
        self.sum.iter_mut().for_each(|s| *s *= scale);
        let params = self.params.as_mut().expect("invariant: pushes need init");
        self.optimizer.step(params, &self.sum);
        self.version += 1;
        self.last_loss = loss * scale;
    }

    fn worker_done(&mut self, worker: usize) -> Result<Vec<Out>, String> {
        if self.mode == SyncMode::Sync && self.pending.iter().any(Option::is_some) {
            return Err(format!(
                "finished while other workers are at step {}; every worker must run the \
                 same number of steps",
                self.version
            ));
        }
        self.done[worker] = true;
        if !self.finished() {
            return Ok(Vec::new());
        }
        let staleness = self
            .staleness
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        let bye = Msg::Bye {
            version: self.version,
            loss: self.last_loss,
            staleness,
            values: self.params.clone().unwrap_or_default(),
        };
        Ok(vec![Out {
            to: (0..self.workers).collect(),
            frame: bye.encode(),
        }])
    }

    fn params_to(&self, to: Vec<usize>) -> Out {
        let values = self.params.clone().unwrap_or_default();
        let msg = Msg::Params {
            version: self.version,
            loss: self.last_loss,
            values,
        };
        Out {
            to,
            frame: msg.encode(),
        }
    }

    fn check_len(&self, what: &str, len: usize) -> Result<(), String> {
        if len == self.shard_len {
            return Ok(());
        }
        Err(format!(
            "sent {what} with {len} values, but this ps holds {}; do all tasks use the same \
             --hidden and --ps-strategy?",
            self.shard_len
        ))
    }
}

/// The mean of `xs` summed in order, in `f32`.
fn mean_in_order(xs: impl Iterator<Item = f32>) -> f32 {
    let (sum, n) = xs.fold((0f32, 0usize), |(s, n), x| (s + x, n + 1));
    sum * (1.0 / n.max(1) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(out: &Out) -> Msg {
        Msg::decode(&out.frame).unwrap()
    }

    fn push(step: u64, based_on: u64, grad: &[f32]) -> Msg {
        Msg::Push {
            step,
            based_on,
            loss: step as f32,
            grad: grad.to_vec(),
        }
    }

    fn sgd() -> OptimConfig {
        OptimConfig::sgd(0.5, 0.0)
    }

    #[test]
    fn sync_waits_for_every_worker_then_averages_in_worker_order() {
        let mut core = Core::new(SyncMode::Sync, 3, 2, sgd());
        assert!(
            core.handle(1, Msg::Pull).unwrap().is_empty(),
            "pull waits for init"
        );
        let outs = core
            .handle(
                0,
                Msg::Init {
                    values: vec![1.0, 2.0],
                },
            )
            .unwrap();
        assert_eq!(outs[0].to, vec![1]);
        assert!(core.handle(0, push(0, 0, &[3.0, 0.0])).unwrap().is_empty());
        assert!(core.handle(2, push(0, 0, &[0.0, 3.0])).unwrap().is_empty());
        let outs = core.handle(1, push(0, 0, &[3.0, 3.0])).unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(outs[0].to, vec![0, 1, 2]);
        // mean gradient (2, 2), lr 0.5: (1, 2) - (1, 1).
        let Msg::Params {
            version, values, ..
        } = decode(&outs[0])
        else {
            panic!("params expected")
        };
        assert_eq!((version, values), (1, vec![0.0, 1.0]));
        assert_eq!(core.staleness().max(), 0);
    }

    #[test]
    fn sync_refuses_out_of_step_twice_and_early_done() {
        let mut core = Core::new(SyncMode::Sync, 2, 1, sgd());
        assert!(
            core.handle(0, push(0, 0, &[1.0]))
                .unwrap_err()
                .contains("before")
        );
        core.handle(0, Msg::Init { values: vec![0.0] }).unwrap();
        assert!(
            core.handle(1, Msg::Init { values: vec![0.0] })
                .unwrap_err()
                .contains("chief")
        );
        assert!(
            core.handle(0, push(1, 0, &[1.0]))
                .unwrap_err()
                .contains("waits for step 0")
        );
        assert!(
            core.handle(0, push(0, 0, &[1.0, 2.0]))
                .unwrap_err()
                .contains("2 values")
        );
        core.handle(0, push(0, 0, &[1.0])).unwrap();
        assert!(
            core.handle(0, push(0, 0, &[1.0]))
                .unwrap_err()
                .contains("twice")
        );
        assert!(
            core.handle(1, Msg::Done)
                .unwrap_err()
                .contains("same number of steps")
        );
        let bad = Msg::Params {
            version: 0,
            loss: 0.0,
            values: vec![],
        };
        assert!(core.handle(1, bad).unwrap_err().contains("only ps tasks"));
    }

    #[test]
    fn async_applies_each_push_alone_and_records_staleness() {
        let mut core = Core::new(SyncMode::Async, 2, 1, sgd());
        core.handle(0, Msg::Init { values: vec![10.0] }).unwrap();
        let outs = core.handle(1, push(0, 0, &[2.0])).unwrap();
        assert_eq!(outs[0].to, vec![1]);
        let outs = core.handle(0, push(0, 0, &[4.0])).unwrap();
        let Msg::Params {
            version, values, ..
        } = decode(&outs[0])
        else {
            panic!("params expected")
        };
        // 10 - 0.5 * 2 / 2 - 0.5 * 4 / 2; the second push was one version stale.
        assert_eq!((version, values), (2, vec![8.5]));
        assert_eq!(core.staleness().max(), 1);
        assert!(
            core.handle(0, push(1, 3, &[1.0]))
                .unwrap_err()
                .contains("version 3")
        );
    }

    #[test]
    fn bye_goes_to_everyone_once_all_are_done() {
        let mut core = Core::new(SyncMode::Async, 2, 1, sgd());
        core.handle(0, Msg::Init { values: vec![1.0] }).unwrap();
        core.handle(0, push(0, 0, &[0.0])).unwrap();
        assert!(core.handle(1, Msg::Done).unwrap().is_empty());
        assert!(core.is_done(1) && !core.finished());
        assert!(
            core.handle(1, Msg::Pull)
                .unwrap_err()
                .contains("after done")
        );
        let outs = core.handle(0, Msg::Done).unwrap();
        assert!(core.finished());
        assert_eq!(outs[0].to, vec![0, 1]);
        let Msg::Bye {
            version,
            staleness,
            values,
            ..
        } = decode(&outs[0])
        else {
            panic!("bye expected")
        };
        assert_eq!((version, staleness, values), (1, vec![(0, 1)], vec![1.0]));
    }
}
