//! Elastic training (`--elastic`): the ring shrinks when a rank is lost and grows when a
//! rank (re)joins, without losing a step and without applying one twice.
//!
//! # Two ports per rank
//!
//! Each rank's hosts-file address is its *control* endpoint ([`probe`]): it answers probes
//! ("which rank, which phase, which ring generation, which step, where is your ring port")
//! for the whole life of the process. The ring itself runs over the usual
//! [`CommHandle`] on a second UDP port that the rank picks at start and announces in its
//! probe answers. (Firewalls must let both through; the second port is ephemeral.)
//!
//! # Membership
//!
//! A ring is a sorted list of hosts-file ranks plus a generation number; ring index `i`
//! is the `i`-th member. Both go into the handshake's fingerprint, so ranks with different
//! views of the membership refuse each other, back off and look again. To (re)form a ring a
//! rank probes every hosts-file address ([`decide`]):
//!
//! - if a live rank is still training, it waits (that rank will reach a step boundary or
//!   notice the failure soon) and asks it to let this rank join;
//! - otherwise the new members are all ranks that answered, and the new generation is one
//!   more than the highest generation any of them has seen;
//! - before the very first ring (every live rank at generation 0) it waits for every
//!   hosts-file rank, for at most half of `--connect-timeout`, then starts with the ranks
//!   that are up.
//!
//! The rank then publishes that ring as its *proposal* in its probe answers, and dials
//! only once every member proposes the same ring ([`not_ready`]). This barrier makes the
//! members' attempts start together: without it, one failed attempt closes its endpoint
//! while the neighbours' attempts are under way, and the failure can chase itself around
//! the ring. A failed attempt withdraws the proposal and backs off before the next look.
//!
//! Everything is bounded by `--connect-timeout` per re-formation; then the rank stops with
//! [`ElasticError::NoRing`].
//!
//! # No step lost, none applied twice
//!
//! When the all-reduce of step `s` fails, some survivors may have received the complete
//! sum (and applied step `s`), others not. Whoever received it holds a valid state of step
//! `s + 1`: the sum included every rank's gradient. So after a ring forms, its members
//! exchange a claim `(generation, step)` of their state ([`choose_root`]) and the member
//! with the highest claim (lowest ring index among equals) sends its parameters, optimizer
//! state and data position to all others. Nothing is rolled back and nothing is replayed:
//! members that missed the last sum take it from the root. A restarted rank claims
//! generation 0, step 0, so it never wins against a rank of a running ring.
//!
//! The state travels in one all-reduce in which every member but the root contributes
//! `-0.0`: `x + (-0.0)` is exactly `x` for every `x` (including `+0.0`), in any order, so
//! all members end with the root's bits (`pack` says the layout). A digest check follows.
//!
//! # Joining
//!
//! A rank that finds a ring training without it sets a flag at the members it probes.
//! Members carry the flag in one extra slot of each step's gradient buffer, so after the
//! all-reduce all of them know at the same step, finish that step and re-form the ring at
//! the step boundary with the newcomer, which then receives the state as above.
//!
//! # Global batch, learning rate and data
//!
//! The batch per rank (`--batch-size B`) stays fixed, so the global batch is `N * B` for a
//! ring of `N` members and shrinks or grows with the ring; the learning rate is *not*
//! changed, and the gradients are averaged over the current `N`. (Scaling the learning
//! rate linearly with `N` is a common alternative; we leave that to the user.)
//!
//! The data order is the same per-epoch permutation as in the non-elastic run; the state
//! carries the position reached in the current epoch. A step of a ring of `N` members takes
//! the next `N * B` samples of the permutation, member `i` the ones at offsets
//! `i, i + N, ..`; when fewer than `N * B` remain, the next epoch begins. Without a
//! membership change this is exactly what [`Sampler`](crate::data::Sampler) does, so an
//! elastic run equals the non-elastic one up to summation order. The run ends after
//! `--steps` steps or, without it, after `epochs * (train_len / (hosts * B))` steps, counted
//! with the hosts file's size whatever the ring's size is.
//!
//! # Limits
//!
//! - No quorum: a network partition can leave two rings training apart.
//! - Elastic mode keeps its state in the processes only; `--checkpoint-dir` and `--resume`
//!   are refused. If every rank dies, the run is lost.
//! - For tests and demonstrations, `RINGTRAIN_ELASTIC_STEP_PAUSE_MS` makes every rank
//!   sleep that long after each step.

pub mod probe;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tracing::{debug, info, warn};

use crate::auth::Security;
use crate::collective::CommError;
use crate::data::{Dataset, epoch_permutation};
use crate::model::{Mlp, Workspace};
use crate::optim::Optimizer;
use crate::ring::Rank;
use crate::train::{self, Summary, TrainConfig, TrainError, Trained, param_digest};
use crate::transport::{
    CommHandle, Hello, PROTOCOL_VERSION, RingPlace, TransportError, TransportOptions,
};
use probe::{Control, PeerStatus, Phase, ProbeRequest, Proposal};

/// Environment variable: milliseconds every rank sleeps after each step (tests, demos).
pub const STEP_PAUSE_ENV: &str = "RINGTRAIN_ELASTIC_STEP_PAUSE_MS";

