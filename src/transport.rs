//! QUIC links between ring neighbours: endpoints, TLS, the handshake, framing.
//!
//! Every rank binds one quinn endpoint at its address from the hosts file. It dials the
//! next rank (as a QUIC client) and accepts the previous rank (as a server); ranks may start
//! in any order, so dialling retries with backoff until the connect timeout. On the one
//! bidirectional stream of each connection both sides first exchange a [`Hello`] (rank,
//! world size and the fingerprint of everything that must agree); afterwards the client's
//! send half carries frames to the next rank and the server's receive half frames from the
//! previous one. Each frame travels as a little-endian `u32` length and the frame bytes;
//! a length above the agreed maximum is refused before anything is allocated for it.
//!
//! Who may connect is set by [`TransportOptions::security`] (see [`crate::auth`]): with a
//! cluster credential, both ends of every connection prove in the TLS 1.3 handshake that
//! they hold it, before a byte of the hello is read; a failed handshake is never retried
//! towards the next rank, and only logged from others. Once both neighbours are connected
//! the endpoint refuses every further connection attempt outright.
//!
//! Liveness is the transport's job: QUIC keep-alives are sent every third of the peer
//! timeout by quinn's own driver, so a rank busy computing is never declared dead, while a
//! rank that stops answering is reported after `peer_timeout`.
//!
//! [`CommHandle`] runs all of this on a dedicated thread with a current-thread tokio
//! runtime and serves the training loop's blocking requests.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::auth::{AuthError, SERVER_NAME, Security};
use crate::collective::{CommError, Communicator, Peer, RecvLink, SendLink};
use crate::frame::{Pieces, Wire};
use crate::ring::{Rank, WorldSize};
use crate::timeline::Timeline;

mod congestion;

/// Version of the wire protocol; ranks with different versions refuse each other.
pub const PROTOCOL_VERSION: u32 = 1;

const ALPN: &[u8] = b"ringtrain/1";
const MAX_HELLO: usize = 64 * 1024;
/// Application close code for a normal end of run.
const CLOSE_DONE: u32 = 0;
/// Application close code for a rank that stops because of an error.
const CLOSE_ERROR: u32 = 1;

/// Why the transport could not set up or keep the ring.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The local address could not be bound.
    #[error(
        "cannot bind {rank}'s address {addr}: {source}; is another process using that port? \
         change it in the hosts file"
    )]
    Bind {
        /// This rank.
        rank: Rank,
        /// The address from the hosts file.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// TLS or QUIC configuration failed (a bug or an unsupported platform).
    #[error("cannot configure QUIC: {0}")]
    Config(String),
    /// The next rank did not answer in time.
    #[error(
        "could not reach {peer} within {secs} s ({last}); is it running, and is UDP port {port} \
         open? raise --connect-timeout if ranks start far apart"
    )]
    ConnectTimeout {
        /// The next rank.
        peer: Peer,
        /// The timeout in seconds.
        secs: u64,
        /// The last error seen.
        last: String,
        /// The UDP port dialled.
        port: u16,
    },
    /// The previous rank never connected.
    #[error(
        "{peer} did not connect within {secs} s{}; is it running, and can it reach this \
         machine's UDP port {port}? raise --connect-timeout if ranks start far apart",
        failed_note(.failed)
    )]
    NoPredecessor {
        /// The previous rank.
        peer: Peer,
        /// The timeout in seconds.
        secs: u64,
        /// Our UDP port.
        port: u16,
        /// The last connection attempt that failed before its hello, and why.
        failed: Option<String>,
    },
    /// A neighbour's configuration differs from ours.
    #[error("configuration differs from {peer}'s: {}; start every rank with the same flags", list_fields(.fields))]
    Mismatch {
        /// The neighbour.
        peer: Peer,
        /// (field, our value, their value) for each differing field.
        fields: Vec<(String, String, String)>,
    },
    /// The neighbour at the address is not the rank the hosts file says.
    #[error(
        "{peer} answered as rank {claimed} of {world}; check that every rank uses the same hosts file"
    )]
    WrongPeer {
        /// The expected neighbour.
        peer: Peer,
        /// The rank it claimed.
        claimed: usize,
        /// The world size it claimed.
        world: usize,
    },
    /// The TLS handshake with the next rank failed: the two do not share a credential.
    #[error(
        "{peer} and this rank do not trust each other: {detail}; start every rank with the \
         same cluster key (--key FILE or RINGTRAIN_KEY), or every rank with --insecure"
    )]
    Untrusted {
        /// The neighbour.
        peer: Peer,
        /// What TLS reported.
        detail: String,
    },
    /// The TLS settings could not be built.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The handshake with a neighbour failed.
    #[error("handshake with {peer} failed: {detail}")]
    Handshake {
        /// The neighbour.
        peer: Peer,
        /// What went wrong.
        detail: String,
    },
    /// A neighbour refused us.
    #[error("{peer} refused the connection: {reason}")]
    Refused {
        /// The neighbour.
        peer: Peer,
        /// The reason it gave.
        reason: String,
    },
}

fn failed_note(failed: &Option<String>) -> String {
    match failed {
        Some(f) => format!(" (the last attempt that failed came from {f})"),
        None => String::new(),
    }
}

fn list_fields(fields: &[(String, String, String)]) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|(name, ours, theirs)| format!("{name}: here {ours}, there {theirs}"))
        .collect();
    parts.join("; ")
}

