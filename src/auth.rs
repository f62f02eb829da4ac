//! Who may join a ring: the cluster credential, and the TLS settings built from it.
//!
//! A cluster credential is a tiny certificate authority: a CA certificate and its private
//! key, written once by `ringtrain keygen` and copied to every machine. At start each rank
//! makes a fresh key pair and a leaf certificate for it, signed by the CA in memory, and
//! presents that leaf both as a QUIC server (to the rank before it) and as a client (to the
//! rank after it). Both ends of every connection accept only a leaf that the same CA
//! signed, so a process without the credential cannot finish a handshake, and so can
//! neither read the ring's traffic nor put a frame on it.
//!
//! ```text
//!   cluster.key  (keygen; copied to every machine; mode 0600)
//!     CA certificate "ringtrain cluster <id>" + CA private key
//!              |
//!              | signs at start, in memory only
//!              v
//!   rank k: fresh key pair, leaf for "ringtrain" (server and client use)
//!
//!   rank k ----- TLS 1.3 in QUIC; each side checks the other's leaf against the CA ----> rank k+1
//! ```
//!
//! Without a credential the ring is still encrypted, but any peer is accepted;
//! [`Security::resolve`] allows that only when every address is a loopback address, or
//! when the user asked for it with `--insecure`.

use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, TrustAnchor, UnixTime,
};
use tracing::{info, warn};

/// The name every rank's leaf certificate is issued for, and that clients check.
pub const SERVER_NAME: &str = "ringtrain";

/// Largest credential file read; a real one is well under 2 KiB.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Why a credential could not be made, read or used, or why the ring may not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The key file could not be read.
    #[error(
        "cannot read the cluster key {}: {source}; create one with \
         `ringtrain keygen --out FILE` and pass it with --key FILE",
        path.display()
    )]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The key file is not a credential written by `ringtrain keygen`.
    #[error(
        "{} is not a ringtrain cluster key: {detail}; write a new one with \
         `ringtrain keygen --out FILE` and copy it to every machine",
        path.display()
    )]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// `keygen` would overwrite an existing file.
    #[error(
        "{} already exists; ranks holding the old key could no longer join, so it is not \
         overwritten: delete it first or choose another --out",
        path.display()
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The key file could not be written.
    #[error("cannot write the cluster key {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Key or certificate generation failed (a bug or an unsupported platform).
    #[error("cannot generate a key or certificate: {0}")]
    Generate(String),
    /// The TLS configuration could not be built (a bug or an unsupported platform).
    #[error("cannot configure TLS: {0}")]
    Tls(String),
    /// A rank address is reachable from other machines, and there is no credential.
    #[error(
        "rank {rank}'s address {addr} is not a loopback address and no cluster key was \
         given: anyone who can reach that port could join the ring and read or change its \
         gradients. create a key with `ringtrain keygen --out cluster.key`, copy it to every \
         machine and pass --key cluster.key (or set RINGTRAIN_KEY); or, on a network you \
         trust, pass --insecure"
    )]
    KeyRequired {
        /// The first rank with such an address.
        rank: usize,
        /// Its address.
        addr: SocketAddr,
    },
    /// Both a key and `--insecure` were given.
    #[error(
        "both a cluster key ({}) and --insecure were given; drop --insecure, or drop the \
         key (--key or the RINGTRAIN_KEY variable)",
        path.display()
    )]
    Contradiction {
        /// The key file given.
        path: PathBuf,
    },
}

/// A cluster credential: the CA that signs every rank's certificate.
pub struct Credential {
    /// The CA certificate as written in the file; the one trust root.
    ca_cert: CertificateDer<'static>,
    /// The CA's private key.
    ca_key: KeyPair,
    /// The CA rebuilt from its key, to sign leaves with (rcgen needs its parameters).
    issuer: rcgen::Certificate,
    /// Short hex id derived from the CA's public key, for logs.
    id: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Credential").field("id", &self.id).finish()
    }
}

/// A rank's own certificate and key, issued by a [`Credential`].
pub struct Leaf {
    /// The certificate, signed by the cluster CA.
    pub cert: CertificateDer<'static>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf").finish_non_exhaustive()
    }
}

impl Credential {
    /// A fresh credential with a new CA key (ECDSA P-256).
    pub fn generate() -> Result<Credential, AuthError> {
        let ca_key = KeyPair::generate().map_err(generate_err)?;
        let (issuer, id) = rebuild_ca(&ca_key)?;
        let ca_cert = issuer.der().clone();
        Ok(Credential {
            ca_cert,
            ca_key,
            issuer,
            id,
        })
    }

