//! Text ↔ token ids. Three tokenizers, all offline:
//!
//! - `Byte`: one token per byte (vocab 256). Needs no file, never fails, and is lossless on any
//!   bytes, UTF-8 or not. The default for the `tiny` preset.
//! - `Gpt2`: OpenAI's r50k_base BPE through `tiktoken-rs`, which builds its ranks into the crate.
//! - `NeoX`: the GPT-NeoX-20B BPE that TokenFormer's released models use, through Hugging Face's
//!   `tokenizers`, from `data/tokenizers/gpt-neox-20b/tokenizer.json` embedded in the binary.
//!
//! Both BPEs are *byte-level*: every token stands for a fixed byte string, and decoding is the
//! concatenation of those strings. So `decode_bytes` is exact for all three, and text is only
//! formed at the end (lossily, for display), which is also what streaming generation needs: a
//! character split across two tokens must wait for its second half.

use std::collections::HashMap;
use std::sync::OnceLock;

use tokenformer_core::{Error, Result};

/// The embedded GPT-NeoX-20B `tokenizer.json` (2.5 MB; small enough to carry in the binary).
const NEOX_JSON: &[u8] = include_bytes!("../../../../data/tokenizers/gpt-neox-20b/tokenizer.json");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tokenizer {
    Byte,
    Gpt2,
    NeoX,
}

