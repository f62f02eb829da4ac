//! A worker task: the step loop of parameter-server mode, and its client of the ps tasks.
//!
//! The client runs on a dedicated thread with a current-thread tokio runtime, as the
//! ring's [`crate::transport::CommHandle`] does, so QUIC keeps answering while the step
//! loop computes. Each request writes one message to every ps task, then reads every
//! answer; a ps task answers a push only once it has applied it (in sync mode, once every
//! worker has pushed), so the answers are the parameters of the next step.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{info, info_span};

use super::net::{self, CLOSE_DONE, CLOSE_ERROR, Link};
use super::wire::{self, Msg, StreamFail};
use super::{Placement, PsError, PsOptions, Setup, SyncMode};
use crate::cluster::{ClusterSpec, Job, Task};
use crate::data::Sampler;
use crate::model::Workspace;
use crate::train::{self, Summary, TrainConfig, TrainError, Trained, param_digest};
use crate::transport::{Hello, TransportOptions};

/// Runs worker task `index` of `cluster` to completion. Worker 0 is the chief: it sends
/// the initial parameters to the ps tasks and logs progress. Every worker returns the
/// final parameters (after all workers are done) and its summary; the summary is written
/// to `--metrics-out` when one is given.
pub fn run_worker(
    cfg: &TrainConfig,
    opts: &PsOptions,
    cluster: &ClusterSpec,
    index: usize,
) -> Result<Trained, PsError> {
    let me = cluster.task(Job::Worker, index)?;
    let _span = info_span!("worker", task = index).entered();
    let setup = Setup::new(cfg, opts, cluster)?;
    let sampler = Sampler::new(
        setup.data.train_len(),
        cfg.seed,
        index,
        setup.workers,
        cfg.batch_size,
    );
    if sampler.steps_per_epoch() == 0 {
        return Err(TrainError::Config(format!(
            "{} training samples cannot fill one step of {} workers x batch {}; lower \
             --batch-size",
            setup.data.train_len(),
            setup.workers,
            cfg.batch_size
        ))
        .into());
    }
    info!(workers = setup.workers, ps = cluster.ps_count(), placement = %setup.placement.describe(),
          "replica built");

    let ps = cluster.all(Job::Ps);
    let hello = setup.hello(&me);
    let placement = setup.placement.clone();
    let mut client = Client::connect(me, ps, placement, hello, setup.transport.clone())?;
    info!("connected to every ps task");
    match train_loop(cfg, opts, &setup, sampler, me, &mut client) {
        Ok(trained) => {
            client.finish();
            train::write_summary(cfg, &trained.summary)?;
            Ok(trained)
        }
        Err(e) => {
            client.abort(&format!("{me} stopped: {e}"));
            Err(e)
        }
    }
}