    /// Reads the credential at `path`.
    pub fn load(path: &Path) -> Result<Credential, AuthError> {
        let read_err = |source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        warn_if_shared(path, &file);
        let mut text = Vec::new();
        file.take(MAX_KEY_FILE + 1)
            .read_to_end(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_KEY_FILE {
            let detail = format!("it is larger than {MAX_KEY_FILE} bytes");
            return Err(invalid(path, detail));
        }
        Self::from_pem(path, &text)
    }

    /// Parses a credential from the PEM text of a key file; `path` only names it in errors.
    ///
    /// The text must hold exactly one certificate and one PKCS#8 private key, and the
    /// certificate must be the CA that key makes (as `keygen` writes it).
    pub fn from_pem(path: &Path, text: &[u8]) -> Result<Credential, AuthError> {
        let (mut certs, mut keys) = (Vec::new(), Vec::new());
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text) {
            let (kind, der) = section.map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
            match kind {
                SectionKind::Certificate => certs.push(CertificateDer::from(der)),
                SectionKind::PrivateKey => keys.push(PrivatePkcs8KeyDer::from(der)),
                other => {
                    let detail = format!("unexpected PEM section {other:?}");
                    return Err(invalid(path, detail));
                }
            }
        }
        if certs.len() != 1 || keys.len() != 1 {
            let detail = format!(
                "expected one CERTIFICATE and one PRIVATE KEY section, found {} and {}",
                certs.len(),
                keys.len()
            );
            return Err(invalid(path, detail));
        }
        let (ca_cert, key) = (certs.remove(0), keys.remove(0));

        let ca_key = KeyPair::try_from(&key)
            .map_err(|e| invalid(path, format!("unreadable private key: {e}")))?;
        let (issuer, id) = rebuild_ca(&ca_key)?;
        let stored = trust_anchor(&ca_cert)
            .map_err(|e| invalid(path, format!("unreadable certificate: {e}")))?;
        let rebuilt = trust_anchor(issuer.der()).map_err(|e| AuthError::Tls(e.to_string()))?;
        if stored.subject != rebuilt.subject
            || stored.subject_public_key_info != rebuilt.subject_public_key_info
        {
            let detail = "its certificate does not belong to its private key";
            return Err(invalid(path, detail.into()));
        }
        Ok(Credential {
            ca_cert,
            ca_key,
            issuer,
            id,
        })
    }

    /// The credential as the text of a key file: a comment, the CA certificate and the
    /// CA private key, in PEM.
    pub fn to_pem(&self) -> String {
        let mut out = format!(
            "# ringtrain cluster key {}: a CA certificate and its private key.\n\
             # Whoever holds this file can join the cluster: keep it secret (mode 0600).\n",
            self.id
        );
        out.push_str(&pem("CERTIFICATE", &self.ca_cert));
        out.push_str(&pem("PRIVATE KEY", self.ca_key.serialized_der()));
        out
    }

    /// Writes the credential to a new file at `path`, readable only by its owner.
    /// Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), AuthError> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => AuthError::Exists {
                path: path.to_path_buf(),
            },
            _ => AuthError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let written = file
            .write_all(self.to_pem().as_bytes())
            .and_then(|()| file.sync_all());
        written.map_err(|source| {
            // Leave no half-written key behind.
            let _ = std::fs::remove_file(path);
            AuthError::Write {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// A short hex id of the CA's public key: ranks that log the same id share a cluster.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The CA certificate, the one trust root of the cluster.
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_cert
    }

    /// Issues a leaf for a fresh key pair: subject alternative name [`SERVER_NAME`],
    /// usable for TLS server and client authentication.
    ///
    /// Validity runs from 1975 to 4096 so that clocks that disagree between machines never
    /// matter; a leaf lives only in one process's memory, and the CA key is the secret.
    pub fn issue_leaf(&self) -> Result<Leaf, AuthError> {
        let key = KeyPair::generate().map_err(generate_err)?;
        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(generate_err)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "ringtrain rank");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer, &self.ca_key)
            .map_err(generate_err)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(Leaf {
            cert: cert.der().clone(),
            key,
        })
    }
}

