//! How the graph behaves, apart from the correctness of any one op's backward: gradients add up
//! where a value is reused, no_grad and detach cut the graph, backward needs a scalar, a
//! malformed user-defined backward is reported, and the graph is freed once the loss is dropped
//! so that repeated training steps neither keep old graphs alive nor leak gradients from one
//! step into the next.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use tokenformer::autograd::{is_grad_enabled, no_grad, Gradients, Var};
use tokenformer::core::{Device, Result, Rng, Tensor};
use tokenformer::ops::testing::{bits, tensor, values};
use tokenformer::ops::unary;

/// The message of an error that `backward` must return.
fn backward_error(r: Result<Gradients>) -> String {
    match r {
        Ok(g) => panic!("backward succeeded with {} gradients; expected an error", g.len()),
        Err(e) => e.to_string(),
    }
}

fn close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: {g} vs {w}");
    }
}

/// The identity, recorded as an op whose backward closure owns `token`: the token lives exactly
/// as long as the graph node does, so a `Weak` to it tells whether the graph was freed.
fn tracked(x: &Var, token: Arc<()>) -> Var {
    Var::from_op(
        "tracked",
        x.value().clone(),
        &[x],
        Box::new(move |g| {
            let _keep = &token;
            Ok(vec![Some(g.clone())])
        }),
    )
}

#[test]
fn gradients_accumulate_when_a_value_is_used_twice() {
    let xv = Tensor::randn(&[7], 1.0, &mut Rng::new(1));
    let x = Var::param(xv.clone());
    // y = x·x + x: x feeds the mul twice and the add once, so ∂Σy/∂x = 2x + 1.
    let y = x.mul(&x).unwrap().add(&x).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let want: Vec<f32> = values(&xv).iter().map(|v| 2.0 * v + 1.0).collect();
    close(&values(grads.get(&x).unwrap()), &want, 1e-6);
    assert_eq!(grads.len(), 1);

    // Three branches of different kinds meeting again: exp(x) + 3x + x → exp(x) + 4.
    let z = x.exp().unwrap().add(&x.scale(3.0).unwrap()).unwrap().add(&x).unwrap();
    let grads = z.sum_all().unwrap().backward().unwrap();
    let want: Vec<f32> = values(&xv).iter().map(|v| v.exp() + 4.0).collect();
    close(&values(grads.get(&x).unwrap()), &want, 1e-6);
}

#[test]
fn a_parameter_reached_through_a_broadcast_gets_the_summed_gradient() {
    // b [3] is added to every row of a [4, 3]: its gradient is the column sums of ∂L/∂(a + b).
    let a = Var::constant(Tensor::randn(&[4, 3], 1.0, &mut Rng::new(2)));
    let b = Var::param(tensor(vec![0.5, -1.0, 2.0], &[3]));
    let grads = a.add(&b).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&b).unwrap()), vec![4.0, 4.0, 4.0]);
    assert!(grads.get(&a).is_none(), "a constant must not receive a gradient");
}

#[test]
fn no_grad_results_have_no_graph() {
    let x = Var::param(Tensor::randn(&[2, 3], 1.0, &mut Rng::new(3)));
    assert!(is_grad_enabled());
    let (y, enabled_inside) =
        no_grad(|| (x.square().unwrap().sum_all().unwrap(), is_grad_enabled()));
    assert!(!enabled_inside);
    assert!(is_grad_enabled(), "no_grad must restore the previous state");
    assert_eq!(y.op_name(), None);
    assert!(!y.requires_grad());
    assert!(y.backward().unwrap().is_empty());

    // Nested no_grad restores the outer (disabled) state, then the enabled one.
    no_grad(|| {
        no_grad(|| assert!(!is_grad_enabled()));
        assert!(!is_grad_enabled());
    });
    assert!(is_grad_enabled());

    // A panic inside no_grad does not leave gradients disabled.
    let r = std::panic::catch_unwind(|| no_grad(|| panic!("inside no_grad")));
    assert!(r.is_err());
    assert!(is_grad_enabled());

    // Outside no_grad the same op records its graph.
    let y = x.square().unwrap();
    assert_eq!(y.op_name(), Some("square"));
    assert!(y.requires_grad());
}