fn train_loop(
    cfg: &TrainConfig,
    opts: &PsOptions,
    setup: &Setup,
    mut sampler: Sampler,
    me: Task,
    client: &mut Client,
) -> Result<Trained, PsError> {
    let (model, data, n) = (&setup.model, &setup.data, setup.workers);
    let (b, p) = (cfg.batch_size, model.param_len());
    let mut params = vec![0f32; p];
    if me.index == 0 {
        model.init(cfg.seed, &mut params);
        params = client.call(Request::Init(params))?.params;
        info!("the chief initialised the variables on the ps tasks");
    }
    params = client.call(Request::Pull(params))?.params;

    let mut ws = Workspace::new();
    let (mut x, mut y) = (vec![0f32; b * data.features], vec![0u32; b]);
    let mut grad = vec![0f32; p];
    let per_epoch = sampler.steps_per_epoch() as u64;
    let total = cfg.steps.unwrap_or(cfg.epochs * per_epoch);
    let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is a valid histogram");
    let mut progress = Progress::new(me.index == 0, b * n);
    let bytes_before = (client.sent, client.received);
    let start = Instant::now();

    for step in 0..total {
        let (epoch, in_epoch) = (step / per_epoch, (step % per_epoch) as usize);
        data.gather_train(sampler.batch(epoch, in_epoch), &mut x, &mut y);
        let (loss, _) = model.forward_backward(&params, &x, &y, &mut ws, &mut grad);

        let t = Instant::now();
        let reply = client.call(Request::Push {
            step,
            loss,
            grad,
            params,
        })?;
        let took = t.elapsed();
        (params, grad) = (reply.params, reply.grad);
        let _ = hist.record(took.as_micros().max(1) as u64);
        progress.step(
            step + 1,
            total,
            epoch,
            f64::from(reply.loss),
            took,
            cfg.log_every,
        );
    }
    let train_time = start.elapsed();
    let sent = client.sent - bytes_before.0;
    let received = client.received - bytes_before.1;

    // Done: every ps task answers once all workers are done, with the final values.
    let bye = client.call(Request::Done(params))?;
    let params = bye.params;
    let mut ws = Workspace::new();
    let (_, acc) = model.evaluate(&params, &data.test_x, &data.test_y, &mut ws);
    let secs = train_time.as_secs_f64().max(1e-9);
    let steps = total.max(1) as f64;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let stale = bye.staleness.filter(|_| opts.sync == SyncMode::Async);
    let quantile = |q: f64| stale.as_ref().map(|h| h.value_at_quantile(q) as f64);
    let summary = Summary {
        world_size: n,
        mode: "ps".into(),
        rank: me.index,
        steps: total,
        batch_size: b,
        samples_per_sec: total as f64 * (b * n) as f64 / secs,
        final_loss: progress.window.last_mean,
        test_accuracy: f64::from(acc),
        allreduce_ms_p50: ms(0.5),
        allreduce_ms_p99: ms(0.99),
        comm_fraction: progress.comm.as_secs_f64() / secs,
        bytes_sent_per_step: sent as f64 / steps,
        params: p,
        train_secs: secs,
        param_digest: param_digest(&params).to_hex().to_string(),
        ps_tasks: Some(setup.placement.ps_count()),
        ps_sync: Some(opts.sync.to_string()),
        ps_strategy: Some(opts.strategy.to_string()),
        ps_shard_params: Some(setup.placement.shards().iter().map(|s| s.len()).collect()),
        bytes_received_per_step: Some(received as f64 / steps),
        staleness_p50: quantile(0.5),
        staleness_p99: quantile(0.99),
        staleness_max: stale.as_ref().map(|h| h.max() as f64),
    };
    Ok(Trained { summary, params })
}

/// Progress lines of the chief, and the loss window of the summary.
struct Progress {
    chief: bool,
    global_batch: usize,
    window: LossWindow,
    comm: Duration,
    last: (Instant, u64, Duration),
}

impl Progress {
    fn new(chief: bool, global_batch: usize) -> Progress {
        Progress {
            chief,
            global_batch,
            window: LossWindow::default(),
            comm: Duration::ZERO,
            last: (Instant::now(), 0, Duration::ZERO),
        }
    }

    fn step(&mut self, done: u64, total: u64, epoch: u64, loss: f64, comm: Duration, every: u64) {
        self.window.push(loss);
        self.comm += comm;
        if done % every != 0 && done != total {
            return;
        }
        let loss = self.window.close();
        let secs = self.last.0.elapsed().as_secs_f64().max(1e-9);
        let samples = (done - self.last.1) as f64 * self.global_batch as f64;
        let comm_share = (self.comm - self.last.2).as_secs_f64() / secs;
        self.last = (Instant::now(), done, self.comm);
        if self.chief {
            info!(
                step = done,
                epoch,
                loss = format_args!("{loss:.4}"),
                samples_per_sec = format_args!("{:.0}", samples / secs),
                push_pull = format_args!("{:.0}%", 100.0 * comm_share),
                "progress"
            );
        }
    }
}

