//! In-graph replication: one process drives K replicas, one thread each, and averages
//! their gradients in shared memory. No network at all: the baseline of the comparison.
//!
//! ```text
//!   driver: params --> replica 0 --g_0--+
//!                  --> replica 1 --g_1--+--> ((g_0 + g_1) + ...) * 1/K --> optimizer
//!                  --> ...       --...--+                                  (one copy)
//!           params <-------------------------------------------------------------+
//! ```
//!
//! Replica `k` trains on the same [`Sampler`] shard as ring rank `k` of `K`, so a step
//! sees the same global batch as ring mode with K ranks. The driver sums the replicas'
//! gradients in replica order 0..K-1, multiplies by the `f32` nearest to 1/K and applies
//! the optimizer to the one parameter buffer. The ring sums chunk `c` starting at rank `c`
//! instead, so the two agree to rounding, not to the bit (the tests bound the difference).

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tracing::info;

use crate::data::{Dataset, Sampler};
use crate::model::{Mlp, Workspace};
use crate::optim::Optimizer;
use crate::train::{self, Summary, TrainConfig, TrainError, Trained, param_digest};

/// Runs in-graph training with `replicas` threads to completion, writes the summary to
/// `--metrics-out` if one is given, and returns it with the final parameters.
pub fn run(cfg: &TrainConfig, replicas: usize) -> Result<Trained, TrainError> {
    train::validate(cfg)?;
    reject_ring_only(cfg, "in-graph")?;
    if replicas == 0 {
        return Err(TrainError::Config("--np must be at least 1 replica".into()));
    }
    let data = Dataset::load(&cfg.data, cfg.seed)?;
    let model = Mlp::new(data.features, &cfg.hidden, data.classes);
    let samplers: Vec<Sampler> = (0..replicas)
        .map(|k| Sampler::new(data.train_len(), cfg.seed, k, replicas, cfg.batch_size))
        .collect();
    if samplers[0].steps_per_epoch() == 0 {
        return Err(TrainError::Config(format!(
            "{} training samples cannot fill one step of {replicas} replicas x batch {}; \
             lower --batch-size",
            data.train_len(),
            cfg.batch_size
        )));
    }
    info!(replicas, params = model.param_len(), dataset = %data.name, "replicas built");
    let trained = drive(cfg, &model, &data, samplers)?;
    train::write_summary(cfg, &trained.summary)?;
    Ok(trained)
}

/// Refuses flags that only ring mode implements, naming them, instead of ignoring them.
pub fn reject_ring_only(cfg: &TrainConfig, mode: &str) -> Result<(), TrainError> {
    let used = [
        ("--checkpoint-dir", cfg.checkpoint_dir.is_some()),
        ("--resume", cfg.resume),
        ("--elastic", cfg.elastic),
        ("--timeline", cfg.timeline.is_some()),
        ("--save", cfg.save.is_some()),
        ("--compress", cfg.compress != crate::frame::Wire::F32),
    ];
    let flags: Vec<&str> = used.iter().filter(|(_, on)| *on).map(|(f, _)| *f).collect();
    if flags.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "{} only work(s) in ring mode, not in {mode} mode; drop them or use --mode ring",
        flags.join(", ")
    )))
}

/// What the driver hands a replica for one step.
struct Work {
    step: u64,
    params: Arc<Vec<f32>>,
    grad: Vec<f32>,
}

/// What a replica hands back: its batch's mean loss and gradient.
struct Done {
    loss: f32,
    grad: Vec<f32>,
}

fn drive(
    cfg: &TrainConfig,
    model: &Mlp,
    data: &Dataset,
    samplers: Vec<Sampler>,
) -> Result<Trained, TrainError> {
    let k = samplers.len();
    let p = model.param_len();
    let per_epoch = samplers[0].steps_per_epoch() as u64;
    let total = cfg.steps.unwrap_or(cfg.epochs * per_epoch);
    let mut init = vec![0f32; p];
    model.init(cfg.seed, &mut init);
    let mut params = Arc::new(init);

    std::thread::scope(|s| {
        // One channel pair per replica: results are read in replica order, and a replica
        // that died shows up as a closed channel instead of a hang.
        let mut to = Vec::with_capacity(k);
        let mut from = Vec::with_capacity(k);
        for (r, sampler) in samplers.into_iter().enumerate() {
            let (work_tx, work_rx) = mpsc::channel::<Work>();
            let (done_tx, done_rx) = mpsc::channel::<Done>();
            std::thread::Builder::new()
                .name(format!("ringtrain-replica-{r}"))
                .spawn_scoped(s, move || {
                    replica(
                        model,
                        data,
                        sampler,
                        per_epoch,
                        cfg.batch_size,
                        work_rx,
                        done_tx,
                    )
                })
                .map_err(|e| TrainError::Config(format!("cannot start replica {r}: {e}")))?;
            to.push(work_tx);
            from.push(done_rx);
        }

        let mut optimizer = Optimizer::new(cfg.optim.clone(), p);
        let mut grads: Vec<Vec<f32>> = (0..k).map(|_| vec![0f32; p]).collect();
        let mut sum = vec![0f32; p];
        let scale = 1.0 / k as f32;
        let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
        let mut log = Log::new(k * cfg.batch_size);
        let start = Instant::now();

        for step in 0..total {
            for (r, tx) in to.iter().enumerate() {
                let grad = std::mem::take(&mut grads[r]);
                let params = Arc::clone(&params);
                tx.send(Work { step, params, grad }).map_err(|_| died(r))?;
            }
            let mut losses = Vec::with_capacity(k);
            for (r, rx) in from.iter().enumerate() {
                let done = rx.recv().map_err(|_| died(r))?;
                losses.push(done.loss);
                grads[r] = done.grad;
            }

            // Sum in replica order, then scale, exactly as the ps tasks do.
            let t = Instant::now();
            sum.copy_from_slice(&grads[0]);
            for g in &grads[1..] {
                sum.iter_mut().zip(g).for_each(|(s, x)| *s += x);
            }
            sum.iter_mut().for_each(|s| *s *= scale);
            let loss = losses.iter().fold(0f32, |a, &l| a + l) * scale;
            let took = t.elapsed();
            let _ = hist.record(took.as_micros().max(1) as u64);

            // The replicas dropped their handles before answering, so this copies nothing.
            optimizer.step(Arc::make_mut(&mut params).as_mut_slice(), &sum);
            log.step(
                step + 1,
                total,
                step / per_epoch,
                f64::from(loss),
                took,
                cfg.log_every,
            );
        }
        drop(to);

        let train_time = start.elapsed();
        let params = Arc::unwrap_or_clone(params);
        let summary = summary(cfg, model, data, k, total, train_time, &hist, &log, &params);
        Ok(Trained { summary, params })
    })
}

