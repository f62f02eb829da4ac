//! A multilayer perceptron whose parameters live in one flat `f32` buffer.
//!
//! Keeping every weight and bias in one contiguous slice lets the ring all-reduce move the
//! whole gradient as a single buffer, and lets checkpoints and safetensors export describe it
//! as a list of (name, offset, shape) entries. [`Mlp`] owns no numbers: it knows the layer
//! sizes, and each call borrows the parameters, the gradient and a [`Workspace`] of
//! activation buffers that is reused from step to step.
//!
//! # Parameter layout
//!
//! Sizes `[n_0, n_1, ..., n_L]` give `L` linear layers. Layer `l` (counting from 0) maps
//! `n_l` inputs to `n_{l+1}` outputs and stores, in this order and with no padding:
//!
//! 1. `layers.{l}.weight`: shape `[n_l, n_{l+1}]`, row-major, so the weight from input `i`
//!    to output `j` sits at `offset + i * n_{l+1} + j`;
//! 2. `layers.{l}.bias`: shape `[n_{l+1}]`.
//!
//! Layer 0's weight starts at offset 0, each tensor starts where the previous one ends, and
//! the last bias ends at [`Mlp::param_len`]. [`Mlp::tensors`] lists exactly these entries.
//! A layer computes `a · W + b` with `a` a row vector, so `W` is the transpose of a PyTorch
//! `nn.Linear` weight (which is stored `[out, in]`).
//!
//! # Computation
//!
//! Hidden layers apply ReLU; the last layer's outputs are logits for a softmax cross-entropy
//! loss, averaged over the batch. The softmax subtracts each row's maximum before `exp`.
//! Matrix products go through `ndarray::linalg::general_mat_mul` on views into the flat
//! buffers, so no weights are copied or gathered.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Zip};
use rand::SeedableRng;
use rand::distributions::{Distribution, Uniform};
use rand_chacha::ChaCha8Rng;

/// Number of rows [`Mlp::evaluate`] pushes through the network at a time.
pub const EVAL_BATCH: usize = 512;

/// Layer sizes of a multilayer perceptron, e.g. `[64, 256, 128, 10]`: inputs, hidden
/// widths, classes. ReLU between layers, softmax cross-entropy on the output.
///
/// See the [module docs](self) for the parameter layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mlp {
    layers: Vec<usize>,
}

/// Where one linear layer's tensors sit in the flat buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    inputs: usize,
    outputs: usize,
    weight: usize,
    bias: usize,
}

impl Span {
    fn end(self) -> usize {
        self.bias + self.outputs
    }

    fn weight(self, buf: &[f32]) -> ArrayView2<'_, f32> {
        rows(&buf[self.weight..self.bias], self.inputs, self.outputs)
    }

    fn bias(self, buf: &[f32]) -> ArrayView1<'_, f32> {
        ArrayView1::from(&buf[self.bias..self.end()])
    }

    /// Mutable views of this layer's weight and bias in a gradient buffer.
    fn grads(self, buf: &mut [f32]) -> (ArrayViewMut2<'_, f32>, ArrayViewMut1<'_, f32>) {
        let (w, b) = buf[self.weight..self.end()].split_at_mut(self.bias - self.weight);
        (
            rows_mut(w, self.inputs, self.outputs),
            ArrayViewMut1::from(b),
        )
    }
}

impl Mlp {
    /// A network with `inputs` features, the given hidden widths (possibly none, which is
    /// softmax regression) and `classes` outputs.
    ///
    /// Every size should be at least 1. Zero widths do not panic here, but a network with
    /// zero classes has no valid labels, so it cannot be trained or evaluated.
    pub fn new(inputs: usize, hidden: &[usize], classes: usize) -> Mlp {
        let mut layers = Vec::with_capacity(hidden.len() + 2);
        layers.push(inputs);
        layers.extend_from_slice(hidden);
        layers.push(classes);
        Mlp { layers }
    }

    /// All sizes in order: inputs, hidden widths, classes.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Number of input features (columns of `x`).
    pub fn inputs(&self) -> usize {
        self.layers[0]
    }

    /// Number of output classes; labels must be below it.
    pub fn classes(&self) -> usize {
        self.layers[self.layers.len() - 1]
    }

    /// Number of `f32` parameters: the sum over layers of `in * out + out`, laid out as the
    /// [module docs](self) describe.
    pub fn param_len(&self) -> usize {
        self.spans().last().map_or(0, Span::end)
    }

