//! Fault injection for chaos testing: delay and/or abort a share of a
//! service's requests before they are forwarded.

use std::time::Duration;

use rand::Rng;
use weft_api::model::Fault;

/// Status used when a fault's abort status is not a valid HTTP status.
pub const FALLBACK_ABORT_STATUS: u16 = 503;

/// What to do to one request. Apply the delay first, then the abort (as
/// Envoy does), so an aborted request can also be slow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultAction {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

impl FaultAction {
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

/// A service's fault settings, checked once per request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultInjector {
    fault: Option<Fault>,
}

impl FaultInjector {
    /// `None` injects nothing.
    pub fn new(fault: Option<&Fault>) -> Self {
        Self {
            fault: fault.cloned(),
        }
    }

    /// Whether any fault is configured (lets the proxy skip the RNG).
    pub fn is_active(&self) -> bool {
        self.fault
            .as_ref()
            .is_some_and(|f| f.delay.is_some() || f.abort.is_some())
    }

    /// The action for one request.
    pub fn action(&self, rng: &mut impl Rng) -> FaultAction {
        match &self.fault {
            Some(fault) => Self::decide(fault, rng),
            None => FaultAction::default(),
        }
    }

    /// Draws delay and abort independently, each with its own percentage
    /// (values over 100 count as 100). An abort status outside 100-599 is
    /// replaced by [`FALLBACK_ABORT_STATUS`], since it could not be sent.
    pub fn decide(fault: &Fault, rng: &mut impl Rng) -> FaultAction {
        let delay = fault
            .delay
            .as_ref()
            .filter(|d| hit(d.percent, rng))
            .map(|d| Duration::from_millis(d.delay_ms));
        let abort = fault
            .abort
            .as_ref()
            .filter(|a| hit(a.percent, rng))
            .map(|a| {
                if (100..=599).contains(&a.status) {
                    a.status
                } else {
                    FALLBACK_ABORT_STATUS
                }
            });
        FaultAction { delay, abort }
    }
}

fn hit(percent: u32, rng: &mut impl Rng) -> bool {
    match percent {
        0 => false,
        p if p >= 100 => true,
        p => rng.gen_range(0..100) < p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use weft_api::model::{FaultAbort, FaultDelay};

    fn fault(delay_percent: Option<u32>, abort_percent: Option<u32>, status: u16) -> Fault {
        Fault {
            delay: delay_percent.map(|percent| FaultDelay {
                percent,
                delay_ms: 100,
            }),
            abort: abort_percent.map(|percent| FaultAbort { percent, status }),
        }
    }

    #[test]
    fn no_fault_does_nothing() {
        let injector = FaultInjector::new(None);
        assert!(!injector.is_active());
        let mut rng = StdRng::seed_from_u64(1);
        assert!(injector.action(&mut rng).is_none());
        assert!(!FaultInjector::new(Some(&Fault::default())).is_active());
    }

    #[test]
    fn zero_and_hundred_percent_are_exact() {
        let mut rng = StdRng::seed_from_u64(2);
        let always = fault(Some(100), Some(100), 418);
        let never = fault(Some(0), Some(0), 418);
        for _ in 0..200 {
            assert_eq!(
                FaultInjector::decide(&always, &mut rng),
                FaultAction {
                    delay: Some(Duration::from_millis(100)),
                    abort: Some(418),
                }
            );
            assert!(FaultInjector::decide(&never, &mut rng).is_none());
        }
        let over = fault(None, Some(250), 500);
        assert_eq!(FaultInjector::decide(&over, &mut rng).abort, Some(500));
    }

    #[test]
    fn fifty_percent_is_about_half_and_draws_are_independent() {
        let injector = FaultInjector::new(Some(&fault(Some(50), Some(50), 503)));
        assert!(injector.is_active());
        let mut rng = StdRng::seed_from_u64(3);
        let n = 10_000;
        let (mut delays, mut aborts, mut both) = (0, 0, 0);
        for _ in 0..n {
            let action = injector.action(&mut rng);
            delays += usize::from(action.delay.is_some());
            aborts += usize::from(action.abort.is_some());
            both += usize::from(action.delay.is_some() && action.abort.is_some());
        }
        // Binomial sd is 50 for n=10000, p=0.5; allow ~4 sd.
        assert!((4800..5200).contains(&delays), "{delays}");
        assert!((4800..5200).contains(&aborts), "{aborts}");
        // Independent: both about 25% (sd ~43).
        assert!((2330..2670).contains(&both), "{both}");
    }

    #[test]
    fn invalid_abort_status_falls_back_to_503() {
        let mut rng = StdRng::seed_from_u64(4);
        for status in [0, 99, 600, 999] {
            let action = FaultInjector::decide(&fault(None, Some(100), status), &mut rng);
            assert_eq!(action.abort, Some(FALLBACK_ABORT_STATUS));
        }
    }
}
