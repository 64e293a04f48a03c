//! Backpropagation on a handful of scalars, every step printed.
//!
//! Two expressions are built from scalar `Var`s: a single tanh neuron, then micrograd's own
//! test expression. Every intermediate value goes through a *probe*, an identity op made with
//! `Var::from_op` whose backward rule writes down the gradient that flows through it, so the
//! whole graph can be printed op by op with each value and its gradient. The gradients of the
//! inputs are then checked against central finite differences of the same expression written
//! as plain f64 arithmetic, and against the engine's own `gradcheck`.
//!
//! ```sh
//! cargo run --release --example autograd_by_hand
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokenformer::autograd::{gradcheck, GradcheckOptions, Var};
use tokenformer::core::{Error, Result, Tensor};

#[derive(Parser)]
#[command(about = "Backpropagation on a handful of scalars, every step printed")]
struct Args {
    /// Accepted like the other examples' flag; this one is always quick and draws nothing.
    #[arg(long)]
    quick: bool,
}

/// One printed line of the graph.
struct Row {
    name: String,
    formula: String,
    op: &'static str,
    value: f32,
    /// Filled in by the probe during `backward` (or, for a leaf, from the gradient store).
    grad: Arc<Mutex<Option<f32>>>,
}

/// The values of an expression in the order they were computed.
#[derive(Default)]
struct Trace {
    rows: Vec<Row>,
    leaves: Vec<(usize, Var)>,
}

impl Trace {
    /// An input: a parameter, whose gradient `backward` reports.
    fn input(&mut self, name: &str, value: f32) -> Var {
        let var = Var::param(Tensor::scalar(value));
        self.leaves.push((self.rows.len(), var.clone()));
        self.rows.push(Row {
            name: name.into(),
            formula: "input".into(),
            op: "",
            value,
            grad: Arc::default(),
        });
        var
    }

    /// Records `var` (just computed by `formula`) and returns it behind a probe: an identity
    /// op whose backward rule copies the incoming gradient into this row before passing it on.
    fn node(&mut self, name: &str, formula: &str, var: Result<Var>) -> Result<Var> {
        let var = var?;
        let slot: Arc<Mutex<Option<f32>>> = Arc::default();
        let seen = slot.clone();
        let probe = Var::from_op(
            "probe",
            var.value().clone(),
            &[&var],
            Box::new(move |g| {
                if let Ok(mut s) = seen.lock() {
                    *s = Some(g.to_scalar()?);
                }
                Ok(vec![Some(g.clone())])
            }),
        );
        self.rows.push(Row {
            name: name.into(),
            formula: formula.into(),
            op: var.op_name().unwrap_or("constant"),
            value: var.value().to_scalar()?,
            grad: slot,
        });
        Ok(probe)
    }

    /// Back-propagates from `out` and prints the graph with every gradient.
    fn backward_and_print(&self, out: &Var, out_name: &str) -> Result<Vec<f32>> {
        let grads = out.backward()?;
        let mut input_grads = Vec::new();
        for (row, leaf) in &self.leaves {
            let g = grads.get(leaf).map(|t| t.to_scalar()).transpose()?.unwrap_or(0.0);
            if let Ok(mut s) = self.rows[*row].grad.lock() {
                *s = Some(g);
            }
            input_grads.push(g);
        }
        println!(
            "  {:<6} {:<22} {:<9} {:>11}  {:>12}",
            "",
            "",
            "op",
            "value",
            format!("∂{out_name}/∂·")
        );
        for row in &self.rows {
            let grad = row.grad.lock().ok().and_then(|g| *g);
            let grad = grad.map_or("—".to_string(), |g| format!("{g:.4}"));
            let formula =
                if row.op.is_empty() { row.formula.clone() } else { format!("= {}", row.formula) };
            println!(
                "  {:<6} {:<22} {:<9} {:>11.4}  {:>12}",
                row.name, formula, row.op, row.value, grad
            );
        }
        Ok(input_grads)
    }
}

/// ∂f/∂xᵢ by central differences, h = 1e-6, in f64.
fn central_differences(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += h;
            minus[i] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        })
        .collect()
}

fn compare(names: &[&str], analytic: &[f32], numeric: &[f64]) -> Result<()> {
    println!("\n  input   backward       finite difference (f64)");
    let mut worst = 0.0f64;
    for ((name, a), n) in names.iter().zip(analytic).zip(numeric) {
        println!("  {name:<7} {a:>12.6}   {n:>12.6}");
        worst = worst.max((*a as f64 - n).abs() / n.abs().max(1.0));
    }
    println!("  largest relative difference: {worst:.1e} (f32 arithmetic against f64)");
    if worst > 1e-4 {
        return Err(Error::invalid(format!(
            "backward disagrees with finite differences ({worst:e})"
        )));
    }
    Ok(())
}