/// Settings of the ring's QUIC transport.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    /// How long to keep dialling the next rank and waiting for the previous one.
    pub connect_timeout: Duration,
    /// Silence after which a neighbour is declared lost.
    pub peer_timeout: Duration,
    /// Segment size in `f32` elements; frames are at most this plus a header.
    pub segment: usize,
    /// Who may connect: holders of a cluster credential, or anyone
    /// (see [`Security::resolve`] for when the latter is allowed).
    pub security: Security,
    /// How all-reduce values travel (`--compress`); every rank must use the same.
    pub wire: Wire,
}

/// What a rank tells its neighbour when they connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Wire protocol version.
    pub protocol: u32,
    /// The sender's rank.
    pub rank: usize,
    /// The sender's world size.
    pub world: usize,
    /// Everything that must agree across ranks, by name.
    pub fingerprint: BTreeMap<String, String>,
}

impl Hello {
    /// Fields that differ between `ours` and `theirs`: (name, ours, theirs).
    pub fn differences(ours: &Hello, theirs: &Hello) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let mut push = |name: &str, a: String, b: String| {
            if a != b {
                out.push((name.to_string(), a, b));
            }
        };
        push(
            "protocol",
            ours.protocol.to_string(),
            theirs.protocol.to_string(),
        );
        push(
            "world_size",
            ours.world.to_string(),
            theirs.world.to_string(),
        );
        let missing = || "(absent)".to_string();
        let names: std::collections::BTreeSet<&String> = ours
            .fingerprint
            .keys()
            .chain(theirs.fingerprint.keys())
            .collect();
        for name in names {
            let a = ours.fingerprint.get(name).cloned().unwrap_or_else(missing);
            let b = theirs
                .fingerprint
                .get(name)
                .cloned()
                .unwrap_or_else(missing);
            push(name, a, b);
        }
        out
    }
}

/// The QUIC link to the next rank.
#[derive(Debug)]
pub struct QuicSend {
    peer: Peer,
    stream: quinn::SendStream,
}

/// The QUIC link from the previous rank.
#[derive(Debug)]
pub struct QuicRecv {
    peer: Peer,
    stream: quinn::RecvStream,
    max_frame: usize,
}

impl SendLink for QuicSend {
    async fn send(&mut self, frame: Bytes) -> Result<(), CommError> {
        let len = Bytes::copy_from_slice(&(frame.len() as u32).to_le_bytes());
        // Both pieces go to quinn by reference: the frame is never copied again.
        let mut pieces = [len, frame];
        let lost = |e: quinn::WriteError| match e {
            quinn::WriteError::ConnectionLost(c) => lost(&self.peer, why_lost(&c)),
            other => lost(&self.peer, other),
        };
        self.stream
            .write_all_chunks(&mut pieces)
            .await
            .map_err(lost)
    }

    fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl RecvLink for QuicRecv {
    async fn recv(&mut self) -> Result<Pieces, CommError> {
        let peer = &self.peer;
        let ended = || lost(peer, "it ended its stream in the middle of the run");
        let read_lost = |e: quinn::ReadError| match e {
            quinn::ReadError::ConnectionLost(c) => lost(peer, why_lost(&c)),
            other => lost(peer, other),
        };
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .await
            .map_err(|e| match e {
                quinn::ReadExactError::ReadError(e) => read_lost(e),
                quinn::ReadExactError::FinishedEarly(_) => ended(),
            })?;
        let len = u32::from_le_bytes(len) as usize;
        if len > self.max_frame {
            let (len, max) = (len as u64, self.max_frame as u64);
            return Err(CommError::TooLarge {
                peer: peer.clone(),
                len,
                max,
            });
        }
        // Take the frame in the buffers quinn received it in; never read past its end.
        let mut pieces = Pieces::new();
        while pieces.len() < len {
            let want = len - pieces.len();
            match self.stream.read_chunk(want, true).await {
                Ok(Some(chunk)) => pieces.push(chunk.bytes),
                Ok(None) => return Err(ended()),
                Err(e) => return Err(read_lost(e)),
            }
        }
        Ok(pieces)
    }

    fn peer(&self) -> &Peer {
        &self.peer
    }
}

/// Says in words why a connection ended, with the peer's own reason when it gave one.
fn why_lost(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) if !c.reason.is_empty() => {
            format!(
                "it closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        quinn::ConnectionError::ApplicationClosed(_) => "it closed the connection".into(),
        quinn::ConnectionError::TimedOut => {
            "no packets within the peer timeout: the process died, hangs, or the network \
             between us is cut"
                .into()
        }
        other => other.to_string(),
    }
}

fn lost(peer: &Peer, e: impl std::fmt::Display) -> CommError {
    CommError::PeerLost {
        peer: peer.clone(),
        reason: e.to_string(),
    }
}

/// Builds the endpoint for `rank` at `addr`, secured as `opts.security` says: with a
/// cluster credential it gets a fresh leaf certificate signed by the cluster's CA, and it
/// both accepts and dials only peers whose leaf the same CA signed; unauthenticated, it
/// encrypts but accepts anyone.
pub fn endpoint(
    rank: Rank,
    addr: SocketAddr,
    opts: &TransportOptions,
) -> Result<quinn::Endpoint, TransportError> {
    let config_err = |e: &dyn std::fmt::Display| TransportError::Config(e.to_string());
    let (mut server, mut client) = opts.security.tls_configs()?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    client.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(transport_config(opts, addr)?);
    let server = QuicServerConfig::try_from(server).map_err(|e| config_err(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport.clone());
    let client = QuicClientConfig::try_from(client).map_err(|e| config_err(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport);

    let socket = udp_socket(addr).map_err(|source| TransportError::Bind { rank, addr, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TransportError::Config("no async runtime for quinn".into()))?;
    let bind_err = |source| TransportError::Bind { rank, addr, source };
    let socket = runtime.wrap_udp_socket(socket).map_err(bind_err)?;
    let socket = with_injected_loss(socket, addr)?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(max_udp_payload(addr))
        .map_err(|e| config_err(&e))?;
    let mut ep = quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket, runtime)
        .map_err(bind_err)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Environment variable that makes every endpoint drop this share of its outgoing
/// datagrams (0 to 1): a test aid for packet loss that needs no privileges.
pub const INJECT_LOSS_ENV: &str = "RINGTRAIN_INJECT_LOSS";

fn with_injected_loss(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    addr: SocketAddr,
) -> Result<Arc<dyn quinn::AsyncUdpSocket>, TransportError> {
    let Ok(value) = std::env::var(INJECT_LOSS_ENV) else {
        return Ok(socket);
    };
    let rate: f64 = match value.trim().parse() {
        Ok(r) if (0.0..=1.0).contains(&r) => r,
        _ => {
            let msg = format!("{INJECT_LOSS_ENV}={value:?}: expected a share between 0 and 1");
            return Err(TransportError::Config(msg));
        }
    };
    // The port makes each rank's pattern different and the run reproducible.
    let seed = u64::from(addr.port());
    warn!(
        rate,
        seed, "dropping outgoing datagrams on purpose ({INJECT_LOSS_ENV})"
    );
    Ok(Arc::new(crate::lossy::LossySocket::new(socket, rate, seed)))
}

/// Largest UDP payload on loopback: one datagram carries about 64 KB of stream data.
pub const LOOPBACK_UDP_PAYLOAD: u16 = 65000;

/// The largest congestion window on loopback, kept below what the receiver's socket buffer
/// holds (see `congestion`): with 4 MiB requested (8 MiB granted), 2 MiB left no datagram
/// dropped by a full buffer at N = 2, 4 and 8, where an uncapped window lost hundreds.
pub const LOOPBACK_WINDOW_CAP: u64 = 2 << 20;

/// The queueing delay the ring's connections aim to hold at a bottleneck on paths other
/// than loopback, or the path's least RTT if that is longer (see `congestion`). On
/// tbf-shaped 1 Gbit/s links with a 20 ms queue, Cubic alone filled the queue, lost bursts
/// of packets and reached 0.75–0.81 of the link at 64 MiB and N = 2; with 1 ms, 0.91–0.93
/// and no losses (targets of 3 and 6 ms were slower still than none).
pub const QUEUE_DELAY_TARGET: Duration = Duration::from_millis(1);

/// Upper bound of MTU discovery on other paths. Jumbo-frame networks get packets this large;
/// quinn batches up to ten packets per GSO send, and batches over 64 KiB are dropped
/// silently, so the bound stays near 6500 bytes.
pub const MAX_DISCOVERED_UDP_PAYLOAD: u16 = 6500;

/// The largest UDP payload this endpoint accepts and may come to send.
fn max_udp_payload(addr: SocketAddr) -> u16 {
    if addr.ip().is_loopback() {
        LOOPBACK_UDP_PAYLOAD
    } else {
        MAX_DISCOVERED_UDP_PAYLOAD
    }
}

/// Packet sizes and congestion control for the path from `addr`. Per-packet work
/// (encryption setup, headers, system calls, acknowledgements) dominates QUIC's CPU cost,
/// so larger packets move more bytes per CPU-second.
fn tune_for_path(t: &mut quinn::TransportConfig, addr: SocketAddr) {
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(max_udp_payload(addr));
    t.mtu_discovery_config(Some(discovery));
    let mut cubic = quinn::congestion::CubicConfig::default();
    let ring = if addr.ip().is_loopback() {
        // Loopback has a 64 KiB MTU: discovery finds it within a few round trips of the
        // handshake (handshake packets themselves must stay under 16 KiB). Segmentation
        // offload must be off for packets this large (see above), and the congestion
        // window must hold a few of them from the start.
        t.enable_segmentation_offload(false);
        cubic.initial_window(1 << 20);
        congestion::RingFactory {
            inner: Arc::new(cubic),
            cap: Some(LOOPBACK_WINDOW_CAP),
            target_delay: None,
        }
    } else {
        congestion::RingFactory {
            inner: Arc::new(cubic),
            cap: None,
            target_delay: Some(QUEUE_DELAY_TARGET),
        }
    };
    t.congestion_controller_factory(Arc::new(ring));
}

fn transport_config(
    opts: &TransportOptions,
    addr: SocketAddr,
) -> Result<quinn::TransportConfig, TransportError> {
    let mut t = quinn::TransportConfig::default();
    tune_for_path(&mut t, addr);
    let idle = quinn::IdleTimeout::try_from(opts.peer_timeout)
        .map_err(|e| TransportError::Config(format!("peer timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(opts.peer_timeout / 3));
    // Windows well above one segment so a whole ring step can be in flight.
    t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    Ok(t)
}

/// A UDP socket bound to `addr` with large buffers: the defaults drop packets in bursts.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    for (what, result) in [
        ("receive", socket.set_recv_buffer_size(4 << 20)),
        ("send", socket.set_send_buffer_size(4 << 20)),
    ] {
        if let Err(e) = result {
            debug!("could not raise the UDP {what} buffer: {e}");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The address to bind for `addr` from the hosts file: loopback addresses as they are,
/// anything else on all interfaces of that family (the hosts file may name this machine by
/// an address that belongs to a NAT or a name that resolves elsewhere).
pub fn bind_addr(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_loopback() {
        return addr;
    }
    let ip: std::net::IpAddr = match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    SocketAddr::new(ip, addr.port())
}

async fn write_msg(stream: &mut quinn::SendStream, msg: &[u8]) -> Result<(), String> {
    let len = (msg.len() as u32).to_le_bytes();
    stream.write_all(&len).await.map_err(|e| e.to_string())?;
    stream.write_all(msg).await.map_err(|e| e.to_string())
}

async fn read_hello(stream: &mut quinn::RecvStream) -> Result<Hello, String> {
    let mut len = [0u8; 4];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HELLO {
        return Err(format!("hello of {len} bytes exceeds {MAX_HELLO}"));
    }
    let mut buf = vec![0u8; len];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&buf).map_err(|e| format!("unreadable hello: {e}"))
}

/// Where a rank sits: its rank, the world, the neighbours' addresses.
#[derive(Debug, Clone)]
pub struct RingPlace {
    /// This rank.
    pub rank: Rank,
    /// Every rank's address, by rank.
    pub addrs: Vec<SocketAddr>,
}

impl RingPlace {
    fn world(&self) -> WorldSize {
        WorldSize::new(self.addrs.len()).expect("a ring place has at least one address")
    }

    fn peer(&self, rank: Rank) -> Peer {
        Peer {
            rank,
            addr: Some(self.addrs[rank.0]),
        }
    }
}

/// Why one attempt to dial the next rank failed.
enum DialFailure {
    /// The TLS handshake failed: retrying cannot help.
    Untrusted(String),
    /// Anything else: the rank may not be up yet.
    Other(String),
}

impl From<String> for DialFailure {
    fn from(e: String) -> Self {
        DialFailure::Other(e)
    }
}

/// What went wrong, when a connection ended because its TLS handshake failed: a
/// certificate the cluster's CA did not sign, no certificate, or no common protocol.
/// `None` for any other end of a connection.
fn tls_failure(e: &quinn::ConnectionError) -> Option<String> {
    // QUIC carries TLS alerts as transport error codes 0x100 to 0x1ff (RFC 9001, 4.8).
    let is_tls = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) if is_tls(t.code) => {
            Some(format!("this rank's TLS refused the peer: {t}"))
        }
        quinn::ConnectionError::ConnectionClosed(c) if is_tls(c.error_code) => {
            Some(format!("the peer's TLS refused this rank: {c}"))
        }
        _ => None,
    }
}

/// Dials the next rank until it answers and agrees, or the deadline passes.
async fn connect_next(
    ep: &quinn::Endpoint,
    place: &RingPlace,
    hello: &Hello,
    opts: &TransportOptions,
    deadline: Instant,
) -> Result<(quinn::Connection, quinn::SendStream), TransportError> {
    let next = place.world().next(place.rank);
    let peer = place.peer(next);
    let addr = place.addrs[next.0];
    let mut backoff = Duration::from_millis(50);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let per_try = Duration::from_secs(3).min(deadline - Instant::now());
        let attempt = async {
            let connecting = ep.connect(addr, SERVER_NAME).map_err(|e| e.to_string())?;
            // Only reaching the peer is bounded per try. Once both handshakes are done the
            // peer may already hold this connection as its predecessor's; dropping it for a
            // slow hello (a loaded machine) would leave the peer with a dead connection.
            let conn = timeout(per_try, connecting)
                .await
                .map_err(|_| String::from("no answer"))?;
            let conn = conn.map_err(|e| match tls_failure(&e) {
                Some(detail) => DialFailure::Untrusted(detail),
                None => DialFailure::Other(e.to_string()),
            })?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let msg = serde_json::to_vec(hello).map_err(|e| e.to_string())?;
            write_msg(&mut send, &msg).await?;
            let theirs = read_hello(&mut recv).await;
            Ok::<_, DialFailure>((conn, send, theirs))
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok((conn, send, Ok(theirs)))) => {
                check_hello(&peer, hello, &theirs, next, place.world()).inspect_err(|_| {
                    conn.close(CLOSE_ERROR.into(), b"configuration mismatch");
                })?;
                info!(%peer, "connected to the next rank");
                return Ok((conn, send));
            }
            Ok(Ok((conn, _, Err(e)))) => {
                // Connected, but the peer closed instead of answering: it refused us, in
                // the TLS handshake (our certificate) or after reading our hello.
                if let Some(detail) = conn.close_reason().as_ref().and_then(tls_failure) {
                    return Err(TransportError::Untrusted { peer, detail });
                }
                if let Some(quinn::ConnectionError::ApplicationClosed(c)) = conn.close_reason() {
                    let mut reason = String::from_utf8_lossy(&c.reason).into_owned();
                    if reason.is_empty() {
                        reason =
                            "it closed the connection during the handshake (see its log)".into();
                    }
                    return Err(TransportError::Refused { peer, reason });
                }
                last = e;
            }
            Ok(Err(DialFailure::Untrusted(detail))) => {
                return Err(TransportError::Untrusted { peer, detail });
            }
            Ok(Err(DialFailure::Other(e))) => last = e,
            Err(_) => last = "no answer".into(),
        }
        debug!(%peer, %last, "dial failed; retrying");
        sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    let secs = opts.connect_timeout.as_secs();
    Err(TransportError::ConnectTimeout {
        peer,
        secs,
        last,
        port: addr.port(),
    })
}

fn check_hello(
    peer: &Peer,
    ours: &Hello,
    theirs: &Hello,
    expected: Rank,
    world: WorldSize,
) -> Result<(), TransportError> {
    if theirs.protocol == ours.protocol
        && (theirs.rank != expected.0 || theirs.world != world.get())
    {
        let (claimed, world) = (theirs.rank, theirs.world);
        return Err(TransportError::WrongPeer {
            peer: peer.clone(),
            claimed,
            world,
        });
    }
    let fields = Hello::differences(ours, theirs);
    if fields.is_empty() {
        Ok(())
    } else {
        Err(TransportError::Mismatch {
            peer: peer.clone(),
            fields,
        })
    }
}

/// Accepts connections until the previous rank arrives and agrees, or the deadline passes.
/// Anyone else is refused with a reason and the wait goes on.
async fn accept_prev(
    ep: &quinn::Endpoint,
    place: &RingPlace,
    hello: &Hello,
    opts: &TransportOptions,
    deadline: Instant,
) -> Result<(quinn::Connection, quinn::RecvStream), TransportError> {
    let prev = place.world().prev(place.rank);
    let peer = place.peer(prev);
    let port = place.addrs[place.rank.0].port();
    let secs = opts.connect_timeout.as_secs();
    let mut failed = None;
    loop {
        let incoming = match timeout_at(deadline, ep.accept()).await {
            Ok(Some(incoming)) => incoming,
            _ => {
                return Err(TransportError::NoPredecessor {
                    peer,
                    secs,
                    port,
                    failed,
                });
            }
        };
        let remote = incoming.remote_address();
        let greet = async {
            let conn = incoming
                .await
                .map_err(|e| tls_failure(&e).unwrap_or_else(|| e.to_string()))?;
            let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let theirs = read_hello(&mut recv).await?;
            Ok::<_, String>((conn, send, recv, theirs))
        };
        let (conn, mut send, recv, theirs) = match timeout(Duration::from_secs(5), greet).await {
            Ok(Ok(greeted)) => greeted,
            Ok(Err(e)) => {
                warn!(%remote, "a connection attempt failed before its hello: {e}");
                failed = Some(format!("{remote}: {e}"));
                continue;
            }
            Err(_) => {
                warn!(%remote, "a connection sent no hello within 5 s; dropped it");
                failed = Some(format!("{remote}: it sent no hello within 5 s"));
                continue;
            }
        };
        if theirs.protocol == hello.protocol
            && (theirs.rank != prev.0 || theirs.world != place.world().get())
        {
            let reason = format!(
                "{} of {} accepts only rank {} of {}, not rank {} of {}",
                place.rank,
                place.world().get(),
                prev.0,
                place.world().get(),
                theirs.rank,
                theirs.world
            );
            warn!(%remote, "refused a connection: {reason}");
            conn.close(CLOSE_ERROR.into(), reason.as_bytes());
            continue;
        }
        let msg = serde_json::to_vec(hello).expect("a hello always serializes");
        if let Err(e) = write_msg(&mut send, &msg).await {
            warn!(%remote, "lost a connection while answering its hello: {e}");
            continue;
        }
        let _ = send.finish();
        if let Err(e) = check_hello(&peer, hello, &theirs, prev, place.world()) {
            // Give the peer a moment to read our hello and report the same mismatch.
            let _ = timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(CLOSE_ERROR.into(), b"configuration mismatch");
            return Err(e);
        }
        info!(%peer, "accepted the previous rank");
        return Ok((conn, recv));
    }
}

/// A request from the training loop to the communication thread.
enum Request {
    AllReduce(Vec<f32>),
    /// An all-reduce in full `f32` whatever `--compress` says (measurements, counters).
    AllReduceF32(Vec<f32>),
    Broadcast(Vec<f32>),
    CheckSame(Vec<u8>),
    /// A gradient bucket: `range` is where it sits in the whole gradient, folded into the
    /// bucket-order digest that [`Request::CheckOrder`] compares across ranks.
    Bucket {
        buf: Vec<f32>,
        range: std::ops::Range<usize>,
    },
    CheckOrder,
}

type Reply = Result<(Vec<f32>, u64), CommError>;

/// How many requests may wait for the communication thread before a submitting call
/// blocks: enough for every bucket of a step to be queued while backward goes on.
const QUEUE_DEPTH: usize = 64;

/// The training loop's handle on the ring. The communication thread serves requests one at
/// a time, strictly in the order they were made: the blocking calls return when the ring
/// has done its part, and [`CommHandle::allreduce_start`] queues an all-reduce and returns
/// at once.
///
/// Dropping the handle without [`CommHandle::finish`] closes the connections with an error
/// code, so neighbours stop at once instead of waiting for the peer timeout.
pub struct CommHandle {
    requests: Option<mpsc::Sender<(Request, oneshot::Sender<Reply>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    finish: Option<oneshot::Sender<Option<String>>>,
    bytes_sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for CommHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommHandle")
            .field("bytes_sent", &self.bytes_sent())
            .finish()
    }
}

/// An all-reduce queued by [`CommHandle::allreduce_start`].
///
/// Dropping it does not cancel the all-reduce (every rank must still take part, in the
/// same order); the result is then thrown away and the communication thread goes on.
#[must_use = "an all-reduce's result is only known after wait()"]
pub struct Pending {
    reply: oneshot::Receiver<Reply>,
    bytes_sent: Arc<AtomicU64>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").finish_non_exhaustive()
    }
}

impl Pending {
    /// Blocks until the all-reduce is done and returns the summed buffer.
    ///
    /// A collective that failed returns its error here. When an earlier request failed,
    /// the communication thread has stopped and this returns [`CommError::Stopped`]: wait
    /// for pending all-reduces in the order they were started to see the first cause.
    pub fn wait(self) -> Result<Vec<f32>, CommError> {
        let (buf, sent) = self
            .reply
            .blocking_recv()
            .map_err(|_| CommError::Stopped)??;
        self.bytes_sent.fetch_max(sent, Ordering::Relaxed);
        Ok(buf)
    }
}

impl CommHandle {
    /// Binds this rank's endpoint, forms the ring with both neighbours and returns once
    /// both handshakes succeeded. A world of one needs no network.
    pub fn connect(
        place: RingPlace,
        hello: Hello,
        opts: TransportOptions,
    ) -> Result<CommHandle, TransportError> {
        Self::connect_with_timeline(place, hello, opts, Timeline::disabled())
    }

    /// [`CommHandle::connect`], with the communication thread recording each collective's
    /// phases and its waits for the previous rank on `timeline`.
    pub fn connect_with_timeline(
        place: RingPlace,
        hello: Hello,
        opts: TransportOptions,
        timeline: Timeline,
    ) -> Result<CommHandle, TransportError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (req_tx, req_rx) = mpsc::channel(QUEUE_DEPTH);
        let (fin_tx, fin_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("ringtrain-comm-{}", place.rank.0))
            .spawn(move || comm_thread(place, hello, opts, timeline, ready_tx, req_rx, fin_rx))
            .map_err(|e| TransportError::Config(format!("cannot start a thread: {e}")))?;
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(TransportError::Config(
                "the communication thread died during set-up".into(),
            ))
        });
        let mut handle = CommHandle {
            requests: Some(req_tx),
            thread: Some(thread),
            finish: Some(fin_tx),
            bytes_sent: Arc::new(AtomicU64::new(0)),
        };
        match ready {
            Ok(()) => Ok(handle),
            Err(e) => {
                handle.finish = None;
                handle.join();
                Err(e)
            }
        }
    }

