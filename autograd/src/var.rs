//! `Var` and `backward`: reverse-mode automatic differentiation in one file.
//!
//! Read it top to bottom: a [`Var`] is a tensor plus its place in the graph; [`Var::from_op`]
//! is how an op records itself; [`Var::backward_with`] is the whole algorithm (sort the graph,
//! walk it from the output back to the leaves, accumulate gradients); the helpers after it only
//! check that each backward rule kept its promises. The last section, "memory machinery", is
//! what keeps a long training run's memory flat: skip it on first read.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokenformer_core::{Error, Result, Tensor};
use tokenformer_ops::binary;

/// Turns the gradient of an op's output into one optional gradient per input (`None` for an
/// input that needs none).
pub type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A value's place in the graph: who made it, from what, and how to send a gradient back.
/// (It holds no tensor, only the shape; see "memory machinery" below.)
struct Node {
    id: usize,
    dims: Vec<usize>,
    requires_grad: bool,
    /// `None` for a leaf: a parameter or a constant.
    grad_fn: Option<GradFn>,
}

/// The op that made a value: its name, its inputs' nodes, and its backward rule.
struct GradFn {
    op: &'static str,
    inputs: Vec<Arc<Node>>,
    backward: BackwardFn,
}

/// A tensor and its place in the graph. Cloning is cheap (two shared handles).
#[derive(Clone)]
pub struct Var {
    value: Tensor,
    node: Arc<Node>,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Var {
    fn new_node(value: Tensor, requires_grad: bool, grad_fn: Option<GradFn>) -> Var {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node { id, dims: value.dims().to_vec(), requires_grad, grad_fn });
        Var { value, node }
    }

    /// A value that needs no gradient (inputs, targets, frozen weights).
    pub fn constant(value: Tensor) -> Var {
        Var::new_node(value, false, None)
    }

    /// A leaf whose gradient `backward` reports: a parameter.
    pub fn param(value: Tensor) -> Var {
        Var::new_node(value, true, None)
    }

    /// Records the result of an op. When gradients are disabled, or no input needs one, the
    /// result is a constant and `backward` is dropped unused. This is also how a user adds an
    /// op of their own: give its forward value and its backward rule.
    pub fn from_op(op: &'static str, value: Tensor, inputs: &[&Var], backward: BackwardFn) -> Var {
        crate::profile::forward_recorded(op);
        if is_grad_enabled() && inputs.iter().any(|v| v.requires_grad()) {
            let inputs = inputs.iter().map(|v| v.node.clone()).collect();
            Var::new_node(value, true, Some(GradFn { op, inputs, backward }))
        } else {
            Var::constant(value)
        }
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }
    pub fn dims(&self) -> &[usize] {
        self.value.dims()
    }
    pub fn id(&self) -> usize {
        self.node.id
    }
    pub fn requires_grad(&self) -> bool {
        self.node.requires_grad
    }
    /// The op that made this value, or `None` for a leaf.
    pub fn op_name(&self) -> Option<&'static str> {
        self.node.grad_fn.as_ref().map(|g| g.op)
    }
    /// The same value cut from the graph.
    pub fn detach(&self) -> Var {
        Var::constant(self.value.clone())
    }

    /// Back-propagates from this scalar and returns the gradients of every parameter it depends
    /// on.
    pub fn backward(&self) -> Result<Gradients> {
        if self.value().numel() != 1 {
            return Err(Error::shape(
                "backward",
                format!("needs a scalar loss, got shape {}", self.value().shape()),
            ));
        }
        let seed = Tensor::ones(self.dims(), self.value().device())?;
        self.backward_with(seed)
    }

    /// Back-propagates a given output gradient (same shape as this value) and returns the
    /// gradients of every parameter this value depends on.
    pub fn backward_with(&self, grad: Tensor) -> Result<Gradients> {
        check_output_grad(&self.value, &grad)?;
        let mut leaves = Gradients(HashMap::new());
        if !self.requires_grad() {
            return Ok(leaves);
        }
        // 1. Sort: every node that needs a gradient, each one after all of its inputs.
        let order = topological_order(&self.node);
        // 2. Walk that order backwards, from this value to the leaves. `pending` holds, for each
        //    node not visited yet, the sum of the gradients sent to it so far. Every use of a
        //    node comes later in the order, so when the walk reaches it, its sum is complete.
        let mut pending: HashMap<usize, Tensor> = HashMap::from([(self.id(), grad)]);
        for node in order.iter().rev() {
            let Some(grad) = pending.remove(&node.id) else { continue };
            let Some(grad_fn) = &node.grad_fn else {
                leaves.0.insert(node.id, grad); // a parameter: its gradient is final
                continue;
            };
            // 3. Accumulate: the op's backward rule splits `grad` among its inputs, and each
            //    share is added (+=) to what that input has received from its other uses.
            for (input, share) in grad_fn.input_grads(&grad)? {
                accumulate(&mut pending, input.id, share)?;
            }
        }
        Ok(leaves)
    }
}

