//! The congestion controller of every ring connection: quinn's Cubic with three changes.
//!
//! **Losses before the path answered are not congestion.** Ranks start in any order, so a
//! rank often dials its neighbour before the neighbour's socket exists; the first Initial
//! packet is then lost. Counted as congestion, that one loss ends slow start at the
//! initial window (about 10 KB), and Cubic, whose regrowth takes seconds at these rates,
//! left that connection at a third of a 1 Gbit/s link for the whole run, in about half of
//! our 2-rank runs. A packet sent before the first acknowledgement arrived says nothing
//! about the path's capacity, so its loss is passed over (it is still resent).
//!
//! **An optional cap on the window.** On loopback nothing in the network queues or drops
//! packets; the only buffer between two ranks is the receiver's UDP socket buffer. When
//! several ranks share few cores, a receiver is often off the CPU for a few milliseconds,
//! and every datagram that arrives meanwhile waits in that buffer. Cubic kept growing its
//! window (to 7–9 MB in our 4-rank runs) until the buffer overflowed; each overflow lost
//! 64 KB datagrams, stalled the stream until the resend arrived and shrank the window.
//! Capping the window below the buffer keeps every burst inside it.
//!
//! **A limit on queueing delay, on paths other than loopback.** Loss-based Cubic grows
//! until the bottleneck's queue overflows; a rate-shaped 1 Gbit/s link with a 20 ms queue
//! then dropped bursts of packets every few hundred milliseconds, and each burst stalled
//! the receiving rank's ordered stream for a round trip of a full queue. [`DelayLimit`]
//! keeps the queue near a target instead (see there).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Builds `inner`'s controller with the changes above.
#[derive(Debug)]
pub struct RingFactory<F> {
    /// The controller being changed.
    pub inner: Arc<F>,
    /// The largest window in bytes, if any.
    pub cap: Option<u64>,
    /// The queueing delay above which the window stops growing and shrinks, if any.
    pub target_delay: Option<Duration>,
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for RingFactory<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = self.inner.clone().build(now, current_mtu);
        Box::new(Ring {
            inner,
            cap: self.cap.unwrap_or(u64::MAX),
            first_ack: None,
            delay: self.target_delay.map(DelayLimit::new),
        })
    }
}

/// A controller whose window is `min(inner's window, cap)` and which passes over losses of
/// packets sent before the first acknowledgement; everything else is the inner one's.
struct Ring {
    inner: Box<dyn Controller>,
    cap: u64,
    /// When the first acknowledgement arrived.
    first_ack: Option<Instant>,
    delay: Option<DelayLimit>,
}

/// The smallest window the delay limit leaves: a few packets more than any LAN path's
/// bandwidth-delay product at 1 Gbit/s.
const DELAY_LIMIT_FLOOR: u64 = 256 << 10;

/// A limit on the window that holds the queue a connection builds at its bottleneck near
/// a target delay, in the manner of LEDBAT. The queueing delay is the smoothed RTT minus
/// the least RTT seen; the target is the larger of the configured one and that least RTT,
/// so a long path may queue as much as it takes to fill it. Below the target the limit
/// grows by up to half the bytes acknowledged, above it it shrinks by up to as much.
///
/// Why: a loss-based controller alone fills the bottleneck's queue until it drops a burst
/// of packets; the receiver's ordered stream then waits a round trip of a full queue for
/// the resends, and in a ring every rank after it waits too.
#[derive(Clone, Copy, Debug)]
struct DelayLimit {
    target: Duration,
    /// The limit in bytes; `u64::MAX` while the queue has stayed below the target.
    limit: u64,
}

impl DelayLimit {
    fn new(target: Duration) -> Self {
        Self {
            target,
            limit: u64::MAX,
        }
    }

    /// Moves the limit for `bytes` acknowledged while `window` was in force, with the
    /// path's current queueing delay and least RTT.
    fn on_ack(
        &mut self,
        bytes: u64,
        app_limited: bool,
        window: u64,
        queued: Duration,
        min_rtt: Duration,
    ) {
        let target = self.target.max(min_rtt).as_secs_f64();
        let off = ((target - queued.as_secs_f64()) / target).clamp(-1.0, 1.0);
        if off < 0.0 {
            let from = self.limit.min(window);
            let cut = (bytes as f64 * -off / 2.0) as u64;
            self.limit = from.saturating_sub(cut).max(DELAY_LIMIT_FLOOR);
        } else if self.limit != u64::MAX && !app_limited {
            self.limit += (bytes as f64 * off / 2.0) as u64;
            if self.limit > window.saturating_mul(2) {
                // Far above what the inner controller allows: no longer a limit.
                self.limit = u64::MAX;
            }
        }
    }
}

