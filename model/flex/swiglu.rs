//! SwiGLU's gating, `silu(g) ⊙ u`, as one pass over the elements on the CPU backend, for
//! inference and for training.
//!
//! Burn composes it as `g · sigmoid(g)` then `· u`: three tensor operations, each a fresh
//! buffer, and burn-flex's sigmoid calls the scalar libm `expf` once per element (a branch per
//! element keeps it from vectorising). Under autodiff the sigmoid node keeps its input and
//! computes the sigmoid a second time in the backward pass, and the two products keep their
//! operands. In a `search` `mrt-dense` profile (training step ≈ 60 % of the run) `expf` alone
//! was 11 % of the time. Here the sigmoid uses an exponential written so the compiler
//! vectorises it (Cody–Waite range reduction and a degree-6 polynomial, ≤ 2 ulp on the range
//! that matters), the forward is one loop, and the backward is one loop that recomputes the
//! sigmoid from the saved inputs. Flex f32 tensors and `Autodiff<Flex>` tensors take this
//! path; everything else (GPU backends, other dtypes) takes Burn's composition.
//!
//! The results are not bit-identical to Burn's (a different `exp`): they agree to a few ulp,
//! which the tests below check, for values and gradients.

use std::any::Any;
use std::cell::Cell;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{DType, TensorPrimitive};
use burn_flex::FlexTensor;

/// What `Autodiff<Flex>` calls a float tensor (burn-autodiff does not export the type's name).
type AutodiffFlex = burn::tensor::ops::FloatTensor<Autodiff<Flex>>;

/// `silu(gate) * up` for two tensors of the same shape.
pub(crate) fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    if gate.dims() != up.dims() || gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
        return silu(gate) * up;
    }
    let (TensorPrimitive::Float(g), TensorPrimitive::Float(u)) = (gate.into_primitive(), up.into_primitive()) else {
        unreachable!("float tensors have float primitives")
    };
    let out = match cast::<_, FlexTensor>(g) {
        Ok(g) => {
            let u: FlexTensor = cast(u).expect("both tensors share a backend");
            cast(forward(&g, &u)).ok()
        }
        Err(g) => match (cast::<_, AutodiffFlex>(g), cast::<_, AutodiffFlex>(u)) {
            (Ok(g), Ok(u)) => cast(tracked(g, u)).ok(),
            (Err(g), Err(u)) => {
                let g = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(g));
                return silu(g) * Tensor::from_primitive(TensorPrimitive::Float(u));
            }
            _ => unreachable!("both tensors share a backend"),
        },
    };
    Tensor::from_primitive(TensorPrimitive::Float(out.expect("the output has the inputs' type")))
}

