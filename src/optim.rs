//! Optimizers that every rank applies identically.
//!
//! After the all-reduce every rank holds the same averaged gradient, and each applies the same
//! [`Optimizer::step`] to its own copy of the parameters. The copies are never compared or
//! re-broadcast, so a step must be a pure function of (state, params, grad) down to the bit:
//! element by element in index order, using only IEEE 754 `+`, `-`, `*`, `/` and `sqrt`
//! (all correctly rounded), no fused multiply-add, no threads, no platform math library.
//! Adam's bias corrections use running products of the betas for the same reason, rather
//! than `powi`/`powf`.

use std::fmt;
use std::str::FromStr;

/// Which update rule an [`Optimizer`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Stochastic gradient descent with optional (heavy-ball) momentum.
    Sgd,
    /// Adam (Kingma & Ba, 2015) with bias correction.
    Adam,
}

impl OptimizerKind {
    /// The lower-case name that [`Display`](fmt::Display) writes and `from_str` accepts.
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::Sgd => "sgd",
            OptimizerKind::Adam => "adam",
        }
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OptimizerKind {
    type Err = OptimConfigError;

    /// Parses `sgd` or `adam`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [OptimizerKind::Sgd, OptimizerKind::Adam]
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| OptimConfigError::UnknownKind(s.to_owned()))
    }
}

/// What can be wrong with an optimizer's configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimConfigError {
    /// The optimizer name is not one we know.
    #[error("unknown optimizer {0:?}: expected one of sgd, adam")]
    UnknownKind(String),
    /// A hyper-parameter is outside the range where the update rule makes sense.
    #[error("optimizer setting {name} = {value} is out of range: expected {expected}")]
    OutOfRange {
        /// Field name, as in [`OptimConfig`].
        name: &'static str,
        /// The rejected value.
        value: f32,
        /// The accepted range, in words.
        expected: &'static str,
    },
}

/// Hyper-parameters of an [`Optimizer`]. Fields that the chosen kind does not use are
/// ignored (`momentum` for Adam; `beta1`, `beta2` and `eps` for SGD).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OptimConfig {
    /// Update rule.
    pub kind: OptimizerKind,
    /// Learning rate.
    pub lr: f32,
    /// SGD momentum coefficient `mu`, e.g. 0.9; 0 gives plain gradient descent.
    pub momentum: f32,
    /// Adam's decay rate for the first-moment estimate.
    pub beta1: f32,
    /// Adam's decay rate for the second-moment estimate.
    pub beta2: f32,
    /// Adam's denominator term, added after the square root.
    pub eps: f32,
    /// L2 penalty: `weight_decay * p` is added to the gradient before the update, as in
    /// PyTorch's `SGD` and `Adam` (not the decoupled AdamW form).
    pub weight_decay: f32,
}