    /// Bytes this rank has sent on the ring so far (frames and their length prefixes).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Queues `req`; never blocks unless [`QUEUE_DEPTH`] requests are already waiting.
    /// When the thread has stopped, the returned [`Pending`] reports it.
    fn submit(&mut self, req: Request) -> Pending {
        let (tx, rx) = oneshot::channel();
        if let Some(sender) = self.requests.as_ref() {
            // On failure the request and `tx` come back and drop: `rx` then says Stopped.
            let _ = sender.blocking_send((req, tx));
        }
        Pending {
            reply: rx,
            bytes_sent: self.bytes_sent.clone(),
        }
    }

    fn call(&mut self, req: Request) -> Result<Vec<f32>, CommError> {
        self.submit(req).wait()
    }

    /// Sums `buf` over all ranks (see [`Communicator::allreduce_sum`]).
    pub fn allreduce_sum(&mut self, buf: Vec<f32>) -> Result<Vec<f32>, CommError> {
        self.call(Request::AllReduce(buf))
    }

    /// Sums `buf` over all ranks with every value sent in full `f32`, whatever
    /// [`TransportOptions::wire`] says: for counters and measurements that must not be
    /// rounded.
    pub fn allreduce_sum_f32(&mut self, buf: Vec<f32>) -> Result<Vec<f32>, CommError> {
        self.allreduce_f32_start(buf).wait()
    }