/// Mean loss over the steps since the last log line.
#[derive(Debug, Default)]
struct LossWindow {
    sum: f64,
    count: u64,
    last_mean: f64,
}

impl LossWindow {
    fn push(&mut self, loss: f64) {
        self.sum += loss;
        self.count += 1;
    }

    fn close(&mut self) -> f64 {
        self.last_mean = self.sum / self.count.max(1) as f64;
        (self.sum, self.count) = (0.0, 0);
        self.last_mean
    }
}

/// A request from the step loop to the client thread; buffers travel both ways so the
/// loop allocates nothing per step.
enum Request {
    /// The chief's initial parameters, sent to every ps task.
    Init(Vec<f32>),
    /// Fill the buffer with the current parameters.
    Pull(Vec<f32>),
    /// Push this step's gradient; the reply carries the next parameters.
    Push {
        step: u64,
        loss: f32,
        grad: Vec<f32>,
        params: Vec<f32>,
    },
    /// This worker is done; the reply carries the final parameters and statistics.
    Done(Vec<f32>),
}

/// What the client thread answers.
struct Reply {
    params: Vec<f32>,
    grad: Vec<f32>,
    /// The loss the ps task 0 reported (averaged over workers).
    loss: f32,
    /// After [`Request::Done`]: the staleness of every push on every ps task.
    staleness: Option<Histogram<u64>>,
    sent: u64,
    received: u64,
}

type Call = (Request, oneshot::Sender<Result<Reply, PsError>>);

/// The step loop's handle on the ps tasks; calls block until every ps task answered.
///
/// Dropping it without [`Client::finish`] closes the connections with an error code, so
/// the ps tasks stop at once instead of waiting for the peer timeout.
struct Client {
    requests: Option<mpsc::Sender<Call>>,
    thread: Option<std::thread::JoinHandle<()>>,
    finish: Option<oneshot::Sender<Option<String>>>,
    sent: u64,
    received: u64,
}

impl Client {
    /// Binds `me`'s endpoint and connects to every ps task; returns once all agreed.
    fn connect(
        me: Task,
        ps: Vec<Task>,
        placement: Placement,
        hello: Hello,
        opts: TransportOptions,
    ) -> Result<Client, PsError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (req_tx, req_rx) = mpsc::channel(1);
        let (fin_tx, fin_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ringtrain-worker-{}", me.index))
            .spawn(move || client_thread(me, ps, placement, hello, opts, ready_tx, req_rx, fin_rx))
            .map_err(|e| PsError::Quic(format!("cannot start a thread: {e}")))?;
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(PsError::Quic(
                "the worker's network thread died during set-up".into(),
            ))
        });
        let mut client = Client {
            requests: Some(req_tx),
            thread: Some(thread),
            finish: Some(fin_tx),
            sent: 0,
            received: 0,
        };
        match ready {
            Ok(()) => Ok(client),
            Err(e) => {
                client.finish = None;
                client.join();
                Err(e)
            }
        }
    }

    fn call(&mut self, req: Request) -> Result<Reply, PsError> {
        let stopped = || PsError::Quic("the worker's network thread has stopped".into());
        let (tx, rx) = oneshot::channel();
        let sender = self.requests.as_ref().ok_or_else(stopped)?;
        sender.blocking_send((req, tx)).map_err(|_| stopped())?;
        let reply = rx.blocking_recv().map_err(|_| stopped())??;
        (self.sent, self.received) = (reply.sent, reply.received);
        Ok(reply)
    }

    /// Ends the run cleanly: closes the connections with "done".
    fn finish(mut self) {
        if let Some(fin) = self.finish.take() {
            let _ = fin.send(None);
        }
        self.join();
    }

    /// Stops with an error: the ps tasks see the connections closed with `reason`.
    fn abort(mut self, reason: &str) {
        if let Some(fin) = self.finish.take() {
            let _ = fin.send(Some(reason.to_string()));
        }
        self.join();
    }

    fn join(&mut self) {
        self.requests = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(fin) = self.finish.take() {
            let _ = fin.send(Some("the worker stopped".into()));
        }
        self.join();
    }
}

