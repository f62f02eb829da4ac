//! Only holders of the cluster key can join a ring: strangers, other clusters and garbage
//! senders are refused, both in a bare handshake and while a real training run goes on.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringtrain::auth::{Credential, SERVER_NAME, Security};
use ringtrain::launch::free_local_addrs;
use ringtrain::optim::OptimConfig;
use ringtrain::ring::Rank;
use ringtrain::train::{self, TrainConfig, Trained};
use ringtrain::transport::{self, RingPlace, TransportOptions};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

mod common;
use common::train_on;

const BIN: &str = env!("CARGO_BIN_EXE_ringtrain");

/// The transport's ALPN: strangers speak it, so that only the certificates can fail.
const ALPN: &[u8] = b"ringtrain/1";

fn write_key(dir: &Path, name: &str) -> (PathBuf, Arc<Credential>) {
    let path = dir.join(name);
    let credential = Credential::generate().expect("generate a credential");
    credential.write_new(&path).expect("write the key file");
    (path, Arc::new(credential))
}

fn options(security: Security) -> TransportOptions {
    TransportOptions {
        connect_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(5),
        segment: 64,
        security,
        wire: ringtrain::frame::Wire::F32,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// What became of one connection attempt, seen from the dialling side.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// The TLS handshake failed (either side refused the other's certificate).
    Tls(String),
    /// The endpoint refused the connection outright (the ring was already formed).
    Refused,
    /// The server sent bytes back: the stranger got in. Must never happen.
    Answered,
    /// Anything else: no answer, a timeout, a reset.
    Other(String),
}

fn classify(e: &quinn::ConnectionError) -> Outcome {
    let is_tls = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) if is_tls(t.code) => Outcome::Tls(t.to_string()),
        quinn::ConnectionError::ConnectionClosed(c) if is_tls(c.error_code) => {
            Outcome::Tls(c.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Outcome::Refused
        }
        other => Outcome::Other(other.to_string()),
    }
}

/// Dials `addr`, claims to be rank `claim` of `world` in a hello, and waits for an answer.
async fn intrude(
    ep: &quinn::Endpoint,
    config: Option<quinn::ClientConfig>,
    addr: SocketAddr,
    claim: usize,
    world: usize,
) -> Outcome {
    let connecting = match config {
        Some(c) => ep.connect_with(c, addr, SERVER_NAME),
        None => ep.connect(addr, SERVER_NAME),
    };
    let attempt = async {
        let conn = connecting.map_err(|e| Outcome::Other(e.to_string()))?;
        let conn = conn.await.map_err(|e| classify(&e))?;
        let lost = |conn: &quinn::Connection, e: String| match conn.close_reason() {
            Some(reason) => classify(&reason),
            None => Outcome::Other(e),
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| lost(&conn, e.to_string()))?;
        let hello = serde_json::json!({
            "protocol": transport::PROTOCOL_VERSION, "rank": claim, "world": world,
            "fingerprint": {}
        });
        let body = serde_json::to_vec(&hello).expect("json");
        let mut msg = (body.len() as u32).to_le_bytes().to_vec();
        msg.extend(body);
        send.write_all(&msg)
            .await
            .map_err(|e| lost(&conn, e.to_string()))?;
        let mut len = [0u8; 4];
        recv.read_exact(&mut len)
            .await
            .map_err(|e| lost(&conn, e.to_string()))?;
        Ok::<_, Outcome>(Outcome::Answered)
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(Ok(o)) | Ok(Err(o)) => o,
        Err(_) => Outcome::Other("no answer within 3 s".into()),
    }
}

/// A server-certificate check that accepts anything: strangers use it so that the
/// refusal under test is the server's.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that trusts any server and presents `cert` (or no certificate).
fn stranger_config(
    cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut tls = match cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()))
}

fn self_signed() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let c = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()));
    (c.cert.der().clone(), key)
}

fn leaf_of(credential: &Credential) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let leaf = credential.issue_leaf().unwrap();
    (leaf.cert, leaf.key)
}

