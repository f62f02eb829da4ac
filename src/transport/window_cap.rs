//! A congestion controller that never lets the window exceed a fixed cap.
//!
//! On loopback nothing in the network queues or drops packets; the only buffer between
//! two ranks is the receiver's UDP socket buffer. When several ranks share few cores, a
//! receiver is often off the CPU for a few milliseconds, and every datagram that arrives
//! meanwhile waits in that buffer. Cubic keeps growing its window (to 7–9 MB in our
//! 4-rank runs) until the buffer overflows; each overflow loses 64 KB datagrams, stalls
//! the stream until the resend arrives and shrinks the window. Capping the window below
//! the buffer keeps every burst inside it.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Builds `inner`'s controller, its window capped at `cap` bytes.
#[derive(Debug)]
pub struct CappedFactory<F> {
    /// The controller being capped.
    pub inner: Arc<F>,
    /// The largest window in bytes.
    pub cap: u64,
}

impl<F: ControllerFactory + Send + Sync + 'static> ControllerFactory for CappedFactory<F> {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let inner = self.inner.clone().build(now, current_mtu);
        Box::new(Capped {
            inner,
            cap: self.cap,
        })
    }
}

/// A controller whose window is `min(inner's window, cap)`; everything else is the inner
/// controller's.
struct Capped {
    inner: Box<dyn Controller>,
    cap: u64,
}

impl Controller for Capped {
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
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
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
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.inner.window().min(self.cap)
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(Capped {
            inner: self.inner.clone_box(),
            cap: self.cap,
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

    #[test]
    fn the_window_is_the_smaller_of_the_inner_one_and_the_cap() {
        let now = Instant::now();
        let mut c = Capped {
            inner: Box::new(Fixed(9_000_000)),
            cap: 4_000_000,
        };
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
    fn the_factory_caps_a_real_cubic_controller() {
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(8 << 20);
        let factory = Arc::new(CappedFactory {
            inner: Arc::new(cubic),
            cap: 1 << 20,
        });
        let c = factory.build(Instant::now(), 1200);
        assert_eq!(c.window(), 1 << 20);
    }
}