#[allow(clippy::too_many_arguments)]
fn client_thread(
    me: Task,
    ps: Vec<Task>,
    placement: Placement,
    hello: Hello,
    opts: TransportOptions,
    ready: std::sync::mpsc::Sender<Result<(), PsError>>,
    mut requests: mpsc::Receiver<Call>,
    finish: oneshot::Receiver<Option<String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(PsError::Quic(format!("tokio runtime: {e}"))));
            return;
        }
    };
    rt.block_on(async move {
        let ep = match net::bind(&me, &opts) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut links = match connect_all(&ep, &hello, &ps, &placement, &opts).await {
            Ok(links) => Links::new(links, placement),
            Err(e) => {
                net::close_endpoint(&ep, CLOSE_ERROR, &format!("{me} stopped: {e}")).await;
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));

        let mut failed: Option<String> = None;
        while let Some((req, reply)) = requests.recv().await {
            let result = links.serve(req).await;
            if let Err(e) = &result {
                failed = Some(format!("{me} stopped: {e}"));
            }
            let _ = reply.send(result);
            if failed.is_some() {
                break;
            }
        }
        let reason = match failed {
            Some(reason) => Some(reason),
            None => finish.await.unwrap_or(Some("the worker stopped".into())),
        };
        match reason {
            Some(reason) => net::close_endpoint(&ep, CLOSE_ERROR, &reason).await,
            None => {
                // Every ps task has answered our done with its final values: nothing of
                // ours is still in flight, so closing now loses nothing.
                for link in &links.links {
                    link.conn.close(CLOSE_DONE.into(), b"done");
                }
                net::close_endpoint(&ep, CLOSE_DONE, "done").await;
            }
        }
    });
}

/// Dials every ps task at once; the first failure cancels the others.
async fn connect_all(
    ep: &quinn::Endpoint,
    hello: &Hello,
    ps: &[Task],
    placement: &Placement,
    opts: &TransportOptions,
) -> Result<Vec<Link>, PsError> {
    let deadline = tokio::time::Instant::now() + opts.connect_timeout;
    let mut set = JoinSet::new();
    for &task in ps {
        let (ep, hello, opts) = (ep.clone(), hello.clone(), opts.clone());
        let max_frame = wire::max_frame(placement.shard(task.index).len());
        set.spawn(async move { net::dial(&ep, &hello, task, max_frame, deadline, &opts).await });
    }
    let mut links: Vec<Option<Link>> = ps.iter().map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let link = joined.map_err(|e| PsError::Quic(format!("a dialling task failed: {e}")))??;
        let index = link.peer.index;
        links[index] = Some(link);
    }
    Ok(links.into_iter().flatten().collect())
}

/// The worker's connections to the ps tasks, in ps task order.
struct Links {
    links: Vec<Link>,
    placement: Placement,
    /// The version of each ps task's shard in our parameters.
    versions: Vec<u64>,
    scratch: Vec<f32>,
    sent: u64,
    received: u64,
}

impl Links {
    fn new(links: Vec<Link>, placement: Placement) -> Links {
        let versions = vec![0; links.len()];
        Links {
            links,
            placement,
            versions,
            scratch: Vec::new(),
            sent: 0,
            received: 0,
        }
    }