/// The CA certificate for `ca_key`, rebuilt the same way every time: its subject names the
/// key's id, so certificates of different clusters never share an issuer name.
fn rebuild_ca(ca_key: &KeyPair) -> Result<(rcgen::Certificate, String), AuthError> {
    let digest = blake3::hash(&ca_key.public_key_der());
    let id = digest.to_hex()[..16].to_string();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("ringtrain cluster {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(ca_key).map_err(generate_err)?;
    Ok((cert, id))
}

fn trust_anchor(cert: &CertificateDer<'_>) -> Result<TrustAnchor<'static>, rustls::Error> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.clone().into_owned())?;
    Ok(roots.roots.remove(0))
}

fn generate_err(e: rcgen::Error) -> AuthError {
    AuthError::Generate(e.to_string())
}

fn invalid(path: &Path, detail: String) -> AuthError {
    AuthError::Invalid {
        path: path.to_path_buf(),
        detail,
    }
}

/// Warns when others than the owner may read the key file.
fn warn_if_shared(path: &Path, file: &std::fs::File) {
    #[cfg(unix)]
    if let Ok(meta) = file.metadata() {
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        if mode & 0o077 != 0 {
            warn!(
                path = %path.display(),
                mode = format_args!("{mode:o}"),
                "the cluster key can be read by other users, who could then join the ring; \
                 run chmod 600 on it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, file);
}

/// `der` as a PEM section with the given label.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    // Standard PEM lines of 64 characters; base64 is ASCII, so byte chunks are whole.
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 output is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Standard base64 with padding (RFC 4648, section 4).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How a rank's connections are secured.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual TLS: both ends must present a leaf signed by this cluster's CA.
    Cluster(Arc<Credential>),
    /// Encrypted, but any peer is accepted and no peer is checked: whoever can reach the
    /// port can join the ring. Only for loopback or a network the user trusts.
    Unauthenticated,
}

impl Security {
    /// Chooses the security of a rank whose ring has `addrs`: the credential at `key` if
    /// one is given; otherwise, unauthenticated if `insecure` is set (with a loud warning),
    /// or if every address is a loopback address (with a warning), or the world has one
    /// rank (no network at all); otherwise [`AuthError::KeyRequired`].
    pub fn resolve(
        key: Option<&Path>,
        insecure: bool,
        addrs: &[SocketAddr],
    ) -> Result<Security, AuthError> {
        match (key, insecure) {
            (Some(path), true) => Err(AuthError::Contradiction {
                path: path.to_path_buf(),
            }),
            (Some(path), false) => {
                let credential = Credential::load(path)?;
                info!(key = %path.display(), cluster = credential.id(), "using the cluster key");
                Ok(Security::Cluster(Arc::new(credential)))
            }
            (None, true) => {
                warn!(
                    "INSECURE: --insecure was given, so ranks do not authenticate each other: \
                     anyone who can reach this rank's UDP port can join the ring, read the \
                     gradients and change them. use a cluster key (ringtrain keygen) on any \
                     network you do not fully trust"
                );
                Ok(Security::Unauthenticated)
            }
            (None, false) => {
                let exposed = addrs
                    .iter()
                    .enumerate()
                    .find(|(_, a)| !a.ip().is_loopback());
                match exposed {
                    _ if addrs.len() <= 1 => Ok(Security::Unauthenticated),
                    Some((rank, &addr)) => Err(AuthError::KeyRequired { rank, addr }),
                    None => {
                        warn!(
                            "no cluster key: the ring is encrypted but unauthenticated, so any \
                             process on this machine can join it; pass --key FILE (see \
                             `ringtrain keygen`) to prevent that"
                        );
                        Ok(Security::Unauthenticated)
                    }
                }
            }
        }
    }

    /// The TLS server and client configurations of one endpoint (TLS 1.3 only, without
    /// ALPN: the transport adds its own). For a cluster, this issues a fresh leaf.
    pub fn tls_configs(&self) -> Result<(rustls::ServerConfig, rustls::ClientConfig), AuthError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        match self {
            Security::Cluster(credential) => cluster_configs(credential, provider),
            Security::Unauthenticated => open_configs(provider),
        }
    }
}

fn tls_err(e: impl fmt::Display) -> AuthError {
    AuthError::Tls(e.to_string())
}

fn cluster_configs(
    credential: &Credential,
    provider: Arc<CryptoProvider>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), AuthError> {
    let leaf = credential.issue_leaf()?;
    let mut roots = RootCertStore::empty();
    roots.add(credential.ca_cert.clone()).map_err(tls_err)?;
    let roots = Arc::new(roots);

    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(tls_err)?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
        .map_err(tls_err)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![leaf.cert], leaf.key)
        .map_err(tls_err)?;
    Ok((server, client))
}

