//! Tokenizer (a HF `tokenizer.json`) and fixed-length batches with masked labels.

use std::path::Path;

use super::DataError;

/// The embedded default tokenizer (byte-level BPE, vocab 1017, `<|bos|>`=0 `<|eos|>`=1 `<|pad|>`=2).
pub const EMBEDDED_TOKENIZER_JSON: &str = include_str!("../../assets/tokenizer.json");

const BOS_NAMES: [&str; 4] = [
    "<|bos|>",
    "<s>",
    "<｜begin▁of▁sentence｜>",
    "<|begin_of_text|>",
];
const PAD_NAMES: [&str; 3] = ["<|pad|>", "<pad>", "[PAD]"];
const EOS_NAMES: [&str; 4] = [
    "<|eos|>",
    "</s>",
    "<｜end▁of▁sentence｜>",
    "<|end_of_text|>",
];

/// A tokenizer that produces BOS-prefixed, right-padded sequences.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    pad: u32,
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("bos", &self.bos)
            .field("pad", &self.pad)
            .field("vocab", &self.vocab_size)
            .finish()
    }
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| DataError::Tokenizer(format!("load {}: {e}", path.display())))?;
        Ok(Self::wrap(inner))
    }

    pub fn embedded() -> Result<Self, DataError> {
        let inner = EMBEDDED_TOKENIZER_JSON
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| DataError::Tokenizer(format!("load embedded tokenizer: {e}")))?;
        Ok(Self::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Self {
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&BOS_NAMES);
        let pad = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| find(&PAD_NAMES))
            .or_else(|| find(&EOS_NAMES))
            .unwrap_or(0);
        let vocab_size = inner.get_vocab_size(true);
        TextTokenizer {
            inner,
            bos,
            pad,
            vocab_size,
        }
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }
    /// Number of ids including added tokens; the model's vocabulary must be at least this large.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Token ids of `text` with BOS first (added if the tokenizer's post-processor does not),
    /// truncated to `max_len`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>, DataError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Tokenizer(format!("encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        ids.truncate(max_len);
        Ok(ids)
    }
}

/// Label value ignored by the loss.
pub const IGNORE_INDEX: i64 = -100;

/// A micro-batch of `rows` sequences of `seq_len` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    /// `input_ids` with padding positions set to [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
    /// Real (non-padding) tokens in the batch.
    pub real_tokens: usize,
}

impl TokenBatch {
    /// True if no position has a label (the loop skips such batches).
    pub fn all_masked(&self) -> bool {
        self.labels.iter().all(|l| *l == IGNORE_INDEX)
    }
}

/// Tokenizes, truncates/pads to `seq_len` and masks padding in the labels.
pub fn make_batch(
    tok: &TextTokenizer,
    docs: &[String],
    seq_len: usize,
) -> Result<TokenBatch, DataError> {
    let mut input_ids = Vec::with_capacity(docs.len() * seq_len);
    let mut labels = Vec::with_capacity(docs.len() * seq_len);
    let mut real_tokens = 0;
    for d in docs {
        let ids = tok.encode(d, seq_len)?;
        real_tokens += ids.len();
        for i in 0..seq_len {
            match ids.get(i) {
                Some(id) => {
                    input_ids.push(i64::from(*id));
                    labels.push(i64::from(*id));
                }
                None => {
                    input_ids.push(i64::from(tok.pad_id()));
                    labels.push(IGNORE_INDEX);
                }
            }
        }
    }
    Ok(TokenBatch {
        rows: docs.len(),
        seq_len,
        input_ids,
        labels,
        real_tokens,
    })
}