    /// Queues [`allreduce_sum_f32`](Self::allreduce_sum_f32) and returns without waiting,
    /// served in order with the other requests.
    pub fn allreduce_f32_start(&mut self, buf: Vec<f32>) -> Pending {
        self.submit(Request::AllReduceF32(buf))
    }

    /// Replaces `buf` by rank 0's.
    pub fn broadcast(&mut self, buf: Vec<f32>) -> Result<Vec<f32>, CommError> {
        self.call(Request::Broadcast(buf))
    }

    /// Fails with [`CommError::Diverged`] unless every rank passes the same `digest`.
    pub fn check_same(&mut self, digest: &[u8]) -> Result<(), CommError> {
        self.call(Request::CheckSame(digest.to_vec())).map(|_| ())
    }

    /// Queues the sum of gradient bucket `buf` over all ranks and returns without waiting.
    ///
    /// `range` says where the bucket sits in the whole gradient (`buf` may be longer, e.g.
    /// by a loss slot); every rank must start the same buckets in the same order, because
    /// requests are served in the order they are made. Each bucket's range is folded into
    /// a digest that [`CommHandle::check_bucket_order`] compares across ranks; a bucket of
    /// a different length on a neighbour fails at once as out of step.
    pub fn allreduce_start(&mut self, buf: Vec<f32>, range: std::ops::Range<usize>) -> Pending {
        debug_assert!(
            buf.len() >= range.len(),
            "invariant: a bucket holds at least its range"
        );
        self.submit(Request::Bucket { buf, range })
    }