/// How long to wait between looks at the peers while some of them are still training.
const POLL: Duration = Duration::from_millis(200);
/// How long one attempt to form a ring may take before the rank looks again.
const ATTEMPT: Duration = Duration::from_secs(5);
/// Fingerprint fields that differ between ranks whose views of the membership differ.
const VIEW_FIELDS: [&str; 2] = ["elastic_generation", "elastic_members"];
/// `f32` values per `u64`: four 16-bit pieces, each exact in an `f32` and in sums of one
/// such value with zeros.
const PIECES: usize = 4;

/// Why an elastic run stopped.
#[derive(Debug, thiserror::Error)]
pub enum ElasticError {
    /// No ring could be formed in time.
    #[error(
        "could not form a ring within {secs} s (live ranks seen: {live:?}; last problem: \
         {last}); check that the other ranks run with --elastic and the same flags and hosts \
         file, or raise --connect-timeout"
    )]
    NoRing {
        /// The time allowed, `--connect-timeout`.
        secs: u64,
        /// Hosts-file ranks that answered the last probe, this one included.
        live: Vec<usize>,
        /// What went wrong last.
        last: String,
    },
    /// The run is over; there is nothing to join.
    #[error("rank {peer} reports that the run has finished; there is no ring left to join")]
    RunFinished {
        /// The rank that answered so.
        peer: usize,
    },
    /// A member sent a claim or a state that cannot be used.
    #[error("ring member {member} (hosts rank {rank}) sent an unusable {what}: {detail}")]
    BadState {
        /// Its index in the ring.
        member: usize,
        /// Its hosts-file rank.
        rank: usize,
        /// `"claim"` or `"state"`.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
}

impl ElasticError {
    /// The process exit code: 3, like any other lost or misbehaving peer.
    pub fn exit_code(&self) -> i32 {
        3
    }
}

/// What a rank does after looking at its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Look again shortly, for the reason given.
    Wait(String),
    /// Propose the ring of these hosts-file ranks (sorted) at this generation.
    Form(Proposal),
    /// This rank answered that the run is over.
    Finished(usize),
}

/// Decides, from this rank's status and the statuses of the peers that answered, whether
/// to form a ring now and with whom. `wait_for_all` says whether a first ring (nobody has
/// formed one yet) should still wait for missing ranks.
pub fn decide(
    mine: &PeerStatus,
    hosts: usize,
    peers: &[PeerStatus],
    wait_for_all: bool,
) -> Decision {
    if let Some(done) = peers.iter().find(|p| p.phase == Phase::Finished) {
        return Decision::Finished(done.rank);
    }
    let training: Vec<usize> = peers
        .iter()
        .filter(|p| p.phase == Phase::Training)
        .map(|p| p.rank)
        .collect();
    if !training.is_empty() {
        return Decision::Wait(format!(
            "ranks {training:?} are still training; waiting for a step boundary"
        ));
    }
    let seen = peers.iter().map(|p| p.generation).max().unwrap_or(0);
    let generation = seen.max(mine.generation) + 1;
    let mut members: Vec<usize> = peers.iter().map(|p| p.rank).collect();
    members.push(mine.rank);
    members.sort_unstable();
    members.dedup();
    if generation == 1 && members.len() < hosts && wait_for_all {
        return Decision::Wait(format!(
            "{} of {hosts} ranks are up for the first ring",
            members.len()
        ));
    }
    Decision::Form(Proposal {
        generation,
        members,
    })
}

/// The members of `proposal` other than `me` that do not propose the same ring (or did not
/// answer); empty when every member is ready to form it.
pub fn not_ready(proposal: &Proposal, me: usize, peers: &[PeerStatus]) -> Vec<usize> {
    proposal
        .members
        .iter()
        .copied()
        .filter(|&r| r != me)
        .filter(|&r| {
            let theirs = peers.iter().find(|p| p.rank == r);
            theirs.and_then(|p| p.proposal.as_ref()) != Some(proposal)
        })
        .collect()
}

/// Writes `v` as four exact 16-bit pieces, low first.
fn put_u64(out: &mut [f32], v: u64) {
    for (i, slot) in out[..PIECES].iter_mut().enumerate() {
        *slot = ((v >> (16 * i)) & 0xffff) as f32;
    }
}

/// Reads a `u64` written by [`put_u64`]; `None` if a piece is not a 16-bit integer.
fn get_u64(pieces: &[f32]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &p) in pieces.get(..PIECES)?.iter().enumerate() {
        if !(p.fract() == 0.0 && (0.0..65536.0).contains(&p)) {
            return None;
        }
        v |= (p as u64) << (16 * i);
    }
    Some(v)
}

/// Length of one member's claim: `(generation, step)`.
const CLAIM: usize = 2 * PIECES;

/// The claim buffer of ring member `index` of `world`: its `(generation, step)` in its own
/// slot, zeros elsewhere, so the sum over the ring holds every member's claim exactly.
pub fn claim_buffer(index: usize, world: usize, generation: u64, step: u64) -> Vec<f32> {
    let mut buf = vec![0f32; world * CLAIM];
    put_u64(&mut buf[index * CLAIM..], generation);
    put_u64(&mut buf[index * CLAIM + PIECES..], step);
    buf
}