/// Encryption without authentication: a throw-away self-signed server certificate, no
/// client certificate, and a client that accepts any server certificate.
fn open_configs(
    provider: Arc<CryptoProvider>,
) -> Result<(rustls::ServerConfig, rustls::ClientConfig), AuthError> {
    let cert =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(generate_err)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(tls_err)?;
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_no_client_auth();
    Ok((server, client))
}

/// The unauthenticated mode's server check: any certificate is accepted, but the
/// handshake signature must still be valid for it.
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((a, port))
    }

    #[test]
    fn base64_matches_the_rfc_examples() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
    }

    #[test]
    fn pem_round_trips_through_the_rustls_parser() {
        for len in [0usize, 1, 47, 48, 49, 200] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let text = pem("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(text.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), der.as_slice(), "length {len}");
        }
    }

    #[test]
    fn key_file_text_round_trips_and_keeps_the_id() {
        let cred = Credential::generate().unwrap();
        let text = cred.to_pem();
        let back = Credential::from_pem(Path::new("k"), text.as_bytes()).unwrap();
        assert_eq!(back.id(), cred.id());
        assert_eq!(back.ca_cert(), cred.ca_cert());
        assert_eq!(cred.id().len(), 16);
        assert!(
            !format!("{cred:?}").contains("PRIVATE"),
            "Debug must not show the key"
        );
    }

    #[test]
    fn garbled_key_files_are_named_and_explained() {
        let cred = Credential::generate().unwrap();
        let other = Credential::generate().unwrap();
        let cert_only = pem("CERTIFICATE", cred.ca_cert());
        // Another cluster's certificate with this cluster's key.
        let swapped = format!(
            "{}{}",
            pem("CERTIFICATE", other.ca_cert()),
            pem("PRIVATE KEY", cred.ca_key.serialized_der())
        );
        let truncated = &cred.to_pem()[..300];
        let bad_key = format!("{cert_only}{}", pem("PRIVATE KEY", b"not a key"));
        let cases: [(&str, &str); 5] = [
            ("hello", "expected one CERTIFICATE"),
            (&cert_only, "expected one CERTIFICATE"),
            (&swapped, "does not belong to its private key"),
            (truncated, "bad PEM"),
            (&bad_key, "unreadable private key"),
        ];
        for (text, want) in cases {
            let err = Credential::from_pem(Path::new("/x/c.key"), text.as_bytes()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("/x/c.key") && msg.contains(want), "{msg}");
            assert!(msg.contains("ringtrain keygen"), "{msg}");
        }
    }

    #[test]
    fn leaves_of_one_cluster_differ_but_share_the_issuer() {
        let cred = Credential::generate().unwrap();
        let (a, b) = (cred.issue_leaf().unwrap(), cred.issue_leaf().unwrap());
        assert_ne!(a.cert, b.cert);
        assert!(!format!("{a:?}").contains("key:"));
    }

    #[test]
    fn resolve_applies_the_policy() {
        let loopback = [v4([127, 0, 0, 1], 1), v4([127, 0, 0, 1], 2)];
        let exposed = [v4([127, 0, 0, 1], 1), v4([10, 0, 0, 5], 7000)];
        let open = |key: Option<&Path>, insecure, addrs: &[SocketAddr]| {
            Security::resolve(key, insecure, addrs).map(|s| matches!(s, Security::Unauthenticated))
        };
        assert!(open(None, false, &loopback).unwrap());
        assert!(open(None, true, &exposed).unwrap());
        assert!(
            open(None, false, &exposed[1..]).unwrap(),
            "a world of one has no network"
        );
        let err = open(None, false, &exposed).unwrap_err().to_string();
        assert!(
            err.contains("rank 1's address 10.0.0.5:7000") && err.contains("keygen"),
            "{err}"
        );
        let err = open(Some(Path::new("/k")), true, &loopback).unwrap_err();
        assert!(matches!(err, AuthError::Contradiction { .. }), "{err}");
        let err = open(Some(Path::new("/no/such/key")), false, &loopback).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/no/such/key") && msg.contains("cannot read"),
            "{msg}"
        );
    }

    #[test]
    fn write_new_is_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let cred = Credential::generate().unwrap();
        cred.write_new(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let err = Credential::generate()
            .unwrap()
            .write_new(&path)
            .unwrap_err();
        assert!(matches!(err, AuthError::Exists { .. }), "{err}");
        assert_eq!(Credential::load(&path).unwrap().id(), cred.id());
    }
}