/// Every node that needs a gradient, each after all of its inputs (iterative DFS, so deep graphs
/// do not overflow the stack).
fn topological_order(root: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut order = Vec::new();
    let mut visited = HashSet::new();
    let mut stack: Vec<(Arc<Node>, bool)> = vec![(root.clone(), false)];
    while let Some((node, inputs_done)) = stack.pop() {
        if inputs_done {
            order.push(node);
            continue;
        }
        if !node.requires_grad || !visited.insert(node.id) {
            continue;
        }
        stack.push((node.clone(), true));
        if let Some(grad_fn) = &node.grad_fn {
            for input in grad_fn.inputs.iter().rev() {
                if input.requires_grad && !visited.contains(&input.id) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

/// Adds `share` to the gradient node `id` has received so far (the `+=` of a value that is used
/// more than once). The sum runs in the order of the walk, which is fixed, so it is
/// deterministic.
fn accumulate(pending: &mut HashMap<usize, Tensor>, id: usize, share: Tensor) -> Result<()> {
    let total = match pending.remove(&id) {
        Some(previous) => {
            crate::profile::backward("gradient sums", || binary::add_into(previous, &share))?
        }
        None => share,
    };
    pending.insert(id, total);
    Ok(())
}

/// The seed of `backward_with` must have the shape of the value it is the gradient of.
fn check_output_grad(value: &Tensor, grad: &Tensor) -> Result<()> {
    if grad.dims() != value.dims() {
        return Err(Error::shape(
            "backward",
            format!("gradient of shape {} for a value of shape {}", grad.shape(), value.shape()),
        ));
    }
    Ok(())
}

impl GradFn {
    /// Runs the backward rule on the gradient of the op's output and returns the gradient of
    /// each input that needs one, with that input's node. Checks the rule's promises (one entry
    /// per input, present where an input needs it, of the input's shape): a rule that breaks one
    /// has a bug, reported here by op name instead of surfacing later as a wrong gradient.
    fn input_grads(&self, grad: &Tensor) -> Result<Vec<(&Node, Tensor)>> {
        let grads = crate::profile::backward(self.op, || (self.backward)(grad))?;
        if grads.len() != self.inputs.len() {
            return Err(Error::invalid(format!(
                "backward of {} returned {} gradients for {} inputs",
                self.op,
                grads.len(),
                self.inputs.len()
            )));
        }
        let mut needed = Vec::with_capacity(grads.len());
        for (input, g) in self.inputs.iter().zip(grads) {
            if !input.requires_grad {
                continue;
            }
            let g = g.ok_or_else(|| {
                Error::invalid(format!(
                    "backward of {} gave no gradient for an input that needs one",
                    self.op
                ))
            })?;
            if g.dims() != input.dims.as_slice() {
                return Err(Error::shape(
                    self.op,
                    format!(
                        "backward returned a gradient of shape {} for an input of shape {:?}",
                        g.shape(),
                        input.dims
                    ),
                ));
            }
            needed.push((&**input, g));
        }
        Ok(needed)
    }
}

impl std::fmt::Debug for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Var#{}({:?}, op {:?})", self.id(), self.value(), self.op_name())
    }
}

/// The gradients of the parameters (leaves that require grad) reached by one backward pass.
pub struct Gradients(HashMap<usize, Tensor>);

impl Gradients {
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        self.0.get(&var.id())
    }
    pub fn remove(&mut self, var: &Var) -> Option<Tensor> {
        self.0.remove(&var.id())
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Memory machinery: skip on first read.
//
// Nothing above depends on what follows for its correctness; it decides only how much memory a
// graph holds and for how long.
//
// - A `Node` holds no tensor. What stays alive until the backward pass is exactly what the
//   backward closures captured, so an intermediate value no backward rule needs is freed as
//   soon as the forward pass drops its `Var`. Nothing is written onto the graph by `backward`
//   either (gradients go into a separate `Gradients` map), so dropping the loss frees the whole
//   step.
// - Dropping a graph frees its nodes iteratively (below): the default recursive drop of a chain
//   of many thousands of ops would overflow the stack.
// - `no_grad` turns recording off, so evaluation and generation build no graph at all.

impl Drop for Node {
    /// Frees the graph below this node iteratively: the default recursive drop of a long chain
    /// of ops would overflow the stack.
    fn drop(&mut self) {
        let Some(grad_fn) = self.grad_fn.take() else { return };
        let mut orphans = grad_fn.inputs;
        while let Some(node) = orphans.pop() {
            // Only nodes no one else holds are freed here; their inputs join the worklist.
            if let Ok(mut node) = Arc::try_unwrap(node) {
                if let Some(inner) = node.grad_fn.take() {
                    orphans.extend(inner.inputs);
                }
            }
        }
    }
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` without recording any op: inside, every result is a constant. Used for evaluation
/// and generation, where no backward will follow.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_ENABLED.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GRAD_ENABLED.with(|g| g.replace(false)));
    f()
}

/// Whether ops are being recorded on this thread (false inside `no_grad`).
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}
