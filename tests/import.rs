//! `tokenformer import` end to end: the fixtures of scripts/make_import_fixtures.py (a small
//! model saved as the released checkpoints are: float32 plain, float16 inside DeepSpeed's
//! `{'module': …}`, bfloat16 as a pipeline-parallel DeepSpeed run's per-layer files and as
//! safetensors) evaluate to the float64 reference's loss, and hostile
//! or damaged archives, crafted here byte by byte, are each refused in one line with nothing
//! written and nothing executed.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use support::Scratch;

const BIN: &str = env!("CARGO_BIN_EXE_tokenformer");
/// The reference test's tolerance (tests/reference.rs): relative loss difference.
const TOLERANCE: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

/// The fp32 fixture imported into `imported/` of `scratch` (4 heads, context 16), its path.
fn import_fp32_fixture(scratch: &Scratch) -> PathBuf {
    let imported = scratch.path("imported");
    let src = fixtures().join("fp32/pytorch_model.bin");
    let (src, imported_s) = (src.to_str().unwrap(), imported.to_str().unwrap());
    ok(&["import", src, "--out", imported_s, "--heads", "4", "--max-seq-len", "16"]);
    imported
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `import` on `src` into `out`, which must fail with one line of error that contains
/// `expect`, and leave `out` uncreated.
fn refused(src: &Path, out: &Path, expect: &str) -> String {
    let output = run(&[
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--heads",
        "2",
        "--max-seq-len",
        "8",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{}: {stderr}", src.display());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "want one line, got:\n{stderr}");
    assert!(stderr.contains(expect), "want '{expect}' in: {stderr}");
    assert!(!out.exists(), "{} was created by a refused import", out.display());
    stderr
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn imported_fixtures_evaluate_to_the_float64_reference() {
    let scratch = Scratch::new("fixtures");
    let expected = expected();
    let heads = expected["flags"]["heads"].to_string();
    let seq = expected["flags"]["max_seq_len"].to_string();
    let tokens = fixtures().join("tokens.txt");
    let cases = [
        ("fp32/pytorch_model.bin", "fp32", "float32"),
        ("fp16-deepspeed", "fp16", "float16"),
        ("fp16-deepspeed/mp_rank_00_model_states.pt", "fp16", "float16"),
        ("bf16.safetensors", "bf16", "bfloat16"),
        ("bf16-pipeline", "bf16", "bfloat16"),
    ];
    for (i, (src, key, dtype)) in cases.into_iter().enumerate() {
        let src = fixtures().join(src);
        let out = scratch.path(&format!("imported-{i}"));
        let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());
        let said = ok(&["import", src_s, "--out", out_s, "--heads", &heads, "--max-seq-len", &seq]);
        assert!(said.contains(dtype) && said.contains("25,152 parameters"), "{said}");
        let json =
            ok(&["eval", "--checkpoint", out_s, "--tokens", tokens.to_str().unwrap(), "--json"]);
        let got: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        let (loss, want) = (got["loss"].as_f64().unwrap(), expected[key]["loss"].as_f64().unwrap());
        assert_eq!(got["tokens"], expected[key]["tokens"]);
        let rel = (loss - want).abs() / want.abs();
        assert!(rel < TOLERANCE, "{key}: eval {loss} against the reference {want} (rel {rel:e})");
        // An ordinary checkpoint: `info` reads it, and importing over it is refused.
        assert!(ok(&["info", "--checkpoint", out_s]).contains("\"qkv_tokens\": 24"));
        let again =
            run(&["import", src_s, "--out", out_s, "--heads", &heads, "--max-seq-len", &seq]);
        assert!(!again.status.success());
    }
    // Without the flags the shapes name no released config, and the message says what to give.
    let out = scratch.path("no-flags");
    let output = run(&[
        "import",
        fixtures().join("fp32/pytorch_model.bin").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("match no released config; give --heads and --max-seq-len"),
        "{stderr}"
    );
    assert!(!out.exists());
}

// ---- Crafting archives: a pickle assembler and a zip writer as torch.save lays them out ----

/// Pickle opcodes, protocol 2, as `torch.save` emits them.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }
    fn op(mut self, op: u8) -> Pickle {
        self.0.push(op);
        self
    }
    fn global(mut self, module: &str, name: &str) -> Pickle {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(mut self, s: &str) -> Pickle {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(mut self, n: u32) -> Pickle {
        self.0.push(b'J');
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn ints(mut self, ns: &[u32]) -> Pickle {
        self = self.op(b'(');
        for &n in ns {
            self = self.int(n);
        }
        self.op(b't')
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`, the
    /// storage declared as `numel` float32 elements under `key`.
    fn tensor(self, key: &str, numel: u32, offset: u32, size: &[u32], stride: &[u32]) -> Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b'(')
            .op(b'(')
            .str("storage")
            .global("torch", "FloatStorage")
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b't')
            .op(b'Q')
            .int(offset)
            .ints(size)
            .ints(stride)
            .op(0x89)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R')
    }
    fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
}

/// One tensor of a crafted state_dict: (name, storage key, the storage's declared element
/// count, offset, size, stride).
type Item<'a> = (&'a str, &'a str, u32, u32, &'a [u32], &'a [u32]);

/// A state_dict pickle: an `OrderedDict` of these tensors.
fn state_dict(items: &[Item]) -> Vec<u8> {
    let mut p = Pickle::new().global("collections", "OrderedDict").op(b')').op(b'R').op(b'(');
    for &(name, key, numel, offset, size, stride) in items {
        p = p.str(name).tensor(key, numel, offset, size, stride);
    }
    p.op(b'u').stop()
}

/// A zip archive of stored entries, laid out as torch.save writes one. `declare` overrides the
/// size the central directory declares for one entry (written as a zip64 field).
fn zip(entries: &[(&str, Vec<u8>)], declare: Option<(&str, u64)>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date
        out.extend_from_slice(&0u32.to_le_bytes()); // crc
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        let declared = declare.filter(|(n, _)| n == name).map(|(_, size)| size);
        let (size32, extra) = match declared {
            Some(size) => {
                let mut extra = vec![1, 0, 16, 0];
                extra.extend_from_slice(&size.to_le_bytes());
                extra.extend_from_slice(&size.to_le_bytes());
                (0xffff_ffffu32, extra)
            }
            None => (data.len() as u32, Vec::new()),
        };
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&0u32.to_le_bytes()); // crc
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&size32.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
        central.extend_from_slice(&extra);
    }
    let dir_start = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&dir_start.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// The same archive ended by zip64 records, as torch.save ends one past 4 GiB: the classic
/// end record's fields say "see zip64" and a zip64 end record and its locator hold the values.
fn with_zip64_end(mut bytes: Vec<u8>) -> Vec<u8> {
    let end = bytes.len() - 22;
    let field = |at: usize, n: usize| -> u64 {
        bytes[end + at..end + at + n].iter().rev().fold(0, |acc, &b| acc << 8 | u64::from(b))
    };
    let (count, dir_len, dir_start) = (field(10, 2), field(12, 4), field(16, 4));
    bytes.truncate(end);
    let record = bytes.len() as u64;
    bytes.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
    bytes.extend_from_slice(&44u64.to_le_bytes());
    bytes.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for value in [count, count, dir_len, dir_start] {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&record.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&[0xff; 12]);
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes
}

fn floats(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A torch.save archive of `pickle` with storage "0" holding `storage`.
fn archive(pickle: Vec<u8>, storage: Vec<u8>) -> Vec<u8> {
    zip(&[("archive/data.pkl", pickle), ("archive/data/0", storage)], None)
}

const EMBED: &str = "sequential.0.word_embeddings.weight";

#[test]
fn a_crafted_archive_of_the_right_form_is_read() {
    // The crafting itself is sound: the same bytes, made valid, get past the reader and fail
    // only for lack of layers. Without this, the refusals below could come from a broken
    // writer rather than from the check they name.
    let scratch = Scratch::new("crafted");
    let src = scratch.path("ok.bin");
    let pickle = state_dict(&[(EMBED, "0", 6, 0, &[3, 2], &[2, 1])]);
    let bytes = archive(pickle, floats(&[1.0; 6]));
    std::fs::write(&src, &bytes).unwrap();
    refused(&src, &scratch.path("out"), "holds no layer");
    // The zip64 end records of a large archive lead to the same central directory.
    std::fs::write(&src, with_zip64_end(bytes)).unwrap();
    refused(&src, &scratch.path("out"), "holds no layer");
}

#[test]
fn hostile_and_damaged_archives_are_refused_in_one_line_with_nothing_written() {
    let scratch = Scratch::new("hostile");
    let six = floats(&[0.5; 6]);
    let call = |module: &str, name: &str| {
        Pickle::new().global(module, name).str("touch /tmp/pwned").op(0x85).op(b'R').stop()
    };
    let valid = archive(state_dict(&[(EMBED, "0", 6, 0, &[3, 2], &[2, 1])]), six.clone());
    let truncated = valid[..valid.len() / 2].to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "os-system",
            archive(call("os", "system"), six.clone()),
            "GLOBAL os.system is not allowed",
        ),
        (
            "builtins-eval",
            archive(call("builtins", "eval"), six.clone()),
            "GLOBAL builtins.eval is not allowed",
        ),
        (
            "reduce-storage-class",
            archive(
                Pickle::new().global("torch", "FloatStorage").op(b')').op(b'R').stop(),
                six.clone(),
            ),
            "REDUCE of torch.FloatStorage, which is not a callable this reader allows",
        ),
        (
            "reduce-string",
            archive(Pickle::new().str("os.system").op(b')').op(b'R').stop(), six.clone()),
            "REDUCE of a string, which is not a callable this reader allows",
        ),
        (
            "newobj",
            archive(Pickle::new().op(b')').op(b')').op(0x81).stop(), six.clone()),
            "opcode NEWOBJ (0x81)",
        ),
        (
            // The pickle declares 6 elements; the archive holds 3.
            "short-storage",
            archive(state_dict(&[(EMBED, "0", 6, 0, &[3, 2], &[2, 1])]), floats(&[0.5; 3])),
            "holds 12 bytes, but the pickle says 6 float32 elements (24 bytes)",
        ),
        (
            // A storage of 3 elements under a tensor of 6.
            "tensor-longer-than-storage",
            archive(state_dict(&[(EMBED, "0", 3, 0, &[3, 2], &[2, 1])]), floats(&[0.5; 3])),
            "reads past the end of storage '0' (3 elements)",
        ),
        (
            // Size (2, 3) with stride (3, 2): the last element is 1·3 + 2·2 = 7 of 6.
            "stride-past-the-end",
            archive(state_dict(&[(EMBED, "0", 6, 0, &[2, 3], &[3, 2])]), six.clone()),
            "size [2, 3], stride [3, 2] at offset 0 reads past the end of storage '0'",
        ),
        ("truncated", truncated, "no end-of-central-directory record"),
        (
            "declares-2-to-the-40",
            zip(
                &[("archive/data.pkl", state_dict(&[])), ("archive/data/0", six.clone())],
                Some(("archive/data/0", 1 << 40)),
            ),
            "zip entry 'archive/data/0' declares 1099511627776 bytes",
        ),
        (
            "unmapped-name",
            archive(state_dict(&[("lm_head.weight", "0", 6, 0, &[3, 2], &[2, 1])]), six.clone()),
            "tensor 'lm_head.weight' maps to nothing",
        ),
        (
            "duplicate-name",
            archive(
                state_dict(&[
                    (EMBED, "0", 6, 0, &[3, 2], &[2, 1]),
                    (EMBED, "0", 6, 0, &[3, 2], &[2, 1]),
                ]),
                six.clone(),
            ),
            "appears twice",
        ),
        (
            "non-finite",
            {
                // Every tensor of a two-layer model of width 2 viewing one storage, one NaN in
                // the embedding.
                let mut items: Vec<(String, u32, &[u32])> = vec![(EMBED.into(), 0, &[3, 2])];
                for layer in 2..4 {
                    for leaf in [
                        "attention.query",
                        "attention.key",
                        "attention.value",
                        "attention.proj",
                        "mlp",
                    ] {
                        for kv in ["key", "value"] {
                            items.push((
                                format!("sequential.{layer}.{leaf}.{kv}_param_tokens"),
                                0,
                                &[1, 2],
                            ));
                        }
                    }
                }
                items.push(("sequential.5.norm.weight".into(), 0, &[2]));
                items.push(("sequential.5.norm.bias".into(), 0, &[2]));
                let list: Vec<Item> = items
                    .iter()
                    .map(|(n, off, size)| {
                        let stride: &[u32] = if size.len() == 2 { &[2, 1] } else { &[1] };
                        (n.as_str(), "0", 6, *off, *size, stride)
                    })
                    .collect();
                let mut values = [0.5f32; 6];
                values[4] = f32::NAN;
                archive(state_dict(&list), floats(&values))
            },
            "holds a non-finite value (NaN at flat index 4 of 6)",
        ),
    ];
    for (name, bytes, expect) in cases {
        let src = scratch.path(&format!("{name}.bin"));
        std::fs::write(&src, bytes).unwrap();
        let line = refused(&src, &scratch.path(&format!("{name}-out")), expect);
        assert!(line.contains(src.to_str().unwrap()), "{name}: the file is not named: {line}");
        println!("{name}: {}", line.trim_end());
    }
    assert!(!Path::new("/tmp/pwned").exists());
}

#[test]
fn a_checkpoint_directory_holding_released_names_says_to_import_it() {
    // SPEC §6.3: a model.safetensors under the released names is refused with a message saying
    // so, before any complaint about the tensors it lacks.
    let scratch = Scratch::new("released-names");
    let imported = import_fp32_fixture(&scratch);
    let by_hand = scratch.path("by-hand");
    std::fs::create_dir_all(&by_hand).unwrap();
    std::fs::copy(imported.join("config.json"), by_hand.join("config.json")).unwrap();
    std::fs::copy(fixtures().join("bf16.safetensors"), by_hand.join("model.safetensors")).unwrap();
    for command in ["info", "eval"] {
        let mut args = vec![command, "--checkpoint", by_hand.to_str().unwrap()];
        let tokens = fixtures().join("tokens.txt");
        if command == "eval" {
            args.extend(["--tokens", tokens.to_str().unwrap()]);
        }
        let out = run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("the released checkpoints' names")
                && stderr.contains("tokenformer import"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn per_token_losses_match_the_reference_position_by_position() {
    let scratch = Scratch::new("per-token");
    let expected = expected();
    let out = import_fp32_fixture(&scratch);
    let out_s = out.to_str().unwrap();
    let tokens = fixtures().join("tokens.txt");
    let tokens_s = tokens.to_str().unwrap();
    let ids: Vec<u32> = std::fs::read_to_string(&tokens)
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let want: Vec<f64> = expected["fp32"]["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(want.len(), ids.len() - 1);

    let json_file = scratch.path("losses.json");
    let json_s = json_file.to_str().unwrap();
    let printed =
        ok(&["eval", "--checkpoint", out_s, "--tokens", tokens_s, "--json", "--per-token", json_s]);
    let printed: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_file).unwrap()).unwrap();
    let targets: Vec<u32> =
        written["targets"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(targets, ids[1..]);
    let losses: Vec<f64> =
        written["losses"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    for (i, (got, want)) in losses.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= TOLERANCE * want.abs().max(1.0),
            "position {i}: {got} vs {want}"
        );
    }
    // The mean is eval's own, to the bit, and the mean of the positions up to rounding.
    assert_eq!(written["loss"].as_f64().unwrap() as f32, printed["loss"].as_f64().unwrap() as f32);
    let mean = losses.iter().sum::<f64>() / losses.len() as f64;
    assert!((mean - printed["loss"].as_f64().unwrap()).abs() < 1e-5 * mean);

    // The same numbers as safetensors.
    let st = scratch.path("losses.safetensors");
    ok(&["eval", "--checkpoint", out_s, "--tokens", tokens_s, "--per-token", st.to_str().unwrap()]);
    let tensors = tokenformer_core::safetensors_io::load_safetensors(&st).unwrap();
    let get = |name: &str| tensors.iter().find(|(n, _)| n == name).unwrap().1.to_vec().unwrap();
    assert_eq!(get("losses"), losses.iter().map(|&x| x as f32).collect::<Vec<_>>());
    assert_eq!(get("targets"), ids[1..].iter().map(|&x| x as f32).collect::<Vec<_>>());

    // An existing file is never overwritten, and the format comes from the name.
    for (file, say) in
        [(json_s, "exists; name a new file"), ("losses.txt", "must end in .json or .safetensors")]
    {
        let before = std::fs::read(&json_file).unwrap();
        let output =
            run(&["eval", "--checkpoint", out_s, "--tokens", tokens_s, "--per-token", file]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(say), "{stderr}");
        assert_eq!(std::fs::read(&json_file).unwrap(), before);
    }
}

#[test]
fn an_imported_model_is_fine_tuned_with_train_init_from() {
    let scratch = Scratch::new("init-from");
    let imported = import_fp32_fixture(&scratch);
    let imported_s = imported.to_str().unwrap();
    let run_dir = scratch.path("finetune");
    let run_s = run_dir.to_str().unwrap();
    // A learning rate too small to move any weight: the run's checkpoint must then hold the
    // imported weights themselves, which shows where it started (a fresh init would not).
    let common = ["--batch", "2", "--seq", "16", "--eval-every", "1", "--sample-tokens", "0"];
    let mut args = vec!["train", "--init-from", imported_s, "--out", run_s, "--steps", "1"];
    args.extend(["--lr", "1e-30", "--min-lr", "0"]);
    args.extend(common);
    ok(&args);
    let start = tokenformer_models::checkpoint::load_checkpoint(&imported).unwrap();
    let tuned = tokenformer_models::checkpoint::load_checkpoint(&run_dir).unwrap();
    assert_eq!(start.config, tuned.config);
    for ((n, a), (m, b)) in start.params.iter().zip(&tuned.params) {
        assert_eq!((n, a.to_vec().unwrap()), (m, b.to_vec().unwrap()));
    }
    // A run like any other: it has its optimizer and train state, and says where it began.
    assert!(tuned.optimizer.is_some());
    let state = tuned.train_state.unwrap();
    assert_eq!(state["settings"]["init_from"], imported_s);
    // A model whose vocabulary the tokenizer does not give is refused in one line.
    let other = scratch.path("other");
    let mut args = vec!["train", "--init-from", imported_s, "--out", other.to_str().unwrap()];
    args.extend(["--tokenizer", "gpt2"]);
    args.extend(common);
    let out = run(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("vocab_size"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!other.exists());
}

#[test]
fn flags_and_a_config_file_set_what_the_shapes_cannot() {
    let scratch = Scratch::new("config");
    let src = fixtures().join("fp32/pytorch_model.bin");
    let src = src.to_str().unwrap();
    let config_of = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
    };
    let flagged = scratch.path("flagged");
    let mut args = vec!["import", src, "--out", flagged.to_str().unwrap(), "--heads", "2"];
    args.extend(["--max-seq-len", "12", "--norm", "gelu_l2_norm", "--tokenizer", "neox"]);
    ok(&args);
    let c = config_of(&flagged);
    assert_eq!((c["n_heads"].as_u64(), c["max_seq_len"].as_u64()), (Some(2), Some(12)));
    assert_eq!((c["norm"].as_str(), c["tokenizer"].as_str()), (Some("gelu_l2_norm"), Some("neox")));

    // --config gives every setting; the flags still override it.
    let mut given = c.clone();
    given["n_heads"] = 1.into();
    given["rotary_pct"] = 0.5.into();
    let file = scratch.path("given.json");
    std::fs::write(&file, serde_json::to_string_pretty(&given).unwrap()).unwrap();
    let from_file = scratch.path("from-file");
    let mut args = vec!["import", src, "--out", from_file.to_str().unwrap()];
    args.extend(["--config", file.to_str().unwrap(), "--max-seq-len", "9"]);
    ok(&args);
    let c = config_of(&from_file);
    assert_eq!((c["n_heads"].as_u64(), c["rotary_pct"].as_f64()), (Some(1), Some(0.5)));
    assert_eq!(c["max_seq_len"].as_u64(), Some(9));

    // A config whose shapes are not the tensors' is refused, as is an invalid head count.
    given["ffn_tokens"] = 41.into();
    std::fs::write(&file, serde_json::to_string_pretty(&given).unwrap()).unwrap();
    let out = scratch.path("refused");
    let mut args = vec!["import", src, "--out", out.to_str().unwrap()];
    args.extend(["--config", file.to_str().unwrap()]);
    let output = run(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("but the tensors have L 2, d 32, V 256, qkv 24, proj 20, ffn 40"),
        "{stderr}"
    );
    let output = run(&[
        "import",
        src,
        "--out",
        out.to_str().unwrap(),
        "--heads",
        "5",
        "--max-seq-len",
        "16",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("n_heads"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn info_names_the_released_config_a_model_is() {
    for (preset, count, what) in [
        ("150M", "151,881,216", "the released TokenFormer 150M trained on the Pile"),
        ("354M", "353,503,232", "the released 354M OpenWebText2 base"),
        ("757M", "756,156,416", "the released 757M incremental-scaling model"),
    ] {
        let said = ok(&["info", "--preset", preset]);
        assert!(said.contains(&format!("preset: {preset} ({what}")), "{said}");
        assert!(said.contains(count) && said.contains("\"tokenizer\": \"neox\""), "{said}");
    }
    let said = ok(&["info", "--preset", "owt-354M"]);
    assert!(!said.contains("released") && said.contains("\"tokenizer\": \"gpt2\""), "{said}");
}

#[test]
fn import_never_writes_into_a_folder_of_other_files() {
    let scratch = Scratch::new("foreign-out");
    let out = scratch.path("photos");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("cat.jpg"), b"not ours").unwrap();
    let src = fixtures().join("fp32/pytorch_model.bin");
    let output = run(&[
        "import",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--heads",
        "4",
        "--max-seq-len",
        "16",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["cat.jpg"]);
}