    /// Fails with [`CommError::Diverged`] unless every rank has reduced the same gradient
    /// buckets in the same order so far.
    pub fn check_bucket_order(&mut self) -> Result<(), CommError> {
        self.call(Request::CheckOrder).map(|_| ())
    }

    /// Ends the run cleanly: waits until the neighbours have everything, then closes.
    pub fn finish(mut self) {
        if let Some(fin) = self.finish.take() {
            let _ = fin.send(None);
        }
        self.join();
    }

    /// Stops with an error: neighbours see the connection closed with `reason`.
    pub fn abort(mut self, reason: &str) {
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

impl Drop for CommHandle {
    fn drop(&mut self) {
        if let Some(fin) = self.finish.take() {
            let _ = fin.send(Some("the rank stopped".into()));
        }
        self.join();
    }
}

type Links = Option<(
    quinn::Connection,
    quinn::Connection,
    Communicator<QuicSend, QuicRecv>,
)>;

fn comm_thread(
    place: RingPlace,
    hello: Hello,
    opts: TransportOptions,
    timeline: Timeline,
    ready: std::sync::mpsc::Sender<Result<(), TransportError>>,
    mut requests: mpsc::Receiver<(Request, oneshot::Sender<Reply>)>,
    finish: oneshot::Receiver<Option<String>>,
) {
    // Spans do not cross threads: this thread's log lines carry the rank through its own.
    let _rank = tracing::info_span!("rank", rank = place.rank.0).entered();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(TransportError::Config(format!("tokio runtime: {e}"))));
            return;
        }
    };
    rt.block_on(async move {
        let world = place.world();
        let setup = form_ring(&place, &hello, &opts).await;
        let (ep, mut links) = match setup {
            Ok(v) => v,
            Err((ep, e)) => {
                if let Some(ep) = ep {
                    close_endpoint(&ep, CLOSE_ERROR, &e.to_string()).await;
                }
                let _ = ready.send(Err(e));
                return;
            }
        };
        if let Some((_, _, comm)) = links.as_mut() {
            comm.set_timeline(timeline);
        }
        let _ = ready.send(Ok(()));
        let mut failed: Option<String> = None;
        let mut order = blake3::Hasher::new();
        while let Some((req, reply)) = requests.recv().await {
            let result = serve(&mut links, req, &mut order, world).await;
            match &result {
                // Diverged replicas are the caller's to handle; the links are still sound.
                Err(CommError::Diverged(_)) | Ok(_) => {}
                Err(e) => failed = Some(e.to_string()),
            }
            let _ = reply.send(result);
            if failed.is_some() {
                break;
            }
        }
        let reason = match failed {
            Some(reason) => Some(reason),
            None => finish.await.unwrap_or(Some("the rank stopped".into())),
        };
        shutdown(ep, links, reason, &opts).await;
    });
}