    /// `(name, offset, shape)` for every tensor, in layout order: `layers.{l}.weight` with
    /// shape `[in, out]`, then `layers.{l}.bias` with shape `[out]`, for each layer `l`.
    ///
    /// The entries cover `0..param_len()` exactly, without gaps or overlap.
    pub fn tensors(&self) -> Vec<(String, usize, Vec<usize>)> {
        self.spans()
            .enumerate()
            .flat_map(|(l, s)| {
                [
                    (
                        format!("layers.{l}.weight"),
                        s.weight,
                        vec![s.inputs, s.outputs],
                    ),
                    (format!("layers.{l}.bias"), s.bias, vec![s.outputs]),
                ]
            })
            .collect()
    }

    /// Fills `params` with a He (Kaiming) uniform initialisation and zero biases.
    ///
    /// Each weight is drawn from `U(-sqrt(6 / in), sqrt(6 / in))`, `in` being its layer's
    /// fan-in, from one `ChaCha8Rng` seeded with `seed` and consumed in layout order. The same
    /// seed and sizes always give the same bits, on every rank and platform.
    ///
    /// `params.len()` must equal [`param_len`](Self::param_len) (debug-asserted).
    pub fn init(&self, seed: u64, params: &mut [f32]) {
        debug_assert_eq!(
            params.len(),
            self.param_len(),
            "invariant: params.len() == param_len"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for s in self.spans() {
            if s.bias > s.weight {
                let bound = (6.0 / s.inputs as f64).sqrt() as f32;
                let dist = Uniform::new(-bound, bound);
                params[s.weight..s.bias]
                    .iter_mut()
                    .for_each(|w| *w = dist.sample(&mut rng));
            }
            params[s.bias..s.end()].fill(0.0);
        }
    }

    /// Forward and backward pass on one batch.
    ///
    /// `x` holds `y.len()` rows of [`inputs`](Self::inputs) features, row-major; each label in
    /// `y` must be below [`classes`](Self::classes). Writes the gradient of the mean loss over
    /// the batch into `grad` (every element is overwritten) and returns the mean loss and the
    /// number of rows whose argmax prediction (first maximum on ties) equals the label.
    ///
    /// Callers never pass an empty batch: that is debug-asserted, and in release builds it
    /// yields a zero gradient and a loss of 0. Length mismatches between `params`, `x`, `y`
    /// and `grad` are caller bugs (debug-asserted); a label out of range panics.
    ///
    /// Once `ws` has seen a batch at least this large, this function allocates nothing itself
    /// (the `matrixmultiply` kernel behind `general_mat_mul` takes a transient packing
    /// buffer per product). Results are bit-for-bit repeatable on a given machine.
    pub fn forward_backward(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        ws: &mut Workspace,
        grad: &mut [f32],
    ) -> (f32, usize) {
        self.forward_backward_with(params, x, y, ws, grad, |_, _| {})
    }

    /// [`forward_backward`](Self::forward_backward), calling `ready(range, grad)` as soon as
    /// the gradient of each layer is final, last layer first.
    ///
    /// `range` is the layer's weight and bias (a range of the [layout](self)) and `grad` the
    /// whole gradient buffer: when a call comes, every element from `range.start` to the end
    /// is final and will not be written again, while elements before it are not yet
    /// computed. The calls cover `0..param_len()` exactly once, in descending order. This
    /// lets a caller send gradients to other ranks while backward goes on (see
    /// [`crate::bucket`]). An empty batch yields no calls.
    pub fn forward_backward_with(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        ws: &mut Workspace,
        grad: &mut [f32],
        ready: impl FnMut(std::ops::Range<usize>, &[f32]),
    ) -> (f32, usize) {
        debug_assert_eq!(
            grad.len(),
            self.param_len(),
            "invariant: grad.len() == param_len"
        );
        debug_assert!(
            !y.is_empty(),
            "invariant: forward_backward gets a non-empty batch"
        );
        if y.is_empty() {
            grad.fill(0.0);
            return (0.0, 0);
        }

        let (loss_sum, correct) = self.forward(params, x, y, ws);
        self.backward(params, x, y, ws, grad, ready);
        ((loss_sum / y.len() as f64) as f32, correct)
    }

    /// The range of every tensor of [`tensors`](Self::tensors), in layout order.
    pub fn tensor_ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.tensors()
            .into_iter()
            .map(|(_, at, shape)| at..at + shape.iter().product::<usize>())
            .collect()
    }