/// Reads every member's claim from a summed claim buffer; `Err(member)` names the first
/// unreadable one.
pub fn read_claims(sum: &[f32]) -> Result<Vec<(u64, u64)>, usize> {
    sum.chunks(CLAIM)
        .enumerate()
        .map(|(i, c)| {
            let generation = get_u64(c).ok_or(i)?;
            let step = get_u64(&c[PIECES.min(c.len())..]).ok_or(i)?;
            Ok((generation, step))
        })
        .collect()
}

/// The ring index whose state everyone takes: the highest `(generation, step)`, the lowest
/// index among equals. `None` for an empty ring.
pub fn choose_root(claims: &[(u64, u64)]) -> Option<usize> {
    let best = claims.iter().max()?;
    claims.iter().position(|c| c == best)
}

/// The training state that a ring's members share.
#[derive(Debug, Clone)]
struct State {
    params: Vec<f32>,
    optimizer: Optimizer,
    /// Steps completed.
    step: u64,
    /// Epoch of the data order.
    epoch: u64,
    /// Samples of the epoch's permutation already consumed.
    pos: u64,
    /// Generation of the ring that last changed the state (0: fresh from the seed).
    generation: u64,
}

const META: usize = 5 * PIECES;

/// The state as one buffer: the parameters, the optimizer's buffers in the order of
/// [`Optimizer::state`], then the optimizer's step count, the step, the epoch, the
/// position and the generation as 16-bit pieces.
fn pack(s: &State) -> Vec<f32> {
    let (opt_steps, buffers) = s.optimizer.state();
    let mut out = s.params.clone();
    for (_, b) in &buffers {
        out.extend_from_slice(b);
    }
    let at = out.len();
    out.resize(at + META, 0.0);
    for (i, v) in [opt_steps, s.step, s.epoch, s.pos, s.generation]
        .into_iter()
        .enumerate()
    {
        put_u64(&mut out[at + i * PIECES..], v);
    }
    out
}

/// The length of [`pack`]'s buffer.
fn packed_len(s: &State) -> usize {
    s.params.len() * (1 + s.optimizer.state().1.len()) + META
}

/// Takes the state from a buffer written by [`pack`] with the same model and optimizer.
fn unpack(s: &mut State, buf: &[f32]) -> Result<(), String> {
    let p = s.params.len();
    let names: Vec<&'static str> = s.optimizer.state().1.iter().map(|(n, _)| *n).collect();
    let want = packed_len(s);
    if buf.len() != want {
        return Err(format!("{} values, expected {want}", buf.len()));
    }
    let meta: Vec<u64> = buf[want - META..]
        .chunks(PIECES)
        .map(get_u64)
        .collect::<Option<_>>()
        .ok_or("the step counters are not 16-bit pieces")?;
    let buffers: Vec<(String, Vec<f32>)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), buf[p * (i + 1)..p * (i + 2)].to_vec()))
        .collect();
    s.optimizer.restore(meta[0], &buffers)?;
    s.params.copy_from_slice(&buf[..p]);
    (s.step, s.epoch, s.pos, s.generation) = (meta[1], meta[2], meta[3], meta[4]);
    Ok(())
}

/// Ring member `index` of `world` takes these offsets of the permutation for the step
/// that starts at `pos`: `pos + index + k * world` for `k` in `0..batch`.
pub fn member_batch(
    pos: usize,
    index: usize,
    world: usize,
    batch: usize,
) -> impl Iterator<Item = usize> {
    (0..batch).map(move |k| pos + index + k * world)
}

/// One formed ring.
struct Ring {
    comm: CommHandle,
    members: Vec<usize>,
    index: usize,
    generation: u64,
}

/// How a ring's training ended.
enum Outcome {
    /// The last step is done and the digests agree.
    Done,
    /// A rank asked to join: re-form at this step boundary.
    Join,
    /// The ring broke.
    Lost(CommError),
}

/// Why agreeing on the state failed.
enum AgreeError {
    /// The ring broke: form another.
    Retry(CommError),
    /// Nothing to retry.
    Fatal(TrainError),
}

/// Timings and counters over all rings of one run.
struct Stats {
    hist: Histogram<u64>,
    comm_time: Duration,
    samples: u64,
    steps_run: u64,
    bytes_sent: u64,
    window: (f64, u64),
    last_loss: f64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Histogram::new(3).expect("3 significant figures is a valid histogram"),
            comm_time: Duration::ZERO,
            samples: 0,
            steps_run: 0,
            bytes_sent: 0,
            window: (0.0, 0),
            last_loss: 0.0,
        }
    }

    fn close_window(&mut self) -> f64 {
        self.last_loss = self.window.0 / self.window.1.max(1) as f64;
        self.window = (0.0, 0);
        self.last_loss
    }
}

/// The permutation of the current epoch, computed once per epoch.
struct EpochOrder {
    train_len: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl EpochOrder {
    fn get(&mut self, epoch: u64) -> &[usize] {
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let perm = epoch_permutation(self.train_len, self.seed, epoch);
            self.cached = Some((epoch, perm));
        }
        &self.cached.as_ref().expect("filled above").1
    }
}