type Formed = (Option<quinn::Endpoint>, Links);

async fn form_ring(
    place: &RingPlace,
    hello: &Hello,
    opts: &TransportOptions,
) -> Result<Formed, (Option<quinn::Endpoint>, TransportError)> {
    let world = place.world();
    if world.get() == 1 {
        return Ok((None, None));
    }
    let bind = bind_addr(place.addrs[place.rank.0]);
    let ep = endpoint(place.rank, bind, opts).map_err(|e| (None, e))?;
    let deadline = Instant::now() + opts.connect_timeout;
    let both = both_neighbours(
        connect_next(&ep, place, hello, opts, deadline),
        accept_prev(&ep, place, hello, opts, deadline),
    )
    .await;
    let ((out_conn, send), (in_conn, recv)) = match both {
        Ok(v) => v,
        Err(e) => return Err((Some(ep), e)),
    };
    refuse_latecomers(&ep);
    let next = place.peer(world.next(place.rank));
    let prev = place.peer(world.prev(place.rank));
    let max_frame = crate::frame::HEADER_LEN + 4 * opts.segment.max(1);
    let tx = QuicSend {
        peer: next,
        stream: send,
    };
    let rx = QuicRecv {
        peer: prev,
        stream: recv,
        max_frame,
    };
    let mut comm = Communicator::new(place.rank, world, tx, rx, opts.segment);
    comm.set_wire(opts.wire);
    Ok((Some(ep), Some((out_conn, in_conn, comm))))
}

/// Once both neighbours are connected nobody else may join: every further connection
/// attempt is refused at once, before any TLS work, for as long as the endpoint lives.
/// Must run inside the comm thread's runtime.
fn refuse_latecomers(ep: &quinn::Endpoint) {
    let ep = ep.clone();
    tokio::spawn(async move {
        let mut refused = 0u64;
        while let Some(incoming) = ep.accept().await {
            let remote = incoming.remote_address();
            incoming.refuse();
            refused += 1;
            if refused == 1 {
                warn!(%remote, "refused a connection: the ring is already formed \
                      (more such refusals are logged at debug level)");
            } else {
                debug!(%remote, refused, "refused a connection: the ring is already formed");
            }
        }
    });
}