/// o = tanh(x₁w₁ + x₂w₂ + b): one neuron.
fn neuron() -> Result<()> {
    println!("1. One neuron, o = tanh(x1·w1 + x2·w2 + b)\n");
    let inputs = [2.0, 0.0, -3.0, 1.0, 6.881_373_587_019_543];
    let mut t = Trace::default();
    let x1 = t.input("x1", inputs[0] as f32);
    let x2 = t.input("x2", inputs[1] as f32);
    let w1 = t.input("w1", inputs[2] as f32);
    let w2 = t.input("w2", inputs[3] as f32);
    let b = t.input("b", inputs[4] as f32);
    let x1w1 = t.node("x1w1", "x1 · w1", x1.mul(&w1))?;
    let x2w2 = t.node("x2w2", "x2 · w2", x2.mul(&w2))?;
    let sum = t.node("s", "x1w1 + x2w2", x1w1.add(&x2w2))?;
    let n = t.node("n", "s + b", sum.add(&b))?;
    let o = t.node("o", "tanh(n)", n.tanh())?;
    let analytic = t.backward_and_print(&o, "o")?;
    let reference = |v: &[f64]| (v[0] * v[2] + v[1] * v[3] + v[4]).tanh();
    compare(&["x1", "x2", "w1", "w2", "b"], &analytic, &central_differences(reference, &inputs))?;
    println!("  tanh′(n) = 1 − o² = 0.5: every gradient is 0.5 times what n sees from its input.");
    Ok(())
}

/// micrograd's test expression, one op per line.
fn micrograd_expression(v: &[Var], t: &mut Trace) -> Result<Var> {
    let (a, b) = (&v[0], &v[1]);
    let c = t.node("c", "a + b", a.add(b))?;
    let ab = t.node("ab", "a · b", a.mul(b))?;
    let b3 = t.node("b3", "b^3", b.powf(3.0))?;
    let d = t.node("d", "ab + b3", ab.add(&b3))?;
    let c1 = t.node("c1", "c + 1", c.add_scalar(1.0))?;
    let c2 = t.node("c2", "c + c1", c.add(&c1))?;
    let t1 = t.node("t1", "c2 + 1", c2.add_scalar(1.0))?;
    let na = t.node("na", "−a", a.neg())?;
    let t2 = t.node("t2", "t1 + na", t1.add(&na))?;
    let c3 = t.node("c3", "c2 + t2", c2.add(&t2))?;
    let d2 = t.node("d2", "2 · d", d.scale(2.0))?;
    let s1 = t.node("s1", "b + a", b.add(a))?;
    let r1 = t.node("r1", "relu(s1)", s1.relu())?;
    let t3 = t.node("t3", "d2 + r1", d2.add(&r1))?;
    let d3 = t.node("d3", "d + t3", d.add(&t3))?;
    let d4 = t.node("d4", "3 · d3", d3.scale(3.0))?;
    let s2 = t.node("s2", "b − a", b.sub(a))?;
    let r2 = t.node("r2", "relu(s2)", s2.relu())?;
    let t4 = t.node("t4", "d4 + r2", d4.add(&r2))?;
    let d5 = t.node("d5", "d3 + t4", d3.add(&t4))?;
    let e = t.node("e", "c3 − d5", c3.sub(&d5))?;
    let f = t.node("f", "e^2", e.square())?;
    let g1 = t.node("g1", "f / 2", f.scale(0.5))?;
    let ten = Var::constant(Tensor::scalar(10.0));
    let t5 = t.node("t5", "10 / f", ten.div(&f))?;
    t.node("g", "g1 + t5", g1.add(&t5))
}

/// The same expression in plain f64 arithmetic, for the finite differences.
fn micrograd_reference(v: &[f64]) -> f64 {
    let (a, b) = (v[0], v[1]);
    let relu = |x: f64| x.max(0.0);
    // Named as in the graph: micrograd's `c += x` is c2 = c + x here.
    let c = a + b;
    let d = a * b + b.powi(3);
    let c2 = c + (c + 1.0);
    let c3 = c2 + (1.0 + c2 + (-a));
    let d3 = d + (d * 2.0 + relu(b + a));
    let d5 = d3 + (3.0 * d3 + relu(b - a));
    let e = c3 - d5;
    let f = e * e;
    f / 2.0 + 10.0 / f
}

fn micrograd() -> Result<()> {
    println!("\n2. micrograd's test expression (a = −4, b = 2)\n");
    println!("     c = a + b;  d = a·b + b³;  c += c + 1;  c += 1 + c + (−a)");
    println!("     d += 2d + relu(b + a);  d += 3d + relu(b − a);  e = c − d;  f = e²;  g = f/2 + 10/f\n");
    let inputs = [-4.0, 2.0];
    let mut t = Trace::default();
    let vars = [t.input("a", inputs[0] as f32), t.input("b", inputs[1] as f32)];
    let g = micrograd_expression(&vars, &mut t)?;
    let analytic = t.backward_and_print(&g, "g")?;
    compare(&["a", "b"], &analytic, &central_differences(micrograd_reference, &inputs))?;
    println!("  micrograd and PyTorch print g = 24.7041, ∂g/∂a = 138.8338, ∂g/∂b = 645.5773.");
    println!("  c feeds both c1 and c2, so its gradient is the sum over both paths: 2 × −13.8834.");
    println!("  r1 = relu(−2) = 0 passes no gradient back to s1: the ReLU is off for this input.");

    // The engine's own check: every input nudged by ±ε, on the f32 engine itself.
    let tensors: Vec<Tensor> = inputs.iter().map(|&x| Tensor::scalar(x as f32)).collect();
    let opts = GradcheckOptions { eps: 1e-3, atol: 1e-2, rtol: 1e-3, seed: 0 };
    gradcheck(|v| micrograd_expression(v, &mut Trace::default()), &tensors, &opts)?;
    println!("  gradcheck (central differences on the f32 engine, ε = 1e-3): passed");
    Ok(())
}

/// An error is one line, `error: …`, and exit status 1, as the `tokenformer` command does.
fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(_args: Args) -> Result<()> {
    neuron()?;
    micrograd()
}