/// One elastic rank.
struct Elastic<'a> {
    cfg: &'a TrainConfig,
    model: &'a Mlp,
    data: &'a Dataset,
    me: usize,
    hosts: Vec<SocketAddr>,
    control: Control,
    opts: TransportOptions,
    fingerprint: BTreeMap<String, String>,
    total: u64,
    pause: Duration,
}

/// Runs one rank in elastic mode: `place.rank` is this rank's line in the hosts file and
/// `place.addrs` the whole file. Returns when the ring has taken the last step.
pub fn run(cfg: &TrainConfig, place: RingPlace) -> Result<Trained, TrainError> {
    train::validate(cfg)?;
    if cfg.resume || cfg.checkpoint_dir.is_some() {
        return Err(TrainError::Config(
            "--elastic keeps its state in the running ranks and does not write or resume \
             checkpoints yet; drop --checkpoint-dir and --resume"
                .into(),
        ));
    }
    if cfg.compress != crate::frame::Wire::F32 {
        return Err(TrainError::Config(
            "--elastic sends gradients in full f32 and does not implement --compress yet; \
             drop --compress (or --elastic)"
                .into(),
        ));
    }
    let pause = step_pause()?;
    let security = Security::resolve(cfg.key.as_deref(), cfg.insecure, &place.addrs)?;
    let (me, hosts) = (place.rank.0, place.addrs);
    let Some(&my_addr) = hosts.get(me) else {
        return Err(TrainError::Config(format!(
            "rank {me} is not in a hosts file of {} addresses",
            hosts.len()
        )));
    };
    let data = Dataset::load(&cfg.data, cfg.seed)?;
    let model = Mlp::new(data.features, &cfg.hidden, data.classes);
    let full = hosts.len() * cfg.batch_size;
    if data.train_len() < full {
        return Err(TrainError::Config(format!(
            "{} training samples cannot fill one step of {} ranks x batch {}; lower \
             --batch-size",
            data.train_len(),
            hosts.len(),
            cfg.batch_size
        )));
    }
    let total = cfg
        .steps
        .unwrap_or(cfg.epochs * (data.train_len() / full) as u64);

    let mut state = State {
        params: vec![0f32; model.param_len()],
        optimizer: Optimizer::new(cfg.optim.clone(), model.param_len()),
        step: 0,
        epoch: 0,
        pos: 0,
        generation: 0,
    };
    model.init(cfg.seed, &mut state.params);
    let opts = TransportOptions {
        connect_timeout: cfg.connect_timeout,
        peer_timeout: cfg.peer_timeout,
        segment: cfg.segment,
        security,
        wire: crate::frame::Wire::F32,
    };
    let status = PeerStatus {
        rank: me,
        phase: Phase::Forming,
        generation: 0,
        members: Vec::new(),
        step: 0,
        data_addr: pick_data_addr(Rank(me), my_addr)?,
        proposal: None,
    };
    let control = Control::start(my_addr, &opts, status)?;
    let mut fingerprint = train::fingerprint(cfg, &model, &data);
    fingerprint.insert("mode".into(), "elastic".into());
    info!(
        rank = me,
        hosts = hosts.len(),
        total,
        "elastic rank started"
    );
    let mut el = Elastic {
        cfg,
        model: &model,
        data: &data,
        me,
        hosts,
        control,
        opts,
        fingerprint,
        total,
        pause,
    };
    el.run(&mut state)
}