impl OptimConfig {
    /// SGD with the given learning rate and momentum, no weight decay. The Adam fields get
    /// the defaults of [`adam`](Self::adam) and are ignored.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        let adam_defaults = Self::adam(lr);
        OptimConfig {
            kind: OptimizerKind::Sgd,
            momentum,
            ..adam_defaults
        }
    }

    /// Adam with the given learning rate and the usual `beta1 = 0.9`, `beta2 = 0.999`,
    /// `eps = 1e-8`, no weight decay.
    pub fn adam(lr: f32) -> Self {
        OptimConfig {
            kind: OptimizerKind::Adam,
            lr,
            momentum: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// This configuration with `weight_decay` replaced.
    pub fn with_weight_decay(self, weight_decay: f32) -> Self {
        OptimConfig {
            weight_decay,
            ..self
        }
    }

    /// Checks the fields the chosen kind uses: `lr` and `weight_decay` finite and `>= 0`;
    /// for SGD `momentum` in `[0, 1)`; for Adam `beta1`, `beta2` in `[0, 1)` and `eps`
    /// finite and `> 0`.
    pub fn validate(&self) -> Result<(), OptimConfigError> {
        let non_negative = |v: f32| v.is_finite() && v >= 0.0;
        let unit = |v: f32| (0.0..1.0).contains(&v);
        let positive = |v: f32| v.is_finite() && v > 0.0;
        check("lr", self.lr, non_negative, "a finite value >= 0")?;
        check(
            "weight_decay",
            self.weight_decay,
            non_negative,
            "a finite value >= 0",
        )?;
        match self.kind {
            OptimizerKind::Sgd => check("momentum", self.momentum, unit, "a value in [0, 1)"),
            OptimizerKind::Adam => {
                check("beta1", self.beta1, unit, "a value in [0, 1)")?;
                check("beta2", self.beta2, unit, "a value in [0, 1)")?;
                check("eps", self.eps, positive, "a finite value > 0")
            }
        }
    }
}

/// `Ok` if `ok(value)`, else an [`OptimConfigError::OutOfRange`] naming the field.
fn check(
    name: &'static str,
    value: f32,
    ok: impl Fn(f32) -> bool,
    expected: &'static str,
) -> Result<(), OptimConfigError> {
    if ok(value) {
        Ok(())
    } else {
        Err(OptimConfigError::OutOfRange {
            name,
            value,
            expected,
        })
    }
}

/// Optimizer state (SGD's momentum buffer, or Adam's moment estimates and step count), one
/// flat buffer each, the same length as the parameters.
#[derive(Debug, Clone)]
pub struct Optimizer {
    cfg: OptimConfig,
    len: usize,
    steps: u64,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    /// `None` when momentum is 0: PyTorch keeps no buffer then, and neither do we.
    Sgd {
        velocity: Option<Vec<f32>>,
    },
    Adam(AdamState),
}

#[derive(Debug, Clone)]
struct AdamState {
    m: Vec<f32>,
    v: Vec<f32>,
    /// `beta1^t` and `beta2^t` after `t` steps, kept as running products in `f64`.
    beta1_pow: f64,
    beta2_pow: f64,
}

impl Optimizer {
    /// Fresh state (zeroed buffers, step 0) for `param_len` parameters.
    ///
    /// `cfg` should have passed [`OptimConfig::validate`] (debug-asserted); an invalid one
    /// does not panic but gives meaningless updates.
    pub fn new(cfg: OptimConfig, param_len: usize) -> Optimizer {
        debug_assert!(
            cfg.validate().is_ok(),
            "invariant: validated config, got {cfg:?}"
        );
        let state = match cfg.kind {
            OptimizerKind::Sgd => State::Sgd {
                velocity: (cfg.momentum != 0.0).then(|| vec![0.0; param_len]),
            },
            OptimizerKind::Adam => State::Adam(AdamState {
                m: vec![0.0; param_len],
                v: vec![0.0; param_len],
                beta1_pow: 1.0,
                beta2_pow: 1.0,
            }),
        };
        Optimizer {
            cfg,
            len: param_len,
            steps: 0,
            state,
        }
    }

    /// Applies one update, `params -= update(grad)`, and counts the step.
    ///
    /// With `g = grad + weight_decay * p` (just `grad` when the decay is 0):
    /// - SGD (PyTorch convention): `v = momentum * v + g; p -= lr * v`, or `p -= lr * g`
    ///   when momentum is 0;
    /// - Adam: `m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;
    ///   p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
    ///
    /// Bit-identical state, params and grad give bit-identical results on every rank.
    /// Both slices must have the `param_len` given to [`new`](Self::new) (debug-asserted).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        debug_assert_eq!(
            params.len(),
            self.len,
            "invariant: params.len() == param_len"
        );
        debug_assert_eq!(grad.len(), self.len, "invariant: grad.len() == param_len");
        self.steps += 1;
        match &mut self.state {
            State::Sgd { velocity } => sgd_step(&self.cfg, velocity.as_deref_mut(), params, grad),
            State::Adam(adam) => adam.step(&self.cfg, params, grad),
        }
    }

    /// The configuration this optimizer was built with.
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }

    /// Puts back a state saved with [`state`](Self::state): the step count and each named
    /// buffer. Afterwards the optimizer continues bit for bit as the saved one would have.
    pub fn restore(&mut self, steps: u64, buffers: &[(String, Vec<f32>)]) -> Result<(), String> {
        let wanted: Vec<&str> = self.state().1.iter().map(|(name, _)| *name).collect();
        let given: Vec<&str> = buffers.iter().map(|(name, _)| name.as_str()).collect();
        if wanted != given {
            return Err(format!(
                "optimizer state holds {given:?}, this optimizer needs {wanted:?}"
            ));
        }
        if let Some((name, b)) = buffers.iter().find(|(_, b)| b.len() != self.len) {
            return Err(format!(
                "buffer {name} has {} values, expected {}",
                b.len(),
                self.len
            ));
        }
        let take = |name: &str| {
            let found = buffers.iter().find(|(n, _)| n == name);
            found
                .map(|(_, b)| b.clone())
                .expect("names were checked above")
        };
        match &mut self.state {
            State::Sgd { velocity: None } => {}
            State::Sgd { velocity: Some(v) } => *v = take("momentum"),
            State::Adam(a) => {
                (a.m, a.v) = (take("exp_avg"), take("exp_avg_sq"));
                // Replay the running products exactly as `step` built them.
                (a.beta1_pow, a.beta2_pow) = (1.0, 1.0);
                for _ in 0..steps {
                    a.beta1_pow *= f64::from(self.cfg.beta1);
                    a.beta2_pow *= f64::from(self.cfg.beta2);
                }
            }
        }
        self.steps = steps;
        Ok(())
    }

    /// The number of steps taken, and the state buffers by name: `momentum` for SGD with
    /// non-zero momentum (none otherwise), `exp_avg` and `exp_avg_sq` (Adam's `m` and `v`)
    /// for Adam. Adam's `beta^t` products follow from the step count.
    pub fn state(&self) -> (u64, Vec<(&'static str, &[f32])>) {
        let buffers = match &self.state {
            State::Sgd { velocity: None } => Vec::new(),
            State::Sgd { velocity: Some(v) } => vec![("momentum", v.as_slice())],
            State::Adam(a) => vec![("exp_avg", a.m.as_slice()), ("exp_avg_sq", a.v.as_slice())],
        };
        (self.steps, buffers)
    }
}

