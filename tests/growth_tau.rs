//! `grow --tau current`, the official growth: τ becomes √ of the grown token count, and the
//! optimizer restarts. Against the default `--tau frozen` on the same trained checkpoint: frozen
//! exact growth keeps the loss bit for bit, `current` changes it and says so.

mod support;
use std::path::Path;
use std::process::{Command, Stdio};
use support::Scratch;
use tokenformer_models::checkpoint::load_checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");

impl Scratch {
    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

fn ok(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn loss(checkpoint: &str, tokens: &str) -> f64 {
    let json = ok(&["eval", "--checkpoint", checkpoint, "--tokens", tokens, "--json"]);
    serde_json::from_str::<serde_json::Value>(json.trim()).unwrap()["loss"].as_f64().unwrap()
}

fn moments_are_zero(dir: &str) -> bool {
    let (m, v) = load_checkpoint(Path::new(dir)).unwrap().optimizer.unwrap();
    m.iter().chain(&v).all(|(_, t)| t.to_vec().unwrap().iter().all(|&x| x == 0.0))
}

#[test]
fn tau_current_follows_the_token_count_and_restarts_the_optimizer() {
    let s = Scratch::new("current");
    let run = s.arg("run");
    ok(&[
        "train",
        "--steps",
        "3",
        "--batch",
        "2",
        "--seq",
        "32",
        "--eval-every",
        "3",
        "--sample-tokens",
        "0",
        "--out",
        &run,
    ]);
    let tokens = s.arg("tokens.txt");
    let ids: Vec<String> = (0..200u32).map(|i| ((i * 37 + 11) % 256).to_string()).collect();
    std::fs::write(&tokens, ids.join(" ")).unwrap();
    let before = loss(&run, &tokens);
    let grow = |out: &str, extra: &[&str]| {
        let mut args =
            vec!["grow", "--checkpoint", &run, "--out", out, "--qkv", "32", "--ffn", "64"];
        args.extend_from_slice(extra);
        ok(&args)
    };

    let frozen = s.arg("frozen");
    let said = grow(&frozen, &[]);
    assert!(said.contains("exact growth"), "{said}");
    assert_eq!(loss(&frozen, &tokens).to_bits(), before.to_bits());
    assert!(!moments_are_zero(&frozen));

    // The official recipe: random new tokens, τ = √n, optimizer restarted.
    let official = s.arg("official");
    let said = grow(&official, &["--init", "random", "--tau", "current", "--seed", "5"]);
    assert!(
        said.contains("qkv √160, proj √128, ffn √576") && said.contains("not output-preserving"),
        "{said}"
    );
    assert!(said.contains("optimizer moments reset to zero"), "{said}");
    let config = load_checkpoint(Path::new(&official)).unwrap().config;
    assert_eq!(
        (config.qkv_scale_tokens, config.proj_scale_tokens, config.ffn_scale_tokens),
        (config.qkv_tokens, config.proj_tokens, config.ffn_tokens)
    );
    assert!(moments_are_zero(&official));
    assert_ne!(loss(&official, &tokens), before);
    // The same tokens as the random growth with τ frozen: only τ differs.
    let random_frozen = s.arg("random-frozen");
    grow(&random_frozen, &["--init", "random", "--seed", "5"]);
    let (a, b) = (
        load_checkpoint(Path::new(&official)).unwrap(),
        load_checkpoint(Path::new(&random_frozen)).unwrap(),
    );
    for ((na, ta), (nb, tb)) in a.params.iter().zip(&b.params) {
        assert_eq!((na, ta.to_vec().unwrap()), (nb, tb.to_vec().unwrap()));
    }
    assert_eq!(b.config.qkv_scale_tokens, 128);
    assert_ne!(loss(&official, &tokens), loss(&random_frozen, &tokens));

    // Exact keys with τ = √n: still not output-preserving, and the moments restart too.
    let exact_current = s.arg("exact-current");
    let said = grow(&exact_current, &["--tau", "current"]);
    assert!(said.contains("not output-preserving"), "{said}");
    assert!(moments_are_zero(&exact_current));
    assert_ne!(loss(&exact_current, &tokens), before);
}