/// Accepts on `server` until it closes; returns how each handshake ended. A connection
/// that gets in is answered with four bytes, so the dialling side can tell.
fn serve(server: &quinn::Endpoint) -> tokio::task::JoinHandle<Vec<Result<(), Outcome>>> {
    let server = server.clone();
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(incoming) = server.accept().await {
            let done = incoming.await;
            seen.push(done.as_ref().map(|_| ()).map_err(classify));
            if let Ok(conn) = done {
                if let Ok((mut send, _recv)) = conn.accept_bi().await {
                    let _ = send.write_all(&[0, 0, 0, 0]).await;
                    let _ = send.finish();
                    let _ = conn.closed().await;
                }
            }
        }
        seen
    })
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
fn a_cluster_endpoint_accepts_only_leaves_its_own_key_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ours) = write_key(dir.path(), "ours.key");
    let (_, theirs) = write_key(dir.path(), "theirs.key");
    let addr = free_local_addrs(1).unwrap()[0];
    let rt = runtime();
    rt.block_on(async {
        let server = transport::endpoint(Rank(0), addr, &options(Security::Cluster(ours.clone())))
            .expect("server endpoint");
        let accepted = serve(&server);
        let client = quinn::Endpoint::client(local()).unwrap();
        let cases = [
            ("a self-signed certificate", Some(self_signed())),
            ("another cluster's leaf", Some(leaf_of(&theirs))),
            ("no certificate", None),
        ];
        for (what, cert) in cases {
            let got = intrude(&client, Some(stranger_config(cert)), addr, 0, 1).await;
            assert!(matches!(got, Outcome::Tls(_)), "{what}: {got:?}");
        }
        let member = intrude(
            &client,
            Some(stranger_config(Some(leaf_of(&ours)))),
            addr,
            0,
            1,
        );
        assert_eq!(
            member.await,
            Outcome::Answered,
            "a leaf of our own key must get in"
        );

        // And the other way round: a member refuses a server of another cluster.
        let other_server = transport::endpoint(Rank(1), free_local_addrs(1).unwrap()[0], &{
            options(Security::Cluster(theirs.clone()))
        })
        .unwrap();
        let other_addr = other_server.local_addr().unwrap();
        let _other_accepted = serve(&other_server);
        let member =
            transport::endpoint(Rank(2), local(), &options(Security::Cluster(ours))).unwrap();
        let got = intrude(&member, None, other_addr, 0, 1).await;
        match got {
            Outcome::Tls(ref detail) => assert!(detail.contains("UnknownIssuer"), "{detail}"),
            ref other => panic!("a foreign server must fail TLS, got {other:?}"),
        }

        server.close(0u32.into(), b"done");
        other_server.close(0u32.into(), b"done");
        let seen = accepted.await.unwrap();
        let refused = seen
            .iter()
            .filter(|r| matches!(r, Err(Outcome::Tls(_))))
            .count();
        assert_eq!((refused, seen.len()), (3, 4), "server side saw {seen:?}");
    });
}

fn small(key: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        steps: Some(steps),
        batch_size: 8,
        hidden: vec![16],
        optim: OptimConfig::sgd(0.05, 0.9),
        check_every: 5,
        connect_timeout: Duration::from_secs(30),
        key: Some(key.to_path_buf()),
        ..TrainConfig::default()
    }
}

/// A stranger that dials `target` over and over until `stop`, claiming to be rank `claim`.
fn spawn_intruder(
    name: &'static str,
    security: Option<Security>,
    config: Option<quinn::ClientConfig>,
    target: SocketAddr,
    claim: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(&'static str, Vec<Outcome>)> {
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let ep = match security {
                Some(s) => transport::endpoint(Rank(99), local(), &options(s)).unwrap(),
                None => quinn::Endpoint::client(local()).unwrap(),
            };
            let mut outcomes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                outcomes.push(intrude(&ep, config.clone(), target, claim, 3).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (name, outcomes)
        })
    })
}

/// Sends garbage datagrams to `target` until `stop`: random bytes, and random bytes dressed
/// as QUIC Initial packets of the minimum size so that the endpoint tries to open them.
fn spawn_garbage(
    target: SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind(local()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let len = if rng.gen_bool(0.5) {
                1200
            } else {
                rng.gen_range(1..1500)
            };
            let mut datagram: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if len == 1200 {
                // Long header, Initial, QUIC version 1, 8-byte connection ids.
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                datagram[5] = 8;
            }
            if socket.send_to(&datagram, target).is_ok() {
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        sent
    })
}

fn run_rank(
    cfg: &TrainConfig,
    rank: usize,
    addrs: &[SocketAddr],
) -> std::thread::JoinHandle<Trained> {
    let (cfg, addrs) = (cfg.clone(), addrs.to_vec());
    std::thread::spawn(move || {
        let place = RingPlace {
            rank: Rank(rank),
            addrs,
        };
        train::run(&cfg, place).unwrap_or_else(|e| panic!("rank {rank}: {e}"))
    })
}

