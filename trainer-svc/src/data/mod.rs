//! The data pipeline (spec §8.7): weighted interleave of local sources (seed 42), a held-out
//! split that never reaches the training stream, BOS-prefixed fixed-length batches with padding
//! masked out of the labels, and a serializable position for resume. No `tch` here.

pub mod hub_source;
pub mod source;
pub mod stream;
pub mod tokenize;

pub use hub_source::{HubDataset, SKIPPED_SHARDS};
pub use source::{SourceKind, SourceSpec};
pub use stream::{DataPosition, SourcePosition, TrainStream, held_out_docs, is_held_out};
pub use tokenize::{IGNORE_INDEX, TextTokenizer, TokenBatch, make_batch};

/// Errors of the data pipeline; each names the file or source.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("open {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("read {source_name} line {line}: {reason}")]
    Read {
        source_name: String,
        line: u64,
        reason: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("data config: {0}")]
    Config(String),
    #[error("resume data position: {0}")]
    Resume(String),
}

/// Training stream plus tokenizer: yields micro-batches and exposes the position.
pub struct DataPipeline {
    pub tokenizer: TextTokenizer,
    stream: TrainStream,
    pub seq_len: usize,
    pub rows: usize,
}

impl DataPipeline {
    pub fn new(tokenizer: TextTokenizer, stream: TrainStream, seq_len: usize, rows: usize) -> Self {
        DataPipeline {
            tokenizer,
            stream,
            seq_len,
            rows,
        }
    }

    pub fn next_batch(&mut self) -> Result<TokenBatch, DataError> {
        let mut docs = Vec::with_capacity(self.rows);
        for _ in 0..self.rows {
            docs.push(self.stream.next_doc()?.1);
        }
        make_batch(&self.tokenizer, &docs, self.seq_len)
    }

    pub fn position(&self) -> DataPosition {
        self.stream.position()
    }

    /// Replaces the stream (resume at a saved position).
    pub fn set_stream(&mut self, stream: TrainStream) {
        self.stream = stream;
    }
}
