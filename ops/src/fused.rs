//! The run-time switch between a fused kernel and the plain composition of ops it replaces.
//!
//! Fused kernels are on by default. The environment variable `TOKENFORMER_FUSED` turns them off:
//! `0` turns every one off, `1` turns every one on, and a comma-separated list sets ops one by
//! one, as in `attention:0`; an op the list does not name follows a bare `0` or `1` in the list,
//! or is on. So one run can test and time both versions of an op on the same device, and a fused
//! kernel that misbehaves on some machine never blocks the rest.

use std::sync::OnceLock;
use tokenformer_core::{Error, Result};

/// The name of the variable.
pub const VAR: &str = "TOKENFORMER_FUSED";

/// The ops that have a fused kernel, by the name the switch uses.
pub const OPS: &[&str] = &["attention"];

/// Whether `op` runs its fused kernel in this process (the variable is read once).
pub fn enabled(op: &str) -> Result<bool> {
    static SPEC: OnceLock<Option<String>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| std::env::var(VAR).ok());
    match spec {
        Some(spec) => parse(spec, op),
        None => Ok(true),
    }
}

/// Whether `spec` (a value of the variable) turns `op` on, or an error naming what it cannot
/// read.
pub fn parse(spec: &str, op: &str) -> Result<bool> {
    let bad = |why: String| {
        Error::invalid(format!(
            "{VAR}={spec:?}: {why} (expected 0, 1 or a list like attention:0; ops: {})",
            OPS.join(", ")
        ))
    };
    let switch = |value: &str| match value.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(bad(format!("{other:?} is not 0 or 1"))),
    };
    let (mut default, mut this_op) = (true, None);
    for item in spec.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        match item.split_once(':') {
            Some((name, value)) => {
                let name = name.trim();
                if !OPS.contains(&name) {
                    return Err(bad(format!("no fused op is called {name:?}")));
                }
                let on = switch(value)?;
                if name == op {
                    this_op = Some(on);
                }
            }
            None => default = switch(item)?,
        }
    }
    Ok(this_op.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_turn_ops_on_and_off() {
        for (spec, on) in [
            ("", true),
            ("1", true),
            ("0", false),
            (" 0 ", false),
            ("attention:0", false),
            ("attention:1", true),
            ("0,attention:1", true),
            ("attention:1, 0", true),
            ("1,attention:0", false),
        ] {
            assert_eq!(parse(spec, "attention").unwrap(), on, "{spec:?}");
        }
    }

    #[test]
    fn unreadable_values_are_errors_that_say_what_is_expected() {
        for spec in ["yes", "attention", "attention:2", "atention:0", "2"] {
            let err = parse(spec, "attention").unwrap_err().to_string();
            assert!(err.contains(VAR) && err.contains("expected 0, 1"), "{spec}: {err}");
        }
    }
}