#[test]
fn strangers_other_clusters_and_garbage_are_refused_while_a_run_goes_on() {
    let seed = 0x6a7b_u64;
    println!("garbage seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = write_key(dir.path(), "cluster.key");
    let (_, other) = write_key(dir.path(), "other.key");
    let addrs = free_local_addrs(3).unwrap();
    let cfg = small(&key, 60);
    let target = addrs[1];
    let stop = Arc::new(AtomicBool::new(false));

    // Rank 1 waits for its neighbours while the intruders try to take rank 0's place.
    let started = Instant::now();
    let rank1 = run_rank(&cfg, 1, &addrs);
    let intruders = vec![
        spawn_intruder(
            "self-signed",
            None,
            Some(stranger_config(Some(self_signed()))),
            target,
            0,
            stop.clone(),
        ),
        spawn_intruder(
            "other cluster's leaf",
            None,
            Some(stranger_config(Some(leaf_of(&other)))),
            target,
            0,
            stop.clone(),
        ),
        spawn_intruder(
            "other cluster's endpoint",
            Some(Security::Cluster(other.clone())),
            None,
            target,
            0,
            stop.clone(),
        ),
        spawn_intruder(
            "no certificate",
            Some(Security::Unauthenticated),
            None,
            target,
            0,
            stop.clone(),
        ),
    ];
    let garbage = spawn_garbage(target, seed, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let others = [run_rank(&cfg, 0, &addrs), run_rank(&cfg, 2, &addrs)];

    let mut runs = vec![rank1.join().expect("rank 1")];
    runs.extend(others.into_iter().map(|t| t.join().expect("rank")));
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let datagrams = garbage.join().unwrap();

    for t in &runs {
        assert_eq!(t.summary.param_digest, runs[0].summary.param_digest);
        assert_eq!(t.summary.steps, 60);
    }
    println!("run of 3 ranks took {took:?}; {datagrams} garbage datagrams sent");
    for handle in intruders {
        let (name, outcomes) = handle.join().unwrap();
        let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
        let tls = count(|o| matches!(o, Outcome::Tls(_)));
        let refused = count(|o| matches!(o, Outcome::Refused));
        println!(
            "{name}: {} attempts, {tls} failed TLS, {refused} refused after forming",
            outcomes.len()
        );
        assert!(
            !outcomes.contains(&Outcome::Answered),
            "{name} got an answer: {outcomes:?}"
        );
        // Some attempts fell in the 1.5 s before the ring formed, when TLS had to stop them.
        assert!(tls > 0, "{name} never reached the TLS check: {outcomes:?}");
    }
}

#[test]
fn ranks_with_different_keys_stop_at_once_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = write_key(dir.path(), "a.key");
    let (b, _) = write_key(dir.path(), "b.key");
    let mut keyless = small(&a, 5);
    keyless.key = None;
    // Another cluster's key, and no key at all next to a rank that has one.
    for (name, second) in [("two keys", small(&b, 5)), ("key and none", keyless)] {
        let addrs = free_local_addrs(2).unwrap();
        let started = Instant::now();
        let ranks = train_on(&addrs, &[small(&a, 5), second]);
        for (r, result) in ranks.into_iter().enumerate() {
            let Err(err) = result else {
                panic!("{name}: rank {r} formed a ring with a stranger");
            };
            let msg = err.to_string();
            assert!(
                msg.contains("do not trust each other"),
                "{name}, rank {r}: {msg}"
            );
            assert!(
                msg.contains("--key") && msg.contains(&addrs[1 - r].to_string()),
                "{msg}"
            );
            assert_eq!(err.exit_code(), 2, "{name}: {msg}");
        }
        // Well within the 30 s connect timeout: a failed handshake is not retried.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name}: {:?}",
            started.elapsed()
        );
    }
}

fn ringtrain(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("RINGTRAIN_KEY")
        .output()
        .expect("run ringtrain")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn keygen_writes_a_private_usable_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.key");
    let p = path.to_str().unwrap();
    let out = ringtrain(&["keygen", "--out", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let credential = Credential::load(&path).expect("keygen's file loads");
    assert!(
        stdout.contains(credential.id()) && stdout.contains("--key"),
        "{stdout}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key must be readable by its owner only");
    }
    let again = ringtrain(&["keygen", "--out", p]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(Credential::load(&path).unwrap().id(), credential.id());
}

fn hosts(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("hosts.txt");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn missing_garbled_and_absent_keys_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let local: Vec<String> = free_local_addrs(2)
        .unwrap()
        .iter()
        .map(|a| a.to_string())
        .collect();
    let h = hosts(dir.path(), &local);
    let h = h.to_str().unwrap();
    let garbled = dir.path().join("garbled.key");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let missing = dir.path().join("missing.key");
    let cases = [
        (missing.to_str().unwrap(), "cannot read the cluster key"),
        (garbled.to_str().unwrap(), "is not a ringtrain cluster key"),
    ];
    for (key, needle) in cases {
        let out = ringtrain(&["--hosts", h, "--rank", "0", "--key", key]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(key) && err.contains(needle), "{err}");
        assert!(err.contains("ringtrain keygen"), "{err}");
    }

    // An address other machines could reach, and no key: refused before any packet.
    // (10.0.0.5 is never contacted: the check comes first.)
    let exposed = hosts(dir.path(), &[local[0].clone(), "10.0.0.5:7000".into()]);
    let out = ringtrain(&["--hosts", exposed.to_str().unwrap(), "--rank", "0"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("10.0.0.5:7000") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn launch_gives_every_run_its_own_key() {
    let out = ringtrain(&["launch", "--np", "2", "--steps", "4", "--hidden", "8"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    for rank in 0..2 {
        let line = err.lines().find(|l| {
            l.starts_with(&format!("[rank {rank}]")) && l.contains("using the cluster key")
        });
        assert!(line.is_some(), "rank {rank} ran without a key:\n{err}");
    }
    assert!(!err.contains("no cluster key"), "{err}");
}