    /// Mean loss and accuracy (fraction of correct argmax predictions) over a whole split,
    /// computed [`EVAL_BATCH`] rows at a time without touching any gradient.
    ///
    /// `x` and `y` follow the rules of [`forward_backward`](Self::forward_backward). An empty
    /// split has no mean: the result is then `(NaN, NaN)`.
    pub fn evaluate(&self, params: &[f32], x: &[f32], y: &[u32], ws: &mut Workspace) -> (f32, f32) {
        let n = y.len();
        debug_assert_eq!(
            x.len(),
            n * self.inputs(),
            "invariant: x.len() == y.len() * inputs"
        );
        if n == 0 {
            return (f32::NAN, f32::NAN);
        }

        let (mut loss_sum, mut correct) = (0.0, 0);
        for (i, yb) in y.chunks(EVAL_BATCH).enumerate() {
            let start = i * EVAL_BATCH * self.inputs();
            let xb = &x[start..start + yb.len() * self.inputs()];
            let (l, c) = self.forward(params, xb, yb, ws);
            loss_sum += l;
            correct += c;
        }
        ((loss_sum / n as f64) as f32, correct as f32 / n as f32)
    }

    /// Layer spans in layout order.
    fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        self.layers.windows(2).scan(0, |offset, pair| {
            let (inputs, outputs) = (pair[0], pair[1]);
            let weight = *offset;
            let bias = weight + inputs * outputs;
            *offset = bias + outputs;
            Some(Span {
                inputs,
                outputs,
                weight,
                bias,
            })
        })
    }

    /// Span of layer `l`, which must exist.
    fn span(&self, l: usize) -> Span {
        self.spans()
            .nth(l)
            .expect("invariant: layer index below the number of layers")
    }

    /// Index of the last linear layer (the one producing logits).
    fn last_layer(&self) -> usize {
        self.layers.len() - 2
    }

    /// Runs the layers, leaves softmax probabilities in the last output buffer, and returns
    /// the summed (not averaged) loss and the number of correct predictions.
    fn forward(&self, params: &[f32], x: &[f32], y: &[u32], ws: &mut Workspace) -> (f64, usize) {
        let batch = y.len();
        debug_assert_eq!(
            params.len(),
            self.param_len(),
            "invariant: params.len() == param_len"
        );
        debug_assert_eq!(
            x.len(),
            batch * self.inputs(),
            "invariant: x.len() == batch * inputs"
        );
        ws.grow_outputs(&self.layers, batch);

        let last = self.last_layer();
        for (l, s) in self.spans().enumerate() {
            let (done, todo) = ws.outputs.split_at_mut(l);
            let input = match l {
                0 => rows(x, batch, s.inputs),
                _ => rows(&done[l - 1], batch, s.inputs),
            };
            let mut out = rows_mut(&mut todo[0], batch, s.outputs);
            linear(&input, &s.weight(params), &s.bias(params), &mut out);
            if l < last {
                // Written so that NaN stays visible instead of turning into 0.
                out.mapv_inplace(|v| if v < 0.0 { 0.0 } else { v });
            }
        }
        softmax_cross_entropy(rows_mut(&mut ws.outputs[last], batch, self.classes()), y)
    }

    /// Backpropagates from the probabilities [`forward`](Self::forward) left in `ws`.
    /// Calls `ready` after each layer, as [`forward_backward_with`] documents.
    ///
    /// [`forward_backward_with`]: Self::forward_backward_with
    fn backward(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        ws: &mut Workspace,
        grad: &mut [f32],
        mut ready: impl FnMut(std::ops::Range<usize>, &[f32]),
    ) {
        let batch = y.len();
        let last = self.last_layer();
        ws.grow_deltas(&self.layers, batch);
        output_delta(rows_mut(&mut ws.outputs[last], batch, self.classes()), y);
        for l in (0..=last).rev() {
            self.backward_layer(l, params, x, ws, grad, batch, &mut ready);
        }
    }

    /// Writes layer `l`'s weight and bias gradients from its output delta, reports them to
    /// `ready`, then (below the first layer) computes the delta of layer `l - 1`: a caller
    /// that sends the gradient away overlaps that with the product for the layer below.
    #[allow(clippy::too_many_arguments)] // the borrows of one backward step, kept apart
    fn backward_layer(
        &self,
        l: usize,
        params: &[f32],
        x: &[f32],
        ws: &mut Workspace,
        grad: &mut [f32],
        batch: usize,
        ready: &mut impl FnMut(std::ops::Range<usize>, &[f32]),
    ) {
        let s = self.span(l);
        let (below, here) = ws.deltas.split_at_mut(l);
        let delta = if l == self.last_layer() {
            rows(&ws.outputs[l], batch, s.outputs)
        } else {
            rows(&here[0], batch, s.outputs)
        };
        let input = match l {
            0 => rows(x, batch, s.inputs),
            _ => rows(&ws.outputs[l - 1], batch, s.inputs),
        };

        let (mut gw, gb) = s.grads(grad);
        general_mat_mul(1.0, &input.t(), &delta, 0.0, &mut gw);
        sum_rows(&delta, gb);
        ready(s.weight..s.end(), grad);

        if let Some(prev) = below.last_mut() {
            let mut prev = rows_mut(prev, batch, s.inputs);
            general_mat_mul(1.0, &delta, &s.weight(params).t(), 0.0, &mut prev);
            relu_backward(&mut prev, &input);
        }
    }
}