fn died(replica: usize) -> TrainError {
    TrainError::Config(format!(
        "replica {replica} stopped unexpectedly (a bug: see the panic message above)"
    ))
}

/// One replica: for each step it is given, computes its batch's loss and gradient.
fn replica(
    model: &Mlp,
    data: &Dataset,
    mut sampler: Sampler,
    per_epoch: u64,
    b: usize,
    work: mpsc::Receiver<Work>,
    done: mpsc::Sender<Done>,
) {
    let mut ws = Workspace::new();
    let (mut x, mut y) = (vec![0f32; b * data.features], vec![0u32; b]);
    while let Ok(Work { step, params, grad }) = work.recv() {
        let mut grad = grad;
        grad.resize(model.param_len(), 0.0);
        let (epoch, in_epoch) = (step / per_epoch, (step % per_epoch) as usize);
        data.gather_train(sampler.batch(epoch, in_epoch), &mut x, &mut y);
        let (loss, _) = model.forward_backward(&params, &x, &y, &mut ws, &mut grad);
        // Release the parameters before answering, so the driver can update them in place.
        drop(params);
        if done.send(Done { loss, grad }).is_err() {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn summary(
    cfg: &TrainConfig,
    model: &Mlp,
    data: &Dataset,
    k: usize,
    steps: u64,
    t: Duration,
    hist: &Histogram<u64>,
    log: &Log,
    params: &[f32],
) -> Summary {
    let mut ws = Workspace::new();
    let (_, acc) = model.evaluate(params, &data.test_x, &data.test_y, &mut ws);
    let secs = t.as_secs_f64().max(1e-9);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Summary {
        world_size: k,
        mode: "in-graph".into(),
        rank: 0,
        steps,
        batch_size: cfg.batch_size,
        samples_per_sec: steps as f64 * (cfg.batch_size * k) as f64 / secs,
        final_loss: log.last_mean,
        test_accuracy: f64::from(acc),
        allreduce_ms_p50: ms(0.5),
        allreduce_ms_p99: ms(0.99),
        comm_fraction: log.reduce.as_secs_f64() / secs,
        bytes_sent_per_step: 0.0,
        params: params.len(),
        train_secs: secs,
        param_digest: param_digest(params).to_hex().to_string(),
        ps_tasks: None,
        ps_sync: None,
        ps_strategy: None,
        ps_shard_params: None,
        bytes_received_per_step: None,
        staleness_p50: None,
        staleness_p99: None,
        staleness_max: None,
    }
}

/// Progress lines, the loss window of the summary, and the time spent reducing.
struct Log {
    global_batch: usize,
    sum: f64,
    count: u64,
    last_mean: f64,
    reduce: Duration,
    last: (Instant, u64, Duration),
}

impl Log {
    fn new(global_batch: usize) -> Log {
        Log {
            global_batch,
            sum: 0.0,
            count: 0,
            last_mean: 0.0,
            reduce: Duration::ZERO,
            last: (Instant::now(), 0, Duration::ZERO),
        }
    }

    fn step(&mut self, done: u64, total: u64, epoch: u64, loss: f64, reduce: Duration, every: u64) {
        (self.sum, self.count, self.reduce) =
            (self.sum + loss, self.count + 1, self.reduce + reduce);
        if done % every != 0 && done != total {
            return;
        }
        self.last_mean = self.sum / self.count.max(1) as f64;
        (self.sum, self.count) = (0.0, 0);
        let secs = self.last.0.elapsed().as_secs_f64().max(1e-9);
        let samples = (done - self.last.1) as f64 * self.global_batch as f64;
        let share = (self.reduce - self.last.2).as_secs_f64() / secs;
        self.last = (Instant::now(), done, self.reduce);
        info!(
            step = done,
            epoch,
            loss = format_args!("{:.4}", self.last_mean),
            samples_per_sec = format_args!("{:.0}", samples / secs),
            reduce = format_args!("{:.1}%", 100.0 * share),
            "progress"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_only_flags_are_named_and_defaults_pass() {
        assert!(reject_ring_only(&TrainConfig::default(), "ps").is_ok());
        let cfg = TrainConfig {
            compress: crate::frame::Wire::F16,
            resume: true,
            ..TrainConfig::default()
        };
        let err = reject_ring_only(&cfg, "in-graph").unwrap_err().to_string();
        assert!(
            err.contains("--resume, --compress") && err.contains("in-graph"),
            "{err}"
        );
    }
}