/// The gradient with the L2 penalty added; exactly `g` when there is no decay.
fn decayed(g: f32, p: f32, weight_decay: f32) -> f32 {
    if weight_decay == 0.0 {
        g
    } else {
        g + weight_decay * p
    }
}

fn sgd_step(cfg: &OptimConfig, velocity: Option<&mut [f32]>, params: &mut [f32], grad: &[f32]) {
    let (lr, mu, wd) = (cfg.lr, cfg.momentum, cfg.weight_decay);
    let Some(velocity) = velocity else {
        for (p, &g) in params.iter_mut().zip(grad) {
            *p -= lr * decayed(g, *p, wd);
        }
        return;
    };
    for ((p, v), &g) in params.iter_mut().zip(velocity).zip(grad) {
        *v = mu * *v + decayed(g, *p, wd);
        *p -= lr * *v;
    }
}

impl AdamState {
    fn step(&mut self, cfg: &OptimConfig, params: &mut [f32], grad: &[f32]) {
        let (b1, b2, wd) = (cfg.beta1, cfg.beta2, cfg.weight_decay);
        self.beta1_pow *= f64::from(b1);
        self.beta2_pow *= f64::from(b2);
        let correction1 = (1.0 - self.beta1_pow) as f32;
        let correction2 = (1.0 - self.beta2_pow) as f32;

        let moments = self.m.iter_mut().zip(self.v.iter_mut());
        for ((p, (m, v)), &g) in params.iter_mut().zip(moments).zip(grad) {
            let g = decayed(g, *p, wd);
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let m_hat = *m / correction1;
            let v_hat = *v / correction2;
            *p -= cfg.lr * m_hat / (v_hat.sqrt() + cfg.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Every random input in this module comes from this seed.
    const SEED: u64 = 0x0a11_5eed;
    const LEN: usize = 37;
    const STEPS: usize = 25;

    /// Random starting parameters and one random gradient per step, uniform in [-1, 1].
    fn problem(seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = || {
            (0..LEN)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect::<Vec<f32>>()
        };
        let params = uniform();
        let grads = (0..STEPS).map(|_| uniform()).collect();
        (params, grads)
    }

    fn run(cfg: &OptimConfig, params: &[f32], grads: &[Vec<f32>]) -> (Vec<f32>, Optimizer) {
        let mut opt = Optimizer::new(cfg.clone(), params.len());
        let mut p = params.to_vec();
        grads.iter().for_each(|g| opt.step(&mut p, g));
        (p, opt)
    }

    /// SGD with momentum in f64, straight from the PyTorch formula.
    fn reference_sgd(cfg: &OptimConfig, params: &[f32], grads: &[Vec<f32>]) -> Vec<f64> {
        let (lr, mu, wd) = (
            f64::from(cfg.lr),
            f64::from(cfg.momentum),
            f64::from(cfg.weight_decay),
        );
        let mut p: Vec<f64> = params.iter().map(|&v| v.into()).collect();
        let mut v = vec![0.0; p.len()];
        for g in grads {
            for i in 0..p.len() {
                v[i] = mu * v[i] + f64::from(g[i]) + wd * p[i];
                p[i] -= lr * v[i];
            }
        }
        p
    }

    /// Adam in f64, straight from Kingma & Ba (Algorithm 1) with an L2 term on the gradient.
    fn reference_adam(cfg: &OptimConfig, params: &[f32], grads: &[Vec<f32>]) -> Vec<f64> {
        let (lr, wd, eps) = (
            f64::from(cfg.lr),
            f64::from(cfg.weight_decay),
            f64::from(cfg.eps),
        );
        let (b1, b2) = (f64::from(cfg.beta1), f64::from(cfg.beta2));
        let mut p: Vec<f64> = params.iter().map(|&v| v.into()).collect();
        let (mut m, mut v) = (vec![0.0; p.len()], vec![0.0; p.len()]);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..p.len() {
                let g = f64::from(g[i]) + wd * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let m_hat = m[i] / (1.0 - b1.powi(t));
                let v_hat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        p
    }

    /// Tolerance against the f64 references: `1e-6 + 1e-5 * |reference|` per parameter.
    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 + 1e-5 * w.abs();
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}: param {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn sgd_matches_f64_reference() {
        let (params, grads) = problem(SEED);
        for cfg in [
            OptimConfig::sgd(0.05, 0.9),
            OptimConfig::sgd(0.1, 0.5).with_weight_decay(0.01),
        ] {
            let (got, opt) = run(&cfg, &params, &grads);
            assert_close(
                &got,
                &reference_sgd(&cfg, &params, &grads),
                &format!("{cfg:?}"),
            );
            assert_eq!(opt.state().0, STEPS as u64);
        }
    }

    #[test]
    fn adam_matches_f64_reference() {
        let (params, grads) = problem(SEED + 1);
        for cfg in [
            OptimConfig::adam(0.01),
            OptimConfig::adam(0.003).with_weight_decay(0.1),
        ] {
            let (got, _) = run(&cfg, &params, &grads);
            assert_close(
                &got,
                &reference_adam(&cfg, &params, &grads),
                &format!("{cfg:?}"),
            );
        }
    }

    #[test]
    fn adam_first_step_moves_each_param_by_about_lr() {
        let (params, grads) = problem(SEED + 2);
        let (got, _) = run(&OptimConfig::adam(0.01), &params, &grads[..1]);
        for ((&after, &before), &g) in got.iter().zip(&params).zip(&grads[0]) {
            let moved = before - after;
            assert!(
                (moved - 0.01 * g.signum()).abs() < 1e-6,
                "moved {moved} for grad {g}"
            );
        }
    }

    #[test]
    fn sgd_without_momentum_is_exactly_plain_gradient_descent() {
        let (params, grads) = problem(SEED + 3);
        let (got, opt) = run(&OptimConfig::sgd(0.07, 0.0), &params, &grads);
        let mut want = params.clone();
        for g in &grads {
            want.iter_mut().zip(g).for_each(|(p, &g)| *p -= 0.07 * g);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want));
        assert!(
            opt.state().1.is_empty(),
            "no momentum buffer when momentum is 0"
        );
    }

    #[test]
    fn identical_inputs_give_bit_identical_steps() {
        let (params, grads) = problem(SEED + 4);
        for cfg in [
            OptimConfig::sgd(0.05, 0.9),
            OptimConfig::adam(0.01).with_weight_decay(0.01),
        ] {
            let (a, opt_a) = run(&cfg, &params, &grads);
            let (b, opt_b) = run(&cfg, &params, &grads);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b));
            for ((na, sa), (nb, sb)) in opt_a.state().1.into_iter().zip(opt_b.state().1) {
                assert_eq!((na, bits(sa)), (nb, bits(sb)));
            }
        }
    }

    #[test]
    fn state_names_and_lengths() {
        let sgd = Optimizer::new(OptimConfig::sgd(0.1, 0.9), 5);
        let names = |o: &Optimizer| {
            o.state()
                .1
                .iter()
                .map(|(n, s)| (*n, s.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&sgd), [("momentum", 5)]);
        let adam = Optimizer::new(OptimConfig::adam(0.1), 5);
        assert_eq!(names(&adam), [("exp_avg", 5), ("exp_avg_sq", 5)]);
        assert_eq!(adam.state().0, 0);
        assert_eq!(adam.config().kind, OptimizerKind::Adam);
    }

    #[test]
    fn kind_parses_and_displays() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam] {
            assert_eq!(kind.to_string().parse::<OptimizerKind>(), Ok(kind));
        }
        assert_eq!("ADAM".parse::<OptimizerKind>(), Ok(OptimizerKind::Adam));
        let err = "lamb".parse::<OptimizerKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"unknown optimizer "lamb": expected one of sgd, adam"#
        );
    }

    #[test]
    fn validate_rejects_out_of_range_settings() {
        assert_eq!(OptimConfig::sgd(0.1, 0.9).validate(), Ok(()));
        assert_eq!(OptimConfig::adam(1e-3).validate(), Ok(()));
        let bad_momentum = OptimConfig::sgd(0.1, 1.0).validate().unwrap_err();
        assert_eq!(
            bad_momentum.to_string(),
            "optimizer setting momentum = 1 is out of range: expected a value in [0, 1)"
        );
        let bad_beta = OptimConfig {
            beta2: 1.5,
            ..OptimConfig::adam(1e-3)
        };
        assert!(matches!(
            bad_beta.validate(),
            Err(OptimConfigError::OutOfRange { name: "beta2", .. })
        ));
        let bad_lr = OptimConfig::adam(f32::NAN);
        assert!(matches!(
            bad_lr.validate(),
            Err(OptimConfigError::OutOfRange { name: "lr", .. })
        ));
        // Adam ignores momentum, so a nonsense momentum is not an error there.
        assert_eq!(
            OptimConfig {
                momentum: 7.0,
                ..OptimConfig::adam(1e-3)
            }
            .validate(),
            Ok(())
        );
    }
}