/// `t` as a `U` when `T` is `U`, else `t` back.
fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// The autodiff node: forward now, gradients for whichever inputs are tracked later.
fn tracked(g: AutodiffFlex, u: AutodiffFlex) -> AutodiffFlex {
    let out = forward(&g.primitive, &u.primitive);
    match SwiGluBackward
        .prepare::<NoCheckpointing>([g.node.clone(), u.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((g.primitive, u.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct SwiGluBackward;

impl Backward<Flex, 2> for SwiGluBackward {
    /// The two inputs (shared buffers, not copies): the sigmoid is cheaper to recompute than
    /// a third saved tensor is to keep.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (g, u) = ops.state;
        let need_up = ops.parents[1].is_some();
        // The gate's closure runs first and computes both gradients in one pass; the up
        // closure takes its half, or computes it alone when the gate is not tracked.
        let up_grad = Cell::new(None);
        binary::<Flex, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dout| {
                let (dg, du) = backward(&g, &u, &dout, need_up);
                up_grad.set(du);
                dg
            },
            |dout| match up_grad.take() {
                Some(du) => du,
                None => up_only(&g, &dout),
            },
        );
    }
}

fn contiguous(t: &FlexTensor) -> FlexTensor {
    t.to_contiguous()
}

fn from_vec(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, like.layout().shape().clone()))
}

fn forward(g: &FlexTensor, u: &FlexTensor) -> FlexTensor {
    let (g, u) = (contiguous(g), contiguous(u));
    let (gs, us) = (g.storage::<f32>(), u.storage::<f32>());
    let out: Vec<f32> = gs.iter().zip(us).map(|(&g, &u)| g * sigmoid(g) * u).collect();
    from_vec(out, &g)
}

/// d/dg [g·σ(g)·u] = u·σ(g)·(1 + g·(1 − σ(g))), d/du = g·σ(g).
fn backward(g: &FlexTensor, u: &FlexTensor, dout: &FlexTensor, with_up: bool) -> (FlexTensor, Option<FlexTensor>) {
    let (g, u, dout) = (contiguous(g), contiguous(u), contiguous(dout));
    let (gs, us, ds) = (g.storage::<f32>(), u.storage::<f32>(), dout.storage::<f32>());
    let mut dg = vec![0f32; gs.len()];
    if !with_up {
        for (x, ((&g, &u), &d)) in dg.iter_mut().zip(gs.iter().zip(us).zip(ds)) {
            let s = sigmoid(g);
            *x = d * u * s * (1.0 + g * (1.0 - s));
        }
        return (from_vec(dg, &g), None);
    }
    let mut du = vec![0f32; gs.len()];
    for ((x, y), ((&g, &u), &d)) in dg.iter_mut().zip(du.iter_mut()).zip(gs.iter().zip(us).zip(ds)) {
        let s = sigmoid(g);
        *x = d * u * s * (1.0 + g * (1.0 - s));
        *y = d * g * s;
    }
    (from_vec(dg, &g), Some(from_vec(du, &g)))
}

fn up_only(g: &FlexTensor, dout: &FlexTensor) -> FlexTensor {
    let (g, dout) = (contiguous(g), contiguous(dout));
    let du: Vec<f32> = g
        .storage::<f32>()
        .iter()
        .zip(dout.storage::<f32>())
        .map(|(&g, &d)| d * g * sigmoid(g))
        .collect();
    from_vec(du, &g)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// e^x without branches or library calls, so that loops over it vectorise.
///
/// x = n·ln 2 + r with n = round(x·log₂e) and |r| ≤ ln 2 / 2; e^r from Cephes' `expf`
/// polynomial; 2ⁿ built in the exponent bits. The input is clamped to [−87, 88] so that 2ⁿ
/// stays a normal number: e^x saturates at ≈ 1.65e38 above and ≈ 1.6e−38 below. For the
/// sigmoid that means σ(x) = 1 exactly above 87 (as in f32 anyway) and ≈ 6e−39 instead of
/// something smaller below −88.
#[inline(always)]
// The constants are written as their sources print them (Cephes' expf); f32 rounds them.
#[allow(clippy::excessive_precision)]
pub(crate) fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer in the current (nearest-even)
    // mode, and leaves that integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_375;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs() / f32::EPSILON);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        // Saturates instead of overflowing or reaching a denormal.
        assert!(exp(200.0).is_finite() && exp(-200.0) > 0.0);
        assert_eq!(sigmoid(100.0), 1.0);
        assert!(sigmoid(-100.0) < 1e-37);
    }

    fn close(a: Tensor<impl Backend, 2>, b: Tensor<impl Backend, 2>, what: &str) {
        let (a, b): (Vec<f32>, Vec<f32>) = (a.into_data().to_vec().unwrap(), b.into_data().to_vec().unwrap());
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn matches_burn_forward_on_flex() {
        let dev = Default::default();
        <Flex as Backend>::seed(&dev, 3);
        let g = Tensor::<Flex, 2>::random([7, 33], Distribution::Normal(0.0, 4.0), &dev);
        let u = Tensor::<Flex, 2>::random([7, 33], Distribution::Normal(0.0, 1.0), &dev);
        let (ours, burns) = (swiglu(g.clone(), u.clone()), silu(g.clone()) * u.clone());
        // The fused kernel ran: Burn's values differ from it in the last bits somewhere.
        assert_ne!(ours.to_data(), burns.to_data());
        close(ours, burns, "value");
        // A transposed (strided) input is read through its strides.
        close(
            swiglu(g.clone().transpose(), u.clone().transpose()),
            silu(g.transpose()) * u.transpose(),
            "strided",
        );
    }

    /// Values and both gradients against Burn's composition under autodiff, with the up
    /// projection tracked or not.
    #[test]
    fn matches_burn_gradients_under_autodiff() {
        type Ad = Autodiff<Flex>;
        let dev = Default::default();
        <Flex as Backend>::seed(&dev, 5);
        let g0 = Tensor::<Flex, 2>::random([5, 24], Distribution::Normal(0.0, 3.0), &dev);
        let u0 = Tensor::<Flex, 2>::random([5, 24], Distribution::Normal(0.0, 1.0), &dev);
        let w = Tensor::<Flex, 2>::random([5, 24], Distribution::Normal(0.0, 1.0), &dev);
        for track_up in [true, false] {
            let run = |fused: bool| {
                let g = Tensor::<Ad, 2>::from_inner(g0.clone()).require_grad();
                let u = Tensor::<Ad, 2>::from_inner(u0.clone());
                let u = if track_up { u.require_grad() } else { u };
                let y = if fused {
                    swiglu(g.clone(), u.clone())
                } else {
                    silu(g.clone()) * u.clone()
                };
                let grads = (y.clone() * Tensor::from_inner(w.clone())).sum().backward();
                (y.inner(), g.grad(&grads).unwrap(), u.grad(&grads))
            };
            let ((y, dg, du), (y_ref, dg_ref, du_ref)) = (run(true), run(false));
            // The fused node ran (its kernel's exact values; Burn's differ in the last bits
            // somewhere), and is close to Burn's composition.
            let bits = |t: &Tensor<Flex, 2>| {
                t.clone()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<_>>()
            };
            let (g_prim, u_prim, w_prim) = (
                g0.clone().into_primitive().tensor(),
                u0.clone().into_primitive().tensor(),
                w.clone().into_primitive().tensor(),
            );
            let (dg_kernel, _) = backward(&g_prim, &u_prim, &w_prim, track_up);
            assert_eq!(
                bits(&y),
                bits(&Tensor::from_primitive(TensorPrimitive::Float(forward(
                    &g_prim, &u_prim
                ))))
            );
            assert_eq!(
                bits(&dg),
                bits(&Tensor::from_primitive(TensorPrimitive::Float(dg_kernel)))
            );
            assert_ne!(bits(&y), bits(&y_ref));
            close(y, y_ref, "value");
            close(dg, dg_ref, "gate gradient");
            assert_eq!(du.is_some(), track_up);
            if let (Some(du), Some(du_ref)) = (du, du_ref) {
                close(du, du_ref, "up gradient");
            }
        }
    }
}