/// Activation and delta buffers reused across steps.
///
/// Buffers only grow: after one call with a given batch size and model, later calls with that
/// batch size or smaller reuse the same memory. One workspace may serve several models.
#[derive(Debug, Default)]
pub struct Workspace {
    /// Output of each layer: post-ReLU for hidden layers; logits, then probabilities, then
    /// the output delta for the last one.
    outputs: Vec<Vec<f32>>,
    /// Gradient of the loss with respect to each hidden layer's pre-activation.
    deltas: Vec<Vec<f32>>,
}

impl Workspace {
    /// An empty workspace; buffers are sized on first use.
    pub fn new() -> Workspace {
        Workspace::default()
    }

    fn grow_outputs(&mut self, layers: &[usize], batch: usize) {
        grow_all(&mut self.outputs, &layers[1..], batch);
    }

    fn grow_deltas(&mut self, layers: &[usize], batch: usize) {
        grow_all(&mut self.deltas, &layers[1..layers.len() - 1], batch);
    }
}

/// Makes `bufs` hold one buffer per width, each at least `batch * width` long.
fn grow_all(bufs: &mut Vec<Vec<f32>>, widths: &[usize], batch: usize) {
    bufs.resize_with(widths.len(), Vec::new);
    for (buf, &width) in bufs.iter_mut().zip(widths) {
        if buf.len() < batch * width {
            buf.resize(batch * width, 0.0);
        }
    }
}

/// A `(height, width)` row-major view of the first `height * width` values of `buf`.
fn rows(buf: &[f32], height: usize, width: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((height, width), &buf[..height * width])
        .expect("invariant: a slice of height * width values fits that shape")
}

/// Mutable counterpart of [`rows`].
fn rows_mut(buf: &mut [f32], height: usize, width: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((height, width), &mut buf[..height * width])
        .expect("invariant: a slice of height * width values fits that shape")
}

/// `out = input · weight + bias`, bias broadcast over rows.
fn linear(
    input: &ArrayView2<'_, f32>,
    weight: &ArrayView2<'_, f32>,
    bias: &ArrayView1<'_, f32>,
    out: &mut ArrayViewMut2<'_, f32>,
) {
    out.rows_mut()
        .into_iter()
        .for_each(|mut row| row.assign(bias));
    general_mat_mul(1.0, input, weight, 1.0, out);
}

/// Turns each row of logits into probabilities in place; returns the summed loss and the
/// number of rows whose first maximal logit is at the label.
fn softmax_cross_entropy(mut logits: ArrayViewMut2<'_, f32>, y: &[u32]) -> (f64, usize) {
    let classes = logits.ncols();
    let (mut loss_sum, mut correct) = (0.0, 0);
    for (mut row, &label) in logits.rows_mut().into_iter().zip(y) {
        let label = label as usize;
        assert!(
            label < classes,
            "invariant: label {label} is below the class count {classes}"
        );
        let (argmax, max) = row
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 { (i, v) } else { best }
            });
        let shifted_label = row[label] - max;

        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.mapv_inplace(|e| e / sum);

        loss_sum += f64::from(sum.ln() - shifted_label);
        correct += usize::from(argmax == label);
    }
    (loss_sum, correct)
}

/// Turns probabilities into the gradient of the mean loss with respect to the logits:
/// `(p - onehot(y)) / batch`.
fn output_delta(mut probs: ArrayViewMut2<'_, f32>, y: &[u32]) {
    let scale = 1.0 / y.len() as f32;
    for (mut row, &label) in probs.rows_mut().into_iter().zip(y) {
        row[label as usize] -= 1.0;
        row *= scale;
    }
}