/// Waits for both handshakes. When one fails, the other gets a short grace period so that
/// its neighbour still receives our hello and can report the same problem itself.
async fn both_neighbours<A, B>(
    a: impl Future<Output = Result<A, TransportError>>,
    b: impl Future<Output = Result<B, TransportError>>,
) -> Result<(A, B), TransportError> {
    let grace = Duration::from_secs(2);
    tokio::pin!(a, b);
    tokio::select! {
        ra = &mut a => match ra {
            Ok(ra) => Ok((ra, b.await?)),
            Err(e) => {
                let _ = timeout(grace, b).await;
                Err(e)
            }
        },
        rb = &mut b => match rb {
            Ok(rb) => Ok((a.await?, rb)),
            Err(e) => {
                let _ = timeout(grace, a).await;
                Err(e)
            }
        },
    }
}

/// Serves one request; `order` is the running digest of the buckets reduced so far.
async fn serve(
    links: &mut Links,
    req: Request,
    order: &mut blake3::Hasher,
    _world: WorldSize,
) -> Reply {
    if let Request::Bucket { buf, range } = &req {
        for n in [range.start, range.end, buf.len()] {
            order.update(&(n as u64).to_le_bytes());
        }
    }
    let Some((_, _, comm)) = links.as_mut() else {
        // A world of one: every collective is the identity.
        return match req {
            Request::AllReduce(b) | Request::AllReduceF32(b) | Request::Broadcast(b) => Ok((b, 0)),
            Request::CheckSame(_) => Ok((Vec::new(), 0)),
            Request::Bucket { buf, .. } => Ok((buf, 0)),
            Request::CheckOrder => Ok((Vec::new(), 0)),
        };
    };
    let out = match req {
        Request::AllReduce(mut b) => comm.allreduce_sum(&mut b).await.map(|_| b),
        Request::AllReduceF32(mut b) => comm.allreduce_sum_exact(&mut b).await.map(|_| b),
        Request::Broadcast(mut b) => comm.broadcast(&mut b).await.map(|_| b),
        Request::CheckSame(d) => comm.check_same(&d).await.map(|_| Vec::new()),
        Request::Bucket { mut buf, .. } => comm.allreduce_sum(&mut buf).await.map(|_| buf),
        Request::CheckOrder => {
            let digest = order.finalize();
            match comm.check_same(digest.as_bytes()).await {
                Err(CommError::Diverged(ranks)) => Err(CommError::Diverged(format!(
                    "the ranks reduced gradient buckets in different orders ({ranks})"
                ))),
                other => other.map(|_| Vec::new()),
            }
        }
    };
    out.map(|b| (b, comm.bytes_sent()))
}

async fn shutdown(
    ep: Option<quinn::Endpoint>,
    links: Links,
    reason: Option<String>,
    opts: &TransportOptions,
) {
    let Some(ep) = ep else { return };
    if let Some(reason) = reason {
        // Close before the connection handles drop: dropping them first would close the
        // connections without our reason.
        close_endpoint(&ep, CLOSE_ERROR, &reason).await;
        drop(links);
        return;
    }
    let Some((out_conn, in_conn, comm)) = links else {
        close_endpoint(&ep, CLOSE_DONE, "done").await;
        return;
    };
    // Finish our stream, wait until the next rank has read it all and the previous rank
    // has finished its stream to us: then nobody loses a frame when we close.
    let (mut tx, mut rx) = comm.into_links();
    let _ = tx.stream.finish();
    let wait = async {
        let _ = tx.stream.stopped().await;
        let _ = rx.stream.read_to_end(1 << 20).await;
    };
    if timeout(opts.peer_timeout, wait).await.is_err() {
        warn!("neighbours did not confirm the end of the run in time; closing anyway");
    }
    log_path_stats("to the next rank", &out_conn);
    log_path_stats("from the previous rank", &in_conn);
    out_conn.close(CLOSE_DONE.into(), b"done");
    in_conn.close(CLOSE_DONE.into(), b"done");
    close_endpoint(&ep, CLOSE_DONE, "done").await;
}

/// Logs what QUIC saw on one connection (round-trip time, congestion window, losses), the
/// first thing to look at when a link runs below its rate.
fn log_path_stats(which: &str, conn: &quinn::Connection) {
    let s = conn.stats();
    debug!(
        connection = which,
        rtt_us = s.path.rtt.as_micros() as u64,
        cwnd = s.path.cwnd,
        mtu = s.path.current_mtu,
        sent_packets = s.path.sent_packets,
        lost_packets = s.path.lost_packets,
        lost_bytes = s.path.lost_bytes,
        congestion_events = s.path.congestion_events,
        udp_tx_datagrams = s.udp_tx.datagrams,
        udp_tx_ios = s.udp_tx.ios,
        udp_rx_datagrams = s.udp_rx.datagrams,
        udp_rx_ios = s.udp_rx.ios,
        "connection statistics"
    );
}

async fn close_endpoint(ep: &quinn::Endpoint, code: u32, reason: &str) {
    // A close reason must fit in one packet; keep it short.
    let reason: String = reason.chars().take(600).collect();
    ep.close(code.into(), reason.as_bytes());
    let _ = timeout(Duration::from_secs(1), ep.wait_idle()).await;
}