impl Tokenizer {
    pub const NAMES: [&'static str; 3] = ["byte", "gpt2", "neox"];

    /// Parses a command-line name. For `neox` this also loads the tokenizer, so a broken
    /// embedded file is reported here rather than at the first `encode`.
    pub fn from_name(name: &str) -> Result<Self> {
        let tok = match name {
            "byte" => Tokenizer::Byte,
            "gpt2" => Tokenizer::Gpt2,
            "neox" => Tokenizer::NeoX,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown tokenizer {name:?} (expected one of: {})",
                    Self::NAMES.join(", ")
                )))
            }
        };
        if tok == Tokenizer::NeoX {
            neox()?;
        }
        Ok(tok)
    }

    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Byte => "byte",
            Tokenizer::Gpt2 => "gpt2",
            Tokenizer::NeoX => "neox",
        }
    }

    /// Number of distinct ids the tokenizer can produce: every id is `< vocab_size()`.
    pub fn vocab_size(self) -> usize {
        match self {
            Tokenizer::Byte => 256,
            Tokenizer::Gpt2 => 50_257,
            Tokenizer::NeoX => 50_277,
        }
    }

    /// The embedding size a model should use: the vocabulary rounded up to a multiple of 128
    /// (50,257 and 50,277 both become 50,304, as in TokenFormer and nanoGPT), which keeps
    /// matmul shapes friendly to the GPU. The extra rows are never a target; generation may in
    /// principle sample them, and `decode` shows such ids as U+FFFD.
    pub fn padded_vocab_size(self) -> usize {
        self.vocab_size().div_ceil(128) * 128
    }

    /// Encodes text. Special-token strings such as `<|endoftext|>` in the text are encoded as
    /// ordinary text by `gpt2`; `neox` (like the reference implementation) matches its added
    /// tokens wherever they occur.
    pub fn encode(self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Gpt2 => Ok(tiktoken_rs::r50k_base_singleton().encode_ordinary(text)),
            Tokenizer::NeoX => {
                let enc = neox()?
                    .tokenizer
                    .encode_fast(text, false)
                    .map_err(|e| Error::invalid(format!("neox tokenizer: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }

    /// Encodes raw file contents: bytes as they are for `byte` (so nothing is lost), lossy UTF-8
    /// (invalid sequences become U+FFFD) for the BPEs, which are defined on text.
    pub fn encode_bytes(self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Byte => Ok(bytes.iter().map(|&b| u32::from(b)).collect()),
            _ => self.encode(&String::from_utf8_lossy(bytes)),
        }
    }

    /// The exact bytes the ids stand for. Ids outside the vocabulary give U+FFFD.
    pub fn decode_bytes(self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.push_token_bytes(id, &mut out);
        }
        out
    }

    /// Ids → text, with invalid UTF-8 (a character cut at the end, or a non-UTF-8 corpus under
    /// `byte`) shown as U+FFFD.
    pub fn decode(self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    fn push_token_bytes(self, id: u32, out: &mut Vec<u8>) {
        const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();
        match self {
            Tokenizer::Byte => match u8::try_from(id) {
                Ok(b) => out.push(b),
                Err(_) => out.extend_from_slice(REPLACEMENT),
            },
            Tokenizer::Gpt2 => match tiktoken_rs::r50k_base_singleton().decode_bytes(&[id]) {
                Ok(bytes) => out.extend_from_slice(&bytes),
                Err(_) => out.extend_from_slice(REPLACEMENT),
            },
            // `neox()` cannot fail here in practice: a `NeoX` value comes from `from_name`,
            // which loaded it already. If it somehow did, showing U+FFFD beats a panic.
            Tokenizer::NeoX => match neox().ok().and_then(|n| n.bytes.get(id as usize)) {
                Some(bytes) if !bytes.is_empty() => out.extend_from_slice(bytes),
                _ => out.extend_from_slice(REPLACEMENT),
            },
        }
    }
}

impl std::fmt::Display for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes one token at a time for generation: bytes are held back until they form complete
/// UTF-8 characters, so a character whose bytes span two tokens is printed whole, once.
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(tokenizer: Tokenizer) -> Self {
        StreamDecoder { tokenizer, pending: Vec::new() }
    }

    /// Adds one token; returns the text that is now complete (often empty or one word).
    pub fn push(&mut self, id: u32) -> String {
        self.tokenizer.push_token_bytes(id, &mut self.pending);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix is valid UTF-8, so this copies it unchanged.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // Bytes that can never become valid: show one U+FFFD and go on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held back (an unfinished character), shown lossily.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// The loaded NeoX tokenizer plus, for exact decoding, the byte string of every id.
struct NeoX {
    tokenizer: tokenizers::Tokenizer,
    bytes: Vec<Vec<u8>>,
}

fn neox() -> Result<&'static NeoX> {
    static NEOX: OnceLock<std::result::Result<NeoX, String>> = OnceLock::new();
    NEOX.get_or_init(load_neox).as_ref().map_err(|msg| Error::format("neox tokenizer.json", msg))
}

fn load_neox() -> std::result::Result<NeoX, String> {
    let tokenizer = tokenizers::Tokenizer::from_bytes(NEOX_JSON).map_err(|e| e.to_string())?;
    let unicode_to_byte = byte_level_inverse();
    let n = tokenizer.get_vocab_size(true);
    let mut bytes = vec![Vec::new(); n];
    // Vocabulary tokens are written in the byte-level alphabet (each byte as one printable
    // character); map the characters back to bytes.
    for (token, id) in tokenizer.get_vocab(false) {
        let b: Option<Vec<u8>> = token.chars().map(|c| unicode_to_byte.get(&c).copied()).collect();
        let b = b.ok_or_else(|| format!("token {id} ({token:?}) is not byte-level"))?;
        if let Some(slot) = bytes.get_mut(id as usize) {
            *slot = b;
        }
    }
    // Added tokens (`<|endoftext|>`, runs of spaces) are stored as plain text.
    for (id, added) in tokenizer.get_added_tokens_decoder() {
        if let Some(slot) = bytes.get_mut(id as usize) {
            *slot = added.content.into_bytes();
        }
    }
    Ok(NeoX { tokenizer, bytes })
}

/// GPT-2's byte-level alphabet, inverted. Printable bytes (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand
/// for themselves; the other 68 bytes (control, space, DEL, NBSP, soft hyphen) are shifted to
/// U+0100.. in increasing order, so that every token is a printable string.
fn byte_level_inverse() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            char::from(b)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).unwrap_or('\u{FFFD}')
        };
        map.insert(c, b);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  \
                          Naïve café — “quotes”, 日本語, emoji 🦀 and    four spaces.\n";

    #[test]
    fn names_and_sizes() {
        for name in Tokenizer::NAMES {
            assert_eq!(Tokenizer::from_name(name).unwrap().name(), name);
        }
        assert!(Tokenizer::from_name("gpt-2").unwrap_err().to_string().contains("gpt2"));
        assert_eq!(Tokenizer::Gpt2.padded_vocab_size(), 50_304);
        assert_eq!(Tokenizer::NeoX.padded_vocab_size(), 50_304);
        assert_eq!(Tokenizer::Byte.padded_vocab_size(), 256);
    }

    #[test]
    fn byte_round_trip_is_lossless_on_any_bytes() {
        let raw: Vec<u8> = (0..=255u8).chain([0xff, 0xfe, b'a']).collect();
        let ids = Tokenizer::Byte.encode_bytes(&raw).unwrap();
        assert_eq!(ids.len(), raw.len());
        assert_eq!(Tokenizer::Byte.decode_bytes(&ids), raw);
        let ids = Tokenizer::Byte.encode(SAMPLE).unwrap();
        assert_eq!(Tokenizer::Byte.decode(&ids), SAMPLE);
        assert_eq!(Tokenizer::Byte.decode(&[300]), "\u{FFFD}");
    }

    #[test]
    fn gpt2_round_trip_and_known_ids() {
        let t = Tokenizer::Gpt2;
        assert_eq!(t.encode("Hello world").unwrap(), vec![15496, 995]);
        // Whole-corpus counts from data/README.md (checked against the reference tokenizers).
        let shakespeare = std::str::from_utf8(crate::data::DEFAULT_CORPUS).unwrap();
        assert_eq!(t.encode(shakespeare).unwrap().len(), 338_025);
        let ids = t.encode(SAMPLE).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids), SAMPLE);
    }

    #[test]
    fn neox_loads_round_trips_and_matches_reference_decoder() {
        let t = Tokenizer::from_name("neox").unwrap();
        // Ids given for this sentence in the data README (checked against the reference).
        assert_eq!(
            t.encode("Hello world, First Citizen:").unwrap(),
            vec![12092, 1533, 13, 3973, 47422, 27]
        );
        let shakespeare = std::str::from_utf8(crate::data::DEFAULT_CORPUS).unwrap();
        assert_eq!(t.encode(shakespeare).unwrap().len(), 340_240);
        let ids = t.encode(SAMPLE).unwrap();
        assert_eq!(t.decode(&ids), SAMPLE);
        let reference = neox().unwrap().tokenizer.decode(&ids, false).unwrap();
        assert_eq!(t.decode(&ids), reference);
        // The added whitespace tokens decode to their spaces.
        assert_eq!(t.decode(&[50276]), "  ");
    }

    #[test]
    fn stream_decoder_holds_split_characters() {
        // "é" is two bytes; under `byte` it arrives in two tokens.
        let mut s = StreamDecoder::new(Tokenizer::Byte);
        let out: Vec<String> = "aé🦀".bytes().map(|b| s.push(u32::from(b))).collect();
        assert_eq!(out, ["a", "", "é", "", "", "", "🦀"]);
        // A stray continuation byte becomes one U+FFFD and does not block what follows.
        assert_eq!(s.push(0x80), "\u{FFFD}");
        assert_eq!(s.push(0xE6), "");
        assert_eq!(s.finish(), "\u{FFFD}");
        for t in [Tokenizer::Gpt2, Tokenizer::NeoX] {
            let mut s = StreamDecoder::new(t);
            let text: String = t.encode(SAMPLE).unwrap().into_iter().map(|i| s.push(i)).collect();
            assert_eq!(text + &s.finish(), SAMPLE, "{t}");
        }
    }
}