/// `bias_grad = sum of delta's rows`, added in row order.
fn sum_rows(delta: &ArrayView2<'_, f32>, mut bias_grad: ArrayViewMut1<'_, f32>) {
    bias_grad.fill(0.0);
    for row in delta.rows() {
        bias_grad += &row;
    }
}

/// Zeroes the gradient wherever ReLU was inactive (its output is not positive).
fn relu_backward(delta: &mut ArrayViewMut2<'_, f32>, activation: &ArrayView2<'_, f32>) {
    Zip::from(delta).and(activation).for_each(|d, &a| {
        if a <= 0.0 {
            *d = 0.0;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{OptimConfig, Optimizer};
    use proptest::prelude::*;
    use rand::Rng;
    use rand_distr::Normal;

    /// Every random input in this module comes from this seed (plus a per-case offset).
    const SEED: u64 = 0x0d15_ea5e;

    /// Shapes for the gradient checks: softmax regression, odd widths, a width-1 bottleneck
    /// and two hidden layers. Each comes with a batch size.
    const SHAPES: [(&[usize], usize); 5] = [
        (&[4, 3], 5),
        (&[5, 7, 3], 4),
        (&[3, 1, 2], 6),
        (&[6, 8, 5, 4], 7),
        (&[2, 9, 1, 3], 1),
    ];

    struct Case {
        mlp: Mlp,
        params: Vec<f32>,
        x: Vec<f32>,
        y: Vec<u32>,
    }

    /// Parameters and inputs uniform in [-1, 1] (biases included, so they matter), labels
    /// uniform over the classes.
    fn random_case(layers: &[usize], batch: usize, seed: u64) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let hidden = &layers[1..layers.len() - 1];
        let mlp = Mlp::new(layers[0], hidden, layers[layers.len() - 1]);
        let mut uniform =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        let params = uniform(mlp.param_len());
        let x = uniform(batch * mlp.inputs());
        let classes = mlp.classes() as u32;
        let y = (0..batch).map(|_| rng.gen_range(0..classes)).collect();
        Case { mlp, params, x, y }
    }

    fn widen(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&a| f64::from(a)).collect()
    }

    /// A plain-loop f64 MLP, written from the maths rather than from the code above.
    mod reference {
        fn relu(z: f64) -> f64 {
            if z > 0.0 { z } else { 0.0 }
        }

        /// Start offset of each layer's weight; its bias follows at `+ in * out`.
        fn offsets(layers: &[usize]) -> Vec<usize> {
            let mut offs = vec![0];
            for l in 0..layers.len() - 1 {
                offs.push(offs[l] + layers[l] * layers[l + 1] + layers[l + 1]);
            }
            offs
        }

        /// Layer inputs (`x`, then each `relu(z)`) and pre-activations `z` of every layer.
        fn forward(layers: &[usize], p: &[f64], x: &[f64]) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
            let batch = x.len() / layers[0];
            let offs = offsets(layers);
            let (mut inputs, mut pre) = (vec![x.to_vec()], Vec::new());
            for l in 0..layers.len() - 1 {
                let (n_in, n_out, off) = (layers[l], layers[l + 1], offs[l]);
                let mut z = vec![0.0; batch * n_out];
                for r in 0..batch {
                    for j in 0..n_out {
                        let mut acc = p[off + n_in * n_out + j];
                        for i in 0..n_in {
                            acc += inputs[l][r * n_in + i] * p[off + i * n_out + j];
                        }
                        z[r * n_out + j] = acc;
                    }
                }
                inputs.push(z.iter().map(|&v| relu(v)).collect());
                pre.push(z);
            }
            (inputs, pre)
        }

        /// Per-row softmax probabilities and the mean cross-entropy.
        fn softmax(logits: &[f64], y: &[u32]) -> (Vec<f64>, f64) {
            let classes = logits.len() / y.len();
            let mut probs = logits.to_vec();
            let mut loss = 0.0;
            for (r, &label) in y.iter().enumerate() {
                let row = &mut probs[r * classes..(r + 1) * classes];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|&z| (z - max).exp()).sum();
                loss += max + sum.ln() - row[label as usize];
                row.iter_mut().for_each(|z| *z = (*z - max).exp() / sum);
            }
            (probs, loss / y.len() as f64)
        }

        pub fn loss(layers: &[usize], p: &[f64], x: &[f64], y: &[u32]) -> f64 {
            let (_, pre) = forward(layers, p, x);
            softmax(pre.last().unwrap(), y).1
        }

        /// Mean loss and its gradient with respect to every parameter.
        pub fn loss_and_grad(layers: &[usize], p: &[f64], x: &[f64], y: &[u32]) -> (f64, Vec<f64>) {
            let (batch, offs) = (y.len(), offsets(layers));
            let (inputs, pre) = forward(layers, p, x);
            let (mut dz, loss) = softmax(pre.last().unwrap(), y);
            let classes = layers[layers.len() - 1];
            for (r, &label) in y.iter().enumerate() {
                dz[r * classes + label as usize] -= 1.0;
            }
            dz.iter_mut().for_each(|d| *d /= batch as f64);

            let mut grad = vec![0.0; p.len()];
            for l in (0..layers.len() - 1).rev() {
                let (n_in, n_out, off) = (layers[l], layers[l + 1], offs[l]);
                let mut da = vec![0.0; batch * n_in];
                for r in 0..batch {
                    for j in 0..n_out {
                        let d = dz[r * n_out + j];
                        grad[off + n_in * n_out + j] += d;
                        for i in 0..n_in {
                            grad[off + i * n_out + j] += inputs[l][r * n_in + i] * d;
                            da[r * n_in + i] += d * p[off + i * n_out + j];
                        }
                    }
                }
                if l > 0 {
                    for (d, &z) in da.iter_mut().zip(&pre[l - 1]) {
                        if z <= 0.0 {
                            *d = 0.0;
                        }
                    }
                }
                dz = da;
            }
            (loss, grad)
        }
    }

    /// Tolerance for f32 against the f64 reference: the difference's norm within 1e-4 of the
    /// reference norm, and every element within `1e-5 + 1e-3 * |reference|`.
    fn assert_close_to_reference(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
        let diff = got
            .iter()
            .zip(want)
            .map(|(&g, w)| (f64::from(g) - w).powi(2))
            .sum::<f64>();
        assert!(
            diff.sqrt() <= 1e-4 * norm,
            "{what}: |diff| {} vs |ref| {norm}",
            diff.sqrt()
        );
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 + 1e-3 * w.abs();
            assert!(
                (f64::from(g) - w).abs() <= tol,
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn gradient_and_loss_match_f64_reference() {
        for (k, &(layers, batch)) in SHAPES.iter().enumerate() {
            let seed = SEED + k as u64;
            let c = random_case(layers, batch, seed);
            let mut grad = vec![0.0; c.mlp.param_len()];
            let (loss, _) =
                c.mlp
                    .forward_backward(&c.params, &c.x, &c.y, &mut Workspace::new(), &mut grad);

            let (p, x) = (widen(&c.params), widen(&c.x));
            let (want_loss, want_grad) = reference::loss_and_grad(layers, &p, &x, &c.y);
            let what = format!("layers {layers:?}, batch {batch}, seed {seed}");
            assert!(
                (f64::from(loss) - want_loss).abs() <= 1e-5 * (1.0 + want_loss),
                "{what}: loss {loss} vs {want_loss}"
            );
            assert_close_to_reference(&grad, &want_grad, &what);
        }
    }

    /// Validates the reference itself: its gradient against central differences of its loss.
    #[test]
    fn reference_gradient_matches_finite_differences() {
        for (k, &(layers, batch)) in SHAPES.iter().enumerate().take(3) {
            let seed = SEED + 100 + k as u64;
            let c = random_case(layers, batch, seed);
            let (mut p, x) = (widen(&c.params), widen(&c.x));
            let (_, grad) = reference::loss_and_grad(layers, &p, &x, &c.y);
            let h = 1e-6;
            for i in 0..p.len() {
                let saved = p[i];
                p[i] = saved + h;
                let up = reference::loss(layers, &p, &x, &c.y);
                p[i] = saved - h;
                let down = reference::loss(layers, &p, &x, &c.y);
                p[i] = saved;
                let fd = (up - down) / (2.0 * h);
                let what = format!("layers {layers:?}, seed {seed}, param {i}");
                assert!(
                    (fd - grad[i]).abs() <= 1e-7 + 1e-5 * fd.abs(),
                    "{what}: {fd} vs {}",
                    grad[i]
                );
            }
        }
    }

    #[test]
    fn forward_backward_is_bit_repeatable_and_overwrites_grad() {
        let c = random_case(&[6, 8, 5, 4], 9, SEED + 200);
        let n = c.mlp.param_len();
        let (mut first, mut second) = (vec![0.0; n], vec![f32::NAN; n]);
        let mut ws = Workspace::new();
        let a = c
            .mlp
            .forward_backward(&c.params, &c.x, &c.y, &mut ws, &mut first);
        let b = c
            .mlp
            .forward_backward(&c.params, &c.x, &c.y, &mut Workspace::new(), &mut second);
        assert_eq!(a.0.to_bits(), b.0.to_bits());
        assert_eq!(a.1, b.1);
        let bits = |v: &[f32]| v.iter().map(|g| g.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first), bits(&second));
    }

    #[test]
    fn ready_reports_each_layer_once_last_first_with_its_final_gradient() {
        let c = random_case(&[6, 8, 5, 4], 9, SEED + 250);
        let n = c.mlp.param_len();
        let mut plain = vec![0.0; n];
        c.mlp
            .forward_backward(&c.params, &c.x, &c.y, &mut Workspace::new(), &mut plain);

        let (mut grad, mut seen) = (vec![f32::NAN; n], Vec::new());
        let mut ws = Workspace::new();
        c.mlp
            .forward_backward_with(&c.params, &c.x, &c.y, &mut ws, &mut grad, |r, g| {
                // Everything from r.start on must already hold its final bits.
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g[r.start..]), bits(&plain[r.start..]), "layer {r:?}");
                seen.push(r);
            });
        assert_eq!(seen, vec![101..125, 56..101, 0..56]);
    }

    #[test]
    fn workspace_is_reused_for_equal_or_smaller_batches() {
        let c = random_case(&[5, 7, 3], 8, SEED + 300);
        let mut grad = vec![0.0; c.mlp.param_len()];
        let mut ws = Workspace::new();
        c.mlp
            .forward_backward(&c.params, &c.x, &c.y, &mut ws, &mut grad);
        let buffers = |ws: &Workspace| {
            ws.outputs
                .iter()
                .chain(&ws.deltas)
                .map(|b| (b.as_ptr(), b.capacity()))
                .collect::<Vec<_>>()
        };
        let before = buffers(&ws);
        c.mlp
            .forward_backward(&c.params, &c.x[..3 * 5], &c.y[..3], &mut ws, &mut grad);
        c.mlp
            .forward_backward(&c.params, &c.x, &c.y, &mut ws, &mut grad);
        assert_eq!(before, buffers(&ws));
    }

    #[test]
    fn init_is_deterministic_per_seed_with_zero_biases() {
        let mlp = Mlp::new(20, &[30], 4);
        let draw = |seed| {
            let mut p = vec![f32::NAN; mlp.param_len()];
            mlp.init(seed, &mut p);
            p
        };
        let (a, b, other) = (draw(7), draw(7), draw(8));
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_ne!(a, other);
        for (name, off, shape) in mlp.tensors() {
            let t = &a[off..off + shape.iter().product::<usize>()];
            if name.ends_with("bias") {
                assert!(t.iter().all(|&v| v == 0.0), "{name} is not zero");
            } else {
                let bound = (6.0 / shape[0] as f32).sqrt();
                assert!(t.iter().all(|v| v.abs() <= bound), "{name} exceeds {bound}");
                let spread = t.iter().map(|v| v * v).sum::<f32>() / t.len() as f32;
                let expected = bound * bound / 3.0;
                assert!(
                    (spread / expected - 1.0).abs() < 0.25,
                    "{name}: variance {spread} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn layout_matches_documented_example() {
        let mlp = Mlp::new(3, &[1], 2);
        assert_eq!(mlp.layers(), &[3, 1, 2]);
        assert_eq!(mlp.param_len(), 3 + 1 + 2 + 2);
        let want = [
            ("layers.0.weight".to_string(), 0, vec![3, 1]),
            ("layers.0.bias".to_string(), 3, vec![1]),
            ("layers.1.weight".to_string(), 4, vec![1, 2]),
            ("layers.1.bias".to_string(), 6, vec![2]),
        ];
        assert_eq!(mlp.tensors(), want);
    }

    proptest! {
        #[test]
        fn tensors_cover_param_buffer_exactly(
            inputs in 0usize..20,
            hidden in prop::collection::vec(0usize..20, 0..4),
            classes in 1usize..12,
        ) {
            let mlp = Mlp::new(inputs, &hidden, classes);
            let mut next = 0;
            for (_, off, shape) in mlp.tensors() {
                prop_assert_eq!(off, next);
                next += shape.iter().product::<usize>();
            }
            prop_assert_eq!(next, mlp.param_len());
        }
    }

    /// Three well-separated Gaussian blobs in the plane.
    fn blobs(per_class: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0, 0.4).expect("invariant: positive standard deviation");
        let centres = [[0.0, 3.0], [3.0, -1.5], [-3.0, -1.5]];
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..per_class * centres.len() {
            let class = i % centres.len();
            x.extend(centres[class].iter().map(|c| c + noise.sample(&mut rng)));
            y.push(class as u32);
        }
        (x, y)
    }

    #[test]
    fn sgd_training_drives_loss_down_on_separable_blobs() {
        let (x, y) = blobs(20, SEED + 400);
        let mlp = Mlp::new(2, &[16], 3);
        let mut params = vec![0.0; mlp.param_len()];
        mlp.init(SEED, &mut params);
        let (mut ws, mut grad) = (Workspace::new(), vec![0.0; mlp.param_len()]);
        let mut opt = Optimizer::new(OptimConfig::sgd(0.05, 0.9), mlp.param_len());

        let (first, _) = mlp.evaluate(&params, &x, &y, &mut ws);
        for _ in 0..300 {
            mlp.forward_backward(&params, &x, &y, &mut ws, &mut grad);
            opt.step(&mut params, &grad);
        }
        let (last, accuracy) = mlp.evaluate(&params, &x, &y, &mut ws);
        assert!(first > 0.5, "initial loss {first}");
        assert!(last < 0.02, "final loss {last} (initial {first})");
        assert_eq!(accuracy, 1.0);
    }

    /// Softmax regression whose logits are the inputs themselves.
    fn identity_model() -> (Mlp, Vec<f32>) {
        (Mlp::new(2, &[], 2), vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    }

    #[test]
    fn evaluate_counts_correct_predictions() {
        let (mlp, params) = identity_model();
        let x = [1.0, 0.0, 0.0, 1.0, 2.0, 5.0, 3.0, -1.0];
        let y = [0, 0, 1, 1];
        let (loss, accuracy) = mlp.evaluate(&params, &x, &y, &mut Workspace::new());
        assert_eq!(accuracy, 0.5);

        // Row loss for logits (a, b) and label 0 is ln(1 + e^(b - a)); label 1 swaps them.
        let row = |d: f64| (1.0 + d.exp()).ln();
        let want = (row(-1.0) + row(1.0) + row(-3.0) + row(4.0)) / 4.0;
        assert!((f64::from(loss) - want).abs() < 1e-6, "{loss} vs {want}");
    }

    #[test]
    fn evaluate_spans_several_batches() {
        let (mlp, params) = identity_model();
        let n = 2 * EVAL_BATCH + 37;
        let x: Vec<f32> = (0..n)
            .flat_map(|i| [(i % 5) as f32, (i % 7) as f32 + 0.5])
            .collect();
        let y: Vec<u32> = (0..n).map(|i| (i % 3 == 0) as u32).collect();
        let correct = (0..n)
            .filter(|&i| u32::from(x[2 * i + 1] > x[2 * i]) == y[i])
            .count();

        let (loss, accuracy) = mlp.evaluate(&params, &x, &y, &mut Workspace::new());
        assert_eq!(accuracy, correct as f32 / n as f32);
        let want = reference::loss(mlp.layers(), &widen(&params), &widen(&x), &y);
        assert!(
            (f64::from(loss) - want).abs() < 1e-5 * want,
            "{loss} vs {want}"
        );
    }

    #[test]
    fn evaluate_of_empty_split_is_nan() {
        let (mlp, params) = identity_model();
        let (loss, accuracy) = mlp.evaluate(&params, &[], &[], &mut Workspace::new());
        assert!(loss.is_nan() && accuracy.is_nan());
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let (mlp, params) = identity_model();
        let mut grad = vec![0.0; mlp.param_len()];
        let x = [1000.0, -1000.0, 88.0, 90.0];
        let (loss, correct) =
            mlp.forward_backward(&params, &x, &[0, 0], &mut Workspace::new(), &mut grad);
        assert!(
            loss.is_finite() && grad.iter().all(|g| g.is_finite()),
            "{loss} {grad:?}"
        );
        assert_eq!(correct, 1);
    }

    #[test]
    #[should_panic(expected = "label 3 is below the class count 3")]
    fn label_out_of_range_panics_with_invariant() {
        let c = random_case(&[4, 3], 2, SEED);
        let mut grad = vec![0.0; c.mlp.param_len()];
        c.mlp
            .forward_backward(&c.params, &c.x, &[0, 3], &mut Workspace::new(), &mut grad);
    }
}