    async fn serve(&mut self, req: Request) -> Result<Reply, PsError> {
        let mut reply = Reply {
            params: Vec::new(),
            grad: Vec::new(),
            loss: f32::NAN,
            staleness: None,
            sent: 0,
            received: 0,
        };
        match req {
            Request::Init(params) => {
                for j in 0..self.links.len() {
                    let values = self.gather(j, &params);
                    self.send(j, Msg::Init { values }).await?;
                }
                reply.params = params;
            }
            Request::Pull(mut params) => {
                for j in 0..self.links.len() {
                    self.send(j, Msg::Pull).await?;
                }
                reply.loss = self.collect(&mut params, None).await?;
                reply.params = params;
            }
            Request::Push {
                step,
                loss,
                grad,
                mut params,
            } => {
                for j in 0..self.links.len() {
                    let grad = self.gather(j, &grad);
                    let based_on = self.versions[j];
                    let push = Msg::Push {
                        step,
                        based_on,
                        loss,
                        grad,
                    };
                    self.send(j, push).await?;
                }
                reply.loss = self.collect(&mut params, None).await?;
                (reply.params, reply.grad) = (params, grad);
            }
            Request::Done(mut params) => {
                for j in 0..self.links.len() {
                    self.send(j, Msg::Done).await?;
                }
                let mut hist = Histogram::new(3).expect("3 significant figures is valid");
                reply.loss = self.collect(&mut params, Some(&mut hist)).await?;
                (reply.params, reply.staleness) = (params, Some(hist));
            }
        }
        (reply.sent, reply.received) = (self.sent, self.received);
        Ok(reply)
    }

    fn gather(&mut self, j: usize, whole: &[f32]) -> Vec<f32> {
        self.scratch.clear();
        self.placement
            .shard(j)
            .gather_into(whole, &mut self.scratch);
        self.scratch.clone()
    }

    async fn send(&mut self, j: usize, msg: Msg) -> Result<(), PsError> {
        let link = &mut self.links[j];
        let n = wire::write_frame(&mut link.send, msg.encode()).await;
        self.sent += n.map_err(|f| fail(link.peer, f))?;
        Ok(())
    }

    /// Reads one answer from every ps task into `params`: [`Msg::Params`], or [`Msg::Bye`]
    /// when `staleness` is given, which collects the ps tasks' histograms. Returns the loss
    /// ps task 0 reported.
    async fn collect(
        &mut self,
        params: &mut [f32],
        mut staleness: Option<&mut Histogram<u64>>,
    ) -> Result<f32, PsError> {
        let mut loss0 = f32::NAN;
        for j in 0..self.links.len() {
            let link = &mut self.links[j];
            let peer = link.peer;
            let frame = wire::read_frame(&mut link.recv, link.max_frame).await;
            let frame = frame.map_err(|f| fail(peer, f))?;
            self.received += 4 + frame.len() as u64;
            let msg = Msg::decode(&frame).map_err(|e| PsError::Protocol {
                peer,
                detail: e.to_string(),
            })?;
            let (version, loss, values) = match (msg, staleness.as_deref_mut()) {
                (
                    Msg::Params {
                        version,
                        loss,
                        values,
                    },
                    None,
                ) => (version, loss, values),
                (
                    Msg::Bye {
                        version,
                        loss,
                        staleness: buckets,
                        values,
                    },
                    Some(hist),
                ) => {
                    for (value, count) in buckets {
                        let _ = hist.record_n(value, count);
                    }
                    (version, loss, values)
                }
                (other, _) => {
                    let detail = format!("sent {} out of turn", other.name());
                    return Err(PsError::Protocol { peer, detail });
                }
            };
            let shard = self.placement.shard(j);
            if values.len() != shard.len() {
                let detail = format!(
                    "sent {} values for a shard of {}",
                    values.len(),
                    shard.len()
                );
                return Err(PsError::Protocol { peer, detail });
            }
            shard.scatter(&values, params);
            self.versions[j] = version;
            if j == 0 {
                loss0 = loss;
            }
        }
        Ok(loss0)
    }
}

fn fail(peer: Task, f: StreamFail) -> PsError {
    match f {
        StreamFail::Lost(reason) => PsError::Lost { peer, reason },
        StreamFail::TooLarge { len, max } => PsError::Protocol {
            peer,
            detail: format!("sent a frame of {len} bytes, more than the agreed {max}"),
        },
    }
}