#[test]
fn detach_stops_the_gradient() {
    let xv = Tensor::randn(&[5], 1.0, &mut Rng::new(4));
    let x = Var::param(xv.clone());
    let d = x.detach();
    assert_eq!(d.op_name(), None);
    assert!(!d.requires_grad());
    assert_ne!(d.id(), x.id());
    assert!(d.value().same_storage(x.value()), "detach shares the value, it does not copy it");
    // L = Σ detach(x)·x: only the second factor is differentiated, so ∂L/∂x = x, not 2x.
    let grads = d.mul(&x).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(bits(grads.get(&x).unwrap()), bits(&xv));
    // A loss built only from the detached value reaches no parameter.
    let grads = d.square().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.is_empty());
}

#[test]
fn backward_needs_a_scalar_or_a_matching_gradient() {
    let x = Var::param(Tensor::randn(&[2, 3], 1.0, &mut Rng::new(5)));
    let y = x.square().unwrap();
    let err = backward_error(y.backward());
    assert!(err.contains("backward") && err.contains("[2, 3]"), "{err}");

    let err = backward_error(y.backward_with(Tensor::ones(&[3, 2], Device::Cpu).unwrap()));
    assert!(err.contains("backward") && err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");

    // One element in any shape is a scalar loss.
    let one = y.sum(&[0, 1], true).unwrap();
    assert_eq!(one.dims(), &[1, 1]);
    assert_eq!(one.backward().unwrap().len(), 1);
    // A given output gradient of the right shape is propagated as is: ∂(Σ g⊙x²)/∂x = 2x⊙g.
    let g = Tensor::randn(&[2, 3], 1.0, &mut Rng::new(6));
    let grads = y.backward_with(g.clone()).unwrap();
    let want: Vec<f32> =
        values(x.value()).iter().zip(values(&g)).map(|(x, g)| 2.0 * x * g).collect();
    close(&values(grads.get(&x).unwrap()), &want, 1e-6);
}

#[test]
fn malformed_user_backward_is_reported() {
    let x = Var::param(Tensor::randn(&[3], 1.0, &mut Rng::new(7)));
    let value = |x: &Var| unary::square(x.value()).unwrap();

    let too_many = Var::from_op(
        "too_many",
        value(&x),
        &[&x],
        Box::new(|g| Ok(vec![Some(g.clone()), Some(g.clone())])),
    );
    let err = backward_error(too_many.sum_all().unwrap().backward());
    assert!(err.contains("too_many") && err.contains("2 gradients"), "{err}");

    let wrong_shape = Var::from_op(
        "wrong_shape",
        value(&x),
        &[&x],
        Box::new(|_g| Ok(vec![Some(Tensor::zeros(&[4], Device::Cpu)?)])),
    );
    let err = backward_error(wrong_shape.sum_all().unwrap().backward());
    assert!(err.contains("wrong_shape") && err.contains("[4]") && err.contains("[3]"), "{err}");

    let missing = Var::from_op("missing", value(&x), &[&x], Box::new(|_g| Ok(vec![None])));
    let err = backward_error(missing.sum_all().unwrap().backward());
    assert!(err.contains("missing"), "{err}");

    // An error raised inside a backward comes back from `backward` unchanged.
    let failing = Var::from_op(
        "failing",
        value(&x),
        &[&x],
        Box::new(|_g| -> Result<_> {
            Err(tokenformer::core::Error::invalid("failing: on purpose"))
        }),
    );
    let err = backward_error(failing.sum_all().unwrap().backward());
    assert!(err.contains("on purpose"), "{err}");

    // Constant inputs need no gradient, so None for them is fine.
    let c = Var::constant(Tensor::ones(&[3], Device::Cpu).unwrap());
    let partial = Var::from_op(
        "partial",
        value(&x),
        &[&x, &c],
        Box::new(|g| Ok(vec![Some(g.clone()), None])),
    );
    assert_eq!(partial.sum_all().unwrap().backward().unwrap().len(), 1);
}

#[test]
fn the_graph_is_freed_when_the_loss_is_dropped() {
    let x = Var::param(Tensor::randn(&[4, 4], 1.0, &mut Rng::new(8)));
    let token = Arc::new(());
    let weak: Weak<()> = Arc::downgrade(&token);
    let loss = tracked(&x.square().unwrap(), token).exp().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    // While the loss lives, its graph does (this is what makes the check below meaningful).
    assert!(weak.upgrade().is_some());
    // Backward keeps nothing on the graph: neither the gradients nor the parameter hold it.
    drop(loss);
    assert!(weak.upgrade().is_none(), "graph still alive after the loss was dropped");
    assert_eq!(grads.len(), 1);
    assert!(x.requires_grad());
}

/// Counts live graph nodes of the `counted` op across the whole test binary's life.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counted;
impl Counted {
    fn new() -> Counted {
        LIVE.fetch_add(1, Ordering::SeqCst);
        Counted
    }
}
impl Drop for Counted {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn counted(x: &Var) -> Var {
    let c = Counted::new();
    Var::from_op(
        "counted",
        x.value().clone(),
        &[x],
        Box::new(move |g| {
            let _keep = &c;
            Ok(vec![Some(g.clone())])
        }),
    )
}

#[test]
fn training_steps_release_graphs_and_keep_gradients_independent() {
    let mut rng = Rng::new(9);
    let mut w = Tensor::randn(&[6, 4], 0.5, &mut rng);
    let mut b = Tensor::randn(&[4], 0.5, &mut rng);
    let inputs = Tensor::randn(&[5, 6], 1.0, &mut rng);
    let targets = Tensor::from_vec(vec![0.0, 3.0, 1.0, 1.0, 2.0], &[5]).unwrap();

    let step = |w: &Tensor, b: &Tensor| -> (Vec<u32>, Vec<u32>, Tensor, Tensor, usize) {
        let (wv, bv) = (Var::param(w.clone()), Var::param(b.clone()));
        let x = Var::constant(inputs.clone());
        let h = counted(&x.matmul(&wv).unwrap().add(&bv).unwrap()).gelu().unwrap();
        let loss = counted(&h.cross_entropy(&targets).unwrap());
        let grads = loss.backward().unwrap();
        let (gw, gb) = (grads.get(&wv).unwrap().clone(), grads.get(&bv).unwrap().clone());
        (bits(&gw), bits(&gb), gw, gb, grads.len())
    };

    let mut previous: Option<(Vec<u32>, Vec<u32>)> = None;
    for i in 0..200 {
        let (gw_bits, gb_bits, gw, gb, n_grads) = step(&w, &b);
        // Every graph built by the step is gone by the time it returns.
        assert_eq!(LIVE.load(Ordering::SeqCst), 0, "step {i} left graph nodes alive");
        assert_eq!(n_grads, 2, "one gradient per parameter, nothing else");

        // Recomputing the same step from the same values gives the same gradient bit for bit:
        // nothing from an earlier backward leaks into a later one.
        let (again_w, again_b, _, _, _) = step(&w, &b);
        assert_eq!(gw_bits, again_w, "step {i}: gradient of w changed on recomputation");
        assert_eq!(gb_bits, again_b, "step {i}: gradient of b changed on recomputation");
        if let Some((pw, pb)) = &previous {
            assert!(
                pw != &gw_bits || pb != &gb_bits,
                "step {i}: gradient did not follow the update"
            );
        }
        previous = Some((gw_bits, gb_bits));

        // Plain SGD, outside the graph.
        w = no_grad(|| {
            Var::constant(w.clone()).sub(&Var::constant(gw).scale(0.1).unwrap()).unwrap()
        })
        .value()
        .clone();
        b = no_grad(|| {
            Var::constant(b.clone()).sub(&Var::constant(gb).scale(0.1).unwrap()).unwrap()
        })
        .value()
        .clone();
    }
}

#[test]
fn long_chains_backpropagate_without_recursion() {
    // The topological sort is iterative, so backward itself has no depth limit. Dropping the
    // chain afterwards releases one node inside another (recursively), so the depth stays
    // well within a test thread's 2 MiB stack.
    let x = Var::param(tensor(vec![0.25, -0.5], &[2]));
    let mut y = x.clone();
    for _ in 0..2_000 {
        y = y.affine(1.0, 0.001).unwrap();
    }
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(values(grads.get(&x).unwrap()), vec![1.0, 1.0]);
}
