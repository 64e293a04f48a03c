//! Differentiable ops on [`Var`]: each runs the forward kernel of its family in
//! `tokenformer-ops` and records the matching backward kernel. The formulas and derivations are
//! at the top of each family's module there; what is here is only the wiring: which values the
//! backward needs to keep.

use crate::var::Var;
use tokenformer_core::{Error, Result, Tensor};
use tokenformer_ops::{
    attention, binary, cross_entropy, embedding as emb, layer_norm, layout, matmul,
    pattention_norm, reduce, rope, softmax, unary,
};

pub use tokenformer_ops::pattention_norm::Theta;

fn one(g: Tensor) -> Result<Vec<Option<Tensor>>> {
    Ok(vec![Some(g)])
}

impl Var {
    // ---- elementwise, two operands (broadcasting) ----

    pub fn add(&self, other: &Var) -> Result<Var> {
        let value = binary::add(self.value(), other.value())?;
        let (a, b) = (self.dims().to_vec(), other.dims().to_vec());
        Ok(Var::from_op(
            "add",
            value,
            &[self, other],
            Box::new(move |g| {
                let (ga, gb) = binary::add_backward(&a, &b, g)?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        ))
    }

    pub fn sub(&self, other: &Var) -> Result<Var> {
        let value = binary::sub(self.value(), other.value())?;
        let (a, b) = (self.dims().to_vec(), other.dims().to_vec());
        Ok(Var::from_op(
            "sub",
            value,
            &[self, other],
            Box::new(move |g| {
                let (ga, gb) = binary::sub_backward(&a, &b, g)?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        ))
    }

    pub fn mul(&self, other: &Var) -> Result<Var> {
        let value = binary::mul(self.value(), other.value())?;
        let (a, b) = (self.value().clone(), other.value().clone());
        Ok(Var::from_op(
            "mul",
            value,
            &[self, other],
            Box::new(move |g| {
                let (ga, gb) = binary::mul_backward(&a, &b, g)?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        ))
    }

    pub fn div(&self, other: &Var) -> Result<Var> {
        let value = binary::div(self.value(), other.value())?;
        let (a, b) = (self.value().clone(), other.value().clone());
        Ok(Var::from_op(
            "div",
            value,
            &[self, other],
            Box::new(move |g| {
                let (ga, gb) = binary::div_backward(&a, &b, g)?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        ))
    }

    // ---- elementwise, one operand ----

    pub fn neg(&self) -> Result<Var> {
        let value = unary::neg(self.value())?;
        Ok(Var::from_op("neg", value, &[self], Box::new(|g| one(unary::neg(g)?))))
    }

    /// x·mul + add, the scalar affine map (scalar add and scalar multiply are special cases).
    pub fn affine(&self, mul: f32, add: f32) -> Result<Var> {
        let value = unary::affine(self.value(), mul, add)?;
        Ok(Var::from_op(
            "affine",
            value,
            &[self],
            Box::new(move |g| one(unary::affine(g, mul, 0.0)?)),
        ))
    }

    pub fn scale(&self, factor: f32) -> Result<Var> {
        self.affine(factor, 0.0)
    }

    pub fn add_scalar(&self, c: f32) -> Result<Var> {
        self.affine(1.0, c)
    }

    pub fn exp(&self) -> Result<Var> {
        let value = unary::exp(self.value())?;
        let y = value.clone();
        Ok(Var::from_op("exp", value, &[self], Box::new(move |g| one(unary::exp_backward(&y, g)?))))
    }

    pub fn log(&self) -> Result<Var> {
        let value = unary::log(self.value())?;
        let x = self.value().clone();
        Ok(Var::from_op("log", value, &[self], Box::new(move |g| one(unary::log_backward(&x, g)?))))
    }

    pub fn sqrt(&self) -> Result<Var> {
        let value = unary::sqrt(self.value())?;
        let y = value.clone();
        Ok(Var::from_op(
            "sqrt",
            value,
            &[self],
            Box::new(move |g| one(unary::sqrt_backward(&y, g)?)),
        ))
    }

    pub fn square(&self) -> Result<Var> {
        let value = unary::square(self.value())?;
        let x = self.value().clone();
        Ok(Var::from_op(
            "square",
            value,
            &[self],
            Box::new(move |g| one(unary::square_backward(&x, g)?)),
        ))
    }

    pub fn powf(&self, p: f32) -> Result<Var> {
        let value = unary::powf(self.value(), p)?;
        let x = self.value().clone();
        Ok(Var::from_op(
            "powf",
            value,
            &[self],
            Box::new(move |g| one(unary::powf_backward(&x, p, g)?)),
        ))
    }

    /// GELU, exact form x·Φ(x).
    pub fn gelu(&self) -> Result<Var> {
        let value = unary::gelu(self.value())?;
        let x = self.value().clone();
        Ok(Var::from_op(
            "gelu",
            value,
            &[self],
            Box::new(move |g| one(unary::gelu_backward(&x, g)?)),
        ))
    }

    /// max(x, 0); its gradient is taken as 0 at exactly x = 0.
    pub fn relu(&self) -> Result<Var> {
        let value = unary::relu(self.value())?;
        let x = self.value().clone();
        Ok(Var::from_op(
            "relu",
            value,
            &[self],
            Box::new(move |g| one(unary::relu_backward(&x, g)?)),
        ))
    }

    pub fn tanh(&self) -> Result<Var> {
        let value = unary::tanh(self.value())?;
        let y = value.clone();
        Ok(Var::from_op(
            "tanh",
            value,
            &[self],
            Box::new(move |g| one(unary::tanh_backward(&y, g)?)),
        ))
    }

    /// The logistic function σ(x) = 1/(1 + e⁻ˣ).
    pub fn sigmoid(&self) -> Result<Var> {
        let value = unary::sigmoid(self.value())?;
        let y = value.clone();
        Ok(Var::from_op(
            "sigmoid",
            value,
            &[self],
            Box::new(move |g| one(unary::sigmoid_backward(&y, g)?)),
        ))
    }

    // ---- reductions ----

    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Var> {
        let value = reduce::sum(self.value(), axes, keepdim)?;
        let (dims, axes) = (self.dims().to_vec(), axes.to_vec());
        Ok(Var::from_op(
            "sum",
            value,
            &[self],
            Box::new(move |g| one(reduce::sum_backward(g, &dims, &axes, keepdim)?)),
        ))
    }

    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Var> {
        let value = reduce::mean(self.value(), axes, keepdim)?;
        let (dims, axes) = (self.dims().to_vec(), axes.to_vec());
        Ok(Var::from_op(
            "mean",
            value,
            &[self],
            Box::new(move |g| one(reduce::mean_backward(g, &dims, &axes, keepdim)?)),
        ))
    }

    /// Sum of every element, as a scalar (dims []).
    pub fn sum_all(&self) -> Result<Var> {
        let axes: Vec<usize> = (0..self.dims().len()).collect();
        self.sum(&axes, false)
    }

    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Var> {
        let value = reduce::max(self.value(), axis, keepdim)?;
        let x = self.value().clone();
        Ok(Var::from_op(
            "max",
            value,
            &[self],
            Box::new(move |g| one(reduce::max_backward(&x, axis, keepdim, g)?)),
        ))
    }

    // ---- layout ----

    pub fn reshape(&self, dims: &[usize]) -> Result<Var> {
        let value = self.value().reshape(dims)?;
        let input_dims = self.dims().to_vec();
        Ok(Var::from_op("reshape", value, &[self], Box::new(move |g| one(g.reshape(&input_dims)?))))
    }

    pub fn permute(&self, perm: &[usize]) -> Result<Var> {
        let value = layout::permute(self.value(), perm)?;
        let perm = perm.to_vec();
        Ok(Var::from_op(
            "permute",
            value,
            &[self],
            Box::new(move |g| one(layout::permute_backward(g, &perm)?)),
        ))
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Var> {
        let rank = self.dims().len();
        if a >= rank || b >= rank {
            return Err(Error::shape(
                "transpose",
                format!("axes {a} and {b} for shape {}", self.value().shape()),
            ));
        }
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Var> {
        let value = layout::narrow(self.value(), axis, start, len)?;
        let dims = self.dims().to_vec();
        Ok(Var::from_op(
            "narrow",
            value,
            &[self],
            Box::new(move |g| one(layout::narrow_backward(g, &dims, axis, start)?)),
        ))
    }

    // ---- matmul ----

    /// self·other with optional transposes (batched over leading dims; see the matmul family).
    pub fn matmul_t(&self, other: &Var, trans_a: bool, trans_b: bool) -> Result<Var> {
        let value = matmul::matmul(self.value(), other.value(), trans_a, trans_b)?;
        let (a, b) = (self.value().clone(), other.value().clone());
        Ok(Var::from_op(
            "matmul",
            value,
            &[self, other],
            Box::new(move |g| {
                let (ga, gb) = matmul::matmul_backward(&a, &b, g, trans_a, trans_b)?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        ))
    }

    pub fn matmul(&self, other: &Var) -> Result<Var> {
        self.matmul_t(other, false, false)
    }

    // ---- normalisations over the last axis ----

    pub fn softmax(&self) -> Result<Var> {
        let value = softmax::softmax(self.value())?;
        let y = value.clone();
        Ok(Var::from_op(
            "softmax",
            value,
            &[self],
            Box::new(move |g| one(softmax::softmax_backward(&y, g)?)),
        ))
    }

    pub fn log_softmax(&self) -> Result<Var> {
        let value = softmax::log_softmax(self.value())?;
        let y = value.clone();
        Ok(Var::from_op(
            "log_softmax",
            value,
            &[self],
            Box::new(move |g| one(softmax::log_softmax_backward(&y, g)?)),
        ))
    }

    /// LayerNorm over the last axis, with optional elementwise weight and bias.
    pub fn layer_norm(&self, weight: Option<&Var>, bias: Option<&Var>, eps: f32) -> Result<Var> {
        let (value, stats) = layer_norm::layer_norm(
            self.value(),
            weight.map(Var::value),
            bias.map(Var::value),
            eps,
        )?;
        let x = self.value().clone();
        let w = weight.map(|w| w.value().clone());
        let mut inputs = vec![self];
        inputs.extend(weight);
        inputs.extend(bias);
        let (has_w, has_b) = (weight.is_some(), bias.is_some());
        Ok(Var::from_op(
            "layer_norm",
            value,
            &inputs,
            Box::new(move |g| {
                let (gx, gw, gb) =
                    layer_norm::layer_norm_backward(&x, w.as_ref(), has_b, &stats, g)?;
                let mut grads = vec![Some(gx)];
                if has_w {
                    grads.push(gw);
                }
                if has_b {
                    grads.push(gb);
                }
                Ok(grads)
            }),
        ))
    }

    /// Θ of a Pattention layer, row-wise over the parameter tokens (SPEC §1).
    pub fn pattention_norm(&self, theta: Theta, tau: f32) -> Result<Var> {
        let value = pattention_norm::pattention_norm(self.value(), theta, tau)?;
        let a = self.value().clone();
        Ok(Var::from_op(
            "pattention_norm",
            value,
            &[self],
            Box::new(move |g| one(pattention_norm::pattention_norm_backward(&a, theta, tau, g)?)),
        ))
    }

    // ---- language-model pieces ----

    /// Mean cross-entropy of these logits `[N, V]` against integer targets `[N]`.
    pub fn cross_entropy(&self, targets: &Tensor) -> Result<Var> {
        let (loss, lse) = cross_entropy::cross_entropy(self.value(), targets)?;
        let (logits, targets) = (self.value().clone(), targets.clone());
        Ok(Var::from_op(
            "cross_entropy",
            loss,
            &[self],
            Box::new(move |g| {
                one(cross_entropy::cross_entropy_backward(&logits, &targets, &lse, g)?)
            }),
        ))
    }

    /// Rotary position embedding on the leading dims of the last axis (tables from
    /// `rope::rope_tables`).
    pub fn rope(&self, cos: &Tensor, sin: &Tensor) -> Result<Var> {
        let value = rope::rope(self.value(), cos, sin)?;
        let (cos, sin) = (cos.clone(), sin.clone());
        Ok(Var::from_op(
            "rope",
            value,
            &[self],
            Box::new(move |g| one(rope::rope_backward(g, &cos, &sin)?)),
        ))
    }
}

/// Concatenation along `axis`.
pub fn concat(vars: &[&Var], axis: usize) -> Result<Var> {
    let values: Vec<Tensor> = vars.iter().map(|v| v.value().clone()).collect();
    let value = layout::concat(&values, axis)?;
    let sizes: Vec<usize> = vars.iter().map(|v| v.dims().get(axis).copied().unwrap_or(0)).collect();
    Ok(Var::from_op(
        "concat",
        value,
        vars,
        Box::new(move |g| {
            Ok(layout::concat_backward(g, &sizes, axis)?.into_iter().map(Some).collect())
        }),
    ))
}

/// Rows of `weight` [V, d] picked by integer `ids`; the gradient scatter-adds back into weight.
pub fn embedding(weight: &Var, ids: &Tensor) -> Result<Var> {
    let value = emb::embedding(weight.value(), ids)?;
    let (ids, vocab) = (ids.clone(), weight.dims()[0]);
    Ok(Var::from_op(
        "embedding",
        value,
        &[weight],
        Box::new(move |g| one(emb::embedding_backward(&ids, g, vocab)?)),
    ))
}

/// Causal scaled dot-product attention over q, k, v [B, H, T, d_h]: the fused kernel, or the
/// plain composition when `TOKENFORMER_FUSED` turns it off (see `tokenformer_ops::fused`).
pub fn causal_attention(q: &Var, k: &Var, v: &Var) -> Result<Var> {
    if attention::fused_enabled()? {
        causal_attention_fused(q, k, v)
    } else {
        causal_attention_plain(q, k, v)
    }
}

/// Causal attention as one fused op. The backward pass needs q, k, v, the output and the
/// per-row log-sum-exp [B, H, T] (it recomputes the probabilities tile by tile from them), so
/// nothing of size T² is kept or made.
pub fn causal_attention_fused(q: &Var, k: &Var, v: &Var) -> Result<Var> {
    let (out, lse) = attention::causal_attention_fused(q.value(), k.value(), v.value())?;
    let (qt, kt, vt, ot) = (q.value().clone(), k.value().clone(), v.value().clone(), out.clone());
    Ok(Var::from_op(
        "causal_attention",
        out,
        &[q, k, v],
        Box::new(move |g| {
            let (gq, gk, gv) =
                attention::causal_attention_fused_backward(&qt, &kt, &vt, &ot, &lse, g)?;
            Ok(vec![Some(gq), Some(gk), Some(gv)])
        }),
    ))
}

/// Causal attention as the plain chain of matmul and softmax kernels: the reference the fused
/// op is tested against.
///
/// The probabilities [B, H, T, T] are the largest activation of a layer (at T = 1024 they
/// outweigh everything else it keeps), so they are not kept: the backward pass recomputes them
/// from q and k, one more GEMM and softmax, with the same bits as the forward's.
pub fn causal_attention_plain(q: &Var, k: &Var, v: &Var) -> Result<Var> {
    let (out, probs) = attention::causal_attention(q.value(), k.value(), v.value())?;
    drop(probs);
    let (qt, kt, vt) = (q.value().clone(), k.value().clone(), v.value().clone());
    Ok(Var::from_op(
        "causal_attention",
        out,
        &[q, k, v],
        Box::new(move |g| {
            let probs = attention::causal_probs(&qt, &kt)?;
            let (gq, gk, gv) = attention::causal_attention_backward(&qt, &kt, &vt, &probs, g)?;
            Ok(vec![Some(gq), Some(gk), Some(gv)])
        }),
    ))
}