impl Elastic<'_> {
    fn run(&mut self, state: &mut State) -> Result<Trained, TrainError> {
        let mut stats = Stats::new();
        let start = Instant::now();
        let world = loop {
            let mut ring = match self.form() {
                Ok(ring) => ring,
                // The others finished while this rank lost its ring in the final digest
                // check: its last all-reduce completed, so its state is the final one.
                Err(TrainError::Elastic(ElasticError::RunFinished { peer }))
                    if state.step >= self.total =>
                {
                    warn!(
                        rank = self.me,
                        peer, "the run finished elsewhere during the final digest check"
                    );
                    self.control.set_phase(Phase::Finished);
                    break self.control.status().members.len().max(1);
                }
                Err(e) => return Err(e),
            };
            match self.agree(&mut ring, state) {
                Ok(()) => {}
                Err(AgreeError::Retry(e)) => {
                    warn!(
                        rank = self.me,
                        "the new ring broke while agreeing: {e}; re-forming"
                    );
                    ring.comm.abort(&format!("rank {} re-forms: {e}", self.me));
                    continue;
                }
                Err(AgreeError::Fatal(e)) => {
                    ring.comm.abort(&format!("rank {} stopped: {e}", self.me));
                    return Err(e);
                }
            }
            let outcome = self.train(&mut ring, state, &mut stats);
            stats.bytes_sent += ring.comm.bytes_sent();
            match outcome {
                Ok(Outcome::Done) => {
                    self.control.set_phase(Phase::Finished);
                    ring.comm.finish();
                    break ring.members.len();
                }
                Ok(Outcome::Join) => {
                    info!(
                        rank = self.me,
                        step = state.step,
                        "a rank asks to join; re-forming"
                    );
                    ring.comm.finish();
                }
                Ok(Outcome::Lost(e)) => {
                    warn!(
                        rank = self.me,
                        step = state.step,
                        "lost the ring: {e}; re-forming"
                    );
                    ring.comm.abort(&format!("rank {} re-forms: {e}", self.me));
                }
                Err(e) => {
                    ring.comm.finish();
                    return Err(e);
                }
            }
        };
        let summary = self.summary(world, start.elapsed(), &stats, state);
        train::write_summary(self.cfg, &summary)?;
        Ok(Trained {
            summary,
            params: state.params.clone(),
        })
    }

    /// Looks at the peers until a ring forms; see the module docs.
    fn form(&mut self) -> Result<Ring, TrainError> {
        self.control.set_phase(Phase::Forming);
        let start = Instant::now();
        let deadline = start + self.cfg.connect_timeout;
        let wait_all_until = start + self.cfg.connect_timeout / 2;
        let mut last = String::from("no answer yet");
        let mut live = vec![self.me];
        let mut tries = 0u32;
        while Instant::now() < deadline {
            let mine = self.control.status();
            let peers = self.look();
            live = peers.iter().map(|p| p.rank).chain([self.me]).collect();
            live.sort_unstable();
            let wait_for_all = Instant::now() < wait_all_until;
            let proposal = match decide(&mine, self.hosts.len(), &peers, wait_for_all) {
                Decision::Finished(peer) => return Err(ElasticError::RunFinished { peer }.into()),
                Decision::Wait(why) => {
                    debug!(rank = self.me, "{why}");
                    self.control.update(|s| s.proposal = None);
                    last = why;
                    std::thread::sleep(POLL);
                    continue;
                }
                Decision::Form(proposal) => proposal,
            };
            self.control.update(|s| s.proposal = Some(proposal.clone()));
            let waiting = not_ready(&proposal, self.me, &peers);
            if !waiting.is_empty() {
                last = format!("ranks {waiting:?} do not propose {proposal:?} yet");
                debug!(rank = self.me, "{last}");
                std::thread::sleep(POLL / 4);
                continue;
            }
            match self.connect(&proposal, &peers) {
                Ok(ring) => return Ok(ring),
                Err(e) if is_fatal(&e) => return Err(e.into()),
                Err(e) => {
                    if let TransportError::Bind { rank, addr, .. } = &e {
                        // Someone took our ring port meanwhile: pick another one.
                        let fresh = pick_data_addr(*rank, *addr)?;
                        self.control.update(|s| s.data_addr = fresh);
                    }
                    info!(rank = self.me, ?proposal, "ring not formed: {e}");
                    last = e.to_string();
                    // Withdraw, and let the other members' attempts end too before all
                    // propose again; ranks back off by different amounts.
                    self.control.update(|s| s.proposal = None);
                    tries += 1;
                    let ms = 250 + 50 * (self.me as u64 % 4) * u64::from(tries.min(4));
                    std::thread::sleep(Duration::from_millis(ms));
                }
            }
        }
        let secs = self.cfg.connect_timeout.as_secs();
        Err(ElasticError::NoRing { secs, live, last }.into())
    }

    /// Probes every other hosts-file rank; returns the statuses of those that answered.
    fn look(&self) -> Vec<PeerStatus> {
        let request = ProbeRequest {
            from: self.me,
            join: true,
        };
        // A dead rank never answers, so every look costs this much while one is missing.
        let limit = (self.cfg.peer_timeout / 4).clamp(Duration::from_millis(250), ATTEMPT / 2);
        let others: Vec<usize> = (0..self.hosts.len()).filter(|&r| r != self.me).collect();
        let targets: Vec<SocketAddr> = others.iter().map(|&r| self.hosts[r]).collect();
        let answers = self.control.probe(&targets, &request, limit);
        let mut peers = Vec::new();
        for (rank, answer) in others.into_iter().zip(answers) {
            match answer {
                Some(s) if s.rank != rank => warn!(
                    addr = %self.hosts[rank],
                    "the rank at hosts line {rank} answers as rank {}; ignoring it",
                    s.rank
                ),
                Some(s) => peers.push(s),
                None => {}
            }
        }
        peers
    }

    /// Forms the ring of `members` at `generation` over their announced ring ports.
    fn connect(&self, proposal: &Proposal, peers: &[PeerStatus]) -> Result<Ring, TransportError> {
        let (members, generation) = (&proposal.members[..], proposal.generation);
        let mine = self.control.status();
        let index = members
            .iter()
            .position(|&r| r == self.me)
            .expect("invariant: decide() always includes this rank");
        let addrs = members
            .iter()
            .map(|&r| match peers.iter().find(|p| p.rank == r) {
                Some(p) => p.data_addr,
                None => mine.data_addr,
            })
            .collect();
        let mut fingerprint = self.fingerprint.clone();
        fingerprint.insert(VIEW_FIELDS[0].into(), generation.to_string());
        fingerprint.insert(VIEW_FIELDS[1].into(), format!("{members:?}"));
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            rank: index,
            world: members.len(),
            fingerprint,
        };
        let opts = TransportOptions {
            connect_timeout: ATTEMPT.min(self.cfg.connect_timeout),
            ..self.opts.clone()
        };
        let place = RingPlace {
            rank: Rank(index),
            addrs,
        };
        let comm = CommHandle::connect(place, hello, opts)?;
        info!(rank = self.me, ?members, generation, "ring formed");
        // Training from here on, as far as probes can tell: a rank that wants to join now
        // gets its request noted and carried into the first step.
        self.control.update(|s| {
            s.generation = generation;
            s.members = members.to_vec();
            s.phase = Phase::Training;
            s.proposal = None;
        });
        Ok(Ring {
            comm,
            members: members.to_vec(),
            index,
            generation,
        })
    }

    /// Makes every member's state the root's (see [`choose_root`]) and checks it.
    fn agree(&self, ring: &mut Ring, state: &mut State) -> Result<(), AgreeError> {
        let (n, i) = (ring.members.len(), ring.index);
        let claims = claim_buffer(i, n, state.generation, state.step);
        let sum = ring.comm.allreduce_sum(claims).map_err(AgreeError::Retry)?;
        let claims = read_claims(&sum).map_err(|member| {
            AgreeError::Fatal(self.bad(ring, member, "claim", "not 16-bit pieces".into()))
        })?;
        let root = choose_root(&claims).expect("invariant: a ring has at least one member");

        let packed = if i == root {
            pack(state)
        } else {
            vec![-0.0f32; packed_len(state)]
        };
        let packed = ring.comm.allreduce_sum(packed).map_err(AgreeError::Retry)?;
        unpack(state, &packed).map_err(|e| AgreeError::Fatal(self.bad(ring, root, "state", e)))?;
        state.generation = ring.generation;
        match ring.comm.check_same(param_digest(&packed).as_bytes()) {
            Ok(()) => {}
            Err(e @ CommError::Diverged(_)) => return Err(AgreeError::Fatal(e.into())),
            Err(e) => return Err(AgreeError::Retry(e)),
        }
        self.control.update(|s| s.step = state.step);
        info!(
            rank = self.me,
            generation = ring.generation,
            world = n,
            step = state.step,
            from = ring.members[root],
            "state agreed"
        );
        Ok(())
    }

    fn bad(&self, ring: &Ring, member: usize, what: &'static str, detail: String) -> TrainError {
        let rank = ring.members.get(member).copied().unwrap_or(usize::MAX);
        ElasticError::BadState {
            member,
            rank,
            what,
            detail,
        }
        .into()
    }

    /// Trains in `ring` until the last step, a join request or a failure.
    fn train(
        &self,
        ring: &mut Ring,
        state: &mut State,
        stats: &mut Stats,
    ) -> Result<Outcome, TrainError> {
        let (n, i) = (ring.members.len(), ring.index);
        let (b, features, p) = (self.cfg.batch_size, self.data.features, state.params.len());
        let global = (n * b) as u64;
        let train_len = self.data.train_len() as u64;
        let scale = 1.0 / n as f32;
        let mut order = EpochOrder {
            train_len: self.data.train_len(),
            seed: self.cfg.seed,
            cached: None,
        };
        let mut ws = Workspace::new();
        let (mut x, mut y) = (vec![0f32; b * features], vec![0u32; b]);
        let mut idx = Vec::with_capacity(b);
        // Two extra slots: this rank's loss, and whether someone asked it to let them join.
        let mut grad = vec![0f32; p + 2];

        while state.step < self.total {
            if state.pos + global > train_len {
                (state.epoch, state.pos) = (state.epoch + 1, 0);
            }
            let perm = order.get(state.epoch);
            idx.clear();
            idx.extend(member_batch(state.pos as usize, i, n, b).map(|o| perm[o]));
            self.data.gather_train(&idx, &mut x, &mut y);
            let (loss, _) =
                self.model
                    .forward_backward(&state.params, &x, &y, &mut ws, &mut grad[..p]);
            grad[p] = loss;
            grad[p + 1] = if self.control.join_requested() {
                1.0
            } else {
                0.0
            };

            let t = Instant::now();
            grad = match ring.comm.allreduce_sum(grad) {
                Ok(g) => g,
                Err(e) => return Ok(Outcome::Lost(e)),
            };
            let took = t.elapsed();
            stats.comm_time += took;
            let _ = stats.hist.record(took.as_micros().max(1) as u64);

            grad.iter_mut().for_each(|g| *g *= scale);
            state.optimizer.step(&mut state.params, &grad[..p]);
            (state.step, state.pos) = (state.step + 1, state.pos + global);
            self.control.update(|s| s.step = state.step);
            stats.window = (stats.window.0 + f64::from(grad[p]), stats.window.1 + 1);
            (stats.samples, stats.steps_run) = (stats.samples + global, stats.steps_run + 1);

            let done = state.step;
            if self.cfg.check_every > 0 && done % self.cfg.check_every == 0 {
                match ring.comm.check_same(param_digest(&state.params).as_bytes()) {
                    Ok(()) => {}
                    Err(e @ CommError::Diverged(_)) => return Err(e.into()),
                    Err(e) => return Ok(Outcome::Lost(e)),
                }
            }
            if done % self.cfg.log_every == 0 || done == self.total {
                let loss = stats.close_window();
                if i == 0 {
                    info!(
                        step = done,
                        epoch = state.epoch,
                        world = n,
                        loss = format_args!("{loss:.4}"),
                        "progress"
                    );
                }
            }
            if grad[p + 1] > 0.0 && done < self.total {
                return Ok(Outcome::Join);
            }
            if !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
        }
        match ring.comm.check_same(param_digest(&state.params).as_bytes()) {
            Ok(()) => Ok(Outcome::Done),
            Err(e @ CommError::Diverged(_)) => Err(e.into()),
            Err(e) => Ok(Outcome::Lost(e)),
        }
    }

    fn summary(&self, world: usize, t: Duration, stats: &Stats, state: &State) -> Summary {
        let mut ws = Workspace::new();
        let (_, acc) =
            self.model
                .evaluate(&state.params, &self.data.test_x, &self.data.test_y, &mut ws);
        let secs = t.as_secs_f64().max(1e-9);
        let ms = |q: f64| stats.hist.value_at_quantile(q) as f64 / 1000.0;
        Summary {
            world_size: world,
            mode: "ring".into(),
            rank: self.me,
            steps: state.step,
            batch_size: self.cfg.batch_size,
            samples_per_sec: stats.samples as f64 / secs,
            final_loss: stats.last_loss,
            test_accuracy: f64::from(acc),
            allreduce_ms_p50: ms(0.5),
            allreduce_ms_p99: ms(0.99),
            comm_fraction: stats.comm_time.as_secs_f64() / secs,
            bytes_sent_per_step: stats.bytes_sent as f64 / stats.steps_run.max(1) as f64,
            params: state.params.len(),
            train_secs: secs,
            param_digest: param_digest(&state.params).to_hex().to_string(),
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
}

/// Errors that another look at the peers cannot fix: a configuration that differs in more
/// than the membership view, an untrusted peer, a broken local set-up.
fn is_fatal(e: &TransportError) -> bool {
    match e {
        TransportError::Mismatch { fields, .. } => fields
            .iter()
            .any(|(name, _, _)| !VIEW_FIELDS.contains(&name.as_str())),
        TransportError::Untrusted { .. } | TransportError::Auth(_) | TransportError::Config(_) => {
            true
        }
        _ => false,
    }
}

/// A free UDP port on the interface of `host` for this rank's ring endpoint.
fn pick_data_addr(rank: Rank, host: SocketAddr) -> Result<SocketAddr, TransportError> {
    let probe = SocketAddr::new(host.ip(), 0);
    let bind = crate::transport::bind_addr(probe);
    let socket = std::net::UdpSocket::bind(bind).map_err(|source| TransportError::Bind {
        rank,
        addr: probe,
        source,
    })?;
    let port = socket
        .local_addr()
        .map_err(|source| TransportError::Bind {
            rank,
            addr: probe,
            source,
        })?
        .port();
    Ok(SocketAddr::new(host.ip(), port))
}

fn step_pause() -> Result<Duration, TrainError> {
    match std::env::var(STEP_PAUSE_ENV) {
        Err(_) => Ok(Duration::ZERO),
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| {
                TrainError::Config(format!(
                    "{STEP_PAUSE_ENV} must be a whole number of milliseconds, got {v:?}"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::collective::run_in_memory;
    use crate::data::Sampler;
    use crate::optim::OptimConfig;
    use crate::ring::WorldSize;

    fn status(rank: usize, phase: Phase, generation: u64) -> PeerStatus {
        PeerStatus {
            rank,
            phase,
            generation,
            members: Vec::new(),
            step: 0,
            data_addr: "127.0.0.1:1".parse().unwrap(),
            proposal: None,
        }
    }

    #[test]
    fn compress_is_refused_before_anything_is_bound() {
        let cfg = TrainConfig {
            elastic: true,
            compress: crate::frame::Wire::Bf16,
            ..TrainConfig::default()
        };
        let place = RingPlace {
            rank: Rank(0),
            addrs: vec![
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
        };
        let err = run(&cfg, place).unwrap_err().to_string();
        assert!(
            err.contains("--compress") && err.contains("--elastic"),
            "{err}"
        );
    }

    #[test]
    fn a_training_peer_makes_the_rank_wait() {
        let mine = status(3, Phase::Forming, 0);
        let peers = [status(0, Phase::Training, 2), status(1, Phase::Forming, 2)];
        assert!(matches!(decide(&mine, 4, &peers, false), Decision::Wait(_)));
    }

    #[test]
    fn survivors_form_the_next_generation_without_the_lost_rank() {
        let mine = status(2, Phase::Forming, 1);
        let peers = [status(0, Phase::Forming, 1), status(1, Phase::Forming, 1)];
        let want = Proposal {
            members: vec![0, 1, 2],
            generation: 2,
        };
        assert_eq!(decide(&mine, 4, &peers, true), Decision::Form(want.clone()));

        let mut ready = peers.clone();
        assert_eq!(not_ready(&want, 2, &ready), vec![0, 1]);
        ready[0].proposal = Some(want.clone());
        assert_eq!(not_ready(&want, 2, &ready), vec![1]);
        ready[1].proposal = Some(Proposal {
            generation: 3,
            ..want.clone()
        });
        assert_eq!(not_ready(&want, 2, &ready), vec![1]);
        ready[1].proposal = Some(want.clone());
        assert!(not_ready(&want, 2, &ready).is_empty());
        assert_eq!(
            not_ready(&want, 2, &ready[..1]),
            vec![1],
            "no answer: not ready"
        );
    }

    #[test]
    fn the_first_ring_waits_for_every_rank_until_told_not_to() {
        let mine = status(0, Phase::Forming, 0);
        let peers = [status(2, Phase::Forming, 0)];
        assert!(matches!(decide(&mine, 3, &peers, true), Decision::Wait(_)));
        let want = Proposal {
            members: vec![0, 2],
            generation: 1,
        };
        assert_eq!(decide(&mine, 3, &peers, false), Decision::Form(want));
    }

    #[test]
    fn a_finished_peer_ends_the_search() {
        let mine = status(0, Phase::Forming, 0);
        let peers = [status(1, Phase::Finished, 3)];
        assert_eq!(decide(&mine, 2, &peers, false), Decision::Finished(1));
    }

    #[test]
    fn the_highest_claim_wins_and_the_lowest_index_breaks_ties() {
        assert_eq!(choose_root(&[(1, 5), (1, 6), (1, 6), (0, 0)]), Some(1));
        assert_eq!(choose_root(&[(0, 0), (2, 1), (1, 900)]), Some(1));
        assert_eq!(choose_root(&[]), None);
    }

    proptest! {
        #[test]
        fn u64_pieces_round_trip(v in any::<u64>()) {
            let mut buf = [0f32; PIECES];
            put_u64(&mut buf, v);
            prop_assert_eq!(get_u64(&buf), Some(v));
        }

        #[test]
        fn member_batches_take_the_same_samples_as_the_sampler(
            world in 1usize..6, batch in 1usize..5, step in 0usize..3,
        ) {
            let len = 100;
            let perm = epoch_permutation(len, 7, 1);
            for index in 0..world {
                let ours: Vec<usize> = member_batch(step * world * batch, index, world, batch)
                    .map(|o| perm[o])
                    .collect();
                let mut sampler = Sampler::new(len, 7, index, world, batch);
                if step < sampler.steps_per_epoch() {
                    prop_assert_eq!(&ours[..], sampler.batch(1, step));
                }
            }
        }
    }

    #[test]
    fn bad_pieces_are_refused() {
        assert_eq!(get_u64(&[0.5, 0.0, 0.0, 0.0]), None);
        assert_eq!(get_u64(&[65536.0, 0.0, 0.0, 0.0]), None);
        assert_eq!(get_u64(&[f32::NAN, 0.0, 0.0, 0.0]), None);
        assert_eq!(get_u64(&[0.0; 3]), None);
        assert_eq!(read_claims(&[0.0; CLAIM + 1]), Err(1));
    }

    fn sample_state(seed: u32) -> State {
        let mut optimizer = Optimizer::new(OptimConfig::adam(1e-3), 5);
        let mut params: Vec<f32> = (0..5).map(|i| (i as f32 - 2.0) * 0.25).collect();
        params[1] = -0.0;
        params[3] = f32::MIN_POSITIVE / 4.0; // subnormal
        for k in 0..seed {
            let grad: Vec<f32> = (0..5).map(|i| (i + k) as f32 * 0.1).collect();
            optimizer.step(&mut params, &grad);
        }
        State {
            params,
            optimizer,
            step: u64::from(seed) + (1 << 40),
            epoch: 3,
            pos: 12345,
            generation: 7,
        }
    }

    #[test]
    fn the_state_travels_bit_for_bit_through_an_all_reduce_of_negative_zeros() {
        let root_state = sample_state(3);
        let world = WorldSize::new(3).unwrap();
        let packed = pack(&root_state);
        let sums = run_in_memory(world, 2, move |comm| {
            let packed = packed.clone();
            async move {
                let mut comm = comm;
                let mut buf = if comm.rank().0 == 1 {
                    packed
                } else {
                    vec![-0.0f32; packed.len()]
                };
                comm.allreduce_sum(&mut buf).await.unwrap();
                buf
            }
        });
        for sum in sums {
            let mut got = sample_state(0);
            unpack(&mut got, &sum).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.params), bits(&root_state.params));
            assert_eq!(pack(&got), pack(&root_state));
            assert_eq!(
                (got.step, got.epoch, got.pos, got.generation),
                (root_state.step, 3, 12345, 7)
            );
            assert_eq!(got.optimizer.state().0, 3);
        }
    }

    #[test]
    fn a_state_of_the_wrong_length_is_refused() {
        let mut s = sample_state(0);
        let err = unpack(&mut s, &[0.0; 4]).unwrap_err();
        assert!(err.contains("expected"), "{err}");
    }
}