impl Controller for Ring {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.first_ack.get_or_insert(now);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        let window = self.inner.window().min(self.cap);
        if let Some(delay) = &mut self.delay {
            let queued = rtt.get().saturating_sub(rtt.min());
            delay.on_ack(bytes, app_limited, window, queued, rtt.min());
        }
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if self.first_ack.is_none_or(|first| sent < first) {
            tracing::debug!(
                lost_bytes,
                "a loss before the path answered: not congestion"
            );
            return;
        }
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let limit = self.delay.map_or(u64::MAX, |d| d.limit);
        self.inner.window().min(self.cap).min(limit)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Ring {
            inner: self.inner.clone_box(),
            cap: self.cap,
            first_ack: self.first_ack,
            delay: self.delay,
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window().min(self.cap)
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller whose window is whatever the test sets.
    #[derive(Clone)]
    struct Fixed(u64);

    impl Controller for Fixed {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, _: bool, _: u64) {
            self.0 /= 2;
        }
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            self.0
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            self.0
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    fn ring(window: u64, cap: u64, first_ack: Option<Instant>) -> Ring {
        Ring {
            inner: Box::new(Fixed(window)),
            cap,
            first_ack,
            delay: None,
        }
    }

    #[test]
    fn the_window_is_the_smaller_of_the_inner_one_and_the_cap() {
        let now = Instant::now();
        let mut c = ring(9_000_000, 4_000_000, Some(now));
        assert_eq!(c.window(), 4_000_000);
        assert_eq!(c.initial_window(), 4_000_000);
        assert_eq!(c.metrics().congestion_window, 4_000_000);
        assert_eq!(c.clone_box().window(), 4_000_000);
        c.on_congestion_event(now, now, false, 1200);
        assert_eq!(c.window(), 4_000_000, "9 MB halved is still above the cap");
        c.on_congestion_event(now, now, false, 1200);
        assert_eq!(
            c.window(),
            2_250_000,
            "below the cap the inner window rules"
        );
    }

    #[test]
    fn losses_of_packets_sent_before_the_first_ack_leave_the_window_alone() {
        let start = Instant::now();
        let later = start + std::time::Duration::from_millis(5);
        let mut c = ring(1_000_000, u64::MAX, None);
        c.on_congestion_event(later, start, false, 1200);
        assert_eq!(
            c.window(),
            1_000_000,
            "no ack yet: the loss is not congestion"
        );
        // quinn gives no way to build an RttEstimator here, so set the first ack directly.
        c.first_ack = Some(later);
        c.on_congestion_event(later, start, false, 1200);
        assert_eq!(c.window(), 1_000_000, "sent before the first ack arrived");
        c.on_congestion_event(later, later, false, 1200);
        assert_eq!(c.window(), 500_000, "sent after it: congestion as usual");
    }

    #[test]
    fn the_delay_limit_holds_the_queue_near_its_target() {
        let ms = Duration::from_millis;
        let mut d = DelayLimit::new(ms(1));
        d.on_ack(10_000, false, 4_000_000, ms(0), ms(0));
        assert_eq!(d.limit, u64::MAX, "an empty queue sets no limit");
        d.on_ack(100_000, false, 4_000_000, ms(3), ms(0));
        assert_eq!(
            d.limit,
            4_000_000 - 50_000,
            "twice the target over: cut by half the acked"
        );
        d.on_ack(
            100_000,
            false,
            4_000_000,
            Duration::from_micros(1500),
            ms(0),
        );
        assert_eq!(d.limit, 3_950_000 - 25_000);
        d.on_ack(100_000, true, 4_000_000, ms(0), ms(0));
        assert_eq!(
            d.limit, 3_925_000,
            "app-limited acks say nothing about room to grow"
        );
        d.on_ack(100_000, false, 4_000_000, Duration::from_micros(500), ms(0));
        assert_eq!(d.limit, 3_925_000 + 25_000);
        for _ in 0..1000 {
            d.on_ack(100_000, false, 4_000_000, ms(0), ms(0));
        }
        assert_eq!(
            d.limit,
            u64::MAX,
            "far above the inner window the limit lets go"
        );
        for _ in 0..1000 {
            d.on_ack(100_000, false, 4_000_000, ms(50), ms(0));
        }
        assert_eq!(d.limit, DELAY_LIMIT_FLOOR, "it never cuts below the floor");
    }

    #[test]
    fn a_long_path_may_queue_as_long_as_its_round_trip() {
        let ms = Duration::from_millis;
        let mut d = DelayLimit::new(ms(1));
        // 30 ms of queue on a 50 ms path is below one round trip: no limit.
        d.on_ack(100_000, false, 8_000_000, ms(30), ms(50));
        assert_eq!(d.limit, u64::MAX);
        d.on_ack(100_000, false, 8_000_000, ms(100), ms(50));
        assert_eq!(d.limit, 8_000_000 - 50_000);
    }

    #[test]
    fn the_window_is_the_smallest_of_inner_cap_and_delay_limit() {
        let mut c = ring(9_000_000, 4_000_000, Some(Instant::now()));
        c.delay = Some(DelayLimit {
            target: Duration::from_millis(1),
            limit: 1_000_000,
        });
        assert_eq!(c.window(), 1_000_000);
        assert_eq!(c.clone_box().window(), 1_000_000);
    }

    #[test]
    fn the_factory_caps_a_real_cubic_controller() {
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(8 << 20);
        let factory = Arc::new(RingFactory {
            inner: Arc::new(cubic),
            cap: Some(1 << 20),
            target_delay: None,
        });
        let c = factory.build(Instant::now(), 1200);
        assert_eq!(c.window(), 1 << 20);
    }
}
