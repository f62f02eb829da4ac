//! A UDP socket that drops a share of outgoing datagrams, to test QUIC's recovery.
//!
//! `--inject-loss P` wraps each endpoint's socket in a [`LossySocket`]: every datagram it
//! would send is dropped with probability `P`, from a seeded generator, so a test reproduces
//! the same pattern. It needs no privileges, unlike the nftables rules of the emulated
//! cluster, and exercises the same path: lost packets that QUIC must detect and resend.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A socket that silently drops each outgoing datagram with a fixed probability.
pub struct LossySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    rate: f64,
    rng: Mutex<ChaCha8Rng>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl fmt::Debug for LossySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossySocket")
            .field("rate", &self.rate)
            .field("sent", &self.sent.load(Ordering::Relaxed))
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish()
    }
}

impl LossySocket {
    /// Wraps `inner`, dropping datagrams with probability `rate` (clamped to 0..=1), the
    /// pattern drawn from `seed`.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, rate: f64, seed: u64) -> LossySocket {
        LossySocket {
            inner,
            rate: rate.clamp(0.0, 1.0),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// (datagrams passed on, datagrams dropped) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn drop_next(&self) -> bool {
        // A poisoned lock only means another thread panicked mid-draw; the generator
        // state is still usable for a test aid.
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.gen_bool(self.rate)
    }
}

impl AsyncUdpSocket for LossySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.drop_next() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.inner.try_send(transmit)?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per send, so each drop loses exactly one packet.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
